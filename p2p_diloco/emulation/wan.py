"""Machines on a wide-area network: each with its own last-mile link (rates, delay, loss) to one router.

`Wan(links)` creates one network namespace per machine and one for the router.
Machine i has one interface `eth0` (address `10.78.0.{i+1}`), a veth whose other
end is the router's port `p{i}`; nothing touches the root namespace's interfaces,
routes or firewall. A packet from machine i to machine j crosses

  1. i's uplink: a token bucket (`tbf`) on i's `eth0` at `links[i].up_mbit`;
  2. the delay line (this kernel has no `netem`): in the router, policy routing
     (`ip rule iif p{i} lookup 100`) sends every packet that came in on a port
     into the TUN device `dl0`, where `delay_line.py` holds it for
     `delay_ms[i] + delay_ms[j]` (and loses it with i's and j's loss rates)
     before writing it back; the main table then routes it to port `p{j}`;
  3. j's downlink: a token bucket on the router's `p{j}` at `links[j].down_mbit`.

So a ping between i and j takes `2 * (delay_ms[i] + delay_ms[j])` plus
transmission time (see `links.py` for what a link means). Without any delay or
loss the delay line is left out. Each machine's MTU follows its slower rate (a
packet takes about 2 ms to send, between 1500 and 65000 bytes), so that slow
links see ordinary packets and fast ones stay within what a user-space
forwarder moves (about 500 full packets per second per link below 1 Gbit/s).
Each token bucket queues one round trip to the farthest machine plus 100 ms at
its rate, like a home router's buffer. The namespaces keep the kernel's TCP
defaults (congestion control and buffers as in the root namespace): one TCP
flow then moves at most its send buffer (4 MB here) per round trip, e.g. about
540 Mbit/s measured at 1 Gbit/s and a 40 ms ping, as between real hosts. There
is no default route, only the 10.78.0.0/24 network.

Guarantee: `close()` (also on `with` exit, an exception in the constructor, or
the interpreter's exit) kills every process in every namespace, the delay line
included, and deletes the namespaces. SIGTERM ends a Python process without
running exit handlers: call `exit_on_sigterm()` (or turn SIGTERM into
`sys.exit` yourself) so that a terminated owner still cleans up. If the owner is
killed outright (SIGKILL) the delay line exits by itself (its standard input
closes), but the namespaces remain: `machines.namespaces_left(tag)` lists them.
Names are unique per instance (`pw<pid><hex>r`, `pw<pid><hex>m<i>`).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys

from p2p_diloco.emulation import machines
from p2p_diloco.emulation.links import Link

PREFIX = "pw"
SUBNET = "10.78.0"
ROUTER_ADDRESS = f"{SUBNET}.254"
TUN = "dl0"
TABLE = "100"
MIN_MTU, MAX_MTU = 1500, 65000
PACKET_TIME_S = 0.002  # a machine's MTU: about this long to send at its slower rate
QUEUE_S = 0.1  # each token bucket queues a round trip to the farthest machine plus this much


class WanError(machines.MachinesError):
    """The emulated network could not be built or used; the message names what failed."""


def available() -> str | None:
    """None when a Wan can be made here; else the reason it cannot."""
    reason = machines.available()
    if reason:
        return reason
    if shutil.which("tc") is None:
        return "iproute2's `tc` is not installed"
    if shutil.which("sysctl") is None:
        return "`sysctl` is not installed (Debian package procps)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (the delay line needs TUN devices)"
    return None


def exit_on_sigterm() -> None:
    """Make SIGTERM exit this process through `sys.exit(143)`, so that `with` blocks and exit handlers run
    (a Wan's `close()` among them). Call it from the main thread."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def mtu(link: Link) -> int:
    """The MTU of a machine with this link: one packet takes about PACKET_TIME_S at its slower rate."""
    size = int(min(link.up_mbit, link.down_mbit) * 1e6 / 8 * PACKET_TIME_S)
    return max(MIN_MTU, min(MAX_MTU, size))


def token_bucket(rate_mbit: float, packet: int, round_trip_s: float) -> list[str]:
    """`tc` arguments of a tbf at `rate_mbit`: a bucket of two packets or 2 ms of sending, whichever is larger
    (so the rate holds within a few percent from the first second), and a queue of `round_trip_s + QUEUE_S`
    at that rate (enough for one TCP flow to keep the link busy; a full queue adds that much delay)."""
    rate = rate_mbit * 1e6 / 8
    burst = max(2 * (packet + 64), int(rate * PACKET_TIME_S))
    limit = max(4 * burst, int(rate * (round_trip_s + QUEUE_S)))
    return ["tbf", "rate", f"{max(1, round(rate_mbit * 1e6))}bit", "burst", str(burst), "limit", str(limit)]


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WanError(f"{what}: `{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


class Wan:
    """len(links) machines, machine i behind `links[i]`; `popen(i, argv)` runs a program on machine i."""

    def __init__(self, links: list[Link], seed: int = 0):
        """Build the network (about 0.05 s a machine); `seed` seeds the delay line's losses. Raises WanError,
        naming the step that failed, with nothing left behind."""
        if not 1 <= len(links) <= 250:
            raise ValueError(f"between 1 and 250 machines, not {len(links)}")
        reason = available()
        if reason:
            raise WanError(reason)
        self.links = list(links)
        self.seed = seed
        self.tag = f"{PREFIX}{os.getpid()}{secrets.token_hex(2)}"
        self.router = f"{self.tag}r"
        self.names = [f"{self.tag}m{i}" for i in range(len(links))]
        self.forwarder: subprocess.Popen | None = None
        self.homes: dict[int, str] = {}  # machine -> the namespace behind its NAT, where its programs run
        self._created: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @property
    def delayed(self) -> bool:
        """Whether packets pass through the delay line (some link has a delay or a loss)."""
        return any(link.delay_ms > 0 or link.loss > 0 for link in self.links)

    def _build(self) -> None:
        self._namespace(self.router, {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                                      "net.ipv4.conf.default.rp_filter": 0, "net.ipv4.conf.all.send_redirects": 0,
                                      "net.ipv4.conf.default.send_redirects": 0})
        for i in range(len(self.links)):
            self._namespace(self.names[i], {})
            self._wire(i)
            if self.links[i].nat:
                self._home(i)
        if self.delayed:
            self._delay_line()

    def _namespace(self, ns: str, sysctls: dict[str, int]) -> None:
        _run(["ip", "netns", "add", ns], f"creating namespace {ns}")
        self._created.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"], f"loopback of {ns}")
        if os.path.isdir("/proc/sys/net/ipv6"):  # no IPv6 chatter in the counters
            sysctls = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1, **sysctls}
        settings = [f"{key}={value}" for key, value in sysctls.items()]
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings], f"settings of {ns}")

    def _wire(self, i: int) -> None:
        """Machine i's veth to the router, its addresses and routes, and the token buckets of both directions."""
        ns, port, link, size = self.names[i], f"p{i}", self.links[i], mtu(self.links[i])
        what = f"the link of machine {i}"
        _run(["ip", "link", "add", "name", "eth0", "mtu", str(size), "netns", ns, "type", "veth",
              "peer", "name", port, "mtu", str(size), "netns", self.router], what)
        _run(["ip", "-n", ns, "addr", "add", self.address(i), "peer", ROUTER_ADDRESS, "dev", "eth0"], what)
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"], what)
        _run(["ip", "-n", ns, "route", "add", f"{SUBNET}.0/24", "via", ROUTER_ADDRESS, "dev", "eth0"], what)
        _run(["ip", "-n", self.router, "addr", "add", f"{ROUTER_ADDRESS}/32", "dev", port], what)
        _run(["ip", "-n", self.router, "link", "set", port, "up"], what)
        _run(["ip", "-n", self.router, "route", "add", f"{self.address(i)}/32", "dev", port], what)
        round_trip = 2 * (link.delay_ms + max(other.delay_ms for other in self.links)) / 1000
        _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root",
              *token_bucket(link.up_mbit, size, round_trip)], f"uplink of machine {i}")
        _run(["tc", "-n", self.router, "qdisc", "add", "dev", port, "root",
              *token_bucket(link.down_mbit, size, round_trip)], f"downlink of machine {i}")

    def _home(self, i: int) -> None:
        """Machine i becomes a home router: its programs run in a namespace behind it on a private network
        (192.168.x.2), and it masquerades their connections out of eth0 (iptables NAT), forwarding nothing in:
        they can connect to anyone, nobody can connect to them."""
        if shutil.which("iptables") is None:
            raise WanError("a links file with nat = true needs iptables (Debian: apt-get install iptables)")
        ns, home, size, what = self.names[i], f"{self.tag}h{i}", mtu(self.links[i]), f"the NAT of machine {i}"
        self._namespace(home, {})
        self.homes[i] = home
        _run(["ip", "link", "add", "name", "eth0", "mtu", str(size), "netns", home, "type", "veth",
              "peer", "name", "lan0", "mtu", str(size), "netns", ns], what)
        _run(["ip", "-n", ns, "addr", "add", f"{self._lan(i)}.1/24", "dev", "lan0"], what)
        _run(["ip", "-n", ns, "link", "set", "lan0", "up"], what)
        _run(["ip", "-n", home, "addr", "add", f"{self.local_address(i)}/24", "dev", "eth0"], what)
        _run(["ip", "-n", home, "link", "set", "eth0", "up"], what)
        _run(["ip", "-n", home, "route", "add", "default", "via", f"{self._lan(i)}.1"], what)
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], what)
        _run(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j",
              "MASQUERADE"], what)

    @staticmethod
    def _lan(i: int) -> str:
        return f"192.168.{i % 250}"

    def local_address(self, i: int) -> str:
        """The address machine i's programs have: its own, or the private one behind its NAT."""
        return f"{self._lan(i)}.2" if i in self.homes else self.address(i)

    def _delay_line(self) -> None:
        """The TUN device, the policy routes through it, and the forwarder attached to it (waits until ready)."""
        r, what = self.router, "the delay line"
        _run(["ip", "-n", r, "tuntap", "add", "dev", TUN, "mode", "tun"], what)
        _run(["ip", "-n", r, "link", "set", TUN, "mtu", str(MAX_MTU), "txqueuelen", "10000", "up"], what)
        _run(["ip", "-n", r, "route", "add", "default", "dev", TUN, "table", TABLE], what)
        for i in range(len(self.links)):
            _run(["ip", "-n", r, "rule", "add", "iif", f"p{i}", "lookup", TABLE, "pref", "100"], what)
        delays = {self.address(i): link.delay_ms for i, link in enumerate(self.links)}
        loss = {self.address(i): link.loss for i, link in enumerate(self.links) if link.loss}
        argv = [sys.executable, "-m", "p2p_diloco.emulation.delay_line", "--tun", TUN, "--delays",
                json.dumps(delays), "--loss", json.dumps(loss), "--seed", str(self.seed)]
        self.forwarder = subprocess.Popen(["ip", "netns", "exec", r, *argv], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._await_ready(self.forwarder, timeout=30)

    @staticmethod
    def _await_ready(proc: subprocess.Popen, timeout: float) -> None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            if proc.poll() is None:
                proc.kill()
            rest = line + proc.stdout.read()
            raise WanError(f"the delay line did not start: {rest.decode(errors='replace').strip() or 'no output'}")

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def command(self, i: int, argv: list[str]) -> list[str]:
        """`argv` as run on machine i, behind its NAT if it has one (`ip netns exec` execs it: the pid is the
        program's own)."""
        return ["ip", "netns", "exec", self.homes.get(i, self.names[i]), *argv]

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(i, argv), **kwargs)

    def run(self, i: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(i, argv), **kwargs)

    def counters(self, i: int) -> dict[str, int]:
        """Bytes machine i has sent (`tx_bytes`) and received (`rx_bytes`) on its eth0, link-layer headers
        included, since it was created."""
        out = _run(["ip", "-n", self.names[i], "-s", "-j", "link", "show", "eth0"], f"counters of machine {i}")
        stats = json.loads(out)[0]["stats64"]
        return {"tx_bytes": stats["tx"]["bytes"], "rx_bytes": stats["rx"]["bytes"]}

    def block_inbound(self, i: int) -> None:
        """Machine i accepts no new inbound TCP connection (as behind a NAT or a firewall): its SYNs are dropped;
        connections it opens itself still work. Needs iptables (Debian package `iptables`)."""
        if shutil.which("iptables") is None:
            raise WanError("iptables is not installed (Debian: apt-get install iptables)")
        _run(self.command(i, ["iptables", "-A", "INPUT", "-i", "eth0", "-p", "tcp", "--syn", "-j", "DROP"]),
             f"blocking inbound connections of machine {i}")

    def pids(self) -> set[int]:
        """Every process running in one of the namespaces (the machines, the router, the homes behind NATs)."""
        return machines.namespace_pids(self._created)

    def close(self) -> None:
        """Kill what runs in the namespaces (the delay line too), then delete them (idempotent)."""
        if self.forwarder is not None:
            self.forwarder.kill()
            self.forwarder.wait()
            for pipe in (self.forwarder.stdin, self.forwarder.stdout):
                pipe.close()
            self.forwarder = None
        machines.remove_namespaces(self._created)
        atexit.unregister(self.close)

    def __enter__(self) -> "Wan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
