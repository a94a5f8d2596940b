"""A peer's metrics over a run: JSON lines in its run directory, and the same values to TensorBoard or W&B.

Every progress report of a trainer (`join --run-dir DIR`, which `local-swarm` passes for each trainer) appends one
line to `DIR/metrics-PEER_ID.jsonl`:

    {"time": 1764561000.1, "peer_id": "Qm...", "step": 120, "global_step": 131, "loss": 2.71, "tokens_per_s": 9100,
     "bytes_sent": 312000, "bytes_received": 310000, "rounds": [2, 2, 1], "failed": [0, 0, 0],
     "recovered": [0, 0, 0], "eval_loss": null}

(`rounds`: applied rounds per fragment; `failed`: rounds that failed; `recovered`: rounds whose state was
downloaded from the swarm instead, the heals; `eval_loss`: only on the last line, the agreed parameters'). A
trainer's lines also hold `round_records`: what became of each round since the line before (`StreamingDiLoCo.
_log_round`: fragment, round, start_step, end_step, outcome applied / failed / sat_out / adopted, tokens, peers,
group_weight, and an applied round's members: the group's peer ids), and `trained_at`: the global step of each inner step since the line before (the step its learning
rate followed); the schedule `simulate --replay` reads (`task/replay.py`). A
line is flushed as it is written, so a crashed peer's file holds everything up to its last report.
`p2p-diloco plot DIR` (`node.plots`) draws them.

`--tensorboard DIR` and `--wandb PROJECT` log the same scalars through those packages when they are installed
(optional: `pip install tensorboard` / `pip install wandb`); asking for one that is not installed is an error at
start, naming the package.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time

FIELDS = ("step", "global_step", "loss", "tokens_per_s", "bytes_sent", "bytes_received")
PER_FRAGMENT = ("rounds", "failed", "recovered")


class MetricsError(ValueError):
    """Metrics cannot be written as asked (a directory that cannot be made, a logger that is not installed)."""


def metrics_file(run_dir: str, peer_id: str) -> str:
    return os.path.join(run_dir, f"metrics-{peer_id}.jsonl")


def check_loggers(tensorboard_dir: str | None, wandb_project: str | None) -> None:
    """Raise MetricsError when a logger asked for is not installed (before anything starts)."""
    if tensorboard_dir is not None and importlib.util.find_spec("tensorboard") is None:  # torch's writer needs it
        raise MetricsError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise MetricsError("--wandb needs the wandb package: pip install wandb (and `wandb login`, or "
                           "WANDB_MODE=offline)")


class Metrics:
    """Where one peer's metrics go: a JSON-lines file, and optionally TensorBoard and W&B."""

    def __init__(self, peer_id: str, run_id: str, run_dir: str | None = None, tensorboard_dir: str | None = None,
                 wandb_project: str | None = None):
        check_loggers(tensorboard_dir, wandb_project)
        self.peer_id = peer_id
        self.path = None
        self._file = self._tb = self._wandb = None
        if run_dir is not None:
            try:
                os.makedirs(run_dir, exist_ok=True)
                self.path = metrics_file(run_dir, peer_id)
                self._file = open(self.path, "a", encoding="utf-8")
            except OSError as e:
                raise MetricsError(f"--run-dir {run_dir}: cannot write metrics there ({e.strerror or e})") from None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(tensorboard_dir, f"{run_id}-{peer_id}"))
        if wandb_project is not None:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=f"{run_id}-{peer_id[-8:]}", group=run_id,
                                     config={"run_id": run_id, "peer_id": peer_id}, reinit=True)

    def log(self, values: dict) -> None:
        """One report: `values` holds FIELDS and PER_FRAGMENT (lists), and `eval_loss` on the last one."""
        line = {"time": time.time(), "peer_id": self.peer_id, **{k: _clean(v) for k, v in values.items()}}
        if self._file is not None:
            self._file.write(json.dumps(line, allow_nan=False) + "\n")
            self._file.flush()
        scalars = {name: float(values[name]) for name in FIELDS if _finite(values.get(name))}
        for name in PER_FRAGMENT:
            if isinstance(values.get(name), list):
                scalars[f"{name}_total"] = float(sum(values[name]))
        if _finite(values.get("eval_loss")):
            scalars["eval_loss"] = float(values["eval_loss"])
        step = int(values.get("global_step") or 0)
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clean(value):
    """A non-finite float (a diverged loss) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
