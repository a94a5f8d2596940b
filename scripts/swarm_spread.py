"""The run-to-run spread of identical local swarms (issue 14): N runs of one `local-swarm` command, one after the
other, each peer's eval loss, inner steps and rounds, and the spread (max - min over the runs, as a share of their
mean) of the swarm's eval loss.

    python scripts/swarm_spread.py --runs 5 --out results/swarm_spread.json -- --peers 4
    python scripts/swarm_spread.py --runs 5 --out results/swarm_spread_slow.json -- --peers 4 --slow-peer-delay 0.3

Everything after `--` goes to `p2p-diloco local-swarm` as is. Each run keeps its workdir (the peers' metrics files,
which `p2p-diloco simulate --replay DIR` reads) under `--workdir` (default: a folder beside `--out`).
`--replay` then replays every run (`--jobs` at a time) and reports the replays' spread beside the swarms': what the
recorded schedules and data orders explain of the spread, and how far each replay lands from its swarm.
`--replay-only` replays the runs an earlier call left in `--workdir` (reading its `--out`).
`--ideal-from RUN_DIR` measures what the data order alone does: `--runs` schedules as a simulator's ideal swarm runs
them (every peer an inner step at every global step, every round applied by all at tau), each with other data
orders, written beside RUN_DIR's run config and replayed.
`--regular steps|delays` (with `--replay-only`) replays each recorded run with one part of its schedule made
ideal: every peer an inner step at every global step (steps), or every mean landing at tau (delays).
`--max-delay L` (with `--replay-only`) replays each recorded run as if it had had that lateness bound (every mean
that landed later than L global steps after its round's start waited for at L): OUT-max-delayL.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--workdir", help="where each run's workdir goes (default: OUT without .json, + /runN)")
    parser.add_argument("--replay", action="store_true", help="replay every run afterwards (simulate --replay)")
    parser.add_argument("--replay-only", action="store_true", help="replay the runs recorded in --out")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="replays at a time")
    parser.add_argument("--ideal-from", help="a recorded run whose config ideal schedules are written with")
    parser.add_argument("--regular", choices=["steps", "delays"], help="replay the runs with that part made ideal")
    parser.add_argument("--max-delay", type=int, help="replay the runs as if they had had this lateness bound")
    parser.add_argument("swarm_args", nargs=argparse.REMAINDER, help="-- then `local-swarm` flags")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs: at least 2 (a spread needs two runs)")
    if args.ideal_from:
        return _ideal(args)
    if args.replay_only:
        with open(args.out) as f:
            result = json.load(f)
        if args.regular:
            return _regular(result, args)
        if args.max_delay is not None:
            args.out = f"{os.path.splitext(args.out)[0]}-max-delay{args.max_delay}.json"
        return _replay(result, args)
    swarm_args = args.swarm_args[1:] if args.swarm_args[:1] == ["--"] else args.swarm_args
    root = args.workdir or os.path.splitext(args.out)[0]
    runs = []
    for i in range(args.runs):
        workdir = os.path.join(root, f"run{i}")
        summary = os.path.join(workdir, "summary.json")
        os.makedirs(workdir, exist_ok=True)
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "p2p_diloco.cli", "local-swarm", *swarm_args,
                               "--workdir", workdir, "--json", summary],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.exists(summary):
            print(f"run {i}: local-swarm exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            return 1
        with open(summary) as f:
            report = json.load(f)
        peers = report["peers"]
        run = {"workdir": workdir, "consensus": report["consensus"], "wall_s": round(time.time() - started, 1),
               "eval_loss": [p["eval_loss"] for p in peers], "inner_steps": [p["inner_steps"] for p in peers],
               "rounds": [p["rounds"] for p in peers], "rounds_failed": [p["rounds_failed"] for p in peers]}
        run.update(schedule(workdir))
        runs.append(run)
        print(f"run {i}: eval loss {min(run['eval_loss']):.4f}..{max(run['eval_loss']):.4f}  consensus "
              f"{run['consensus']}  inner steps {run['inner_steps']}  failed {run['rounds_failed']}  "
              f"mean delay {run['mean_delay']:.1f}  {run['wall_s']} s", flush=True)
    losses = [statistics.mean(r["eval_loss"]) for r in runs]
    mean = statistics.mean(losses)
    result = {"swarm_args": swarm_args, "runs": runs, "eval_loss": losses, "mean": mean,
              "stdev": statistics.stdev(losses), "spread": (max(losses) - min(losses)) / mean,
              # how the loss goes with the tokens trained, over the runs (Pearson r)
              "r_loss_tokens": _correlation(losses, [r["total_inner_steps"] for r in runs])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"eval loss over {args.runs} runs: mean {mean:.4f}, stdev {result['stdev']:.4f}, "
          f"max - min {100 * result['spread']:.2f} % of the mean  ({args.out})")
    return _replay(result, args) if args.replay else 0


def schedule(workdir: str) -> dict:
    """What the peers' records say of a run's schedule (`task/replay.py`): inner steps in all, the realized delay
    of the applied rounds (those before the last step), the rounds each peer did not average."""
    from p2p_diloco.task.replay import read_run

    recorded = read_run(workdir)
    delays = [end - start for p in recorded.peers for start, end, _ in p.applied.values() if start < recorded.steps]
    rounds = {k for p in recorded.peers for k in p.applied}
    return {"total_inner_steps": sum(len(p.trained_at) for p in recorded.peers),
            "mean_delay": statistics.mean(delays) if delays else 0.0, "max_delay": max(delays, default=0),
            "rounds_not_averaged": [len(rounds - set(p.applied)) for p in recorded.peers]}


def _replay(result: dict, args) -> int:
    """Replay every run of `result` (`args.jobs` at a time); add the replays' losses and spread to it."""
    todo = [(i, run["workdir"]) for i, run in enumerate(result["runs"])]
    running: list[tuple[int, subprocess.Popen]] = []
    failed = False
    bound = getattr(args, "max_delay", None)
    what_if = [] if bound is None else ["--max-delay", str(bound)]
    name = "replay.json" if bound is None else f"replay-max-delay{bound}.json"
    while todo or running:
        while todo and len(running) < args.jobs:
            i, workdir = todo.pop(0)
            running.append((i, subprocess.Popen(
                [sys.executable, "-m", "p2p_diloco.cli", "simulate", "--replay", workdir, *what_if,
                 "--json", os.path.join(workdir, name)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        i, proc = running.pop(0)
        err = proc.communicate()[1]
        if proc.returncode != 0:
            print(f"replay of run {i} exited {proc.returncode}: {err.strip().splitlines()[-1:]}", file=sys.stderr)
            failed = True
    if failed:
        return 1
    replays = []
    for run in result["runs"]:
        run.update(schedule(run["workdir"]))  # (the schedule's figures, for a report from before they were kept)
    if None not in result["eval_loss"]:
        result["r_loss_tokens"] = _correlation(result["eval_loss"], [r["total_inner_steps"] for r in result["runs"]])
    for i, run in enumerate(result["runs"]):
        with open(os.path.join(run["workdir"], name)) as f:
            report = json.load(f)
        r = report["methods"]["replay"]
        averaged = [a - b for a, b in zip(r["rounds_applied_per_worker"], r["rounds_recovered_per_worker"])]
        replays.append({"eval_loss": r["eval_loss"], "difference": report["comparison"]["difference"],
                        "inner_steps": r["inner_steps"], "rounds_averaged": averaged,
                        "consensus": r["consensus"], "groups_differ": r["groups_differ"]})
        diff = report["comparison"]["difference"]
        swarm = result["eval_loss"][i]
        print(f"run {i}: " + ("" if swarm is None else f"swarm {swarm:.4f}  ") + f"replay {r['eval_loss']:.4f}"
              + ("" if diff is None else f"  ({100 * diff:+.2f} %)"))
    losses = [r["eval_loss"] for r in replays]
    mean = statistics.mean(losses)
    result["replays"] = {"runs": replays, "eval_loss": losses, "mean": mean, "stdev": statistics.stdev(losses),
                         "spread": (max(losses) - min(losses)) / mean}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    diffs = [abs(r["difference"]) for r in replays if r["difference"] is not None]
    print(f"replays: mean {mean:.4f}, stdev {result['replays']['stdev']:.4f}, max - min "
          f"{100 * result['replays']['spread']:.2f} % of the mean" + (
              f"; replay vs swarm within {100 * max(diffs):.2f} % (mean |difference| "
              f"{100 * statistics.mean(diffs):.2f} %)" if diffs else "") + f"  ({args.out})")
    return 0


def _ideal(args) -> int:
    """`--runs` ideal schedules of the run in `args.ideal_from`, each with other data orders, replayed."""
    import random
    import shutil

    from p2p_diloco.core.schedule import Schedule
    from p2p_diloco.task.replay import read_run

    recorded = read_run(args.ideal_from)
    config, steps, peers = recorded.run.diloco, recorded.steps, len(recorded.peers)
    plan = Schedule(config)
    keys = [(k, r, t) for t in range(1, steps + 1) for k, r in plan.due(t)]
    keys += [(k, plan.next_round(k, steps), steps) for k in range(len(config.offsets()))
             if plan.round_at(k, steps) is None]
    root = args.workdir or os.path.splitext(args.out)[0]
    runs = []
    for i in range(args.runs):
        workdir = os.path.join(root, f"ideal{i}")
        os.makedirs(workdir, exist_ok=True)
        shutil.copy(os.path.join(args.ideal_from, "run_config.msgpack"), workdir)
        seeds = random.Random(i).sample(range(2**32), peers)
        for w, seed in enumerate(seeds):
            records = [{"fragment": k, "round": r, "start_step": t, "end_step": min(t + config.tau, steps),
                        "outcome": "applied", "tokens": 1, "peers": peers, "group_weight": peers} for k, r, t in keys]
            line = {"peer_id": f"ideal{w}", "step": steps, "global_step": steps, "trained_at": list(range(steps)),
                    "round_records": records, "data_seed": seed, "data": recorded.peers[0].data, "eval_loss": None}
            if line["data"] is None:
                del line["data"]
            with open(os.path.join(workdir, f"metrics-ideal{w}.jsonl"), "w") as f:
                f.write(json.dumps(line) + "\n")
        runs.append({"workdir": workdir, "data_seeds": seeds})
    result = {"ideal_from": args.ideal_from, "runs": runs, "eval_loss": [None] * args.runs}  # (no swarm ran)
    code = _replay(result, args)
    if code == 0:
        print(f"ideal schedules, data orders drawn: spread {100 * result['replays']['spread']:.2f} % of the mean")
    return code


def _regular(result: dict, args) -> int:
    """Each run of `result` with its inner steps (or its delays) made those of an ideal swarm, replayed; the
    report goes to OUT-regular-steps.json (or -delays)."""
    import shutil

    from p2p_diloco.task.replay import read_run

    runs = []
    for run in result["runs"]:
        workdir = f"{run['workdir']}-regular-{args.regular}"
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
        shutil.copy(os.path.join(run["workdir"], "run_config.msgpack"), workdir)
        recorded = read_run(run["workdir"])
        tau, steps = recorded.run.diloco.tau, recorded.steps
        for name in os.listdir(run["workdir"]):
            if not name.startswith("metrics-"):
                continue
            with open(os.path.join(run["workdir"], name)) as f:
                lines = [json.loads(t) for t in f]
            for i, line in enumerate(lines):
                if args.regular == "steps":
                    line["trained_at"] = list(range(steps)) if i == 0 else []
                else:
                    for r in line["round_records"]:
                        r["end_step"] = min(r["start_step"] + tau, steps)
            with open(os.path.join(workdir, name), "w") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
        runs.append({"workdir": workdir})
    regular = {"regular": args.regular, "runs": runs, "eval_loss": result["eval_loss"]}
    args.out = f"{os.path.splitext(args.out)[0]}-regular-{args.regular}.json"
    return _replay(regular, args)


def _correlation(xs: list[float], ys: list[float]) -> float | None:
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # (a constant series)
        return None


if __name__ == "__main__":
    sys.exit(main())
