"""One fragment's all-reduce on loopback: our codec averager against stock hivemind + Float16Compression.

N peers (DHT + averager each) on 127.0.0.1 average one tensor of --numel values;
the time of a round is from the first `step` call to the last result, best of
--repeats. Also checks the error against the true mean and that every peer got
the same result.

    python scripts/bench_allreduce.py                    # 4 peers, 16M values
    python scripts/bench_allreduce.py --numel 1000000 --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import Float16Compression

from p2p_diloco.core.averaging import RoundKey
from p2p_diloco.swarm.averager import SwarmAverager
from p2p_diloco.swarm.dht import start_dht, visible_maddrs


def bench_ours(dhts, xs, codec: str, repeats: int, timeout: float) -> dict:
    avs = [SwarmAverager(d, "bench", [xs[0].numel()], codec, round_timeout=timeout, target_group_size=len(dhts),
                         min_matchmaking_time=2.0, search_timeout=timeout) for d in dhts]
    try:
        best, results = float("inf"), None
        for r in range(repeats):
            start = time.perf_counter()
            pending = [av.begin(RoundKey("bench", 0, r), x, 1.0) for av, x in zip(avs, xs)]
            results = [p.result().mean for p in pending]
            best = min(best, time.perf_counter() - start)
        sent = avs[0].bytes_sent / repeats
        return {"seconds": best, "identical": all(torch.equal(results[0], m) for m in results),
                "rel_error": rel_error(results[0], xs), "bytes_sent_per_peer": sent}
    finally:
        for av in avs:
            av.shutdown()


def bench_stock(dhts, xs, repeats: int, timeout: float) -> dict:
    avs = [DecentralizedAverager([x.clone()], dht=d, prefix="stockbench", start=True, target_group_size=len(dhts),
                                 min_matchmaking_time=2.0, request_timeout=1.0, allreduce_timeout=timeout,
                                 compression=Float16Compression()) for d, x in zip(dhts, xs)]
    try:
        best = float("inf")
        for _ in range(repeats):
            for av, x in zip(avs, xs):
                with av.get_tensors() as t:
                    t[0].copy_(x)
            start = time.perf_counter()
            controls = [av.step(wait=False, timeout=timeout) for av in avs]
            for c in controls:
                c.result()
            best = min(best, time.perf_counter() - start)
        outs = []
        for av in avs:
            with av.get_tensors() as t:
                outs.append(t[0].clone())
        return {"seconds": best, "identical": all(torch.equal(outs[0], o) for o in outs),
                "rel_error": max(rel_error(o, xs) for o in outs), "bytes_sent_per_peer": None}
    finally:
        for av in avs:
            av.shutdown()


def rel_error(mean: torch.Tensor, xs: list[torch.Tensor]) -> float:
    true = sum(xs) / len(xs)
    return float((mean - true).norm() / true.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(args.numel, generator=g) for _ in range(args.peers)]
    dhts = [start_dht()]
    dhts += [start_dht(visible_maddrs(dhts[0])) for _ in range(args.peers - 1)]
    rows = {}
    try:
        for codec in ("fp32", "fp16", "fp4"):
            rows[f"p2p_diloco {codec}"] = bench_ours(dhts, xs, codec, args.repeats, args.timeout)
        rows["hivemind Float16Compression"] = bench_stock(dhts, xs, args.repeats, args.timeout)
    finally:
        for d in dhts:
            d.shutdown()
    print(f"{args.peers} peers on loopback, {args.numel:,} values, best of {args.repeats}")
    print(f"{'averager':>28} {'seconds':>8} {'MB sent/peer':>12} {'rel error':>10} {'identical':>9}")
    for name, r in rows.items():
        sent = f"{r['bytes_sent_per_peer'] / 1e6:12.1f}" if r["bytes_sent_per_peer"] else f"{'-':>12}"
        print(f"{name:>28} {r['seconds']:8.2f} {sent} {r['rel_error']:10.2e} {str(r['identical']):>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peers": args.peers, "numel": args.numel, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
