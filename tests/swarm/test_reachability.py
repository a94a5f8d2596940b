"""Addresses a peer listens on and announces, the dial-back that finds unreachable peers, and the watch that
says when a peer's rounds keep failing: units, plus one real dial-back on loopback."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys

import pytest
from hivemind.utils.multiaddr import Multiaddr

from p2p_diloco.core.round_stats import RoundStats
from p2p_diloco.node.records import PeerProgress, RecordError
from p2p_diloco.swarm import reachability
from p2p_diloco.swarm.addresses import (AddressError, likeliest_first, listen_and_announce, local_addresses, port_of,
                                        rank, rank_of)
from p2p_diloco.swarm.dht import start_dht, visible_maddrs
from p2p_diloco.swarm.reachability import Reachability, _answer, _targets
from p2p_diloco.swarm.round_health import STREAK_PERIODS, RoundHealth

ip = ipaddress.ip_address


def test_rank_puts_public_before_private_before_link_local_before_loopback():
    assert rank(ip("8.8.8.8")) == 0 and rank(ip("2606:4700::1111")) == 0
    assert rank(ip("10.1.2.3")) == rank(ip("192.168.1.5")) == rank(ip("100.64.0.1")) == rank(ip("fd00::2")) == 1
    assert rank(ip("169.254.1.1")) == rank(ip("fe80::1")) == 2
    assert rank(ip("127.0.0.1")) == rank(ip("::1")) == rank(ip("0.0.0.0")) == 3
    assert rank_of("/dns4/example.org/tcp/1") == 4 and rank_of("garbage") == 4
    ordered = likeliest_first(["/ip4/127.0.0.1/tcp/1", "/ip4/10.0.0.1/tcp/1", "/ip4/1.1.1.1/tcp/1"])
    assert ordered == ["/ip4/1.1.1.1/tcp/1", "/ip4/10.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/1"]
    assert port_of("/ip4/1.1.1.1/tcp/31337/p2p/12D3KooWJ3fu48MsUqonehgdQgKgWi96Dz94fPgo183WP2Ay8phj") == 31337


def test_listen_on_every_interface_and_announce_what_others_can_use():
    listen, announce = listen_and_announce(0, [], ipv6=False)
    port = int(Multiaddr(listen[0])["tcp"])
    assert listen == [f"/ip4/0.0.0.0/tcp/{port}"] and port > 0  # a real port: announcements need it
    ours = {a for a in local_addresses() if a.version == 4}
    assert ours, "this machine has no IPv4 address at all"
    announced = [ip(Multiaddr(a)["ip4"]) for a in announce]
    assert set(announced) <= ours and all(int(Multiaddr(a)["tcp"]) == port for a in announce)
    if any(rank(a) <= 1 for a in ours):  # loopback only when nothing else is there
        assert all(rank(a) <= 1 for a in announced)
    listen, announce = listen_and_announce(31337, ["/ip4/203.0.113.5/tcp/4000"], ipv6=True)
    assert listen == ["/ip4/0.0.0.0/tcp/31337", "/ip6/::/tcp/31337"]
    assert announce[0] == "/ip4/203.0.113.5/tcp/4000"  # the user's own first
    with pytest.raises(AddressError):
        listen_and_announce(70000, [])
    with socket.socket() as taken:  # a port in use (another host on this machine): said before p2pd starts
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        with pytest.raises(AddressError, match="pick another with --port"):
            listen_and_announce(taken.getsockname()[1], [], ipv6=False)


def test_dial_back_dials_only_the_address_the_request_came_from():
    observed = Multiaddr("/ip4/198.51.100.7/tcp/5555")
    ip_, targets = _targets(observed, ["/ip4/10.0.0.2/tcp/4001", "/ip4/198.51.100.7/tcp/4002",
                                       "/ip4/8.8.8.8/tcp/53", "/dns4/example.org/tcp/80", "not an address"])
    assert ip_ == "198.51.100.7"
    # the announced one on the observed IP, and the observed IP on every announced port: never 10.0.0.2 or 8.8.8.8
    assert targets == [("198.51.100.7", 4002), ("198.51.100.7", 4001), ("198.51.100.7", 53),
                       ("198.51.100.7", 80)]
    _, many = _targets(observed, [f"/ip4/1.2.3.4/tcp/{p}" for p in range(1000, 1100)])
    assert len(many) == reachability.MAX_DIALS
    for bad in (None, "x", [1, 2]):
        with pytest.raises(ValueError):
            _targets(observed, bad)
    with pytest.raises(ValueError):
        _targets(Multiaddr("/p2p/12D3KooWJ3fu48MsUqonehgdQgKgWi96Dz94fPgo183WP2Ay8phj"), [])


def test_dial_back_answers_are_validated():
    assert _answer("p", {"accepted": ["1.2.3.4:5"], "refused": [], "observed_ip": "1.2.3.4"}).reachable is True
    no = _answer("p", {"accepted": [], "refused": ["1.2.3.4:5"], "observed_ip": "1.2.3.4"})
    assert no.reachable is False and "could not open a connection" in no.describe() and "1.2.3.4:5" in no.describe()
    for bad in ({"accepted": "x", "refused": []}, {"refused": []}, {"accepted": [], "refused": []}, [1], None):
        with pytest.raises(ValueError):
            _answer("p", bad)
    assert "could not check" in Reachability(None, error="boom").describe()


def test_a_real_dial_back_on_loopback():
    """A host-like DHT node serves dial-backs; a peer listening on a port reaches it, one whose port is closed not."""
    server = start_dht()
    try:
        initial = visible_maddrs(server)
        found = reachability.check(initial, ["/ip4/127.0.0.1/tcp/0"], [])
        assert found.reachable is True and found.accepted, found
        # announce a port nobody listens on: the dial-back fails there
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        found = reachability.check(initial, ["/ip4/127.0.0.1/tcp/0"], [f"/ip4/127.0.0.1/tcp/{closed}"])
        assert f"127.0.0.1:{closed}" in found.refused
        # nobody to ask: unknown, not unreachable
        assert reachability.check([], ["/ip4/127.0.0.1/tcp/0"], []).reachable is None
    finally:
        server.shutdown()


def _stats(fragments: int) -> RoundStats:
    n = fragments
    return RoundStats([0] * n, [0] * n, [0] * n, [0] * n, [0] * n, [0] * n)


def test_round_health_says_once_when_every_fragment_keeps_failing_while_others_train():
    stats, health = _stats(3), RoundHealth(3)
    health.observe_swarm(live_others=2, reachable_others=2, others_averaged=0)
    for _ in range(STREAK_PERIODS * 3 - 1):
        stats.failed[0] += 1
        stats.not_averaged("Averaging step failed: could not find a group")
        assert health.check(stats) is None
    stats.not_averaged("Averaging step failed: could not find a group")
    stats.failed[0] += 1
    line = health.check(stats)
    assert line and "no group formed" in line and "2 other peer(s)" in line
    stats.not_averaged("x")
    assert health.check(stats) is None  # said once per streak
    verdict = health.verdict(stats)
    assert verdict and "averaged no round" in verdict
    stats.applied[1] += 1  # one averaged round: the peer was of use
    assert health.verdict(stats) is None


def test_round_health_no_verdict_for_a_peer_alone_or_one_that_only_downloads_is_flagged():
    stats, health = _stats(2), RoundHealth(2)
    stats.failed[0] += 5
    stats.not_averaged("could not find a group")
    assert health.verdict(stats) is None  # nobody else was there: nothing to average with
    stats, health = _stats(2), RoundHealth(2, client_mode=True)
    health.observe_swarm(live_others=1, reachable_others=0, others_averaged=0)
    stats.applied[0] += 2
    stats.recovered[0] += 2  # only downloaded the others' state
    stats.not_averaged("could not find a group")
    verdict = health.verdict(stats)
    assert verdict and "every other live peer are in client mode" in verdict and "2 only downloaded" in verdict


def test_progress_records_carry_reachability():
    record = PeerProgress("peer", 3, [1, 2], reachable=False)
    assert PeerProgress.decode(record.encode()).reachable is False
    import msgpack
    raw = msgpack.unpackb(record.encode())
    raw["reachable"] = "no"
    with pytest.raises(RecordError, match="reachable"):
        PeerProgress.decode(msgpack.packb(raw))
    del raw["reachable"]  # a peer of an earlier release: assumed reachable
    assert PeerProgress.decode(msgpack.packb(raw)).reachable is True


@pytest.mark.parametrize("args, message", [
    (["--announce-maddrs", "garbage"], "--announce-maddrs 'garbage' is not a multiaddr"),
    (["--announce-maddrs", "/ip4/1.2.3.4/tcp/0"], "name the real port"),
    (["--host-maddrs", "nope"], "--host-maddrs 'nope' is not a multiaddr"),
    (["--port", "70000"], "70000"),
])
def test_bad_network_flags_are_refused_before_anything_starts(args, message):
    proc = subprocess.run([sys.executable, "-m", "p2p_diloco.cli", "join", "--initial-peers",
                           "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJ3fu48MsUqonehgdQgKgWi96Dz94fPgo183WP2Ay8phj", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
