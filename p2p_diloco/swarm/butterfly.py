"""Our butterfly all-reduce inside a hivemind averager: one part per reducer, encoded by our codecs.

`ButterflyProtocol` replaces `DecentralizedAverager._aggregate_with_group`
(which would run hivemind's own all-reduce) for one round of one group:

* every member checks the gathered metadata (run, fragment, round, codec, size,
  weight); any mismatch fails the round for the whole group, naming the peer;
* the vector is cut into one part per non-client member (by declared bandwidth,
  at codec block boundaries); each member sends its encoded part to that part's
  reducer over `rpc_codec_part`; the reducer decodes and validates each
  contribution, accumulates in fp32 weighted by tokens, encodes the mean once
  and streams the same bytes back to every member, itself included;
* a member writes the result only when every part arrived and decoded:
  all or nothing. Any failure raises (the round fails here and the core keeps
  its anchor); a member that is gone fails the round at once (`_watch_members`).

Bytes sent and received are the payload bytes that crossed the wire.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import aiter_with_timeout, anext, enter_asynchronously

from ..core.codecs import Codec, CodecError, get_codec
from ..core.parts import block_aligned_parts
from ..node.failpoints import reached

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 19
# a member that sends us a part of a group we are not in (we gave up matchmaking while the leader counted us
# in) gets BAD_GROUP_ID after this long, instead of hanging until the round timeout
GROUP_REGISTRATION_S = 3.0
MEMBER_CHECK_S = 0.5  # how often a round checks that its members are still connected
MEMBER_CONNECT_S = 5.0  # a member not connected to this peer this long after the round began is gone
_CLIENT_MODE = 1  # hivemind.averaging.averager.AveragingMode.CLIENT


@dataclass
class _Group:
    """One round's group as every member sees it, checked."""

    peers: list[PeerID]
    me: int  # this peer's index in `peers`
    weights: list[float]  # tokens behind each member's outer gradient
    reducers: list[int]  # members that reduce a part (not in client mode)
    bandwidths: list[float]  # declared by the reducers, for load balancing

    @property
    def total_weight(self) -> float:
        return float(sum(self.weights))


def read_group(group_info: GroupInfo, me: PeerID, serializer) -> _Group:
    """The group's gathered metadata, checked: every member on the same run, fragment, round, codec and size,
    each with a positive finite weight. Raises AllreduceException naming the first peer that differs."""
    peers = list(group_info.peer_ids)
    try:
        bandwidths, modes, user = zip(*map(serializer.loads, group_info.gathered))
        meta = [serializer.loads(u) for u in user]
    except Exception as e:
        raise AllreduceException(f"malformed group metadata: {e}") from None
    index = peers.index(me)
    mine = meta[index]
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
    reducers = [i for i, mode in enumerate(modes) if mode != _CLIENT_MODE]
    if not reducers:
        raise AllreduceException("no member can reduce (all in client mode)")
    return _Group(peers, index, [float(m["weight"]) for m in meta], reducers,
                  [float(bandwidths[i] or 0) or 1.0 for i in reducers])


class Reduction:
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


class ButterflyProtocol:
    """The all-reduce half of `CodecAverager` (a mixin of a hivemind `DecentralizedAverager`)."""

    codec_name: str
    numel: int

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, weight: float | None = None,
                                    **kwargs) -> dict:
        """One round with one group: send each part to its reducer, reduce ours, take every mean back."""
        codec = get_codec(self.codec_name)
        group = read_group(group_info, self.peer_id, self.serializer)
        loop = asyncio.get_event_loop()
        counts = await loop.run_in_executor(  # hivemind's LP: elements per reducer by declared bandwidth
            None, load_balance_peers, self.numel, group.bandwidths, 0)
        parts = block_aligned_parts(self.numel, [c / max(sum(counts), 1) for c in counts], codec.block_size)
        owner_part = dict(zip(group.reducers, parts))
        reduction = None
        if group.me in owner_part:
            lo, hi = owner_part[group.me]
            reduction = Reduction(codec, hi - lo, group.peers, group.weights, self.peer_id)
        self._running_groups[group_info.group_id].set_result(reduction)
        traffic = {"sent": 0, "received": 0}
        async with enter_asynchronously(self.get_tensors()) as tensors:
            flat = tensors[0].view(-1)
            out = torch.empty_like(flat)
            work = asyncio.ensure_future(asyncio.gather(*(
                self._exchange(group, group_info.group_id, codec, flat, out, owner, span, reduction, traffic)
                for owner, span in owner_part.items())))
            # a reducer hears from every member; a client-mode member only talks to the reducers (two clients never
            # connect to each other)
            partners = group.peers if reduction is not None else [group.peers[i] for i in owner_part]
            await self._until_done_or_member_gone(work, partners, reduction)
            if reduction is not None:  # every other member sent us its part and takes our encoded mean
                traffic["sent"] += len(reduction.result.result()) * (len(group.peers) - 1)
                traffic["received"] += reduction.bytes_in
            flat.copy_(out)  # all or nothing
        return {"peers": len(group.peers), "weight": group.total_weight, **traffic}

    async def _exchange(self, group: _Group, group_id: bytes, codec: Codec, flat: torch.Tensor, out: torch.Tensor,
                        owner: int, span: tuple[int, int], reduction: Reduction | None, traffic: dict) -> None:
        """Our contribution to the part `owner` reduces goes out; that part's mean comes back into `out`."""
        loop = asyncio.get_event_loop()
        lo, hi = span
        timeout, weight = self._allreduce_timeout, group.weights[group.me]
        payload = await loop.run_in_executor(None, codec.encode, flat[lo:hi])
        if owner == group.me:
            reduction.add(self.peer_id, weight, payload)
            mean = await asyncio.wait_for(asyncio.shield(reduction.result), timeout)
        else:
            reducer = group.peers[owner]
            stub = type(self).get_stub(self._p2p, reducer, namespace=self.prefix)
            traffic["sent"] += len(payload)
            stream = await stub.rpc_codec_part(self._chunks(group_id, weight, payload))
            pieces = []
            async for msg in aiter_with_timeout(stream, timeout):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"reducer {reducer} answered "
                                             f"{averaging_pb2.MessageCode.Name(msg.code)}")
                pieces.append(msg.tensor_part.buffer)
            if not pieces:
                raise AllreduceException(f"reducer {reducer} closed the stream without an answer")
            mean = b"".join(pieces)
            traffic["received"] += len(mean)
        try:
            out[lo:hi] = await loop.run_in_executor(None, codec.decode, mean, hi - lo)
        except CodecError as e:
            raise AllreduceException(f"mean from {group.peers[owner]} refused: {e}") from None

    async def _until_done_or_member_gone(self, work: asyncio.Future, partners: list[PeerID],
                                         reduction: Reduction | None) -> None:
        """Wait for every exchange; fail the round (and our reduction, for the members waiting on it) as soon
        as one fails or a partner is gone."""
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
            reduction: Reduction | None = await future
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

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's own all-reduce is refused: our peers only speak rpc_codec_part."""
        yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
