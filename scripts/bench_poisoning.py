"""One of five workers poisoning, with and without protection: eval loss of the honest workers' model.

Runs the simulator's Streaming DiLoCo (fp4, the run defaults) with 5 workers on the embedded task; the last
worker is malicious (`node.attacks`): it sends its outer gradient x1000, sign-flipped, or claims 1e9 tokens.
Each attack runs with the reducers unprotected (the bare weighted mean: no outlier refusal, no weight cap) and
with each aggregation rule (`core.aggregation`: mean, clip, trimmed, all with refusal and caps); the clean run
(nobody attacks) with each rule gives the honest-only cost. Eval loss is worker 0's anchors (an honest one).

    python scripts/bench_poisoning.py --steps 1200 --json results/bench_poisoning.json

Prints a table and writes the JSON (settings, and per run: eval loss, parts refused, rounds failed, curve; or
the error that ended a run, e.g. a model that diverged).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from p2p_diloco.task import simulate as sim  # noqa: E402

# (attack, aggregation, protected)
RUNS = [("", "mean", True), ("", "clip", True), ("", "trimmed", True),
        ("scale:1000", "mean", False), ("scale:1000", "mean", True), ("scale:1000", "clip", True),
        ("scale:1000", "trimmed", True),
        ("flip", "mean", False), ("flip", "clip", True), ("flip", "trimmed", True),
        ("", "winsorized", True), ("scale:1000", "winsorized", True), ("flip", "winsorized", True),
        ("", "centered", True), ("scale:1000", "centered", True), ("flip", "centered", True),
        ("weight:1e9", "mean", False), ("weight:1e9", "mean", True)]


def label(attack: str, aggregation: str, protected: bool) -> str:
    return f"{attack or 'clean'}/{aggregation if protected else 'unprotected'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--model", default="small")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="", help="comma list of run labels (e.g. clean/mean,flip/trimmed)")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    labels = [label(*r) for r in RUNS]
    unknown = [name for name in args.only.split(",") if args.only and name not in labels]
    if unknown:
        ap.error(f"--only: unknown run(s) {', '.join(unknown)}; known: {', '.join(labels)}")
    runs = []
    for attack, aggregation, protected in RUNS:
        name = label(attack, aggregation, protected)
        if args.only and name not in args.only.split(","):
            continue
        settings = sim.SimSettings(workers=args.workers, steps=args.steps, model=args.model, eval_every=100,
                                   base={"seed": 0, "aggregation": aggregation},
                                   inner_lr=dict(sim.DEFAULT_INNER_LR), attack=attack, protected=protected)
        runs.append((name, "streaming_diloco", settings))
    start = time.time()
    results = sim._run_all(runs, args.jobs, keep_failures=True)
    clean = results.get("clean/mean", {}).get("eval_loss")
    print(f"\n{'run':>24} {'eval loss':>9} {'vs clean/mean':>13} {'parts refused (per member)':>28}")
    for name, _, _ in runs:
        r = results[name]
        if "error" in r:
            print(f"{name:>24} {'failed':>9} {'':>13} {r['error'][:200]}")
            continue
        vs = f"{100 * (r['eval_loss'] / clean - 1):+.2f}%" if clean else "-"
        print(f"{name:>24} {r['eval_loss']:9.4f} {vs:>13} {str(r['parts_refused']):>28}")
    if args.json_path:
        report = {"settings": {k: asdict(s) for k, _, s in runs}, "wall_s": round(time.time() - start, 1),
                  "runs": {name: results[name] for name, _, _ in runs}}
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report: {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
