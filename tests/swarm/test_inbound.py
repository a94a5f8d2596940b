"""`swarm.inbound`: the limits on what other peers make this one read. The accounting on a fake clock; then a
real libp2p victim (its own process, its memory read from /proc) flooded by `flooding`'s attacker with and
without the limits: without them it buffers what is pushed, with them it reads 8 bytes a stream and drops the
flooder."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest
from hivemind.p2p import P2P, PeerID

from p2p_diloco.swarm.flooding import FloodStats, flood_stream
from p2p_diloco.swarm.inbound import (DROP_AFTER, DROP_S, MAX_MESSAGE_BYTES, REQUEST_BURST, REQUEST_RATE,
                                      REQUESTS_IN_FLIGHT, STREAM_BURST, STREAM_RATE, STREAMS_PER_PEER, Inbound,
                                      OversizedMessage)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_open_streams_per_peer_are_capped_and_a_closed_one_frees_its_place():
    guard = Inbound(Clock())
    assert all(guard.open_stream("a") is None for _ in range(STREAMS_PER_PEER))
    assert "streams open at once" in guard.open_stream("a")
    assert guard.open_stream("b") is None  # another peer is not held back
    guard.close_stream("a")
    assert guard.open_stream("a") is None


def test_streams_are_rate_limited_per_peer_and_refill_with_time():
    clock = Clock()
    guard = Inbound(clock)
    opened = 0
    for _ in range(STREAM_BURST + 10):
        if guard.open_stream("a") is None:
            opened += 1
            guard.close_stream("a")
    assert opened == STREAM_BURST and guard.refused == 10
    clock.now += 1.0
    again = sum(guard.open_stream("a") is None and not guard.close_stream("a") for _ in range(STREAM_BURST))
    assert again == int(STREAM_RATE)


def test_a_peer_over_the_limits_is_throttled_then_dropped_for_a_while():
    clock = Clock()
    guard = Inbound(clock)
    for _ in range(REQUEST_BURST):
        assert guard.start_request("a") is None
        guard.end_request("a")
    for i in range(DROP_AFTER - 1):
        assert "faster than" in guard.start_request("a")
    assert not guard.is_dropped("a")
    guard.start_request("a")
    assert guard.is_dropped("a") and guard.start_request("a") == "dropped" and guard.open_stream("a") == "dropped"
    assert guard.start_request("b") is None
    clock.now += DROP_S + 1  # forgiven after a while; its bucket has refilled
    assert not guard.is_dropped("a") and guard.start_request("a") is None
    assert REQUEST_RATE * DROP_S > REQUEST_BURST


def test_unanswered_requests_are_capped_per_peer():
    guard = Inbound(Clock())
    assert all(guard.start_request("a") is None for _ in range(REQUESTS_IN_FLIGHT))
    assert "unanswered" in guard.start_request("a")
    guard.end_request("a")
    assert guard.start_request("a") is None


def test_an_oversized_message_is_refused_from_its_header_and_drops_its_sender_at_once():
    guard = Inbound(Clock())
    guard.check_length(MAX_MESSAGE_BYTES, "a")
    with pytest.raises(OversizedMessage, match=r"declaring 1099511627776 bytes .* from peer a"):
        guard.check_length(1 << 40, "a")
    assert guard.is_dropped("a") and guard.oversized == 1
    with pytest.raises(OversizedMessage):  # a response on a stream this peer opened: refused, nobody dropped
        guard.check_length(MAX_MESSAGE_BYTES + 1, None)
    assert list(guard.dropped) == ["a"]


VICTIM = textwrap.dedent("""
    import asyncio, json, sys
    from hivemind.p2p import P2P
    from hivemind.proto import averaging_pb2
    from p2p_diloco.swarm import inbound

    def memory():
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}

    async def main(limited):
        if limited:
            inbound.install()
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        async def handler(stream, context):
            async for message in stream:
                yield averaging_pb2.AveragingData()
        await p2p.add_protobuf_handler("victim.rpc", handler, averaging_pb2.AveragingData, stream_input=True,
                                       stream_output=True)
        print(json.dumps({"peer": p2p.peer_id.to_base58(), "maddrs": [str(m) for m in await p2p.get_visible_maddrs()],
                          **memory()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(json.dumps({**memory(), "dropped": list(inbound.INBOUND.dropped), "refused": inbound.INBOUND.refused,
                          "oversized": inbound.INBOUND.oversized}), flush=True)
        await p2p.shutdown()

    asyncio.run(main(sys.argv[1] == "limited"))
""")


async def _flood(victim: dict, streams: int, push_bytes: int) -> FloodStats:
    p2p = await P2P.create(initial_peers=victim["maddrs"])
    stats = FloodStats()
    try:
        peer = PeerID.from_base58(victim["peer"])
        for _ in range(streams):
            await flood_stream(p2p, peer, "victim.rpc", stats, push_bytes=push_bytes)
    finally:
        await p2p.shutdown()
    return stats


def _flooded(limited: bool, streams: int, push_bytes: int) -> tuple[dict, dict, FloodStats]:
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, "limited" if limited else "open"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        before = json.loads(proc.stdout.readline())
        stats = asyncio.run(asyncio.wait_for(_flood(before, streams, push_bytes), 120))
        proc.stdin.write("\n")
        proc.stdin.flush()
        after = json.loads(proc.stdout.readline())
        proc.wait(timeout=30)
        return before, after, stats
    finally:
        proc.kill()
        proc.wait()


def test_a_flood_of_oversized_messages_leaves_a_limited_victim_s_memory_bounded():
    """Measured: the same flood (streams declaring 2**40-byte messages, junk pushed into each) grows an unlimited
    victim by about what was pushed, a limited one by almost nothing; the limited one drops the flooder."""
    before, after, stats = _flooded(False, streams=1, push_bytes=256 << 20)
    grown_open = after["VmHWM"] - before["VmRSS"]
    assert stats.bytes_pushed >= 200 << 20 and grown_open >= 150 << 20, (stats, before, after)

    before, after, stats = _flooded(True, streams=STREAMS_PER_PEER, push_bytes=256 << 20)
    grown_limited = after["VmHWM"] - before["VmRSS"]
    assert grown_limited < 32 << 20, (stats, before, after)
    assert after["oversized"] == 1 and len(after["dropped"]) == 1, after  # the first stream's header, then dropped
    assert stats.streams_opened + stats.streams_failed == STREAMS_PER_PEER
    print(f"unlimited victim: +{grown_open / 2**20:.0f} MiB; limited: +{grown_limited / 2**20:.1f} MiB "
          f"({stats.bytes_pushed / 2**20:.0f} MiB pushed in vain)")
