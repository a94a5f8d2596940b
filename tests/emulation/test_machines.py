"""Peers on separate "machines": one network namespace each (root only), started as a user would.

The host runs with its default network flags and prints a join command; each
trainer runs that command exactly as printed (plus `--global-steps` and
`--summary`, which say how long to train and where to write the result). One
trainer may have its inbound connections blocked by a firewall rule, as behind a
NAT. Every namespace, process and p2pd is gone afterwards, whatever happened.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest

from p2p_diloco.emulation.machines import Machines, available, namespaces_left

from processes import p2pd_pids

pytestmark = pytest.mark.skipif(available() is not None, reason=f"namespace tests: {available()}")

CLI = [sys.executable, "-m", "p2p_diloco.cli"]
GLOBAL_STEPS = 200
# the run (not the network): a model small enough for 2 cores, an outer period long enough that matchmaking
# (about 3 s) fits well inside one period at this speed
RUN = ["--model", "tiny", "--fragments", "2", "-H", "50", "--total-steps", str(GLOBAL_STEPS), "--round-timeout", "10"]
# these "machines" share this machine's 2 cores: each trainer takes one torch thread (with torch's default of one
# per core, three trainers spent 81 s of 124 training 200 steps, against 14 s with one), and sleeps a little after
# each step so that an outer period still outlasts matchmaking (50 steps ~5 s)
TRAINER_CPU = ["--threads", "1", "--step-delay", "0.02"]


class Swarm:
    """A host on machine 0 and trainers on the next machines, each a process with its output in a file."""

    def __init__(self, machines: Machines, tmp_path):
        self.m, self.tmp = machines, tmp_path
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, machine: int, args: list[str]) -> subprocess.Popen:
        out = open(self.tmp / f"{name}.log", "w")
        proc = self.m.popen(machine, CLI + args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True)
        out.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def host(self, run: list[str] = RUN, timeout: float = 60) -> list[str]:
        """Start the host of `run` with default network flags; returns the join command it printed, as argv."""
        self.start("host", 0, ["host", *run])
        deadline = time.monotonic() + timeout
        while True:
            lines = [line.strip() for line in self.log("host").splitlines()]
            printed = [line for line in lines if line.startswith("p2p-diloco join ")]
            if printed:
                return shlex.split(printed[0])
            assert self.procs["host"].poll() is None, "the host exited:\n" + self.log("host")
            assert time.monotonic() < deadline, "the host printed no join command:\n" + self.log("host")
            time.sleep(0.2)

    def trainer(self, name: str, machine: int, join_command: list[str]) -> None:
        assert join_command[0] == "p2p-diloco"
        self.start(name, machine, [*join_command[1:], "--global-steps", str(GLOBAL_STEPS), *TRAINER_CPU,
                                   "--summary", str(self.tmp / f"{name}.json")])

    def finish(self, names: list[str], timeout: float = 240) -> dict[str, tuple[int, dict | None]]:
        """Wait for the trainers; (exit code, summary or None) of each."""
        deadline = time.monotonic() + timeout
        out = {}
        for name in names:
            try:
                code = self.procs[name].wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish in {timeout}s:\n{self.log(name)[-3000:]}")
            path = self.tmp / f"{name}.json"
            out[name] = (code, json.loads(path.read_text()) if path.exists() else None)
        return out


@pytest.fixture
def machines(request):
    """`machines(n)`: n fresh machines; checks afterwards that no namespace or p2pd is left."""
    before_p2pd = p2pd_pids()
    made = []

    def make(n: int) -> Machines:
        made.append(Machines(n))
        return made[-1]

    yield make
    for m in made:
        m.close()
        assert m.names[0] not in namespaces_left(), "a namespace was left behind"
    deadline = time.monotonic() + 10  # killed daemons are reaped by init shortly after
    while not p2pd_pids() <= before_p2pd and time.monotonic() < deadline:
        time.sleep(0.2)
    assert p2pd_pids() <= before_p2pd, "p2pd left behind"


def _serve_once(m: Machines, i: int, port: int) -> subprocess.Popen:
    code = (f"import socket; s = socket.create_server(('0.0.0.0', {port})); s.settimeout(20); "
            "c, _ = s.accept(); c.sendall(b'hi'); c.close()")
    proc = m.popen(i, [sys.executable, "-c", code])
    time.sleep(0.5)
    return proc


def _connects(m: Machines, i: int, ip: str, port: int) -> bool:
    code = (f"import socket; s = socket.create_connection(('{ip}', {port}), timeout=2); "
            "print(s.recv(2).decode())")
    return m.run(i, [sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "hi"


def test_machines_talk_to_each_other_block_inbound_and_are_always_removed(machines):
    m = machines(3)
    server = _serve_once(m, 1, 5000)
    assert _connects(m, 0, m.address(1), 5000)
    server.wait(timeout=10)
    m.block_inbound(2)
    server = _serve_once(m, 2, 5000)
    assert not _connects(m, 0, m.address(2), 5000), "machine 2 accepted a connection despite the firewall rule"
    server.kill()
    names = list(m.names)
    with pytest.raises(RuntimeError):
        with Machines(1) as other:
            names += other.names
            other.popen(0, ["sleep", "60"])
            raise RuntimeError("a failure inside the block")
    assert not set(names[-1:]) & set(namespaces_left()), "a namespace survived an exception"
    m.close()
    assert not set(names) & set(namespaces_left())
    assert not m.pids()


def test_machines_refuse_bad_counts():
    for count in (0, 251):
        with pytest.raises(ValueError):
            Machines(count)


def test_host_and_three_trainers_on_separate_machines_with_default_flags_one_unreachable(machines, tmp_path):
    """Each trainer runs the join command the host printed; the third cannot be reached (its inbound connections
    are dropped, as behind a NAT): it is told so, trains in client mode, and the swarm ends in consensus."""
    m = machines(5)
    m.block_inbound(3)
    swarm = Swarm(m, tmp_path)
    join = swarm.host()
    # the printed address is the host's own on the shared network, not loopback
    assert f"/ip4/{m.address(0)}/tcp/31337/p2p/" in " ".join(join), join
    assert "TCP port 31337" in swarm.log("host")
    names = ["t1", "t2", "t3"]
    for i, name in enumerate(names, start=1):
        swarm.trainer(name, i, join)
    # `status` from a fifth machine, while they train
    deadline = time.monotonic() + 120
    while "rounds 1/" not in swarm.log("t1") and "rounds 0/1" not in swarm.log("t1"):
        assert time.monotonic() < deadline, swarm.log("t1")[-3000:]
        time.sleep(1)
    status = m.run(4, CLI + ["status", *join[2:]], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "run default: model" in status.stdout and "H=50" in status.stdout, status.stdout
    assert "peer(s)" in status.stdout and "0 peer(s)" not in status.stdout, status.stdout
    results = swarm.finish(names)
    blocked_log = swarm.log("t3")
    assert "this peer cannot be reached from other machines" in blocked_log
    assert f"could not open a connection to this peer at {m.address(3)}:" in blocked_log
    assert "--announce-maddrs" in blocked_log  # what would fix it
    hashes = set()
    for name, (code, summary) in results.items():
        assert code == 0, f"{name} exited {code}:\n{swarm.log(name)[-3000:]}"
        assert summary["client_mode"] is (name == "t3")
        if name != "t3":
            assert "reached this peer" in summary["reachability"]
        assert summary["problem"] is None
        assert all(r >= 2 for r in summary["rounds"]), (name, summary["rounds"])
        # no round fails because one member cannot accept connections (one may be lost as t3 joins late,
        # after its dial-back)
        assert sum(summary["rounds_failed"]) <= 1, (name, summary["rounds_failed"])
        assert summary["eval_loss"] < 4.0  # trained: an untrained byte model is at ln(256) = 5.55
        assert "rounds per fragment: applied" in swarm.log(name)
        hashes.add(tuple(summary["state_sha256"]))
    assert results["t3"][1]["rounds_averaged"] >= 3  # it took part, not only downloaded
    assert len(hashes) == 1, "the trainers ended apart"


def test_a_trainer_that_averages_nothing_while_others_train_exits_nonzero(machines, tmp_path):
    """The old default: trainers listening on loopback only. Nobody can connect to anybody, every round fails:
    each trainer must say so and exit non-zero, not end "in consensus" on the run's seed."""
    m = machines(3)
    swarm = Swarm(m, tmp_path)
    # every round fails whatever its length: half the global steps and half the outer period of RUN give the
    # same rounds (two of each fragment, then the last ones) in half the time
    join = swarm.host([*RUN, "-H", "25"])
    for i, name in enumerate(["t1", "t2"], start=1):
        swarm.start(name, i, [*join[1:], "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--global-steps", "50",
                              *TRAINER_CPU, "--summary", str(tmp_path / f"{name}.json")])
    results = swarm.finish(["t1", "t2"])
    for name, (code, summary) in results.items():
        log = swarm.log(name)
        assert code != 0, f"{name} exited 0 although it averaged nothing:\n{log[-3000:]}"
        errors = [line for line in log.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "averaged no round with the swarm" in errors[0], log[-3000:]
        assert "client mode" in errors[0]  # the likely cause: nobody accepts connections
        assert summary["rounds_averaged"] == 0 and summary["problem"]
        assert "rounds per fragment: applied 0/0/0" in log
