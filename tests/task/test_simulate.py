"""The simulator end to end on the tiny model: the CLI, the JSON report and the plot."""

import json
import re
import subprocess
import sys

import pytest

from p2p_diloco.task.simulate import SimSettings, run_method


def test_simulate_cli_writes_report_and_plot(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "p2p_diloco.cli", "simulate", "--model", "tiny", "--workers", "2",
           "--steps", "24", "-H", "6", "--fragments", "2", "--warmup", "2", "--eval-every", "12", "--jobs", "2",
           "--methods", "data_parallel,diloco,streaming_diloco", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the output is a pipe, not a terminal: plain progress lines, no bars (escape codes, carriage returns)
    assert "\x1b[" not in proc.stdout + proc.stderr and "\r" not in proc.stdout + proc.stderr, proc.stderr
    assert re.search(r"^streaming_diloco  done  step 24/24  eval loss [\d.]+", proc.stderr, re.M), proc.stderr
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert set(methods) == {"data_parallel", "diloco", "streaming_diloco"}
    for name, r in methods.items():
        assert r["tokens"] == 24 * 2 * 4 * 32
        assert r["eval_loss"] > 0 and r["wall_s"] > 0 and r["wire_bytes_per_worker"] > 0
        assert len(r["curve"]) == 2
    assert methods["streaming_diloco"]["consensus"] is True
    assert methods["streaming_diloco"]["wire_bytes_per_worker"] < methods["diloco"]["wire_bytes_per_worker"]
    assert methods["diloco"]["wire_bytes_per_worker"] < methods["data_parallel"]["wire_bytes_per_worker"]
    assert (tmp_path / "out.png").stat().st_size > 10_000
    assert "streaming_diloco" in proc.stdout and "vs DP" in proc.stdout


def test_simulate_cli_refuses_bad_values(tmp_path):
    cmd = [sys.executable, "-m", "p2p_diloco.cli", "simulate", "--model", "tiny", "--tau", "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "tau=50" in proc.stderr
    cmd = [sys.executable, "-m", "p2p_diloco.cli", "simulate", "--model", "huge"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "model='huge'" in proc.stderr


def test_data_parallel_wire_bytes_are_a_ring_allreduce_every_step():
    s = SimSettings(workers=3, steps=5, batch_size=2, model="tiny", eval_every=5, final_eval_batches=2)
    r = run_method("data_parallel", s)
    from p2p_diloco.task.model import build_model, model_spec
    n = sum(p.numel() for p in build_model(model_spec("tiny"), 0).parameters())
    assert r["wire_bytes_per_worker"] == 5 * (2 * 2 * 4 * n // 3)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        run_method("ring_allreduce", SimSettings(model="tiny"))
