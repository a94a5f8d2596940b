"""Fuzz every decoder of remote or on-disk bytes (tests/fuzz_targets.py) for minutes: opt-in, not in the suite.

    python scripts/fuzz.py --engine atheris --seconds 600 --json results/fuzz_atheris.json
    python scripts/fuzz.py --engine hypothesis --seconds 600 --targets run_config,codec_fp4

`--seconds` is the whole run, shared evenly by the targets. atheris (libFuzzer, coverage-guided over our
package; `pip install atheris`) runs each target in a process of its own with a per-input timeout (a hang) and
an RSS limit (unbounded allocation); hypothesis runs random and mutated inputs with a per-input deadline. A crash
is any exception other than the target's own error type. Prints per target: inputs run, crashes, hangs; exits 1
when any target crashed or hung.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

PER_INPUT_TIMEOUT_S = 5  # an input that takes longer is a hang
RSS_LIMIT_MB = 2048  # a process above this is an unbounded allocation


def atheris_child(name: str, seconds: int, corpus: str) -> None:
    """In a process of its own: libFuzzer on one target until `seconds` are up (exits the process)."""
    import atheris

    with atheris.instrument_imports(include=["p2p_diloco"]):
        import fuzz_targets
    target = next(t for t in fuzz_targets.TARGETS if t[0] == name)
    for i, seed in enumerate(fuzz_targets.SEEDS.get(name, [])):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(seed)

    def one(data: bytes) -> None:
        fuzz_targets.run_one(target, data)

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-timeout={PER_INPUT_TIMEOUT_S}",
                   f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1", corpus], one)
    atheris.Fuzz()


def run_atheris(name: str, seconds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as corpus:
        started = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--seconds", str(seconds),
                               "--corpus", corpus], capture_output=True, text=True, timeout=seconds + 120)
        runs = [line for line in proc.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
        crashed = proc.returncode != 0
        hang = "ALARM: working on the last Unit for" in proc.stderr
        oom = "out-of-memory" in proc.stderr
        result = {"engine": "atheris", "inputs": int(runs[-1].split(":")[-1]) if runs else None,
                  "crashes": int(crashed and not hang and not oom), "hangs": int(hang), "out_of_memory": int(oom),
                  "seconds": round(time.monotonic() - started, 1), "corpus_files": len(os.listdir(corpus))}
        if crashed:
            result["output"] = proc.stderr[-3000:]
        return result


def run_hypothesis(name: str, seconds: int) -> dict:
    from hypothesis import HealthCheck, Phase, given, settings

    import fuzz_targets
    from fuzz_targets import inputs

    target = next(t for t in fuzz_targets.TARGETS if t[0] == name)
    count, failures, started = [0], [], time.monotonic()

    @settings(max_examples=2000, deadline=PER_INPUT_TIMEOUT_S * 1000, suppress_health_check=list(HealthCheck),
              database=None, phases=[Phase.generate])
    @given(data=inputs(name))
    def check(data):
        count[0] += 1
        fuzz_targets.run_one(target, data)

    while time.monotonic() - started < seconds:
        try:
            check()
        except Exception as e:  # hypothesis reports the falsifying input in the exception's notes
            failures.append(f"{type(e).__name__}: {e}"[:2000])
            break
    return {"engine": "hypothesis", "inputs": count[0], "crashes": len(failures), "hangs": 0,
            "seconds": round(time.monotonic() - started, 1), **({"output": failures[0]} if failures else {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["atheris", "hypothesis"], default="atheris")
    ap.add_argument("--seconds", type=int, default=600, help="the whole run, shared by the targets")
    ap.add_argument("--targets", default="", help="comma list of target names [default: all]")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        atheris_child(args.child, args.seconds, args.corpus)
        return 0
    import fuzz_targets

    names = [t[0] for t in fuzz_targets.TARGETS]
    chosen = args.targets.split(",") if args.targets else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(names)}")
    if args.engine == "atheris":
        try:
            import atheris  # noqa: F401
        except ImportError:
            ap.error("atheris is not installed: pip install atheris (or --engine hypothesis)")
    each = max(1, args.seconds // len(chosen))
    results = {}
    for name in chosen:
        results[name] = (run_atheris if args.engine == "atheris" else run_hypothesis)(name, each)
        r = results[name]
        print(f"{name:>20}  {r['inputs'] or 0:>9} inputs  {r['crashes']} crashes  {r['hangs']} hangs  "
              f"{r.get('out_of_memory', 0)} out of memory  ({r['seconds']:.0f} s)", flush=True)
        if "output" in r:
            print(r["output"], file=sys.stderr)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"engine": args.engine, "seconds": args.seconds, "targets": results}, f, indent=1)
        print(f"report: {args.json_path}")
    bad = [n for n, r in results.items() if r["crashes"] or r["hangs"] or r.get("out_of_memory")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
