"""The codecs' per-element error bounds of `p2p_diloco.core.codecs`' docstring, in float64 (test helper)."""

from __future__ import annotations

import numpy as np

SLOP_REL, SLOP_ABS = 2.0**-20, 2.0**-140  # float rounding of the scale arithmetic


def error_bound(name: str, values: np.ndarray) -> np.ndarray:
    """Per-element |x - q| bound of the module docstring (float64)."""
    x = np.abs(values.astype(np.float64))
    if name == "fp32":
        return np.zeros_like(x)
    if name == "fp16":
        return np.maximum(x * 2.0**-11, 2.0**-25)
    padded = np.zeros(-(-len(x) // 128) * 128)
    padded[: len(x)] = x
    s = np.repeat(padded.reshape(-1, 128).max(axis=1), 128)[: len(x)]
    slop = (x + s) * SLOP_REL + SLOP_ABS
    if name == "int8":
        return s / 254 + slop
    return np.maximum(x / 3, s * 2.0**-7) + slop
