"""The averaging interface the algorithm core talks to.

The core asks one thing of the network: "average this fragment's outer gradient
with the peers on the same (run, fragment, round); give me back the fp32 mean and
how many peers it covers, or tell me it failed". `FragmentAverager` is that
contract, plus three questions about the swarm's agreed state (what it holds,
what this peer now holds, hand it over). The hivemind swarm implements it over
libp2p (`swarm/averager.py`); `local_group.LocalGroup` implements it inside one
process for tests and the simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoundKey:
    """Which averaging this is: peers only ever average with the same key."""

    run_id: str
    fragment: int
    round: int

    def __str__(self) -> str:
        return f"{self.run_id}/fragment{self.fragment}/round{self.round}"


@dataclass
class FragmentAverage:
    mean: torch.Tensor  # flat fp32 weighted mean of the members' outer gradients
    peers: int  # how many peers the mean covers
    weight: float  # total weight (tokens) the mean covers
    members: tuple[str, ...] = ()  # who they were (peer ids), where the averager knows them


class AveragingFailed(RuntimeError):
    """The round produced no complete, trustworthy average; nothing of it may be applied."""


class PendingAverage(ABC):
    @abstractmethod
    def result(self) -> FragmentAverage:
        """Wait for the average; raise AveragingFailed if there is none to apply."""

    def done(self) -> bool:
        """True when `result()` would return (or raise) without waiting."""
        return True


@dataclass
class AgreedState:
    """A fragment's global state after a round, as the peers that applied it hold it."""

    anchor: torch.Tensor
    momentum: torch.Tensor


ADOPT_QUORUM = 2  # distinct other peers that must hold a state before this peer adopts it


@dataclass(frozen=True)
class RoundReport:
    """What the other peers report for one fragment: the latest round they hold and its state hashes."""

    round: int
    digests: dict[str, int]  # state hash -> how many other peers hold it
    voters: int | None = None  # other peers reporting on this fragment at all; None: unknown (those of this round)

    def quorum(self) -> int:
        """Votes a state needs before this peer adopts it: ADOPT_QUORUM distinct other peers, or every other peer
        when fewer report at all. Every applied round was applied by a group of at least two, so an honest state
        has two holders; a single peer publishing a round of its own making (a zeroed model, say) is one voice
        and makes nobody adopt it."""
        return min(ADOPT_QUORUM, self.voters if self.voters is not None else sum(self.digests.values()))

    def agreed(self, own: str | None = None, quorum: int | None = None) -> str | None:
        """The state to hold for this round: the majority (this peer's `own` vote included) when it is `own` or
        has a quorum (`quorum`, else `self.quorum()`); else `own` (None when this peer holds no state of this
        round)."""
        winner = self.majority(own)
        needed = self.quorum() if quorum is None else quorum
        return winner if winner == own or self.digests.get(winner, 0) >= needed else own

    def majority(self, own: str | None = None) -> str:
        """The swarm's state for this round, this peer's own vote included; ties go to the smallest hash."""
        votes = dict(self.digests)
        if own is not None:
            votes[own] = votes.get(own, 0) + 1
        return min(votes, key=lambda d: (-votes[d], d))


class FragmentAverager(ABC):
    @abstractmethod
    def begin(self, key: RoundKey, outer_grad: torch.Tensor, weight: float) -> PendingAverage:
        """Start averaging `outer_grad` (flat fp32) for `key`; return at once."""

    def applied(self, key: RoundKey, anchor: torch.Tensor, momentum: torch.Tensor, digest: str) -> None:
        """This peer now holds the state of `key` hashing to `digest` (to publish, and serve to peers that need it)."""

    def recover(self, key: RoundKey, digest: str | None = None) -> AgreedState | None:
        """The state of `key` other peers hold (the one hashing to `digest`, else their most common), verified.

        None when no peer can hand it over (after a failed or missed round, or a disagreement).
        """
        return None

    def fetch(self, key: RoundKey, digest: str | None = None) -> Future:
        """`recover` without holding up training: a future of its result. Here it runs at once; the swarm's
        averager downloads in the background (a fragment's state takes seconds over a slow link)."""
        future: Future = Future()
        try:
            future.set_result(self.recover(key, digest))
        except Exception as e:
            future.set_exception(e)
        return future

    def latest_agreed(self, fragment: int, upto: int) -> RoundReport | None:
        """The latest round <= `upto` of `fragment` that other peers report holding (None: none)."""
        return None
