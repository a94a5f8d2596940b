"""Our butterfly all-reduce inside a hivemind averager: one part per reducer, encoded by our codecs.

`ButterflyProtocol` replaces `DecentralizedAverager._aggregate_with_group`
(which would run hivemind's own all-reduce) for one round of one group:

* every member checks the gathered metadata (run, fragment, round, codec, size,
  weight); any mismatch fails the round for the whole group, naming the peer;
* the vector is cut into one part per non-client member (by the members'
  uplinks, measured or else declared, at codec block boundaries), and each part
  into chunks (CHUNK_TIME_S at the slowest uplink, at most CHUNK_BYTES) on the wire (whole codec blocks, so a chunk
  encodes on its own); each member streams its part's chunks to that part's
  reducer over `rpc_codec_part`, encoding ahead off the event loop; the reducer
  decodes each chunk off the event loop and, once every member's chunk k is in, sums them in fp32 in the
  group's order weighted by tokens, encodes chunk k's mean once and streams the
  same bytes back to every member, itself included, while later chunks still
  arrive: the two halves of the all-reduce overlap on the link (pipelining);
* a member writes the result only when every chunk of every part arrived and
  decoded: all or nothing. Any failure raises (the round fails here and the
  core keeps its anchor); a member that is gone fails the round at once
  (`_watch_members`), and one that gives up the round tells the reducers still
  waiting for its chunks (`_drop_out`);
* a stream is closed by the member, once it holds every mean: the daemon
  resets a stream whose one side closes while data is still in flight to the
  other (measured: ~1 round in 15 lost its last mean when reducers closed first).

Bytes sent and received are the payload bytes that crossed the wire.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import AsyncIterator

import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import anext, enter_asynchronously

from ..core.aggregation import AGGREGATIONS, WEIGHT_CAP, Aggregation, cap_weights
from ..core.codecs import Codec, CodecError, get_codec
from ..core.config import AUTO_CODEC
from ..core.parts import block_aligned_parts
from ..node import attacks
from ..node.admission import Admission
from ..node.failpoints import reached
from .audit import ReducerCaught, digest, split_mean
from .round_trips import peer_round_trip, round_trips

log = logging.getLogger(__name__)

# Chunk size: a part's first mean can go out only once every member's first chunk is in, and its last mean only
# after the last chunk: the pipeline fills and drains one chunk at the slowest member's share of its uplink (at
# 128 KB, 10 Mbit/s and three reducers: 0.3 s each way). So a chunk takes about CHUNK_TIME_S at the group's
# slowest known uplink, between MIN_CHUNK_BYTES and CHUNK_BYTES (measured, 4 MB with one 10 Mbit/s member among
# 100 Mbit/s ones, paced: 1.26x the LP-optimal time with 128 KB chunks, 1.11x with 32 KB)
CHUNK_BYTES = 1 << 17
MIN_CHUNK_BYTES = 1 << 14
CHUNK_TIME_S = 0.025
# parallel streams ("lanes") per member and reducer, chunk k on lane k mod lanes: the daemon multiplexes streams
# over one connection, each with its own flow-control window (WINDOW_BYTES when it opens), so one stream moves at
# most that per round trip (7 Mbit/s at a 300 ms ping). A member opens as many lanes to a reducer as fill the
# round trip the kernel measured to it at its share of the uplink (one on a LAN: lanes interleave the chunks, so
# the first means come later), DEFAULT_LANES when it does not know the round trip
WINDOW_BYTES = 256 * 1024
MAX_LANES = 8
DEFAULT_LANES = 4
ASSUMED_RATE = 12_500_000.0  # bytes/s (100 Mbit/s): an uplink nobody declared, for choosing lanes
# Deadlines follow from the links (README "Deadlines"): a chunk may take DEADLINE_FLOOR_S (connection set-up and a
# few round trips of up to ~1 s) plus DEADLINE_FACTOR times what the group's slowest uplink needs to move one chunk
# to, and one mean from, every other member; a member whose rate nobody knows counts as FLOOR_RATE.
FLOOR_RATE = 125_000.0  # bytes/s (1 Mbit/s)
DEADLINE_FLOOR_S = 5.0
DEADLINE_FACTOR = 4.0
# Pacing (README "Pacing and chunk size"): on a link full both ways at once, what must go against the flow
# waits behind a full send buffer or queue: the TCP acknowledgements and the daemon's stream window updates for
# what this peer receives share its uplink with what it sends (over one connection per pair of peers). A peer
# whose uplink is declared sends everything at PACE of it, so its queues stay short (measured on one 10 Mbit/s
# member and three 100 Mbit/s ones, 4-16 MB: 1.28-1.48x the LP-optimal round time unpaced, 1.09-1.14x paced)
PACE = 0.97
AUTO_CODECS = ("fp16", "int8", "fp4")  # `--codec auto` picks from these, the most precise first
AUTO_SHARE = 0.5  # ... so that a fragment's all-reduce takes at most this share of the time between its rounds
# a member that sends us a part of a group we are not in (we gave up matchmaking while the leader counted us
# in) gets BAD_GROUP_ID after this long, instead of hanging until the round timeout
GROUP_REGISTRATION_S = 3.0
MEMBER_CHECK_S = 0.5  # how often a round checks that its members are still connected
MEMBER_CONNECT_S = 5.0  # a member not connected to this peer this long after the round began is gone; one that
# opened no stream to this reducer by then is not in the round (the leader counted it in as it gave up matchmaking).
# A round's first chunk (or mean) may take this much longer than the chunk deadline: a member that never came is
# then told apart from a slow one (a chunk deadline of ~5.8 s raced this check, measured in CI)
_CLIENT_MODE = 1  # hivemind.averaging.averager.AveragingMode.CLIENT


@dataclass
class _Group:
    """One round's group as every member sees it, checked."""

    peers: list[PeerID]
    me: int  # this peer's index in `peers`
    weights: list[float]  # tokens behind each member's outer gradient, capped (`aggregation.cap_weights`)
    reducers: list[int]  # members that reduce a part (not in client mode)
    rates: list[float]  # each member's uplink in bytes/s as it published it (measured, else declared); 0: unknown
    intervals: list[float]  # each member's time between two rounds of this fragment (s); 0: unknown
    aggregation: str = "mean"  # the run's rule for combining contributions (`core.aggregation`)
    audit: float = 0.0  # the run's chance that a member audits each other reducer's part (`audit`)

    @property
    def total_weight(self) -> float:
        return float(sum(self.weights))

    @property
    def bandwidths(self) -> list[float]:
        """The reducers' uplinks for load balancing: an unknown one counts as the median of the known ones."""
        known = sorted(r for r in self.rates if r > 0)
        rates = [r or (known[len(known) // 2] if known else 1.0) for r in self.rates]
        return [rates[i] for i in self.reducers]

    @property
    def chunk_bytes(self) -> int:
        """About how many bytes each chunk of this round takes on the wire: CHUNK_TIME_S at the slowest known
        uplink, within [MIN_CHUNK_BYTES, CHUNK_BYTES]; CHUNK_BYTES when no rate is known."""
        known = [r for r in self.rates if r > 0]
        if not known:
            return CHUNK_BYTES
        return int(min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, min(known) * CHUNK_TIME_S)))

    @property
    def chunk_deadline(self) -> float:
        """Seconds the next chunk (or mean) of a stream may take before its sender counts as stalled."""
        return chunk_deadline(self.rates, len(self.peers))


def auto_codec(rates: list[float], intervals: list[float], numel: int) -> str:
    """`--codec auto`: the most precise of AUTO_CODECS whose all-reduce of `numel` values takes at most
    AUTO_SHARE of the shortest time between two rounds among the members, at the slowest member's uplink (it
    moves at most twice the payload: its contributions out and the means in, or its part's means out). fp4 when
    a member's rate or pace is unknown. Every member computes it from the same gathered metadata: one choice."""
    if not rates or min(rates) <= 0 or min(intervals) <= 0:
        return AUTO_CODECS[-1]
    for name in AUTO_CODECS:
        if 2 * get_codec(name).wire_size(numel) / min(rates) <= AUTO_SHARE * min(intervals):
            return name
    return AUTO_CODECS[-1]


def chunk_deadline(rates: list[float], members: int, chunk_bytes: int = CHUNK_BYTES) -> float:
    """DEADLINE_FLOOR_S + DEADLINE_FACTOR x the time the slowest member's uplink (unknown: FLOOR_RATE) takes to
    send one chunk to, and one mean to, each of the other members."""
    slowest = min((r if r > 0 else FLOOR_RATE) for r in rates)
    return DEADLINE_FLOOR_S + DEADLINE_FACTOR * 2 * (members - 1) * chunk_bytes / slowest


class UplinkPacer:
    """A token bucket over everything one round of this peer sends (every lane, parts and means): `wait(n)`
    returns when `n` more bytes may go at `rate` bytes/s; at once when the rate is 0 (unpaced)."""

    def __init__(self, rate: float):
        self.rate = rate
        self._next = 0.0  # event-loop time the next bytes may go

    async def wait(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = asyncio.get_event_loop().time()
        at = max(now, self._next)
        self._next = at + nbytes / self.rate
        if at > now:
            await asyncio.sleep(at - now)


def read_group(group_info: GroupInfo, me: PeerID, serializer, admission: Admission | None = None,
               banned: set[str] | None = None) -> _Group:
    """The group's gathered metadata, checked: every member on the same run, fragment, round, codec, size and
    aggregation rule, each with a positive finite weight (capped at `aggregation.WEIGHT_CAP` times the group's
    median) and, in a run with `admission`, a token that admits it; none of them `banned`. Raises
    AllreduceException naming the first peer that differs."""
    peers = list(group_info.peer_ids)
    try:
        _, modes, user = zip(*map(serializer.loads, group_info.gathered))
        meta = [serializer.loads(u) for u in user]
    except Exception as e:
        raise AllreduceException(f"malformed group metadata: {e}") from None
    index = peers.index(me)
    mine = meta[index]
    for peer, m in zip(peers, meta):
        if not isinstance(m, dict):
            raise AllreduceException(f"peer {peer} sent no round metadata")
        m.setdefault("aggregation", "mean")  # (a peer of an older version: the mean, no audits)
        m.setdefault("audit", 0.0)
        if banned is not None and str(peer) in banned:
            raise AllreduceException(f"peer {peer} is banned from this peer's groups (caught returning a wrong "
                                     "mean, or dropped for flooding this peer): refusing the group")
        for field in ("run", "fragment", "round", "codec", "numel", "aggregation", "audit"):
            if m.get(field) != mine.get(field):
                raise AllreduceException(f"group mismatch: peer {peer} has {field}={m.get(field)!r}, "
                                         f"this peer {mine.get(field)!r}; refusing to mix")
        if admission is not None and (problem := admission.problem(m.get("token"), str(peer))) is not None:
            raise AllreduceException(f"peer {peer} is not admitted to this run ({problem}): refusing the group")
        w = m.get("weight")
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise AllreduceException(f"peer {peer} declared weight {w!r}")
        for field in ("rate", "interval"):
            value = m.get(field, 0.0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0:
                raise AllreduceException(f"peer {peer} declared {field} {value!r}")
    if mine["aggregation"] not in AGGREGATIONS:
        raise AllreduceException(f"unknown aggregation {mine['aggregation']!r}")
    audit = mine["audit"]
    if isinstance(audit, bool) or not isinstance(audit, (int, float)) or not 0.0 <= audit <= 1.0:
        raise AllreduceException(f"audit {audit!r} is not a probability")
    reducers = [i for i, mode in enumerate(modes) if mode != _CLIENT_MODE]
    if not reducers:
        raise AllreduceException("no member can reduce (all in client mode)")
    declared = [float(m["weight"]) for m in meta]
    weights = cap_weights(declared)
    for peer, d, w in zip(peers, declared, weights):
        if w < d:  # (an honest peer far faster than the others' median is capped too: info, not an incident)
            log.info("peer %s declared weight %.6g; it counts as %.6g (%gx the group's median)", peer, d, w,
                     WEIGHT_CAP)
    return _Group(peers, index, weights, reducers, [float(m.get("rate", 0.0)) for m in meta],
                  [float(m.get("interval", 0.0)) for m in meta], mine["aggregation"], float(audit))


def chunk_spans(numel: int, codec: Codec, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """[0, numel) cut into the chunks a part travels in: each about `chunk_bytes` on the wire and a whole number of
    codec blocks (so a chunk encodes on its own and decodes to the same values as in one piece)."""
    per_value = max((c.wire_size(1 << 20) - c.wire_size(0)) / (1 << 20) for c in (codec, codec.mean_codec))  # (the
    # larger of a chunk and its mean: a sparse codec's mean holds more values)
    step = max(codec.block_size, int(chunk_bytes / per_value) // codec.block_size * codec.block_size)
    return [(a, min(a + step, numel)) for a in range(0, numel, step)] or [(0, 0)]


def lanes_for(chunks: int, round_trip: float | None, stream_rate: float) -> int:
    """Streams to carry `chunks` chunks at `stream_rate` bytes/s over a `round_trip` (s; None: unknown)."""
    wanted = DEFAULT_LANES if round_trip is None else math.ceil(round_trip * stream_rate / WINDOW_BYTES)
    return max(1, min(MAX_LANES, chunks, wanted))


async def _enumerated(items: AsyncIterator) -> AsyncIterator:
    i = 0
    async for item in items:
        yield i, item
        i += 1


async def _encoded_ahead(codec: Codec, x: torch.Tensor, chunks: list[tuple[int, int]], ahead: int = 2
                         ) -> AsyncIterator[bytes]:
    """The chunks of `x` encoded, in order, `ahead` of them encoding (off the event loop) while one is sent."""
    loop = asyncio.get_event_loop()
    todo = iter(chunks)
    encoding = deque(loop.run_in_executor(None, codec.encode, x[lo:hi]) for lo, hi in islice(todo, ahead))
    while encoding:
        payload = await encoding.popleft()
        for lo, hi in islice(todo, 1):
            encoding.append(loop.run_in_executor(None, codec.encode, x[lo:hi]))
        yield payload


class Reduction:
    """The reducer's side of one part of one round, chunk by chunk: every member's chunk k in, chunk k's encoded
    mean out as soon as every member's chunk k is in (so means flow back while later chunks still arrive).

    Deterministic: chunk k's mean is the members' decoded chunks combined by `aggregation` (`core.aggregation`:
    fp32, in the group's order; a contribution far larger than the others' is left out and its peer named in the
    log), encoded once; every member receives the same bytes."""

    def __init__(self, codec: Codec, numel: int, peers: list[PeerID], weights: list[float], me: PeerID,
                 deadline: float, pacer: UplinkPacer | None = None, chunk_bytes: int = CHUNK_BYTES,
                 aggregation: Aggregation | None = None, audited: bool = False):
        """`audited`: each mean goes out after a commitment to the members' chunks (`audit`)."""
        self.codec, self.numel, self.me, self.deadline = codec, numel, me, deadline
        self.audited = audited
        self.lying = (attack := attacks.armed()) is not None and attack.kind == "lie"  # (a test's attacker)
        self.aggregation = aggregation or Aggregation()
        self.refused: dict[PeerID, int] = {}  # member -> chunks of its contribution left out as outliers
        self.pacer = pacer or UplinkPacer(0.0)  # the means to other members go through it
        self.peers = peers
        self.weights = dict(zip(peers, weights))
        self.total_weight = float(sum(weights))
        self.chunks = chunk_spans(numel, codec, chunk_bytes)
        self._parts: list[dict[PeerID, torch.Tensor]] = [{} for _ in self.chunks]
        self._seen: set[tuple[PeerID, int]] = set()  # (member, chunk) already in
        self._digests: list[dict[PeerID, bytes]] = [{} for _ in self.chunks]  # (audited) sha256 of each chunk
        self.bytes_in = 0
        self.bytes_out = 0  # encoded means, once (every other member receives them)
        loop = asyncio.get_event_loop()
        self.means: list[asyncio.Future[bytes]] = [loop.create_future() for _ in self.chunks]
        self.failed: asyncio.Future[None] = loop.create_future()  # set (to an exception) once the part failed

    async def add(self, peer: PeerID, k: int, weight: float, payload: bytes) -> None:
        """Member `peer`'s chunk k; raises AllreduceException (and fails the part) when it is refused."""
        if self.failed.done():
            raise self.failed.exception()
        try:
            if peer not in self.weights or not 0 <= k < len(self.chunks) or (peer, k) in self._seen:
                raise AllreduceException(f"unexpected or repeated chunk {k} from {peer}")
            if weight != self.weights[peer]:
                raise AllreduceException(f"peer {peer} sent weight {weight}, declared {self.weights[peer]}")
            self._seen.add((peer, k))
            lo, hi = self.chunks[k]
            decoded = await asyncio.get_event_loop().run_in_executor(None, self.codec.decode, payload, hi - lo)
        except (CodecError, AllreduceException) as e:
            error = AllreduceException(f"refused part from {peer}: {e}")
            self.fail(error)
            raise error from None
        if peer != self.me:
            self.bytes_in += len(payload)
        parts = self._parts[k]
        parts[peer] = decoded
        if self.audited:
            self._digests[k][peer] = digest(payload)
        if len(parts) == len(self.peers) and not self.failed.done():
            self._parts[k] = {}
            mean = await asyncio.get_event_loop().run_in_executor(None, self._mean, [parts[p] for p in self.peers])
            if self.audited:
                mean = b"".join(self._digests[k][p] for p in self.peers) + mean
            self.bytes_out += len(mean)
            if not self.means[k].done():
                self.means[k].set_result(mean)

    def _mean(self, decoded: list[torch.Tensor]) -> bytes:
        mean, refused = self.aggregation.combine(decoded, [self.weights[p] for p in self.peers])
        for i in refused:
            peer = self.peers[i]
            if peer not in self.refused:
                log.warning("refusing the contribution of peer %s to this part: its size is more than %gx the "
                            "median of the group's (an outlier, or poisoned); the mean is of the others'",
                            peer, self.aggregation.refuse_factor)
            self.refused[peer] = self.refused.get(peer, 0) + 1
        return self.codec.mean_codec.encode(-mean if self.lying else mean)

    def drop(self, peer: PeerID) -> None:
        """Member `peer` gave up the round: the part fails when some of its chunks are still to come (a member
        of another group, or one whose chunks are all in, changes nothing)."""
        if peer in self.weights and any((peer, k) not in self._seen for k in range(len(self.chunks))):
            self.fail(AllreduceException(f"member {peer} dropped out of the round"))

    def fail(self, error: BaseException) -> None:
        if not self.failed.done():
            log.warning("reduction of this peer's part failed: %s", error)
            self.failed.set_exception(error)
            self.failed.exception()  # retrieved: a failure nobody awaits is not an asyncio warning
        for f in self.means:
            if not f.done():
                f.set_exception(error)
                f.exception()

    async def mean(self, k: int, timeout: float) -> bytes:
        return await asyncio.wait_for(asyncio.shield(self.means[k]), timeout)


class ButterflyProtocol:
    """The all-reduce half of `CodecAverager` (a mixin of a hivemind `DecentralizedAverager`)."""

    codec_name: str
    numel: int
    paced_uplink: float  # this peer's declared uplink (bytes/s): what it sends goes at PACE of it; 0: unpaced
    _streams_opened: dict  # member -> event-loop time of the latest stream it opened to this peer
    admitted = None  # `admitted.AdmittedPeers` in a run with a run key (set by `CodecAverager`)
    banned: set[str]  # peers this peer caught lying (set by `CodecAverager`)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, weight: float | None = None,
                                    **kwargs) -> dict:
        """One round with one group: send each part to its reducer, reduce ours, take every mean back."""
        began = time.time()
        loop = asyncio.get_event_loop()
        # a member's stream may come in before this peer registered the group (`rpc_codec_part` waits for it)
        streams_since = loop.time() - GROUP_REGISTRATION_S
        group = read_group(group_info, self.peer_id, self.serializer,
                           self.admitted.admission if self.admitted is not None else None, self.banned)
        codec = get_codec(auto_codec(group.rates, group.intervals, self.numel) if self.codec_name == AUTO_CODEC
                          else self.codec_name)
        counts = await loop.run_in_executor(  # hivemind's LP: elements per reducer by declared bandwidth
            None, load_balance_peers, self.numel, group.bandwidths, 0)
        parts = block_aligned_parts(self.numel, [c / max(sum(counts), 1) for c in counts], codec.block_size)
        owner_part = dict(zip(group.reducers, parts))
        pacer = UplinkPacer(PACE * self.paced_uplink)
        reduction = None
        if group.me in owner_part:
            lo, hi = owner_part[group.me]
            reduction = Reduction(codec, hi - lo, group.peers, group.weights, self.peer_id, group.chunk_deadline,
                                  pacer, group.chunk_bytes, Aggregation(group.aggregation), audited=group.audit > 0)
        self._running_groups[group_info.group_id].set_result(reduction)
        traffic = {"sent": 0, "received": 0}
        audit_stats = {}
        if group.audit > 0:
            self._trail(group_info.group_id, group.peers)
        try:
            if reached("dropping_out"):
                raise AllreduceException("failpoint dropping_out: this member gives up the round")
            if reached("silent"):  # (its drop-out notice, after this, comes too late to matter)
                await asyncio.sleep(3 * MEMBER_CONNECT_S)
                raise AllreduceException("failpoint silent: this member sent nothing")
            round_trips_ = await self._round_trips(group, owner_part)
            async with enter_asynchronously(self.get_tensors()) as tensors:
                exchange_began = time.time()  # (what came before: the load balancing, round trips, the lock)
                flat = tensors[0].view(-1)
                out = torch.empty_like(flat)
                work = asyncio.ensure_future(asyncio.gather(*(
                    self._exchange(group, group_info.group_id, codec, flat[lo:hi], out[lo:hi], owner, reduction,
                                   traffic, pacer, round_trips_.get(owner))
                    for owner, (lo, hi) in owner_part.items())))
                # a reducer hears from every member; a client-mode member only talks to the reducers (two clients
                # never connect to each other)
                partners = group.peers if reduction is not None else [group.peers[i] for i in owner_part]
                await self._until_done_or_member_gone(work, partners,
                                                      streams_since if reduction is not None else None)
                if reduction is not None:  # every other member sent us its part and takes our encoded mean
                    traffic["sent"] += reduction.bytes_out * (len(group.peers) - 1)
                    traffic["received"] += reduction.bytes_in
                if group.audit > 0:  # nobody applies the round before every member's audits passed
                    # the others may be auditing: a part's bytes from every member, at the slowest uplink
                    slowest = min((r if r > 0 else FLOOR_RATE) for r in group.rates)
                    audit_stats = await self._audit_round(
                        group, group_info.group_id, codec, owner_part,
                        lambda owner: chunk_spans(owner_part[owner][1] - owner_part[owner][0], codec,
                                                  group.chunk_bytes),
                        group.chunk_deadline + (codec.wire_size(self.numel)
                                                + codec.mean_codec.wire_size(self.numel)) / slowest)
                flat.copy_(out)  # all or nothing
        except BaseException as e:
            # whoever waits on this peer learns it at once, not at a chunk deadline: the members waiting for our
            # part's means, and the reducers still waiting for our chunks (a client-mode member reduces nothing:
            # without telling them, its failure is invisible until then)
            if reduction is not None:
                reduction.fail(AllreduceException(f"this reducer's round failed: {e!r}"))
            self._drop_out(group, group_info.group_id, owner_part)
            raise
        return {"peers": len(group.peers), "members": [str(p) for p in group.peers], "weight": group.total_weight,
                "began": began, "ended": time.time(),
                "setup_s": exchange_began - began, "codec": codec.name,
                # the members whose contributions to our part this reducer left out (chunks each)
                "refused": {str(p): n for p, n in reduction.refused.items()} if reduction is not None else {},
                **audit_stats, **traffic}

    async def _round_trips(self, group: _Group, owner_part: dict) -> dict[int, float]:
        """{reducer index: the kernel's RTT to it} for the reducers this peer is connected to and `ss` knows."""
        try:
            rtts = await asyncio.get_event_loop().run_in_executor(None, round_trips)
            addrs = {info.peer_id: info.addrs for info in await self._p2p.list_peers()}
        except Exception as e:  # unknown round trips only cost speed
            log.debug("round trips unknown: %r", e)
            return {}
        found = {i: peer_round_trip(addrs.get(group.peers[i], []), rtts) for i in owner_part if i != group.me}
        return {i: rtt for i, rtt in found.items() if rtt is not None}

    async def _exchange(self, group: _Group, group_id: bytes, codec: Codec, mine: torch.Tensor, out: torch.Tensor,
                        owner: int, reduction: Reduction | None, traffic: dict, pacer: UplinkPacer,
                        round_trip: float | None = None) -> None:
        """Our contribution to the part `owner` reduces goes out chunk by chunk (over `lanes_for` parallel
        streams); that part's mean comes back into `out` chunk by chunk, while later chunks are still on their way."""
        weight = group.weights[group.me]
        chunks = chunk_spans(mine.numel(), codec, group.chunk_bytes)
        trail = self._trail(group_id) if group.audit > 0 else None
        if owner == group.me:
            async def feed():
                k = 0
                async for payload in _encoded_ahead(codec, mine, chunks):
                    if trail is not None:
                        trail.sent[(owner, k)] = payload
                    await reduction.add(self.peer_id, k, weight, payload)
                    k += 1
            feeding = asyncio.ensure_future(feed())
            try:
                for k in range(len(chunks)):
                    mean = await reduction.mean(k, group.chunk_deadline + (MEMBER_CONNECT_S if k == 0 else 0.0))
                    if trail is not None:
                        mean = split_mean(mean, len(group.peers))[1]
                    await self._take_mean(codec, mean, out, chunks[k], group.peers[owner])
                await feeding
            finally:
                feeding.cancel()
            return
        share = max(group.rates[group.me], group.rates[owner]) or ASSUMED_RATE
        lanes = lanes_for(len(chunks), round_trip, share / max(1, len(group.peers) - 1))
        await asyncio.gather(*(self._lane(group, group_id, codec, mine, out, owner, chunks[lane::lanes],
                                          (lane, lanes), traffic, pacer) for lane in range(lanes)))

    async def _lane(self, group: _Group, group_id: bytes, codec: Codec, mine: torch.Tensor, out: torch.Tensor,
                    owner: int, chunks: list[tuple[int, int]], lane: tuple[int, int], traffic: dict,
                    pacer: UplinkPacer) -> None:
        """One stream to the reducer of part `owner`: the chunks of lane (i, n) out, their means back."""
        reducer, weight, timeout = group.peers[owner], group.weights[group.me], group.chunk_deadline
        stub = type(self).get_stub(self._p2p, reducer, namespace=self.prefix)
        trail = self._trail(group_id) if group.audit > 0 else None
        index = [lane[0] + i * lane[1] for i in range(len(chunks))]  # each chunk's index in the part

        async def requests():
            first = True
            async for i, payload in _enumerated(_encoded_ahead(codec, mine, chunks, ahead=1)):
                if trail is not None:
                    trail.sent[(owner, index[i])] = payload
                await pacer.wait(len(payload))
                traffic["sent"] += len(payload)
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.PART_FOR_AVERAGING, group_id=group_id if first else b"", weight=weight,
                    tensor_part=runtime_pb2.Tensor(buffer=payload, size=list(lane) if first else []))
                first = False
                reached("sending")
            # never end our side before we hold every mean: the reducer closes its side when ours ends, and a
            # stream closed while a mean is still in flight is reset (the daemon drops that mean). We close the
            # stream ourselves once every mean is in (that cancels this generator), without waiting a round trip
            # for the reducer's close
            await asyncio.Event().wait()

        stream = await stub.rpc_codec_part(requests())
        try:
            for k, span in enumerate(chunks):
                try:
                    msg = await asyncio.wait_for(anext(stream), timeout + (MEMBER_CONNECT_S if k == 0 else 0.0))
                except StopAsyncIteration:
                    raise AllreduceException(f"reducer {reducer} closed the stream after {k} of {len(chunks)} "
                                             f"chunks") from None
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"reducer {reducer} answered "
                                             f"{averaging_pb2.MessageCode.Name(msg.code)}")
                traffic["received"] += len(msg.tensor_part.buffer)
                mean = msg.tensor_part.buffer
                if trail is not None:  # our own entry of its commitment first; the rest for an audit
                    commitment, mean = split_mean(mean, len(group.peers))
                    trail.check_commitment(owner, index[k], commitment, group.me, reducer)
                    trail.received[(owner, index[k])] = (commitment, mean)
                await self._take_mean(codec, mean, out, span, reducer)
        finally:
            await stream.aclose()

    @staticmethod
    async def _take_mean(codec: Codec, mean: bytes, out: torch.Tensor, span: tuple[int, int], reducer) -> None:
        lo, hi = span
        try:
            out[lo:hi] = await asyncio.get_event_loop().run_in_executor(None, codec.mean_codec.decode, mean, hi - lo)
        except CodecError as e:
            raise AllreduceException(f"mean from {reducer} refused: {e}") from None

    async def _until_done_or_member_gone(self, work: asyncio.Future, partners: list[PeerID],
                                         streams_since: float | None = None) -> None:
        """Wait for every exchange; fail the round as soon as one fails or a partner is gone (or, for a reducer,
        `streams_since` given: never opened a stream to this peer)."""
        watch = asyncio.ensure_future(self._watch_members(partners, streams_since))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                work.cancel()
                watch.result()  # raises: a member died
            await work
        except ReducerCaught:  # (as it is: the trainer bans that reducer)
            raise
        except BaseException as e:
            raise AllreduceException(f"round failed: {e!r}") from e
        finally:
            watch.cancel()
            work.cancel()  # (a no-op once it is done)

    def _drop_out(self, group: _Group, group_id: bytes, owner_part: dict) -> None:
        """This member's round failed: tell every other reducer (in the background; the round fails now), so
        that one still waiting for our chunks fails its part at once instead of at its chunk deadline."""
        reducers = [group.peers[i] for i in owner_part if i != group.me]
        if reducers:
            notices = asyncio.ensure_future(asyncio.gather(*(self._tell_dropped_out(r, group_id) for r in reducers)))
            self._drop_out_notices = getattr(self, "_drop_out_notices", set())
            self._drop_out_notices.add(notices)  # (referenced until done: a pending task may be collected)
            notices.add_done_callback(self._drop_out_notices.discard)

    async def _tell_dropped_out(self, reducer: PeerID, group_id: bytes) -> None:
        stub = type(self).get_stub(self._p2p, reducer, namespace=self.prefix)
        answered = asyncio.Event()

        async def notice():
            yield averaging_pb2.AveragingData(code=averaging_pb2.CANCELLED, group_id=group_id)
            await answered.wait()  # (ending our side first could reset the stream before the notice is read)

        try:
            stream = await asyncio.wait_for(stub.rpc_codec_part(notice()), DEADLINE_FLOOR_S)
            try:
                await asyncio.wait_for(anext(stream), DEADLINE_FLOOR_S)
            finally:
                answered.set()
                await stream.aclose()
        except Exception as e:  # (it may be gone too): its chunk deadline remains
            log.debug("could not tell %s that this member dropped out: %r", reducer, e)

    async def _watch_members(self, peers: list[PeerID], streams_since: float | None = None) -> None:
        """Raise once a member of the round that this peer exchanges parts with is gone: connected to this peer
        and then no longer, or never connected within MEMBER_CONNECT_S (every member opens a stream to every
        reducer as the round starts). A reducer (`streams_since` given) also fails the round when a member has
        opened no stream to it since then, MEMBER_CONNECT_S into the round: a member that the leader counted in
        as it gave up matchmaking is connected (the DHT, other rounds) but never sends its part.

        A SIGKILLed member's connection closes at once, but a part it never sent, or
        an answer it never gave, would otherwise be waited for until the chunk deadline. So would a member this
        peer drops mid-round (`inbound`: it floods this peer), whose streams are closed unread from then on.
        """
        others, seen = set(peers) - {self.peer_id}, set()
        loop = asyncio.get_event_loop()
        start = loop.time()
        while True:
            connected = {info.peer_id for info in await self._p2p.list_peers()}
            seen |= others & connected
            gone = seen - connected
            late = loop.time() - start > MEMBER_CONNECT_S
            if not gone and late:
                gone = others - seen
            if gone:
                raise AllreduceException(f"member {sorted(map(str, gone))[0]} is gone (not connected)")
            shunned = sorted(str(p) for p in others if str(p) in self.banned)
            if shunned:  # (dropped for flooding this peer mid-round: nothing more from it is read)
                raise AllreduceException(f"member {shunned[0]} is banned or dropped by this peer: the round "
                                         "cannot complete")
            if late and streams_since is not None:
                silent = [p for p in others if self._streams_opened.get(p, -math.inf) < streams_since]
                if silent:
                    raise AllreduceException(f"member {sorted(map(str, silent))[0]} sent nothing to this reducer "
                                             f"in {MEMBER_CONNECT_S:.0f}s: not in the round")
            await asyncio.sleep(MEMBER_CHECK_S)

    async def rpc_codec_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A group member sends us its encoded part chunk by chunk; we answer with each chunk's encoded mean as
        soon as every member's chunk is in."""
        self._streams_opened[context.remote_id] = asyncio.get_event_loop().time()
        first = await anext(stream)
        if first.group_id not in self._running_groups:  # the group may be registering right now; or never will
            try:
                await asyncio.wait_for(self._pending_groups_registered.wait(), GROUP_REGISTRATION_S)
            except asyncio.TimeoutError:
                pass
        future = self._running_groups.get(first.group_id)
        if future is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        try:
            # shielded: this handler cancelled (its member gave up) must not cancel the group for everyone
            reduction: Reduction | None = await asyncio.shield(future)
        except BaseException as e:  # this peer's side of the group failed before it could reduce
            log.debug("group %s failed before reducing: %r", first.group_id.hex(), e)
            yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
            return
        if first.code == averaging_pb2.CANCELLED:  # a member gave up the round (`_drop_out`)
            if reduction is not None:
                reduction.drop(context.remote_id)
            yield averaging_pb2.AveragingData(code=averaging_pb2.CANCELLED)
            return
        if reduction is None or first.code != averaging_pb2.PART_FOR_AVERAGING:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        lane = tuple(first.tensor_part.size)
        if len(lane) != 2 or not 0 <= lane[0] < lane[1] <= min(MAX_LANES, len(reduction.chunks)):
            reduction.fail(AllreduceException(f"{context.remote_id} sent on lane {lane}: not a lane of "
                                              f"at most {min(MAX_LANES, len(reduction.chunks))}"))
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        indices = range(lane[0], len(reduction.chunks), lane[1])
        reading = asyncio.ensure_future(self._read_chunks(first, stream, reduction, context.remote_id, indices))
        try:
            for k in indices:
                grace = MEMBER_CONNECT_S if k == indices[0] else 0.0  # (the first mean: see MEMBER_CONNECT_S)
                try:
                    mean = await reduction.mean(k, reduction.deadline + grace)
                except Exception:
                    yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
                    return
                await reduction.pacer.wait(len(mean))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                                  tensor_part=runtime_pb2.Tensor(buffer=mean))
            # keep our side open until the member closes the stream (it holds every mean then): closing first
            # could reset the stream with the last mean still in flight
            await asyncio.wait_for(reading, reduction.deadline)
        except asyncio.TimeoutError:
            log.debug("member %s did not end its stream after the last mean", context.remote_id)
        finally:
            reading.cancel()

    async def _read_chunks(self, first: averaging_pb2.AveragingData, stream, reduction: Reduction, peer,
                           indices: range) -> None:
        """The chunks `indices` of one member's part into the reduction; a refused, oversized or late chunk fails
        the part (for every member: they wait on its means)."""
        try:
            msg = first
            for i, k in enumerate(indices):
                if i:
                    msg = await asyncio.wait_for(anext(stream), reduction.deadline)
                lo, hi = reduction.chunks[k]
                if len(msg.tensor_part.buffer) > reduction.codec.wire_size(hi - lo):
                    raise AllreduceException(f"chunk {k} from {peer} is larger than its {hi - lo} values take")
                await reduction.add(peer, k, msg.weight, msg.tensor_part.buffer)
                reached("reducing")
        except Exception as e:
            reduction.fail(AllreduceException(f"part from {peer}: {e!r}"))
            return
        async for _ in stream:  # the member closes the stream once it holds every mean
            log.debug("member %s sent more chunks than its part has; ignored", peer)

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's own all-reduce is refused: our peers only speak rpc_codec_part."""
        yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
