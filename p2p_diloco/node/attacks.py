"""Attacks: a peer made malicious on purpose, with the project's own code, to test what honest peers withstand.

`P2P_DILOCO_ATTACK=SPEC` in a peer's environment (the simulator: `SimSettings.attack` for its last worker)
makes that peer lie in every round it takes part in. Unset, nothing changes. The attacks:
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the tensors come from the caller: `join` reads the armed attack without importing torch)
    import torch

ENV = "P2P_DILOCO_ATTACK"

KINDS = {
    "scale": "scale:F — its outer gradient is sent multiplied by F (e.g. 1000)",
    "flip": "flip — its outer gradient is sent sign-flipped",
    "weight": "weight:W — it declares W tokens behind every outer gradient (e.g. 1e9)",
    "lie": "lie — as a reducer it returns its group the negated mean of its part (its commitments honest)",
    "unadmitted": "unadmitted — it takes part in an admission-only run though its --token (if any) does not admit it",
    "flood": "flood — it floods the other peers' averagers with oversized messages, streams and DHT pings",
}
__doc__ += "".join(f"\n  {what}." for what in KINDS.values())


class AttackError(ValueError):
    pass


@dataclass(frozen=True)
class Attack:
    kind: str
    value: float = 0.0

    def poison(self, outer_grad: torch.Tensor, weight: float) -> tuple[torch.Tensor, float]:
        """What this peer sends instead of (`outer_grad`, `weight`)."""
        if self.kind == "scale":
            return outer_grad * self.value, weight
        if self.kind == "flip":
            return -outer_grad, weight
        if self.kind == "weight":
            return outer_grad, self.value
        return outer_grad, weight


def parse(spec: str | None) -> Attack | None:
    """`KIND[:VALUE]` -> Attack; None or "" -> None; anything else is an error naming the problem."""
    if not spec:
        return None
    kind, _, value = spec.partition(":")
    if kind not in KINDS:
        raise AttackError(f"{ENV}={spec!r}: unknown attack {kind!r}; known: {', '.join(KINDS)}")
    if kind in ("flip", "unadmitted", "lie", "flood"):
        if value:
            raise AttackError(f"{ENV}={spec!r}: {kind} takes no value")
        return Attack(kind)
    try:
        number = float(value)
    except ValueError:
        raise AttackError(f"{ENV}={spec!r}: {kind} needs a number, as in {KINDS[kind].split(' ')[0]}") from None
    if not math.isfinite(number) or number <= 0:
        raise AttackError(f"{ENV}={spec!r}: the value must be a finite number > 0")
    return Attack(kind, number)


def armed() -> Attack | None:
    """The attack set in this process's environment (validated)."""
    return parse(os.environ.get(ENV))
