"""A flooding peer, built on our code, to test `inbound`'s limits (`P2P_DILOCO_ATTACK=flood`).

It opens streams to other peers' averager handlers as fast as they let it, declares in each a message of
DECLARED_BYTES and pushes junk until the stream is refused or PUSH_BYTES went out; and fires DHT pings at them.
A victim without limits buffers whatever is pushed (hivemind reads a message whole); with them it reads the
8-byte header, closes the stream and soon drops the flooder.

`python -m p2p_diloco.swarm.flooding victim limited|open` is a victim to measure (tests, scripts/bench_flood.py):
one libp2p node with one stream handler (VICTIM_HANDLER), with or without `inbound`'s limits; it prints a JSON
line (its peer id, addresses, memory), then, for each line read on stdin, its memory and what it refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass

from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2, dht_pb2

from . import inbound

log = logging.getLogger(__name__)

DECLARED_BYTES = 1 << 40
PUSH_BYTES = 64 << 20  # per stream, at most
JUNK = os.urandom(1 << 20)
WRITE_TIMEOUT_S = 2.0
OPENS_PER_S = 50  # the flooder's own pace: it shares the 2 cores with its victims in a local swarm


@dataclass
class FloodStats:
    streams_opened: int = 0  # streams the daemon opened to a victim's handler
    streams_failed: int = 0  # streams that could not be opened (refused by the victim's daemon or dropped)
    bytes_pushed: int = 0  # junk written into streams (a victim without limits would hold it)
    pings: int = 0
    pings_refused: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


async def flood_stream(p2p: P2P, peer: PeerID, handler: str, stats: FloodStats, push_bytes: int = PUSH_BYTES) -> None:
    """One stream to `handler` at `peer`: a header declaring DECLARED_BYTES, then junk until refused."""
    try:
        _, _, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, handler), WRITE_TIMEOUT_S)
    except Exception:
        stats.streams_failed += 1
        return
    stats.streams_opened += 1
    try:
        writer.write(P2P.MESSAGE_MARKER + DECLARED_BYTES.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        pushed = 0
        while pushed < push_bytes:
            writer.write(JUNK)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
            pushed += len(JUNK)
            stats.bytes_pushed += len(JUNK)
    except Exception:
        pass  # refused: the victim closed the stream (or stopped reading it)
    finally:
        writer.close()


async def ping(p2p: P2P, peer: PeerID, stats: FloodStats) -> None:
    request = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=os.urandom(20)), validate=False)
    try:
        await asyncio.wait_for(p2p.call_protobuf_handler(peer, "DHTProtocol.rpc_ping", request,
                                                         dht_pb2.PingResponse), WRITE_TIMEOUT_S)
        stats.pings += 1
    except Exception:
        stats.pings_refused += 1


class Flooder:
    """Floods, in a thread of its own, the peers `targets()` names (peer id -> handler names) until `stop`."""

    def __init__(self, dht, targets):
        self.dht, self.targets = dht, targets
        self.stats = FloodStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True, name="flooder")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.stats.as_dict()

    async def _run(self) -> None:
        p2p = await self.dht.replicate_p2p()
        log.warning("ATTACK: flooding the other peers' averagers with oversized messages, streams and pings")
        while not self._stop.is_set():
            targets = self.targets()
            if not targets:
                await asyncio.sleep(0.5)
                continue
            for peer_id, handlers in targets.items():
                peer = PeerID.from_base58(peer_id)
                tasks = [flood_stream(p2p, peer, h, self.stats) for h in handlers]
                tasks += [ping(p2p, peer, self.stats) for _ in range(len(handlers))]
                await asyncio.gather(*tasks)
                await asyncio.sleep(len(tasks) / OPENS_PER_S)


VICTIM_HANDLER = "victim.rpc"


def _memory() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


async def serve_victim(limited: bool) -> None:
    if limited:
        inbound.install()
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])

    async def handler(stream, context):
        async for _ in stream:
            yield averaging_pb2.AveragingData()
    await p2p.add_protobuf_handler(VICTIM_HANDLER, handler, averaging_pb2.AveragingData, stream_input=True,
                                   stream_output=True)
    print(json.dumps({"peer": p2p.peer_id.to_base58(), "maddrs": [str(m) for m in await p2p.get_visible_maddrs()],
                      **_memory()}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while await loop.run_in_executor(None, sys.stdin.readline):
            print(json.dumps({**_memory(), "dropped": list(inbound.INBOUND.dropped),
                              "refused": inbound.INBOUND.refused, "oversized": inbound.INBOUND.oversized}),
                  flush=True)
    finally:
        await p2p.shutdown()


async def _flood_one(victim: dict, streams: int, push_bytes: int) -> FloodStats:
    p2p = await P2P.create(initial_peers=victim["maddrs"])
    stats = FloodStats()
    try:
        peer = PeerID.from_base58(victim["peer"])
        for _ in range(streams):
            await flood_stream(p2p, peer, VICTIM_HANDLER, stats, push_bytes=push_bytes)
    finally:
        await p2p.shutdown()
    return stats


def flood_victim(limited: bool, streams: int, push_bytes: int) -> tuple[dict, dict, FloodStats]:
    """Start a victim (its own process, with `inbound`'s limits or without), flood it with `streams` streams of
    up to `push_bytes` each, one after the other; (its memory before, its memory and refusals after, the
    flooder's counts). The victim and its daemon are gone afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "p2p_diloco.swarm.flooding", "victim",
                             "limited" if limited else "open"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = json.loads(proc.stdout.readline())
        stats = asyncio.run(asyncio.wait_for(_flood_one(before, streams, push_bytes), 120))
        proc.stdin.write("\n")
        proc.stdin.flush()
        after = json.loads(proc.stdout.readline())
        return before, after, stats
    finally:  # end of its stdin: the victim shuts its node (and p2pd) down
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    if sys.argv[1:2] != ["victim"] or sys.argv[2:] not in (["limited"], ["open"]):
        sys.exit("usage: python -m p2p_diloco.swarm.flooding victim limited|open")
    asyncio.run(serve_victim(sys.argv[2] == "limited"))
