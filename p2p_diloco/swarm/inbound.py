"""Limits on what other peers can make this peer read and run (issue 10, item 5).

hivemind reads a stream message whole before any handler of ours sees it: an 8-byte header declares its length
and `P2P.receive_raw_data` reads that many bytes, whatever they are (2**64 included), into memory. Any peer that
reaches this one could so make it buffer gigabytes, open streams without end, or fire requests faster than it
can answer them. `install` puts limits into hivemind's P2P class in this process (and the processes it forks
afterwards: the DHT's, the averagers'):

* **Size.** A stream message may declare at most MAX_MESSAGE_BYTES (our largest is an all-reduce chunk of at most
  128 KB with its commitments, or a 64 KB state chunk); a longer one is refused from its header, before any of it
  is read, and its sender is dropped (no honest peer sends one). Unary requests (the DHT's) come through the
  libp2p daemon, which refuses those over 4 MiB itself (measured: a 5 MiB request never reaches Python).
* **Streams.** Each remote peer may have at most STREAMS_PER_PEER inbound streams open at once and open new ones
  at STREAM_RATE a second (a burst of STREAM_BURST); all peers together at most STREAMS_TOTAL. A stream over a
  limit is closed unread.
* **Requests.** Each remote peer may send unary requests at REQUEST_RATE a second (a burst of REQUEST_BURST) with
  at most REQUESTS_IN_FLIGHT unanswered; one over a limit is answered with an error, unrun.
* **One DHT node per peer.** hivemind's DHT takes the node id a request claims at its word, and a request under a
  new node id makes the receiving node update its routing table, pinging older nodes to see if they live: a peer
  that claims a fresh node id in every ping has its victim send out several requests for each (measured: two
  honest peers sent a flooder's DHT node over 500 requests a second). A peer may use at most NODE_IDS_PER_PEER
  node ids (those unseen for NODE_ID_TTL_S are forgotten: a peer that restarts gets a new one); a request under
  one more is refused.
* **Throttled, then dropped.** A peer refused DROP_AFTER times within DROP_WINDOW_S (or sending one oversized
  message) is dropped: nothing from it is read or run for DROP_S seconds; logged once with its peer id.

So a flooding peer costs this one at most STREAMS_PER_PEER streams of (hivemind's prefetch + 1) messages of
MAX_MESSAGE_BYTES each before it is dropped, and nothing it sends changes agreed state (the handlers check
everything they are sent: `butterfly`, `audit`, `admitted`). The limits are per process; each fragment's
averager has its own.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.control import ControlClient
from hivemind.proto import dht_pb2

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
STREAMS_PER_PEER = 32  # an averager's member opens at most MAX_LANES (8) all-reduce streams to a reducer at once
STREAMS_TOTAL = 512
# rates far above what honest peers send (measured: two averagers that average back to back, 15 rounds a second,
# sent one DHT node over 50 requests a second; a run's rounds are seconds apart): the limits are for floods
STREAM_RATE, STREAM_BURST = 200.0, 1000
REQUEST_RATE, REQUEST_BURST = 500.0, 2000
REQUESTS_IN_FLIGHT = 256
NODE_IDS_PER_PEER, NODE_ID_TTL_S = 4, 600.0
DROP_AFTER, DROP_WINDOW_S, DROP_S = 100, 10.0, 600.0
# the DHT's requests, each with the node id its sender claims (`NodeInfo peer`)
DHT_REQUESTS = {"DHTProtocol.rpc_ping": dht_pb2.PingRequest, "DHTProtocol.rpc_store": dht_pb2.StoreRequest,
                "DHTProtocol.rpc_find": dht_pb2.FindRequest}

_REMOTE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # an inbound stream's reader -> its peer


class InboundRefused(Exception):
    """A stream or request over this peer's limits (what the remote peer is told, where hivemind tells it)."""


class OversizedMessage(InboundRefused):
    pass


@dataclass
class _Bucket:
    rate: float
    burst: float
    level: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        self.level = self.burst if self.level < 0 else min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True


@dataclass
class _Peer:
    streams: _Bucket
    requests: _Bucket
    open_streams: int = 0
    in_flight: int = 0
    refusals: list[float] = field(default_factory=list)
    node_ids: dict[bytes, float] = field(default_factory=dict)  # DHT node id -> last seen (clock)
    throttled_logged: bool = False


class Inbound:
    """This process's account of what each remote peer sends it (see the module's docstring)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.peers: dict[str, _Peer] = {}
        self.dropped: dict[str, float] = {}  # peer -> until (clock)
        self.open_streams = 0
        self.refused = 0  # streams and requests refused, all peers
        self.oversized = 0

    def _peer(self, peer: str) -> _Peer:
        if peer not in self.peers:
            if len(self.peers) >= 4 * STREAMS_TOTAL:  # forget the idle ones (their buckets refill anyway)
                self.peers = {p: s for p, s in self.peers.items() if s.open_streams or s.in_flight}
            self.peers[peer] = _Peer(_Bucket(STREAM_RATE, STREAM_BURST), _Bucket(REQUEST_RATE, REQUEST_BURST))
        return self.peers[peer]

    def is_dropped(self, peer: str) -> bool:
        until = self.dropped.get(peer)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self.dropped[peer]
        return False

    def drop(self, peer: str, why: str) -> None:
        if not self.is_dropped(peer):
            log.warning("dropping peer %s for %.0f s: %s; nothing from it is read until then", peer, DROP_S, why)
        self.dropped[peer] = self.clock() + DROP_S

    def _refuse(self, peer: str, what: str) -> str:
        self.refused += 1
        state = self._peer(peer)
        now = self.clock()
        state.refusals = [t for t in state.refusals if t > now - DROP_WINDOW_S] + [now]
        if not state.throttled_logged:
            state.throttled_logged = True
            log.warning("throttling peer %s: %s (logged once per peer)", peer, what)
        if len(state.refusals) >= DROP_AFTER:
            self.drop(peer, f"{len(state.refusals)} streams or requests over the limits in {DROP_WINDOW_S:.0f} s")
        return what

    def open_stream(self, peer: str) -> str | None:
        """Why a new inbound stream from `peer` is refused; None: it is let in (call `close_stream` after)."""
        if self.is_dropped(peer):
            self.refused += 1
            return "dropped"
        state = self._peer(peer)
        if state.open_streams >= STREAMS_PER_PEER:
            return self._refuse(peer, f"more than {STREAMS_PER_PEER} streams open at once")
        if self.open_streams >= STREAMS_TOTAL:
            return self._refuse(peer, f"this peer has {STREAMS_TOTAL} inbound streams open")
        if not state.streams.take(self.clock()):
            return self._refuse(peer, f"streams opened faster than {STREAM_RATE:.0f}/s")
        state.open_streams += 1
        self.open_streams += 1
        return None

    def close_stream(self, peer: str) -> None:
        state = self.peers.get(peer)
        if state is not None and state.open_streams > 0:
            state.open_streams -= 1
            self.open_streams -= 1

    def start_request(self, peer: str, node_id: bytes = b"") -> str | None:
        """Why a unary request from `peer` (a DHT request: under `node_id`) is refused; None: it runs (call
        `end_request` after)."""
        if self.is_dropped(peer):
            self.refused += 1
            return "dropped"
        state = self._peer(peer)
        if node_id:
            now = self.clock()
            state.node_ids = {n: t for n, t in state.node_ids.items() if t > now - NODE_ID_TTL_S}
            if node_id not in state.node_ids and len(state.node_ids) >= NODE_IDS_PER_PEER:
                return self._refuse(peer, f"requests under more than {NODE_IDS_PER_PEER} DHT node ids")
            state.node_ids[node_id] = now
        if state.in_flight >= REQUESTS_IN_FLIGHT:
            return self._refuse(peer, f"more than {REQUESTS_IN_FLIGHT} requests unanswered")
        if not state.requests.take(self.clock()):
            return self._refuse(peer, f"requests faster than {REQUEST_RATE:.0f}/s")
        state.in_flight += 1
        return None

    def end_request(self, peer: str) -> None:
        state = self.peers.get(peer)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def check_length(self, length: int, peer: str | None) -> None:
        """A stream message's declared length, before it is read: OversizedMessage (and its sender `peer`, when
        it is an inbound stream's, dropped) when over MAX_MESSAGE_BYTES."""
        if length <= MAX_MESSAGE_BYTES:
            return
        self.oversized += 1
        why = f"a message declaring {length} bytes (at most {MAX_MESSAGE_BYTES} are read)"
        if peer is not None:
            self.drop(peer, why)
        raise OversizedMessage(f"refused {why}" + (f" from peer {peer}" if peer else ""))


def dht_node_id(proto: str, request: bytes) -> bytes:
    """The node id a DHT request claims; b"" for another request, or one that does not parse (its handler
    refuses it)."""
    kind = DHT_REQUESTS.get(proto)
    if kind is None:
        return b""
    try:
        return kind.FromString(request).peer.node_id
    except Exception:
        return b""


INBOUND = Inbound()  # this process's (a forked process starts from a copy of its parent's)
_original: dict[str, object] = {}


def installed() -> bool:
    return bool(_original)


def install() -> None:
    """Put the limits into hivemind's P2P class (idempotent). Call before a DHT or an averager starts: the
    processes they fork inherit the class as it is then."""
    if _original:
        return
    _original.update(receive_raw_data=P2P.__dict__["receive_raw_data"],
                     add_binary_stream_handler=P2P.add_binary_stream_handler,
                     add_unary_handler=ControlClient.add_unary_handler)

    async def receive_raw_data(reader):
        header = await reader.readexactly(P2P.HEADER_LEN)
        length = int.from_bytes(header, P2P.BYTEORDER)
        INBOUND.check_length(length, _REMOTE.get(reader))
        return await reader.readexactly(length)

    async def add_binary_stream_handler(self, name, handler, balanced: bool = False):
        async def limited(stream_info, reader, writer):
            peer = stream_info.peer_id.to_base58()
            if INBOUND.open_stream(peer) is not None:
                writer.close()
                return
            _REMOTE[reader] = peer
            try:
                await handler(stream_info, reader, writer)
            finally:
                INBOUND.close_stream(peer)
        return await _original["add_binary_stream_handler"](self, name, limited, balanced)

    async def add_unary_handler(self, proto, handler, balanced: bool = False):
        async def limited(request: bytes, remote_id):
            peer = remote_id.to_base58()
            problem = INBOUND.start_request(peer, dht_node_id(proto, request))
            if problem is not None:
                raise InboundRefused(problem)
            try:
                return await handler(request, remote_id)
            finally:
                INBOUND.end_request(peer)
        return await _original["add_unary_handler"](self, proto, limited, balanced)

    P2P.receive_raw_data = staticmethod(receive_raw_data)
    P2P.add_binary_stream_handler = add_binary_stream_handler
    ControlClient.add_unary_handler = add_unary_handler


def uninstall() -> None:
    """hivemind's P2P as it was (tests: a victim without limits)."""
    if not _original:
        return
    P2P.receive_raw_data = _original["receive_raw_data"]
    P2P.add_binary_stream_handler = _original["add_binary_stream_handler"]
    ControlClient.add_unary_handler = _original["add_unary_handler"]
    _original.clear()
