"""A whole swarm on this machine: a host and N trainers as separate processes on 127.0.0.1, or each on a
machine of its own behind an emulated WAN link (`links`, root only: see `p2p_diloco.emulation.wan`).

Every child runs in its own session and is killed with its whole process group
on exit, Ctrl-C or failure (hivemind's DHT, averagers and p2pd die with their
peer through PR_SET_PDEATHSIG), so nothing is left behind.

The swarm outlives its members: a trainer that dies (SIGKILL, OOM, a crash) is
reported on stderr when it dies (its process group is killed at once: no orphaned
averager or p2pd), the others train on to the end, and the report names it under
`crashed` with its last known progress and the last lines of its log. A host that
dies is reported the same way; the trainers know each other through the DHT and
re-publish the run config, so the run goes on without it. `failure` (see `verdict`)
says whether the run as a whole failed: consensus is computed over the finishers.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field

from ..node import attacks
from ..node.records import RunConfig

HOST_START_TIMEOUT = 60.0
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]  # a local swarm stays on this machine
PLAIN_PROGRESS_EVERY_S = 10.0  # a line per peer this often when the output is not a terminal
LOG_TAIL_LINES = 5


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log_path: str


@dataclass
class TrainerProcess:
    """A trainer as local-swarm sees it: its process, summary path and last progress line (`join --progress-json`)."""
    child: _Child
    summary_path: str
    progress: dict | None = None  # the latest {"step", "global_step", "rounds", ...} line
    maddrs: list[str] = field(default_factory=list)
    ended: bool = False  # its exit was noticed (and reported if it died)
    summary: dict | None = None  # what it wrote when it finished (`join --summary`); None: it died

    @property
    def name(self) -> str:
        return self.child.name

    def read_progress(self) -> None:
        for line in self.child.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "step" in record:
                self.progress = record
            elif "maddrs" in record:
                self.maddrs = record["maddrs"]


class LocalSwarm:
    def __init__(self, run: RunConfig, peers: int, steps: int, workdir: str | None = None,
                 data: list[str] | None = None, dataset: str | None = None, dashboard: int | None = None,
                 slow_peer_delay: float = 0.0, late_peer_after: float = 0.0,
                 links: tuple | None = None, attacker: str = "", admission: bool = False,
                 trainer_args: list[str] | None = None, host_args: list[str] | None = None):
        """`steps`: the global step every trainer stops at; the last trainer may be slowed
        (`slow_peer_delay` seconds of sleep per inner step), join late (`late_peer_after` seconds) or be
        malicious (`attacker`: a `node.attacks` spec). `admission`: the run is admission-only (a run key in the
        workdir; each trainer gets a key file and a token for its peer id; an "unadmitted" attacker a token
        stolen from peer0, which does not admit its own identity).
        `links`: (the host's `Link`, [each trainer's `Link`]) from `emulation.links.read_links`: every member
        then runs in a network namespace of its own behind that link, and declares its uplink rate.
        `trainer_args`: more `join` flags for every trainer (how they compute: --precision, --micro-batch, ...);
        `host_args`: more `host` flags (what its dashboard evaluates on)."""
        self.run, self.peers, self.steps, self.data = run, peers, steps, data or []
        self.dataset = dataset
        self.trainer_args, self.host_args = list(trainer_args or []), list(host_args or [])
        self.dashboard = dashboard
        self.links, self.net = links, None
        self.machine_of: dict[str, int] = {}  # trainers placed on a machine by `start_trainer(machine=...)`
        self.slow_peer_delay, self.late_peer_after, self.attacker = slow_peer_delay, late_peer_after, attacker
        self.admission = admission
        self.run_key = None  # `node.admission.RunKey` of an admission-only swarm, once the host starts
        if workdir:
            os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir or tempfile.mkdtemp(prefix="p2p-diloco-swarm-")
        self.children: list[_Child] = []
        self.host: _Child | None = None
        self.crashed: list[dict] = []  # the members that died, as noticed (see `_death`)

    def spawn(self, name: str, args: list[str], stdout=None, env: dict[str, str] | None = None) -> _Child:
        log_path = os.path.join(self.workdir, f"{name}.log")
        log = open(log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        argv = [sys.executable, "-m", "p2p_diloco.cli", *args]
        if self.net is not None:  # `ip netns exec` execs the program: the pid stays the child's own
            argv = self.net.command(self._machine(name), argv)
        proc = subprocess.Popen(argv, stdout=stdout or log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env, text=True)
        log.close()
        child = _Child(name, proc, log_path)
        self.children.append(child)
        return child

    def start_host(self, extra: list[str] | None = None) -> str:
        """Start the host (`extra`: more of its flags, e.g. --dashboard PORT); returns its first multiaddr once
        it is up."""
        config_path = os.path.join(self.workdir, "run_config.msgpack")
        with open(config_path, "wb") as f:
            f.write(self.run.encode())
        maddrs_path = os.path.join(self.workdir, "host.json")
        _remove_stale(maddrs_path)  # a --workdir of an earlier run: its files must not pass for this run's
        for stale in glob.glob(os.path.join(self.workdir, "metrics-*.jsonl")):
            _remove_stale(stale)
        extra = self.host_args + list(extra or [])
        if self.dashboard is not None:
            extra += ["--dashboard", str(self.dashboard)]
        if self.admission:
            from ..node.admission import RunKey

            key_path = os.path.join(self.workdir, "run.key")
            self.run_key = RunKey.load_or_create(key_path)[0]
            extra += ["--run-key", key_path]
        host = self.host = self.spawn("host", ["host", "--run-config", config_path, "--maddrs-file", maddrs_path,
                                               *self._listen("host"), *extra])
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
                      env: dict[str, str] | None = None, machine: int | None = None) -> tuple[_Child, str]:
        """Start one trainer that stops at global step `self.steps`; returns it and its summary's path.
        `env`: extra environment variables (e.g. a failpoint, see `p2p_diloco.node.failpoints`).
        `machine`: the emulated machine (1..peers, behind trainer `peer{machine-1}`'s link) it runs on; by default
        the one its name `peer{i}` gives (a replacement of a dead trainer takes its machine)."""
        if machine is not None:
            if not 1 <= machine <= self.peers:
                raise ValueError(f"machine {machine}: the swarm's trainers run on machines 1..{self.peers}")
            self.machine_of[name] = machine
        summary = os.path.join(self.workdir, f"{name}.json")
        _remove_stale(summary)
        args = ["join", "--initial-peers", maddr, "--run-id", self.run.run_id, "--global-steps", str(self.steps),
                "--summary", summary, "--run-dir", self.workdir, "--progress-json", "--threads", "1",
                "--wait-for-peers", str(wait_for), "--data-seed", str(zlib.crc32(name.encode())),
                *self._listen(name), *self.trainer_args, *(extra or [])]
        if self.links is not None:
            args += ["--bandwidth", str(self._link(name).up_mbit)]
        if self.run_key is not None:
            args += self._admission_args(name, env)
        for d in self.data:
            args += ["--data", d]
        if self.dataset:
            args += ["--dataset", self.dataset]
        return self.spawn(name, args, stdout=subprocess.PIPE, env=env), summary

    def _admission_args(self, name: str, env: dict[str, str] | None) -> list[str]:
        """--identity and --token of trainer `name` in an admission-only swarm: a token for its own peer id,
        or, for an "unadmitted" attacker, one stolen from peer0."""
        from .dht import create_identity, identity_peer_id

        def identity(who: str) -> tuple[str, str]:
            path = os.path.join(self.workdir, f"{who}.key")
            if not os.path.exists(path):
                create_identity(path)
            return path, str(identity_peer_id(path))

        path, peer_id = identity(name)
        if (env or {}).get(attacks.ENV) == "unadmitted":
            peer_id = identity("peer0")[1]
        return ["--identity", path, "--token", self.run_key.issue(self.run.run_id, peer_id, 24 * 3600)]

    def _outsider(self) -> bool:
        """The last trainer is an attacker the others shut out (not admitted, a lying reducer they ban, or a
        flooder they drop): it is not counted as one of the swarm's."""
        return self.admission and self.attacker == "unadmitted" or self.attacker in ("lie", "flood")

    def run_all(self, timeout: float, show_progress: bool = True,
                progress_every: float = PLAIN_PROGRESS_EVERY_S) -> dict:
        """Run the swarm to global step `steps`; returns the report (see `_collect`). Raises TimeoutError when it
        does not finish in `timeout` s, RuntimeError when the host does not come up; stops every child in any case.
        Progress: tqdm bars on a terminal, else a plain line per peer every `progress_every` s (stderr)."""
        start = time.time()
        view = _ProgressView([f"peer{i}" for i in range(self.peers)], self.steps, show_progress, progress_every)
        try:
            self.open_network()
            maddr = self.start_host()
            trainers = [self._start(i, maddr) for i in range(self.peers) if i != self._late_index()]
            self._watch(trainers, maddr, timeout, view)
            return self._collect(trainers, time.time() - start)
        finally:
            view.close()
            self.stop()

    def open_network(self) -> None:
        """With `links`: the emulated machines and their links (closed by `stop`). Before the first member."""
        if self.links is not None and self.net is None:
            from ..emulation.wan import Wan
            self.net = Wan([self.links[0], *self.links[1]])

    def _machine(self, name: str) -> int:
        """The emulated machine a member runs on: 0 the host, i + 1 trainer `peer{i}` (or as placed)."""
        if name in self.machine_of:
            return self.machine_of[name]
        return 0 if name == "host" else int(name.removeprefix("peer")) + 1

    def _link(self, name: str):
        return self.links[0] if name == "host" else self.links[1][self._machine(name) - 1]

    def _listen(self, name: str) -> list[str]:
        if self.net is None:
            return LOOPBACK
        return ["--host-maddrs", f"/ip4/{self.net.local_address(self._machine(name))}/tcp/0"]

    def _link_bytes(self, name: str) -> dict:
        """What machine `name`'s interface sent and received (every byte: headers, DHT, retransmissions)."""
        if self.net is None:
            return {}
        counters = self.net.counters(self._machine(name))
        return {"link": vars(self._link(name)), "link_tx_bytes": counters["tx_bytes"],
                "link_rx_bytes": counters["rx_bytes"]}

    def _late_index(self) -> int | None:
        return self.peers - 1 if self.late_peer_after > 0 else None

    def _start(self, i: int, maddr: str) -> TrainerProcess:
        extra = ["--step-delay", str(self.slow_peer_delay)] if i == self.peers - 1 and self.slow_peer_delay else []
        env = {attacks.ENV: self.attacker} if i == self.peers - 1 and self.attacker else None
        # the peers there at the start; the honest ones do not count an outsider
        late_or_outsider = self._late_index() is not None or self._outsider() and env is None
        wait_for = self.peers - 1 if late_or_outsider else self.peers
        trainer = TrainerProcess(*self.start_trainer(f"peer{i}", maddr, wait_for, extra, env=env))
        threading.Thread(target=trainer.read_progress, daemon=True).start()
        return trainer

    def _watch(self, trainers: list[TrainerProcess], maddr: str, timeout: float, view: _ProgressView) -> None:
        """Until every trainer has exited: start the late one when due, report deaths, show progress."""
        deadline = time.monotonic() + timeout
        late_at = None if self._late_index() is None else time.monotonic() + self.late_peer_after
        while late_at is not None or not all(t.ended for t in trainers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the swarm did not finish in {timeout:.0f}s; logs in {self.workdir}")
            if late_at is not None and time.monotonic() >= late_at:
                trainers.append(self._start(self._late_index(), self._bootstrap(maddr, trainers)))
                late_at = None
            self._notice_exits(trainers, view)
            view.update(trainers)
            time.sleep(0.5)

    def _bootstrap(self, maddr: str, trainers: list[TrainerProcess]) -> str:
        """Whom a late trainer joins through: the host, or a live trainer once the host is gone."""
        if self.host.proc.poll() is None:
            return maddr
        return next((t.maddrs[0] for t in trainers if t.maddrs and t.child.proc.poll() is None), maddr)

    def _notice_exits(self, trainers: list[TrainerProcess], view: _ProgressView) -> None:
        """Report each member that exited since the last look: a dead one on stderr, at once; the others go on."""
        host = self.host
        if host.proc.poll() is not None and not any(c["name"] == "host" for c in self.crashed):
            self.crashed.append(_death(host, None, self.steps))
            view.say(f"host died ({_exit_reason(host.proc.returncode)}); the trainers go on without it "
                     f"(they know each other through the DHT); log: {host.log_path}")
        for t in trainers:
            if t.ended or t.child.proc.poll() is None:
                continue
            t.ended = True
            if os.path.exists(t.summary_path):
                with open(t.summary_path) as f:
                    t.summary = {"name": t.name, **json.load(f), **self._link_bytes(t.name)}
                view.finished(t)
                continue
            _signal_group(t.child.proc, signal.SIGKILL)  # its averagers and p2pd go with it, now
            self.crashed.append(_death(t.child, t.progress, self.steps))
            view.died(t, f"{t.name} died: {_describe_death(self.crashed[-1])}; the others go on; "
                         f"log: {t.child.log_path}")

    def _collect(self, trainers: list[TrainerProcess], wall: float) -> dict:
        """The report: the finishers' summaries under `peers` (each with its `name`), the dead under `crashed`,
        `consensus` (the finishers hold the same state: bit-identical anchors and momenta, by `state_sha256`)
        and `failure` (`verdict`)."""
        peers = [t.summary for t in trainers if t.summary is not None]
        outsider = None
        if self._outsider():  # not one of the swarm's: reported apart (finished or not), its state not compared
            name = f"peer{self.peers - 1}"
            outsider = next((p for p in peers + self.crashed if p["name"] == name), None)
            peers = [p for p in peers if p is not outsider]
            self.crashed = [c for c in self.crashed if c is not outsider]
        # a finisher that averaged nothing while others trained says so in its summary (`join` exited non-zero)
        problems = [f"{p['name']}: {p['problem']}" for p in peers if p.get("problem")]
        hashes = {tuple(p["state_sha256"]) for p in peers}
        report = {"consensus": len(hashes) == 1, "trainers": self.peers, "finished": [p["name"] for p in peers],
                  "crashed": self.crashed, "wall_s": round(wall, 2), "workdir": self.workdir,
                  "problems": problems, "peers": peers}
        if self._outsider():
            report["outsider"] = outsider
        report["failure"] = verdict(report)
        return report

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL whatever is left, p2pd daemons included; then
        remove the emulated network, if any."""
        try:
            self._stop_children(grace)
        finally:
            if self.net is not None:
                self.net.close()
                self.net = None

    def _stop_children(self, grace: float) -> None:
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


def verdict(report: dict) -> str | None:
    """Why the run failed, in one line, or None: it succeeded when at least two trainers finished (one, with
    --peers 1) holding the same state (bit-identical anchors and momenta) and none of them reported a problem.
    Members killed by a signal (trainers or the host: SIGKILL, the OOM killer) do not fail it: they are reported,
    and the others' result stands; a trainer that exited with an error of its own does."""
    dead = ", ".join(f"{c['name']} ({c['exit']})" for c in report["crashed"]) or "none"
    finished = report["finished"]
    if not finished:
        return f"no trainer finished; dead: {dead}; logs in {report['workdir']}"
    if len(finished) < min(2, report["trainers"]):
        return f"only {finished[0]} finished, so nothing was compared; dead: {dead}; logs in {report['workdir']}"
    if not report["consensus"]:
        groups: dict[tuple, list[str]] = {}
        for p in report["peers"]:
            groups.setdefault(tuple(p["state_sha256"]), []).append(p["name"])
        return "the trainers that finished disagree: " + " vs ".join(", ".join(g) for g in groups.values()) \
            + " hold different states"
    if report["problems"]:
        return "peers that averaged no round while others trained: " + "; ".join(report["problems"])
    errors = [c for c in report["crashed"] if c["name"] != "host" and (c["exit_code"] or 0) > 0]
    if errors:  # killed by a signal is a fault the swarm must survive; exiting with an error is a bug or bad set-up
        return "trainers that stopped with an error (not killed): " + "; ".join(
            f"{c['name']} ({c['exit']}, log {c['log']})" for c in errors)
    return None


def summary_table(report: dict) -> str:
    """A row per trainer (the dead ones too), the consensus line, and the dead members' last log lines."""
    links = any("link_tx_bytes" in p for p in report["peers"])
    rows = [f"{'name':>6} {'peer':>52} {'steps':>6} {'rounds applied':>14} {'failed':>10} {'eval_loss':>9} "
            f"{'sent MB':>8} {'recv MB':>8}"
            + (f" {'link tx MB':>10} {'link rx MB':>10} {'up Mbit/s':>9}" if links else "")]
    dead = {c["name"]: c for c in report["crashed"]}
    finished = {p["name"]: p for p in report["peers"]}
    for name in sorted(set(dead) | set(finished), key=lambda n: (n == "host", len(n), n)):
        if name in finished:
            p = finished[name]
            rows.append(f"{name:>6} {p['peer_id']:>52} {p['inner_steps']:6d} {_slashed(p['rounds']):>14} "
                        f"{_slashed(p['rounds_failed']):>10} {p['eval_loss']:9.4f} "
                        f"{p['wire_bytes_sent'] / 1e6:8.2f} {p['wire_bytes_received'] / 1e6:8.2f}"
                        + (f" {p['link_tx_bytes'] / 1e6:10.2f} {p['link_rx_bytes'] / 1e6:10.2f} "
                           f"{p.get('uplink_measured_mbit', 0.0):9.1f}" if links else ""))
        else:
            rows.append(f"{name:>6} died: {_describe_death(dead[name])}")
    over = f"over the {len(finished)} of {report['trainers']} trainers that finished"
    rows.append(f"consensus: {report['consensus']} ({over})   wall: {report['wall_s']:.0f}s   "
                f"logs: {report['workdir']}")
    rows.append(f"metrics: {report['workdir']}/metrics-*.jsonl (draw them: p2p-diloco plot {report['workdir']})")
    if links:
        rows.append("sent/recv MB: averaging payloads (parts and means); link tx/rx MB: everything the emulated "
                    "interface carried (headers, DHT, state downloads, retransmissions); up Mbit/s: the uplink "
                    "the trainer measured (the peak its interface carried over a second)")
    for c in report["crashed"]:
        rows.append(f"last lines of {c['log']}:")
        rows += [f"    {line}" for line in c["log_tail"] or ["(empty)"]]
    return "\n".join(rows)


class _ProgressView:
    """The swarm's progress on stderr: a tqdm bar per peer on a terminal; elsewhere (a log file, a pipe, CI) a
    plain line per running peer every `every` seconds and one when it finishes, with no cursor moves or \\r.
    `say` prints a line that stays (a death), shown even when progress is off."""

    def __init__(self, names: list[str], steps: int, show: bool, every: float):
        self.steps, self.every, self.show = steps, every, show
        self.last = time.monotonic()
        self.bars = None
        if show and sys.stderr.isatty() and sys.stdout.isatty():
            from tqdm import tqdm

            self.bars = {name: tqdm(total=steps, desc=name, position=i, unit="step", mininterval=0.5)
                         for i, name in enumerate(names)}

    def update(self, trainers: list[TrainerProcess]) -> None:
        if self.bars is not None:
            for t in trainers:
                if t.progress and not t.ended:
                    self.bars[t.name].n = min(t.progress["global_step"], self.steps)
                    self.bars[t.name].set_postfix_str(_progress_text(t.progress), refresh=False)
                    self.bars[t.name].refresh()
        elif self.show and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            for t in trainers:
                if not t.ended:
                    self.say(_progress_line(t.name, t.progress, self.steps))

    def finished(self, t: TrainerProcess) -> None:
        if self.bars is None and self.show:
            p = t.summary
            self.say(f"{t.name}  finished  global {p['global_step']}/{self.steps}  inner {p['inner_steps']}  "
                     f"rounds {_slashed(p['rounds'])} (failed {sum(p['rounds_failed'])})  "
                     f"eval loss {p['eval_loss']:.4f}  sent {p['wire_bytes_sent'] / 1e6:.2f} MB")

    def died(self, t: TrainerProcess, text: str) -> None:
        if self.bars is not None:
            self.bars[t.name].set_postfix_str(f"died ({_exit_reason(t.child.proc.returncode)})")
        self.say(text)

    def say(self, text: str) -> None:
        if self.bars is not None:
            self.bars[next(iter(self.bars))].write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        for bar in (self.bars or {}).values():
            bar.close()
        self.bars = None


def _progress_text(p: dict) -> str:
    return (f"inner {p['step']}  rounds {_slashed(p['rounds'])} (failed {p.get('failed', 0)})  loss {p['loss']:.3f}  "
            f"{p['tokens_per_s']:.0f} tok/s  sent {p['bytes_sent'] / 1e6:.2f} MB")


def _progress_line(name: str, p: dict | None, steps: int) -> str:
    if p is None:
        return f"{name}  starting"
    return f"{name}  global {min(p['global_step'], steps)}/{steps}  {_progress_text(p)}"


def _death(child: _Child, progress: dict | None, steps: int) -> dict:
    """What is known of a member that died: how, its last progress line, the last lines of its log."""
    p = progress or {}
    return {"name": child.name, "exit_code": child.proc.returncode, "exit": _exit_reason(child.proc.returncode),
            "global_step": p.get("global_step"), "steps": steps, "inner_steps": p.get("step"),
            "rounds": p.get("rounds"), "rounds_failed": p.get("failed"), "log": child.log_path,
            "log_tail": _log_tail(child.log_path)}


def _describe_death(c: dict) -> str:
    if c["name"] == "host":
        return f"{c['exit']}"
    if c["global_step"] is None:
        return f"{c['exit']} before it reported any progress"
    return (f"{c['exit']} at global step {c['global_step']}/{c['steps']} (inner {c['inner_steps']}, "
            f"rounds {_slashed(c['rounds'])}, failed {c['rounds_failed']})")


def _exit_reason(returncode: int | None) -> str:
    """'SIGKILL' for a process killed by a signal, else 'exit code N'."""
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _log_tail(path: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.rstrip()[:300] for line in text.splitlines() if line.strip()][-lines:]


def _remove_stale(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _slashed(values: list[int]) -> str:
    return "/".join(map(str, values))


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
