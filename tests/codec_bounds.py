"""The codecs' per-element error bounds of `p2p_diloco.core.codecs`' docstring, in float64 (test helper)."""

from __future__ import annotations

import numpy as np

SLOP_REL, SLOP_ABS = 2.0**-20, 2.0**-140  # float rounding of the scale arithmetic


F32 = np.float32
MEAN_SCALED = ("int2", "sign1")


def mean_scaled_block(name: str, block) -> tuple[F32, F32, list[F32]]:
    """(stored scale, scale the codes are chosen with, the block as prescaled) of an int2 / sign1 block, step by
    step as the module docstring defines them, in float32 scalars (one rounding per operation)."""
    a = max((abs(F32(v)) for v in block), default=F32(0))
    factor = F32(2.0**64) if 0 < a < 2.0**-100 else F32(1)
    values, a = [F32(F32(v) * factor) for v in block], F32(a * factor)
    inv = F32(65536) / a if a > 0 else F32(65536)
    total = sum(round(float(abs(F32(v * inv)))) for v in values)  # Python round: half to even, as torch.round
    m = F32(F32(F32(total) * F32(2.0**-23)) * a)
    s = min(F32(m * F32(1.875)), a) if name == "int2" else m
    stored = s if factor == 1 else F32(s * F32(F32(1) / factor))
    return stored, s, values


SPARSE_K = {"top4": 4, "top16": 16}


def topk_block(k: int, block) -> tuple[list[int], F32]:
    """(kept positions ascending, scale) of one top-k block of at most 256 values, as the module docstring defines
    them: zero-padded to 256, key = |x|'s bits with the lowest 8 replaced by 255 - position, the k largest kept."""
    padded = [F32(v) for v in block] + [F32(0)] * (256 - len(block))
    keys = [(int(np.abs(v).view(np.int32)) & 0x7FFFFF00) | (255 - i) for i, v in enumerate(padded)]
    kept = sorted(sorted(range(256), key=lambda i: keys[i], reverse=True)[:k])
    return kept, max((abs(padded[i]) for i in kept), default=F32(0))


def error_bound(name: str, values: np.ndarray) -> np.ndarray:
    """Per-element |x - q| bound of the module docstring (float64)."""
    x = np.abs(values.astype(np.float64))
    if name == "fp32":
        return np.zeros_like(x)
    if name == "fp16":
        return np.maximum(x * 2.0**-11, 2.0**-25)
    if name in SPARSE_K:
        bound = x.copy()  # a dropped value comes back as 0
        for start in range(0, len(values), 256):
            kept, scale = topk_block(SPARSE_K[name], values[start:start + 256])
            for i in kept:
                if start + i < len(x):
                    bound[start + i] = float(scale) / 14 + (x[start + i] + float(scale)) * SLOP_REL + SLOP_ABS
        return bound
    padded = np.zeros(-(-len(x) // 128) * 128)
    padded[: len(x)] = x
    if name in MEAN_SCALED:
        scales = [float(mean_scaled_block(name, values[i:i + 128])[0]) for i in range(0, len(values), 128)]
        s = np.repeat(np.array(scales, dtype=np.float64), 128)[: len(x)]
    else:
        s = np.repeat(padded.reshape(-1, 128).max(axis=1), 128)[: len(x)]
    slop = (x + s) * SLOP_REL + SLOP_ABS
    if name == "int8":
        return s / 254 + slop
    if name == "int2":
        return np.maximum(s / 3, x - s) + slop
    if name == "sign1":
        return np.maximum(s, x - s) + slop
    return np.maximum(x / 3, s * 2.0**-7) + slop
