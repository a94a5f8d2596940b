"""`swarm.inbound`: the limits on what other peers make this one read. The accounting on a fake clock; then a
real libp2p victim (its own process, its memory read from /proc) flooded by `flooding`'s attacker with and
without the limits: without them it buffers what is pushed, with them it reads 8 bytes a stream and drops the
flooder; and real averager processes that average on through a flood."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from hivemind.proto import dht_pb2

from processes import p2pd_pids

from p2p_diloco.core.averaging import RoundKey
from p2p_diloco.swarm.averager import CodecAverager, SwarmAverager
from p2p_diloco.swarm.flooding import Flooder, flood_victim
from p2p_diloco.swarm.inbound import (DROP_AFTER, DROP_S, MAX_MESSAGE_BYTES, NODE_ID_TTL_S, NODE_IDS_PER_PEER,
                                      REQUEST_BURST, REQUEST_RATE, REQUESTS_IN_FLIGHT, STREAM_BURST, STREAM_RATE,
                                      STREAMS_PER_PEER, Inbound, OversizedMessage, dht_node_id)


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


def test_a_peer_may_claim_a_few_dht_node_ids_not_one_per_request():
    clock = Clock()
    guard = Inbound(clock)
    for i in range(NODE_IDS_PER_PEER):
        assert guard.start_request("a", bytes([i]) * 20) is None
    assert "DHT node ids" in guard.start_request("a", b"\xff" * 20)
    assert guard.start_request("a", b"\x00" * 20) is None and guard.start_request("a") is None
    assert guard.start_request("b", b"\xff" * 20) is None
    clock.now += NODE_ID_TTL_S + 1  # a restarted peer's old node ids are forgotten
    assert guard.start_request("a", b"\xff" * 20) is None
    ping = dht_pb2.PingRequest(peer=dht_pb2.NodeInfo(node_id=b"\x07" * 20)).SerializeToString()
    assert dht_node_id("DHTProtocol.rpc_ping", ping) == b"\x07" * 20
    assert dht_node_id("DHTProtocol.rpc_ping", b"\xff\xff") == b"" and dht_node_id("other", ping) == b""


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


def test_a_flood_of_oversized_messages_leaves_a_limited_victim_s_memory_bounded():
    """Measured: the same flood (streams declaring 2**40-byte messages, junk pushed into each) grows an unlimited
    victim by about what was pushed, a limited one by almost nothing; the limited one drops the flooder."""
    daemons = p2pd_pids()
    before, after, stats = flood_victim(False, streams=1, push_bytes=256 << 20)
    grown_open = after["VmHWM"] - before["VmRSS"]
    assert stats.bytes_pushed >= 200 << 20 and grown_open >= 150 << 20, (stats, before, after)

    before, after, stats = flood_victim(True, streams=STREAMS_PER_PEER, push_bytes=256 << 20)
    grown_limited = after["VmHWM"] - before["VmRSS"]
    assert grown_limited < 32 << 20, (stats, before, after)
    assert after["oversized"] == 1 and len(after["dropped"]) == 1, after  # the first stream's header, then dropped
    assert stats.streams_opened + stats.streams_failed == STREAMS_PER_PEER
    assert p2pd_pids() <= daemons, "p2pd left behind"
    print(f"unlimited victim: +{grown_open / 2**20:.0f} MiB; limited: +{grown_limited / 2**20:.1f} MiB "
          f"({stats.bytes_pushed / 2**20:.0f} MiB pushed in vain)")


def _peak(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


from test_audit import _round  # noqa: E402  (one round of every averager at once)


def test_flooded_averagers_drop_the_flooder_and_average_on_with_their_memory_flat(dhts, tmp_path):
    """Two peers' real averager processes average round after round while a third peer, running `flooding`'s
    attacker, floods both (streams declaring 2**40-byte messages, junk pushed into them, DHT pings each under a
    new node id): each averager drops it at its first header, each DHT node answers its first few node ids only,
    every round succeeds, and no averager process grows by more than a few MiB."""
    a, b, c = dhts(3)
    logged = logging.FileHandler(tmp_path / "inbound.log")  # (the averager processes fork with it)
    logging.getLogger("p2p_diloco.swarm.inbound").addHandler(logged)
    avs = [SwarmAverager(d, "run1", [4000], "fp4", round_timeout=20, target_group_size=2, min_matchmaking_time=2,
                         search_timeout=10) for d in (a, b)]
    handlers = [CodecAverager._get_handle_name("run1_f0", m) for m in ("rpc_codec_part", "rpc_join_group")]
    flooder = Flooder(c, lambda: {str(a.peer_id): handlers, str(b.peer_id): handlers})
    try:
        xs = [torch.randn(4000) for _ in avs]
        outcomes = _round(avs, RoundKey("run1", 0, 1), xs)  # (warms the averagers up)
        assert all(not isinstance(o, Exception) for o in outcomes), outcomes
        pids = [av.averagers[0].pid for av in avs]
        before = [_peak(pid) for pid in pids]
        flooder.start()
        time.sleep(2)
        for r in range(2, 10):
            outcomes = _round(avs, RoundKey("run1", 0, r), xs)
            assert all(not isinstance(o, Exception) and o.peers == 2 for o in outcomes), (r, outcomes)
        stats = flooder.stop()
        grown = [_peak(pid) - b for pid, b in zip(pids, before)]
        # its pings, each under a new DHT node id, are answered for its first few node ids only
        assert stats["streams_opened"] >= 50 and stats["pings"] + stats["pings_refused"] >= 50, stats
        assert stats["pings_refused"] >= stats["pings"], stats
        assert max(grown) < 16 << 20, (grown, stats)
        drops = (tmp_path / "inbound.log").read_text().count(f"dropping peer {c.peer_id} for")
        assert drops == 2, drops  # once in each averager's process
        deadline = time.monotonic() + 10  # ...and the trainer's side hears of it (it leaves it out of the live)
        while str(c.peer_id) not in avs[0].flooders() or str(c.peer_id) not in avs[1].flooders():
            assert time.monotonic() < deadline, (avs[0].flooders(), avs[1].flooders())
            time.sleep(0.2)
    finally:
        logging.getLogger("p2p_diloco.swarm.inbound").removeHandler(logged)
        flooder.stop()
        for av in avs:
            av.shutdown()
