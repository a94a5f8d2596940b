"""What a flood costs a peer, with and without `swarm.inbound`'s limits (issue "Public runs", item 5).

1. A libp2p victim in its own process (`python -m p2p_diloco.swarm.flooding victim`), flooded by our attacker:
   streams that declare 2**40-byte messages and push junk into them. Its peak memory (VmHWM) grows by what it
   buffered: without limits, by what was pushed; with them, by what one 8-byte header takes.
2. `p2p-diloco local-swarm` (3 peers, tiny model, H = 200: a period of ~10 s, over twice the matchmaking time, as
   README "Not done yet" asks) clean and with `--attacker flood` (the last peer floods the
   others' averagers all run long): the honest peers' peak memory (summed over their processes), rounds applied
   and failed, eval loss, wall time; the flood with the run's default target group size (3: every round waits
   for the shunned flooder) and with --target-group-size 2.

Writes results/bench_flood.json and prints a table. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from p2p_diloco.swarm.flooding import flood_victim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def victims(push_mib: list[int]) -> list[dict]:
    rows = []
    for push in push_mib:
        for limited in (False, True):
            streams = 1 if not limited else 32
            before, after, stats = flood_victim(limited, streams=streams, push_bytes=push << 20)
            rows.append({"limited": limited, "streams": streams, "push_mib_per_stream": push,
                         "pushed_mib": round(stats.bytes_pushed / 2**20, 1),
                         "grown_mib": round((after["VmHWM"] - before["VmRSS"]) / 2**20, 1),
                         "dropped": len(after["dropped"]), "oversized": after["oversized"]})
            print(rows[-1], flush=True)
    return rows


def swarm(label: str, extra: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        began = time.time()
        proc = subprocess.run([sys.executable, "-m", "p2p_diloco.cli", "local-swarm", "--model", "tiny", "--peers", "3",
                               "--steps", str(steps), "-H", "200", "--fragments", "2", "--round-timeout", "20",
                               "--timeout", "300", "--workdir", os.path.join(tmp, "w"), "--json", report_path, *extra],
                              capture_output=True, text=True)
        if not os.path.exists(report_path):
            raise SystemExit(f"{label}: local-swarm exited {proc.returncode} without a report\n{proc.stderr[-3000:]}")
        with open(report_path) as f:
            report = json.load(f)
    row = {"label": label, "args": extra, "exit": proc.returncode, "wall_s": round(time.time() - began, 1),
           "consensus": report["consensus"],
           "honest": [{"name": p["name"], "peak_memory_mb": p["peak_memory_mb"], "rounds": p["rounds"],
                       "rounds_failed": p["rounds_failed"], "eval_loss": round(p["eval_loss"], 4)}
                      for p in report["peers"]]}
    if report.get("outsider"):
        row["flooder"] = {"peak_memory_mb": report["outsider"]["peak_memory_mb"],
                          "flood": report["outsider"].get("flood")}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--push-mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_flood.json"))
    args = parser.parse_args()
    result = {"victim": victims(args.push_mib),
              "swarm": [swarm("clean", [], args.steps),
                        swarm("flood, target group size 3 (the default)", ["--attacker", "flood"], args.steps),
                        swarm("flood, target group size 2", ["--attacker", "flood", "--target-group-size", "2"],
                              args.steps)]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'victim':>10} {'pushed MiB':>11} {'grown MiB':>10}")
    for r in result["victim"]:
        print(f"{'limited' if r['limited'] else 'unlimited':>10} {r['pushed_mib']:>11} {r['grown_mib']:>10}")
    print(f"\n{'swarm':<45} {'peak MB':>8} {'applied':>8} {'failed':>7} {'eval':>7}")
    for r in result["swarm"]:
        for p in r["honest"]:
            print(f"{r['label'] + ' ' + p['name']:<45} {p['peak_memory_mb']:>8} {sum(p['rounds']):>8} "
                  f"{sum(p['rounds_failed']):>7} {p['eval_loss']:>7}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
