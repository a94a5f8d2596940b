"""Streaming DiLoCo: fragments, staggered schedule, outer Nesterov, overlap and merge.

Plain torch; the network is reached only through a `FragmentAverager`.

For each fragment k (offset o_k, period H, delay tau), after inner step t:
  * start  when t >= o_k and (t - o_k) % H == 0: outer_grad = anchor_k - theta_k
    (plus the carried quantization residual with error feedback, times `ef_decay`) goes to the averager;
  * finish at the start step + tau (or later, see Overlap): take the weighted fp32 mean `avg`, then
        m_k      <- mu * m_k + avg
        anchor_k <- anchor_k - lr * (avg + mu * m_k)          (Nesterov)
        theta_k  <- alpha * theta_k + (1 - alpha) * anchor_k  (merge)
  The d inner steps trained while the round was in flight (`overlap`; theta0_k: theta_k at the start):
    plain  the merge above: a share (1 - alpha) of those steps is lost;
    keep   theta_k <- theta_k + (1 - alpha) * (anchor_k - theta0_k): they are kept, and go out with the next round;
    eager  at the start theta_k <- theta_k + s_k, s_k = (1 - alpha) * (est_k - theta0_k), est_k the anchor this
           peer's own outer gradient alone would give (arXiv 2502.12996's proxy), so the d steps train from
           a merged point; at the finish theta_k <- theta_k + (1 - alpha) * (anchor_k - theta0_k) - s_k
           (a failed round takes s_k back).
  Anchors and momenta move the same way in all three: peers stay equal whatever their delays.
  With `sync_stride` S > 1 a round averages, updates and merges only every S-th value of the fragment
  (`round_subset`); the others keep training locally and go out, whole, in the round that covers them.

Guarantees:
  * success: anchor_k and m_k change only by the outer step above, computed from
    the mean every member of the group received, so peers that started equal stay
    bit-identical.
  * failure (the averager raises, or returns a mean of the wrong size or with a
    non-finite value): if other peers already report the round applied and the
    averager can hand over the state they agree on (verified by hash;
    `FragmentAverager.recover`),
    this peer adopts it (anchor_k, m_k) and merges as after a success, so it stays
    in step; otherwise anchor_k, m_k, the working parameters (an eager merge taken
    back, to float rounding) and the
    error-feedback residual stay exactly as they were, the round is counted as
    failed and the next round's outer gradient carries all progress since the
    last applied round.
  * crash: anchors and momenta only change inside `finish`, between two complete
    tensor updates of one fragment; nothing here is persisted (see checkpoints).
  * missed rounds (`catch_up.CatchUp`): each fragment remembers the round its anchor comes from. A
    round r starts from round r - 1: when the peer holds an older anchor while the
    swarm reports a newer one (it failed to recover, stalled, or joined late), it
    first adopts the agreed state; if that cannot be fetched, it averages the round
    with what it holds (its outer gradient against its older anchor, `stale_anchor`
    "average") and tries the download again at the next round. Measured no worse
    than sitting the round out (README: Stale anchors), and a peer that can never
    download still contributes.

Overlap: a round's result is taken at start + tau at the earliest; when the
averager is not done by then (matchmaking waits for a late peer), training goes
on and the result is taken as soon as it is ready, at the latest at the run's
lateness bound (`max_delay`; by default one step before the fragment's next
round, start + H - 1), where the worker waits (the averager bounds that wait by
its timeouts). The bound changes when a mean is applied, never what: members
stay bit-identical whatever their delays. Measured (README, Late results): on
loopback a bound of 3 steps gains ~1 % and costs no time; on slow links, where a
mean lands ~30 steps late, it would stall every peer: off by default. With an
averager that answers at once (the simulator) this is exactly start + tau. The plain merge discards
the share (1 - alpha) of the steps trained meanwhile, however many; `overlap`
"keep" and "eager" do not (README: Late results, measured).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .averaging import AveragingFailed, FragmentAverager, PendingAverage, RoundKey
from .catch_up import CATCH_UP_WAIT_S, CatchUp, StateFetch
from .codecs import get_codec
from .config import AUTO_CODEC, DiLoCoConfig
from .fragments import Fragment, split_fragments
from .outer_corrections import age_weight, heloco
from .round_stats import RoundStats
from .round_subset import covered, gather, subset_size, subset_slice
from .schedule import Schedule
from .state_hash import state_hash

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    key: RoundKey
    start_step: int
    pending: PendingAverage | None  # None: the averager refused to begin
    tokens: int
    since_step: int | None  # where the tokens counted from (put back with them when the round fails)
    residual_after: torch.Tensor | None  # error-feedback residual to keep if the round applies
    subset: slice | None  # the fragment's values the round averages (None: all of them)
    theta0: torch.Tensor | None = None  # overlap keep / eager: the working values when the round started
    shift: torch.Tensor | None = None  # overlap eager: what the eager merge added to them


class StreamingDiLoCo(CatchUp):
    """The outer loop of one worker: owns the anchors and outer momenta of every fragment."""

    def __init__(self, model: nn.Module, config: DiLoCoConfig, averager: FragmentAverager,
                 run_id: str = "local"):
        self.config = config
        self.averager = averager
        self.run_id = run_id
        self.fragments: list[Fragment] = split_fragments(model, config.fragments)
        self.schedule = Schedule(config)
        self.offsets = self.schedule.offsets
        self.codec = None if config.codec == AUTO_CODEC else get_codec(config.codec)  # only error feedback uses it
        self.anchors = [f.flat() for f in self.fragments]
        self.momenta = [torch.zeros_like(a) for a in self.anchors]
        self.residuals = [torch.zeros_like(a) for a in self.anchors] if config.error_feedback else None
        self.tokens_since_sync = [0] * len(self.fragments)
        self.step_tokens = 0  # tokens of one inner step (the largest recorded)
        # the step each fragment's tokens_since_sync count from (None: unknown, after a restore)
        self.since_step: list[int | None] = [0] * len(self.fragments)
        self.base_round = [-1] * len(self.fragments)  # the round each anchor comes from (-1: the seed)
        self.last_round = [-1] * len(self.fragments)  # the latest round this worker started or sat out
        self.digests = [state_hash(a, m) for a, m in zip(self.anchors, self.momenta)]  # of (anchor, momentum)
        # the latest a round's mean is waited for: the run's lateness bound, else just before the fragment's next round
        self.max_delay = config.max_delay if config.max_delay is not None else max(config.tau, config.outer_period - 1)
        self.in_flight: dict[int, _InFlight] = {}
        self.fetching: dict[int, StateFetch] = {}  # the swarm's state of these fragments is downloading
        self.unbacked: set[tuple[int, int]] = set()  # (fragment, round) whose state too few peers held (logged)
        self.reconciling = False  # the end of a run: one holder of a newer state is enough (`CatchUp._quorum`)
        # a newer state that cannot be fetched: "average" with ours (the rule), or "sit_out" (the simulator's
        # alternative, measured within 0.2 % of it: README, Stale anchors)
        self.stale_anchor = "average"
        # the simulator's what-ifs for unequal and stale peers (`outer_corrections`; measured, README: Unequal
        # peers): "heloco" corrects this peer's outer gradient against the outer momentum, and an age decay > 0
        # lowers the weight of a part averaged from a stale anchor (CGAD). Off in every swarm.
        self.correction: str | None = None
        self.age_decay = 0.0
        self.now = 0  # the latest step the rounds were started or finished at
        # what became of each round here, one dict each (`_log_round`; None: not kept); its reader empties it
        self.round_log: list[dict] | None = None
        self.stats = RoundStats.empty(len(self.fragments))

    # -- schedule ---------------------------------------------------------
    def round_at(self, fragment: int, step: int) -> int | None:
        """The round fragment `fragment` starts after inner step `step`, or None."""
        return self.schedule.round_at(fragment, step)

    def record_tokens(self, tokens: int) -> None:
        self.step_tokens = max(self.step_tokens, tokens)
        for k in range(len(self.tokens_since_sync)):
            self.tokens_since_sync[k] += tokens

    # -- the two halves of a sync -------------------------------------------
    def start_due_rounds(self, step: int) -> None:
        self.now = step
        for k, r in self.schedule.due(step):
            self._start(k, r, step)

    def finish_due_rounds(self, step: int) -> None:
        self.now = max(self.now, step)
        self.take_fetched()
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
                self.now = s
                for k, r in self.schedule.due(s):
                    self._sit_out(k, r, "the clock jumped past it")
                continue
            self.sync(s)
        self.finish_due_rounds(step)

    @property
    def final_passes(self) -> int:
        """Final rounds a fragment needs to bring all its progress into the anchor: one, or with `sync_stride` S,
        S of them (each covers its share; without them the anchors would hold values of S different ages)."""
        return self.config.sync_stride

    def start_final_rounds(self, step: int, trained: bool = True, final_pass: int = 0) -> list[int]:
        """Start one more round for every fragment with progress since its last round started (`final_pass` p
        of `final_passes`: the round p after that one, for the values it covers). A worker that
        has not `trained` at all (it joined at or after the end) starts none: it returns the fragments whose last
        round it sits out, to take their result at the reconcile, rather than start rounds that nobody else would
        search a group for. (A worker that trained but whose clock jumped to the end with no step since a round
        started still takes part, with a round of no progress: the others expect it in their groups.)"""
        sat_out = []
        for k in range(len(self.fragments)):
            if k in self.in_flight:
                continue
            due = self.round_at(k, step)
            last = (due if due is not None else self.schedule.next_round(k, step)) + final_pass
            if not trained:
                if last > self.last_round[k]:
                    self.last_round[k] = last
                    sat_out.append(k)
            elif due is None or final_pass > 0:
                self._start(k, last, step)
        return sat_out

    def finish_in_flight(self) -> None:
        for k in list(self.in_flight):
            self._finish(k)

    # -- internals -----------------------------------------------------------
    def _start(self, k: int, round_: int, step: int) -> None:
        if k in self.in_flight:  # the previous round is overdue (a clock jump): take its result first
            self._finish(k)
        self.last_round[k] = max(self.last_round[k], round_)
        if not self._catch_up(k, round_):
            return
        theta0 = self.fragments[k].flat()
        tokens = max(self.tokens_since_sync[k], 1)
        since = self.since_step[k]
        weight, scale = self._weight(tokens, None if since is None else step - since)
        outer_grad = self.anchors[k] - theta0
        if scale != 1.0:
            outer_grad.mul_(scale)
        if self.correction == "heloco":
            outer_grad = heloco(outer_grad, self.momenta[k], [p.numel() for p in self.fragments[k].params])
        if self.age_decay > 0.0:  # rounds this anchor is behind the round before this one
            weight *= age_weight(round_ - 1 - self.base_round[k], self.age_decay)
        stride = self.config.sync_stride
        subset = None if stride == 1 else subset_slice(stride, round_)
        residual_after = None
        if self.residuals is not None:
            residual = self.residuals[k] if self.config.ef_decay == 1.0 else self.config.ef_decay * self.residuals[k]
            outer_grad = outer_grad + residual
            if subset is None:
                residual_after = outer_grad - self.codec.roundtrip(outer_grad)
            else:
                sent = outer_grad[subset]
                residual_after = self.residuals[k].clone()
                residual_after[subset] = sent - self.codec.roundtrip(sent)
        if subset is not None:
            outer_grad = gather(outer_grad, stride, round_)
        key = RoundKey(self.run_id, k, round_)
        self.tokens_since_sync[k] = 0
        self.since_step[k] = step
        self.stats.started[k] += 1
        try:
            pending = self.averager.begin(key, outer_grad, weight)
        except AveragingFailed as e:
            log.warning("round could not start for fragment %d: %s", k, e)
            pending = None
        overlap = self.config.overlap
        shift = self._eager_merge(k, theta0, subset) if overlap == "eager" else None
        self.in_flight[k] = _InFlight(key, step, pending, tokens, since, residual_after, subset,
                                      None if overlap == "plain" else theta0, shift)

    def _eager_merge(self, k: int, theta0: torch.Tensor, subset: slice | None) -> torch.Tensor:
        """Merge toward the anchor this peer's own outer gradient alone would give, at once; returns the shift
        added to the working values (zero outside the round's values)."""
        cfg = self.config
        mu, lr = cfg.outer_momentum, cfg.outer_lr
        sel = slice(None) if subset is None else subset
        anchor, own = self.anchors[k][sel], (self.anchors[k] - theta0)[sel]
        estimate = anchor - lr * (own + mu * (mu * self.momenta[k][sel] + own))
        shift = torch.zeros_like(theta0)
        shift[sel] = (1.0 - cfg.alpha) * (estimate - theta0[sel])
        self.fragments[k].assign(self.fragments[k].flat() + shift)
        return shift

    def _weight(self, tokens: int, steps: int | None) -> tuple[float, float]:
        """(weight in the mean, scale of the outer gradient) of a part trained on `tokens` over `steps` of the
        swarm's clock (`DiLoCoConfig.weighting`). By tokens a peer that trained twice as much also sends an outer
        gradient about twice as large: its influence grows like tokens squared; "uniform" makes it grow like
        tokens; "per_token" scales the outer gradient to the tokens a peer training every step of its batch would
        have trained meanwhile, weighted by tokens: a slow peer's direction counts as much per token as a fast
        one's (unknown `steps`, after a restore: not scaled)."""
        rule = self.config.weighting
        if rule == "uniform":
            return 1.0, 1.0
        if rule == "per_token" and self.step_tokens > 0 and steps is not None and steps > 0:
            return float(tokens), steps * self.step_tokens / tokens
        return float(tokens), 1.0

    def _finish(self, k: int) -> None:
        flight = self.in_flight.pop(k)
        try:
            if flight.pending is None:
                raise AveragingFailed(f"{flight.key}: never started")
            avg = flight.pending.result()
            mean = avg.mean
            expected = self.round_size(k)
            if mean.dtype != torch.float32 or mean.numel() != expected:
                raise AveragingFailed(f"{flight.key}: mean has {mean.numel()} {mean.dtype} values, "
                                      f"expected {expected} float32")
            if not bool(torch.isfinite(mean).all()):
                raise AveragingFailed(f"{flight.key}: mean holds non-finite values")
        except AveragingFailed as e:
            if flight.shift is not None:  # take the eager merge back: the anchor it guessed did not come
                self.fragments[k].assign(self.fragments[k].flat() - flight.shift)
            report = self.averager.latest_agreed(k, flight.key.round)
            digest = report.agreed() if report is not None and report.round == flight.key.round else None
            if digest is not None and k not in self.fetching:
                # the others applied it: their state comes (in the background over a slow link; a later round
                # start adopts it, see `_catch_up`)
                self._start_fetch(k, flight.key.round, flight.key, digest)
                if self._finish_fetch(k, CATCH_UP_WAIT_S if self._alone(k) else 0.0) == "adopted":
                    log.warning("round failed here (%s); adopted the agreed state of %s from the swarm",
                                e, flight.key)
                    self.stats.not_averaged(str(e))
                    return
            self.stats.failed[k] += 1
            self.stats.not_averaged(str(e))
            self.tokens_since_sync[k] += flight.tokens  # the next round carries this progress
            self.since_step[k] = flight.since_step
            log.warning("round not applied, fragment %d keeps its anchor: %s", k, e)
            self._log_round(k, flight.key.round, "failed", flight.start_step, flight.tokens)
            return
        mean = mean.reshape(-1)
        if flight.subset is not None:
            mean = mean[:covered(self.anchors[k].numel(), self.config.sync_stride, flight.key.round)]
        # no step in flight (tau 0, an averager that answered at once) and no eager move: the plain merge, to the bit
        keep = self.now > flight.start_step or flight.shift is not None
        self._apply(k, mean, flight.subset, flight.theta0 if keep else None, flight.shift)
        self.base_round[k] = flight.key.round
        if self.residuals is not None and flight.residual_after is not None:
            self.residuals[k] = flight.residual_after
        self.stats.applied[k] += 1
        self.stats.failing_streak = 0
        self.stats.peers_last[k] = avg.peers
        self._publish(k, flight.key)
        self._log_round(k, flight.key.round, "applied", flight.start_step, flight.tokens, avg.peers, avg.weight,
                        avg.members)

    def _log_round(self, k: int, round_: int, outcome: str, start_step: int | None = None, tokens: int = 0,
                   peers: int = 0, group_weight: float = 0.0, members: tuple[str, ...] = ()) -> None:
        """One line of `round_log`: fragment, round, the steps it started and ended at (their difference: the
        realized delay), applied / failed / sat_out / adopted (the swarm's state of that round taken instead, at
        once or at a later round's start: `catch_up`), the tokens behind this peer's part, and for an applied
        round the group's size, total weight and (where the averager names them) members' peer ids."""
        if self.round_log is not None:
            self.round_log.append({"fragment": k, "round": round_,
                                   "start_step": self.now if start_step is None else start_step,
                                   "end_step": self.now, "outcome": outcome, "tokens": tokens, "peers": peers,
                                   "group_weight": group_weight, **({"members": list(members)} if members else {})})

    def _publish(self, k: int, key: RoundKey) -> None:
        """This fragment now holds the agreed state of `key`: hash it once, tell the averager."""
        self.digests[k] = state_hash(self.anchors[k], self.momenta[k])
        self.averager.applied(key, self.anchors[k], self.momenta[k], self.digests[k])

    def _sit_out(self, k: int, round_: int, why: str) -> None:
        log.warning("fragment %d holds round %d; %s: sitting out round %d", k, self.base_round[k], why, round_)
        self.last_round[k] = max(self.last_round[k], round_)
        self.stats.started[k] += 1
        self.stats.failed[k] += 1
        self.stats.not_averaged(f"sat out: {why}")
        self._log_round(k, round_, "sat_out")

    def _apply(self, k: int, avg: torch.Tensor, subset: slice | None = None,
               theta0: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> None:
        cfg = self.config
        mu, lr = cfg.outer_momentum, cfg.outer_lr
        if subset is None:
            m = self.momenta[k]
            m.mul_(mu).add_(avg)
            self.anchors[k].sub_(lr * (avg + mu * m))
        else:
            m = self.momenta[k][subset]
            m.mul_(mu).add_(avg)
            self.anchors[k][subset] -= lr * (avg + mu * m)  # (a strided slice: m and this are views)
        self._merge(k, subset, theta0, shift)

    def _merge(self, k: int, subset: slice | torch.Tensor | None = None, theta0: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> None:
        """theta_k <- alpha theta_k + (1 - alpha) anchor_k, on `subset` (a slice or a boolean mask) or all; given
        the working values `theta0` of the round's start, the progress since then is kept instead:
        theta_k + (1 - alpha) (anchor_k - theta0), less the `shift` an eager merge already added."""
        alpha = self.config.alpha
        if theta0 is not None:
            sel = slice(None) if subset is None else subset
            merged = self.fragments[k].flat()
            merged[sel] += (1.0 - alpha) * (self.anchors[k][sel] - theta0[sel])
            if shift is not None:
                merged[sel] -= shift[sel]
            self.fragments[k].assign(merged)
            return
        if subset is None:
            if alpha == 0.0:
                merged = self.anchors[k]
            else:
                merged = alpha * self.fragments[k].flat() + (1.0 - alpha) * self.anchors[k]
        else:
            merged = self.fragments[k].flat()
            merged[subset] = alpha * merged[subset] + (1.0 - alpha) * self.anchors[k][subset]
        self.fragments[k].assign(merged)

    def round_size(self, k: int) -> int:
        """Values each round of fragment `k` averages: all of them, or with `sync_stride` its subset."""
        return subset_size(self.anchors[k].numel(), self.config.sync_stride)

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
        self.since_step = [None] * n

    # -- global parameters -----------------------------------------------------
    def load_anchors_into(self, model: nn.Module) -> None:
        """Write the anchors (the global parameters) into another instance of the same model."""
        for frag, anchor in zip(split_fragments(model, self.config.fragments), self.anchors):
            frag.assign(anchor)
