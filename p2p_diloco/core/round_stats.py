"""What became of a worker's rounds, per fragment: the counts a summary reports and a health watch reads."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @classmethod
    def empty(cls, fragments: int) -> "RoundStats":
        n = fragments
        return cls([0] * n, [0] * n, [0] * n, [0] * n, [0] * n, [0] * n)
