"""Eval loss against wire bytes: the frontier of several `p2p-diloco simulate` reports of the same settings.

    python scripts/frontier.py results/simulate_lowbit.json results/simulate_sparse.json \
        --json results/frontier.json --png results/frontier.png

Merges the reports' methods (a method in several reports: the last one's row), refuses reports whose settings
differ (workers, steps, batch, model, data, shared config), prints a table (eval loss, against data-parallel and
fp32 DiLoCo, wire MB per worker, bytes against data-parallel, on the frontier or not) and draws the loss
against bytes sent per worker on a log scale, with the frontier (no other method both cheaper and better), the
DiLoCo loss and the 2,000x line.
"""

from __future__ import annotations

import argparse
import json
import sys

COMPARED = ("workers", "steps", "batch_size", "model", "data", "base", "eval_batches", "final_eval_batches")
TARGET_RATIO = 2000  # issue 12: bytes >= 2,000x below data-parallel at DiLoCo's loss


def merge(paths: list[str]) -> tuple[dict, dict[str, dict]]:
    """(the shared settings, method -> its row with "source") from the reports at `paths`."""
    settings, rows = None, {}
    for path in paths:
        try:
            with open(path) as f:
                report = json.load(f)
            these, methods = report["settings"], report["methods"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"{path}: not a simulate report ({e})")
        shared = {k: these.get(k) for k in COMPARED}
        if settings is None:
            settings = shared
        elif shared != settings:
            diff = ", ".join(f"{k}: {settings[k]!r} vs {shared[k]!r}" for k in COMPARED if shared[k] != settings[k])
            sys.exit(f"{path}: other settings than {paths[0]} ({diff}); a frontier compares one setting")
        for name, row in methods.items():
            rows[name] = {**row, "source": path}
    if not rows:
        sys.exit("no methods in the reports")
    return settings, rows


def frontier(rows: dict[str, dict]) -> set[str]:
    """Methods no other method beats on both loss and bytes."""
    return {m for m, r in rows.items()
            if not any(o["wire_bytes_per_worker"] <= r["wire_bytes_per_worker"] and o["eval_loss"] < r["eval_loss"]
                       or o["wire_bytes_per_worker"] < r["wire_bytes_per_worker"] and o["eval_loss"] <= r["eval_loss"]
                       for n, o in rows.items() if n != m)}


def table(rows: dict[str, dict], best: set[str]) -> list[dict]:
    dp, diloco = rows.get("data_parallel"), rows.get("diloco")
    out = []
    for name, r in sorted(rows.items(), key=lambda nr: -nr[1]["wire_bytes_per_worker"]):
        out.append({
            "method": name, "eval_loss": r["eval_loss"],
            "vs_data_parallel": r["eval_loss"] / dp["eval_loss"] - 1 if dp else None,
            "vs_diloco": r["eval_loss"] / diloco["eval_loss"] - 1 if diloco else None,
            "wire_mb_per_worker": r["wire_bytes_per_worker"] / 1e6,
            "fewer_bytes_than_data_parallel": dp["wire_bytes_per_worker"] / r["wire_bytes_per_worker"] if dp else None,
            "frontier": name in best, "source": r["source"],
        })
    return out


def show(lines: list[dict]) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:+.1f}%"

    text = [f"{'method':>32} {'eval loss':>9} {'vs DP':>7} {'vs DiLoCo':>9} {'MB/worker':>10} {'DP/wire':>8}  frontier"]
    for r in lines:
        ratio = "-" if r["fewer_bytes_than_data_parallel"] is None else f"{r['fewer_bytes_than_data_parallel']:.0f}x"
        text.append(f"{r['method']:>32} {r['eval_loss']:9.4f} {pct(r['vs_data_parallel']):>7} "
                    f"{pct(r['vs_diloco']):>9} {r['wire_mb_per_worker']:10.2f} {ratio:>8}  "
                    f"{'yes' if r['frontier'] else ''}")
    return "\n".join(text)


def draw(settings: dict, rows: dict[str, dict], best: set[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    losses = [r["eval_loss"] for r in rows.values()]
    reference = rows["diloco"]["eval_loss"] if "diloco" in rows else max(losses)
    top = min(max(losses), 1.3 * reference) * 1.02  # a diverged method is drawn at the edge, its loss in the label
    markers = "osD^vP*Xhp<>"
    for i, (name, r) in enumerate(sorted(rows.items(), key=lambda nr: -nr[1]["wire_bytes_per_worker"])):
        x, y = r["wire_bytes_per_worker"] / 1e6, r["eval_loss"]
        off = y > top  # drawn at the edge
        label = f"{name}: {y:.4f}{' (off the scale)' if off else ''}" + (" *" if name in best else "")
        ax.scatter([x], [min(y, top)], color=plt.cm.tab10(i % 10), marker=markers[i % len(markers)], s=40,
                   zorder=3, label=label)
    edge = sorted((rows[m]["wire_bytes_per_worker"] / 1e6, rows[m]["eval_loss"]) for m in best)
    ax.plot(*zip(*edge), color="tab:red", alpha=0.5, label="frontier")
    if "diloco" in rows:
        ax.axhline(rows["diloco"]["eval_loss"], color="gray", ls="--", lw=1, label="fp32 DiLoCo's loss")
    if "data_parallel" in rows:
        ax.axvline(rows["data_parallel"]["wire_bytes_per_worker"] / 1e6 / TARGET_RATIO, color="gray", ls=":", lw=1,
                   label=f"{TARGET_RATIO:,}x fewer bytes than data-parallel")
    ax.set_xscale("log")
    ax.set_ylim(min(losses) * 0.97, top * 1.01)
    ax.set_xlabel("wire bytes sent per worker (MB, log scale)")
    ax.set_ylabel("held-out loss of the global parameters (nats/byte)")
    ax.set_title(f"{settings['workers']} workers, {settings['steps']} steps, model {settings['model']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, title="eval loss (* on the frontier)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", help="simulate --json reports of the same settings")
    parser.add_argument("--json", dest="json_path", help="write the merged table here")
    parser.add_argument("--png", help="draw loss against bytes here")
    args = parser.parse_args()
    settings, rows = merge(args.reports)
    best = frontier(rows)
    lines = table(rows, best)
    print(show(lines))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"settings": settings, "methods": lines}, f, indent=1)
        print(f"table: {args.json_path}")
    if args.png:
        draw(settings, rows, best, args.png)
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
