"""Does Streaming DiLoCo's gap to data-parallel shrink as the model grows? `simulate` at several model sizes with
the same tokens per parameter: data-parallel, DiLoCo (fp32) and Streaming DiLoCo (fp4), 4 workers each.

    python scripts/model_sizes.py                       # tiny, small, base at 5 tokens per parameter (CPU: ~40 min)
    python scripts/model_sizes.py --models small,base --tokens-per-param 20 --json results/x.json

Prints a table (eval loss per method, the gap of each to data-parallel) and writes the JSON report and a PNG of
the gaps against the parameter count. The DiLoCo scaling-law paper (arXiv 2503.09799) reports the gap shrinking
with size; on a CPU only sizes far below its smallest (35M) fit, so read this as what the trend is down here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from p2p_diloco.task import simulate as sim  # noqa: E402
from p2p_diloco.task.model import model_spec, parameter_count  # noqa: E402

METHODS = ["data_parallel", "diloco", "streaming_diloco"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small,base", help="presets or Llama config files, smallest first")
    parser.add_argument("--tokens-per-param", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--fragments", type=int, default=2, help="the same for every size (tiny has 2 blocks)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default="results/model_sizes.json")
    parser.add_argument("--plot", default=None, help="[default: next to --json, .png]")
    parser.add_argument("--replot", action="store_true", help="only draw the PNG again from --json's report")
    args = parser.parse_args()
    plot_path = args.plot or os.path.splitext(args.json)[0] + ".png"
    if args.replot:
        with open(args.json) as f:
            rows = json.load(f)["sizes"]
        plot(rows, plot_path)
        print(table(rows))
        return 0
    if args.tokens_per_param <= 0 or args.workers < 1 or args.batch_size < 1:
        parser.error("--tokens-per-param, --workers and --batch-size must be positive")
    rows = []
    started = time.time()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        spec = model_spec(name)
        params = parameter_count(spec)
        tokens_per_step = args.workers * args.batch_size * spec.seq_len
        steps = max(1, round(args.tokens_per_param * params / tokens_per_step))
        settings = sim.SimSettings(workers=args.workers, steps=steps, batch_size=args.batch_size, model=name,
                                   eval_every=max(1, steps // 10), base={"seed": 0, "fragments": args.fragments},
                                   inner_lr=dict(sim.DEFAULT_INNER_LR))
        print(f"{name}: {params:,} parameters, {steps} steps x {tokens_per_step} tokens "
              f"({steps * tokens_per_step / params:.1f} tokens per parameter)", flush=True)
        report = sim.simulate(METHODS, settings, args.jobs)
        losses = {m: report["methods"][m]["eval_loss"] for m in METHODS}
        wire = {m: report["methods"][m]["wire_bytes_per_worker"] for m in METHODS}
        rows.append({"model": name, "parameters": params, "steps": steps, "tokens": steps * tokens_per_step,
                     "eval_loss": losses, "wire_bytes_per_worker": wire, "wall_s": report["wall_s"],
                     "gap_vs_data_parallel": {m: losses[m] / losses["data_parallel"] - 1 for m in METHODS[1:]}})
        print(table(rows[-1:]), flush=True)
    out = {"tokens_per_param": args.tokens_per_param, "workers": args.workers, "batch_size": args.batch_size,
           "fragments": args.fragments, "methods": METHODS, "wall_s": round(time.time() - started, 1), "sizes": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    plot(rows, plot_path)
    print()
    print(table(rows))
    print(f"report: {args.json}, plot: {plot_path}")
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| model | parameters | tokens | data-parallel | DiLoCo (fp32) | Streaming DiLoCo (fp4) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        loss, gap = r["eval_loss"], r["gap_vs_data_parallel"]
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['tokens'] / 1e6:.2f}M | {loss['data_parallel']:.4f} "
                     f"| {loss['diloco']:.4f} ({100 * gap['diloco']:+.1f} %) "
                     f"| {loss['streaming_diloco']:.4f} ({100 * gap['streaming_diloco']:+.1f} %) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, label in (("diloco", "DiLoCo (fp32)"), ("streaming_diloco", "Streaming DiLoCo (fp4)")):
        ax.plot([r["parameters"] for r in rows], [100 * r["gap_vs_data_parallel"][m] for r in rows], "o-",
                label=label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # (minor labels overlap on a short axis)
    ax.set_xlabel("parameters")
    ax.set_ylabel("eval loss above data-parallel (%)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("gap to data-parallel at equal tokens per parameter")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
