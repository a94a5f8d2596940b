"""One fragment's all-reduce on emulated links: ours (fp32/fp16/fp4) against stock hivemind and gloo.

Every peer is a process in a network namespace of its own (root only), its link
shaped as a links file says (`p2p_diloco.emulation`): rate caps with `tbf`, delay
by the project's delay line. For each configuration (codec, peers, payload) the
peers run `--repeats` rounds; a round's all-reduce time is from the first member
entering the aggregation (the group is formed: matchmaking is not counted) to
the last member holding the result, read from the members' wall clocks (one
machine, one clock). The ideal is `2·(N−1)/N · S / R`: S the payload bytes one
peer's vector takes on the wire in that codec, R the per-peer rate.

Also measured: stock hivemind `DecentralizedAverager` with `Float16Compression`
(its aggregation, timed the same way) and `torch.distributed` gloo all-reduce
(fp32, barrier first). Every member's result must be bit-identical (sha256).

    python scripts/bench_allreduce.py --peers 4 --mbit 50 --delay-ms 0 --payload-mb 4 16
    python scripts/bench_allreduce.py --quick     # one small configuration, a smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------- worker side (one per namespace)

def _vector(seed: int, rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed * 1000 + rank))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


class _TimedStock:
    """Stock hivemind averaging, its aggregation timed like ours."""

    @staticmethod
    def make(dht, numel, peers, timeout, prefix, matchmaking):
        from hivemind.averaging import DecentralizedAverager
        from hivemind.compression import Float16Compression

        class Timed(DecentralizedAverager):
            async def _aggregate_with_group(self, *args, **kwargs):
                began = time.time()
                await super()._aggregate_with_group(*args, **kwargs)
                return {"began": began, "ended": time.time()}

        return Timed([torch.zeros(numel)], dht=dht, prefix=prefix, start=True, target_group_size=peers,
                     min_matchmaking_time=matchmaking, request_timeout=matchmaking / 2, allreduce_timeout=timeout,
                     compression=Float16Compression())


def _worker_round(av, impl: str, x: torch.Tensor, key, timeout: float) -> tuple[dict, torch.Tensor]:
    if impl == "ours":
        pending = av.begin(key, x, 1.0)
        mean = pending.result().mean
        return pending.control.result(), mean
    with av.get_tensors() as t:
        t[0].copy_(x)
    stats = av.step(timeout=timeout)
    with av.get_tensors() as t:
        return stats, t[0].clone()


def worker(args) -> None:
    """Start a DHT node on `--address`, print its multiaddrs, then run the configurations read from stdin."""
    from p2p_diloco.core.averaging import RoundKey
    from p2p_diloco.swarm import butterfly
    from p2p_diloco.swarm.averager import SwarmAverager
    from p2p_diloco.swarm.dht import start_dht, visible_maddrs
    butterfly_pace = butterfly.PACE

    # (no torch.set_num_threads here: an averager process forked after it trips torch's "Invalid thread pool"
    # assert; OMP_NUM_THREADS=1 comes from the environment)
    dht = start_dht(args.initial_peers or None, host_maddrs=[f"/ip4/{args.address}/tcp/0"])
    print(json.dumps({"maddrs": visible_maddrs(dht)}), flush=True)
    previous = None  # shut down only once every peer answered (a reducer may still be streaming means)
    for line in sys.stdin:
        if previous is not None:
            previous.shutdown()
        job = json.loads(line)
        x = _vector(job["seed"], args.rank, job["numel"])
        prefix = f"b{job['id']}"
        if job["impl"] == "ours":
            butterfly.PACE = butterfly_pace if job.get("paced", True) else 0.0  # (the averager forks from here)
            av = SwarmAverager(dht, prefix, [job["numel"]], job["codec"], round_timeout=job["timeout"],
                               target_group_size=job["peers"], min_matchmaking_time=job["matchmaking"],
                               uplink_mbit=(job.get("uplinks") or {}).get(str(args.rank)),
                               search_timeout=job["timeout"])
        else:
            av = _TimedStock.make(dht, job["numel"], job["peers"], job["timeout"], prefix, job["matchmaking"])
        previous, rounds = av, []
        for r in range(job["repeats"]):
            try:
                stats, mean = _worker_round(av, job["impl"], x, RoundKey(prefix, 0, r), job["timeout"])
                rounds.append({"began": stats["began"], "ended": stats["ended"], "sha": _digest(mean),
                               "sent": stats.get("sent"), "group": stats.get("peers"),
                               "setup_s": stats.get("setup_s")})
            except Exception as e:
                rounds.append({"error": repr(e)[:300]})
        print(json.dumps({"rounds": rounds}), flush=True)
    if previous is not None:
        previous.shutdown()
    dht.shutdown()


def gloo_worker(args) -> None:
    """One rank of a gloo all-reduce (fp32); prints each repeat's (began, ended) after a barrier."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world)
    x = _vector(args.seed, args.rank, args.numel)
    rounds = []
    for _ in range(args.repeats):
        y = x.clone()
        dist.barrier()
        began = time.time()
        dist.all_reduce(y)
        rounds.append({"began": began, "ended": time.time(), "sha": _digest(y)})
    print(json.dumps({"rounds": rounds}), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------- coordinator side

def _read_json_line(proc: subprocess.Popen, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what}: the process exited (code {proc.poll()})")
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise TimeoutError(f"{what}: no answer in {timeout:.0f}s")


def _round_times(answers: list[dict]) -> list[dict]:
    """Per repeat: the all-reduce's time (first member in to last member out) and whether results agree."""
    out = []
    for rounds in zip(*(a["rounds"] for a in answers)):
        errors = [r["error"] for r in rounds if "error" in r]
        if errors:
            out.append({"error": errors[0]})
            continue
        split = [r["group"] for r in rounds if r.get("group") not in (None, len(rounds))]
        if split:  # matchmaking formed smaller groups: not one all-reduce of every peer
            out.append({"error": f"matchmaking split the peers into groups of {sorted(split)}"})
            continue
        out.append({"seconds": max(r["ended"] for r in rounds) - min(r["began"] for r in rounds),
                    "sent_max": max((r.get("sent") or 0) for r in rounds),
                    "member_seconds": sorted(round(r["ended"] - min(q["began"] for q in rounds), 3) for r in rounds),
                    "start_spread": max(r["began"] for r in rounds) - min(r["began"] for r in rounds),
                    # the longest a member took from entering the round to its first chunk out (ours only)
                    "setup_max": max((r.get("setup_s") or 0.0) for r in rounds),
                    "identical": len({r["sha"] for r in rounds}) == 1})
    return out


class Bench:
    def __init__(self, net, peers: int, log_dir: str, one_way_s: float = 0.0):
        self.net, self.peers, self.log_dir = net, peers, log_dir
        # matchmaking needs a few round trips per member: at long delays a short search splits the peers
        self.matchmaking = 2.0 + 10 * one_way_s
        self.procs: list[subprocess.Popen] = []
        self.jobs = 0

    def start(self) -> None:
        maddrs = None
        for i in range(self.peers):
            argv = [sys.executable, os.path.abspath(__file__), "worker", "--rank", str(i),
                    "--address", self.net.address(i)]
            if maddrs:
                argv += ["--initial-peers", *maddrs[:1]]
            log = open(os.path.join(self.log_dir, f"worker{i}.log"), "w")
            proc = self.net.popen(i, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            self.procs.append(proc)
            answer = _read_json_line(proc, 90, f"worker {i} start")
            maddrs = maddrs or answer["maddrs"]

    def run(self, impl: str, codec: str, numel: int, repeats: int, timeout: float,
            uplinks: list[float] | None = None, paced: bool = True) -> list[dict]:
        """`uplinks`: each peer's declared uplink (Mbit/s), else none declared; `paced`: what a peer with a
        declared uplink sends is paced to it (README: Pacing and chunk size), else not."""
        self.jobs += 1
        job = {"id": self.jobs, "impl": impl, "codec": codec, "numel": numel, "repeats": repeats,
               "peers": self.peers, "timeout": timeout, "seed": self.jobs, "matchmaking": self.matchmaking,
               "uplinks": {str(i): u for i, u in enumerate(uplinks)} if uplinks else None, "paced": paced}
        for p in self.procs:
            p.stdin.write(json.dumps(job) + "\n")
            p.stdin.flush()
        answers = [_read_json_line(p, repeats * (timeout + 30) + 60, f"{impl} {codec}") for p in self.procs]
        return _round_times(answers)

    def gloo(self, numel: int, repeats: int, timeout: float) -> list[dict]:
        port = 29500 + self.jobs
        self.jobs += 1
        procs = []
        for i in range(self.peers):
            argv = [sys.executable, os.path.abspath(__file__), "gloo", "--rank", str(i), "--world", str(self.peers),
                    "--master", f"{self.net.address(0)}:{port}", "--numel", str(numel), "--repeats", str(repeats),
                    "--seed", str(self.jobs)]
            log = open(os.path.join(self.log_dir, f"gloo{i}.log"), "w")
            procs.append(self.net.popen(i, argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}))
        try:
            answers = [_read_json_line(p, repeats * timeout + 60, "gloo") for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
        return _round_times(answers)

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def lp_optimal_seconds(payload_bytes: int, ups: list[float], downs: list[float]) -> float:
    """The least time a butterfly can take on these links (Mbit/s): choose each peer's share x_i of the vector to
    reduce so that the slowest link finishes first, where peer i uploads its contributions to the others
    (S - x_i) and the means of its part to every other peer ((N-1) x_i), and downloads the others' contributions
    to its part ((N-1) x_i) and the means of the other parts (S - x_i)."""
    from scipy.optimize import linprog

    n, size = len(ups), float(payload_bytes)
    # variables x_0 .. x_{n-1}, T; minimize T
    cost = [0.0] * n + [1.0]
    rows, bounds = [], []
    for i, (up, down) in enumerate(zip(ups, downs)):
        for rate in (up, down):
            row = [0.0] * (n + 1)
            row[i] = n - 2  # (n-1) x_i - x_i
            row[n] = -rate * 1e6 / 8
            rows.append(row)
            bounds.append(-size)
    result = linprog(cost, A_ub=rows, b_ub=bounds, A_eq=[[1.0] * n + [0.0]], b_eq=[size],
                     bounds=[(0, None)] * (n + 1))
    return float(result.x[-1])


def _ideal_seconds(peers: int, payload_bytes: int, mbit: float) -> float:
    return 2 * (peers - 1) / peers * payload_bytes / (mbit * 1e6 / 8)


def _best(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "seconds" in r]
    if not ok:
        return {"seconds": None, "identical": False, "errors": [r["error"] for r in rounds]}
    ok.sort(key=lambda r: r["seconds"])
    times = [r["seconds"] for r in ok]
    return {"seconds": times[len(times) // 2], "best": times[0], "start_spread": ok[len(ok) // 2]["start_spread"],
            "member_seconds": ok[len(ok) // 2]["member_seconds"], "setup_max": ok[len(ok) // 2].get("setup_max"),
            "identical": all(r["identical"] for r in ok),
            "errors": [r["error"] for r in rounds if "error" in r]}


def _numel_for(codec: str, payload_bytes: int) -> int:
    from p2p_diloco.core.codecs import get_codec
    c = get_codec(codec)
    lo, hi = 1, payload_bytes * 8  # no codec takes under a bit per value
    while lo < hi:  # the largest vector whose payload fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if c.wire_size(mid) <= payload_bytes else (lo, mid - 1)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--rank", type=int, required=True)
    w.add_argument("--address", required=True)
    w.add_argument("--initial-peers", nargs="*", default=[])
    g = sub.add_parser("gloo")
    for name in ("--rank", "--world", "--numel", "--repeats", "--seed"):
        g.add_argument(name, type=int, required=True)
    g.add_argument("--master", required=True)
    ap.add_argument("--peers", type=int, nargs="+", default=[4])
    ap.add_argument("--mbit", type=float, default=50.0)
    ap.add_argument("--delay-ms", type=float, nargs="+", default=[0.0],
                    help="one-way delay between two peers (each link gets half)")
    ap.add_argument("--payload-mb", type=float, nargs="+", default=[4.0, 16.0])
    ap.add_argument("--codecs", nargs="+", default=["fp32", "fp16", "fp4"])
    ap.add_argument("--stock", action="store_true", help="also stock hivemind Float16Compression")
    ap.add_argument("--gloo", action="store_true", help="also torch.distributed gloo (fp32)")
    ap.add_argument("--links", default=None,
                    help="a links file (peers/links-*.toml): its [[peer]] links instead of --mbit/--delay-ms; our "
                         "averager only, each peer declaring its uplink, against the LP-optimal time")
    ap.add_argument("--declared", action="store_true",
                    help="our peers declare their uplinks (--bandwidth): load balancing by them, and what they send "
                         "paced to them (README: Pacing and chunk size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="fraction of the ideal per configuration, as bars")
    ap.add_argument("--logs", default="/tmp/bench_allreduce_logs")
    args = ap.parse_args()
    if args.cmd == "worker":
        return worker(args)
    if args.cmd == "gloo":
        return gloo_worker(args)
    run_benchmarks(args)


def _network(peers: int, mbit: float, one_way_ms: float):
    from p2p_diloco.emulation.links import Link
    from p2p_diloco.emulation.wan import Wan
    net = Wan([Link(mbit, mbit, one_way_ms / 2)] * peers)
    if os.environ.get("BENCH_NO_IDLE_RESTART"):
        for i in range(peers):
            net.run(i, ["sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0"], check=True)
    return net


def run_benchmarks(args) -> None:
    from p2p_diloco.emulation.wan import exit_on_sigterm
    exit_on_sigterm()  # the namespaces go with us, even on SIGTERM
    os.makedirs(args.logs, exist_ok=True)
    if args.links:
        return run_on_links(args)
    rows = []
    for peers in args.peers:
        for delay in args.delay_ms:
            net = _network(peers, args.mbit, delay)
            bench = Bench(net, peers, args.logs, delay / 1000)
            try:
                bench.start()
                rows += _configurations(bench, args, peers, delay)
            finally:
                bench.close()
                net.close()
            _write(args, rows)
    _print(rows)
    if args.png:
        _plot(rows, args.png, args.mbit)


def run_on_links(args) -> None:
    """Mixed links: our round time against the LP-optimal time for the links' rates."""
    from p2p_diloco.emulation.links import read_links
    from p2p_diloco.emulation.wan import Wan

    _, links = read_links(args.links, args.peers[0])
    ups, downs = [link.up_mbit for link in links], [link.down_mbit for link in links]
    net = Wan(links)
    bench = Bench(net, len(links), args.logs)
    rows = []
    try:
        bench.start()
        for mb in args.payload_mb:
            payload = int(mb * 1e6)
            optimal = lp_optimal_seconds(payload, ups, downs)
            for codec in args.codecs:
                numel = _numel_for(codec, payload)
                # uplinks declared, what a peer sends paced to it; declared, unpaced; nothing declared (measured)
                for declared in ("paced", "unpaced", "none"):
                    result = _best(bench.run("ours", codec, numel, args.repeats, max(60.0, 8 * optimal),
                                             uplinks=ups if declared != "none" else None,
                                             paced=declared == "paced"))
                    seconds = result["seconds"]
                    rows.append({"impl": "ours", "codec": codec, "links": args.links, "ups": ups, "downs": downs,
                                 "uplinks_declared": declared != "none", "paced": declared == "paced",
                                 "payload_bytes": payload, "numel": numel,
                                 "lp_optimal_s": optimal, **result,
                                 "over_optimal": seconds / optimal if seconds else None})
                    print(f"{codec:>5} payload={mb:5.1f}MB declared={declared:>7} LP-optimal={optimal:6.2f}s "
                          f"took={seconds or float('nan'):6.2f}s ratio={rows[-1]['over_optimal'] or float('nan'):.2f}"
                          f" identical={result['identical']} {result['errors'][:1]}", flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump({"links": args.links, "repeats": args.repeats, "rows": rows}, f, indent=1)
    finally:
        bench.close()
        net.close()


def _configurations(bench: Bench, args, peers: int, delay: float) -> list[dict]:
    rows = []
    for mb in args.payload_mb:
        payload = int(mb * 1e6)
        ideal = _ideal_seconds(peers, payload, args.mbit)
        timeout = max(30.0, 6 * ideal + 4 * delay / 1000)
        impls = [("ours", c) for c in args.codecs] + ([("stock", "fp16")] if args.stock else [])
        for impl, codec in impls:
            numel = _numel_for(codec, payload)
            rates = [args.mbit] * peers if args.declared and impl == "ours" else None
            result = _best(bench.run(impl, codec, numel, args.repeats, timeout, uplinks=rates))
            rows.append({**_row(impl, codec, peers, delay, payload, numel, ideal, result),
                         "declared": rates is not None})
            print(_line(rows[-1]), flush=True)
        if args.gloo:
            numel = payload // 4
            rows.append(_row("gloo", "fp32", peers, delay, payload, numel, ideal,
                             _best(bench.gloo(numel, args.repeats, timeout))))
            print(_line(rows[-1]), flush=True)
    return rows


def _row(impl, codec, peers, delay, payload, numel, ideal, result) -> dict:
    seconds = result["seconds"]
    # no protocol beats the ideal plus three one-way delays: the leader's start reaching the members, the last
    # contribution reaching its reducer, its mean coming back
    reachable = ideal + 3 * delay / 1000
    return {"impl": impl, "codec": codec, "peers": peers, "one_way_delay_ms": delay, "payload_bytes": payload,
            "numel": numel, "ideal_s": ideal, "ideal_plus_latency_s": reachable, **result,
            "fraction_of_ideal": (ideal / seconds) if seconds else None,
            "fraction_of_ideal_plus_latency": (reachable / seconds) if seconds else None}


def _line(r: dict) -> str:
    frac = f"{100 * r['fraction_of_ideal']:5.1f}%" if r["fraction_of_ideal"] else "  fail"
    secs = f"{r['seconds']:7.2f}" if r["seconds"] else "      -"
    return (f"{r['impl']:>6} {r['codec']:>5} N={r['peers']} delay={r['one_way_delay_ms']:4.0f}ms "
            f"payload={r['payload_bytes'] / 1e6:5.1f}MB ideal={r['ideal_s']:6.2f}s took={secs}s {frac} "
            f"spread={r.get('start_spread') or 0:.2f}s setup={r.get('setup_max') or 0:.2f}s identical={r['identical']} {('errors: ' + r['errors'][0]) if r['errors'] else ''}")


def _print(rows: list[dict]) -> None:
    print()
    for r in rows:
        print(_line(r))


def _write(args, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mbit": args.mbit, "repeats": args.repeats, "rows": rows}, f, indent=1)


def _plot(rows: list[dict], path: str, mbit: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["peers"], r["one_way_delay_ms"], r["payload_bytes"]) for r in rows})
    impls = list(dict.fromkeys((r["impl"], r["codec"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 1.2), 4.5))
    width = 0.8 / len(impls)
    for j, (impl, codec) in enumerate(impls):
        ys = []
        for g in groups:
            hit = [r for r in rows if (r["peers"], r["one_way_delay_ms"], r["payload_bytes"]) == g
                   and (r["impl"], r["codec"]) == (impl, codec)]
            ys.append(100 * (hit[0]["fraction_of_ideal"] or 0) if hit else 0)
        label = f"{'p2p_diloco' if impl == 'ours' else 'hivemind' if impl == 'stock' else impl} {codec}"
        ax.bar([i + j * width for i in range(len(groups))], ys, width, label=label)
    ax.axhline(90, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"N={n}\n{d:.0f} ms\n{p / 1e6:.0f} MB" for n, d, p in groups], fontsize=8)
    ax.set_ylabel("% of 2(N-1)/N*S/R")
    ax.set_title(f"All-reduce time against the link-rate ideal, {mbit:.0f} Mbit/s per peer")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
