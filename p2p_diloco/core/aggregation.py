"""How a reducer combines the members' contributions to one piece of a fragment: bounded damage from bad ones.

A member's outer gradient and its weight (the tokens behind it) are self-declared: in a public run one member
can send its gradient scaled by 1000 or sign-flipped, or claim 10^9 tokens. Three protections, each a pure
function of what the reducer holds (so anyone holding the same contributions gets the same bytes):

* **Weights are capped** (`cap_weights`): no member counts for more than WEIGHT_CAP times the group's median
  weight. Every member computes the same caps from the group's gathered metadata.
* **Outliers are refused**: a contribution whose RMS is more than REFUSE_FACTOR times the reference (the lower
  median of the contributions' RMS to this piece) is left out of the piece's mean, and named to the caller.
  An honest fast peer's outer gradient is larger than a slow one's (more inner steps), but far less than 16x;
  a poisoned one scaled by 1000 is refused. A zero reference (half the group sent nothing) refuses nothing.
* **The rule** (a run option, `DiLoCoConfig.aggregation`): `mean`, the weighted mean; `clip`, each
  contribution first scaled down to at most CLIP_FACTOR times the reference RMS; `trimmed`, per coordinate the
  `trimmed_count(n)` highest and lowest values left out, the weighted mean of the rest (a sign-flipped or
  scaled coordinate lands at an end and is dropped); `winsorized`, the same ends clamped to the nearest kept
  value instead of dropped (every contribution still counts, none beyond the others' range); `centered`, a
  centered clip (Karimireddy et al. 2021) around the coordinate-wise median: each contribution's distance from
  the center counts at most the median distance, CENTERED_ITERATIONS times. Measured on the embedded task:
  `scripts/bench_poisoning.py` and the README.

Order is fixed (the members' order as given) and the sums are fp32: the result is bit-identical wherever it
is recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import AGGREGATIONS

WEIGHT_CAP = 4.0  # a member's weight counts at most this many times the group's median weight
REFUSE_FACTOR = 16.0  # a contribution whose RMS is more than this times the reference is left out
CLIP_FACTOR = 2.0  # `clip`: a contribution's RMS is scaled down to at most this times the reference
CENTERED_ITERATIONS = 2  # `centered`: clipping steps from the coordinate-wise median


def cap_weights(weights: list[float], cap: float = WEIGHT_CAP) -> list[float]:
    """Each weight capped at `cap` times the lower median of `weights` (inf: no cap)."""
    if not weights or math.isinf(cap):
        return list(weights)
    median = sorted(weights)[(len(weights) - 1) // 2]
    return [min(w, cap * median) for w in weights]


def trimmed_count(members: int) -> int:
    """`trimmed`: how many values are left out at each end of a coordinate, for `members` contributions: about a
    fifth of them, at least one from 3 members on (3 members: the coordinate-wise median)."""
    return 0 if members < 3 else max(1, math.ceil(members / 5))


def rms(x: torch.Tensor) -> float:
    return float(x.double().square().mean().sqrt()) if x.numel() else 0.0


@dataclass(frozen=True)
class Aggregation:
    """One way of combining contributions (`combine`); `refuse_factor` and `weight_cap` inf: no protection (the
    bare weighted mean, for measuring what the protections are worth)."""

    rule: str = "mean"
    refuse_factor: float = REFUSE_FACTOR
    clip_factor: float = CLIP_FACTOR
    weight_cap: float = WEIGHT_CAP

    @classmethod
    def unprotected(cls, rule: str = "mean") -> "Aggregation":
        return cls(rule, refuse_factor=math.inf, weight_cap=math.inf)

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.rule!r}: choose one of {', '.join(AGGREGATIONS)}")

    def combine(self, contributions: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, list[int]]:
        """The combined fp32 vector of `contributions` (same length, fp32) weighted by `weights` (> 0, already
        capped), and the indices of the contributions refused as outliers (or as not finite)."""
        sizes = [rms(x) for x in contributions]
        finite = [s for s in sizes if math.isfinite(s)]
        reference = sorted(finite)[(len(finite) - 1) // 2] if finite else 0.0
        refused = [i for i, s in enumerate(sizes)
                   if not math.isfinite(s) or reference > 0 and s > self.refuse_factor * reference]
        kept = [i for i in range(len(contributions)) if i not in refused]
        if not kept:
            return torch.zeros_like(contributions[0]), refused
        xs = [contributions[i] for i in kept]
        ws = [float(weights[i]) for i in kept]
        if self.rule == "clip" and reference > 0:
            bound = self.clip_factor * reference
            xs = [x * (bound / sizes[i]) if sizes[i] > bound else x for x, i in zip(xs, kept)]
        if self.rule in ("trimmed", "winsorized") and (b := trimmed_count(len(xs))) > 0:
            order = torch.sort(torch.stack(xs), dim=0, stable=True)
            w = torch.tensor(ws, dtype=torch.float32)[order.indices]
            rows = range(b, len(xs) - b) if self.rule == "trimmed" else range(len(xs))
            acc, total = torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
            for row in rows:  # a fixed order: from the lowest value up
                acc += order.values[min(max(row, b), len(xs) - b - 1)] * w[row]
                total += w[row]
            return acc / total, refused
        if self.rule == "centered" and len(xs) >= 3:
            return _centered_clip(xs, ws), refused
        total = sum(ws)
        acc = torch.zeros_like(xs[0])
        for x, w in zip(xs, ws):  # a fixed order: the members' order
            acc += x * (w / total)
        return acc, refused


def _centered_clip(xs: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    """From the coordinate-wise (lower) median, CENTERED_ITERATIONS steps of v += weighted mean of each
    contribution's offset from v, clipped to the median offset's RMS (a far-off contribution pulls no harder than
    a typical one)."""
    center = torch.sort(torch.stack(xs), dim=0, stable=True).values[(len(xs) - 1) // 2].clone()
    total = sum(ws)
    for _ in range(CENTERED_ITERATIONS):
        offsets = [x - center for x in xs]
        sizes = [rms(d) for d in offsets]
        tau = sorted(sizes)[(len(sizes) - 1) // 2]
        step = torch.zeros_like(center)
        for d, size, w in zip(offsets, sizes, ws):  # a fixed order: the members' order
            step += d * ((min(1.0, tau / size) if size > 0 else 1.0) * w / total)
        center += step
    return center
