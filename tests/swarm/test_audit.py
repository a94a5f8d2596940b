"""Audited rounds (`swarm.audit`) on real averager processes: a reducer built on our code that returns a wrong mean
(`P2P_DILOCO_ATTACK=lie`) is caught by the members that recompute its part, the round is applied by no member,
and the members that caught it ban it from their next groups; honest rounds pass their audits."""

from __future__ import annotations

import os

import torch

from p2p_diloco.core.averaging import AveragingFailed, RoundKey
from p2p_diloco.node.attacks import ENV as ATTACK
from p2p_diloco.swarm.averager import SwarmAverager


def _averager(dht, lying: bool = False) -> SwarmAverager:
    """A peer's averager with audits on every part; `lying`: its averager process is the attacker."""
    previous = os.environ.get(ATTACK)
    os.environ[ATTACK] = "lie" if lying else ""  # read in the averager's process, forked now
    try:
        return SwarmAverager(dht, "run1", [4000], "fp4", round_timeout=20, target_group_size=3,
                             min_matchmaking_time=2, search_timeout=10, audit=1.0)
    finally:
        if previous is None:
            del os.environ[ATTACK]
        else:
            os.environ[ATTACK] = previous


def _round(avs, key: RoundKey, xs):
    pending = [av.begin(key, x, 1.0) for av, x in zip(avs, xs)]
    outcomes = []
    for p in pending:
        try:
            outcomes.append(p.result())
        except AveragingFailed as e:
            outcomes.append(e)
    return outcomes


def test_honest_rounds_pass_their_audits(dhts):
    avs = [_averager(d) for d in dhts(3)]
    try:
        xs = [torch.randn(4000) for _ in avs]
        outcomes = _round(avs, RoundKey("run1", 0, 1), xs)
        assert all(not isinstance(o, Exception) for o in outcomes), outcomes
        assert all(torch.equal(o.mean, outcomes[0].mean) for o in outcomes)
        assert all(av.audited_parts == 2 and av.audit_bytes > 0 and not av.incidents for av in avs)
    finally:
        for av in avs:
            av.shutdown()


def test_a_lying_reducer_is_caught_applied_nowhere_and_banned(dhts):
    a, b, c = dhts(3)
    avs = [_averager(a), _averager(b), _averager(c, lying=True)]
    try:
        xs = [torch.randn(4000) for _ in avs]
        liar = avs[2].peer_id
        outcomes = _round(avs, RoundKey("run1", 0, 1), xs)
        assert all(isinstance(o, AveragingFailed) for o in outcomes), outcomes  # applied by no member
        for av, o in zip(avs[:2], outcomes):
            assert f"reducer {liar} returned a wrong mean" in str(o)
            assert av.banned == {liar} and av.incidents[0]["peer"] == liar and av.incidents[0]["round"] == 1
        assert "returned a wrong mean" in str(outcomes[2]) or "caught reducer" in str(outcomes[2])
        for av, x in zip(avs, xs):  # the tensors the round would have written: untouched
            with av.averagers[0].get_tensors() as t:
                assert torch.equal(t[0], x)
        # the next round: the honest two leave the liar out (a group of two), and it is not applied on the liar
        outcomes = _round(avs, RoundKey("run1", 0, 2), xs)
        assert isinstance(outcomes[2], AveragingFailed)
        assert [o.peers for o in outcomes[:2]] == [2, 2], outcomes
        assert torch.equal(outcomes[0].mean, outcomes[1].mean)
    finally:
        for av in avs:
            av.shutdown()
