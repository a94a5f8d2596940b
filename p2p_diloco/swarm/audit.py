"""Auditing reducers: a reducer that returns a wrong mean is caught before any member applies the round.

A reduction is deterministic (`butterfly.Reduction`: decode, combine in fp32 in the group's order, encode once),
so anyone holding the members' bytes for a part recomputes its mean bit for bit. In a run with `--audit p`
(`DiLoCoConfig.audit`, the same in every member's round metadata):

* **Commitments.** With each chunk's mean the reducer sends the sha256 of every member's chunk as it received
  them, in the group's order (32 bytes a member). Each member checks its own entry against what it sent: a
  reducer that altered, dropped or replaced a member's bytes is caught by that member, always.
* **Audits.** Each member, on a private coin of probability p for every part another member reduced, asks the
  group's other members (the reducer among them) for the bytes they sent that reducer (`rpc_audit_part`: they
  keep them for a few rounds), checks them against the commitment, recomputes the mean and compares it byte for
  byte with what the reducer sent. The reducer cannot tell beforehand which members will audit: its means are out
  before any audit starts.
* **Verdicts.** Before applying the round, every member tells every other member whether it caught a reducer
  (`rpc_audit_verdict`) and waits for all their verdicts: one catch fails the round on every member, so a wrong
  mean is applied nowhere. A member that caught a reducer itself bans it for the run (`ReducerCaught`: every
  fragment of this peer stops grouping with it, serving it, and counting it); a member told by another only
  fails the round (a verdict is a claim, not a proof it can check).

Detection: a reducer that returns a wrong mean to k members is caught in that round with probability
1 - (1 - p)^k (each of them audits its part with probability p; a member it lies to about its own bytes catches
it always); over r such rounds it goes unnoticed with probability (1 - p)^(k r). Cost: the commitments (32 bytes a
member per chunk), one verdict message to each member per round, and for an audited part the other members'
bytes for it (n - 1 times that part's payload, about p (n - 1) / n of a round's payload per member on average).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import OrderedDict

from typing import AsyncIterator

from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import anext

from ..core.aggregation import Aggregation
from ..core.codecs import Codec, CodecError

log = logging.getLogger(__name__)

DIGEST_BYTES = 32
KEPT_ROUNDS = 4  # groups whose sent bytes (and verdicts) a member keeps for audits
_OK, _CAUGHT = averaging_pb2.AVERAGED_PART, averaging_pb2.PROTOCOL_VIOLATION
_coin = random.SystemRandom()  # private coins: nobody can predict which parts a member audits


class ReducerCaught(AllreduceException):
    """This member proved that `reducer` returned a wrong mean (or misstated this member's bytes)."""

    def __init__(self, reducer: str, message: str):
        super().__init__(message)
        self.reducer, self.message = reducer, message

    def __reduce__(self):  # (crosses from the averager's process to the trainer's)
        return ReducerCaught, (self.reducer, self.message)


def digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def split_mean(buffer: bytes, members: int) -> tuple[bytes, bytes]:
    """(commitment, encoded mean) of a mean message of an audited run."""
    size = DIGEST_BYTES * members
    if len(buffer) < size:
        raise AllreduceException(f"a mean of {len(buffer)} bytes has no commitment of {members} digests")
    return buffer[:size], buffer[size:]


class AuditTrail:
    """What one member of one audited round holds: the bytes it sent to each reducer and what each reducer sent
    back (commitments and means), chunk by chunk."""

    def __init__(self, peers: list[PeerID]):
        self.peers = peers
        self.sent: dict[tuple[int, int], bytes] = {}  # (reducer index, chunk) -> our bytes
        self.received: dict[tuple[int, int], tuple[bytes, bytes]] = {}  # -> (commitment, mean)
        self.verdicts: dict[PeerID, tuple[int, bytes]] = {}  # member -> (code, the reducer it caught)
        self.verdict_in = asyncio.Event()

    def check_commitment(self, owner: int, k: int, commitment: bytes, me: int, reducer: PeerID) -> None:
        """Our own entry of a reducer's commitment must be the digest of what we sent it."""
        mine = commitment[me * DIGEST_BYTES:(me + 1) * DIGEST_BYTES]
        if mine != digest(self.sent.get((owner, k), b"")):
            raise ReducerCaught(str(reducer), f"reducer {reducer} committed to other bytes than this peer sent it "
                                              f"(chunk {k}): it altered or replaced this peer's contribution")


class AuditProtocol:
    """The audit half of `CodecAverager` (a mixin, with `ButterflyProtocol`)."""

    _trails: OrderedDict  # group id -> AuditTrail (the latest KEPT_ROUNDS groups)

    def _trail(self, group_id: bytes, peers: list[PeerID] | None = None) -> AuditTrail:
        trails = self.__dict__.setdefault("_trails", OrderedDict())
        if group_id not in trails:
            trails[group_id] = AuditTrail(peers or [])
            while len(trails) > KEPT_ROUNDS:
                trails.popitem(last=False)
        elif peers and not trails[group_id].peers:
            trails[group_id].peers = peers
        return trails[group_id]

    async def _audit_round(self, group, group_id: bytes, codec: Codec, owner_part: dict[int, tuple[int, int]],
                           chunks_of, verdict_wait: float) -> dict:
        """After every mean is in, before the round is applied: audit other reducers' parts on private coins,
        then exchange verdicts (waiting up to `verdict_wait` s for the others': they may be auditing). Raises ReducerCaught (this member caught one), AllreduceException (another
        member did, or gave no verdict); returns {"audited": parts, "audit_bytes": bytes received for audits}."""
        trail = self._trail(group_id, group.peers)
        caught: ReducerCaught | None = None
        stats = {"audited": 0, "audit_bytes": 0}
        for owner in owner_part:
            if owner == group.me or _coin.random() >= group.audit:
                continue
            stats["audited"] += 1
            try:
                stats["audit_bytes"] += await self._audit_part(group, group_id, codec, owner, chunks_of(owner), trail)
            except ReducerCaught as e:
                caught = e
                break
        await self._exchange_verdicts(group, group_id, trail, caught, verdict_wait)
        if caught is not None:
            raise caught
        return stats

    async def _audit_part(self, group, group_id: bytes, codec: Codec, owner: int, chunks: list[tuple[int, int]],
                          trail: AuditTrail) -> int:
        """Recompute reducer `owner`'s means from every member's bytes; raise ReducerCaught on a difference."""
        reducer = group.peers[owner]
        others = [i for i in range(len(group.peers)) if i != group.me]
        fetched = await asyncio.gather(*(self._fetch_sent(group, group_id, i, owner, codec, chunks) for i in others))
        payloads = {group.me: [trail.sent.get((owner, k), b"") for k in range(len(chunks))], **dict(zip(others, fetched))}
        aggregation = Aggregation(group.aggregation)
        for k, (lo, hi) in enumerate(chunks):
            commitment, mean = trail.received[(owner, k)]
            for i in range(len(group.peers)):
                if digest(payloads[i][k]) != commitment[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]:
                    raise AllreduceException(f"audit of reducer {reducer}: member {group.peers[i]}'s bytes for "
                                             f"chunk {k} do not match the reducer's commitment (one of them lies)")
            try:
                decoded = [codec.decode(payloads[i][k], hi - lo) for i in range(len(group.peers))]
            except CodecError as e:
                raise AllreduceException(f"audit of reducer {reducer}: {e}") from None
            recomputed = codec.mean_codec.encode(aggregation.combine(decoded, group.weights)[0])
            if recomputed != mean:
                raise ReducerCaught(str(reducer), f"reducer {reducer} returned a wrong mean for chunk {k} of its "
                                                  "part (audited: recomputed from the members' bytes)")
        return sum(len(p) for i, ps in payloads.items() if i != group.me for p in ps)

    async def _fetch_sent(self, group, group_id: bytes, member: int, owner: int, codec: Codec,
                          chunks: list[tuple[int, int]]) -> list[bytes]:
        """Member `member`'s bytes for reducer `owner`'s chunks, each no larger than its values take."""
        stub = type(self).get_stub(self._p2p, group.peers[member], namespace=self.prefix)
        request = averaging_pb2.AveragingData(group_id=group_id, peer_id=group.peers[owner].to_bytes())
        stream = await stub.rpc_audit_part(request)
        out = []
        try:
            for lo, hi in chunks:
                msg = await asyncio.wait_for(anext(stream), group.chunk_deadline)
                if len(msg.tensor_part.buffer) > codec.wire_size(hi - lo):
                    raise AllreduceException(f"member {group.peers[member]} sent audit bytes larger than a chunk")
                out.append(bytes(msg.tensor_part.buffer))
        except (StopAsyncIteration, asyncio.TimeoutError):
            raise AllreduceException(f"member {group.peers[member]} did not hand over its bytes for the audit of "
                                     f"reducer {group.peers[owner]}") from None
        finally:
            await stream.aclose()
        return out

    async def rpc_audit_part(self, request: averaging_pb2.AveragingData, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A member of one of our recent groups asks for the bytes we sent one reducer (to recompute its means)."""
        trails = self.__dict__.get("_trails", {})
        trail = trails.get(request.group_id)
        if trail is None or context.remote_id not in trail.peers:
            return
        try:
            owner = trail.peers.index(PeerID(request.peer_id))
        except ValueError:
            return
        k = 0
        while (owner, k) in trail.sent:
            yield averaging_pb2.AveragingData(tensor_part=runtime_pb2.Tensor(buffer=trail.sent[(owner, k)]))
            k += 1

    async def _exchange_verdicts(self, group, group_id: bytes, trail: AuditTrail, caught: ReducerCaught | None,
                                 wait: float) -> None:
        others = [p for i, p in enumerate(group.peers) if i != group.me]
        code, blamed = (_CAUGHT, PeerID.from_base58(caught.reducer).to_bytes()) if caught else (_OK, b"")
        await asyncio.gather(*(self._tell_verdict(p, group_id, code, blamed) for p in others))
        deadline = asyncio.get_event_loop().time() + wait
        while not set(others) <= set(trail.verdicts):
            left = deadline - asyncio.get_event_loop().time()
            if left <= 0:
                missing = sorted(str(p) for p in set(others) - set(trail.verdicts))
                raise AllreduceException(f"member {missing[0]} gave no audit verdict: the round is not applied")
            trail.verdict_in.clear()
            try:
                await asyncio.wait_for(trail.verdict_in.wait(), left)
            except asyncio.TimeoutError:
                pass
        for member in others:
            verdict, reducer = trail.verdicts[member]
            if verdict == _CAUGHT and caught is None:
                raise AllreduceException(f"member {member} caught reducer {PeerID(reducer)} returning a wrong "
                                         "mean: the round is applied by no member")

    async def _tell_verdict(self, member: PeerID, group_id: bytes, code: int, blamed: bytes) -> None:
        stub = type(self).get_stub(self._p2p, member, namespace=self.prefix)
        try:
            await asyncio.wait_for(stub.rpc_audit_verdict(
                averaging_pb2.AveragingData(group_id=group_id, code=code, peer_id=blamed)), 5.0)
        except Exception as e:  # it then fails the round for want of our verdict
            log.debug("could not tell %s this member's verdict: %r", member, e)

    async def rpc_audit_verdict(self, request: averaging_pb2.AveragingData, context: P2PContext
                                ) -> averaging_pb2.AveragingData:
        trail = self._trail(request.group_id)
        if context.remote_id not in trail.verdicts and (not trail.peers or context.remote_id in trail.peers):
            trail.verdicts[context.remote_id] = (request.code, bytes(request.peer_id))
            trail.verdict_in.set()
        return averaging_pb2.AveragingData(code=averaging_pb2.ACCEPTED)

