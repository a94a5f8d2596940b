"""How often audits catch a lying reducer, and what they cost in bytes (`swarm/audit.py`).

Three peers' averagers on 127.0.0.1 (real averager processes and daemons), one fragment of `--numel` values,
fp4. For each audit probability p:
* honest rounds: the bytes each member received for audits against the round's own payload bytes;
* rounds with a lying reducer (`P2P_DILOCO_ATTACK=lie`: negated means, honest commitments), bans off so that
  every round counts: the fraction of rounds in which the lie was caught (the round then applied by no member),
  against the expected 1 - (1 - p)^2 (two honest members, each auditing its part on a private coin).

    python scripts/bench_audit.py --rounds 40 --json results/bench_audit.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from p2p_diloco.core.averaging import AveragingFailed, RoundKey  # noqa: E402
from p2p_diloco.node.attacks import ENV as ATTACK  # noqa: E402
from p2p_diloco.swarm.averager import SwarmAverager  # noqa: E402
from p2p_diloco.swarm.dht import start_dht, visible_maddrs  # noqa: E402


def averager(dht, numel: int, audit: float, lying: bool) -> SwarmAverager:
    os.environ[ATTACK] = "lie" if lying else ""
    try:
        av = SwarmAverager(dht, "bench", [numel], "fp4", round_timeout=20, target_group_size=3,
                           min_matchmaking_time=2, search_timeout=10, audit=audit)
    finally:
        os.environ.pop(ATTACK, None)
    av.ban_on_proof = False
    return av


def run_rounds(avs, rounds: int, first: int) -> dict:
    caught = applied = failed_other = 0
    for r in range(first, first + rounds):
        pending = [av.begin(RoundKey("bench", 0, r), torch.randn(av.fragment_sizes[0]), 1.0) for av in avs]
        outcomes = []
        for p in pending:
            try:
                outcomes.append(p.result())
            except AveragingFailed as e:
                outcomes.append(e)
        honest = outcomes[:2]
        if all(not isinstance(o, Exception) for o in honest):
            applied += 1
        elif any("wrong mean" in str(o) for o in honest):
            caught += 1
        else:
            failed_other += 1
    return {"rounds": rounds, "caught": caught, "applied": applied, "failed_otherwise": failed_other}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--numel", type=int, default=200_000)
    parser.add_argument("--probabilities", default="0.1,0.3,0.5,1.0")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    first = start_dht()
    dhts = [first] + [start_dht(visible_maddrs(first)) for _ in range(2)]
    results = []
    try:
        for p in (float(x) for x in args.probabilities.split(",")):
            began = time.time()
            honest = [averager(d, args.numel, p, False) for d in dhts]
            try:
                h = run_rounds(honest, args.rounds, 1)
                payload = sum(av.bytes_sent + av.bytes_received for av in honest)
                audit_bytes = sum(av.audit_bytes for av in honest)
            finally:
                for av in honest:
                    av.shutdown()
            mixed = [averager(d, args.numel, p, i == 2) for i, d in enumerate(dhts)]
            try:
                m = run_rounds(mixed, args.rounds, 1)
            finally:
                for av in mixed:
                    av.shutdown()
            decided = m["caught"] + m["applied"]
            row = {"p": p, "honest_rounds_applied": h["applied"], "audit_bytes_per_payload_byte":
                   round(audit_bytes / max(payload, 1), 4), "lying_rounds": m,
                   "caught_fraction": round(m["caught"] / max(decided, 1), 3),
                   "expected_caught_fraction": round(1 - (1 - p) ** 2, 3), "wall_s": round(time.time() - began, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for d in dhts:
            d.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"numel": args.numel, "codec": "fp4", "peers": 3, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
