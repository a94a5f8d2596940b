"""Serving and fetching a fragment's agreed state: how a peer that missed a round catches up.

Every peer that applies a round publishes the round's state hash (sha256 of
anchor and momentum) in the DHT under `{run}_f{k}_hashes` and keeps a copy of
that state to serve (`StateServing.served`, read by hivemind's
`get_current_state` when another peer downloads it). A peer that missed the
round picks the majority hash among live peers (`hash_records`), downloads the
state from a peer holding it (`_download_from`, in the averager's process), and
adopts it only if it hashes to what was agreed (`decode_state`).
"""

from __future__ import annotations

import logging
from typing import AsyncIterator

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming

from ..core.averaging import AgreedState, AveragingFailed, RoundKey
from ..core.state_hash import state_hash
from ..node.failpoints import reached

log = logging.getLogger(__name__)

HASHES_TTL = 3600.0
STATE_OVERHEAD_BYTES = 64 * 1024  # what a state's download may carry besides its two tensors' values
MAX_STATE_METADATA_BYTES = 4096


class StateServing:
    """The state half of `CodecAverager` (a mixin of a hivemind `DecentralizedAverager`)."""

    served: tuple[dict, list[torch.Tensor]] | None = None  # set in the peer's main process
    state_numel: int  # the fragment's size
    admitted = None  # `admitted.AdmittedPeers` in a run with a run key (set by `CodecAverager`)

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

            # a state is two fp32 tensors of the fragment's size: a donor that sends more is cut off before it is
            # held in memory (a stalled one by `timeout` between two messages)
            limit, received = 2 * 4 * self.state_numel + STATE_OVERHEAD_BYTES, 0
            async for msg in aiter_with_timeout(stream, timeout=timeout):
                received += len(msg.tensor_part.buffer) + len(msg.metadata)
                if received > limit or len(msg.metadata) > MAX_STATE_METADATA_BYTES:
                    raise ConnectionError(f"the donor sent more than the {limit} bytes of this fragment's state")
                if msg.metadata:
                    metadata = msg.metadata
                if msg.tensor_part.dtype and current:  # a dtype marks the first chunk of the next tensor
                    take()
                    if len(tensors) >= 2:
                        raise ConnectionError("the donor sent more than the two tensors of a state")
                current.append(msg.tensor_part)
            if current:
                take()
            future.set_result((metadata, tensors))  # tensors, not protobufs: they cross a process boundary
        except BaseException as e:
            if not future.done():
                future.set_exception(e)

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if str(context.remote_id) in getattr(self, "banned", ()):
            return  # caught lying: nothing from this peer
        if self.admitted is not None and not await self.admitted.admits(self.dht, str(context.remote_id)):
            self.admitted.refuse(str(context.remote_id), "this fragment's state", "no token that admits it in its "
                            "progress record")
            return  # an empty answer: "no state here"
        async for message in super().rpc_download_state(request, context):
            yield message
            reached("serving_state")



def publish_hash(dht, run_id: str, peer_id: str, key: RoundKey, digest: str) -> None:
    """Tell the swarm this peer holds `key`'s state hashing to `digest` (one record per peer and fragment)."""
    dht.store(hashes_key(run_id, key.fragment), msgpack.packb([key.round, digest]),
              expiration_time=get_dht_time() + HASHES_TTL, subkey=peer_id, return_future=True)


def hash_records(dht, run_id: str, fragment: int, me: str, live: set[str] | None) -> dict[str, tuple[int, str]]:
    """Other live peers' latest (round, state hash) of `fragment` (`live` None: every peer's);
    malformed records are logged and skipped."""
    return others_records(read_hash_records(dht, run_id, fragment), me, live)


def others_records(records: dict[str, tuple[int, str]], me: str, live: set[str] | None
                   ) -> dict[str, tuple[int, str]]:
    return {peer: r for peer, r in records.items() if peer != me and (live is None or peer in live)}


def read_hash_records(dht, run_id: str, fragment: int) -> dict[str, tuple[int, str]]:
    """Every peer's latest (round, state hash) of `fragment`, as the DHT holds them (a lookup: over WAN links
    it takes round trips); malformed records are logged and skipped."""
    return parse_hash_records(dht.get(hashes_key(run_id, fragment), latest=True))


def hashes_key(run_id: str, fragment: int) -> str:
    return f"{run_id}_f{fragment}_hashes"


def parse_hash_records(found) -> dict[str, tuple[int, str]]:
    """The records of a DHT lookup of `hashes_key` (None: nothing found)."""
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
        records[str(peer)] = (round_, digest)
    return records


def decode_state(av: StateServing, metadata: bytes | None, tensors, key: RoundKey, digest: str) -> AgreedState:
    if not metadata:
        raise AveragingFailed("the donor has no state for this fragment")
    meta = av.serializer.loads(metadata)
    if not isinstance(meta, dict) or meta.get("round") != key.round or meta.get("sha256") != digest \
            or meta.get("run") != key.run_id or meta.get("fragment") != key.fragment:
        raise AveragingFailed(f"the donor serves {meta!r}, not {key} with hash {digest[:12]}")
    if len(tensors) != 2 or any(t.dtype != torch.float32 or t.numel() != av.state_numel for t in tensors):
        raise AveragingFailed("the donor's state has the wrong shape or dtype")
    anchor, momentum = (t.reshape(-1) for t in tensors)
    if state_hash(anchor, momentum) != digest:
        raise AveragingFailed("the downloaded state does not match the agreed hash")
    return AgreedState(anchor, momentum)
