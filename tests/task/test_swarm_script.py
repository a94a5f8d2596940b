"""The simulator's scripted swarm (`task/swarm_script.py`): speeds, missed rounds, partial groups, a peer away,
and the records catching up reads; end to end through `run_method` on the tiny model."""

import pytest
import torch

from p2p_diloco.core.averaging import RoundKey
from p2p_diloco.task.simulate import SimSettings, run_method
from p2p_diloco.task.swarm_script import AWAY_EVERY, AWAY_FIRST_ROUND, Board, ScriptedMember, SwarmScript


@pytest.mark.parametrize("speed", [1.0, 0.5, 0.1, 1 / 3, 0.7])
def test_a_worker_makes_floor_of_ticks_times_its_speed_inner_steps_spread_evenly(speed):
    script = SwarmScript(2, speeds=(1.0, speed))
    steps = [t for t in range(1, 301) if script.trains(1, t)]
    assert len(steps) == int(300 * speed + 1e-9)
    assert all(script.trains(0, t) for t in range(1, 301))
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spread, not in bursts


def test_groups_fails_and_absences_depend_on_the_seed_and_round_alone():
    a, b = SwarmScript(5, group=3, fail=0.2, seed=7), SwarmScript(5, group=3, fail=0.2, seed=7)
    keys = [RoundKey("x", k, r) for k in range(3) for r in range(200)]
    assert [[a.absent(key, w) for w in range(5)] for key in keys] == [[b.absent(key, w) for w in range(5)]
                                                                      for key in keys]
    grouped = SwarmScript(5, group=3)
    assert all(sum(not grouped.absent(key, w) for w in range(5)) == 3 for key in keys)
    assert len({tuple(grouped.absent(key, w) for w in range(5)) for key in keys}) > 3  # drawn, not fixed
    failing = SwarmScript(5, fail=0.2)
    share = sum(failing.absent(key, w) for key in keys for w in range(5)) / (5 * len(keys))
    assert 0.15 < share < 0.25
    assert SwarmScript(5, fail=0.2, seed=1).absent != SwarmScript(5, fail=0.2, seed=2).absent


def test_the_away_worker_misses_its_rounds_in_a_row_and_cannot_fetch_their_states():
    script, board = SwarmScript(4, away=2), Board()
    missed = [r for r in range(40) if script.absent(RoundKey("x", 1, r), 3)]
    assert missed == [AWAY_FIRST_ROUND + e * AWAY_EVERY + i for e in range(4) for i in range(2)]
    assert not any(script.absent(RoundKey("x", 1, r), w) for r in range(40) for w in range(3))
    away, there = ScriptedMember(None, 3, script, board), ScriptedMember(None, 2, script, board)
    for r in (AWAY_FIRST_ROUND, AWAY_FIRST_ROUND + 2):
        there.applied(RoundKey("x", 1, r), torch.ones(2), torch.zeros(2), f"d{r}")
    assert away.recover(RoundKey("x", 1, AWAY_FIRST_ROUND), f"d{AWAY_FIRST_ROUND}") is None
    assert away.recover(RoundKey("x", 1, AWAY_FIRST_ROUND + 2), f"d{AWAY_FIRST_ROUND + 2}") is not None


@pytest.mark.parametrize("bad,why", [
    (dict(speeds=(1.0, 0.0)), "(0, 1]"), (dict(speeds=(1.0, 2.0)), "(0, 1]"), (dict(speeds=(1.0,)), "1 speeds"),
    (dict(fail=1.0), "[0, 1)"), (dict(group=0), "[1, 2]"), (dict(group=3), "[1, 2]"), (dict(away=AWAY_EVERY), "away"),
])
def test_a_bad_script_is_refused_naming_the_value(bad, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SwarmScript(2, **bad)


def test_the_board_reports_the_others_latest_round_at_or_below_upto_as_the_swarm_reads_its_records():
    board = Board()
    anchor, momentum = torch.ones(3), torch.zeros(3)
    for worker, round_, digest in [(0, 4, "a"), (1, 4, "a"), (2, 4, "b"), (3, 3, "c"), (0, 5, "d")]:
        board.publish(worker, RoundKey("x", 0, round_), anchor * round_, momentum, digest)
    report = board.report(3, 0, 10)
    assert (report.round, report.digests, report.voters) == (5, {"d": 1}, 3)
    report = board.report(3, 0, 4)
    assert (report.round, report.digests) == (4, {"a": 1, "b": 1})  # worker 0 moved on: one holder of "a" left
    assert board.report(0, 0, 2) is None and board.report(0, 1, 10) is None
    assert torch.equal(board.state(RoundKey("x", 0, 4), "b").anchor, anchor * 4)
    assert board.state(RoundKey("x", 0, 4), "zzz") is None


def scripted(**script) -> dict:
    settings = SimSettings(workers=4, steps=120, batch_size=2, model="tiny", eval_every=120, eval_batches=1,
                           final_eval_batches=2, base=dict(outer_period=12, fragments=2, warmup_steps=5), **script)
    return run_method("streaming_diloco", settings)


def test_workers_of_different_speeds_follow_the_swarm_clock_and_end_in_consensus():
    r = scripted(speeds=[1.0, 1.0, 0.5, 0.25])
    assert r["inner_steps"] == [120, 120, 60, 30] and r["tokens"] == 330 * 2 * 32
    assert r["consensus"] is True and r["rounds_failed_per_worker"] == [0, 0, 0, 0]
    assert len(set(r["rounds_applied_per_worker"])) == 1  # every round of every fragment on every worker


def test_missed_rounds_and_partial_groups_are_caught_up_and_end_in_consensus():
    r = scripted(fail=0.3, group=3)
    assert r["consensus"] is True and min(r["rounds_recovered_per_worker"]) > 0  # the missed ones adopted


@pytest.mark.parametrize("rule", ["average", "sit_out"])
def test_a_worker_away_comes_back_by_the_stale_anchor_rule_and_ends_in_consensus(rule):
    r = scripted(away=2, stale_anchor=rule)
    assert r["consensus"] is True
    failed, recovered = r["rounds_failed_per_worker"], r["rounds_recovered_per_worker"]
    assert failed[:3] == [0, 0, 0] and recovered[:3] == [0, 0, 0]
    # 3 fragments x rounds 5 and 6 away; back at round 7 it cannot fetch round 6's state: it sits 7 out and
    # adopts 7's state at round 8, or averages 7 with its own stale anchor (then re-downloads: not a recovery)
    assert failed[3] == 3 * 2 + (3 if rule == "sit_out" else 0)
    assert recovered[3] == (3 if rule == "sit_out" else 0)


def test_a_slow_worker_s_lr_follows_the_swarm_clock_and_lr_by_speed_divides_it_by_its_speed(monkeypatch):
    from p2p_diloco.core.inner import InnerTrainer
    from p2p_diloco.task import simulate

    calls: list[tuple[int, int, float]] = []  # (trainer, schedule step, lr scale)
    step = InnerTrainer.step

    def spy(self, tokens, schedule_step=None, lr_scale=1.0):
        calls.append((id(self), schedule_step, lr_scale))
        return step(self, tokens, schedule_step, lr_scale)

    monkeypatch.setattr(simulate.InnerTrainer, "step", spy)
    scripted(speeds=[1.0, 1.0, 0.5, 0.25], lr_by_speed=True)
    trainers = list(dict.fromkeys(c[0] for c in calls))
    slowest = [(s, scale) for t, s, scale in calls if t == trainers[3]]
    assert [s for s, _ in slowest] == [t - 1 for t in range(4, 121, 4)]  # ticks 4, 8, ...: global steps 3, 7, ...
    assert {scale for _, scale in slowest} == {4.0}
    assert {scale for t, _, scale in calls if t == trainers[0]} == {1.0}


@pytest.mark.parametrize("rule", [dict(correction="heloco"), dict(lr_by_speed=True)])
def test_the_rules_for_unequal_peers_change_the_run_and_keep_consensus(rule):
    base = scripted(speeds=[1.0, 1.0, 0.5, 0.25])
    r = scripted(speeds=[1.0, 1.0, 0.5, 0.25], **rule)
    assert r["consensus"] is True and r["rounds_failed_per_worker"] == [0, 0, 0, 0]
    assert r["eval_loss"] != base["eval_loss"]


def test_an_age_decay_weighs_a_stale_part_less_and_keeps_consensus():
    base = scripted(away=2)
    r = scripted(away=2, age_decay=0.5)
    assert r["consensus"] is True and r["rounds_failed_per_worker"] == base["rounds_failed_per_worker"]
    assert r["eval_loss"] != base["eval_loss"]
