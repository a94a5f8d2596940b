"""Compute utilization of a swarm on capped links: does training hide the network?

For each overlap delay tau and each link cap, a `local-swarm --links` of N
trainers (root only) trains the `large` model (a step costs real compute); the
caps are chosen so that one fragment's all-reduce takes a given fraction of the
time between two rounds of that fragment (`--ratios`, from the averaging-off
run's step time and the codec's payload). Utilization = inner steps per second
of training in that swarm ÷ the same in a swarm of the same trainers on the
same machine with averaging off (H longer than the run): CPU sharing with the
other trainers cancels out, what remains is time lost to averaging (blocking
at tau = 0, the averagers' CPU, late results). Also reported: the time the
training loop was held by averaging (`held_s`).

    python scripts/bench_utilization.py                           # 2 trainers, tau 0/1/5, ratios 0.3/1/3
    python scripts/bench_utilization.py --taus 0 1 2 5 --ratios 0.2 0.5 1 3 --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _links_file(directory: str, mbit: float) -> str:
    path = os.path.join(directory, f"links-{mbit:.4f}.toml")
    with open(path, "w") as f:
        f.write(f"[host]\nup_mbit = 1000\ndown_mbit = 1000\ndelay_ms = 0\n"
                f"[default]\nup_mbit = {mbit}\ndown_mbit = {mbit}\ndelay_ms = 0\n")
    return path


def _swarm(args, workdir: str, name: str, outer_period: int, tau: int, mbit: float) -> dict:
    report = os.path.join(workdir, f"{name}.json")
    cmd = [sys.executable, "-m", "p2p_diloco.cli", "local-swarm", "--peers", str(args.peers), "--model", args.model,
           "--steps", str(args.steps), "-H", str(outer_period), "--tau", str(tau), "--fragments",
           str(args.fragments), "--codec", args.codec, "--links", _links_file(workdir, mbit),
           "--workdir", os.path.join(workdir, name), "--json", report, "--progress-every", "30",
           "--timeout", str(args.timeout)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not os.path.exists(report):
        raise RuntimeError(f"{name}: local-swarm wrote no report (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(report) as f:
        data = json.load(f)
    peers = data["peers"]
    return {"steps_per_s": sum(p["inner_steps"] / p["train_s"] for p in peers) / len(peers),
            "held_share": sum(p["held_s"] / p["train_s"] for p in peers) / len(peers),
            "rounds_failed": sum(sum(p["rounds_failed"]) for p in peers),
            "rounds_applied": sum(sum(p["rounds"]) for p in peers),
            "consensus": data["consensus"], "exit": proc.returncode}


def _largest_fragment_payload(args) -> int:
    from p2p_diloco.core.codecs import get_codec
    from p2p_diloco.core.fragments import split_fragments
    from p2p_diloco.task.model import build_model, model_spec

    model = build_model(model_spec(args.model), 0)
    return get_codec(args.codec).wire_size(max(f.numel for f in split_fragments(model, args.fragments)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--model", default="large")
    ap.add_argument("--steps", type=int, default=60, help="global steps of each run")
    ap.add_argument("-H", "--outer-period", type=int, default=10)
    ap.add_argument("--fragments", type=int, default=2)
    ap.add_argument("--codec", default="fp4")
    ap.add_argument("--taus", type=int, nargs="+", default=[0, 1, 5])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                    help="a fragment's all-reduce time / the time between two of its rounds")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    payload = _largest_fragment_payload(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-utilization-") as workdir:
        base = _swarm(args, workdir, "off", args.steps + 1, 0, 1000.0)
        step_s = 1 / base["steps_per_s"]
        between = args.outer_period * step_s
        print(f"averaging off: {base['steps_per_s']:.3f} inner steps/s per trainer; a fragment's rounds "
              f"{between:.1f} s apart; its payload {payload / 1e6:.2f} MB", flush=True)
        for ratio in args.ratios:
            # the slowest member moves about twice the payload (contributions out, means in)
            mbit = 2 * payload * 8 / 1e6 / (ratio * between)
            for tau in args.taus:
                run = _swarm(args, workdir, f"r{ratio}-t{tau}", args.outer_period, tau, mbit)
                rows.append({"ratio": ratio, "mbit": mbit, "tau": tau, **run,
                             "utilization": run["steps_per_s"] / base["steps_per_s"]})
                print(f"all-reduce/interval {ratio:4.1f} ({mbit:7.3f} Mbit/s) tau {tau}: utilization "
                      f"{rows[-1]['utilization']:6.1%}  held {run['held_share']:5.1%}  rounds applied "
                      f"{run['rounds_applied']} failed {run['rounds_failed']}  consensus {run['consensus']}",
                      flush=True)
                _write(args, base, payload, rows)
    if args.png:
        _plot(args, rows)


def _write(args, base: dict, payload: int, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "fragment_payload_bytes": payload, "averaging_off": base,
                       "rows": rows}, f, indent=1)


def _plot(args, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for tau in args.taus:
        mine = [r for r in rows if r["tau"] == tau]
        ax.plot([r["ratio"] for r in mine], [100 * r["utilization"] for r in mine], "o-", label=f"tau = {tau}")
    ax.axhline(98, color="k", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("a fragment's all-reduce time / time between its rounds")
    ax.set_ylabel("compute utilization (%)")
    ax.set_title(f"{args.peers} trainers, {args.model} model, {args.codec}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
