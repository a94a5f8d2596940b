"""Impossible configurations are refused with a message naming the value and the reason."""

import pytest

from p2p_diloco.core.config import ConfigError, DiLoCoConfig
from p2p_diloco.core.fragments import split_fragments
from p2p_diloco.task.model import build_model, model_spec


@pytest.mark.parametrize("changes,field,reason", [
    (dict(tau=34, outer_period=100, fragments=2), "tau", "H/(P+1)"),
    (dict(tau=-1), "tau", "negative"),
    (dict(alpha=1.5), "alpha", "[0, 1]"),
    (dict(alpha=-0.1), "alpha", "[0, 1]"),
    (dict(outer_period=0), "outer_period", "at least 1"),
    (dict(outer_period=3, fragments=3, tau=0), "fragments", "distinct sync offsets"),
    (dict(fragments=-1), "fragments", "negative"),
    (dict(outer_lr=0.0), "outer_lr", "> 0"),
    (dict(outer_momentum=1.0), "outer_momentum", "[0, 1)"),
    (dict(inner_lr=float("nan")), "inner_lr", "finite"),
    (dict(inner_betas=(0.9, 1.2)), "inner_betas", "[0, 1)"),
    (dict(codec="fp3"), "codec", "unknown codec"),
    (dict(outer_period=10.5), "outer_period", "integer"),
    (dict(error_feedback="yes"), "error_feedback", "true or false"),
    (dict(overlap="late"), "overlap", "plain, keep, eager"),
    (dict(weighting="speed"), "weighting", "tokens, uniform, per_token"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio", "[0, 1]"),
    (dict(codec="auto", error_feedback=True), "error_feedback", "fixed codec"),
    (dict(error_feedback=True, ef_decay=0.0), "ef_decay", "(0, 1]"),
    (dict(error_feedback=True, ef_decay=1.5), "ef_decay", "(0, 1]"),
    (dict(error_feedback=True, ef_decay=float("nan")), "ef_decay", "finite"),
    (dict(ef_decay=0.9), "ef_decay", "set error_feedback"),
    (dict(sync_stride=0), "sync_stride", "[1, 64]"),
    (dict(sync_stride=65), "sync_stride", "[1, 64]"),
    (dict(sync_stride=2.0), "sync_stride", "integer"),
    (dict(inner_optimizer="sgd"), "inner_optimizer", "adamw, muon"),
    (dict(codec="top16"), "codec", "unknown codec"),
    (dict(max_delay=60), "max_delay", "tau..H - 1 = 1..59"),
    (dict(tau=2, max_delay=1), "max_delay", "tau..H - 1 = 2..59"),
    (dict(max_delay=2.5), "max_delay", "integer"),
    (dict(max_delay=True), "max_delay", "integer"),
])
def test_bad_values_are_refused_with_a_reason(changes, field, reason):
    with pytest.raises(ConfigError) as e:
        DiLoCoConfig(**changes)
    assert str(e.value).startswith(f"{field}=") and reason in str(e.value)


def test_tau_just_below_the_spacing_is_fine():
    assert DiLoCoConfig(outer_period=100, fragments=2, tau=32).tau == 32


def test_round_trip_through_a_dict_and_unknown_keys():
    c = DiLoCoConfig(outer_period=50, codec="int8", inner_betas=(0.8, 0.9))
    assert DiLoCoConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown config key.*outer_peroid"):
        DiLoCoConfig.from_dict({**c.to_dict(), "outer_peroid": 3})
    with pytest.raises(ConfigError, match="mapping"):
        DiLoCoConfig.from_dict([1, 2])


def test_more_fragments_than_blocks_is_refused():
    model = build_model(model_spec("tiny"), 0)  # 2 blocks
    with pytest.raises(ConfigError, match="fragments=3: the model has only 2"):
        split_fragments(model, 3)
