"""The core's `FragmentAverager` over hivemind: its DHT and matchmaking, our codecs and our butterfly.

Why not hivemind's own all-reduce (SPEC.md §3, measured): its tensors travel
through a closed protobuf enum, so our codecs cannot; a failed sender or reducer
is dropped silently and `step()` still "succeeds"; and it adds each peer's delta
to its own unquantized tensor, so peers end with different values. We keep
hivemind's matchmaking (one `DecentralizedAverager` per fragment, group bits =
the round, so a group only ever holds one run, fragment and round) and replace
`_aggregate_with_group`:

* every member checks the gathered metadata (run, fragment, round, codec, size,
  weight); any mismatch fails the round for the whole group, naming the peer;
* the vector is cut into one part per non-client member (by declared bandwidth,
  at codec block boundaries); each member sends its encoded part to that part's
  reducer over `rpc_codec_part`; the reducer decodes and validates each
  contribution, accumulates in fp32 weighted by tokens, encodes the mean once
  and streams the same bytes back to every member, itself included;
* a member writes the result only when every part arrived and decoded:
  all or nothing. Any failure raises, so `step()` fails and the core keeps its
  anchor.

Bytes sent and received are the payload bytes that crossed the wire.

A peer whose round failed while others applied it catches up: every peer that
applies a round publishes the round's state hash (sha256 of anchor and momentum)
in the DHT and keeps a copy of that state to serve; the peer that missed it picks
the majority hash, downloads the state from a peer holding it over
`rpc_fragment_state`, checks the hash, and adopts it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections import Counter
from typing import AsyncIterator

import msgpack

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, anext, enter_asynchronously
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming

from ..core.averaging import (AgreedState, AveragingFailed, FragmentAverage, FragmentAverager, PendingAverage,
                              RoundKey, RoundReport)
from ..core.codecs import Codec, CodecError, get_codec
from ..core.parts import block_aligned_parts
from ..core.state_hash import state_hash
from ..node.failpoints import reached
from .lifetime import die_with_parent

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 19
# a member that sends us a part of a group we are not in (we gave up matchmaking while the leader counted us
# in) gets BAD_GROUP_ID after this long, instead of hanging until the round timeout
GROUP_REGISTRATION_S = 3.0
MEMBER_CHECK_S = 0.5  # how often a round checks that its members are still connected
MEMBER_CONNECT_S = 5.0  # a member not connected to this peer this long after the round began is gone
_CLIENT_MODE = 1  # hivemind.averaging.averager.AveragingMode.CLIENT


class _Reduction:
    """The reducer's side of one part of one round: every member's payload in, one encoded mean out."""

    def __init__(self, codec: Codec, numel: int, peers: list[PeerID], weights: list[float], me: PeerID):
        self.codec, self.numel, self.me = codec, numel, me
        self.peers = peers
        self.weights = dict(zip(peers, weights))
        self.total_weight = float(sum(weights))
        self.parts: dict[PeerID, torch.Tensor] = {}
        self.bytes_in = 0
        self.result: asyncio.Future[bytes] = asyncio.get_event_loop().create_future()

    def add(self, peer: PeerID, weight: float, payload: bytes) -> None:
        if self.result.done():
            return
        try:
            if peer not in self.weights or peer in self.parts:
                raise AllreduceException(f"unexpected or duplicate part from {peer}")
            if weight != self.weights[peer]:
                raise AllreduceException(f"peer {peer} sent weight {weight}, declared {self.weights[peer]}")
            self.parts[peer] = self.codec.decode(payload, self.numel)
            if peer != self.me:
                self.bytes_in += len(payload)
        except (CodecError, AllreduceException) as e:
            self.fail(AllreduceException(f"refused part from {peer}: {e}"))
            return
        if len(self.parts) == len(self.peers):
            acc = torch.zeros(self.numel, dtype=torch.float32)
            for p in self.peers:  # a fixed order: the group order
                acc += self.parts[p] * (self.weights[p] / self.total_weight)
            self.parts.clear()
            self.result.set_result(self.codec.encode(acc))

    def fail(self, error: BaseException) -> None:
        if not self.result.done():
            self.result.set_exception(error)


class CodecAverager(DecentralizedAverager):
    """One fragment's averager process. Every peer of a run must use this class (RPC names embed it)."""

    _rpc_handlers = None  # hivemind collects rpc_* per class; a subclass must not inherit the parent's list

    def __init__(self, numel: int, codec_name: str, **kwargs):
        self.codec_name = codec_name
        self.numel = numel
        super().__init__([torch.zeros(numel, dtype=torch.float32)], **kwargs)

    def run(self):
        die_with_parent()
        super().run()

    # -- serving and fetching a round's agreed state (runs as hivemind's get_current_state) ---------
    served: tuple[dict, list[torch.Tensor]] | None = None  # set in the peer's main process

    def get_current_state(self):
        """Called in the peer's main process when another peer downloads this fragment's state."""
        served = self.served
        if served is None:
            return {"none": True}, []
        return served

    async def _download_from(self, peer: str, timeout: float, future) -> None:
        """Averager process: fetch (metadata, anchor bytes, momentum bytes) from one chosen peer."""
        try:
            stub = type(self).get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, tensors, current = None, [], []

            def take() -> None:  # one tensor's chunks are all in `current`: check their count, decode
                if len(current) != max(current[0].chunks, 1):
                    raise ConnectionError(f"the donor's stream ended after {len(current)} of "
                                          f"{current[0].chunks} chunks of a tensor")
                tensors.append(deserialize_torch_tensor(combine_from_streaming(current)))
                current.clear()

            async for msg in aiter_with_timeout(stream, timeout=timeout):
                if msg.metadata:
                    metadata = msg.metadata
                if msg.tensor_part.dtype and current:  # a dtype marks the first chunk of the next tensor
                    take()
                current.append(msg.tensor_part)
            if current:
                take()
            future.set_result((metadata, tensors))  # tensors, not protobufs: they cross a process boundary
        except BaseException as e:
            if not future.done():
                future.set_exception(e)

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, weight: float | None = None,
                                    **kwargs) -> dict:
        codec = get_codec(self.codec_name)
        peers = list(group_info.peer_ids)
        me = peers.index(self.peer_id)
        try:
            bandwidths, modes, user = zip(*map(self.serializer.loads, group_info.gathered))
            meta = [self.serializer.loads(u) for u in user]
        except Exception as e:
            raise AllreduceException(f"malformed group metadata: {e}") from None
        mine = meta[me]
        for peer, m in zip(peers, meta):
            if not isinstance(m, dict):
                raise AllreduceException(f"peer {peer} sent no round metadata")
            for field in ("run", "fragment", "round", "codec", "numel"):
                if m.get(field) != mine.get(field):
                    raise AllreduceException(f"group mismatch: peer {peer} has {field}={m.get(field)!r}, "
                                             f"this peer {mine.get(field)!r}; refusing to mix")
            w = m.get("weight")
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise AllreduceException(f"peer {peer} declared weight {w!r}")
        total_weight = float(sum(m["weight"] for m in meta))
        reducers = [i for i, mode in enumerate(modes) if mode != _CLIENT_MODE]
        if not reducers:
            raise AllreduceException("no member can reduce (all in client mode)")
        loop = asyncio.get_event_loop()
        counts = await loop.run_in_executor(  # hivemind's LP: elements per reducer by declared bandwidth
            None, load_balance_peers, self.numel, [float(bandwidths[i] or 0) or 1.0 for i in reducers], 0)
        parts = block_aligned_parts(self.numel, [c / max(sum(counts), 1) for c in counts], codec.block_size)
        owner_part = {reducers[j]: parts[j] for j in range(len(reducers))}
        timeout = self._allreduce_timeout
        sent = received = 0

        reduction = None
        if me in owner_part:
            lo, hi = owner_part[me]
            reduction = _Reduction(codec, hi - lo, peers, [float(m["weight"]) for m in meta], self.peer_id)
        self._running_groups[group_info.group_id].set_result(reduction)

        async with enter_asynchronously(self.get_tensors()) as tensors:
            flat = tensors[0].view(-1)
            out = torch.empty_like(flat)

            async def exchange(owner: int) -> None:
                nonlocal sent, received
                lo, hi = owner_part[owner]
                payload = await loop.run_in_executor(None, codec.encode, flat[lo:hi])
                if owner == me:
                    reduction.add(self.peer_id, float(mine["weight"]), payload)
                    mean = await asyncio.wait_for(asyncio.shield(reduction.result), timeout)
                else:
                    stub = type(self).get_stub(self._p2p, peers[owner], namespace=self.prefix)
                    sent += len(payload)
                    chunks = self._chunks(group_info.group_id, float(mine["weight"]), payload)
                    stream = await stub.rpc_codec_part(chunks)
                    pieces = []
                    async for msg in aiter_with_timeout(stream, timeout):
                        if msg.code != averaging_pb2.AVERAGED_PART:
                            raise AllreduceException(f"reducer {peers[owner]} answered "
                                                     f"{averaging_pb2.MessageCode.Name(msg.code)}")
                        pieces.append(msg.tensor_part.buffer)
                    if not pieces:
                        raise AllreduceException(f"reducer {peers[owner]} closed the stream without an answer")
                    mean = b"".join(pieces)
                    received += len(mean)
                try:
                    out[lo:hi] = await loop.run_in_executor(None, codec.decode, mean, hi - lo)
                except CodecError as e:
                    raise AllreduceException(f"mean from {peers[owner]} refused: {e}") from None

            work = asyncio.ensure_future(asyncio.gather(*(exchange(owner) for owner in owner_part)))
            # a reducer hears from every member; a client-mode member only talks to the reducers (two clients never
            # connect to each other)
            partners = peers if reduction is not None else [peers[i] for i in owner_part]
            watch = asyncio.ensure_future(self._watch_members(partners))
            try:
                await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
                if watch.done():
                    work.cancel()
                    watch.result()  # raises: a member died
                await work
            except BaseException as e:
                if reduction is not None:
                    reduction.fail(AllreduceException(f"this reducer's round failed: {e!r}"))
                raise AllreduceException(f"round failed: {e!r}") from e
            finally:
                watch.cancel()
                work.cancel()  # (a no-op once it is done)
            if reduction is not None:  # every other member sent us its part and takes our encoded mean
                sent += len(reduction.result.result()) * (len(peers) - 1)
                received += reduction.bytes_in
            flat.copy_(out)  # all or nothing
        return {"peers": len(peers), "weight": total_weight, "sent": sent, "received": received}

    async def _watch_members(self, peers: list[PeerID]) -> None:
        """Raise once a member of the round that this peer exchanges parts with is gone: connected to this peer
        and then no longer, or never connected within MEMBER_CONNECT_S (every member opens a stream to every
        reducer as the round starts).

        A SIGKILLed member's connection closes at once, but a part it never sent, or
        an answer it never gave, would otherwise be waited for until the round timeout.
        """
        others, seen = set(peers) - {self.peer_id}, set()
        loop = asyncio.get_event_loop()
        start = loop.time()
        while True:
            connected = {info.peer_id for info in await self._p2p.list_peers()}
            seen |= others & connected
            gone = seen - connected
            if not gone and loop.time() - start > MEMBER_CONNECT_S:
                gone = others - seen
            if gone:
                raise AllreduceException(f"member {sorted(map(str, gone))[0]} is gone (not connected)")
            await asyncio.sleep(MEMBER_CHECK_S)

    @staticmethod
    async def _chunks(group_id: bytes, weight: float, payload: bytes) -> AsyncIterator[averaging_pb2.AveragingData]:
        for i in range(0, max(len(payload), 1), CHUNK_BYTES):
            yield averaging_pb2.AveragingData(
                code=averaging_pb2.PART_FOR_AVERAGING, group_id=group_id if i == 0 else b"", weight=weight,
                tensor_part=runtime_pb2.Tensor(buffer=payload[i:i + CHUNK_BYTES]))
            reached("sending")

    async def rpc_codec_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A group member sends us its encoded part; we answer with the encoded mean of that part."""
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
            reduction: _Reduction | None = await future
        except BaseException as e:  # this peer's side of the group failed before it could reduce
            log.debug("group %s failed before reducing: %r", first.group_id.hex(), e)
            yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
            return
        if reduction is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        try:
            expected = reduction.codec.wire_size(reduction.numel)
            buf = bytearray(first.tensor_part.buffer)
            async for msg in aiter_with_timeout(stream, self._allreduce_timeout):
                buf += msg.tensor_part.buffer
                if len(buf) > expected:
                    break
            reduction.add(context.remote_id, first.weight, bytes(buf))
            reached("reducing")
            mean = await asyncio.wait_for(asyncio.shield(reduction.result), self._allreduce_timeout)
        except Exception as e:
            reduction.fail(AllreduceException(f"part from {context.remote_id}: {e!r}"))
            yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
            return
        for i in range(0, len(mean), CHUNK_BYTES):
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART,
                                              tensor_part=runtime_pb2.Tensor(buffer=mean[i:i + CHUNK_BYTES]))

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        async for response in super().rpc_join_group(request, context):
            yield response
            reached("matchmaking")

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        async for message in super().rpc_download_state(request, context):
            yield message
            reached("serving_state")

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's own all-reduce is refused: our peers only speak rpc_codec_part."""
        yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)


class SwarmAverager(FragmentAverager):
    """One `CodecAverager` per fragment, all on one DHT; `begin` starts a round in the background."""

    def __init__(self, dht, run_id: str, fragment_sizes: list[int], codec_name: str, *, round_timeout: float,
                 target_group_size: int | None = None, min_matchmaking_time: float = 3.0,
                 bandwidth: float | None = None, client_mode: bool = False, search_timeout: float | None = None):
        self.run_id, self.codec_name, self.round_timeout = run_id, codec_name, round_timeout
        # a group forms about one matchmaking time after its first member came: a peer that finds none by one
        # more matchmaking time (it came late, or nobody came) gives up, not after the whole round timeout.
        # Longer, and a round nobody comes to holds its peer up at the fragment's next round (its deadline);
        # shorter (1.5x was tried), and a loaded machine misses groups that were forming
        self.search_timeout = search_timeout or min(round_timeout, 2 * min_matchmaking_time)
        self.dht = dht
        self.peer_id = str(dht.peer_id)
        self.bytes_sent = 0
        self.bytes_received = 0
        # peers known to be training (from their progress records); None: unknown, trust every record.
        # A dead peer's state-hash record outlives it: it must not count as the swarm's state, nor as a donor.
        self.live_peers: set[str] | None = None
        # live peers in client mode (others cannot connect to them): their hashes count, they serve no state
        self.unreachable_peers: set[str] = set()
        previous = signal.getsignal(signal.SIGINT)
        self.averagers = [
            CodecAverager(numel, codec_name, dht=dht, prefix=f"{run_id}_f{k}", start=True,
                          target_group_size=target_group_size, min_group_size=2,
                          min_matchmaking_time=min_matchmaking_time,
                          request_timeout=min(1.0, min_matchmaking_time / 2),
                          allreduce_timeout=round_timeout, next_chunk_timeout=round_timeout,
                          bandwidth=bandwidth, client_mode=client_mode, declare_state_period=3600)
            for k, numel in enumerate(fragment_sizes)]
        signal.signal(signal.SIGINT, previous)  # hivemind makes the creating process ignore Ctrl-C

    def begin(self, key: RoundKey, outer_grad: torch.Tensor, weight: float) -> PendingAverage:
        if key.run_id != self.run_id:
            raise AveragingFailed(f"{key}: this averager serves run {self.run_id}")
        av = self.averagers[key.fragment]
        with av.get_tensors() as tensors:
            tensors[0].copy_(outer_grad.reshape(-1))
        av.set_group_bits(format(key.round % (1 << 16), "016b"))
        meta = {"run": key.run_id, "fragment": key.fragment, "round": key.round, "codec": self.codec_name,
                "numel": int(outer_grad.numel()), "weight": float(weight)}
        control = av.step(gather=meta, weight=float(weight), wait=False, timeout=self.search_timeout,
                          allow_retries=False)
        return _SwarmPending(self, av, key, control, time.time())

    def applied(self, key: RoundKey, anchor: torch.Tensor, momentum: torch.Tensor, digest: str) -> None:
        meta = {"run": key.run_id, "fragment": key.fragment, "round": key.round, "sha256": digest}
        self.averagers[key.fragment].served = (meta, [anchor.clone(), momentum.clone()])
        self.dht.store(f"{self.run_id}_f{key.fragment}_hashes", msgpack.packb([key.round, digest]),
                       expiration_time=get_dht_time() + 3600, subkey=self.peer_id, return_future=True)

    def recover(self, key: RoundKey, digest: str | None = None) -> AgreedState | None:
        """The state of `key` (hashing to `digest`, else the most common), downloaded from a peer that holds it
        and checked against its hash."""
        deadline = time.monotonic() + min(3.0, self.round_timeout / 2)  # records may still be propagating
        while not (donors := self._donors(key, digest)):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)
        digest, peers = donors
        # donors in a fixed order, each fragment starting at another one: a joiner spreads its download
        peers = sorted(peers)
        peers = peers[key.fragment % len(peers):] + peers[:key.fragment % len(peers)]
        av = self.averagers[key.fragment]
        for peer in peers:
            try:
                future = MPFuture()
                av._outer_pipe.send(("_download_from", [], dict(peer=peer, timeout=self.round_timeout,
                                                                  future=future)))
                metadata, tensors = future.result(timeout=self.round_timeout * 2)
                state = _decode_state(av, metadata, tensors, key, digest)
                log.warning("recovered %s from %s", key, peer)
                return state
            except Exception as e:  # try the next donor
                log.warning("could not recover %s from %s: %r", key, peer, e)
        return None

    def latest_agreed(self, fragment: int, upto: int) -> RoundReport | None:
        records = [(r, d) for r, d in self._hash_records(fragment).values() if r <= upto]
        if not records:
            return None
        latest = max(r for r, _ in records)
        return RoundReport(latest, dict(Counter(d for r, d in records if r == latest)))

    def _hash_records(self, fragment: int) -> dict[str, tuple[int, str]]:
        """Live peers' latest (round, state hash) of `fragment`; malformed records are logged and skipped."""
        found = self.dht.get(f"{self.run_id}_f{fragment}_hashes", latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        records = {}
        for peer, item in found.value.items():
            try:
                round_, digest = msgpack.unpackb(item.value)
                if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0 \
                        or not isinstance(digest, str) or len(digest) != 64:
                    raise ValueError(f"({round_!r}, {digest!r})")
            except Exception as e:
                log.warning("ignoring a malformed hash record from %s: %s", peer, e)
                continue
            if str(peer) != self.peer_id and (self.live_peers is None or str(peer) in self.live_peers):
                records[str(peer)] = (round_, digest)
        return records

    def _donors(self, key: RoundKey, digest: str | None) -> tuple[str, list[str]] | None:
        by_hash: dict[str, list[str]] = {}
        for peer, (round_, d) in self._hash_records(key.fragment).items():
            if round_ == key.round:
                by_hash.setdefault(d, []).append(peer)
        if digest is None and by_hash:
            digest = RoundReport(key.round, {d: len(p) for d, p in by_hash.items()}).majority()
        donors = [p for p in by_hash.get(digest, []) if p not in self.unreachable_peers]
        return (digest, donors) if donors else None

    def shutdown(self) -> None:
        for av in self.averagers:
            try:
                av.shutdown()
            except Exception as e:  # shutting down must not raise over a dead averager
                log.debug("averager shutdown: %s", e)


class _SwarmPending(PendingAverage):
    def __init__(self, owner: SwarmAverager, av: CodecAverager, key: RoundKey, control, started: float):
        self.owner, self.av, self.key, self.control, self.started = owner, av, key, control, started

    def done(self) -> bool:
        return self.control.done()

    def result(self) -> FragmentAverage:
        try:
            gathered = self.control.result(timeout=self.owner.round_timeout * 2 + 5)
        except Exception as e:
            raise AveragingFailed(f"{self.key}: {type(e).__name__}: {e}") from None
        stats = gathered
        if not (isinstance(stats, dict) and {"peers", "weight", "sent", "received"} <= set(stats)):
            raise AveragingFailed(f"{self.key}: the averager returned no round statistics")
        self.owner.bytes_sent += stats["sent"]
        self.owner.bytes_received += stats["received"]
        with self.av.get_tensors() as tensors:
            mean = tensors[0].clone()
        return FragmentAverage(mean, int(stats["peers"]), float(stats["weight"]))


def _decode_state(av: CodecAverager, metadata: bytes | None, tensors, key: RoundKey, digest: str) -> AgreedState:
    if not metadata:
        raise AveragingFailed("the donor has no state for this fragment")
    meta = av.serializer.loads(metadata)
    if not isinstance(meta, dict) or meta.get("round") != key.round or meta.get("sha256") != digest \
            or meta.get("run") != key.run_id or meta.get("fragment") != key.fragment:
        raise AveragingFailed(f"the donor serves {meta!r}, not {key} with hash {digest[:12]}")
    if len(tensors) != 2 or any(t.dtype != torch.float32 or t.numel() != av.numel for t in tensors):
        raise AveragingFailed("the donor's state has the wrong shape or dtype")
    anchor, momentum = (t.reshape(-1) for t in tensors)
    if state_hash(anchor, momentum) != digest:
        raise AveragingFailed("the downloaded state does not match the agreed hash")
    return AgreedState(anchor, momentum)
