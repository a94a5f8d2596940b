"""Is this peer's averaging of any use? Rounds that keep failing while others train, said where nobody misses it.

A peer whose every round fails still trains, and its inner steps look fine: without
this, a run that cannot average (nobody can connect to it, or it to nobody) ends
"in consensus" on the run's seed. `RoundHealth` watches the rounds this peer did
not average with the swarm while other peers were live: after `STREAK_PERIODS`
rounds of every fragment in a row it says so once, with the likely cause (the
peer keeps retrying: a later averaged round resets it); at the end it gives the
verdict that makes `join` exit non-zero when this peer averaged no round at all
while others trained.
"""

from __future__ import annotations

import logging

from ..core.round_stats import RoundStats
from .reachability import Reachability

log = logging.getLogger(__name__)

STREAK_PERIODS = 2  # every fragment's round failed this many times in a row: say so


class RoundHealth:
    def __init__(self, fragments: int, reachability: Reachability | None = None, client_mode: bool = False):
        self.threshold = STREAK_PERIODS * fragments
        self.reachability, self.client_mode = reachability, client_mode
        self.live_others = 0  # other peers training now (from their progress records)
        self.reachable_others = 0  # ...of which accept connections (not in client mode)
        self.others_averaged = 0  # the most rounds any other live peer has applied
        self.failed_with_others = 0  # rounds this peer did not average while others were live
        self._seen_failures = 0
        self._warned_streak = False

    def observe_swarm(self, live_others: int, reachable_others: int, others_averaged: int) -> None:
        self.live_others, self.reachable_others = live_others, reachable_others
        self.others_averaged = max(self.others_averaged, others_averaged)

    def check(self, stats: RoundStats) -> str | None:
        """Called as training goes on; returns (and logs) the error line the first time a streak is long enough."""
        failures = sum(stats.failed) + sum(stats.recovered)
        if self.live_others:
            self.failed_with_others += failures - self._seen_failures
        self._seen_failures = failures
        if stats.failing_streak < self.threshold:
            self._warned_streak = False
            return None
        if self._warned_streak or not self.live_others:
            return None
        self._warned_streak = True
        line = (f"the last {stats.failing_streak} rounds (every fragment, {STREAK_PERIODS}x) failed on this peer "
                f"while {self.live_others} other peer(s) train: {self.cause(stats)}; still retrying")
        log.error(line)
        return line

    def cause(self, stats: RoundStats) -> str:
        reach = self.reachability
        if self.client_mode and self.live_others and not self.reachable_others:
            return ("this peer and every other live peer are in client mode, and a group needs at least one peer "
                    "that accepts connections: run one trainer (or more) where other machines can reach it "
                    "(an open TCP port, or a forwarded one named with --announce-maddrs)")
        if reach is not None and reach.reachable is False:
            return (f"other machines cannot connect to this peer ({reach.describe()}) and it could not average "
                    f"in client mode either: can it open connections to the others? "
                    f"(last failure: {stats.last_error})")
        if "could not find a group" in stats.last_error:
            return ("no group formed with the other peers: they cannot open connections to this peer, or it to them "
                    "(check that the addresses it announces, see --announce-maddrs, are reachable from the others and "
                    "that their TCP ports are open; behind NAT use --client-mode)")
        return f"last failure: {stats.last_error or 'unknown'}"

    def verdict(self, stats: RoundStats) -> str | None:
        """At the end: the one-line reason this peer was useless to the run, or None."""
        self.check(stats)
        if stats.averaged > 0 or not (self.failed_with_others or self.others_averaged):
            return None
        downloaded = sum(stats.recovered)
        return (f"this peer averaged no round with the swarm ({sum(stats.failed)} failed"
                + (f", {downloaded} only downloaded from the others" if downloaded else "")
                + f") while other peers trained: {self.cause(stats)}")
