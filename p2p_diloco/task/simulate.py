"""One-process simulator: M workers on the embedded task, every method on the same token budget.

Methods (all see the same tokens: worker w reads shard w with the same seed):
  data_parallel     one model, M times the batch (= gradients averaged every step)
  diloco            the whole model is one fragment, fp32, blocking (tau = 0, alpha = 0)
  streaming_diloco  P block fragments + 1, staggered, tau, alpha, a quantized codec
  and variants (see METHODS).

Wire bytes are counted from the encoded payloads of the simulated butterfly
all-reduce (`LocalGroup`); data_parallel is charged a ring all-reduce of fp32
gradients every step: 2 (M - 1) / M * 4 * N bytes per worker.
Eval loss is the held-out loss of the anchor (global) parameters.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..core.aggregation import Aggregation
from ..core.averaging import FragmentAverager, PendingAverage, RoundKey
from ..core.codecs import get_codec
from ..core.config import ConfigError, DiLoCoConfig
from ..core.inner import InnerTrainer
from ..core.local_group import LocalGroup
from ..core.streaming import StreamingDiLoCo
from ..node.attacks import Attack
from ..node.attacks import parse as parse_attack
from .data import BatchStream, Corpus
from .model import ModelSpec, build_model, evaluate, lm_loss, model_spec
from .replay import ReplayScript, check_data, comparison, read_run
from .swarm_script import Board, LatePending, ScriptedMember, SwarmScript

# name -> overrides of the base DiLoCoConfig; None marks data-parallel
METHODS: dict[str, dict[str, Any] | None] = {
    "data_parallel": None,
    "diloco": dict(fragments=0, tau=0, alpha=0.0, codec="fp32"),
    "streaming_diloco": dict(codec="fp4"),
    "streaming_diloco_ef": dict(codec="fp4", error_feedback=True),
    "streaming_diloco_fp32": dict(codec="fp32"),
    "streaming_diloco_int2": dict(codec="int2"),
    "streaming_diloco_int2_ef": dict(codec="int2", error_feedback=True),
    "streaming_diloco_sign1_ef": dict(codec="sign1", error_feedback=True),
    "streaming_diloco_top4_ef": dict(codec="top4", error_feedback=True),
    # SparseLoCo (arXiv 2508.15706): error feedback decayed by beta in place of the outer momentum, plain
    # outer step of lr 1, every worker back on the global parameters after a round
    "sparseloco_top4": dict(codec="top4", error_feedback=True, ef_decay=0.95, outer_momentum=0.0, outer_lr=1.0,
                            alpha=0.0),
    # a share of each fragment per round, the same values on every member (core/round_subset.py): no indices
    # travel and the mean is as small as a contribution
    "streaming_diloco_fp4_stride5": dict(codec="fp4", sync_stride=5),
    "streaming_diloco_int2_ef_stride3": dict(codec="int2", error_feedback=True, sync_stride=3),
    "streaming_diloco_sign1_ef_stride2": dict(codec="sign1", error_feedback=True, sync_stride=2),
    # MuLoCo (arXiv 2505.23725): Muon inner steps for the blocks' matrices
    "streaming_diloco_muon": dict(codec="fp4", inner_optimizer="muon"),
    "streaming_diloco_int2_ef_muon": dict(codec="int2", error_feedback=True, inner_optimizer="muon"),
    "sparseloco_top4_muon": dict(codec="top4", error_feedback=True, ef_decay=0.95, outer_momentum=0.0,
                                 outer_lr=1.0, alpha=0.0, inner_optimizer="muon"),
}
DEFAULT_METHODS = ("data_parallel", "diloco", "streaming_diloco", "streaming_diloco_ef")
# each method's inner lr: its best of the sweep {2e-3, 4e-3, 8e-3, 1.6e-2} reported in the README
DEFAULT_INNER_LR: dict[str, float] = {name: 8e-3 for name in METHODS}
PLAIN_PROGRESS_EVERY_S = 10.0  # a progress line per method this often when the output is not a terminal


@dataclass
class SimSettings:
    workers: int = 4
    steps: int = 3000
    batch_size: int = 4  # sequences per worker per inner step
    model: str = "small"
    eval_every: int = 100
    eval_batches: int = 8
    final_eval_batches: int = 32
    data: list[str] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)  # DiLoCoConfig values shared by every method
    inner_lr: dict[str, float] = field(default_factory=dict)  # per-method inner lr overrides
    attack: str = ""  # the last worker is malicious (`node.attacks` spec, e.g. "scale:1000"); "": nobody
    protected: bool = True  # False: reducers neither refuse outliers nor cap weights (to measure what that is worth)
    # inner steps after its start at which each round's mean is ready (`LateResults`), as a swarm's late results
    # land; the core takes it at tau at the earliest and waits for it at H - 1 at the latest. None: ready at once
    delay: int | None = None
    # the swarm as it runs (`swarm_script.SwarmScript`): speeds (inner steps per tick), a chance to miss a round,
    # groups of fewer workers, the last worker away for rounds on end; and what a worker that cannot fetch the
    # swarm's newer state does (`StreamingDiLoCo.stale_anchor`: "average" with its own, or "sit_out")
    speeds: list[float] | None = None
    fail: float = 0.0
    group: int | None = None
    away: int = 0
    stale_anchor: str | None = None
    # rules for unequal and stale peers, measured against the defaults (README: Unequal peers): each worker's inner
    # lr divided by its speed (Rescaled ASGD, arXiv 2605.13434); "heloco": each outer gradient corrected against the
    # outer momentum (arXiv 2606.00271); an age decay rate > 0: a part averaged from a stale anchor weighs less (CGAD,
    # arXiv 2605.09126). See `core/outer_corrections.py`
    lr_by_speed: bool = False
    correction: str | None = None
    age_decay: float = 0.0
    # a finished swarm's directory whose schedule, config, model, seeds and data order to replay (`task/replay.py`);
    # it sets workers, steps and the batch, and the method's config is the run's own
    replay: str | None = None

    def script(self) -> SwarmScript | ReplayScript:
        if self.replay:
            return ReplayScript(read_run(self.replay))
        return SwarmScript(self.workers, tuple(self.speeds) if self.speeds else None, self.fail, self.group,
                           self.away, seed=int(self.base.get("seed", 0)))

    def model_spec(self) -> ModelSpec:
        return read_run(self.replay).run.model if self.replay else model_spec(self.model)

    def config_for(self, method: str) -> DiLoCoConfig:
        if self.replay:  # the run's own config (with a replay's what-ifs, `base`: --overlap, --max-delay)
            config = read_run(self.replay).run.diloco
            return dataclasses.replace(config, **self.base) if self.base else config
        values = dict(self.base)
        values.setdefault("total_steps", self.steps)
        overrides = METHODS[method]
        if overrides:
            values.update(overrides)
        if method in self.inner_lr:
            values["inner_lr"] = self.inner_lr[method]
        return DiLoCoConfig(**values)


class SimulationFailed(RuntimeError):
    """A method's process failed; the message says which and why."""


def _ring_allreduce_bytes(numel: int, workers: int) -> int:
    return 2 * (workers - 1) * 4 * numel // workers


def run_method(method: str, settings: SimSettings, progress: Callable[[int, float], None] | None = None) -> dict:
    """Train one method for `settings.steps` inner steps; return its summary."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(1)
    config = settings.config_for(method)
    spec = settings.model_spec()
    if spec.vocab_size < 256:
        raise ConfigError(f"--model {settings.model}: a vocabulary of {spec.vocab_size}; simulate reads its data as "
                          "bytes (256 ids)")
    weights = settings.model if spec.weights else None  # (a model directory's pretrained weights)
    if settings.replay and (spec.weights or spec.tokenizer):
        raise ConfigError(f"--replay {settings.replay}: the run trained a model with pretrained weights or a "
                          "tokenizer; a replay builds its model from the run config alone and reads bytes")
    corpus = Corpus.load(settings.data or None)
    eval_batches = corpus.eval_batches(spec.seq_len, 16, settings.final_eval_batches)
    if settings.replay:  # each peer's own data order, as `swarm/peer.py` reads it
        check_data(read_run(settings.replay), corpus.description)
        streams = [BatchStream(corpus.train, spec.seq_len, settings.batch_size, seed=p.data_seed)
                   for p in read_run(settings.replay).peers]
    else:
        streams = [BatchStream(corpus.shard(w, settings.workers), spec.seq_len, settings.batch_size,
                               seed=config.seed * 1000 + w) for w in range(settings.workers)]
    eval_model = build_model(spec, config.seed, weights)
    tokens_per_step = settings.workers * settings.batch_size * spec.seq_len
    curve: list[tuple[int, float]] = []
    start = time.time()
    result: dict[str, Any] = {"config": config.to_dict()}

    if METHODS[method] is None:
        model = build_model(spec, config.seed, weights)
        trainer = InnerTrainer(model, config, lm_loss)
        numel = sum(p.numel() for p in model.parameters())

        def global_model():
            return model

        for step in range(1, settings.steps + 1):
            loss = trainer.step(torch.cat([s.next() for s in streams]))
            if step % settings.eval_every == 0 or step == settings.steps:
                curve.append((step * tokens_per_step, evaluate(model, eval_batches[:settings.eval_batches])))
            if progress:
                progress(step, loss)
        wire = _ring_allreduce_bytes(numel, settings.workers) * settings.steps
        result.update(wire_bytes_per_worker=wire, wire_bytes_received_per_worker=wire)
    else:
        aggregation = Aggregation(config.aggregation) if settings.protected \
            else Aggregation.unprotected(config.aggregation)
        script = settings.script()
        group = LocalGroup(settings.workers, get_codec(config.codec), aggregation=aggregation,
                           split=getattr(script, "group_of", None))  # (a replay: the groups its swarm formed)
        models = [build_model(spec, config.seed, weights) for _ in range(settings.workers)]
        trainers = [InnerTrainer(m, config, lm_loss) for m in models]
        members = [group.member(w) for w in range(settings.workers)]
        attack = parse_attack(settings.attack)
        if attack is not None:
            members[-1] = _Attacker(members[-1], attack)
        clock = [0]  # the step the workers are at
        if script.scripted:
            board = Board()
            members = [ScriptedMember(m, w, script, board, clock) for w, m in enumerate(members)]
        if settings.delay is not None:
            members = [LateResults(m, clock, settings.delay) for m in members]
        outer = [StreamingDiLoCo(m, config, a, run_id=f"sim-{method}") for m, a in zip(models, members)]
        if settings.delay is not None:  # what a result asked to land `delay` steps late does: tau..the bound
            result["delay"] = min(max(settings.delay, config.tau), outer[0].max_delay)
        for o in outer:
            o.stale_anchor = settings.stale_anchor or o.stale_anchor
            o.correction, o.age_decay = settings.correction, settings.age_decay
        speeds = getattr(script, "speeds", None) or [1.0] * settings.workers
        lr_scale = [1.0 / s if settings.lr_by_speed else 1.0 for s in speeds]
        trained = [0] * settings.workers  # inner steps of each worker

        def global_model():
            outer[0].load_anchors_into(eval_model)
            return eval_model

        for step in range(1, settings.steps + 1):
            losses = []
            for w, (t, s, o) in enumerate(zip(trainers, streams, outer)):
                for _ in range(script.steps(w, step)):
                    # learning rates follow the swarm's clock, as a swarm's peers' do (tick t: global step t - 1;
                    # a worker that makes every step is where its own count is)
                    losses.append(t.step(s.next(), schedule_step=step - 1, lr_scale=lr_scale[w]))
                    o.record_tokens(settings.batch_size * spec.seq_len)
                    trained[w] += 1
            clock[0] = step
            for o in outer:
                o.start_due_rounds(step)
            for o in outer:
                o.finish_due_rounds(step)
            if step == settings.steps:  # bring every fragment's last progress into the anchors
                for o in outer:
                    o.finish_in_flight()
                for final_pass in range(outer[0].final_passes):
                    for o in outer:
                        o.start_final_rounds(step, final_pass=final_pass)
                    for o in outer:
                        o.finish_in_flight()
                if script.scripted:  # as a swarm's peers do at the end: take the swarm's state where it differs
                    for o in outer:
                        o.reconcile()
            if step % settings.eval_every == 0 or step == settings.steps:
                curve.append((sum(trained) * settings.batch_size * spec.seq_len,
                              evaluate(global_model(), eval_batches[:settings.eval_batches])))
            if progress and losses:
                progress(step, sum(losses) / len(losses))
        consensus = all(torch.equal(a, b) for o in outer[1:] for a, b in zip(outer[0].anchors, o.anchors))
        result.update(
            wire_bytes_per_worker=max(group.bytes_sent),
            wire_bytes_received_per_worker=max(group.bytes_received),
            rounds_applied=outer[0].stats.applied,
            rounds_failed=outer[0].stats.failed,
            consensus=consensus,
            parts_refused=group.refused,
        )
        if script.scripted:
            result.update(
                inner_steps=trained,
                rounds_applied_per_worker=[sum(o.stats.applied) for o in outer],
                rounds_recovered_per_worker=[sum(o.stats.recovered) for o in outer],
                rounds_failed_per_worker=[sum(o.stats.failed) for o in outer],
            )
        if settings.replay:
            result["groups_differ"] = script.groups_differ
            if not consensus:  # a swarm that ended apart: each worker beside its own peer
                result["eval_loss_per_worker"] = []
                for o in outer:
                    o.load_anchors_into(eval_model)
                    result["eval_loss_per_worker"].append(evaluate(eval_model, eval_batches))
    result.update(
        eval_loss=evaluate(global_model(), eval_batches),
        tokens=settings.steps * tokens_per_step if METHODS[method] is None
        else sum(trained) * settings.batch_size * spec.seq_len,
        wall_s=round(time.time() - start, 2),
        curve=curve,
    )
    return result


class _Attacker(FragmentAverager):
    """A member that poisons what it sends (`node.attacks`)."""

    def __init__(self, member: FragmentAverager, attack: Attack):
        self.member, self.attack = member, attack

    def begin(self, key: RoundKey, outer_grad: torch.Tensor, weight: float) -> PendingAverage:
        return self.member.begin(key, *self.attack.poison(outer_grad, weight))


class LateResults(FragmentAverager):
    """A member whose every round's mean is ready `delay` inner steps after the round started (the step in
    `clock[0]`), as results land late in a swarm; until then `done()` says no and the core trains on."""

    def __init__(self, member: FragmentAverager, clock: list[int], delay: int):
        self.member, self.clock, self.delay = member, clock, delay

    def begin(self, key: RoundKey, outer_grad: torch.Tensor, weight: float) -> PendingAverage:
        return LatePending(self.member.begin(key, outer_grad, weight), self.clock, self.clock[0] + self.delay)


def _worker(label: str, method: str, settings: SimSettings, queue) -> None:
    try:
        last = [0.0]

        def progress(step: int, loss: float) -> None:
            now = time.time()
            if now - last[0] > 0.5 or step == settings.steps:
                last[0] = now
                queue.put(("progress", label, step, loss))

        queue.put(("done", label, run_method(method, settings, progress)))
    except BaseException as e:  # report, never hang the parent
        queue.put(("error", label, f"{type(e).__name__}: {e}"))


class _Progress:
    """A tqdm bar per run on a terminal; elsewhere (a log file, a pipe, CI) a plain line per running run every
    `every` seconds and one when it ends, on stderr: no cursor moves or carriage returns in a log."""

    def __init__(self, runs: list[tuple[str, str, SimSettings]], every: float = PLAIN_PROGRESS_EVERY_S):
        self.width = max(len(label) for label, _, _ in runs)
        self.total = {label: s.steps for label, _, s in runs}
        self.at: dict[str, tuple[int, float | None, float]] = {}  # running: (step, loss, started)
        self.every, self.last = every, time.monotonic()
        self.bars = None
        if sys.stderr.isatty() and sys.stdout.isatty():
            from tqdm import tqdm

            self.bars = {label: tqdm(total=s.steps, desc=label.rjust(self.width), position=i, leave=True,
                                     unit="step", mininterval=1.0) for i, (label, _, s) in enumerate(runs)}

    def started(self, label: str) -> None:
        self.at[label] = (0, None, time.monotonic())
        if self.bars:
            self.bars[label].reset()  # the rate and elapsed time count from now, not from when the bar was made

    def step(self, label: str, step: int, loss: float) -> None:
        self.at[label] = (step, loss, self.at[label][2])
        if self.bars:
            self.bars[label].n = step
            self.bars[label].set_postfix(loss=f"{loss:.3f}")
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            for name, (n, value, _) in self.at.items():
                loss_text = f"  loss {value:.3f}" if value is not None else ""
                self._line(f"{name:<{self.width}}  step {n}/{self.total[name]}{loss_text}")

    def ended(self, label: str, result: dict | None) -> None:
        _, _, started = self.at.pop(label)
        if self.bars:
            if result:
                self.bars[label].set_postfix(eval=f"{result['eval_loss']:.4f}")
        elif result:
            self._line(f"{label:<{self.width}}  done  step {self.total[label]}/{self.total[label]}  "
                       f"eval loss {result['eval_loss']:.4f}  ({time.monotonic() - started:.0f} s)")
        else:
            self._line(f"{label:<{self.width}}  failed")

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        for b in (self.bars or {}).values():
            b.close()


def _run_all(runs: list[tuple[str, str, SimSettings]], jobs: int, keep_failures: bool = False) -> dict[str, dict]:
    """Run (label, method, settings) jobs in `jobs` processes, with their progress (`_Progress`). A failed job
    raises SimulationFailed once all are done; with `keep_failures` it is in the results as {"error": why}."""
    for _, method, settings in runs:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        settings.config_for(method)  # refuse a bad config before starting anything
        settings.model_spec()
        if settings.data:
            Corpus.load(settings.data, max_bytes=1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    progress = _Progress(runs)
    todo, running, results, errors = list(runs), {}, {}, {}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                label, method, settings = todo.pop(0)
                running[label] = ctx.Process(target=_worker, args=(label, method, settings, queue), daemon=True)
                running[label].start()
                progress.started(label)
            try:
                kind, label, *rest = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check for workers that died without a word
                for label, p in list(running.items()):
                    if not p.is_alive():
                        errors[label] = f"process exited with code {p.exitcode}"
                        del running[label]
                        progress.ended(label, None)
                continue
            if kind == "progress":
                progress.step(label, *rest)
            else:
                running.pop(label).join()
                if kind == "done":
                    results[label] = rest[0]
                else:
                    errors[label] = rest[0]
                progress.ended(label, results.get(label))
    finally:
        for p in running.values():
            p.kill()
        progress.close()
    if errors and not keep_failures:
        raise SimulationFailed("; ".join(f"{label}: {e}" for label, e in errors.items()))
    return {**results, **{label: {"error": e} for label, e in errors.items()}}


def simulate(methods: list[str], settings: SimSettings, jobs: int) -> dict:
    start = time.time()
    results = _run_all([(m, m, settings) for m in methods], jobs)
    return {"settings": asdict(settings), "wall_s": round(time.time() - start, 2),
            "methods": {m: results[m] for m in methods}}


def replay(settings: SimSettings) -> dict:
    """The recorded swarm in `settings.replay`, replayed; its report holds the swarm's own results beside."""
    start = time.time()
    result = _run_all([("replay", "streaming_diloco", settings)], 1)["replay"]
    recorded = read_run(settings.replay)
    return {"settings": asdict(settings), "wall_s": round(time.time() - start, 2), "methods": {"replay": result},
            "swarm": recorded.summary(), "comparison": comparison(recorded, result)}


def sweep(methods: list[str], settings: SimSettings, inner_lrs: list[float], jobs: int) -> dict:
    """Every method with every inner lr; `methods` holds each method's best, `sweep` all of them."""
    start = time.time()
    runs = []
    for m in methods:
        for lr in inner_lrs:
            s = SimSettings(**{**asdict(settings), "inner_lr": {**settings.inner_lr, m: lr}})
            runs.append((f"{m}@{lr:g}", m, s))
    results = _run_all(runs, jobs)
    table = {m: {f"{lr:g}": results[f"{m}@{lr:g}"]["eval_loss"] for lr in inner_lrs} for m in methods}
    best = {m: min(inner_lrs, key=lambda lr: results[f"{m}@{lr:g}"]["eval_loss"]) for m in methods}
    return {"settings": asdict(settings), "wall_s": round(time.time() - start, 2),
            "sweep": {"inner_lr": inner_lrs, "eval_loss": table, "best_inner_lr": {m: best[m] for m in methods}},
            "methods": {m: results[f"{m}@{best[m]:g}"] for m in methods}}


def summary_table(report: dict) -> str:
    methods = report["methods"]
    dp = methods.get("data_parallel")
    rows = [f"{'method':>22} {'eval_loss':>9} {'vs DP':>7} {'wire MB/worker':>14} {'DP/wire':>8} {'wall s':>7}"]
    for name, r in methods.items():
        vs = f"{100 * (r['eval_loss'] / dp['eval_loss'] - 1):+.1f}%" if dp else "-"
        ratio = f"{dp['wire_bytes_per_worker'] / r['wire_bytes_per_worker']:.0f}x" if dp else "-"
        rows.append(f"{name:>22} {r['eval_loss']:9.4f} {vs:>7} {r['wire_bytes_per_worker'] / 1e6:14.2f} "
                    f"{ratio:>8} {r['wall_s']:7.0f}")
    return "\n".join(rows)


def sweep_table(report: dict) -> str:
    sw = report["sweep"]
    lrs = [f"{lr:g}" for lr in sw["inner_lr"]]
    rows = [f"{'inner lr sweep':>22} " + " ".join(f"{lr:>9}" for lr in lrs) + "  best"]
    for m, losses in sw["eval_loss"].items():
        rows.append(f"{m:>22} " + " ".join(f"{losses[lr]:9.4f}" for lr in lrs) + f"  {sw['best_inner_lr'][m]:g}")
    return "\n".join(rows)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in report["methods"].items():
        xs, ys = zip(*r["curve"])
        ax.plot([x / 1e6 for x in xs], ys, label=f"{name} ({r['eval_loss']:.3f})")
    s = report["settings"]
    ax.set_xlabel("tokens (millions, all workers)")
    ax.set_ylabel("held-out loss of the global parameters (nats/byte)")
    ax.set_title(f"{s['workers']} workers, {s['steps']} steps, model {s['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    lo = min(min(y for _, y in r["curve"]) for r in report["methods"].values())
    ax.set_ylim(lo * 0.97, lo * 1.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
