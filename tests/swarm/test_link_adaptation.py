"""How a round adapts to the links: round trips read from the kernel (`ss -tin`), lanes, `--codec auto`."""

from __future__ import annotations

from p2p_diloco.swarm.butterfly import MAX_LANES, WINDOW_BYTES, lanes_for
from p2p_diloco.swarm.round_trips import parse_ss, peer_round_trip

SS = """0      0      10.78.0.1:40241  10.78.0.2:36513
\t bbr wscale:10,10 rto:504 rtt:301.5/2.1 ato:40 mss:12448 cwnd:40 bytes_sent:100000
0      0      10.78.0.1:40242  10.78.0.2:36514
\t bbr wscale:10,10 rto:504 rtt:310.25/2.1 mss:12448
0      0      [::ffff:10.78.0.1]:4001  [::ffff:10.78.0.3]:5000
\t cubic rtt:0.5/0.25 mss:1448
0      0      10.78.0.1:1  10.78.0.9:2
"""


def test_the_largest_rtt_per_remote_address_in_seconds():
    assert parse_ss(SS) == {"10.78.0.2": 0.31025, "10.78.0.3": 0.0005}
    assert parse_ss("") == {}
    assert parse_ss("garbage\n\trtt:5/1\n") == {}  # an RTT with no connection line before it


def test_a_peer_is_found_by_any_of_its_connection_addresses():
    rtts = parse_ss(SS)
    assert peer_round_trip(["/ip4/10.78.0.9/tcp/2", "/ip4/10.78.0.2/tcp/36513"], rtts) == 0.31025
    assert peer_round_trip(["/ip4/10.78.0.7/tcp/2"], rtts) is None
    assert peer_round_trip([], rtts) is None


def test_lanes_fill_the_round_trip_and_stay_within_bounds():
    assert lanes_for(100, 0.0003, 6e6) == 1  # a LAN: one stream keeps the chunks in order
    assert lanes_for(100, 0.3, 2e6) == -(-int(0.3 * 2e6) // WINDOW_BYTES)
    assert lanes_for(100, 10.0, 1e9) == MAX_LANES
    assert lanes_for(2, 0.3, 1e9) == 2  # never more lanes than chunks
    assert 1 <= lanes_for(100, None, 1e6) <= MAX_LANES  # unknown round trip: the default


def test_auto_codec_picks_the_most_precise_payload_that_fits_between_two_rounds():
    from p2p_diloco.swarm.butterfly import auto_codec

    mbit = 125_000.0  # bytes/s
    numel = 1_000_000  # fp16 2 MB, int8 ~1 MB, fp4 ~0.53 MB; twice that must fit in half the interval
    assert auto_codec([100 * mbit, 100 * mbit], [10.0, 10.0], numel) == "fp16"  # 4 MB at 12.5 MB/s: 0.32 s
    assert auto_codec([100 * mbit, 4 * mbit], [10.0, 10.0], numel) == "int8"  # the slowest member decides
    assert auto_codec([100 * mbit, 1 * mbit], [10.0, 10.0], numel) == "fp4"
    assert auto_codec([100 * mbit, 100 * mbit], [10.0, 0.05], numel) == "fp4"  # the quickest pace decides
    assert auto_codec([100 * mbit, 0.0], [10.0, 10.0], numel) == "fp4"  # unknown rate: the smallest payload
    assert auto_codec([100 * mbit, 100 * mbit], [0.0, 10.0], numel) == "fp4"  # unknown pace


def test_the_uplink_pacer_spaces_what_a_round_sends_at_its_rate_and_an_unknown_rate_is_not_paced():
    import asyncio

    from p2p_diloco.swarm.butterfly import UplinkPacer

    async def timed(pacer, sizes):
        loop = asyncio.get_event_loop()
        began = loop.time()
        await asyncio.gather(*(pacer.wait(n) for n in sizes))  # concurrent lanes share the one bucket
        return loop.time() - began

    # the first 50 KB go at once, each next one 50 ms after the one before
    assert 0.24 <= asyncio.run(timed(UplinkPacer(1_000_000.0), [50_000] * 6)) < 0.5
    assert asyncio.run(timed(UplinkPacer(0.0), [1 << 20] * 6)) < 0.05


def test_chunks_take_a_short_time_at_the_slowest_known_uplink_within_bounds():
    from p2p_diloco.core.codecs import get_codec
    from p2p_diloco.swarm.butterfly import CHUNK_BYTES, CHUNK_TIME_S, MIN_CHUNK_BYTES, _Group, chunk_spans

    def group(*mbit):
        n = len(mbit)
        return _Group(peers=[f"p{i}" for i in range(n)], me=0, weights=[1.0] * n, reducers=list(range(n)),
                      rates=[m * 125_000.0 for m in mbit], intervals=[0.0] * n)

    assert group(0, 0).chunk_bytes == CHUNK_BYTES  # nothing known (loopback): the largest chunks
    assert group(1000, 100).chunk_bytes == CHUNK_BYTES
    assert group(100, 10, 0).chunk_bytes == int(10 * 125_000 * CHUNK_TIME_S)  # an unknown rate is left out
    assert group(100, 0.5).chunk_bytes == MIN_CHUNK_BYTES
    for name in ("fp32", "fp4"):
        codec = get_codec(name)
        spans = chunk_spans(1_000_003, codec, 32 * 1024)
        assert spans[0][0] == 0 and spans[-1][1] == 1_000_003
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all((hi - lo) % codec.block_size == 0 for lo, hi in spans[:-1])
        assert max(codec.wire_size(hi - lo) for lo, hi in spans) <= 32 * 1024 + codec.wire_size(0)
        assert len(spans) > len(chunk_spans(1_000_003, codec))  # smaller than the default chunks
