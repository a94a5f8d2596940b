"""Streaming DiLoCo: fragments, staggered schedule, outer Nesterov, overlap and merge.

Plain torch; the network is reached only through a `FragmentAverager`.

For each fragment k (offset o_k, period H, delay tau), after inner step t:
  * start  when t >= o_k and (t - o_k) % H == 0: outer_grad = anchor_k - theta_k
    (plus the carried quantization residual with error feedback) goes to the averager;
  * finish at the start step + tau (or later, see Overlap): take the weighted fp32 mean `avg`, then
        m_k      <- mu * m_k + avg
        anchor_k <- anchor_k - lr * (avg + mu * m_k)          (Nesterov)
        theta_k  <- alpha * theta_k + (1 - alpha) * anchor_k  (merge)

Guarantees:
  * success: anchor_k and m_k change only by the outer step above, computed from
    the mean every member of the group received, so peers that started equal stay
    bit-identical.
  * failure (the averager raises, or returns a mean of the wrong size or with a
    non-finite value): if other peers already report the round applied and the
    averager can hand over the state they agree on (verified by hash;
    `FragmentAverager.recover`),
    this peer adopts it (anchor_k, m_k) and merges as after a success, so it stays
    in step; otherwise anchor_k, m_k, the working parameters and the
    error-feedback residual stay exactly as they were, the round is counted as
    failed and the next round's outer gradient carries all progress since the
    last applied round.
  * crash: anchors and momenta only change inside `finish`, between two complete
    tensor updates of one fragment; nothing here is persisted (see checkpoints).
  * missed rounds: each fragment remembers the round its anchor comes from. A
    round r starts from round r - 1: when the peer holds an older anchor while the
    swarm reports a newer one (it failed to recover, stalled, or joined late), it
    first adopts the agreed state; if that is not available it sits the round
    out rather than average against a stale anchor.

Overlap: a round's result is taken at start + tau at the earliest; when the
averager is not done by then (matchmaking waits for a late peer), training goes
on and the result is taken as soon as it is ready, at the latest one step
before the fragment's next round (start + H - 1), where the worker waits (the
averager bounds that wait by its timeouts). With an averager that answers at
once (the simulator) this is exactly start + tau.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .averaging import AveragingFailed, FragmentAverager, PendingAverage, RoundKey
from .codecs import get_codec
from .config import DiLoCoConfig
from .fragments import Fragment, split_fragments
from .state_hash import state_hash

log = logging.getLogger(__name__)

JOIN_ATTEMPTS = 5


@dataclass
class _InFlight:
    key: RoundKey
    start_step: int
    pending: PendingAverage | None  # None: the averager refused to begin
    tokens: int
    residual_after: torch.Tensor | None  # error-feedback residual to keep if the round applies


@dataclass
class RoundStats:
    started: list[int]
    applied: list[int]
    failed: list[int]
    peers_last: list[int] = field(default_factory=list)
    recovered: list[int] = field(default_factory=list)  # applied rounds taken from the swarm after a local failure
    resynced: list[int] = field(default_factory=list)  # states re-downloaded after disagreeing with the majority
    # rounds in a row (any fragment) that this peer did not average with the swarm: failed, sat out, or
    # failed here and adopted from the others (a peer that only ever downloads contributes nothing)
    failing_streak: int = 0
    last_error: str = ""  # why the latest such round did not average

    def not_averaged(self, why: str) -> None:
        self.failing_streak += 1
        self.last_error = why

    @property
    def averaged(self) -> int:
        """Rounds this peer averaged with the swarm itself (applied, not downloaded)."""
        return sum(self.applied) - sum(self.recovered)


class StreamingDiLoCo:
    """The outer loop of one worker: owns the anchors and outer momenta of every fragment."""

    def __init__(self, model: nn.Module, config: DiLoCoConfig, averager: FragmentAverager,
                 run_id: str = "local"):
        self.config = config
        self.averager = averager
        self.run_id = run_id
        self.fragments: list[Fragment] = split_fragments(model, config.fragments)
        self.offsets = config.offsets()
        self.codec = get_codec(config.codec)
        self.anchors = [f.flat() for f in self.fragments]
        self.momenta = [torch.zeros_like(a) for a in self.anchors]
        self.residuals = [torch.zeros_like(a) for a in self.anchors] if config.error_feedback else None
        self.tokens_since_sync = [0] * len(self.fragments)
        self.base_round = [-1] * len(self.fragments)  # the round each anchor comes from (-1: the seed)
        self.digests = [state_hash(a, m) for a, m in zip(self.anchors, self.momenta)]  # of (anchor, momentum)
        self.max_delay = max(config.tau, config.outer_period - 1)  # finish before the fragment's next round
        self.in_flight: dict[int, _InFlight] = {}
        n = len(self.fragments)
        self.stats = RoundStats([0] * n, [0] * n, [0] * n, [0] * n, [0] * n, [0] * n)

    # -- schedule ---------------------------------------------------------
    def round_at(self, fragment: int, step: int) -> int | None:
        """The round fragment `fragment` starts after inner step `step`, or None."""
        o, h = self.offsets[fragment], self.config.outer_period
        if step >= o and (step - o) % h == 0:
            return (step - o) // h
        return None

    def record_tokens(self, tokens: int) -> None:
        for k in range(len(self.tokens_since_sync)):
            self.tokens_since_sync[k] += tokens

    # -- the two halves of a sync -------------------------------------------
    def start_due_rounds(self, step: int) -> None:
        for k in range(len(self.fragments)):
            r = self.round_at(k, step)
            if r is not None:
                self._start(k, r, step)

    def finish_due_rounds(self, step: int) -> None:
        for k, flight in list(self.in_flight.items()):
            if flight.start_step + self.config.tau > step:
                continue
            ready = flight.pending is None or flight.pending.done()
            if ready or flight.start_step + self.max_delay <= step:
                self._finish(k)

    def sync(self, step: int) -> None:
        """Both halves for a worker that averages alone in its process (start, then finish)."""
        self.start_due_rounds(step)
        self.finish_due_rounds(step)

    def advance(self, last: int, step: int, max_lag: int | None = None) -> None:
        """The clock moved from step `last` to `step` (a jump, for a slow or stalled worker).

        Rounds due in between run as usual, except those that started more than
        `max_lag` steps ago (at most, and by default, one period less a step): their
        groups have formed without this worker, and running them back to back would
        only wait on groups that are gone, so they are sat out (the next round
        catches up).
        """
        lag = self.config.outer_period - 1 if max_lag is None else min(max(max_lag, 0), self.config.outer_period - 1)
        for s in range(last + 1, step + 1):
            if s < step - lag:
                for k in range(len(self.fragments)):
                    r = self.round_at(k, s)
                    if r is not None:
                        self._sit_out(k, r, "the clock jumped past it")
                continue
            self.sync(s)
        self.finish_due_rounds(step)

    def start_final_rounds(self, step: int) -> None:
        """Start one more round for every fragment with progress since its last round started."""
        for k in range(len(self.fragments)):
            if k in self.in_flight or self.round_at(k, step) is not None:
                continue
            if step < self.offsets[k]:
                r = 0
            else:
                r = (step - self.offsets[k]) // self.config.outer_period + 1
            self._start(k, r, step)

    def finish_in_flight(self) -> None:
        for k in list(self.in_flight):
            self._finish(k)

    def reconcile(self) -> None:
        """No round left to catch up at (the end of a run): take the swarm's state now where it differs.

        A round can end applied on some peers and failed on others (a reply lost on
        the way); mid-run the next round repairs that, at the end this does.
        """
        for k in range(len(self.fragments)):
            self._catch_up(k, 1 << 62)

    # -- internals -----------------------------------------------------------
    def _start(self, k: int, round_: int, step: int) -> None:
        if k in self.in_flight:  # the previous round is overdue (a clock jump): take its result first
            self._finish(k)
        if not self._catch_up(k, round_):
            return
        outer_grad = self.anchors[k] - self.fragments[k].flat()
        residual_after = None
        if self.residuals is not None:
            outer_grad = outer_grad + self.residuals[k]
            residual_after = outer_grad - self.codec.roundtrip(outer_grad)
        key = RoundKey(self.run_id, k, round_)
        weight = float(max(self.tokens_since_sync[k], 1))
        self.tokens_since_sync[k] = 0
        self.stats.started[k] += 1
        try:
            pending = self.averager.begin(key, outer_grad, weight)
        except AveragingFailed as e:
            log.warning("round could not start for fragment %d: %s", k, e)
            pending = None
        self.in_flight[k] = _InFlight(key, step, pending, int(weight), residual_after)

    def _finish(self, k: int) -> None:
        flight = self.in_flight.pop(k)
        try:
            if flight.pending is None:
                raise AveragingFailed(f"{flight.key}: never started")
            avg = flight.pending.result()
            mean = avg.mean
            if mean.dtype != torch.float32 or mean.numel() != self.anchors[k].numel():
                raise AveragingFailed(f"{flight.key}: mean has {mean.numel()} {mean.dtype} values, "
                                      f"expected {self.anchors[k].numel()} float32")
            if not bool(torch.isfinite(mean).all()):
                raise AveragingFailed(f"{flight.key}: mean holds non-finite values")
        except AveragingFailed as e:
            report = self.averager.latest_agreed(k, flight.key.round)
            if report is not None and report.round == flight.key.round and \
                    self._adopt_agreed_state(k, flight.key, report.majority()):
                log.warning("round failed here (%s); adopted the agreed state of %s from the swarm", e, flight.key)
                self.stats.not_averaged(str(e))
                return
            self.stats.failed[k] += 1
            self.stats.not_averaged(str(e))
            self.tokens_since_sync[k] += flight.tokens  # the next round carries this progress
            log.warning("round not applied, fragment %d keeps its anchor: %s", k, e)
            return
        self._apply(k, mean.reshape(-1))
        self.base_round[k] = flight.key.round
        if self.residuals is not None and flight.residual_after is not None:
            self.residuals[k] = flight.residual_after
        self.stats.applied[k] += 1
        self.stats.failing_streak = 0
        self.stats.peers_last[k] = avg.peers
        self._publish(k, flight.key)

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

    def _publish(self, k: int, key: RoundKey) -> None:
        """This fragment now holds the agreed state of `key`: hash it once, tell the averager."""
        self.digests[k] = state_hash(self.anchors[k], self.momenta[k])
        self.averager.applied(key, self.anchors[k], self.momenta[k], self.digests[k])

    def _sit_out(self, k: int, round_: int, why: str) -> None:
        log.warning("fragment %d holds round %d; %s: sitting out round %d", k, self.base_round[k], why, round_)
        self.stats.started[k] += 1
        self.stats.failed[k] += 1
        self.stats.not_averaged(f"sat out: {why}")

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
            o, h = self.offsets[k], self.config.outer_period
            for attempt in range(JOIN_ATTEMPTS):  # the donors may move on to the next round meanwhile
                report = self.averager.latest_agreed(k, (step - o) // h + attempt) if step >= o else None
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

    def _apply(self, k: int, avg: torch.Tensor) -> None:
        cfg = self.config
        mu, lr = cfg.outer_momentum, cfg.outer_lr
        m = self.momenta[k]
        m.mul_(mu).add_(avg)
        self.anchors[k].sub_(lr * (avg + mu * m))
        self._merge(k)

    def _merge(self, k: int) -> None:
        alpha = self.config.alpha
        if alpha == 0.0:
            merged = self.anchors[k]
        else:
            merged = alpha * self.fragments[k].flat() + (1.0 - alpha) * self.anchors[k]
        self.fragments[k].assign(merged)

    def restore(self, anchors: list[torch.Tensor], momenta: list[torch.Tensor], residuals: list[torch.Tensor] | None,
                rounds: list[int], digests: list[str], tokens_since_sync: list[int]) -> None:
        """Take a saved global state (a checkpoint, checked by its reader): every fragment's anchor, momentum,
        residual, the round it comes from, its state hash and the tokens since its last round. Nothing is in
        flight afterwards; the working parameters are the caller's."""
        n = len(self.fragments)
        if not (len(anchors) == len(momenta) == len(rounds) == len(digests) == len(tokens_since_sync) == n):
            raise ValueError(f"a saved state for {len(anchors)} fragments, this worker has {n}")
        self.in_flight.clear()
        self.anchors = [a.reshape(-1).clone() for a in anchors]
        self.momenta = [m.reshape(-1).clone() for m in momenta]
        if self.residuals is not None and residuals is not None:
            self.residuals = [r.reshape(-1).clone() for r in residuals]
        self.base_round = list(rounds)
        self.digests = list(digests)
        self.tokens_since_sync = list(tokens_since_sync)

    # -- global parameters -----------------------------------------------------
    def load_anchors_into(self, model: nn.Module) -> None:
        """Write the anchors (the global parameters) into another instance of the same model."""
        for frag, anchor in zip(split_fragments(model, self.config.fragments), self.anchors):
            frag.assign(anchor)
