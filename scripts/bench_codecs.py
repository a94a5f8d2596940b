"""Throughput, bytes on the wire and error of p2p_diloco's codecs next to hivemind's fp16.

Encode + decode of one randn fp32 tensor on ONE core (torch.set_num_threads(1)),
best of --repeats; throughput is GB/s of fp32 input (4 * numel bytes / time).

    python scripts/bench_codecs.py                       # 16M elements, 5 repeats
    python scripts/bench_codecs.py --numel 1000000 --repeats 3 --json bench.json

(with the package installed, `pip install -e .`, or from the repo root with PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20, help="elements of the fp32 test tensor")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats; the best is reported")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    torch.set_num_threads(1)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, codec in CODECS.items():
        rows.append(
            measure(name, x, lambda c=codec: c.encode(x), lambda p, c=codec: c.decode(p, x.numel()), len, args.repeats)
        )
    hivemind_row = hivemind_fp16_row(x, args.repeats)
    if hivemind_row:
        rows.append(hivemind_row)

    print(f"{args.numel:,} fp32 elements ({4 * args.numel / 2**20:.0f} MiB), 1 thread, best of {args.repeats}")
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
        }
        with open(args.json, "w") as file:
            json.dump({"meta": meta, "rows": rows}, file, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
