"""Separate "machines" on one Linux host: one network namespace each, wired to one switch.

`Machines(n)` creates n namespaces, each with its own loopback and one interface
`eth0` (address `10.77.0.{i+1}/24`), plugged into a bridge that lives in a
namespace of its own (the switch): every packet between two machines crosses
their interfaces, exactly as between hosts on a LAN, and nothing touches the
root namespace's interfaces, routes or firewall. Names are unique per instance
(`pd<pid><token>m<i>`), so runs in parallel do not collide.

Guarantee: `close()` (also on `with` exit, an exception, or the interpreter's
exit) kills every process still running in the namespaces and deletes them;
deleting a namespace removes its interfaces and firewall rules with it.
Needs root and iproute2 (`ip`); `available()` says why not when it cannot run.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import time

SUBNET = "10.77.0"


class MachinesError(RuntimeError):
    pass


def available() -> str | None:
    """None when namespaces can be made here; else the reason they cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (run as root, e.g. in CI)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MachinesError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


class Machines:
    """n machines on one switch; `popen(i, argv)` runs a program on machine i."""

    def __init__(self, count: int):
        if not 1 <= count <= 250:
            raise ValueError(f"between 1 and 250 machines, not {count}")
        reason = available()
        if reason:
            raise MachinesError(reason)
        self.count = count
        self.tag = f"pd{os.getpid()}{secrets.token_hex(2)}"
        self.switch = f"{self.tag}sw"
        self.names = [f"{self.tag}m{i}" for i in range(count)]
        self._created: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in [self.switch, *self.names]:
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            port = f"p{i}"
            _ip("link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns",
                self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def command(self, i: int, argv: list[str]) -> list[str]:
        """`argv` as run on machine i (`ip netns exec` execs it: the pid is the program's own)."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(i, argv), **kwargs)

    def run(self, i: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(i, argv), **kwargs)

    def block_inbound(self, i: int) -> None:
        """Machine i accepts no new inbound TCP connection (as behind a NAT or a firewall): its SYNs are dropped;
        connections it opens itself still work. Needs iptables (Debian package `iptables`)."""
        if shutil.which("iptables") is None:
            raise MachinesError("iptables is not installed (Debian: apt-get install iptables)")
        proc = self.run(i, ["iptables", "-A", "INPUT", "-i", "eth0", "-p", "tcp", "--syn", "-j", "DROP"],
                        capture_output=True, text=True)
        if proc.returncode != 0:
            raise MachinesError(f"iptables in {self.names[i]} failed: {proc.stderr.strip()}")

    def pids(self) -> set[int]:
        """Every process running in one of the machines."""
        return namespace_pids(self._created)

    def close(self) -> None:
        """Kill what runs in the machines, then delete every namespace (idempotent)."""
        remove_namespaces(self._created)
        atexit.unregister(self.close)

    def __enter__(self) -> "Machines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def namespace_pids(namespaces: list[str]) -> set[int]:
    """Every process running in one of `namespaces`."""
    found = set()
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        found |= {int(p) for p in out.split()}
    return found


def remove_namespaces(namespaces: list[str]) -> None:
    """SIGKILL everything running in `namespaces` (for up to 10 s), then delete them, last made first; empties
    the list (so a second call does nothing)."""
    deadline = time.monotonic() + 10
    while (pids := namespace_pids(namespaces)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for ns in reversed(namespaces):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    namespaces.clear()


def namespaces_left(tag_prefix: str = "pd") -> list[str]:
    """Namespaces named like ours that exist now (for tests that check the cleanup)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(tag_prefix)]
