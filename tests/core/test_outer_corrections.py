"""HeLoCo's per-block correction of an outer gradient against the outer momentum, and CGAD's age weight."""

from __future__ import annotations

import math

import pytest
import torch

from p2p_diloco.core.outer_corrections import AGE_CUTOFF, C_OK, MIN_AGE_WEIGHT, age_weight, heloco


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _block(cos: float, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A momentum block and an outer-gradient block at cosine `cos` to it, of another norm."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g)
    w = torch.randn(n, generator=g)
    w -= torch.dot(w, v) / torch.dot(v, v) * v  # orthogonal to v
    u = cos * v / v.norm() + math.sqrt(1 - cos * cos) * w / w.norm()
    return 3.0 * u, 0.5 * v


def test_an_aligned_block_passes_unchanged_the_others_turn_toward_the_momentum():
    blocks = [_block(c, seed=i) for i, c in enumerate((0.9, -0.6, C_OK / 2, 0.3))]
    grad = torch.cat([u for u, _ in blocks])
    momentum = torch.cat([v for _, v in blocks])
    out = heloco(grad, momentum, [64] * 4)
    parts = out.split(64)
    assert torch.equal(parts[0], blocks[0][0]) and torch.equal(parts[3], blocks[3][0])  # c >= C_OK: as they were
    for i in (1, 2):  # anti-aligned, weakly aligned: closer to the momentum's direction than before
        u, v = blocks[i]
        assert _cos(parts[i], v) > _cos(u, v) + 1e-3
    # a weakly aligned block is turned, not rescaled; an anti-aligned one keeps its part across the momentum
    assert math.isclose(float(parts[2].norm()), float(blocks[2][0].norm()), rel_tol=1e-5)
    u, v = blocks[1]
    across = lambda x: x - torch.dot(x, v) / torch.dot(v, v) * v  # noqa: E731
    assert torch.allclose(across(parts[1]), across(u), atol=1e-5)
    assert torch.equal(grad, torch.cat([u for u, _ in blocks]))  # the input is left alone


def test_no_momentum_yet_or_a_zero_block_changes_nothing_and_blocks_must_cover_the_gradient():
    grad = torch.randn(10)
    assert torch.equal(heloco(grad, torch.zeros(10), [4, 6]), grad)
    assert torch.equal(heloco(torch.zeros(10), torch.randn(10), [10]), torch.zeros(10))
    with pytest.raises(ValueError, match="blocks of 8 values for an outer gradient of 10"):
        heloco(grad, torch.randn(10), [4, 4])


def test_the_age_weight_is_one_when_fresh_falls_with_age_and_never_reaches_zero():
    assert age_weight(0, 0.5) == 1.0 and age_weight(3, 0.0) == 1.0
    weights = [age_weight(a, 0.5) for a in range(AGE_CUTOFF + 3)]
    assert all(a > b for a, b in zip(weights[:AGE_CUTOFF], weights[1:AGE_CUTOFF + 1]))
    assert math.isclose(weights[1], math.exp(-0.5) * 0.5 * (1 + math.cos(math.pi / AGE_CUTOFF)))
    assert weights[AGE_CUTOFF] == weights[AGE_CUTOFF + 2] == MIN_AGE_WEIGHT
