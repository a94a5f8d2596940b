"""The DHT: starting a node that dies with its parent, and the run's records in it.

Keys are namespaced by run id: `{run}_config` holds the host's `RunConfig`;
`{run}_progress` holds one `PeerProgress` per peer (subkey = peer id). Values are
msgpack bytes, validated on read; a malformed record is logged and ignored.
"""

from __future__ import annotations

import logging
import time

import hivemind
from hivemind.utils import get_dht_time

from ..node.records import PeerProgress, RecordError, RunConfig, check_run_id
from . import reachability
from .addresses import likeliest_first
from .lifetime import die_with_parent

log = logging.getLogger(__name__)

CONFIG_TTL = 120.0
PROGRESS_TTL = 60.0


class _DHT(hivemind.DHT):
    def run(self) -> None:
        die_with_parent()  # no orphaned DHT (and so no orphaned p2pd) when the peer is SIGKILLed
        super().run()


def start_dht(initial_peers: list[str] | None = None, host_maddrs: list[str] | None = None,
              identity_path: str | None = None, client_mode: bool = False,
              announce_maddrs: list[str] | None = None) -> hivemind.DHT:
    """A DHT node (and its p2pd). `host_maddrs` default to loopback (tests, local swarms); the CLI passes
    every interface (`addresses.listen_and_announce`). A node not in client mode answers dial-backs
    (`reachability`), so that peers can learn whether they can be reached."""
    dht = _DHT(start=True, initial_peers=initial_peers or None,
               host_maddrs=host_maddrs or ["/ip4/127.0.0.1/tcp/0"], announce_maddrs=announce_maddrs or None,
               identity_path=identity_path, client_mode=client_mode)
    if not client_mode:
        reachability.serve(dht)
    return dht


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The node's addresses as other peers see them, the likeliest to work from another machine first."""
    return likeliest_first([str(a) for a in dht.get_visible_maddrs()])


def publish_run_config(dht: hivemind.DHT, run: RunConfig, wait: bool = True):
    """Store the run config (the host does, and every trainer again, so the run outlives its host)."""
    return dht.store(f"{run.run_id}_config", run.encode(), expiration_time=get_dht_time() + CONFIG_TTL,
                     return_future=not wait)


def fetch_run_config(dht: hivemind.DHT, run_id: str, timeout: float = 30.0) -> RunConfig:
    """The run's config from the DHT; waits up to `timeout` for it to appear.

    Raises RecordError for a malformed or other-version config, TimeoutError if none is found.
    """
    check_run_id(run_id)
    deadline = time.monotonic() + timeout
    while True:
        found = dht.get(f"{run_id}_config", latest=True)
        if found is not None:
            return RunConfig.decode(found.value)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no config for run {run_id!r} in the DHT after {timeout:.0f}s: "
                               "is a host for this run up, and is --initial-peers right?")
        time.sleep(1.0)


def publish_progress(dht: hivemind.DHT, run_id: str, progress: PeerProgress) -> None:
    dht.store(f"{run_id}_progress", progress.encode(), expiration_time=get_dht_time() + PROGRESS_TTL,
              subkey=progress.peer_id, return_future=True)


def fetch_progress(dht: hivemind.DHT, run_id: str) -> list[PeerProgress]:
    """Every peer's latest progress record; malformed ones are logged and skipped."""
    return decode_progress(dht.get(f"{run_id}_progress", latest=True))


def request_progress(dht: hivemind.DHT, run_id: str):
    """`fetch_progress` without waiting: a future of the raw entry, for `decode_progress`."""
    return dht.get(f"{run_id}_progress", latest=True, return_future=True)


def decode_progress(found) -> list[PeerProgress]:
    if found is None or not isinstance(found.value, dict):
        return []
    peers = []
    for subkey, item in found.value.items():
        try:
            record = PeerProgress.decode(item.value)
            if record.peer_id != subkey:
                raise RecordError(f"peer_progress record: peer id {record.peer_id!r} stored under {subkey!r}")
            peers.append(record)
        except RecordError as e:
            log.warning("ignoring a progress record from %s: %s", subkey, e)
    return sorted(peers, key=lambda p: p.peer_id)
