"""A peer's metrics (`node.metrics`): JSON lines, optional TensorBoard; and `plot` (`node.plots`)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from click.testing import CliRunner

from p2p_diloco.cli import main
from p2p_diloco.node.metrics import Metrics, MetricsError, check_loggers, metrics_file
from p2p_diloco.node.plots import PlotError, plot_run, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _report(step: int, **extra) -> dict:
    return {"step": step, "global_step": step + 1, "loss": 5.0 / (1 + step), "tokens_per_s": 1000.0 + step,
            "bytes_sent": 1000 * step, "bytes_received": 900 * step, "rounds": [step // 10, step // 12],
            "failed": [0, 1], "recovered": [0, step // 20], "eval_loss": None, **extra}


def _write_run(run_dir, peers=("QmPeerA", "QmPeerB"), reports=6) -> None:
    for peer in peers:
        m = Metrics(peer, "r", str(run_dir))
        for i in range(reports):
            m.log(_report(10 * i, eval_loss=2.5 if i == reports - 1 else None))
        m.close()


def test_metrics_are_json_lines_a_diverged_loss_is_null_and_a_line_is_flushed_as_written(tmp_path):
    m = Metrics("QmPeer", "r", str(tmp_path / "run"))
    m.log(_report(3))
    with open(metrics_file(str(tmp_path / "run"), "QmPeer")) as f:  # flushed: readable while the peer runs
        first = json.loads(f.readline())
    assert first["peer_id"] == "QmPeer" and first["global_step"] == 4 and first["rounds"] == [0, 0]
    m.log(_report(5, loss=float("nan"), eval_loss=float("inf")))
    m.close()
    with open(metrics_file(str(tmp_path / "run"), "QmPeer")) as f:
        lines = [json.loads(t) for t in f]
    assert len(lines) == 2 and lines[1]["loss"] is None and lines[1]["eval_loss"] is None
    Metrics("QmPeer", "r").log(_report(1))  # no run directory: nothing written, nothing fails


def test_a_run_dir_that_cannot_be_written_or_a_logger_not_installed_is_an_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MetricsError, match=f"--run-dir {blocker}/run: cannot write"):
        Metrics("QmPeer", "r", str(blocker / "run"))
    for package, kwargs in (("tensorboard", {"tensorboard_dir": str(tmp_path)}), ("wandb", {"wandb_project": "p"})):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(MetricsError, match=f"pip install {package}"):
                check_loggers(kwargs.get("tensorboard_dir"), kwargs.get("wandb_project"))


def test_tensorboard_gets_the_same_scalars_when_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = Metrics("QmPeer", "r", None, tensorboard_dir=str(tmp_path / "tb"))
    for i in range(3):
        m.log(_report(i, eval_loss=2.0 if i == 2 else None))
    m.close()
    events = EventAccumulator(str(tmp_path / "tb" / "r-QmPeer"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert events.Scalars("eval_loss")[0].value == pytest.approx(2.0)


def test_plot_draws_four_pngs_from_every_peer_s_metrics_and_skips_broken_lines(tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir)
    with open(metrics_file(str(run_dir), "QmPeerB"), "a") as f:
        f.write('{"global_step": 7, "loss": 1.0\n[1, 2]\n')  # a line cut by a crash, and a stray one
    peers, skipped = read_metrics(str(run_dir))
    assert [p.peer_id for p in peers] == ["QmPeerA", "QmPeerB"] and skipped == 2
    written, skipped = plot_run(str(run_dir))
    assert [os.path.basename(p) for p in written] == ["loss.png", "throughput.png", "bytes.png", "rounds.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG and os.path.getsize(path) > 5000
    result = CliRunner().invoke(main, ["plot", str(run_dir), "--out", str(tmp_path / "pngs")])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "pngs" / n) for n in ("loss.png", "throughput.png", "bytes.png",
                                                                          "rounds.png")]
    assert "skipped 2 line(s)" in result.stderr


def test_plot_of_a_directory_without_metrics_names_the_problem(tmp_path):
    with pytest.raises(PlotError, match="no metrics-\\*.jsonl files"):
        read_metrics(str(tmp_path))
    with pytest.raises(PlotError, match="not a directory"):
        read_metrics(str(tmp_path / "nowhere"))
    (tmp_path / "metrics-QmX.jsonl").write_text("garbage\n")
    with pytest.raises(PlotError, match="no readable line \\(1 skipped\\)"):
        read_metrics(str(tmp_path))
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a directory" in result.output
