"""Round-trip times to the other peers, as the kernel measures them on this machine's TCP connections.

libp2p's daemon owns our sockets, but Linux keeps a smoothed RTT for every TCP
connection and `ss -tin` (iproute2) reads it for any of them. `round_trips()`
returns the largest RTT per remote IP address; `peer_round_trip` maps a peer's
connection addresses (from the daemon's peer list) onto that. Nothing here sends
a packet. Where `ss` is missing or says nothing (not Linux, no connection yet),
the RTT is unknown (None) and callers assume a default.
"""

from __future__ import annotations

import re
import shutil
import subprocess

_ROW = re.compile(r"^\d+\s+\d+\s+\S+\s+(\S+)")  # Recv-Q Send-Q Local Peer (no State column with `state`)
_RTT = re.compile(r"\brtt:([0-9.]+)/")
SS_TIMEOUT_S = 2.0


def round_trips() -> dict[str, float]:
    """{remote IP: the largest smoothed RTT in seconds over this namespace's established TCP connections to it}."""
    if shutil.which("ss") is None:
        return {}
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True, text=True,
                             timeout=SS_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_ss(out)


def parse_ss(text: str) -> dict[str, float]:
    """`ss -tinH state established` output -> {remote IP: largest RTT in seconds}."""
    found: dict[str, float] = {}
    remote = None
    for line in text.splitlines():
        row = _ROW.match(line)
        if row:
            remote = _host(row.group(1))
            continue
        rtt = _RTT.search(line)
        if rtt and remote:
            found[remote] = max(found.get(remote, 0.0), float(rtt.group(1)) / 1000)
            remote = None
    return found


def _host(address: str) -> str:
    """'10.0.0.2:4001' -> '10.0.0.2'; '[fe80::1]:4001' -> 'fe80::1'; IPv4-mapped IPv6 -> the IPv4."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.removeprefix("::ffff:")


def peer_round_trip(maddrs, rtts: dict[str, float]) -> float | None:
    """The RTT to a peer connected at `maddrs` (multiaddrs: /ip4/.../tcp/...), or None when unknown."""
    for maddr in maddrs:
        parts = str(maddr).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] in rtts:
            return rtts[parts[2]]
    return None
