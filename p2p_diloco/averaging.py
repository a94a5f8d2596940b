"""The averaging interface the algorithm core talks to, and an in-process implementation.

The core asks one thing of the network: "average this fragment's outer gradient
with the peers on the same (run, fragment, round); give me back the fp32 mean and
how many peers it covers, or tell me it failed". `FragmentAverager` is that
contract; the hivemind swarm implements it over libp2p, and `LocalGroup` here
implements it inside one process for tests and the simulator.

`LocalGroup` reproduces what a butterfly all-reduce puts on the wire: the vector
is cut into one part per member (at codec block boundaries); every member's
contribution to a part is encoded, decoded and accumulated in fp32 weighted by
its tokens; the part's mean is encoded once more and every member (its reducer
included) takes the decoded mean, so all members hold bit-identical results.
Bytes are counted from the encoded payloads a member sends and receives.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from .codecs import Codec


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


def state_hash(anchor: torch.Tensor, momentum: torch.Tensor) -> str:
    """The sha256 peers publish for a fragment's global state (anchor, then momentum, fp32 bytes)."""
    h = hashlib.sha256(anchor.detach().contiguous().numpy().tobytes())
    h.update(momentum.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class RoundReport:
    """What the other peers report for one fragment: the latest round they hold and its state hashes."""

    round: int
    digests: dict[str, int]  # state hash -> how many other peers hold it

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

    def latest_agreed(self, fragment: int, upto: int) -> RoundReport | None:
        """The latest round <= `upto` of `fragment` that other peers report holding (None: none)."""
        return None


def block_aligned_parts(numel: int, fractions: list[float], block: int) -> list[tuple[int, int]]:
    """Cut [0, numel) by `fractions` (summing to 1) with inner boundaries on `block` multiples."""
    blocks = math.ceil(numel / block)
    bounds, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(min(numel, round(acc * blocks) * block))
    bounds.append(numel)
    for i in range(1, len(bounds)):
        bounds[i] = max(bounds[i], bounds[i - 1])
    return list(zip(bounds[:-1], bounds[1:]))


def butterfly_parts(numel: int, members: int, block: int) -> list[tuple[int, int]]:
    """Cut [0, numel) into `members` equal contiguous parts whose inner boundaries fall on `block` multiples."""
    return block_aligned_parts(numel, [1.0 / members] * members, block)


@dataclass
class _Round:
    contributions: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)
    members: frozenset[int] = frozenset()
    waiting: set[int] = field(default_factory=set)  # members that began and have not taken the result
    outcome: FragmentAverage | AveragingFailed | None = None


class LocalGroup:
    """A swarm of `size` members inside one process (tests, simulator).

    A round is reduced when the first member asks for its result, over the
    members that have begun it by then. `fail(key)` returning True makes that
    round fail for everyone (fault injection); `absent(key, member)` makes a
    member miss a round (its result fails, the others average without it).
    """

    def __init__(self, size: int, codec: Codec,
                 fail: Callable[[RoundKey], bool] | None = None,
                 absent: Callable[[RoundKey, int], bool] | None = None):
        self.size = size
        self.codec = codec
        self._fail = fail or (lambda key: False)
        self._absent = absent or (lambda key, member: False)
        self._rounds: dict[RoundKey, _Round] = {}
        self.bytes_sent = [0] * size
        self.bytes_received = [0] * size

    def member(self, index: int) -> FragmentAverager:
        return _LocalMember(self, index)

    def _begin(self, member: int, key: RoundKey, grad: torch.Tensor, weight: float) -> PendingAverage:
        rnd = self._rounds.setdefault(key, _Round())
        if rnd.outcome is not None:
            raise AveragingFailed(f"{key}: member {member} began after the round was reduced")
        rnd.waiting.add(member)
        if not self._absent(key, member):
            rnd.contributions[member] = (grad.detach().to(torch.float32).reshape(-1).clone(), float(weight))
        return _LocalPending(self, member, key)

    def _result(self, member: int, key: RoundKey) -> FragmentAverage:
        rnd = self._rounds[key]
        if rnd.outcome is None:
            rnd.outcome = self._reduce(key, rnd)
            rnd.members = frozenset(rnd.contributions)
            rnd.contributions.clear()  # the inputs are not needed once reduced
        rnd.waiting.discard(member)
        if not rnd.waiting:
            del self._rounds[key]
        if isinstance(rnd.outcome, AveragingFailed):
            raise rnd.outcome
        if member not in rnd.members:
            raise AveragingFailed(f"{key}: member {member} was not part of the group")
        return FragmentAverage(rnd.outcome.mean.clone(), rnd.outcome.peers, rnd.outcome.weight)

    def _reduce(self, key: RoundKey, rnd: _Round) -> FragmentAverage | AveragingFailed:
        if self._fail(key):
            return AveragingFailed(f"{key}: injected failure")
        members = sorted(rnd.contributions)
        if not members:
            return AveragingFailed(f"{key}: nobody contributed")
        numel = rnd.contributions[members[0]][0].numel()
        if any(rnd.contributions[m][0].numel() != numel for m in members):
            return AveragingFailed(f"{key}: members disagree on the fragment size")
        total_weight = sum(rnd.contributions[m][1] for m in members)
        if not total_weight > 0:
            return AveragingFailed(f"{key}: total weight {total_weight} is not positive")
        codec = self.codec
        mean = torch.empty(numel, dtype=torch.float32)
        parts = butterfly_parts(numel, len(members), codec.block_size)
        for owner, (lo, hi) in zip(members, parts):
            if hi <= lo:
                continue
            acc = torch.zeros(hi - lo, dtype=torch.float32)
            for m in members:
                payload = codec.encode(rnd.contributions[m][0][lo:hi])
                if m != owner:
                    self.bytes_sent[m] += len(payload)
                    self.bytes_received[owner] += len(payload)
                acc += codec.decode(payload, hi - lo) * (rnd.contributions[m][1] / total_weight)
            reduced = codec.encode(acc)
            for m in members:
                if m != owner:
                    self.bytes_sent[owner] += len(reduced)
                    self.bytes_received[m] += len(reduced)
            mean[lo:hi] = codec.decode(reduced, hi - lo)
        return FragmentAverage(mean, len(members), total_weight)


class _LocalMember(FragmentAverager):
    def __init__(self, group: LocalGroup, index: int):
        self.group = group
        self.index = index

    def begin(self, key: RoundKey, outer_grad: torch.Tensor, weight: float) -> PendingAverage:
        return self.group._begin(self.index, key, outer_grad, weight)


class _LocalPending(PendingAverage):
    def __init__(self, group: LocalGroup, member: int, key: RoundKey):
        self.group, self.member, self.key = group, member, key

    def result(self) -> FragmentAverage:
        return self.group._result(self.member, self.key)
