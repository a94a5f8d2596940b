"""Can other machines open connections to this peer? A dial-back asked of a peer that can be reached.

Every peer that accepts connections (the host, and trainers not in client mode)
serves `PROTOCOL` from its DHT process: a peer sends the addresses it announces;
the server opens a plain TCP connection to each of them — only to those on the
IP address the request came from (the address it sees, so a peer behind NAT is
dialed on its public side), never to a third machine — and answers which ones
accepted. A libp2p dial would not do: it reuses the connection the request came
over, which always works.

A peer that nobody can reach trains in client mode: it sends its parts and
receives the means, but reduces no part and serves no state, and its DHT node
is a client (it asks, and is never asked).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from dataclasses import dataclass, field

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from .framing import read_message, write_message

log = logging.getLogger(__name__)

PROTOCOL = "/p2p-diloco/dial-back/1.0.0"
MAX_MESSAGE = 4096  # bytes of a request or an answer
MAX_DIALS = 8  # addresses one request may have dialed
CONNECT_TIMEOUT_S = 3.0


@dataclass
class Reachability:
    """The answer of one dial-back. `reachable` is None when no peer could check."""

    reachable: bool | None
    prober: str | None = None
    observed_ip: str | None = None
    accepted: list[str] = field(default_factory=list)  # "ip:port" that accepted a TCP connection
    refused: list[str] = field(default_factory=list)  # "ip:port" that did not, within CONNECT_TIMEOUT_S
    error: str | None = None

    def describe(self) -> str:
        if self.reachable is None:
            return f"could not check whether other machines can reach this peer ({self.error})"
        if self.reachable:
            return f"peer {self.prober} reached this peer at {', '.join(self.accepted)}"
        return (f"peer {self.prober} could not open a connection to this peer at {', '.join(self.refused) or '-'} "
                f"(it sees this peer's traffic come from {self.observed_ip})")


def _targets(observed: Multiaddr, maddrs: object) -> tuple[str, list[tuple[str, int]]]:
    """(the IP we see the request come from, the (ip, port) pairs on that IP to dial)."""
    ip = next((observed[p] for p in ("ip4", "ip6") if p in observed), None)
    if ip is None:
        raise ValueError(f"the request came over {observed}, not over an IP connection")
    if not isinstance(maddrs, list) or not all(isinstance(m, str) for m in maddrs):
        raise ValueError("a dial-back request is a list of multiaddr strings")
    ports, targets = [], []
    for text in maddrs[:64]:
        try:
            m = Multiaddr(text)
            port = int(m["tcp"])
            announced_ip = next((m[p] for p in ("ip4", "ip6") if p in m), None)
        except Exception:
            continue  # not a TCP address: nothing to dial
        ports.append(port)
        if announced_ip is not None and ipaddress.ip_address(announced_ip) == ipaddress.ip_address(ip):
            targets.append((ip, port))
    targets += [(ip, port) for port in ports]  # behind NAT: the public side, on the ports the peer listens on
    return ip, list(dict.fromkeys(targets))[:MAX_DIALS]


async def _connects(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def _handle(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await asyncio.wait_for(read_message(reader, MAX_MESSAGE, "dial-back"), CONNECT_TIMEOUT_S)
        ip, targets = _targets(info.addr, request.get("maddrs") if isinstance(request, dict) else None)
        results = await asyncio.gather(*(_connects(h, p) for h, p in targets))
        await write_message(writer, {"observed_ip": ip,
                                     "accepted": [f"{h}:{p}" for (h, p), ok in zip(targets, results) if ok],
                                     "refused": [f"{h}:{p}" for (h, p), ok in zip(targets, results) if not ok]})
    except Exception as e:  # a malformed request from a stranger: answer nothing
        log.debug("dial-back request from %s refused: %r", info.peer_id, e)
    finally:
        writer.close()


async def _serve(dht, node) -> None:
    await node.p2p.add_binary_stream_handler(PROTOCOL, _handle)


def serve(dht) -> None:
    """Answer dial-back requests from now on (in the DHT's process)."""
    dht.run_coroutine(_serve)


async def _ask(p2p, prober: str, maddrs: list[str], timeout: float) -> object:
    async def exchange() -> object:
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(prober), PROTOCOL)
        try:
            await write_message(writer, {"maddrs": maddrs})
            return await read_message(reader, MAX_MESSAGE, "dial-back")
        finally:
            writer.close()
    return await asyncio.wait_for(exchange(), timeout)


def _answer(prober: str, reply: object) -> Reachability:
    def strings(name: str) -> list[str]:
        value = reply.get(name) if isinstance(reply, dict) else None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"a dial-back answer without a list of strings {name!r}")
        return value
    accepted, refused = strings("accepted"), strings("refused")
    observed = reply.get("observed_ip")
    if not accepted and not refused:
        raise ValueError("a dial-back answer that dialed nothing")
    return Reachability(bool(accepted), prober, observed if isinstance(observed, str) else None, accepted, refused)


async def _probe(initial_peers: list[str], host_maddrs: list[str], announce_maddrs: list[str],
                 timeout: float) -> Reachability:
    try:
        p2p = await P2P.create(initial_peers=initial_peers, host_maddrs=host_maddrs,
                               announce_maddrs=announce_maddrs or None)
    except P2PDaemonError:
        # the daemon exits at once: let asyncio reap it while this loop runs, or it warns that the loop is closed
        await asyncio.sleep(0.2)
        raise
    try:
        maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
        errors = []
        for prober in dict.fromkeys(peer_ids_of(initial_peers)):
            try:
                return _answer(prober, await _ask(p2p, prober, maddrs, timeout))
            except Exception as e:
                errors.append(f"{prober}: {type(e).__name__}: {e}".rstrip(": "))
        return Reachability(None, error="; ".join(errors) or "no peer id in --initial-peers to ask")
    finally:
        await p2p.shutdown()


def check(initial_peers: list[str], host_maddrs: list[str], announce_maddrs: list[str],
          timeout: float = 2 * CONNECT_TIMEOUT_S + 4) -> Reachability:
    """Before this peer joins the DHT: listen where it will listen, ask each initial peer in turn to dial it back;
    the first answer counts. A libp2p daemon of its own, stopped before returning, so the DHT never learns of a
    node that might not be reachable."""
    try:
        return asyncio.run(_probe(initial_peers, host_maddrs, announce_maddrs, timeout))
    except P2PDaemonError as e:  # the bootstrap peers are down, or the daemon did not start: `start_dht` says which
        return Reachability(None, error=f"its libp2p daemon did not start: {daemon_reason(e)}")
    except Exception as e:
        return Reachability(None, error=f"{type(e).__name__}: {e}")


def daemon_reason(error: P2PDaemonError) -> str:
    """The reason in a libp2p daemon's start failure, without hivemind's prefix and the daemon's timestamp:
    "Daemon failed to start: 2026/11/23 18:14:09 failed to connect to bootstrap peers" -> the last four words."""
    return re.sub(r"^Daemon failed to start:\s*(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s*)?", "", str(error))


def peer_ids_of(maddrs: list[str]) -> list[str]:
    """The peer ids named by `/p2p/...` in multiaddrs (the peers to ask for a dial-back)."""
    ids = []
    for text in maddrs:
        try:
            ids.append(Multiaddr(text)["p2p"])
        except Exception:
            continue
    return ids
