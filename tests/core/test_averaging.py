"""The in-process butterfly averager: the exact mean, identical results, honest byte counts, failures."""

import pytest
import torch

from p2p_diloco.core.averaging import AveragingFailed, RoundKey
from p2p_diloco.core.codecs import get_codec
from p2p_diloco.core.local_group import LocalGroup
from p2p_diloco.core.parts import butterfly_parts


def test_parts_cover_the_vector_on_block_boundaries():
    for numel in (1, 127, 128, 1000, 4096 + 5):
        for members in (1, 2, 3, 4, 7):
            parts = butterfly_parts(numel, members, 128)
            assert parts[0][0] == 0 and parts[-1][1] == numel and len(parts) == members
            for (a, b), (c, _) in zip(parts, parts[1:]):
                assert b == c and (b % 128 == 0 or b == numel)


def test_fp32_mean_is_the_weighted_mean_and_bytes_are_a_butterfly():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1000, generator=g) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    group = LocalGroup(3, get_codec("fp32"))
    key = RoundKey("r", 0, 0)
    pend = [group.member(i).begin(key, xs[i], weights[i]) for i in range(3)]
    results = [p.result() for p in pend]
    expected = torch.zeros(1000)
    for x, w in zip(xs, weights):
        expected += x * (w / 8.0)
    for r in results:
        assert torch.equal(r.mean, expected) and r.peers == 3 and r.weight == 8.0
    codec = get_codec("fp32")
    parts = butterfly_parts(1000, 3, codec.block_size)
    for i in range(3):
        own = parts[i][1] - parts[i][0]
        others = sum(codec.wire_size(b - a) for j, (a, b) in enumerate(parts) if j != i)
        assert group.bytes_sent[i] == others + 2 * codec.wire_size(own)
    assert sum(group.bytes_sent) == sum(group.bytes_received)


def test_fp4_members_get_bit_identical_means_close_to_the_true_mean():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5000, generator=g) * 0.01 for _ in range(4)]
    group = LocalGroup(4, get_codec("fp4"))
    key = RoundKey("r", 1, 3)
    pend = [group.member(i).begin(key, xs[i], 1.0) for i in range(4)]
    means = [p.result().mean for p in pend]
    assert all(torch.equal(means[0], m) for m in means[1:])
    true = sum(xs) / 4
    assert (means[0] - true).norm() / true.norm() < 0.5
    # the bytes on the wire are the quantized ones: ~32/4.25 fewer than fp32
    fp32 = LocalGroup(4, get_codec("fp32"))
    pend = [fp32.member(i).begin(key, xs[i], 1.0) for i in range(4)]
    pend[0].result()
    ratio = fp32.bytes_sent[0] / group.bytes_sent[0]
    assert 32 / get_codec("fp4").bits_per_value * 0.9 < ratio <= 32 / get_codec("fp4").bits_per_value


def test_absent_member_is_left_out_and_failed_round_fails_for_all():
    group = LocalGroup(3, get_codec("fp32"), fail=lambda k: k.round == 7, absent=lambda k, m: m == 2)
    xs = [torch.full((10,), float(i)) for i in range(3)]
    key = RoundKey("r", 0, 1)
    pend = [group.member(i).begin(key, xs[i], 1.0) for i in range(3)]
    assert torch.equal(pend[0].result().mean, torch.full((10,), 0.5))
    assert pend[1].result().peers == 2
    with pytest.raises(AveragingFailed, match="not part of the group"):
        pend[2].result()
    bad = RoundKey("r", 0, 7)
    pend = [group.member(i).begin(bad, xs[i], 1.0) for i in range(3)]
    for p in pend:
        with pytest.raises(AveragingFailed, match="injected"):
            p.result()


def test_a_split_round_averages_each_group_apart():
    # a round the swarm split (a replay's recorded groups): {0, 1} and {2, 3} average separately, each all its own
    group = LocalGroup(4, get_codec("fp32"), split=lambda k, m: 0 if k.round == 1 and m < 2 else m // 2 * 2)
    xs = [torch.full((10,), float(i)) for i in range(4)]
    key = RoundKey("r", 0, 1)
    pend = [group.member(i).begin(key, xs[i], 1.0) for i in range(4)]
    means = [p.result() for p in pend]
    assert [m.peers for m in means] == [2, 2, 2, 2]
    assert [float(m.mean[0]) for m in means] == [0.5, 0.5, 2.5, 2.5]


def test_mismatched_sizes_fail():
    group = LocalGroup(2, get_codec("fp32"))
    key = RoundKey("r", 0, 0)
    a = group.member(0).begin(key, torch.zeros(10), 1.0)
    group.member(1).begin(key, torch.zeros(11), 1.0)
    with pytest.raises(AveragingFailed, match="disagree"):
        a.result()
