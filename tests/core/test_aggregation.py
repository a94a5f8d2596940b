"""Combining contributions with bounded damage (`core.aggregation`) and a poisoning member in a `LocalGroup`."""

from __future__ import annotations

import math

import pytest
import torch

from p2p_diloco.core.aggregation import AGGREGATIONS, Aggregation, cap_weights, rms, trimmed_count
from p2p_diloco.core.averaging import RoundKey
from p2p_diloco.core.codecs import get_codec
from p2p_diloco.core.config import ConfigError, DiLoCoConfig
from p2p_diloco.core.local_group import LocalGroup
from p2p_diloco.node.attacks import Attack, AttackError, parse


def _honest(n: int, numel: int = 4096, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=g)
    return [common + 0.5 * torch.randn(numel, generator=g) for _ in range(n)]


def test_the_mean_is_the_weighted_mean_in_the_members_order_when_nobody_is_an_outlier():
    xs, ws = _honest(4), [1.0, 2.0, 3.0, 4.0]
    mean, refused = Aggregation().combine(xs, ws)
    expected = torch.zeros_like(xs[0])
    for x, w in zip(xs, ws):
        expected += x * (w / 10.0)
    assert refused == [] and torch.equal(mean, expected)


@pytest.mark.parametrize("rule", AGGREGATIONS)
def test_a_contribution_scaled_by_1000_is_refused_and_the_others_make_the_mean(rule):
    xs = _honest(5)
    poisoned = xs[:4] + [xs[4] * 1000]
    mean, refused = Aggregation(rule).combine(poisoned, [1.0] * 5)
    assert refused == [4]
    honest, _ = Aggregation(rule).combine(xs[:4], [1.0] * 4)
    assert torch.equal(mean, honest)
    # unprotected, the poisoned one owns the mean
    bare, none = Aggregation.unprotected().combine(poisoned, [1.0] * 5)
    assert none == [] and rms(bare) > 100 * rms(honest)


def test_non_finite_contributions_are_refused_and_silent_members_refuse_nobody():
    xs = _honest(3)
    bad = xs[2].clone()
    bad[7] = math.nan
    mean, refused = Aggregation().combine([xs[0], xs[1], bad], [1.0] * 3)
    assert refused == [2] and bool(torch.isfinite(mean).all())
    zeros = [torch.zeros_like(xs[0])] * 2 + [xs[0]]  # the reference is 0: nothing can be judged an outlier
    mean, refused = Aggregation().combine(zeros, [1.0] * 3)
    assert refused == [] and torch.allclose(mean, xs[0] / 3)


def test_clip_scales_a_large_contribution_down_to_twice_the_median_size():
    xs = _honest(5)
    big = xs[:4] + [xs[4] * 8]  # not an outlier (under 16x), but 8x: clipped to 2x the median RMS
    mean, refused = Aggregation("clip").combine(big, [1.0] * 5)
    assert refused == []
    reference = sorted(rms(x) for x in big)[2]
    clipped = big[4] * (2 * reference / rms(big[4]))
    expected = torch.zeros_like(xs[0])
    for x in big[:4] + [clipped]:
        expected += x * 0.2
    assert torch.allclose(mean, expected, atol=1e-6)
    assert torch.equal(Aggregation("clip").combine(xs, [1.0] * 5)[0], Aggregation().combine(xs, [1.0] * 5)[0])


def test_trimmed_drops_the_extremes_of_every_coordinate_and_three_members_give_the_median_winsorized_clamps():
    assert [trimmed_count(n) for n in (1, 2, 3, 4, 5, 6, 10, 11)] == [0, 0, 1, 1, 1, 2, 2, 3]
    xs = _honest(5)
    flipped = xs[:4] + [-xs[4] * 3]  # sign-flipped and tripled: at one end of most coordinates
    mean, refused = Aggregation("trimmed").combine(flipped, [1.0] * 5)
    honest_mean = sum(xs[:4]) / 4
    plain, _ = Aggregation().combine(flipped, [1.0] * 5)
    assert refused == []
    assert rms(mean - honest_mean) < 0.5 * rms(plain - honest_mean)
    three = [torch.tensor([1.0, 5.0, -2.0]), torch.tensor([2.0, 0.0, 9.0]), torch.tensor([3.0, 1.0, 0.0])]
    median, _ = Aggregation("trimmed").combine(three, [1.0, 7.0, 3.0])
    assert torch.equal(median, torch.tensor([2.0, 1.0, 0.0]))
    # winsorized: the ends clamped to the nearest kept value, every weight still counts
    clamped, _ = Aggregation("winsorized").combine(three, [1.0, 1.0, 2.0])
    assert torch.allclose(clamped, torch.tensor([(2 + 2 + 2 * 2) / 4, (1 + 1 + 2 * 1) / 4, (0 + 0 + 2 * 0) / 4]))
    winsorized, _ = Aggregation("winsorized").combine(flipped, [1.0] * 5)
    assert rms(winsorized - honest_mean) < rms(plain - honest_mean)
    # centered clip: a far-off contribution pulls no harder than a typical one
    centered, _ = Aggregation("centered").combine(flipped, [1.0] * 5)
    assert rms(centered - honest_mean) < 0.5 * rms(plain - honest_mean)
    same = [torch.full((8,), 2.0)] * 4
    assert torch.equal(Aggregation("centered").combine(same, [1.0] * 4)[0], torch.full((8,), 2.0))


def test_combining_is_deterministic():
    xs = _honest(6, seed=3)
    ws = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    for rule in AGGREGATIONS:
        a, _ = Aggregation(rule).combine(xs, ws)
        b, _ = Aggregation(rule).combine([x.clone() for x in xs], list(ws))
        assert torch.equal(a, b), rule


def test_weights_are_capped_at_four_times_the_median():
    assert cap_weights([100.0, 120.0, 90.0, 1e9]) == [100.0, 120.0, 90.0, 400.0]
    assert cap_weights([1.0, 1e9]) == [1.0, 4.0]
    assert cap_weights([5.0]) == [5.0] and cap_weights([]) == []
    assert cap_weights([1.0, 1e9], math.inf) == [1.0, 1e9]


def test_the_run_config_names_its_aggregation():
    assert DiLoCoConfig().aggregation == "mean"
    assert DiLoCoConfig(aggregation="trimmed").to_dict()["aggregation"] == "trimmed"
    with pytest.raises(ConfigError, match="aggregation='median'.*mean, clip, trimmed, winsorized, centered"):
        DiLoCoConfig(aggregation="median")


def test_attack_specs():
    assert parse("scale:1000") == Attack("scale", 1000.0) and parse("flip") == Attack("flip")
    assert parse("weight:1e9") == Attack("weight", 1e9) and parse("") is None
    for bad, why in [("zero", "unknown attack 'zero'"), ("scale", "needs a number"), ("flip:2", "no value"),
                     ("scale:inf", "finite number > 0"), ("weight:-1", "finite number > 0")]:
        with pytest.raises(AttackError, match=why):
            parse(bad)
    x = torch.ones(3)
    assert torch.equal(Attack("flip").poison(x, 2.0)[0], -x) and Attack("weight", 9.0).poison(x, 2.0)[1] == 9.0


def _averaged(xs: list[torch.Tensor], attack: str, aggregation: Aggregation) -> torch.Tensor:
    """The mean a LocalGroup of len(xs) members gives, its last member poisoning with `attack`."""
    group = LocalGroup(len(xs), get_codec("fp32"), aggregation=aggregation)
    key = RoundKey("r", 0, 1)
    sent = [(x, 1.0) for x in xs[:-1]] + [parse(attack).poison(xs[-1], 1.0)]
    pending = [group.member(i).begin(key, x, w) for i, (x, w) in enumerate(sent)]
    return pending[0].result().mean


def test_one_member_of_five_scaling_by_1000_owns_a_bare_mean_and_is_left_out_of_a_protected_one():
    xs = _honest(5, numel=8192, seed=1)
    protected, bare = _averaged(xs, "scale:1000", Aggregation()), _averaged(xs, "scale:1000", Aggregation.unprotected())
    assert torch.allclose(protected, sum(xs[:4]) / 4, atol=1e-6)
    assert rms(bare) > 100 * rms(protected)


def test_one_member_of_five_claiming_1e9_tokens_owns_a_bare_mean_and_counts_4x_in_a_protected_one():
    xs = _honest(5, numel=8192, seed=2)
    protected, bare = _averaged(xs, "weight:1e9", Aggregation()), _averaged(xs, "weight:1e9", Aggregation.unprotected())
    assert torch.allclose(protected, (sum(xs[:4]) + 4 * xs[4]) / 8, atol=1e-6)
    assert torch.allclose(bare, xs[4], atol=1e-6)
