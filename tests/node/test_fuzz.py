"""Every decoder of remote or on-disk bytes (`fuzz_targets`), fuzzed briefly with hypothesis: random bytes and
mutations of a valid input. Only the target's own error type may come out; each input runs within the deadline.
`python scripts/fuzz.py` runs the same targets for minutes (hypothesis or atheris, coverage-guided)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_targets import TARGETS, inputs, run_one


@pytest.mark.parametrize("target", TARGETS, ids=[t[0] for t in TARGETS])
def test_a_decoder_raises_only_its_own_error_on_any_bytes(target):
    @settings(max_examples=150, deadline=2000, suppress_health_check=list(HealthCheck), database=None)
    @given(data=inputs(target[0]))
    def check(data):
        run_one(target, data)

    check()
