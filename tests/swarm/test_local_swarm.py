"""`p2p-diloco local-swarm` outlives its members: a trainer or the host SIGKILLed from outside at a random moment
of training is reported, the others finish, and the summary says who died and whether the finishers agree.
Its output to a pipe is plain lines (no cursor moves, no carriage returns), and so is `simulate`'s.

Each swarm test runs the CLI in a subprocess on the tiny model, bounded in time; whatever it started is
killed afterwards, even when the test fails (its peers are found by their working directory).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zlib
from pathlib import Path

import pytest

from p2p_diloco.swarm.local_swarm import verdict

TIMEOUT = 150  # seconds for one local-swarm run (a busy 2-core machine included)
STEPS = 200
EVAL_LOSS_TRAINED = 4.0  # the tiny model after STEPS steps is near 3.1 (the untrained one: ln 256 = 5.5)
ESCAPES = re.compile(rb"\x1b\[|\r")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a live process (not of a zombie: it is gone, only not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else (int(fields[1]), int(fields[2]))
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class Run:
    """`local-swarm` in a subprocess with its stdout and stderr read (as bytes) while it runs."""

    def __init__(self, tmp_path, peers: int, *args: str):
        self.workdir, self.json_path = tmp_path / "swarm", tmp_path / "swarm.json"
        cmd = [sys.executable, "-m", "p2p_diloco.cli", "local-swarm", "--model", "tiny", "--peers", str(peers),
               "--steps", str(STEPS), "-H", "40", "--fragments", "2", "--round-timeout", "20",
               "--timeout", str(TIMEOUT - 20), "--progress-every", "1", "--workdir", str(self.workdir),
               "--json", str(self.json_path), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for r in self.readers:
            r.start()
        self.groups: set[int] = set()  # process groups of the swarm's members (a member and its p2pd share one)

    @staticmethod
    def _read(stream, buffer: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            buffer.extend(chunk)

    def member(self, name: str) -> int:
        """Pid of the swarm member `name` (peerN or host): the child of local-swarm naming its file in workdir."""
        mark = f"{self.workdir}/{name}.json" if name != "host" else f"{self.workdir}/run_config.msgpack"
        for pid in _pids():
            st = _stat(pid)
            if st and st[0] == self.proc.pid and mark in _cmdline(pid):
                return pid
        raise AssertionError(f"no process for {name}")

    def wait_for_training(self, name: str, global_step: int) -> None:
        """Until local-swarm's progress line says `name` passed `global_step`."""
        deadline = time.monotonic() + TIMEOUT
        pattern = re.compile(rf"^{name}  global (\d+)/".encode(), re.M)
        while not any(int(m.group(1)) >= global_step for m in pattern.finditer(bytes(self.err))):
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, f"{name} never reached global step {global_step}\n" + self.text()
            time.sleep(0.2)
        self.groups |= {_stat(pid)[1] for pid in _pids() if _stat(pid) and _stat(pid)[0] == self.proc.pid}

    def finish(self) -> dict:
        self.proc.wait(timeout=TIMEOUT)
        for r in self.readers:
            r.join(timeout=10)
        assert self.json_path.exists(), f"local-swarm exited {self.proc.returncode} without a report\n" + self.text()
        return json.loads(self.json_path.read_text())

    def text(self) -> str:
        """Local-swarm's output, then the warnings in its members' logs (what a failure in CI leaves to read)."""
        logs = []
        for log in sorted(self.workdir.glob("*.log")):
            lines = [line for line in log.read_text(errors="replace").splitlines()
                     if " WARNING " in line or " ERROR " in line]
            logs.append(f"--- {log.name}: {len(lines)} warnings, the last ones:\n" + "\n".join(lines[-25:]))
        return (self.out + b"\n" + self.err).decode(errors="replace")[-4000:] + "\n" + "\n".join(logs)

    def close(self) -> None:
        """SIGTERM local-swarm (it stops its members), then SIGKILL whatever of the swarm is left."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in _pids():
            if str(self.workdir) in _cmdline(pid) and (st := _stat(pid)):
                self.groups.add(st[1])
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self) -> list[str]:
        time.sleep(0.5)  # SIGKILLed processes are reaped by init
        return [_cmdline(pid) for pid in _pids() if (st := _stat(pid)) and st[1] in self.groups]


@pytest.fixture
def run(tmp_path):
    started = []

    def start(peers: int, *args: str) -> Run:
        started.append(Run(tmp_path, peers, *args))
        return started[-1]

    yield start
    for r in started:
        r.close()
        assert not r.leftovers(), "processes of the swarm left behind"


def assert_plain_output(r: Run, peers: int) -> None:
    """Output to a pipe: no escape sequences, no carriage returns; plain progress lines of every peer."""
    assert not ESCAPES.search(r.out + r.err), r.text()
    for i in range(peers):
        line = rf"^peer{i}  global \d+/{STEPS}  inner \d+  rounds [\d/]+ \(failed \d+\)  loss [\d.]+  " \
            r"\d+ tok/s  sent [\d.]+ MB"
        assert re.search(line.encode(), r.err, re.M), r.text()


def assert_finishers_agree(report: dict, names: list[str], steps: int = STEPS, trained_below: float = 4.0) -> None:
    assert report["finished"] == names and report["consensus"] is True and report["failure"] is None
    peers = report["peers"]
    assert [p["name"] for p in peers] == names
    assert len({tuple(p["state_sha256"]) for p in peers}) == 1
    losses = [p["eval_loss"] for p in peers]
    assert max(losses) - min(losses) < 1e-6  # identical anchors, identical eval
    assert max(losses) < trained_below  # an untrained byte model is at ln(256) = 5.55
    for p in peers:
        assert p["global_step"] == steps and min(p["rounds"]) >= 2
        assert p["wire_bytes_sent"] > 0 and p["wire_bytes_received"] > 0


@pytest.mark.skipif(not os.environ.get("P2P_DILOCO_LONG_TESTS"), reason="60 s; the suite kills trainers in "
                    "tests/swarm/test_faults.py and the host below (P2P_DILOCO_LONG_TESTS=1 runs this one)")
def test_a_trainer_killed_from_outside_is_reported_and_the_others_finish_in_consensus(run):
    rng = random.Random()
    victim, delay = f"peer{rng.randrange(4)}", rng.uniform(0, 3)
    r = run(4)
    r.wait_for_training(victim, 50)  # after its first rounds
    time.sleep(delay)
    os.kill(r.member(victim), signal.SIGKILL)  # the trainer only, as the OOM killer would
    report = r.finish()
    why = f"{victim} killed {delay:.1f}s after global step 50\n" + r.text()
    assert r.proc.returncode == 0, why
    dead, = report["crashed"]
    assert dead["name"] == victim and dead["exit"] == "SIGKILL" and dead["exit_code"] == -signal.SIGKILL, why
    assert 50 <= dead["global_step"] < STEPS and len(dead["rounds"]) == 3, why
    assert dead["log"] == str(r.workdir / f"{victim}.log")
    assert_finishers_agree(report, [f"peer{i}" for i in range(4) if f"peer{i}" != victim])
    for p in report["peers"]:  # they went on averaging after the death: every fragment applied rounds since
        # (how many rounds a crash costs, at chosen moments of a round, is tests/swarm/test_faults.py's subject)
        assert all(a > b for a, b in zip(p["rounds"], dead["rounds"])), why
    # reported while the others trained on, and in the summary
    assert re.search(rf"^{victim} died: SIGKILL at global step \d+/{STEPS}".encode(), r.err, re.M), why
    assert re.search(rf"^ +{victim} died: SIGKILL".encode(), r.out, re.M), why
    assert b"consensus: True (over the 3 of 4 trainers that finished)" in r.out, why
    assert_plain_output(r, 4)


def write_dataset(folder: Path) -> Path:
    """Two JSONL files of 150 rows of 1.5 KB each: pieces of the standard library's first modules."""
    text = ""
    for module in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += module.read_text(errors="replace")
        if len(text) >= 300 * 1500:
            break
    folder.mkdir()
    for part in range(2):
        with open(folder / f"part{part}.jsonl", "w") as f:
            for i in range(part * 150, part * 150 + 150):
                f.write(json.dumps({"text": text[i * 1500:(i + 1) * 1500]}) + "\n")
    return folder


def test_peers_of_different_speeds_on_a_dataset_outlive_their_host(run, tmp_path):
    """Three trainers, the last one slow (0.5 s of sleep per step): the host dies mid-run, they all finish, every
    one in every round, and the fast ones never waited for the slow one (also the plain multi-process test). They
    train a transformers Llama config other than the presets (`--model FILE.json`) on JSONL rows the test wrote,
    read through HF `datasets` (`--dataset DIR`); `plot` draws their metrics."""
    pytest.importorskip("datasets")
    data = write_dataset(tmp_path / "corpus")
    model = Path(__file__).parents[2] / "peers" / "model-llama-cpu-test.json"
    r = run(3, "--slow-peer-delay", "0.5", "--model", str(model), "--dataset", str(data))
    r.wait_for_training("peer0", 50)
    time.sleep(random.uniform(0, 2))
    os.kill(r.member("host"), signal.SIGKILL)
    report = r.finish()
    assert r.proc.returncode == 0, r.text()
    dead, = report["crashed"]
    assert dead["name"] == "host" and dead["exit"] == "SIGKILL", r.text()
    assert_finishers_agree(report, ["peer0", "peer1", "peer2"])
    *fast, slow = sorted(report["peers"], key=lambda p: p["name"])
    for p in fast:  # the fast trainers took part in every round, the host gone or not
        assert p["rounds"] == fast[0]["rounds"] and min(p["rounds"]) >= 3, r.text()
        assert sum(p["rounds_failed"]) <= 2  # a round or two lost to the host's death, caught up from the swarm
    # the slow one averages with them; on a loaded machine it may miss a round now and then (it is late to the
    # group) and takes that round's state from the others: it ends with their state (checked above)
    assert min(slow["rounds"]) >= 2, r.text()
    assert slow["inner_steps"] < 0.4 * min(p["inner_steps"] for p in fast), r.text()
    for p in fast:  # they trained at their own pace, not at the slow one's
        assert p["inner_steps"] >= 0.8 * p["global_step"], r.text()
    assert re.search(rb"^host died \(SIGKILL\); the trainers go on", r.err, re.M), r.text()
    assert_plain_output(r, 3)
    for p in report["peers"]:
        assert p["data"] == f"dataset {data} (300 rows, field 'text', byte-level)", p["data"]
    # every trainer's metrics, a line per progress report, the last with the summary's eval loss; `plot` draws them
    for p in report["peers"]:
        lines = [json.loads(t) for t in (r.workdir / f"metrics-{p['peer_id']}.jsonl").read_text().splitlines()]
        assert len(lines) >= 3 and lines[-1]["eval_loss"] == pytest.approx(p["eval_loss"]), lines[-1]
        assert lines[-1]["rounds"] == p["rounds"] and lines[-1]["global_step"] == p["global_step"]
        # ...and what became of each round (the schedule a replay reads): applied and adopted ones add up to the
        # summary's rounds; an applied one landed tau or more global steps after it started (the final rounds at
        # the last step), in a group
        records = [rec for line in lines for rec in line["round_records"]]
        for k, n in enumerate(p["rounds"]):
            assert sum(rec["fragment"] == k and rec["outcome"] in ("applied", "adopted") for rec in records) == n
        applied = [rec for rec in records if rec["outcome"] == "applied"]
        odd = [rec for rec in applied if not (rec["peers"] >= 2 and rec["group_weight"] >= rec["tokens"] > 0 and (
            rec["end_step"] >= rec["start_step"] + 1 or rec["start_step"] == p["global_step"]))]  # (final rounds)
        assert applied and not odd, odd
        # ...whose members are named (this peer among them; a replay rebuilds a split round's groups from them)
        names = {q["peer_id"] for q in report["peers"]}
        assert all(len(rec["members"]) == rec["peers"] and p["peer_id"] in rec["members"]
                   and set(rec["members"]) <= names for rec in applied), applied
        # ...and the global step each inner step trained at (what a replay's workers train at), in order
        trained_at = [g for line in lines for g in line["trained_at"]]
        assert len(trained_at) == p["inner_steps"] and trained_at == sorted(trained_at), trained_at
        assert trained_at[-1] < p["global_step"]
        # local-swarm gives each trainer a data order of its own, the same in every run (`join --data-seed`)
        assert {line["data_seed"] for line in lines} == {zlib.crc32(p["name"].encode())}
    drawn = subprocess.run([sys.executable, "-m", "p2p_diloco.cli", "plot", str(r.workdir)], capture_output=True,
                           text=True, timeout=120)
    assert drawn.returncode == 0, drawn.stderr
    assert [os.path.basename(p) for p in drawn.stdout.split()] == ["loss.png", "throughput.png", "bytes.png",
                                                                   "rounds.png"]
    for png in drawn.stdout.split():
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_pretrained_model_of_another_architecture_goes_on_training_with_its_tokenizer_in_bf16(run, tmp_path):
    """`--model DIR` of a saved GPT-2 with its own BPE tokenizer (both written by the test): both trainers load its
    weights (checked against the run's hash), read the dataset as its token ids, and step in bf16 autocast with
    micro-batches of 2 (the GPU path's options, on the CPU); they end in consensus with a model that learnt."""
    pytest.importorskip("datasets")
    from pretrained import write_pretrained

    from p2p_diloco.task.model import model_spec, parameter_count

    data = write_dataset(tmp_path / "corpus")
    model = write_pretrained(tmp_path / "gpt", "".join(json.loads(line)["text"] for line in
                                                       (data / "part0.jsonl").read_text().splitlines()[:60]))
    r = run(2, "--model", str(model), "--dataset", str(data), "--steps", "80", "--precision", "bf16",
            "--micro-batch", "2")
    report = r.finish()
    assert r.proc.returncode == 0, r.text()
    assert report["finished"] == ["peer0", "peer1"] and report["consensus"] is True, r.text()
    parameters = parameter_count(model_spec(str(model)))
    losses = {p["eval_loss"] for p in report["peers"]}
    assert len(losses) == 1 and losses.pop() < 5.5, r.text()  # the untrained GPT-2 is at ln(400) = 6.0
    for p in report["peers"]:
        assert p["precision"] == "bf16" and p["micro_batch"] == 2 and min(p["rounds"]) >= 1, p
        assert p["data"].endswith("tokenizer gpt (400 tokens))") and p["parameters"] == parameters, p


@pytest.mark.skipif(not os.environ.get("P2P_DILOCO_LONG_TESTS"), reason="45 s; the suite's robust-aggregation "
                    "tests are tests/core/test_aggregation.py (P2P_DILOCO_LONG_TESTS=1 runs this one)")
def test_a_peer_sending_its_outer_gradients_x1000_is_refused_by_the_reducers_and_the_run_ends_in_consensus(run):
    """A malicious peer built on our code (`--attacker scale:1000`): every honest reducer leaves its contribution
    out and names it; all three end holding the same model, which trained (the attacker applies the same means)."""
    r = run(3, "--attacker", "scale:1000")
    report = r.finish()
    assert r.proc.returncode == 0, r.text()
    assert_finishers_agree(report, ["peer0", "peer1", "peer2"])
    peers = {p["name"]: p for p in report["peers"]}
    attacker = peers["peer2"]["peer_id"]
    for name in ("peer0", "peer1"):
        refused = peers[name]["refused_contributions"]
        assert set(refused) == {attacker} and refused[attacker] >= 2, (name, refused, r.text())
    # nobody honest is ever an outlier (the attacker, reducing its own part with our code, refuses only itself)
    assert set(peers["peer2"]["refused_contributions"]) <= {attacker}
    for p in peers.values():
        assert p["eval_loss"] < EVAL_LOSS_TRAINED, (p["name"], p["eval_loss"])
    assert b"ATTACK armed" in (r.workdir / "peer2.log").read_bytes()
    assert re.search(rf"refusing the contribution of peer {attacker}".encode(), (r.workdir / "peer0.log").read_bytes())


def _report(finished: list[tuple[str, str]], crashed: list[str], problems=(), trainers: int = 3,
            exit_code: int = -9) -> dict:
    peers = [{"name": n, "state_sha256": [h]} for n, h in finished]
    exit = "SIGKILL" if exit_code < 0 else f"exit code {exit_code}"
    return {"finished": [n for n, _ in finished], "peers": peers, "trainers": trainers, "workdir": "/w",
            "consensus": len({h for _, h in finished}) == 1, "problems": list(problems),
            "crashed": [{"name": n, "exit": exit, "exit_code": exit_code, "log": f"/w/{n}.log"} for n in crashed]}


def test_the_exit_rule():
    assert verdict(_report([("peer0", "a"), ("peer2", "a")], ["peer1", "host"])) is None
    assert verdict(_report([("peer0", "a")], [], trainers=1)) is None
    assert "no trainer finished; dead: peer0 (SIGKILL), peer1 (SIGKILL)" in verdict(_report([], ["peer0", "peer1"]))
    assert "only peer2 finished" in verdict(_report([("peer2", "a")], ["peer0", "peer1"]))
    assert "peer0, peer2 vs peer1 hold different states" in \
        verdict(_report([("peer0", "a"), ("peer1", "b"), ("peer2", "a")], []))
    assert "averaged no round" in verdict(_report([("peer0", "a"), ("peer1", "a")], [], ["peer1: no round"]))
    # a trainer that stopped with an error of its own (a traceback, not a kill) fails the run; a dead host does not
    assert "peer1 (exit code 1, log /w/peer1.log)" in \
        verdict(_report([("peer0", "a"), ("peer2", "a")], ["peer1"], exit_code=1))
    assert verdict(_report([("peer0", "a"), ("peer2", "a")], ["host"], exit_code=1)) is None


def test_an_unadmitted_peer_is_never_in_a_group_and_never_served_state_in_any_round(run):
    """An admission-only run (`--admission`: a run key, a token for each trainer's peer id) and a malicious peer
    built on our code that takes part with a token stolen from peer0 (`--attacker unadmitted`): in every round
    the honest peers leave it out (as leader, as follower, as a member) and refuse it their state; they never
    fail a round over it, and end in consensus, trained. The suite runs 60 rounds, P2P_DILOCO_LONG_TESTS=1 110
    (issue 10 asked for 100+). (Served no state, deterministically:
    `test_admission.py::test_a_donor_serves_its_state_to_admitted_peers_only`.)"""
    steps = 220 if os.environ.get("P2P_DILOCO_LONG_TESTS") else 120
    r = run(3, "--admission", "--attacker", "unadmitted", "--model", "small", "--fragments", "4", "-H", "10",
            "--target-group-size", "2", "--round-timeout", "10", "--steps", str(steps))
    report = r.finish()
    assert r.proc.returncode == 0, r.text()
    assert_finishers_agree(report, ["peer0", "peer1"], steps=steps)
    outsider = report["outsider"]
    assert outsider["name"] == "peer2" and outsider["peer_id"] not in {p["peer_id"] for p in report["peers"]}
    for p in report["peers"]:  # (5 fragments, a round of each every H = 10 steps: steps / 2 rounds)
        # every round is one the outsider tried to join; on a loaded 2-core machine (CI, 220 steps: 59 applied,
        # 55 failed) some fail for want of time, as they do without it: a period of H = 10 steps is near the
        # matchmaking search, and 3 trainers, a host, 4 p2pd and 15 averager processes share the cores
        applied, failed = sum(p["rounds"]), sum(p["rounds_failed"])
        assert applied + failed >= steps // 2 - 10 and applied >= steps // 8, (p["name"], p["rounds"],
                                                                              p["rounds_failed"])
    # never in a group: it applied no round; never served: it downloaded no state
    assert sum(outsider["rounds"]) == 0 and sum(outsider["rounds_recovered"]) == 0, outsider
    logs = {name: (r.workdir / f"{name}.log").read_text() for name in ("peer0", "peer1", "peer2")}
    assert "ATTACK: taking part though not admitted (a token for peer" in logs["peer2"]
    who = outsider["peer_id"]
    honest = logs["peer0"] + logs["peer1"]
    assert f"ignoring peer {who}: it is not admitted to this run" in honest, r.text()
    # no honest round failed over it: no failure names it (a group it was let into would fail naming it)
    failures = [line for line in honest.splitlines() if "round not applied" in line]
    assert not [line for line in failures if who in line], failures


@pytest.mark.skipif(not os.environ.get("P2P_DILOCO_LONG_TESTS"), reason="90 s; the suite's flood tests are "
                    "tests/swarm/test_inbound.py (P2P_DILOCO_LONG_TESTS=1 runs this one)")
def test_a_flooding_peer_is_dropped_and_its_victims_memory_stays_bounded_their_rounds_going(run):
    """`--attacker flood`: the last peer trains, and floods the others' averagers all run long with streams
    declaring 2**40-byte messages (junk pushed into each) and DHT pings. Each victim process reads the first
    header, drops the flooder (`swarm.inbound`) and leaves it out of its groups; the victims' memory stays where a
    3-peer tiny swarm's is (measured: ~2.0 GB summed over a peer's ~10 processes, flooded or not, as the
    flooder's own; an unlimited victim grows by what is pushed, `test_inbound.py`) and they average on, in
    consensus."""
    # groups of two: with the target at three (local-swarm's default, the number of peers) every round waits
    # out the matchmaking time for a third member that never comes, the shunned flooder, and at H = 40 about half
    # the rounds then fail (measured: 9 of 17 applied; 12 and 17 of 17 with --target-group-size 2)
    # and periods of H = 200 steps (~10 s, over twice the matchmaking time: at H = 40 or 80, 1.5-3 s, one failed
    # matchmaking early holds a peer up long enough for its clock to jump past several rounds)
    r = run(3, "--attacker", "flood", "--target-group-size", "2", "-H", "200", "--steps", "600")
    report = r.finish()
    assert r.proc.returncode == 0, r.text()
    assert_finishers_agree(report, ["peer0", "peer1"], steps=600)
    flooder = report["outsider"]
    flood = flooder["flood"]
    assert flood["streams_opened"] + flood["streams_failed"] >= 100, flood
    assert flood["pings_refused"] >= 100 and flood["pings_refused"] > flood["pings"], flood  # (its node ids)
    logs = {name: (r.workdir / f"{name}.log").read_text() for name in ("peer0", "peer1")}
    for p in report["peers"]:
        assert f"dropping peer {flooder['peer_id']} for" in logs[p["name"]], r.text()
        # as much as the flooder's own processes (the same ones, never flooded) hold, give or take
        assert p["peak_memory_mb"] < flooder["peak_memory_mb"] + 256, (p["name"], p["peak_memory_mb"],
                                                                       flooder["peak_memory_mb"])
        # rounds go on: at most the one or two it was in when the victims dropped it fail
        assert sum(p["rounds_failed"]) <= 3, (p["rounds"], p["rounds_failed"])
    print({p["name"]: (p["peak_memory_mb"], p["rounds"], p["rounds_failed"]) for p in report["peers"]}, flood)


@pytest.mark.skipif(not os.environ.get("P2P_DILOCO_LONG_TESTS"), reason="a minute; the suite's audit test is "
                    "tests/swarm/test_audit.py (P2P_DILOCO_LONG_TESTS=1 runs this one)")
def test_a_lying_reducer_is_caught_its_rounds_applied_nowhere_and_it_is_banned(run):
    """`--attacker lie`: the last peer, reducing its part, returns every member the negated mean (its commitments
    honest). With `--audit 1` every honest member recomputes its part from the members' own bytes before anyone
    applies the round: the lie is caught, the round fails on every member (the liar's included), the honest
    peers ban it and go on together, in consensus and trained."""
    r = run(3, "--attacker", "lie", "--audit", "1", "--round-timeout", "10")
    report = r.finish()
    assert r.proc.returncode == 0, r.text()
    assert_finishers_agree(report, ["peer0", "peer1"])
    liar = report["outsider"]
    assert liar["name"] == "peer2" and sum(liar["rounds"]) == 0, liar  # no round with its means applied anywhere
    for p in report["peers"]:
        assert p["banned"] == [liar["peer_id"]], (p["name"], p["banned"], r.text())
        assert p["incidents"] and all(i["peer"] == liar["peer_id"] and "returned a wrong mean" in i["what"]
                                      for i in p["incidents"]), p["incidents"]
        assert p["audited_parts"] >= 1 and p["audit_bytes"] > 0
        assert sum(p["rounds"]) >= 5  # the two honest peers averaged on without it
    assert b"banning peer " + liar["peer_id"].encode() in (r.workdir / "peer0.log").read_bytes()



def test_sparse_payloads_with_error_feedback_end_in_consensus_with_the_simulators_bytes(run):
    """`--codec top4 --error-feedback` (the 4 largest of every 256 values; reducers send the mean in top16) with
    `--sync-stride 2` (each round half of its fragment, 2 final rounds; one swarm for both, the suite's time): the
    swarm ends in consensus, trained, and its payload bytes are exactly what the simulator's averager
    (`LocalGroup`) counts for the same rounds of the same fragments (each member's part differs with the split, the
    sum over members does not)."""
    codec, stride = "top4", 2
    import torch

    from p2p_diloco.core.averaging import RoundKey
    from p2p_diloco.core.codecs import get_codec
    from p2p_diloco.core.fragments import split_fragments
    from p2p_diloco.core.local_group import LocalGroup
    from p2p_diloco.core.round_subset import subset_size
    from p2p_diloco.task.model import build_model, model_spec

    r = run(2, "--codec", codec, "--error-feedback", "--sync-stride", str(stride))
    report = r.finish()
    assert r.proc.returncode == 0, r.text()
    # The anchors move by 4 of every 256 values of half a fragment per round (error feedback carries the rest
    # to later rounds): after 200 steps they are trained, but slower than fp4's (4.30 in one CI run).
    assert_finishers_agree(report, ["peer0", "peer1"], trained_below=4.8)
    rounds = report["peers"][0]["rounds"]
    # (a round may fail on both members of a loaded machine, as the other swarm tests allow: one CI run lost one,
    # likely to a member that came 3-6 s late in its leader's search, which `CodecAverager` now waits for. What was
    # not averaged is not sent.)
    assert all(p["rounds"] == rounds and sum(p["rounds_failed"]) <= 1 for p in report["peers"]), (
        [(p["name"], p["rounds"], p["rounds_failed"]) for p in report["peers"]], r.text())
    group = LocalGroup(2, get_codec(codec))
    for k, fragment in enumerate(split_fragments(build_model(model_spec("tiny"), 0), 2)):
        for n in range(rounds[k]):
            key = RoundKey("bytes", k, n)
            size = subset_size(fragment.flat().numel(), stride)
            pending = [group.member(m).begin(key, torch.randn(size), 1.0) for m in range(2)]
            for p in pending:
                p.result()
    swarm = [sum(p[f"wire_bytes_{way}"] for p in report["peers"]) for way in ("sent", "received")]
    assert swarm == [sum(group.bytes_sent), sum(group.bytes_received)]
