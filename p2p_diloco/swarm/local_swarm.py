"""A whole swarm on this machine: a host and N trainers as separate processes on 127.0.0.1.

Every child runs in its own session and is killed with its whole process group
on exit, Ctrl-C or failure (hivemind's DHT, averagers and p2pd die with their
peer through PR_SET_PDEATHSIG), so nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from ..node.records import RunConfig

HOST_START_TIMEOUT = 60.0
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]  # a local swarm stays on this machine


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log_path: str


class LocalSwarm:
    def __init__(self, run: RunConfig, peers: int, steps: int, workdir: str | None = None,
                 data: list[str] | None = None, slow_peer_delay: float = 0.0, late_peer_after: float = 0.0):
        """`steps`: the global step every trainer stops at; the last trainer may be slowed
        (`slow_peer_delay` seconds of sleep per inner step) or join late (`late_peer_after` seconds)."""
        self.run, self.peers, self.steps, self.data = run, peers, steps, data or []
        self.slow_peer_delay, self.late_peer_after = slow_peer_delay, late_peer_after
        self.workdir = workdir or tempfile.mkdtemp(prefix="p2p-diloco-swarm-")
        self.children: list[_Child] = []
        self.progress: dict[int, dict] = {}

    def spawn(self, name: str, args: list[str], stdout=None, env: dict[str, str] | None = None) -> _Child:
        log_path = os.path.join(self.workdir, f"{name}.log")
        log = open(log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.Popen([sys.executable, "-m", "p2p_diloco.cli", *args], stdout=stdout or log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env, text=True)
        log.close()
        child = _Child(name, proc, log_path)
        self.children.append(child)
        return child

    def start_host(self) -> str:
        """Start the host; returns its first multiaddr once it is up."""
        config_path = os.path.join(self.workdir, "run_config.msgpack")
        with open(config_path, "wb") as f:
            f.write(self.run.encode())
        maddrs_path = os.path.join(self.workdir, "host.json")
        host = self.spawn("host", ["host", "--run-config", config_path, "--maddrs-file", maddrs_path, *LOOPBACK])
        deadline = time.monotonic() + HOST_START_TIMEOUT
        while not os.path.exists(maddrs_path):
            if host.proc.poll() is not None:
                raise RuntimeError(f"the host exited with code {host.proc.returncode}; see {host.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the host did not come up in {HOST_START_TIMEOUT:.0f}s; see {host.log_path}")
            time.sleep(0.2)
        with open(maddrs_path) as f:
            return json.load(f)["maddrs"][0]

    def start_trainer(self, name: str, maddr: str, wait_for: int, extra: list[str] | None = None,
                      env: dict[str, str] | None = None) -> tuple[_Child, str]:
        """Start one trainer that stops at global step `self.steps`; returns it and its summary's path.
        `env`: extra environment variables (e.g. a failpoint, see `p2p_diloco.node.failpoints`)."""
        summary = os.path.join(self.workdir, f"{name}.json")
        args = ["join", "--initial-peers", maddr, "--run-id", self.run.run_id, "--global-steps", str(self.steps),
                "--summary", summary, "--progress-json", "--threads", "1",
                "--wait-for-peers", str(wait_for), *LOOPBACK, *(extra or [])]
        for d in self.data:
            args += ["--data", d]
        return self.spawn(name, args, stdout=subprocess.PIPE, env=env), summary

    def _read_progress(self, index: int, child: _Child) -> None:
        for line in child.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "step" in record:
                self.progress[index] = record

    def run_all(self, timeout: float, show_progress: bool = True) -> dict:
        from tqdm import tqdm

        start = time.time()
        try:
            maddr = self.start_host()
            late = self.peers - 1 if self.late_peer_after > 0 else None
            trainers = []

            def spawn_trainer(i: int) -> None:
                extra = ["--step-delay", str(self.slow_peer_delay)] if i == self.peers - 1 and self.slow_peer_delay \
                    else []
                wait_for = self.peers if late is None else self.peers - 1
                child, summary = self.start_trainer(f"peer{i}", maddr, wait_for, extra)
                threading.Thread(target=self._read_progress, args=(i, child), daemon=True).start()
                trainers.append((child, summary))

            for i in range(self.peers):
                if i != late:
                    spawn_trainer(i)
            late_at = time.monotonic() + self.late_peer_after
            bars = [tqdm(total=self.steps, desc=f"peer{i}", position=i, unit="step", disable=not show_progress,
                         mininterval=0.5) for i in range(self.peers)]
            deadline = time.monotonic() + timeout
            try:
                while any(c.proc.poll() is None for c, _ in trainers) or (late is not None and late_at is not None):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the swarm did not finish in {timeout:.0f}s; logs in {self.workdir}")
                    if late is not None and late_at is not None and time.monotonic() >= late_at:
                        spawn_trainer(late)
                        late_at = None
                    for i, bar in enumerate(bars):
                        p = self.progress.get(i)
                        if p:
                            bar.n = p["global_step"]
                            bar.set_postfix_str(f"inner {p['step']} rounds {'/'.join(map(str, p['rounds']))} "
                                                f"(failed {p.get('failed', 0)}) "
                                                f"loss {p['loss']:.3f} {p['tokens_per_s']:.0f} tok/s "
                                                f"sent {p['bytes_sent'] / 1e6:.2f} MB", refresh=False)
                            bar.refresh()
                    time.sleep(0.5)
            finally:
                for bar in bars:
                    bar.close()
            peers, failures, problems = [], [], []
            for child, summary in trainers:
                if not os.path.exists(summary):  # it crashed: no summary at all
                    failures.append(f"{child.name} exited with code {child.proc.returncode}; see {child.log_path}")
                    continue
                with open(summary) as f:
                    peers.append(json.load(f))
                if peers[-1].get("problem"):  # it finished, but averaged nothing: `join` exited non-zero
                    problems.append(f"{child.name}: {peers[-1]['problem']}")
            if failures:
                raise RuntimeError("; ".join(failures))
            hashes = [tuple(p["anchor_sha256"]) for p in peers]
            return {"consensus": len(set(hashes)) == 1, "wall_s": round(time.time() - start, 2),
                    "workdir": self.workdir, "problems": problems, "peers": peers}
        finally:
            self.stop()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL whatever is left, p2pd daemons included."""
        family = {pid for c in self.children for pid in _descendants(c.proc.pid)}
        for c in self.children:
            if c.proc.poll() is None:
                _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.children:
            _signal_group(c.proc, signal.SIGKILL)  # the group may hold orphans even if the leader exited
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while family and time.monotonic() < deadline:  # orphans are reaped by init shortly after
            family = {pid for pid in family if os.path.exists(f"/proc/{pid}")}
            time.sleep(0.1)


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc), found before anything is killed."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
