"""Throughput, bytes on the wire and error of p2p_diloco's codecs next to hivemind's fp16.

Encode + decode of one randn fp32 tensor on ONE core (torch.set_num_threads(1)),
best of --repeats; throughput is GB/s of fp32 input (4 * numel bytes / time).

    python scripts/bench_codecs.py                       # 16M elements, 5 repeats
    python scripts/bench_codecs.py --numel 1000000 --repeats 3 --json bench.json

Against another revision's codecs (a machine this noisy needs the two interleaved in one process to compare):

    git show REV:p2p_diloco/core/codecs.py > /tmp/codecs_rev.py
    python scripts/bench_codecs.py --baseline /tmp/codecs_rev.py --json speedup.json

prints, per codec the two share, the best encode+decode time of each over --repeats rounds that alternate them.

int2, sign1, top4 and top16 run their compiled kernels (core/codec_kernels.py); P2P_DILOCO_CODEC_KERNELS=0 times
their vectorized fallback instead.

(with the package installed, `pip install -e .`, or from the repo root with PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time

import torch

from p2p_diloco.core import codecs
from p2p_diloco.core.codecs import CODECS


def best_times(encode, decode, repeats: int) -> tuple[float, float, float]:
    """(encode s, decode s, encode+decode s), each the best over repeats."""
    best_encode = best_decode = best_total = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        payload = encode()
        middle = time.perf_counter()
        decode(payload)
        stop = time.perf_counter()
        best_encode = min(best_encode, middle - start)
        best_decode = min(best_decode, stop - middle)
        best_total = min(best_total, stop - start)
    return best_encode, best_decode, best_total


def measure(name: str, x: torch.Tensor, encode, decode, wire_bytes, repeats: int) -> dict:
    payload = encode()
    decoded = decode(payload).reshape(-1).float()
    relative_error = float((decoded - x).norm() / x.norm())
    encode_s, decode_s, total_s = best_times(encode, decode, repeats)
    return {
        "codec": name,
        "encode_ms": encode_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "total_ms": total_s * 1e3,
        "gb_per_s": 4 * x.numel() / total_s / 1e9,
        "wire_bytes": wire_bytes(payload),
        "relative_error": relative_error,
    }


def hivemind_fp16_row(x: torch.Tensor, repeats: int) -> dict | None:
    try:
        from hivemind.compression import CompressionInfo, Float16Compression
    except ImportError as error:  # pragma: no cover - hivemind is a project dependency
        print(f"hivemind not importable, skipped: {error}")
        return None
    compression, info = Float16Compression(), CompressionInfo.from_tensor(x)
    return measure(
        "hivemind Float16Compression",
        x,
        lambda: compression.compress(x, info),
        compression.extract,
        lambda message: message.ByteSize(),
        repeats,
    )


def baseline_rows(path: str, x: torch.Tensor, repeats: int) -> list[dict]:
    """This revision's codecs against the module at `path` (another revision's core/codecs.py), interleaved."""
    spec = importlib.util.spec_from_file_location("baseline_codecs", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {path}: not a Python file")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    names = [name for name in CODECS if name in baseline.CODECS]
    best = {(name, which): float("inf") for name in names for which in ("baseline", "this")}
    for _ in range(repeats):
        for name in names:
            for which, codec in (("baseline", baseline.CODECS[name]), ("this", CODECS[name])):
                start = time.perf_counter()
                codec.decode(codec.encode(x), x.numel())
                best[(name, which)] = min(best[(name, which)], time.perf_counter() - start)
    return [{"codec": name, "baseline_ms": best[(name, "baseline")] * 1e3, "this_ms": best[(name, "this")] * 1e3,
             "speedup": best[(name, "baseline")] / best[(name, "this")]} for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20, help="elements of the fp32 test tensor")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats; the best is reported")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--baseline", metavar="CODECS_PY", help="compare with another revision's core/codecs.py")
    args = parser.parse_args()

    torch.set_num_threads(1)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    if args.baseline:
        rows = baseline_rows(args.baseline, x, args.repeats)
        print(f"{args.numel:,} fp32 elements, 1 thread, encode+decode, best of {args.repeats} alternating rounds")
        print(f"{'codec':<8} {'baseline ms':>11} {'this ms':>8} {'speedup':>8}")
        for row in rows:
            print(f"{row['codec']:<8} {row['baseline_ms']:>11.1f} {row['this_ms']:>8.1f} {row['speedup']:>7.2f}x")
        if args.json:
            with open(args.json, "w") as file:
                json.dump({"baseline": args.baseline, "numel": args.numel, "repeats": args.repeats, "rows": rows},
                          file, indent=2)
            print(f"wrote {args.json}")
        return
    rows = []
    for name, codec in CODECS.items():
        rows.append(
            measure(name, x, lambda c=codec: c.encode(x), lambda p, c=codec: c.decode(p, x.numel()), len, args.repeats)
        )
    # top16's real input: a reducer's mean of top4 contributions (at most 16 values of every 256, as in a group of 4)
    top4, top16 = CODECS["top4"], CODECS["top16"]
    mean = sum(top4.roundtrip(torch.randn(args.numel, generator=torch.Generator().manual_seed(1 + i)))
               for i in range(4)) / 4
    row = measure("top16", mean, lambda: top16.encode(mean), lambda p: top16.decode(p, mean.numel()), len, args.repeats)
    rows.append({**row, "codec": "top16 (on a mean of 4 top4)"})
    hivemind_row = hivemind_fp16_row(x, args.repeats)
    if hivemind_row:
        rows.append(hivemind_row)

    kernels = codecs._kernels()  # (int2/sign1/top4/top16: compiled, or the vectorized fallback)
    compiled = f"numba {kernels.numba.__version__}" if kernels is not None else "none (vectorized code)"
    print(f"{args.numel:,} fp32 elements ({4 * args.numel / 2**20:.0f} MiB), 1 thread, best of {args.repeats}; "
          f"codec kernels: {compiled}")
    header = (f"{'codec':<28} {'encode ms':>9} {'decode ms':>9} {'enc+dec ms':>10} {'GB/s':>6} "
              f"{'wire bytes':>12} {'x fp32':>7} {'rel err':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['codec']:<28} {row['encode_ms']:>9.1f} {row['decode_ms']:>9.1f} {row['total_ms']:>10.1f} "
            f"{row['gb_per_s']:>6.2f} {row['wire_bytes']:>12,} {4 * args.numel / row['wire_bytes']:>7.2f} "
            f"{row['relative_error']:>9.2e}"
        )
    if args.json:
        meta = {
            "numel": args.numel,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "codec_kernels": compiled,
        }
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "rows": rows}, file, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
