"""Errors a user can act on: whatever is wrong with a command line is said in one line, before anything starts.

Each case runs the CLI and asserts: a non-zero exit, within 10 s, exactly one line starting with `Error:` on
stderr that names the problem, and no traceback. The cases the issue names run as processes of their own
(the time a user waits: mostly importing torch and hivemind, ~3 s of CPU), two at a time; the rest run in
this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2p_diloco.cli import main
from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.admission import Admission, RunKey
from p2p_diloco.node.checkpoint import (META_NAME, CheckpointError, check_checkpoint_dir, check_checkpoint_target,
                                        save_checkpoint)
from p2p_diloco.node.records import RecordError, RunConfig
from p2p_diloco.swarm import reachability
from p2p_diloco.swarm.dht import BootstrapError, check_initial_peers, probe_initial_peers, start_dht
from p2p_diloco.task.model import model_spec
from pretrained import write_pretrained

ROOT = Path(__file__).resolve().parent.parent
PEER_ID = "12D3KooWJ3fu48MsUqonehgdQgKgWi96Dz94fPgo183WP2Ay8phj"
LIMIT_S = 10.0


@pytest.fixture(scope="module")
def closed_port():
    """A local TCP port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Bad inputs on disk: a plain file, damaged checkpoints, a profile with an unknown key."""
    root = tmp_path_factory.mktemp("cli")
    (root / "a-file").write_text("not a directory\n")
    bad_json = root / "bad-json"
    bad_json.mkdir()
    (bad_json / META_NAME).write_text("{not json")
    (root / "bad-hash").mkdir()
    _fake_checkpoint(root / "bad-hash", state_sha256="0" * 64)
    (root / "profile.toml").write_text('role = "join"\nstepz = 5\n')
    (root / "t5.json").write_text('{"model_type": "t5"}')
    write_pretrained(root / "gpt", Path(__file__).read_text())
    key = RunKey.load_or_create(str(root / "run.key"))[0]
    return {**{name: str(root / name) for name in ("a-file", "bad-json", "bad-hash", "profile.toml", "run.key",
                                                   "t5.json", "gpt")},
            "token-run-r": key.issue("r", None, 3600)}


def _fake_checkpoint(directory: Path, run_id: str = "default", state_sha256: str | None = None) -> None:
    """`checkpoint.json` and a state file, as save_checkpoint writes them (the tensors are not looked at here)."""
    state = directory / "state-5.safetensors"
    state.write_bytes(b"\0" * 64)
    meta = {"format": 1, "run_id": run_id, "global_step": 5.0, "inner_step": 5, "state_file": state.name,
            "state_sha256": state_sha256 or hashlib.sha256(state.read_bytes()).hexdigest()}
    (directory / META_NAME).write_text(json.dumps(meta))


def _cases(port: int, f: dict[str, str]) -> dict[str, tuple[list[str], int, list[str]]]:
    """name -> (arguments, exit code, what the one error line must contain)."""
    unreachable = f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER_ID}"
    peers = ["--initial-peers", unreachable]
    return {
        # bootstrap: unreachable, malformed
        "join-unreachable": (["join", *peers], 1, ["cannot reach the bootstrap peer", unreachable,
                                                    f"127.0.0.1:{port} refused the connection", "firewall",
                                                    "--client-mode"]),
        "status-unreachable": (["status", *peers], 1, ["cannot reach the bootstrap peer", unreachable]),
        "host-unreachable": (["host", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *peers], 1,
                             ["cannot reach the bootstrap peer", unreachable]),
        "join-garbage": (["join", "--initial-peers", "garbage"], 2, ["--initial-peers 'garbage' is not a multiaddr"]),
        "status-garbage": (["status", "--initial-peers", "garbage"], 2,
                           ["--initial-peers 'garbage' is not a multiaddr"]),
        "monitor-garbage": (["monitor", "--initial-peers", "garbage"], 2,
                            ["--initial-peers 'garbage' is not a multiaddr"]),
        "monitor-unreachable": (["monitor", *peers, "--dashboard", "0"], 1,
                                ["cannot reach the bootstrap peer", unreachable]),
        "join-no-peer-id": (["join", "--initial-peers", f"/ip4/127.0.0.1/tcp/{port}"], 2, ["no /p2p/<peer id>"]),
        # fragments against the model's blocks
        "local-swarm-fragments": (["local-swarm", "--fragments", "9"], 2,
                                  ["--fragments 9", "4 transformer blocks", "--model small", "0 to 4"]),
        "host-model-missing-json": (["host", "--model", "/nonexistent/model.json"], 2,
                                    ["--model /nonexistent/model.json: cannot read it"]),
        "host-model-not-causal": (["host", "--model", f["t5.json"]], 2, ["model_type 't5'", "not a causal language"]),
        "host-model-dir-empty": (["host", "--model", f["bad-json"]], 2, ["no config.json in it"]),
        "host-tokenizer-none-there": (["host", "--tokenizer", f["bad-json"]], 2, ["--tokenizer", "no tokenizer in it"]),
        "host-tokenizer-too-big": (["host", "--model", "tiny", "--fragments", "2", "--tokenizer", f["gpt"]], 2,
                                   ["has 400 tokens, more than the model's vocabulary of 256"]),
        "local-swarm-tokenizer-no-dataset": (["local-swarm", "--model", f["gpt"], "--fragments", "2"], 2,
                                             ["a tokenizer goes with --dataset"]),
        "host-eval-without-dashboard": (["host", "--eval-dataset", f["a-file"]], 2,
                                        ["--eval-dataset, --eval-tokenizer and --eval-text-field go with --dashboard"]),
        "host-batch-tokens-and-size": (["host", "--batch-tokens", "512", "--batch-size", "8"], 2,
                                       ["--batch-tokens and --batch-size both set the batch"]),
        # how a trainer computes
        "join-precision-fp8": (["join", *peers, "--precision", "fp8"], 2, ["--precision", "'fp8'"]),
        "join-micro-batch-0": (["join", *peers, "--micro-batch", "0"], 2, ["--micro-batch"]),
        "join-device-nonsense": (["join", *peers, "--device", "abacus"], 2, ["--device", "'abacus' is not a device"]),
        "host-tiny-default-fragments": (["host", "--model", "tiny"], 2,
                                        ["--fragments 4 (the default)", "--model tiny", "0 to 2"]),
        "simulate-tiny-default-fragments": (["simulate", "--model", "tiny", "--methods", "streaming_diloco"], 2,
                                            ["--fragments 4 (the default)", "--model tiny"]),
        # --dataset
        "dataset-with-data": (["join", *peers, "--dataset", f["a-file"], "--data", f["a-file"]], 2,
                              ["--data and --dataset: give one of them"]),
        "text-field-alone": (["join", *peers, "--text-field", "body"], 2, ["--text-field goes with --dataset"]),
        "dataset-wrong-format": (["join", *peers, "--dataset", f["a-file"]], 2,
                                 [f"--dataset {f['a-file']}: no", "files in it"]),
        "dataset-missing": (["local-swarm", "--dataset", "/nonexistent/rows"], 2,
                            ["--dataset /nonexistent/rows: no such file or folder"]),
        # checkpoints and files
        "resume-missing": (["join", *peers, "--resume", "/nonexistent/ckpt"], 1,
                           ["--resume /nonexistent/ckpt", "no such directory"]),
        "resume-bad-json": (["join", *peers, "--resume", f["bad-json"]], 1,
                            [os.path.join(f["bad-json"], META_NAME), "unreadable"]),
        "resume-bad-hash": (["join", *peers, "--resume", f["bad-hash"]], 1,
                            [os.path.join(f["bad-hash"], "state-5.safetensors"), "does not match the recorded"]),
        "checkpoint-dir-is-a-file": (["join", *peers, "--checkpoint-dir", f["a-file"]], 2,
                                     ["--checkpoint-dir", f["a-file"], "a file, not a directory"]),
        "data-missing": (["join", *peers, "--data", "/nonexistent/text"], 2, ["--data", "/nonexistent/text"]),
        "data-one-file": (["join", *peers, "--data", f["a-file"]], 2, ["--data", "single file"]),
        "summary-folder-missing": (["join", *peers, "--summary", "/nonexistent/s.json"], 2,
                                   ["--summary", "/nonexistent does not exist"]),
        "identity-folder-missing": (["host", "--identity", "/nonexistent/host.key"], 2,
                                    ["--identity /nonexistent/host.key", "does not exist"]),
        "identity-not-a-key": (["host", "--identity", f["a-file"]], 2, ["--identity", "not a key file"]),
        "profile-unknown-key": (["join", "--profile", f["profile.toml"], *peers], 2,
                                ["profile.toml", "unknown key 'stepz'"]),
        # admission: tokens, run keys, peer ids
        "join-token-garbage": (["join", *peers, "--token", "hello"], 2, ["--token", "not a join token"]),
        "join-token-damaged": (["join", *peers, "--token", "p2pd-token-1.AAAA"], 2, ["--token", "damaged token"]),
        "join-token-other-run": (["join", *peers, "--token", f["token-run-r"]], 2,
                                 ["--token is for run 'r', not --run-id 'default'"]),
        "host-run-key-not-a-key": (["host", "--run-key", f["a-file"]], 2, ["--run-key", "not a PEM private key"]),
        "admit-bad-peer": (["admit", "--run-key", f["run.key"], "--peer", "nobody"], 2,
                           ["--peer 'nobody' is not a peer id"]),
        "admit-no-key": (["admit", "--run-key", "/nonexistent/run.key"], 2, ["--run-key", "/nonexistent/run.key"]),
        "admit-valid-for-0": (["admit", "--run-key", f["run.key"], "--valid-for", "0"], 2, ["--valid-for"]),
        "admit-seats-0": (["admit", "--run-key", f["run.key"], "--seats", "0"], 2, ["--seats", "0 is not in the range"]),
        "admit-seats-and-peer": (["admit", "--run-key", f["run.key"], "--seats", "3", "--peer", "QmYWjqLkAHMFUeoLHG"
                                  "c9F3J7mmMQAk5PiTP97racYQdjxb"], 2, ["--seats limits a token for anyone"]),
        "status-token-garbage": (["status", *peers, "--token", "x"], 2, ["--token", "not a join token"]),
        # numbers and names
        "join-steps-0": (["join", *peers, "--steps", "0"], 2, ["--steps", "0 is not in the range"]),
        "join-threads-0": (["join", *peers, "--threads", "0"], 2, ["--threads"]),
        "join-run-dir-a-file": (["join", *peers, "--run-dir", f["a-file"]], 2, ["--run-dir", "not a directory"]),
        "join-run-dir-under-a-file": (["join", *peers, "--run-dir", f["a-file"] + "/run"], 2,
                                      ["--run-dir", "cannot be created"]),
        "plot-nowhere": (["plot", "/nonexistent/run"], 2, ["/nonexistent/run: not a directory"]),
        "join-bandwidth-negative": (["join", *peers, "--bandwidth", "-5"], 2, ["--bandwidth"]),
        "status-bad-run-id": (["status", *peers, "--run-id", "a.b"], 2, ["--run-id", "'a.b'"]),
        "simulate-bad-method": (["simulate", "--methods", "diloco,bogus"], 2, ["--methods", "'bogus'", "diloco"]),
        "simulate-jobs-0": (["simulate", "--jobs", "0"], 2, ["--jobs"]),
        "simulate-json-folder-missing": (["simulate", "--json", "/nonexistent/r.json"], 2, ["--json", "/nonexistent"]),
    }


# the listed ones run as a process of their own (the time a user waits); the rest in this one, through click
IN_A_PROCESS = ["join-unreachable", "status-unreachable", "join-garbage", "local-swarm-fragments", "resume-missing",
                "resume-bad-hash", "join-steps-0", "simulate-bad-method"]
IN_THIS_PROCESS = [name for name in _cases(0, dict.fromkeys(["a-file", "bad-json", "bad-hash", "profile.toml",
                                                              "run.key", "token-run-r", "t5.json", "gpt"], ""))
                   if name not in IN_A_PROCESS]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float | None = None  # user + system time of the process and the children it waited for


def _run(args: list[str]) -> Outcome:
    """The CLI in a process of its own; its CPU time from wait4 (what it cost, whatever else the machine runs)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "p2p_diloco.cli", *args], cwd=ROOT, stdout=out, stderr=err,
                                text=True)
        killer = threading.Timer(30.0, proc.kill)  # a hung case fails, it does not hang the suite
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Outcome(proc.returncode, out.read(), err.read(), wall, usage.ru_utime + usage.ru_stime)


@pytest.fixture(scope="module")
def processes(request, closed_port, files) -> dict[str, Future]:
    """Every selected process case, started at once on a pool of two (each test waits for its own)."""
    cases = _cases(closed_port, files)
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "callspec", None) and item.module is request.module
                and item.originalname == "test_a_bad_command_line_fails_at_once_in_one_line"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(_run, cases[name][0]) for name in dict.fromkeys(selected)}


def _assert_one_clear_line(case: str, outcome: Outcome, expected_code: int, needles: list[str]) -> None:
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("Error:")]
    assert outcome.code == expected_code, outcome.stderr
    assert len(errors) == 1, outcome.stderr
    assert all(n in errors[0] for n in needles), (needles, errors[0])
    assert "Traceback" not in outcome.stdout + outcome.stderr
    _assert_quick(case, outcome)


def _assert_quick(case: str, outcome: Outcome) -> None:
    """Within LIMIT_S of wall-clock time. On a machine kept busy by others (load above twice its cores, beyond
    this file's two processes) the wall clock measures them: then the case's own CPU time must stay within it,
    and the wall clock is only reported."""
    took = f"{case} took {outcome.wall_s:.1f}s" + (f" ({outcome.cpu_s:.1f}s of CPU)" if outcome.cpu_s else "")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if outcome.wall_s >= LIMIT_S and outcome.cpu_s is not None and load > 2 * cores:
        assert outcome.cpu_s < LIMIT_S, took
        warnings.warn(f"{took} with a load of {load:.1f} on {cores} cores: the wall clock is not checked")
        return
    assert outcome.wall_s < LIMIT_S, took


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_a_bad_command_line_fails_at_once_in_one_line(case, processes, closed_port, files):
    _, expected_code, needles = _cases(closed_port, files)[case]
    _assert_one_clear_line(case, processes[case].result(), expected_code, needles)


@pytest.mark.parametrize("case", IN_THIS_PROCESS)
def test_every_flag_is_checked_before_anything_starts(case, closed_port, files):
    args, expected_code, needles = _cases(closed_port, files)[case]
    start = time.monotonic()
    result = CliRunner().invoke(main, args)
    outcome = Outcome(result.exit_code, result.stdout, result.stderr, time.monotonic() - start)
    _assert_one_clear_line(case, outcome, expected_code, needles)


def test_verbose_logs_the_detail_of_an_error(caplog, closed_port):
    refused = f"/ip4/127.0.0.1/tcp/{closed_port}/p2p/{PEER_ID}"
    with caplog.at_level(logging.DEBUG, logger="p2p_diloco.flag_checks"):
        result = CliRunner().invoke(main, ["-v", "status", "--initial-peers", refused])
    assert result.exit_code == 1 and "cannot reach the bootstrap peer" in result.stderr
    assert any(r.levelno == logging.DEBUG and r.exc_info and isinstance(r.exc_info[1], BootstrapError)
               for r in caplog.records)


# the checks behind the CLI, in process


@pytest.mark.parametrize("maddr,message", [
    ("garbage", "is not a multiaddr"),
    ("/ip4/1.2.3.4/tcp/31337", "no /p2p/<peer id>"),
    ("/ip4/1.2.3.4/tcp/1/p2p/x", "is not a multiaddr"),
    ("/ip4/300.1.1.1/tcp/1/p2p/" + PEER_ID, "is not a multiaddr"),
])
def test_bad_initial_peers_are_named(maddr, message):
    with pytest.raises(BootstrapError, match=message) as e:
        check_initial_peers(["/ip4/1.2.3.4/tcp/31337/p2p/" + PEER_ID, maddr])
    assert repr(maddr) in str(e.value)


def test_good_initial_peers_pass():
    good = ["/ip4/1.2.3.4/tcp/31337/p2p/" + PEER_ID, "/dns4/example.org/tcp/31337/p2p/" + PEER_ID,
            "/ip6/::1/tcp/31337/p2p/" + PEER_ID]
    assert check_initial_peers(good) == good


def test_the_probe_names_each_unreachable_peer_and_passes_when_one_answers(closed_port):
    refused = f"/ip4/127.0.0.1/tcp/{closed_port}/p2p/{PEER_ID}"
    problems = probe_initial_peers([refused])
    assert problems and "refused the connection" in problems[0] and refused in problems[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        alive = f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}/p2p/{PEER_ID}"
        assert probe_initial_peers([refused, alive]) is None
    assert probe_initial_peers(["/ip4/127.0.0.1/udp/1/quic/p2p/" + PEER_ID]) is None  # only the daemon can tell


def test_an_unreachable_bootstrap_peer_is_a_bootstrap_error_and_the_dial_back_degrades(closed_port):
    refused = f"/ip4/127.0.0.1/tcp/{closed_port}/p2p/{PEER_ID}"
    with pytest.raises(BootstrapError, match="refused the connection") as e:
        start_dht([refused], client_mode=True)
    assert "failed to connect to bootstrap peers" in str(e.value.__cause__)  # the daemon's words, for --verbose
    reach = reachability.check([refused], ["/ip4/127.0.0.1/tcp/0"], [])
    assert reach.reachable is None and "failed to connect to bootstrap peers" in reach.error


def test_a_run_config_with_more_fragments_than_blocks_is_refused():
    run = RunConfig("r", DiLoCoConfig(fragments=2), model_spec("tiny"), 4, "stdlib")
    assert RunConfig.decode(run.encode()) == run
    bad = RunConfig("r", DiLoCoConfig(fragments=3), model_spec("tiny"), 4, "stdlib")
    with pytest.raises(RecordError, match="fragments=3, but the model has only 2 transformer blocks"):
        RunConfig.decode(bad.encode())


def test_a_saved_checkpoint_passes_the_early_check(tmp_path):
    from p2p_diloco.core.codecs import get_codec
    from p2p_diloco.core.inner import InnerTrainer
    from p2p_diloco.core.local_group import LocalGroup
    from p2p_diloco.core.streaming import StreamingDiLoCo
    from p2p_diloco.task.model import build_model, lm_loss

    config = DiLoCoConfig(fragments=2)
    model = build_model(model_spec("tiny"), 0)
    outer = StreamingDiLoCo(model, config, LocalGroup(1, get_codec("fp4")).member(0), run_id="r")
    path = save_checkpoint(str(tmp_path), "r", model_spec("tiny"), outer, InnerTrainer(model, config, lm_loss), 7)
    summary = check_checkpoint_dir(str(tmp_path), "r")
    assert (summary.path, summary.run_id, summary.global_step, summary.inner_step) == (path, "r", 7.0, 0)


@pytest.mark.parametrize("damage,message", [
    (lambda d: None, None),
    (lambda d: (d / META_NAME).unlink(), "checkpoint.json: missing"),
    (lambda d: (d / "state-5.safetensors").unlink(), "state-5.safetensors: missing"),
    (lambda d: (d / "state-5.safetensors").write_bytes(b"\1" * 64), "does not match the recorded"),
    (lambda d: _fake_checkpoint(d, run_id="other"), "a checkpoint of run 'other', not 'default'"),
    (lambda d: (d / META_NAME).write_text('{"format": 9}'), "format 9, expected 1"),
    (lambda d: (d / META_NAME).write_text(
        (d / META_NAME).read_text().replace("state-5.safetensors", "../x.safetensors")), "bad state_file"),
])
def test_the_early_checkpoint_check_names_the_file(tmp_path, damage, message):
    _fake_checkpoint(tmp_path)
    damage(tmp_path)
    if message is None:
        assert check_checkpoint_dir(str(tmp_path), "default").global_step == 5.0
    else:
        with pytest.raises(CheckpointError, match=message):
            check_checkpoint_dir(str(tmp_path), "default")


def test_checkpoint_targets(tmp_path):
    check_checkpoint_target(str(tmp_path))
    check_checkpoint_target(str(tmp_path / "new" / "deeper"))  # created when saving
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match="a file, not a directory"):
        check_checkpoint_target(str(tmp_path / "f"))
    with pytest.raises(CheckpointError, match="cannot be created"):
        check_checkpoint_target(str(tmp_path / "f" / "sub"))


def test_admit_prints_a_token_for_a_peer_that_identity_prints(tmp_path):
    runner = CliRunner()
    key_file, run_key = str(tmp_path / "me.key"), str(tmp_path / "run.key")
    made = runner.invoke(main, ["identity", key_file])
    assert made.exit_code == 0, made.output
    peer_id = made.stdout.strip().splitlines()[-1]
    assert peer_id.startswith("Qm") and runner.invoke(main, ["identity", key_file]).stdout.strip() == peer_id
    key = RunKey.load_or_create(run_key)[0]
    issued = runner.invoke(main, ["admit", "--run-key", run_key, "--run-id", "pub", "--peer", peer_id,
                                  "--valid-for", "2"])
    assert issued.exit_code == 0, issued.output
    token = issued.stdout.strip().splitlines()[-1]
    admission = Admission("pub", key.public)
    assert admission.problem(token, peer_id) is None and "not QmOther" in admission.problem(token, "QmOther")
    assert f"admits: run 'pub', peer {peer_id}, valid until" in issued.stderr
    anyone = runner.invoke(main, ["admit", "--run-key", run_key, "--run-id", "pub"])
    assert "give it out with care" in anyone.stderr
    assert admission.problem(anyone.stdout.strip().splitlines()[-1], "QmOther") is None
    limited = runner.invoke(main, ["admit", "--run-key", run_key, "--run-id", "pub", "--seats", "5"])
    assert limited.exit_code == 0 and "up to 5 identities" in limited.stderr and "run.key.seats.json" in limited.stderr
    assert "redeemed at the host" in admission.problem(limited.stdout.strip().splitlines()[-1], "QmOther")
