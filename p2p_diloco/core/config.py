"""The Streaming DiLoCo configuration: one validated dataclass.

Every value that would make the algorithm impossible or meaningless is refused at
construction with a `ConfigError` that names the field and says why, so a bad
flag, profile or published run config never reaches the training loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the reason."""


CODEC_NAMES = ("fp32", "fp16", "int8", "fp4", "int2", "sign1", "top4")
INNER_OPTIMIZERS = ("adamw", "muon")
AGGREGATIONS = ("mean", "clip", "trimmed", "winsorized", "centered")  # rules of core/aggregation.py
OVERLAPS = ("plain", "keep", "eager")  # what the steps trained while a round is in flight keep (streaming.py)
WEIGHTINGS = ("tokens", "uniform", "per_token")  # how a member's outer gradient weighs in the mean
AUTO_CODEC = "auto"  # each round's codec chosen by its group from the members' links (a swarm's averager only)


@dataclass(frozen=True)
class DiLoCoConfig:
    """Streaming DiLoCo hyper-parameters (SPEC.md §1).

    `fragments` is P, the number of fragments the transformer blocks are split
    into (strided: block i goes to fragment i mod P); everything that is not a
    block (embeddings, final norm, head) is one more fragment, so a model has
    P + 1 fragments in all, their sync offsets spread evenly over `outer_period`.
    `fragments = 0` is plain DiLoCo: the whole model is one fragment.
    """

    # Defaults: the paper's, except H = 60 (near the most outer rounds that keep fp4 traffic >= 400x
    # below data-parallel), P = 4 (one block per fragment in the default model; measured better than
    # P = 2) and the inner lr (the simulator's sweep on the embedded task; see the README).
    outer_period: int = 60  # H: inner steps between two syncs of the same fragment
    fragments: int = 4  # P: block fragments (plus one fragment for everything else)
    tau: int = 1  # inner steps a fragment's average may stay in flight (0 = blocking)
    alpha: float = 0.5  # merge: theta <- alpha * theta + (1 - alpha) * anchor
    # what the steps trained while a round is in flight start from and keep (streaming.py, Overlap): "plain" (the
    # paper's merge), "keep" (the merge keeps them; measured best at every delay but tau's, where it is within
    # 0.3 %: README, Late results) or "eager" (merged at once with this peer's own outer step)
    overlap: str = "keep"
    # the lateness bound: a round's mean is waited for at the latest this many inner steps after the round started
    # (None: H - 1, just before the fragment's next round; README, Late results)
    max_delay: int | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    inner_lr: float = 8e-3  # best of the sweep on the embedded 0.2M model; the paper's 1B model used 4e-4
    inner_weight_decay: float = 0.1
    inner_betas: tuple[float, float] = (0.9, 0.95)
    inner_optimizer: str = "adamw"  # muon: Muon for the transformer blocks' matrices, AdamW for the rest
    warmup_steps: int = 100
    total_steps: int = 1000  # length of the cosine schedule; training may stop earlier or go on at the floor
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of inner_lr
    grad_clip: float = 1.0  # 0 disables clipping
    codec: str = "fp4"
    error_feedback: bool = False  # carry each fragment's quantization residual into its next round
    ef_decay: float = 1.0  # the carried residual is multiplied by this first (SparseLoCo's beta; 1 = plain EF)
    sync_stride: int = 1  # S: each round averages every S-th value of its fragment, in turn (core/round_subset.py)
    # the weight of each member's outer gradient in the mean: "tokens" it trained since its last round, "uniform",
    # or "per_token": tokens, the outer gradient first scaled to a full period's tokens (README: Unequal peers)
    weighting: str = "tokens"
    aggregation: str = "mean"  # how reducers combine contributions: mean, clip or trimmed (core/aggregation.py)
    audit: float = 0.0  # chance that a member recomputes another reducer's part of a round (swarm/audit.py)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "inner_betas", tuple(self.inner_betas))
        self._check()

    @property
    def total_fragments(self) -> int:
        return self.fragments + 1 if self.fragments > 0 else 1

    def offsets(self) -> list[int]:
        """Sync offset of each fragment, spread evenly over H, all in [1, H].

        Fragment k syncs after inner steps t >= o_k with (t - o_k) % H == 0, so
        every fragment syncs once in the first H steps, in order.
        """
        n = self.total_fragments
        return [((k + 1) * self.outer_period) // n for k in range(n)]

    def _check(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("outer_period", "fragments", "tau", "warmup_steps", "total_steps", "seed", "sync_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
        for name in ("alpha", "outer_lr", "outer_momentum", "inner_lr", "inner_weight_decay",
                     "min_lr_ratio", "grad_clip", "ef_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.outer_period < 1:
            raise bad("outer_period", "H must be at least 1 inner step")
        if self.fragments < 0:
            raise bad("fragments", "cannot be negative (0 = the whole model is one fragment)")
        if self.total_fragments > self.outer_period:
            raise bad("fragments", f"{self.total_fragments} fragments cannot have distinct sync offsets "
                                   f"within outer_period={self.outer_period}")
        if self.tau < 0:
            raise bad("tau", "the overlap delay cannot be negative")
        spacing = self.outer_period // self.total_fragments
        if self.tau >= spacing:
            raise bad("tau", f"must be < H/(P+1) = {self.outer_period}/{self.total_fragments} -> {spacing}, "
                             "so that a fragment's average lands before its next round and at most one "
                             "fragment is in flight at a time")
        if self.max_delay is not None:
            if isinstance(self.max_delay, bool) or not isinstance(self.max_delay, int):
                raise bad("max_delay", "must be an integer (inner steps)")
            if not self.tau <= self.max_delay <= self.outer_period - 1:
                raise bad("max_delay", f"must lie in tau..H - 1 = {self.tau}..{self.outer_period - 1}: a mean lands "
                                       "tau steps after its round's start at the earliest and before the fragment's "
                                       "next round at the latest")
        if not 0.0 <= self.alpha <= 1.0:
            raise bad("alpha", "the merge weight must lie in [0, 1]")
        if self.outer_lr <= 0:
            raise bad("outer_lr", "must be > 0")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise bad("outer_momentum", "must lie in [0, 1)")
        if self.inner_lr <= 0:
            raise bad("inner_lr", "must be > 0")
        if self.inner_weight_decay < 0:
            raise bad("inner_weight_decay", "must be >= 0")
        if (len(self.inner_betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.inner_betas)):
            raise bad("inner_betas", "must be two numbers in [0, 1)")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.total_steps < 1:
            raise bad("total_steps", "must be >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must lie in [0, 1]")
        if self.grad_clip < 0:
            raise bad("grad_clip", "must be >= 0 (0 disables clipping)")
        if self.codec not in CODEC_NAMES + (AUTO_CODEC,):
            raise bad("codec", f"unknown codec; choose one of {', '.join(CODEC_NAMES + (AUTO_CODEC,))}")
        if not isinstance(self.error_feedback, bool):
            raise bad("error_feedback", "must be true or false")
        if not 0.0 < self.ef_decay <= 1.0:
            raise bad("ef_decay", "must lie in (0, 1]")
        if self.ef_decay != 1.0 and not self.error_feedback:
            raise bad("ef_decay", "decays the error-feedback residual: set error_feedback too")
        if not 1 <= self.sync_stride <= 64:
            raise bad("sync_stride", "must lie in [1, 64] (1: every round averages the whole fragment)")
        if self.inner_optimizer not in INNER_OPTIMIZERS:
            raise bad("inner_optimizer", f"choose one of {', '.join(INNER_OPTIMIZERS)}")
        if self.overlap not in OVERLAPS:
            raise bad("overlap", f"choose one of {', '.join(OVERLAPS)}")
        if self.weighting not in WEIGHTINGS:
            raise bad("weighting", f"choose one of {', '.join(WEIGHTINGS)}")
        if self.aggregation not in AGGREGATIONS:
            raise bad("aggregation", f"choose one of {', '.join(AGGREGATIONS)} (core/aggregation.py)")
        if isinstance(self.audit, bool) or not isinstance(self.audit, (int, float)) or not 0.0 <= self.audit <= 1.0:
            raise bad("audit", "must be a probability in [0, 1]")
        if self.error_feedback and self.codec == AUTO_CODEC:
            raise bad("error_feedback", "needs a fixed codec (its residual is what that codec loses), not auto")

    def replace(self, **changes: Any) -> "DiLoCoConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inner_betas"] = list(self.inner_betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiLoCoConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as e:  # e.g. a tuple field given a scalar
            raise ConfigError(str(e)) from e

