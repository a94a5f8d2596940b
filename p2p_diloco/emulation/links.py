"""Links files: each emulated machine's last-mile link (rates, delay, loss), read from TOML.

A link is what one machine's own connection to the internet adds to every packet
it sends or receives: its upload rate caps what it sends, its download rate caps
what it receives, and its one-way delay and loss apply to each packet in either
direction. A packet from machine i to machine j therefore waits
`delay_ms[i] + delay_ms[j]` and survives with probability
`(1 - loss[i]) * (1 - loss[j])`; a ping between them takes `2 * (delay_ms[i] +
delay_ms[j])`, plus transmission time.

    [default]            # optional: every peer without its own [[peer]] entry
    up_mbit = 100
    down_mbit = 100
    delay_ms = 25
    [host]               # the host (bootstrap peer) of a swarm; [default] when absent
    up_mbit = 1000
    down_mbit = 1000
    delay_ms = 5
    [[peer]]             # peer0, peer1, ... in order
    up_mbit = 10
    down_mbit = 10
    delay_ms = 75
    loss = 0.0           # optional, in [0, 1)
    nat = false          # optional: true puts the machine behind a NAT (it can connect out, nobody can connect in)

`read_links` refuses a file before anything starts, with a `LinksError` that
names the file, the key (`peer[2].up_mbit`) and what is wrong with it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEYS = ("up_mbit", "down_mbit", "delay_ms", "loss")
FLAGS = ("nat",)
TABLES = ("default", "host", "peer")


class LinksError(ValueError):
    """A links file that cannot be used; the message names the file, the key and the reason."""


@dataclass(frozen=True)
class Link:
    """One machine's last mile: rates in Mbit/s (> 0), one-way delay in ms (>= 0), loss probability in [0, 1)."""

    up_mbit: float
    down_mbit: float
    delay_ms: float
    loss: float = 0.0
    nat: bool = False  # behind a NAT: it connects out, nobody connects in (see `wan.Wan`)

    def __post_init__(self) -> None:
        for key in KEYS:
            problem = _problem(key, getattr(self, key))
            if problem:
                raise ValueError(f"{key}: {problem}")


def read_links(path: str, peers: int) -> tuple[Link, list[Link]]:
    """(the host's link, the links of peer0 .. peer{peers-1}) from the TOML file at `path`.

    Peers without a `[[peer]]` entry, and the host without `[host]`, get `[default]`;
    a file that leaves one of them without a link is refused like any other error."""
    data = _load(path)
    unknown = sorted(set(data) - set(TABLES))
    if unknown:
        raise LinksError(f"{path}: {unknown[0]}: unknown table (known: [default], [host], [[peer]])")
    default = _table(path, data, "default") if "default" in data else None
    host = _table(path, data, "host") if "host" in data else default
    if host is None:
        raise LinksError(f"{path}: host: no [host] table and no [default] to fall back on")
    listed = _peer_tables(path, data.get("peer", []), peers)
    if len(listed) < peers and default is None:
        raise LinksError(f"{path}: peer[{len(listed)}]: {peers} peers but only {len(listed)} [[peer]] "
                         "entries and no [default] for the others")
    return host, listed + [default] * (peers - len(listed))


def _load(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise LinksError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise LinksError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise LinksError(f"{path}: not valid TOML: not UTF-8 text (byte {e.start})") from None


def _peer_tables(path: str, entries, peers: int) -> list[Link]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LinksError(f"{path}: peer: must be an array of tables ([[peer]])")
    if len(entries) > peers:
        raise LinksError(f"{path}: peer[{peers}]: {len(entries)} [[peer]] entries but only {peers} peers")
    return [_link(path, f"peer[{k}]", entry) for k, entry in enumerate(entries)]


def _table(path: str, data: dict, name: str) -> Link:
    if not isinstance(data[name], dict):
        raise LinksError(f"{path}: {name}: must be a table ([{name}])")
    return _link(path, name, data[name])


def _link(path: str, where: str, table: dict) -> Link:
    unknown = sorted(set(table) - set(KEYS) - set(FLAGS))
    if unknown:
        raise LinksError(f"{path}: {where}.{unknown[0]}: unknown key (known: {', '.join(KEYS + FLAGS)})")
    flags = {key: table.pop(key) for key in FLAGS if key in table}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise LinksError(f"{path}: {where}.{key}: must be true or false, not {value!r}")
    missing = [key for key in KEYS[:3] if key not in table]
    if missing:
        raise LinksError(f"{path}: {where}.{missing[0]}: missing")
    for key, value in table.items():
        problem = _problem(key, value)
        if problem:
            raise LinksError(f"{path}: {where}.{key}: {problem}")
    return Link(**{key: float(value) for key, value in table.items()}, **flags)


def _problem(key: str, value) -> str | None:
    """Why `value` cannot be the link's `key`, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, not {value!r}"
    if not math.isfinite(value):
        return f"must be finite, not {value}"
    if key.endswith("_mbit") and value <= 0:
        return f"must be a positive rate in Mbit/s, not {value}"
    if key == "delay_ms" and value < 0:
        return f"must be a delay >= 0 ms, not {value}"
    if key == "loss" and not 0 <= value < 1:
        return f"must be a probability in [0, 1), not {value}"
    return None
