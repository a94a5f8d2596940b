"""How a flat vector is cut into the parts of a butterfly all-reduce: one contiguous part per reducer,
inner boundaries on codec block multiples (so every part encodes on its own)."""

from __future__ import annotations

import math


def block_aligned_parts(numel: int, fractions: list[float], block: int) -> list[tuple[int, int]]:
    """Cut [0, numel) by `fractions` (summing to 1) with inner boundaries on `block` multiples."""
    blocks = math.ceil(numel / block)
    bounds, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(min(numel, round(acc * blocks) * block))
    bounds.append(numel)
    for i in range(1, len(bounds)):
        bounds[i] = max(bounds[i], bounds[i - 1])
    return list(zip(bounds[:-1], bounds[1:]))


def butterfly_parts(numel: int, members: int, block: int) -> list[tuple[int, int]]:
    """Cut [0, numel) into `members` equal contiguous parts whose inner boundaries fall on `block` multiples."""
    return block_aligned_parts(numel, [1.0 / members] * members, block)
