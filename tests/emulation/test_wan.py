"""Emulated WAN links: links files, the delay line, and machines behind shaped, delayed, lossy links.

The links-file and delay-line tests run everywhere. The network tests need root
(namespaces) and measure what a user would: a UDP echo's round trip, a TCP bulk
transfer's rate at the receiver, the share of UDP datagrams lost. Each is bounded
in time, and every namespace and process is gone afterwards, whatever happened,
including when the process that owns the network is terminated.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from p2p_diloco.emulation import wan as wan_module
from p2p_diloco.emulation.delay_line import DelayLine
from p2p_diloco.emulation.links import Link, LinksError, read_links
from p2p_diloco.emulation.machines import namespaces_left
from p2p_diloco.emulation.wan import Wan, WanError, available

needs_root = pytest.mark.skipif(available() is not None, reason=f"WAN emulation tests: {available()}")

# Tools run on the machines: `python -c TOOLS <name> <args>`.
TOOLS = textwrap.dedent("""
    import json, socket, sys, time

    def echo(port):  # answers UDP datagrams for 30 s at most
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(port))); s.settimeout(30)
        while True:
            data, addr = s.recvfrom(2048); s.sendto(data, addr)

    def ping(host, port, count):  # round trips in ms, as JSON
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); rtts = []
        for k in range(int(count)):
            start = time.monotonic(); s.sendto(str(k).encode(), (host, int(port)))
            while s.recv(2048) != str(k).encode():
                pass
            rtts.append((time.monotonic() - start) * 1000); time.sleep(0.05)
        print(json.dumps(rtts))

    def sink(port):  # receives one TCP stream; its rate overall and after the first quarter (slow start)
        server = socket.create_server(("0.0.0.0", int(port))); server.settimeout(30)
        conn, _ = server.accept(); conn.settimeout(30); got, marks = 0, []
        while chunk := conn.recv(1 << 20):
            got += len(chunk); marks.append((time.monotonic(), got))
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        tq, nq = next(m for m in marks if m[1] >= n1 / 4)
        rate = lambda bytes_, seconds: bytes_ * 8e-6 / seconds
        print(json.dumps({"bytes": got, "mbit": rate(n1 - n0, t1 - t0), "steady_mbit": rate(n1 - nq, t1 - tq)}))

    def source(host, port, size):
        conn = socket.create_connection((host, int(port)), timeout=30); block = bytes(1 << 16); sent = 0
        while sent < int(size):
            conn.sendall(block); sent += len(block)
        conn.close()

    def connect(host, port):
        socket.create_connection((host, int(port)), timeout=2); print("connected")

    def count(port, idle):  # UDP datagrams received until `idle` s without one
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22); s.bind(("0.0.0.0", int(port)))
        s.settimeout(float(idle) + 20); got = 0
        try:
            while True:
                s.recv(2048); got += 1; s.settimeout(float(idle))
        except TimeoutError:
            print(got)

    def blast(host, port, count):  # `count` datagrams, paced well below every rate in the test
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for k in range(int(count)):
            s.sendto(b"x" * 100, (host, int(port)))
            if k % 50 == 49:
                time.sleep(0.005)

    globals()[sys.argv[1]](*sys.argv[2:])
""")


def tool(name: str, *args) -> list[str]:
    return [sys.executable, "-c", TOOLS, name, *map(str, args)]


def forwarder_alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) delay line."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return state != "Z" and b"delay_line" in f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def remove_namespaces(tag: str) -> None:
    """Kill what runs in, and delete, every namespace named `tag...` (for an owner that died without cleaning)."""
    for ns in namespaces_left(tag):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def wan():
    """`wan(links)`: a fresh Wan; afterwards checks that its namespaces and delay line are gone."""
    made: list[tuple[Wan, int | None]] = []

    def make(links: list[Link], **kwargs) -> Wan:
        w = Wan(links, **kwargs)
        made.append((w, w.forwarder.pid if w.forwarder else None))
        return w

    yield make
    for w, forwarder in made:
        w.close()
        assert not namespaces_left(w.tag), "a namespace was left behind"
        assert forwarder is None or not forwarder_alive(forwarder), "the delay line was left behind"


def start(w: Wan, i: int, argv: list[str]) -> subprocess.Popen:
    proc = w.popen(i, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # let a server bind
    return proc


def output(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        what = proc.args[proc.args.index(TOOLS) + 1:] if TOOLS in proc.args else proc.args
        pytest.fail(f"{what} did not finish in {timeout} s: {err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    return out


def round_trip_ms(w: Wan, i: int, j: int, count: int = 9) -> float:
    """Shortest round trip of a UDP echo from machine i to machine j: the delay line never delivers early, and a
    loaded machine only adds to a round trip (the forwarder is a user-space process)."""
    server = start(w, j, tool("echo", 7000))
    try:
        pinged = w.run(i, tool("ping", w.address(j), 7000, count), capture_output=True, text=True, timeout=30)
        assert pinged.returncode == 0, pinged.stderr
        return min(json.loads(pinged.stdout))
    finally:
        server.kill()
        server.wait()


# --- links files (no root needed) ---

GOOD = """
[default]
up_mbit = 100
down_mbit = 50
delay_ms = 25
[host]
up_mbit = 1000
down_mbit = 1000
delay_ms = 5
[[peer]]
up_mbit = 10
down_mbit = 10
delay_ms = 75
loss = 0.01
"""

PEER = "[[peer]]\nup_mbit = 10\ndown_mbit = 10\ndelay_ms = 75\n"


def write(tmp_path, text: str) -> str:
    path = tmp_path / "links.toml"
    path.write_text(text)
    return str(path)


def test_a_links_file_gives_the_host_the_listed_peers_and_the_default_for_the_rest(tmp_path):
    host, peers = read_links(write(tmp_path, GOOD), 3)
    assert host == Link(1000, 1000, 5)
    assert peers == [Link(10, 10, 75, 0.01), Link(100, 50, 25), Link(100, 50, 25)]
    host, peers = read_links(write(tmp_path, "[default]\nup_mbit = 5\ndown_mbit = 5\ndelay_ms = 0\n"), 2)
    assert host == peers[0] == peers[1] == Link(5, 5, 0)


@pytest.mark.parametrize("name,peers", [("links-mixed", 5), ("links-uniform-50mbit", 4), ("links-wan-150ms", 4)])
def test_the_shipped_links_files_are_valid(name, peers):
    host, links = read_links(os.path.join(os.path.dirname(__file__), "..", "..", "peers", f"{name}.toml"), peers)
    assert len(links) == peers


BAD = [  # (file, peers, key, reason)
    ("[default\n", 1, "", "not valid TOML"),
    (GOOD + "[extra]\nx = 1\n", 1, "extra", "unknown table"),
    (GOOD.replace("loss = 0.01", "jitter_ms = 3"), 1, "peer[0].jitter_ms", "unknown key"),
    (GOOD.replace("up_mbit = 1000", 'up_mbit = "fast"'), 1, "host.up_mbit", "must be a number"),
    (GOOD.replace("up_mbit = 1000", "up_mbit = true"), 1, "host.up_mbit", "must be a number"),
    (GOOD.replace("down_mbit = 50", "down_mbit = 0"), 1, "default.down_mbit", "positive rate"),
    (GOOD.replace("up_mbit = 10\n", "up_mbit = -10\n"), 1, "peer[0].up_mbit", "positive rate"),
    (GOOD.replace("delay_ms = 75", "delay_ms = -1"), 1, "peer[0].delay_ms", "delay >= 0"),
    (GOOD.replace("delay_ms = 75", "delay_ms = inf"), 1, "peer[0].delay_ms", "finite"),
    (GOOD.replace("loss = 0.01", "loss = 1.0"), 1, "peer[0].loss", "[0, 1)"),
    (GOOD.replace("loss = 0.01", "loss = -0.1"), 1, "peer[0].loss", "[0, 1)"),
    (GOOD.replace("delay_ms = 5\n", ""), 1, "host.delay_ms", "missing"),
    (GOOD + PEER + PEER, 2, "peer[2]", "3 [[peer]] entries but only 2 peers"),
    (GOOD + PEER.replace("down_mbit = 10", "down_mbit = 0"), 2, "peer[1].down_mbit", "positive rate"),
    ("[host]\nup_mbit = 1\ndown_mbit = 1\ndelay_ms = 1\n" + PEER, 3, "peer[1]", "no [default]"),
    (PEER, 1, "host", "no [host] table and no [default]"),
    ("peer = 3\n[default]\nup_mbit = 1\ndown_mbit = 1\ndelay_ms = 1\n", 1, "peer", "array of tables"),
]


@pytest.mark.parametrize("text,peers,key,reason", BAD, ids=[f"{key or 'toml'}:{reason}" for _, _, key, reason in BAD])
def test_a_bad_links_file_is_refused_naming_file_key_and_reason(tmp_path, text, peers, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(LinksError) as refused:
        read_links(path, peers)
    message = str(refused.value)
    assert message.startswith(f"{path}: {key}"), message
    assert reason in message, message


def test_a_missing_links_file_is_refused_naming_it(tmp_path):
    with pytest.raises(LinksError, match="nothing.toml: cannot read"):
        read_links(str(tmp_path / "nothing.toml"), 1)


# --- the delay line's schedule (no root needed) ---

def packet(src: str, dst: str, size: int = 100) -> bytes:
    header = bytes([0x45]) + bytes(11) + socket.inet_aton(src) + socket.inet_aton(dst)
    return header + bytes(size - len(header))


def test_the_delay_line_holds_each_packet_for_the_sum_of_both_delays_in_order():
    line = DelayLine({"10.0.0.1": 25, "10.0.0.2": 75}, {}, seed=0, max_bytes=1 << 20)
    first, second, back = packet("10.0.0.1", "10.0.0.2"), packet("10.0.0.1", "10.0.0.2", 200), packet(
        "10.0.0.2", "10.0.0.3")
    line.add(first, 0.0)
    line.add(second, 0.0)
    line.add(back, 0.01)  # 10.0.0.3 is not listed: adds nothing
    line.add(b"\x60" + bytes(40), 0.0)  # IPv6: not routed here, dropped
    assert line.wait(0.0) == pytest.approx(0.085)
    assert line.due(0.0849) == []
    assert line.due(0.085) == [back]
    assert line.due(0.1) == [first, second]
    assert line.wait(0.1) is None and line.held_bytes == 0


def test_the_delay_line_loses_the_configured_share_and_never_holds_more_than_its_limit():
    line = DelayLine({}, {"10.0.0.1": 0.05, "10.0.0.2": 0.05}, seed=1, max_bytes=1 << 30)
    for _ in range(20000):
        line.add(packet("10.0.0.1", "10.0.0.2"), 0.0)
    assert 0.0975 - 0.01 < line.dropped / 20000 < 0.0975 + 0.01  # 1 - 0.95**2, about 5 standard deviations
    full = DelayLine({"10.0.0.1": 10}, {}, seed=0, max_bytes=1000)
    for _ in range(15):
        full.add(packet("10.0.0.1", "10.0.0.2"), 0.0)
    assert full.held_bytes == 1000 and full.dropped == 5


# --- machines behind emulated links (root) ---

@needs_root
def test_a_round_trip_takes_twice_both_one_way_delays(wan):
    w = wan([Link(1000, 1000, 5), Link(100, 100, 25), Link(10, 10, 75)])
    for i, j in [(1, 2), (0, 1), (2, 0)]:
        expected = 2 * (w.links[i].delay_ms + w.links[j].delay_ms)
        measured = round_trip_ms(w, i, j)
        # never early; late by at most 10 % or 8 ms (scheduling of the forwarder and the tools on 2 loaded cores)
        assert 0.97 * expected <= measured <= expected + max(0.1 * expected, 8), (i, j, measured, expected)
    without_delay = wan([Link(100, 100, 0), Link(100, 100, 0)])
    assert without_delay.forwarder is None and round_trip_ms(without_delay, 0, 1) < 10


@needs_root
def test_a_bulk_transfer_gets_the_senders_uplink_or_the_receivers_downlink(wan):
    """Two transfers at once: 20 Mbit/s up with 50 ms each way (receiver faster), and 100 up into 10 down."""
    w = wan([Link(20, 100, 50), Link(100, 100, 50), Link(100, 100, 0), Link(100, 10, 0)])
    size = {1: 6_000_000, 3: 3_000_000}  # about 2.5 s at each rate
    sinks = {j: start(w, j, tool("sink", 7001)) for j in size}
    sources = [w.popen(i, tool("source", w.address(j), 7001, size[j])) for i, j in [(0, 1), (2, 3)]]
    for rate, j in [(20, 1), (10, 3)]:
        got = json.loads(output(sinks[j], timeout=60))
        print(f"to machine {j}: capped at {rate} Mbit/s, got {got['mbit']:.2f} overall, {got['steady_mbit']:.2f} "
              "after the first quarter")
        assert got["bytes"] == size[j] + (-size[j]) % (1 << 16)
        # headers (66 bytes a packet, MTU 2500-5000) take 1-3 % of the link
        assert 0.9 * rate <= got["steady_mbit"] <= 1.1 * rate, got
        assert got["mbit"] <= 1.1 * rate, got
        assert w.counters(j)["rx_bytes"] >= got["bytes"]
    for proc in sources:
        assert proc.wait(timeout=30) == 0
    assert w.counters(0)["tx_bytes"] >= size[1] and w.counters(2)["tx_bytes"] >= size[3]


@needs_root
def test_a_lossy_link_loses_its_share_of_datagrams(wan):
    w = wan([Link(100, 100, 0), Link(100, 100, 0, loss=0.05)], seed=7)
    counter = start(w, 1, tool("count", 7002, 1))
    w.run(0, tool("blast", w.address(1), 7002, 2000), timeout=30, check=True)
    received = int(output(counter, timeout=30))
    lost = 1 - received / 2000
    print(f"loss 0.05: {lost:.3f} of 2000 datagrams lost")
    assert 0.025 <= lost <= 0.08, lost


@needs_root
def test_a_machine_that_blocks_inbound_connections_can_still_open_its_own(wan):
    w = wan([Link(100, 100, 1), Link(100, 100, 1)])
    if shutil.which("iptables") is None:
        with pytest.raises(WanError, match="iptables is not installed"):
            w.block_inbound(1)
        pytest.skip("iptables is not installed: block_inbound refuses, as it should")
    w.block_inbound(1)
    for i, j, reached in [(0, 1, False), (1, 0, True)]:
        server = start(w, j, tool("sink", 7003))
        connected = w.run(i, tool("connect", w.address(j), 7003), capture_output=True, text=True, timeout=30)
        assert (connected.stdout.strip() == "connected") is reached, (i, j, connected.stderr[-500:])
        server.kill()
        server.wait()


@needs_root
def test_close_and_an_exception_inside_with_remove_everything(wan):
    w = wan([Link(10, 10, 5), Link(10, 10, 5)])
    w.popen(0, ["sleep", "60"])
    forwarder = w.forwarder.pid
    w.close()
    w.close()  # idempotent
    assert not namespaces_left(w.tag) and not w.pids() and not forwarder_alive(forwarder)
    with pytest.raises(RuntimeError, match="inside the block"):
        with Wan([Link(10, 10, 5)]) as other:
            tag, forwarder = other.tag, other.forwarder.pid
            other.popen(0, ["sleep", "60"])
            raise RuntimeError("a failure inside the block")
    assert not namespaces_left(tag) and not forwarder_alive(forwarder)


OWNER = textwrap.dedent("""
    import sys, time
    from p2p_diloco.emulation.links import Link
    from p2p_diloco.emulation.wan import Wan, exit_on_sigterm
    exit_on_sigterm()
    w = Wan([Link(10, 10, 5), Link(10, 10, 5)])
    w.popen(0, ["sleep", "60"])
    print(w.tag, w.forwarder.pid, flush=True)
    time.sleep(60)
""")


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_owner_that_is_terminated_leaves_nothing_and_a_killed_one_no_delay_line(sig):
    """SIGTERM: everything is removed. SIGKILL: nothing can run in the owner, but the delay line still exits
    (its input closes); the namespaces are left for whoever cleans up (this test)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    tag = None
    try:
        line = owner.stdout.readline().split()
        assert len(line) == 2, owner.stderr.read() if owner.poll() is not None else line
        tag, forwarder = line[0], int(line[1])
        assert namespaces_left(tag) and forwarder_alive(forwarder)
        owner.send_signal(sig)
        assert owner.wait(timeout=30) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 5
        while forwarder_alive(forwarder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not forwarder_alive(forwarder), "the delay line outlived its owner"
        if sig == signal.SIGTERM:
            assert not namespaces_left(tag), "a terminated owner left namespaces"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if tag:
            remove_namespaces(tag)
        assert not tag or not namespaces_left(tag)


@needs_root
def test_a_wan_that_cannot_be_built_says_what_failed_and_leaves_nothing(monkeypatch):
    monkeypatch.setattr(wan_module, "TUN", "a-name-too-long-for-linux")
    mine = f"{wan_module.PREFIX}{os.getpid()}"
    before = set(namespaces_left(mine))
    with pytest.raises(WanError, match=r"the delay line: `ip -n \S+ tuntap add dev a-name-too-long-for-linux"):
        Wan([Link(10, 10, 5)])
    assert set(namespaces_left(mine)) == before


@needs_root
def test_wan_refuses_bad_counts():
    for count in (0, 251):
        with pytest.raises(ValueError):
            Wan([Link(10, 10, 0)] * count)
