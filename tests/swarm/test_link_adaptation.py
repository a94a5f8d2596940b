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
