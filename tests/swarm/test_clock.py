"""The swarm clock: peers of different speeds share one global step (virtual time, no processes)."""

from __future__ import annotations

import pytest

from p2p_diloco.swarm.clock import ClockReading, SwarmClock


def simulate(speeds: list[float], seconds: float, publish_every: float = 1.0, starts: list[float] | None = None):
    """Peers stepping at `speeds` (steps/s); each publishes and observes every `publish_every` s."""
    starts = starts or [0.0] * len(speeds)
    clocks = [SwarmClock() for _ in speeds]
    readings: dict[int, ClockReading] = {}
    steps = [0] * len(speeds)
    history = [[] for _ in speeds]  # (time, global step) after every step
    spreads = []  # how far apart the peers' global steps are, sampled at every reading
    next_step = [s + 1.0 / v for s, v in zip(starts, speeds)]
    next_sync = [s for s in starts]
    for i, s in enumerate(starts):
        clocks[i].start(s)
    while True:
        t, kind, i = min([(next_step[i], 1, i) for i in range(len(speeds))] +
                         [(next_sync[i], 0, i) for i in range(len(speeds))])
        if t > seconds:
            break
        if kind == 0:
            others = [r for j, r in readings.items() if j != i]
            clocks[i].observe(others, t, joining=steps[i] == 0)
            readings[i] = clocks[i].reading(t)
            next_sync[i] += publish_every
            if t >= max(starts) + 3:
                spreads.append(max(c.global_step(t) for c in clocks) - min(c.global_step(t) for c in clocks))
        else:
            history[i].append((t, clocks[i].step_done(t)))
            steps[i] += 1
            next_step[i] += 1.0 / speeds[i]
    return clocks, steps, history, max(spreads, default=0.0)


def test_a_peer_alone_counts_its_own_steps():
    clocks, steps, history, _ = simulate([5.0], 30.0)
    assert clocks[0].global_step(30.0) == steps[0] == 150
    assert [g for _, g in history[0]] == list(range(1, 151))


def test_equal_peers_follow_their_own_step_count():
    clocks, steps, _, _ = simulate([10.0, 10.0, 10.0], 60.0)
    for c, s in zip(clocks, steps):
        assert abs(c.global_step(60.0) - s) <= 2.0


def test_peers_of_different_speeds_share_one_global_step():
    speeds = [10.0, 5.0, 2.5]
    clocks, steps, history, spread = simulate(speeds, 60.0)
    # the global step advances at the swarm's median speed on every peer...
    for c in clocks:
        assert c.global_step(60.0) == pytest.approx(5.0 * 60, rel=0.05)
    # ...while each peer trains at its own speed: nobody waits for the slow one
    assert [round(s, -1) for s in steps] == [600, 300, 150]
    # at any moment the peers read the same global step within a couple of steps
    assert spread <= 2.5
    # and it never goes back, so no round is started twice
    for h in history:
        gs = [g for _, g in h]
        assert gs == sorted(gs)


def test_a_late_joiner_takes_the_swarm_step():
    clocks, steps, history, _ = simulate([10.0, 10.0, 10.0], 40.0, starts=[0.0, 0.0, 20.0])
    first_after_join = history[2][0][1]
    assert first_after_join == pytest.approx(200, abs=12)
    assert abs(clocks[2].global_step(40.0) - clocks[0].global_step(40.0)) <= 2


def test_a_peer_ahead_slows_down_until_the_swarm_catches_up():
    clock = SwarmClock(global_step=100.0)
    clock.start(0.0)
    for t in range(1, 11):
        clock.step_done(t * 0.1)
    assert clock.global_step(1.0) == pytest.approx(110.0)
    clock.observe([ClockReading(105.0, 10.0, 1.0)], 1.0)  # median 107.5: we lead by 2.5 steps
    assert clock.global_step(2.0) == pytest.approx(110.0 + 10.0 * (1 - 2.5 / 20))
    clock.observe([ClockReading(70.0, 10.0, 2.0)], 2.0)  # far ahead (median 94): the global step waits
    assert clock.global_step(3.0) == pytest.approx(118.75)
    assert clock.global_step(2.0) == pytest.approx(118.75)  # never back


def test_a_blocked_peer_finds_the_swarm_moved_on():
    clock = SwarmClock()
    clock.start(0.0)
    for t in range(1, 11):
        clock.step_done(t * 0.1)
    clock.observe([ClockReading(10.0, 10.0, 1.0)], 1.0)
    assert clock.step_done(4.0) == 40  # three seconds inside one step (a slow step, not a round): the clock went on


def test_a_peer_held_up_by_a_round_waits_and_the_others_move_it_on():
    clock = SwarmClock()
    clock.start(0.0)
    for t in range(1, 11):
        clock.step_done(t * 0.1)
    clock.observe([ClockReading(10.0, 10.0, 1.0)], 1.0)
    clock.hold(1.0)  # a round's result late: training held up for 20 s
    assert clock.global_step(11.0) == clock.global_step(21.0) == 10  # the global step waits
    clock.release(21.0)
    assert clock.step_done(21.1) == 11  # and goes on from there at its pace
    # the other peer trained on meanwhile: its reading moves this one on (half way with two voices)
    assert clock.observe([ClockReading(210.0, 10.0, 21.1)], 21.1) == 110


def test_a_swarm_held_up_alike_loses_no_steps():
    a, b = SwarmClock(), SwarmClock()
    for c in (a, b):
        c.start(0.0)
        for t in range(1, 11):
            c.step_done(t * 0.1)
    a.observe([b.reading(1.0)], 1.0)
    b.observe([a.reading(1.0)], 1.0)
    for c in (a, b):  # one round holds both up for a round timeout (a member crashed mid-round)
        c.hold(1.0)
    readings = [a.reading(21.0), b.reading(21.0)]
    for c in (a, b):
        c.release(21.0)
    assert a.observe([readings[1]], 21.0) == 10 and b.observe([readings[0]], 21.0) == 10
    assert a.step_done(21.1) == b.step_done(21.1) == 10  # (the pace follows the speed they had: it fell)


def test_a_held_up_peer_counts_the_wait_so_the_schedule_slows_down_with_the_swarm():
    clock = SwarmClock()
    clock.start(0.0)
    for t in range(1, 11):
        clock.step_done(t * 0.1)  # 10 steps/s
    assert clock.speed(1.0) == pytest.approx(10.0)
    assert clock.speed(1.05) == pytest.approx(10.0)  # (within a usual step's time: no wait)
    held = clock.speed(5.0)  # held up 4 s (a round's result late), less the step it would have taken anyway
    assert held == pytest.approx(10 / 4.9)
    # the other peer held up alike: the swarm's pace is what they both really do, not what they did before
    clock.observe([ClockReading(10.0, held, 5.0)], 5.0)
    assert clock.swarm_rate == pytest.approx(held)


def test_stale_and_malformed_readings_are_ignored():
    clock = SwarmClock()
    clock.start(0.0)
    clock.step_done(0.5)
    g = clock.observe([ClockReading(500.0, 10.0, 0.0), ClockReading(float("nan"), 1.0, 99.0),
                       ClockReading(700.0, float("inf"), 99.0)], now=100.0)
    assert g == 1 and clock.swarm_rate is None
    with pytest.raises(ValueError):
        SwarmClock(global_step=-1.0)
