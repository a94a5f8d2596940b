"""The swarm's global step: one schedule for peers of different speeds.

Streaming DiLoCo schedules fragment rounds by step (`(t - o_k) % H == 0`). If
every peer counted its own inner steps, a GPU would reach a round long before a
laptop and wait for it (or leave it behind for good). Instead every peer keeps a
*global step* that advances at the swarm's typical speed, like hivemind's
optimizer counts the swarm's samples towards its target batch size:

* each peer measures its speed (inner steps per second over the last few
  seconds, time spent waiting for rounds included, up to the moment it is read:
  if rounds slow the swarm down, the schedule slows down with it; a peer held up
  by a round publishes a falling speed while it waits) and publishes (global
  step, speed, time) in the DHT every second;
* alone, a peer's global step is its own count of inner steps. With others, it
  runs on the wall clock at the median speed of the live peers:
  g(t) = g0 + speed * (t - t0). Every peer reaches a round boundary at about the
  same moment; a peer faster than the median trains more inner steps in between
  (its outer gradient weighs more tokens), a slower one fewer. Nobody waits for
  the slowest, and one very fast or very slow peer does not drag the schedule;
* readings keep the peers aligned: at each reading a peer behind the median of
  the extrapolated readings (`g_j + speed * (now - t_j)`) jumps forward to it; a
  peer ahead of it slows down in proportion to its lead and stops when it leads
  by CATCH_UP_S seconds of progress (it goes on training; only its global step
  waits). The global step never goes back, so a round is never started twice.
* while averaging holds a peer's training up (a round's result late), its global
  step waits: the others' readings move it on afterwards if the swarm went on
  without it, and a swarm held up all alike by one round loses no steps. (Before,
  each peer's global step ran on through the hold at the pace it had: after a round
  timeout held up by a crashed member, survivors would jump most of a short run
  ahead and train next to nothing; the likeliest cause of one CI failure, eval loss
  5.48 against 2.5, not reproduced.)

With peers of equal speed the global step follows each peer's own step count,
so a local swarm follows the simulator's schedule. Readings older than
`stale_after` seconds (a stalled or departed peer) are ignored. Peers on
different machines extrapolate with their wall clocks, so clock offsets between
machines shift rounds by offset * speed steps (NTP keeps that far below one step).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


CATCH_UP_S = 2.0


@dataclass(frozen=True)
class ClockReading:
    """What one peer published: its global step and inner-step speed at `time` (seconds since the epoch)."""

    global_step: float
    steps_per_s: float
    time: float


class SwarmClock:
    def __init__(self, global_step: float = 0.0, stale_after: float = 10.0, window: float = 10.0):
        if not math.isfinite(global_step) or global_step < 0:
            raise ValueError(f"global step {global_step!r} must be a finite number >= 0")
        self.stale_after = stale_after
        self.window = window
        self.swarm_rate: float | None = None  # the swarm's median inner steps per second; None: alone
        self._base, self._base_time, self._pace = float(global_step), 0.0, 0.0
        self._steps: deque[float] = deque()  # times of this peer's recent inner steps
        self._last = float(global_step)
        self._held_since: float | None = None  # averaging holds training up since then (`hold`)

    def speed(self, now: float) -> float:
        """This peer's inner steps per second over about the last `window` seconds up to `now`. The time since
        its last step beyond a usual step's counts: a peer held up by a round is that much slower. (Counted only
        up to the last step, peers all held up by rounds that took longer than the schedule allowed published
        the speed they had before; the clock ran away from what they trained and they sat most rounds out.)"""
        if len(self._steps) < 2:
            return 0.0
        steps, span = len(self._steps) - 1, self._steps[-1] - self._steps[0]
        waited = max(now - self._steps[-1] - span / steps, 0.0)  # beyond one step's usual time: held up
        return steps / max(span + waited, 1e-6)

    def global_step(self, now: float) -> float:
        if self.swarm_rate is None:
            g = self._base
        else:
            if self._held_since is not None:
                now = min(now, self._held_since)
            g = self._base + self._pace * max(now - self._base_time, 0.0)
        self._last = max(self._last, g)
        return self._last

    def hold(self, now: float) -> None:
        """Averaging holds this peer's training up from `now` until `release`: the global step waits."""
        if self._held_since is None:
            self._held_since = now

    def release(self, now: float) -> None:
        """The hold is over: the global step goes on from where it waited."""
        if self._held_since is not None:
            self._base_time += max(now - max(self._held_since, self._base_time), 0.0)
            self._held_since = None

    def start(self, now: float) -> None:
        """Training starts: the first inner step's time counts from here."""
        self._steps.clear()
        self._steps.append(now)

    def step_done(self, now: float) -> int:
        """One inner step ended at `now`; returns the global step reached."""
        self._steps.append(now)
        while len(self._steps) > 2 and self._steps[0] < now - self.window:
            self._steps.popleft()
        if self.swarm_rate is None:
            self._base += 1.0
        return int(self.global_step(now))

    def observe(self, readings: list[ClockReading], now: float, joining: bool = False) -> int:
        """Align with the other peers' readings (never this peer's own); returns the global step.

        `joining`: this peer has no step of its own yet and takes the swarm's.
        """
        live = [r for r in readings if now - r.time <= self.stale_after and math.isfinite(r.global_step)
                and math.isfinite(r.steps_per_s) and r.steps_per_s >= 0 and r.global_step >= 0]
        current = self.global_step(now)
        rates = [r.steps_per_s for r in live if r.steps_per_s > 0]
        if (own := self.speed(now)) > 0:
            rates.append(own)
        if not live or not rates:  # alone (or nobody has a speed yet): count own steps
            self.swarm_rate = None
            self._base = current
            return int(current)
        rate = statistics.median(rates)
        estimates = [r.global_step + rate * max(now - r.time, 0.0) for r in live]
        if not joining:
            estimates.append(current)
        target = statistics.median(estimates)
        self.swarm_rate = rate
        self._base, self._base_time = max(target, current), now
        if self._held_since is not None:  # (observed while held: the wait counts from here)
            self._held_since = now
        lead = current - target  # ahead of the swarm: slow down, stop at CATCH_UP_S seconds ahead
        self._pace = rate * min(max(1.0 - lead / (rate * CATCH_UP_S), 0.0), 1.0)
        return int(self.global_step(now))

    def reading(self, now: float) -> ClockReading:
        return ClockReading(self.global_step(now), self.speed(now), now)
