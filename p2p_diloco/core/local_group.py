"""`LocalGroup`: a swarm of averaging members inside one process (tests, the simulator).

It reproduces what a butterfly all-reduce puts on the wire: the vector is cut
into one part per member (at codec block boundaries); every member's
contribution to a part is encoded, decoded and accumulated in fp32 weighted by
its tokens (capped, and combined by the run's `Aggregation`: a part is one piece, where the swarm's reducer
combines chunk by chunk); the part's mean is encoded once more (in the codec's `mean_codec`: the same
codec except for sparse formats) and every member (its reducer included) takes the decoded mean, so all members hold bit-identical results.
Bytes are counted from the encoded payloads a member sends and receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .aggregation import Aggregation, cap_weights
from .averaging import AveragingFailed, FragmentAverage, FragmentAverager, PendingAverage, RoundKey
from .codecs import Codec
from .parts import butterfly_parts


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
    member miss a round (its result fails, the others average without it); `split(key, member)` puts the members
    of a round into separate groups (those with the same value average together: a swarm whose round formed two
    groups, replayed), one group by default.
    """

    def __init__(self, size: int, codec: Codec,
                 fail: Callable[[RoundKey], bool] | None = None,
                 absent: Callable[[RoundKey, int], bool] | None = None, aggregation: Aggregation | None = None,
                 split: Callable[[RoundKey, int], int] | None = None):
        self.size = size
        self.codec = codec
        self.aggregation = aggregation or Aggregation()
        self.refused = [0] * size  # parts of each member's contributions left out as outliers
        self._fail = fail or (lambda key: False)
        self._absent = absent or (lambda key, member: False)
        self._split = split or (lambda key, member: 0)
        self._rounds: dict[tuple[RoundKey, int], _Round] = {}
        self.bytes_sent = [0] * size
        self.bytes_received = [0] * size

    def member(self, index: int) -> FragmentAverager:
        return _LocalMember(self, index)

    def _begin(self, member: int, key: RoundKey, grad: torch.Tensor, weight: float) -> PendingAverage:
        rnd = self._rounds.setdefault((key, self._split(key, member)), _Round())
        if rnd.outcome is not None:
            raise AveragingFailed(f"{key}: member {member} began after the round was reduced")
        rnd.waiting.add(member)
        if not self._absent(key, member):
            rnd.contributions[member] = (grad.detach().to(torch.float32).reshape(-1).clone(), float(weight))
        return _LocalPending(self, member, key)

    def _result(self, member: int, key: RoundKey) -> FragmentAverage:
        where = (key, self._split(key, member))
        rnd = self._rounds[where]
        if rnd.outcome is None:
            rnd.outcome = self._reduce(key, rnd)
            rnd.members = frozenset(rnd.contributions)
            rnd.contributions.clear()  # the inputs are not needed once reduced
        rnd.waiting.discard(member)
        if not rnd.waiting:
            del self._rounds[where]
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
        weights = cap_weights([rnd.contributions[m][1] for m in members], self.aggregation.weight_cap)
        total_weight = sum(weights)
        if not total_weight > 0:
            return AveragingFailed(f"{key}: total weight {total_weight} is not positive")
        codec = self.codec
        mean = torch.empty(numel, dtype=torch.float32)
        parts = butterfly_parts(numel, len(members), codec.block_size)
        for owner, (lo, hi) in zip(members, parts):
            if hi <= lo:
                continue
            decoded = []
            for m in members:
                payload = codec.encode(rnd.contributions[m][0][lo:hi])
                if m != owner:
                    self.bytes_sent[m] += len(payload)
                    self.bytes_received[owner] += len(payload)
                decoded.append(codec.decode(payload, hi - lo))
            acc, refused = self.aggregation.combine(decoded, weights)
            for i in refused:
                self.refused[members[i]] += 1
            reduced = codec.mean_codec.encode(acc)
            for m in members:
                if m != owner:
                    self.bytes_sent[owner] += len(reduced)
                    self.bytes_received[m] += len(reduced)
            mean[lo:hi] = codec.mean_codec.decode(reduced, hi - lo)
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
