"""Catching up with the swarm: adopting the state the others agree on.

A worker's fragment can fall behind the swarm: it joined late, its round failed
while others applied it, it stalled, or it averaged against a stale anchor and
now disagrees with the majority. The others report, per fragment, the latest
round they hold and its state hashes (`FragmentAverager.latest_agreed`); this
mixin of `StreamingDiLoCo` adopts the majority's state (anchor, momentum),
downloaded and verified by the averager, and merges it like an applied round.

Guarantees: a state is adopted only whole (both tensors of the right size, all
finite, hashing to the agreed digest: the averager checks that); when none can
be fetched, nothing changes and the worker takes part with what it holds (the
next round tries again); nobody ever waits for a state, so a swarm can never
lock itself out of rounds.
"""

from __future__ import annotations

import logging

import torch

from .averaging import AveragingFailed, RoundKey

log = logging.getLogger(__name__)

JOIN_ATTEMPTS = 5


class CatchUp:
    """The catch-up half of `StreamingDiLoCo` (its fields: anchors, momenta, base_round, digests, stats...)."""

    def _catch_up(self, k: int, round_: int) -> bool:
        """Before round `round_`: bring this fragment to the swarm's state.

        The others report the latest round they hold and its state hashes. A newer
        round than ours: adopt it. The same round with a different hash than the
        majority (a late joiner that missed a round in flight, a stale peer that
        averaged against an older anchor): re-download the majority's state.
        Returns False when the swarm already holds `round_` itself (its state was
        adopted and there is nothing to start). When the state cannot be fetched
        this peer takes part with what it has and tries again next round: nobody
        ever waits for a state, so a swarm can never lock itself out of rounds.
        """
        report = self.averager.latest_agreed(k, round_)
        if report is None or report.round < self.base_round[k]:
            return True
        own = self.digests[k]
        if report.round == self.base_round[k]:
            majority = report.majority(own)
            if majority == own:
                return True
            log.warning("fragment %d: this peer's state of round %d (%s) disagrees with the swarm's (%s): "
                        "re-downloading it", k, report.round, own[:12], majority[:12])
            if self._adopt_agreed_state(k, RoundKey(self.run_id, k, report.round), majority, count=False):
                self.stats.resynced[k] += 1
            return True
        if not self._adopt_agreed_state(k, RoundKey(self.run_id, k, report.round), report.majority()):
            log.warning("fragment %d holds round %d, the swarm %d whose state could not be fetched: "
                        "averaging round %d with this peer's state", k, self.base_round[k], report.round, round_)
            return True
        log.warning("fragment %d caught up to the swarm's round %d", k, report.round)
        return report.round < round_

    def adopt_swarm_state(self, step: int) -> list[int | None]:
        """A joiner at global step `step`: take every fragment's latest agreed state from the swarm.

        Anchors and momenta come from the swarm (verified by the averager); the
        working parameters become the anchors. When nobody can serve the latest
        round (its holders died), an older agreed round is taken; the catch-up at
        the next round brings the fragment forward. Returns the round each fragment
        now holds (None: the swarm reports none, the fragment stays at the run's seed).
        """
        held: list[int | None] = []
        for k in range(len(self.fragments)):
            for attempt in range(JOIN_ATTEMPTS):  # the donors may move on to the next round meanwhile
                latest = self.schedule.latest_round(k, step)
                report = self.averager.latest_agreed(k, latest + attempt) if latest is not None else None
                if report is None and attempt == 0:
                    held.append(None)
                    break
                while report is not None:
                    key = RoundKey(self.run_id, k, report.round)
                    if self._adopt_agreed_state(k, key, report.majority(), count=False):
                        break
                    # nobody could serve that round (its holders died): an older agreed state, if one is held
                    report = self.averager.latest_agreed(k, report.round - 1)
                if report is not None:
                    self.fragments[k].assign(self.anchors[k])
                    held.append(report.round)
                    break
            else:
                raise AveragingFailed(f"could not download the swarm's state of fragment {k} "
                                      f"in {JOIN_ATTEMPTS} attempts")
        return held

    def _adopt_agreed_state(self, k: int, key: RoundKey, digest: str | None = None, count: bool = True) -> bool:
        try:
            state = self.averager.recover(key, digest)
        except AveragingFailed as e:
            log.warning("could not recover %s from the swarm: %s", key, e)
            return False
        if state is None:
            return False
        n = self.anchors[k].numel()
        for name, t in (("anchor", state.anchor), ("momentum", state.momentum)):
            if t.dtype != torch.float32 or t.numel() != n or not bool(torch.isfinite(t).all()):
                log.warning("refusing recovered %s of %s: %d %s values, expected %d finite float32",
                            name, key, t.numel(), t.dtype, n)
                return False
        self.anchors[k] = state.anchor.reshape(-1).clone()
        self.momenta[k] = state.momentum.reshape(-1).clone()
        self.base_round[k] = key.round
        self._merge(k)
        if count:
            self.stats.applied[k] += 1
            self.stats.recovered[k] += 1
        self._publish(k, key)
        return True

    def reconcile(self) -> None:
        """No round left to catch up at (the end of a run): take the swarm's state now where it differs.

        A round can end applied on some peers and failed on others (a reply lost on
        the way); mid-run the next round repairs that, at the end this does.
        """
        for k in range(len(self.fragments)):
            self._catch_up(k, 1 << 62)
