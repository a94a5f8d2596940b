"""A peer's processes and memory against the number of fragments.

For each fragment count, a host and two trainers run on 127.0.0.1 (two, so that
rounds really happen); once a trainer has trained and averaged for a while, its
whole process tree (the trainer, its DHT, one averager per fragment, p2pd) is
measured from /proc: process count, RSS and PSS (proportional set size: shared
pages split between the processes that share them, so the sum is what the
peer really costs).

    python scripts/bench_peer_memory.py                       # small model, P = 0, 1, 2, 4
    python scripts/bench_peer_memory.py --fragments 0,2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from p2p_diloco.core.config import DiLoCoConfig
from p2p_diloco.node.records import RunConfig
from p2p_diloco.swarm.local_swarm import _descendants
from p2p_diloco.task.model import model_spec


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def measure(fragments: int, model: str, settle_s: float, workdir: str) -> dict:
    run = RunConfig(f"mem{fragments}", DiLoCoConfig(fragments=fragments, outer_period=60, warmup_steps=10),
                    model_spec(model), 4, "stdlib", round_timeout=30.0, target_group_size=2)
    config_path = os.path.join(workdir, f"run{fragments}.msgpack")
    with open(config_path, "wb") as f:
        f.write(run.encode())
    maddrs_path = os.path.join(workdir, f"host{fragments}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "p2p_diloco.cli"]
    procs = [subprocess.Popen(cli + ["host", "--run-config", config_path, "--maddrs-file", maddrs_path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)]
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(maddrs_path):
            if time.monotonic() > deadline:
                raise RuntimeError("the host did not come up")
            time.sleep(0.2)
        with open(maddrs_path) as f:
            maddr = json.load(f)["maddrs"][0]
        for _ in range(2):
            procs.append(subprocess.Popen(cli + ["join", "--initial-peers", maddr, "--run-id", run.run_id,
                                                 "--threads", "1", "--wait-for-peers", "2"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True, env=env))
        time.sleep(settle_s)
        trainer = procs[1]
        if trainer.poll() is not None:
            raise RuntimeError(f"the trainer exited with code {trainer.returncode}")
        tree = [trainer.pid, *sorted(_descendants(trainer.pid))]
        rows = [(pid, process_name(pid), *memory_kb(pid)) for pid in tree]
        return {"fragments": fragments, "averagers": fragments + 1, "processes": len(rows),
                "rss_mb": _mb(sum(r[2] for r in rows)), "pss_mb": _mb(sum(r[3] for r in rows)),
                "by_process": [{"pid": pid, "name": name, "rss_mb": _mb(rss), "pss_mb": _mb(pss)}
                               for pid, name, rss, pss in rows]}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fragments", default="0,1,2,4", help="Comma list of fragment counts P (0 = plain DiLoCo).")
    parser.add_argument("--model", default="small")
    parser.add_argument("--settle", type=float, default=40.0, help="Seconds of training before measuring.")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for p in (int(x) for x in args.fragments.split(",")):
            r = measure(p, args.model, args.settle, workdir)
            results.append(r)
            print(f"P={p}: {r['processes']} processes, RSS {r['rss_mb']:.0f} MB, PSS {r['pss_mb']:.0f} MB", flush=True)
    base = results[0]
    print(f"\n{'P':>3} {'averagers':>9} {'processes':>9} {'PSS MB':>8} {'vs first':>9}")
    for r in results:
        print(f"{r['fragments']:>3} {r['averagers']:>9} {r['processes']:>9} {r['pss_mb']:>8.0f} "
              f"{r['pss_mb'] - base['pss_mb']:>+8.0f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"model": args.model, "settle_s": args.settle, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
