"""When each fragment's rounds happen: offsets spread over the outer period H.

Fragment k (offset o_k) starts round r after inner step o_k + r * H. Every
fragment syncs once in the first H steps, in order, so at most one fragment is
in flight at a time when tau < H / (P + 1) (the config checks that).
"""

from __future__ import annotations

from .config import DiLoCoConfig


class Schedule:
    def __init__(self, config: DiLoCoConfig):
        self.period = config.outer_period
        self.offsets = config.offsets()

    def round_at(self, fragment: int, step: int) -> int | None:
        """The round fragment `fragment` starts after inner step `step`, or None."""
        o, h = self.offsets[fragment], self.period
        if step >= o and (step - o) % h == 0:
            return (step - o) // h
        return None

    def due(self, step: int) -> list[tuple[int, int]]:
        """(fragment, round) of every round that starts after inner step `step`."""
        return [(k, r) for k in range(len(self.offsets)) if (r := self.round_at(k, step)) is not None]

    def next_round(self, fragment: int, step: int) -> int:
        """The first round of `fragment` that has not started by inner step `step`."""
        o = self.offsets[fragment]
        return 0 if step < o else (step - o) // self.period + 1

    def latest_round(self, fragment: int, step: int) -> int | None:
        """The latest round of `fragment` started by inner step `step` (None: none yet)."""
        o = self.offsets[fragment]
        return (step - o) // self.period if step >= o else None
