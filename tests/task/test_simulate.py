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
    cmd = [sys.executable, "-m", "p2p_diloco.cli", "simulate", "--model", "tiny", "--speeds", "1,0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--speeds" in proc.stderr and "2 speeds for 4 workers" in proc.stderr


def test_data_parallel_wire_bytes_are_a_ring_allreduce_every_step():
    s = SimSettings(workers=3, steps=5, batch_size=2, model="tiny", eval_every=5, final_eval_batches=2)
    r = run_method("data_parallel", s)
    from p2p_diloco.task.model import build_model, model_spec
    n = sum(p.numel() for p in build_model(model_spec("tiny"), 0).parameters())
    assert r["wire_bytes_per_worker"] == 5 * (2 * 2 * 4 * n // 3)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        run_method("ring_allreduce", SimSettings(model="tiny"))


@pytest.mark.parametrize("delay,expected,bound", [(0, 1, None), (4, 4, None), (30, 11, None), (30, 3, 3),
                                                 (2, 2, 3)])
def test_late_results_land_at_their_delay_within_tau_and_the_period(delay, expected, bound):
    """`LateResults`: a round's mean is applied `delay` steps after the round started, no earlier than tau and no
    later than the run's lateness bound (`max_delay`; by default H - 1), where the core waits for it, on every
    worker alike."""
    import torch

    from p2p_diloco.core.codecs import get_codec
    from p2p_diloco.core.config import DiLoCoConfig
    from p2p_diloco.core.inner import InnerTrainer
    from p2p_diloco.core.local_group import LocalGroup
    from p2p_diloco.core.streaming import StreamingDiLoCo
    from p2p_diloco.task.model import build_model, lm_loss, model_spec
    from p2p_diloco.task.simulate import LateResults

    config = DiLoCoConfig(outer_period=12, fragments=1, tau=1, codec="fp32", warmup_steps=1, max_delay=bound)
    spec = model_spec("tiny")
    group, clock = LocalGroup(2, get_codec("fp32")), [0]
    models = [build_model(spec, 0) for _ in range(2)]
    trainers = [InnerTrainer(m, config, lm_loss) for m in models]
    members = [group.member(w) if delay is None else LateResults(group.member(w), clock, delay) for w in range(2)]
    outer = [StreamingDiLoCo(m, config, a) for m, a in zip(models, members)]
    tokens = torch.randint(0, 256, (1, spec.seq_len + 1), generator=torch.Generator().manual_seed(0))
    started, applied = {}, {}
    for step in range(1, 40):
        for t in trainers:
            t.step(tokens)
        clock[0] = step
        for o in outer:
            o.record_tokens(1)
            o.start_due_rounds(step)
        for k in range(2):
            if outer[0].round_at(k, step) is not None:
                started[(k, outer[0].round_at(k, step))] = step
        before = list(outer[0].stats.applied)
        for o in outer:
            o.finish_due_rounds(step)
        for k in range(2):
            if outer[0].stats.applied[k] > before[k]:
                applied[(k, before[k])] = step
    assert len(applied) >= 4
    assert all(applied[key] - started[key] == expected for key in applied), (started, applied)
    assert all(torch.equal(a, b) for a, b in zip(outer[0].anchors, outer[1].anchors))
