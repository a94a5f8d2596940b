"""Published corrections of a part before it is averaged, for unequal and stale peers (measured, not the defaults).

Both act on this peer's own part only, from what every member agrees on (the fragment's outer momentum, the
round its anchor comes from), so members stay bit-identical whatever each one corrects:

* `heloco`: HeLoCo's direction-aware correction (arXiv 2606.00271), per parameter tensor b of the fragment,
  with u = the outer gradient's block, v = the outer momentum's, c = cos(u, v) and a confidence
  conf = |u| / (|u| + KAPPA |v| + eps): a block with c >= C_OK passes unchanged; an anti-aligned one (c < 0)
  gets u - beta c |u| v/|v|, beta = min(K_S (-c) conf, BETA_MAX) (its component against the trajectory shrunk);
  a weakly aligned one is turned toward the momentum, |u| w/|w| with w = (1 - lam) u/|u| + lam v/|v| and
  lam = min(K_D (C_OK - c) conf, 1). The constants are this module's choice (the paper's own values were not at
  hand); with no momentum yet (the first round) nothing changes.
* `age_weight`: CGAD's age decay (arXiv 2605.09126), sigma(a) = exp(-rate a) times a cosine gate that reaches 0
  at AGE_CUTOFF, for a part whose anchor is a rounds older than the round before this one (a peer that could
  not download the swarm's newer state averages with its own, `catch_up`); a = 0 is weight 1.

README (Unequal peers, Stale anchors) has what each was measured to do.
"""

from __future__ import annotations

import math

import torch

C_OK = 0.1  # a block at least this aligned with the outer momentum passes unchanged
K_S, BETA_MAX = 1.0, 0.5  # shrinkage of an anti-aligned block's component, and its cap
K_D = 1.0  # how far a weakly aligned block turns toward the momentum
KAPPA = 1.0  # the momentum's norm in the confidence
EPS = 1e-12
AGE_CUTOFF = 10  # rounds: a part this stale weighs (next to) nothing
MIN_AGE_WEIGHT = 1e-6  # a part's weight never falls to 0 (a group of stale parts alone still averages)


def heloco(outer_grad: torch.Tensor, momentum: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """`outer_grad` corrected block by block (`sizes`: the fragment's tensors in its flat order) against
    `momentum`; a new tensor."""
    out = outer_grad.clone()
    offset = 0
    for n in sizes:
        u, v = outer_grad[offset:offset + n], momentum[offset:offset + n]
        nu, nv = float(u.norm()), float(v.norm())
        if nu > EPS and nv > EPS:
            c = float(torch.dot(u, v)) / (nu * nv)
            conf = nu / (nu + KAPPA * nv + EPS)
            if c < 0.0:
                beta = min(K_S * -c * conf, BETA_MAX)
                out[offset:offset + n] = u - (beta * c * nu / nv) * v
            elif c < C_OK:
                lam = min(K_D * (C_OK - c) * conf, 1.0)
                w = (1.0 - lam) / nu * u + lam / nv * v
                out[offset:offset + n] = w * (nu / max(float(w.norm()), EPS))
        offset += n
    if offset != outer_grad.numel():
        raise ValueError(f"blocks of {offset} values for an outer gradient of {outer_grad.numel()}")
    return out


def age_weight(age: int, rate: float) -> float:
    """CGAD's sigma(age): exp(-rate age) under a cosine gate that closes at AGE_CUTOFF rounds (1 at age 0)."""
    if age <= 0 or rate <= 0.0:
        return 1.0
    gate = 0.5 * (1.0 + math.cos(math.pi * min(age, AGE_CUTOFF) / AGE_CUTOFF))
    return max(math.exp(-rate * age) * gate, MIN_AGE_WEIGHT)
