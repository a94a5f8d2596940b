"""The hash peers publish and compare for a fragment's global state."""

from __future__ import annotations

import hashlib

import torch


def state_hash(anchor: torch.Tensor, momentum: torch.Tensor) -> str:
    """The sha256 peers publish for a fragment's global state (anchor, then momentum, fp32 bytes)."""
    h = hashlib.sha256(anchor.detach().contiguous().numpy().tobytes())
    h.update(momentum.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
