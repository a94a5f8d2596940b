"""`p2p-diloco plot RUN_DIR`: PNGs from the peers' metrics files (`node.metrics`).

Reads every `metrics-*.jsonl` in RUN_DIR (one per peer: a local swarm's workdir holds them all; a volunteer's run
directory holds its own) and draws, one line or bar group per peer:

* `loss.png`: training loss against the global step (the agreed parameters' eval loss as a point at the end);
* `throughput.png`: tokens per second against seconds since the peer's first report;
* `bytes.png`: MB sent and received on the wire against the global step;
* `rounds.png`: rounds per fragment at the end: applied, of them downloaded from the swarm (heals), and failed.

Lines that do not parse (a file cut short by a crash, a stray write) are skipped and counted.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

from .metrics import PER_FRAGMENT


class PlotError(ValueError):
    """Nothing to plot, or nowhere to put it; the message names the directory."""


@dataclass
class PeerSeries:
    peer_id: str
    lines: list[dict] = field(default_factory=list)

    def column(self, name: str) -> list[tuple[float, float]]:
        """(x, y) pairs for `name` against the global step, where both are numbers."""
        return [(r["global_step"], r[name]) for r in self.lines
                if _number(r.get("global_step")) and _number(r.get(name))]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir: str) -> tuple[list[PeerSeries], int]:
    """Every peer's lines in `run_dir`, and how many lines were skipped; PlotError when there are none."""
    if not os.path.isdir(run_dir):
        raise PlotError(f"{run_dir}: not a directory")
    paths = sorted(glob.glob(os.path.join(run_dir, "metrics-*.jsonl")))
    if not paths:
        raise PlotError(f"{run_dir}: no metrics-*.jsonl files (a trainer writes one with --run-dir DIR; "
                        "local-swarm's workdir holds every trainer's)")
    peers, skipped = [], 0
    for path in paths:
        series = PeerSeries(os.path.basename(path)[len("metrics-"):-len(".jsonl")])
        with open(path, encoding="utf-8", errors="replace") as f:
            for text in f:
                try:
                    line = json.loads(text)
                except ValueError:
                    skipped += 1
                    continue
                if not isinstance(line, dict) or not _number(line.get("global_step")):
                    skipped += 1
                    continue
                series.lines.append(line)
        if series.lines:
            peers.append(series)
    if not peers:
        raise PlotError(f"{run_dir}: the metrics files hold no readable line ({skipped} skipped)")
    return peers, skipped


def plot_run(run_dir: str, out_dir: str | None = None) -> tuple[list[str], int]:
    """Draw the PNGs of `run_dir` into `out_dir` (default: `run_dir/plots`); returns their paths and the number
    of lines skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers, skipped = read_metrics(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "plots")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise PlotError(f"{out_dir}: cannot write plots there ({e.strerror or e})") from None
    names = {p.peer_id: (p.peer_id if len(p.peer_id) <= 12 else "…" + p.peer_id[-8:]) for p in peers}
    written = []

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in peers:
        xy = p.column("loss")
        if xy:
            line, = ax.plot(*zip(*xy), label=names[p.peer_id], lw=1.2)
            final = p.column("eval_loss")
            if final:
                ax.plot(*final[-1], "o", color=line.get_color())
    ax.set(xlabel="global step", ylabel="loss (line: training; dot: eval of the agreed parameters)",
           title="loss per peer")
    ax.legend(fontsize=7)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in peers:
        xy = [(r["time"], r["tokens_per_s"]) for r in p.lines if _number(r.get("time"))
              and _number(r.get("tokens_per_s"))]
        if xy:
            t0 = xy[0][0]
            ax.plot([t - t0 for t, _ in xy], [v for _, v in xy], label=names[p.peer_id], lw=1.2)
    ax.set(xlabel="seconds since the peer's first report", ylabel="tokens / s", title="throughput per peer")
    ax.legend(fontsize=7)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in peers:
        for name, style in (("bytes_sent", "-"), ("bytes_received", "--")):
            xy = p.column(name)
            if xy:
                ax.plot([x for x, _ in xy], [y / 1e6 for _, y in xy], style, lw=1.2,
                        label=f"{names[p.peer_id]} {name.split('_')[1]}")
    ax.set(xlabel="global step", ylabel="MB on the wire", title="bytes sent (solid) and received (dashed)")
    ax.legend(fontsize=7)
    save(fig, "bytes.png")

    last = {p.peer_id: p.lines[-1] for p in peers}
    fragments = max((len(v) for line in last.values() for name in PER_FRAGMENT
                     if isinstance(v := line.get(name), list)), default=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(peers), 1)
    for i, p in enumerate(peers):
        counts = {name: _counts(last[p.peer_id].get(name), fragments) for name in PER_FRAGMENT}
        xs = [k + i * width for k in range(fragments)]
        bars = ax.bar(xs, counts["rounds"], width, label=f"{names[p.peer_id]} applied")
        ax.bar(xs, counts["recovered"], width, color=bars.patches[0].get_facecolor() if bars.patches else None,
               hatch="//", alpha=0.5)
        ax.bar(xs, counts["failed"], width, bottom=counts["rounds"], color="tab:red", alpha=0.6,
               label="failed" if i == 0 else None)
    top = max((sum(c) for line in last.values() for c in zip(_counts(line.get("rounds"), fragments),
                                                               _counts(line.get("failed"), fragments))), default=0)
    ax.set_ylim(0, top * 1.4 + 1)  # room for the legend above the bars
    ax.set(xlabel="fragment", ylabel="rounds", xticks=[k + 0.4 - width / 2 for k in range(fragments)],
           xticklabels=[str(k) for k in range(fragments)],
           title="rounds per fragment (hatched: downloaded from the swarm; red: failed)")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    save(fig, "rounds.png")
    return written, skipped


def _counts(values, n: int) -> list[float]:
    values = values if isinstance(values, list) else []
    return [float(v) if _number(v) else 0.0 for v in values[:n]] + [0.0] * (n - min(len(values), n))
