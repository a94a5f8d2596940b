"""Catching up with the swarm: adopting the state the others agree on.

A worker's fragment can fall behind the swarm: it joined late, its round failed
while others applied it, it stalled, or it averaged against a stale anchor and
now disagrees with the majority. The others report, per fragment, the latest
round they hold and its state hashes (`FragmentAverager.latest_agreed`); this
mixin of `StreamingDiLoCo` adopts the majority's state (anchor, momentum),
downloaded and verified by the averager, and merges it like an applied round (with a
`sync_stride`: the values of the rounds it missed, fewer than S of them leaving the rest).

Guarantees: a state is adopted only whole (both tensors of the right size, all
finite, hashing to the agreed digest: the averager checks that); when none can
be fetched, nothing changes and the worker takes part with what it holds (the
next round tries again); nobody ever waits for a state, so a swarm can never
lock itself out of rounds.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from .averaging import AveragingFailed, RoundKey, RoundReport
from .round_subset import rounds_mask

log = logging.getLogger(__name__)

JOIN_ATTEMPTS = 5
JOIN_BACKING_POLL_S = 0.25  # a joiner re-reads the records this often while a newest round gains its second holder


CATCH_UP_WAIT_S = 1.0  # a round start waits this long for the swarm's state; then it sits the round out


@dataclass
class StateFetch:
    """A download of the swarm's state of one fragment, under way (`FragmentAverager.fetch`)."""

    key: RoundKey
    digest: str | None  # None: the majority's, whichever it is when the state is agreed
    resync: bool  # the same round as ours, another state (counted as resynced, not as an applied round)
    future: Future


class CatchUp:
    """The catch-up half of `StreamingDiLoCo` (its fields: anchors, momenta, base_round, digests, stats,
    fetching...)."""

    def _catch_up(self, k: int, round_: int, wait: float | None = CATCH_UP_WAIT_S) -> bool:
        """Before round `round_`: bring this fragment to the swarm's state.

        The others report the latest round they hold and its state hashes. A newer
        round than ours: adopt it. The same round with a different hash than the
        majority (a late joiner that missed a round in flight, a stale peer that
        averaged against an older anchor): re-download the majority's state.
        Returns False when this peer does not start `round_`: the swarm already holds
        it (its state was adopted), or the state is not in after `wait` seconds (None:
        as long as it takes). Over a slow link a fragment's state (8 bytes a parameter)
        takes longer than a round's payload: this peer then sits `round_` out, asks for
        the state the others will hold after it, trains on while it downloads, adopts it
        as soon as it is in (`take_fetched`) and joins the round after (a download that
        is still under way at that round is let finish, and adopted). When the state
        cannot be fetched this peer takes part with what it has (`stale_anchor` "average", the rule; "sit_out"
        sits the round out instead, for the simulator's comparison) and tries again next
        round: nobody ever waits long for a state, so a swarm can never lock itself out
        of rounds.
        """
        started_now = False
        for _ in range(2):  # a state that came in while the swarm moved on: then the newer one
            if k not in self.fetching:
                if not self._start_fetch(k, round_):
                    break
                started_now = True
            outcome = self._finish_fetch(k, wait if wait is None or started_now and self._alone(k) else 0.0)
            if outcome == "pending":
                self._sit_out(k, round_, "the swarm's state is still on its way")
                if started_now:  # it will be a round old when it comes: ask for the state after this round
                    self._start_fetch(k, round_, RoundKey(self.run_id, k, round_))
                # (a download asked for at an earlier round goes on: superseding it would waste what is in)
                return False
            if outcome == "failed":
                if self.stale_anchor == "sit_out":
                    self._sit_out(k, round_, "the swarm's state could not be fetched")
                    return False
                if self.reconciling:  # (no round left to average: the run ends on this peer's own state)
                    log.warning("fragment %d holds round %d, the swarm's state could not be fetched: the run ends "
                                "with this peer's own state of it", k, self.base_round[k])
                else:
                    log.warning("fragment %d holds round %d, the swarm's state could not be fetched: averaging "
                                "round %d with this peer's state", k, self.base_round[k], round_)
                break
        return self.base_round[k] < round_

    def _alone(self, k: int) -> bool:
        """No other fragment's download is under way (downloads queue up: a new one waits for them)."""
        return all(j == k or f.future.done() for j, f in self.fetching.items())

    def take_fetched(self) -> None:
        """Adopt every state whose download is done (called after every step; never waits)."""
        for k in [k for k, f in self.fetching.items() if f.future.done()]:
            self._finish_fetch(k, 0.0)

    def _start_fetch(self, k: int, round_: int, key: RoundKey | None = None, digest: str | None = None) -> bool:
        """Start downloading the swarm's state of fragment `k` where it differs from ours (or `key`'s state
        hashing to `digest`, else the majority's); False: nothing to fetch, this peer holds the swarm's state.
        A download of the fragment under way is superseded (its result is dropped)."""
        if key is None:
            report = self._agreed_report(k, round_)
            if report is None or report.round < self.base_round[k]:
                return False
            own = self.digests[k]
            resync = report.round == self.base_round[k]
            digest = report.agreed(own if resync else None, self._quorum(report))
            if digest == own:
                return False
            if resync:
                log.warning("fragment %d: this peer's state of round %d (%s) disagrees with the swarm's (%s): "
                            "re-downloading it", k, report.round, own[:12], digest[:12])
            key = RoundKey(self.run_id, k, report.round)
        else:
            resync = False
        self.fetching[k] = StateFetch(key, digest, resync, self.averager.fetch(key, digest))
        return True

    def _agreed_report(self, k: int, upto: int) -> RoundReport | None:
        """The others' report of the latest round <= `upto` of fragment `k` whose state has a quorum
        (`RoundReport.agreed`), or is older than ours: a newer round held by too few peers is passed over (logged
        once), and the one before it considered."""
        report = self.averager.latest_agreed(k, upto)
        while report is not None and report.round >= self.base_round[k]:
            own = self.digests[k] if report.round == self.base_round[k] else None
            if report.agreed(own, self._quorum(report)) is not None:
                return report
            if (k, report.round) not in self.unbacked:
                self.unbacked.add((k, report.round))
                log.warning("fragment %d: round %d's state %s is held by too few peers (%s of %s needed) to be "
                            "adopted: passed over", k, report.round, ", ".join(d[:12] for d in report.digests),
                            max(report.digests.values(), default=0), report.quorum())
            report = self.averager.latest_agreed(k, report.round - 1)
        return report

    def _quorum(self, report: RoundReport) -> int:
        """Holders a state other than ours needs: `report.quorum()` mid-run; one at the end of a run
        (`reconcile`). A round can end applied on one member and failed on the other (a reply lost): mid-run the
        next round repairs that, but at the end the one holder is all there is, and without adopting its state
        the swarm ends apart (measured: the slow-peer local swarm ended with three states). So a forger's
        single voice is still heard at the very end; admission (run tokens) is what closes that."""
        return 1 if self.reconciling else report.quorum()

    def _finish_fetch(self, k: int, wait: float | None) -> str:
        """"adopted", "failed" (nobody could hand it over, or it did not check out) or "pending"."""
        fetch = self.fetching[k]
        try:
            state = fetch.future.result(timeout=wait)
        except FutureTimeout:
            return "pending"
        except Exception as e:  # (a failed lookup or download: as if nobody could hand it over)
            log.warning("could not recover %s from the swarm: %s", fetch.key, e)
            state = None
        del self.fetching[k]
        if state is None or fetch.key.round < self.base_round[k] \
                or not self._adopt(k, fetch.key, state, count=not fetch.resync):
            return "failed"
        if fetch.resync:
            self.stats.resynced[k] += 1
        else:
            log.warning("fragment %d caught up to the swarm's round %d", k, fetch.key.round)
        return "adopted"

    def adopt_swarm_state(self, step: int, backing_wait_s: float = 0.0) -> list[int | None]:
        """A joiner at global step `step`: take every fragment's latest agreed state from the swarm.

        Anchors and momenta come from the swarm (verified by the averager); the
        working parameters become the anchors. When nobody can serve the latest
        round (its holders died), an older agreed round is taken; the catch-up at
        the next round brings the fragment forward. Returns the round each fragment
        now holds (None: the swarm reports none, the fragment stays at the run's seed).
        A newest round held by one peer only is waited for up to `backing_wait_s` seconds
        (`_backed_report`) before an older one is taken.
        """
        held: list[int | None] = []
        for k in range(len(self.fragments)):
            for attempt in range(JOIN_ATTEMPTS):  # the donors may move on to the next round meanwhile
                latest = self.schedule.latest_round(k, step)
                report = self._backed_report(k, latest + attempt, backing_wait_s) if latest is not None else None
                # no round held by enough peers: the rounds some peer holds, oldest first (`_held_reports`)
                candidates = [report] if report is not None else \
                    self._held_reports(k, latest + attempt) if latest is not None else []
                if not candidates and attempt == 0:
                    held.append(None)
                    break
                taken = None
                for candidate in candidates:
                    taken = self._take(k, candidate)
                    if taken is not None:
                        break
                if taken is not None:
                    self.fragments[k].assign(self.anchors[k])
                    self.tokens_since_sync[k] = 0  # the progress of a resumed checkpoint went with its parameters
                    self.since_step[k] = step
                    held.append(taken)
                    break
            else:
                raise AveragingFailed(f"could not download the swarm's state of fragment {k} "
                                      f"in {JOIN_ATTEMPTS} attempts")
        return held

    def _take(self, k: int, report: RoundReport) -> int | None:
        """Adopt the state of `report`'s round, or (nobody could serve it: its holders died) of an older agreed
        round; returns the round taken, or None."""
        while report is not None:
            key = RoundKey(self.run_id, k, report.round)
            digest = report.agreed(None, self._quorum(report)) or report.majority()
            if self._adopt_agreed_state(k, key, digest, count=False):
                return report.round
            report = self._agreed_report(k, report.round - 1)
        return None

    def _backed_report(self, k: int, upto: int, wait_s: float) -> RoundReport | None:
        """`_agreed_report`, waiting up to `wait_s` seconds while a newer round than the one it returns is held
        by too few peers: the members of a round's group publish their state hashes moments apart, so a joiner
        that reads them in between sees the round with one holder (measured: CI's loaded machine left a late
        joiner at the seed of one fragment that way); a member that failed the round catches up at its next
        round. Past `wait_s` the older agreed round (or None) is what there is."""
        deadline = time.monotonic() + wait_s
        while True:
            report = self._agreed_report(k, upto)
            newest = self.averager.latest_agreed(k, upto)
            if newest is None or report is not None and report.round >= newest.round \
                    or time.monotonic() >= deadline:
                return report
            time.sleep(min(JOIN_BACKING_POLL_S, max(0.0, deadline - time.monotonic())))

    def _held_reports(self, k: int, upto: int) -> list[RoundReport]:
        """When no round of fragment `k` is held by enough peers (each live peer holds a round of its own: one
        failed the last round, another died with a newer one), the rounds some peer holds, OLDEST first: a joiner
        starts from the oldest it can download rather than from the seed, and the catch-up brings it forward once
        a newer round is agreed. The oldest, not the newest: one peer publishing a round of its own making ahead
        of the others would otherwise be adopted, and no older agreed round could replace it later; a newer one
        only when the older one's holders cannot serve it (in CI: the only holder of the oldest had just died,
        its record not yet stale, and the joiner gave up on the fragment instead of taking the live peer's)."""
        reports = []
        report = self.averager.latest_agreed(k, upto)
        while report is not None:
            reports.append(report)
            report = self.averager.latest_agreed(k, report.round - 1)
        if reports:
            log.warning("fragment %d: no round's state is held by enough peers; starting from the oldest held "
                        "(of rounds %s) that can be downloaded, until one is agreed", k,
                        sorted(r.round for r in reports))
        return reports[::-1]

    def _adopt_agreed_state(self, k: int, key: RoundKey, digest: str | None = None, count: bool = True) -> bool:
        """Download `key`'s state (hashing to `digest`) and adopt it, waiting for it (a joiner's start)."""
        try:
            state = self.averager.recover(key, digest)
        except AveragingFailed as e:
            log.warning("could not recover %s from the swarm: %s", key, e)
            return False
        return state is not None and self._adopt(k, key, state, count)

    def _adopt(self, k: int, key: RoundKey, state, count: bool) -> bool:
        """Take `state` (of `key`, checked against its hash by the averager) as fragment `k`'s anchor and momentum;
        `count`: as an applied round taken from the swarm."""
        n = self.anchors[k].numel()
        for name, t in (("anchor", state.anchor), ("momentum", state.momentum)):
            if t.dtype != torch.float32 or t.numel() != n or not bool(torch.isfinite(t).all()):
                log.warning("refusing recovered %s of %s: %d %s values, expected %d finite float32",
                            name, key, t.numel(), t.dtype, n)
                return False
        # the values that changed since this peer's anchor: those of the rounds after it (with a sync_stride,
        # fewer than S of them leave the others' values as they were, and their local progress stays); a
        # different state of the same round: all of them
        since = range(self.base_round[k] + 1, key.round + 1) if key.round > self.base_round[k] else range(0)
        self.anchors[k] = state.anchor.reshape(-1).clone()
        self.momenta[k] = state.momentum.reshape(-1).clone()
        self.base_round[k] = key.round
        self._merge(k, rounds_mask(n, self.config.sync_stride, since) if len(since) else None)
        if count:
            self.stats.applied[k] += 1
            self.stats.recovered[k] += 1
            self._log_round(k, key.round, "adopted")
        self._publish(k, key)
        return True

    def reconcile(self) -> None:
        """No round left to catch up at (the end of a run): take the swarm's state now where it differs.

        A round can end applied on some peers and failed on others (a reply lost on
        the way); mid-run the next round repairs that, at the end this does.
        """
        self.reconciling = True
        try:
            for k in range(len(self.fragments)):
                self._catch_up(k, 1 << 62, wait=None)
        finally:
            self.reconciling = False
