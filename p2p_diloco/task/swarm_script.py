"""A swarm as it really runs, scripted for the simulator: peers of unequal speeds, missed rounds, groups smaller
than the swarm, a peer away for rounds on end, and the records and state servers that catching up reads.

`SwarmScript` (deterministic for a seed) says for every worker whether it makes an inner step at a tick of the
swarm's clock, whether it takes part in a round, and whether it can download a round's state. `Board` holds
what the swarm's DHT records and state servers hold: each worker's latest (round, state hash) per fragment and
the states themselves. `ScriptedMember` wraps a `LocalGroup` member with both, so the core's own catch-up
(`core/catch_up.py`: adopt the agreed state, sit a round out, average with a stale anchor) runs as in the swarm.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import torch

from ..core.averaging import (AgreedState, AveragingFailed, FragmentAverage, FragmentAverager, PendingAverage,
                              RoundKey, RoundReport)

AWAY_FIRST_ROUND = 5  # a worker `away` leaves for the first time at this round of every fragment
AWAY_EVERY = 10  # ... and again every this many rounds


@dataclass(frozen=True)
class SwarmScript:
    """What happens to whom, decided by (seed, fragment, round, worker) alone: two runs of a script agree."""

    workers: int
    speeds: tuple[float, ...] | None = None  # inner steps per tick of the swarm's clock, each in (0, 1]
    fail: float = 0.0  # chance that a worker misses a round (its part never arrives; it catches up after)
    group: int | None = None  # each round a group of this many workers, drawn; the others miss it
    away: int = 0  # the last worker misses this many rounds of every fragment in a row, every AWAY_EVERY rounds,
    #                and cannot download the states of the rounds it missed (its way back: core/catch_up.py)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("a swarm needs at least one worker")
        if self.speeds is not None:
            if len(self.speeds) != self.workers:
                raise ValueError(f"{len(self.speeds)} speeds for {self.workers} workers")
            if not all(isinstance(s, (int, float)) and 0.0 < s <= 1.0 for s in self.speeds):
                raise ValueError(f"speeds {list(self.speeds)}: each must lie in (0, 1] (inner steps per tick; the "
                                 "fastest worker makes one)")
        if not 0.0 <= self.fail < 1.0:
            raise ValueError(f"fail {self.fail}: a chance in [0, 1)")
        if self.group is not None and not 1 <= self.group <= self.workers:
            raise ValueError(f"group {self.group}: must lie in [1, {self.workers}]")
        if not 0 <= self.away < AWAY_EVERY:
            raise ValueError(f"away {self.away}: rounds in a row, in [0, {AWAY_EVERY - 1}]")

    @property
    def scripted(self) -> bool:
        """Anything to script at all (else the plain simulator's group is the same swarm)."""
        return self.speeds is not None or self.fail > 0 or self.group is not None or self.away > 0

    def trains(self, worker: int, tick: int) -> bool:
        """Whether `worker` makes an inner step at `tick` (1, 2, ...): at speed s, floor(tick s) of the first
        `tick` ticks."""
        s = 1.0 if self.speeds is None else self.speeds[worker]
        return math.floor(tick * s + 1e-9) > math.floor((tick - 1) * s + 1e-9)

    def steps(self, worker: int, tick: int) -> int:
        """Inner steps `worker` makes at `tick` (0 or 1 here; a replayed swarm's fast peer may make more)."""
        return int(self.trains(worker, tick))

    def ready_at(self, key: RoundKey, worker: int) -> int | None:
        """The tick at which `worker`'s mean of round `key` lands (None: at once; `simulate --delay` delays all)."""
        return None

    def away_from(self, key: RoundKey, worker: int) -> bool:
        r = key.round - AWAY_FIRST_ROUND
        return self.away > 0 and worker == self.workers - 1 and r >= 0 and r % AWAY_EVERY < self.away

    def absent(self, key: RoundKey, worker: int) -> bool:
        """Whether `worker`'s part of round `key` never reaches its group."""
        if self.away_from(key, worker):
            return True
        if self.group is not None and self.group < self.workers:
            rng = random.Random(f"{self.seed}/group/{key.fragment}/{key.round}")
            if worker not in rng.sample(range(self.workers), self.group):
                return True
        return self.fail > 0 and random.Random(f"{self.seed}/fail/{key.fragment}/{key.round}/{worker}").random() \
            < self.fail


class Board:
    """The swarm's records (each worker's latest round and state hash of each fragment) and its state servers."""

    def __init__(self) -> None:
        self.held: dict[int, dict[int, tuple[int, str]]] = {}  # fragment -> worker -> (round, digest)
        self.states: dict[tuple[int, int, str], AgreedState] = {}

    def publish(self, worker: int, key: RoundKey, anchor: torch.Tensor, momentum: torch.Tensor, digest: str) -> None:
        self.held.setdefault(key.fragment, {})[worker] = (key.round, digest)
        where = (key.fragment, key.round, digest)
        if where not in self.states:
            self.states[where] = AgreedState(anchor.detach().clone(), momentum.detach().clone())
        held = {(key.fragment, r, d) for r, d in self.held[key.fragment].values()}
        for stale in [s for s in self.states if s[0] == key.fragment and s not in held]:
            del self.states[stale]  # nobody serves a state it no longer holds

    def report(self, worker: int, fragment: int, upto: int) -> RoundReport | None:
        """What the others report, as the swarm's averager reads its records (`latest_agreed`)."""
        found = {w: rd for w, rd in self.held.get(fragment, {}).items() if w != worker}
        records = [(r, d) for r, d in found.values() if r <= upto]
        if not records:
            return None
        latest = max(r for r, _ in records)
        return RoundReport(latest, dict(Counter(d for r, d in records if r == latest)), voters=len(found))

    def state(self, key: RoundKey, digest: str | None) -> AgreedState | None:
        if digest is None:
            report = self.report(-1, key.fragment, key.round)
            if report is None or report.round != key.round:
                return None
            digest = report.majority()
        state = self.states.get((key.fragment, key.round, digest))
        return None if state is None else AgreedState(state.anchor.clone(), state.momentum.clone())


class LatePending(PendingAverage):
    """A round's mean that is not `done()` before the tick in `clock[0]` reaches `ready_at`: the core trains on
    meanwhile, as it does while a swarm's result is on its way."""

    def __init__(self, pending: PendingAverage, clock: list[int], ready_at: int):
        self.pending, self.clock, self.ready_at = pending, clock, ready_at

    def done(self) -> bool:
        return self.clock[0] >= self.ready_at

    def result(self) -> FragmentAverage:
        return self.pending.result()


class ScriptedMember(FragmentAverager):
    """Worker `index` of a scripted swarm: a `LocalGroup` member that misses the rounds the script says, whose
    means land when the script says (`ready_at`, on the ticks in `clock[0]`), publishes what it applies to the
    `Board`, and recovers states from it (except those the script keeps from it)."""

    def __init__(self, member: FragmentAverager, index: int, script: SwarmScript, board: Board,
                 clock: list[int] | None = None):
        self.member, self.index, self.script, self.board, self.clock = member, index, script, board, clock

    def begin(self, key: RoundKey, outer_grad: torch.Tensor, weight: float) -> PendingAverage:
        if self.script.absent(key, self.index):
            raise AveragingFailed(f"{key}: worker {self.index} missed the round (scripted)")
        pending = self.member.begin(key, outer_grad, weight)
        ready = self.script.ready_at(key, self.index)
        return pending if ready is None or self.clock is None else LatePending(pending, self.clock, ready)

    def applied(self, key: RoundKey, anchor: torch.Tensor, momentum: torch.Tensor, digest: str) -> None:
        self.board.publish(self.index, key, anchor, momentum, digest)

    def latest_agreed(self, fragment: int, upto: int) -> RoundReport | None:
        return self.board.report(self.index, fragment, upto)

    def recover(self, key: RoundKey, digest: str | None = None) -> AgreedState | None:
        if self.script.away_from(key, self.index):
            return None  # a state of a round it missed while away: nobody it can reach serves it
        return self.board.state(key, digest)
