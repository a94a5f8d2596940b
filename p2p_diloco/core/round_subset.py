"""Which values of a fragment one round averages, when a round averages only a share of them.

With `sync_stride` S > 1, round r of a fragment averages every S-th value of it, starting at value r mod S:
S consecutive rounds cover every value exactly once, and every member of a group knows the same subset
from the round's key alone, so no index travels and the mean is as small as each contribution (unlike a
top-k payload, whose union over members grows with the group). The values a round leaves out are not
reset: they keep training locally, and their progress goes out, whole, in the round that covers them.

With error feedback, a value's residual is carried (and decayed by `ef_decay`) only in the rounds that
cover it. Token weights stay per fragment (a round's weight is the tokens since the fragment's last round,
though the values it sends carry up to S rounds of progress): only their ratios across members matter.

The subset has a fixed size for a fragment (ceil(n / S)); when fewer values remain from the round's
offset, one zero pads the end, so a swarm's averager keeps one tensor size per fragment. The pad is
nobody's progress and is dropped from the mean.
"""

from __future__ import annotations

import torch


def subset_size(numel: int, stride: int) -> int:
    """Values one round of a fragment of `numel` values averages (the pad included)."""
    return -(-numel // stride)


def subset_slice(stride: int, round_: int) -> slice:
    """The fragment's values round `round_` averages."""
    return slice(round_ % stride, None, stride)


def gather(values: torch.Tensor, stride: int, round_: int) -> torch.Tensor:
    """The round's subset of a flat fragment, padded with zeros to `subset_size`."""
    picked = values[subset_slice(stride, round_)]
    size = subset_size(values.numel(), stride)
    if picked.numel() == size:
        return picked.clone()
    return torch.cat([picked, picked.new_zeros(size - picked.numel())])


def rounds_mask(numel: int, stride: int, rounds: range) -> torch.Tensor | None:
    """The values the rounds `rounds` cover together, as a boolean mask; None: all of them."""
    if stride == 1 or len(rounds) >= stride:
        return None
    mask = torch.zeros(numel, dtype=torch.bool)
    for r in rounds:
        mask[subset_slice(stride, r)] = True
    return mask


def covered(numel: int, stride: int, round_: int) -> int:
    """How many of the subset's values are the fragment's own (the rest is pad)."""
    return len(range(round_ % stride, numel, stride))
