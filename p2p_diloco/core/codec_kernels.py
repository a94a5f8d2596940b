"""The per-block loops of the int2, sign1, top4 and top16 codecs, compiled (numba).

`codecs` defines these formats and has vectorized torch/numpy code for them that makes ten or more passes over
each chunk; a kernel here makes one pass over a block while it sits in registers and L1, which is what takes
them past 1 GB/s on one core (`scripts/bench_codecs.py`). The payloads and decoded values are the same bit for
bit: every step is the same fp32 operation with the same rounding as the module docstring of `codecs` defines
(the codec tests run both paths against the scalar reference). Bad input is left to `codecs` to name: a block
whose values are not finite gets a NaN scale, a block with 0 < absmax < 2^-100 (int2, sign1) a NaN scale to be
encoded again prescaled, and a decoder that finds a malformed block returns its number.

Compiled on first use (a second or two per kernel) and cached beside this file, or under NUMBA_CACHE_DIR where
that is not writable. `codecs` uses its own code where numba is missing, P2P_DILOCO_CODEC_KERNELS=0, or these
kernels fail its check on first use (`codecs._kernels_problem`: the same bytes as its own code, or not used).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["mean_scaled_encode", "int2_decode", "sign1_decode", "topk_encode", "topk_decode"]

_F = np.float32
_ZERO, _ONE, _SEVEN, _INF, _NAN = _F(0), _F(1), _F(7), _F(np.inf), _F(np.nan)
_65536, _1_5, _1_875, _2_TO_MINUS_23, _TINY = _F(65536), _F(1.5), _F(1.875), _F(2.0**-23), _F(2.0**-100)

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def mean_scaled_encode(x, scales, codes, int2):
    """Blocks of 128 of `x` (fp32, a multiple of 128 long) -> `scales` (one per block) and packed `codes` (int2:
    four per byte; else sign1: eight per byte), the first in the lowest bits."""
    per_byte = 4 if int2 else 8
    for b in range(x.size // 128):
        base = b * 128
        a = _ZERO
        finite = True
        for i in range(128):
            v = abs(x[base + i])
            a = v if v > a else a
            finite &= v <= _INF  # (NaN compares false)
        if not finite or a == _INF or (a > _ZERO and a < _TINY):
            scales[b] = _NAN  # refused, or encoded again prescaled (`codecs`)
            continue
        inv = _65536 / (a if a > _ZERO else _ONE)
        total = 0  # S: integers 0..65536, exact in any order
        for i in range(128):
            total += np.int32(np.rint(abs(x[base + i]) * inv))
        m = (_F(total) * _2_TO_MINUS_23) * a
        out = base // per_byte
        if int2:
            s = m * _1_875
            s = a if s > a else s
            scales[b] = s
            y_scale = _1_5 / (s if s > _ZERO else _ONE)
            for j in range(32):
                byte = 0
                for t in range(4):
                    y = x[base + 4 * j + t] * y_scale
                    byte |= (np.int32(y >= -1.0) + np.int32(y >= 0.0) + np.int32(y >= 1.0)) << (2 * t)
                codes[out + j] = byte
        else:
            scales[b] = m
            for j in range(16):
                byte = 0
                for t in range(8):
                    byte |= np.int32(np.signbit(x[base + 8 * j + t])) << t
                codes[out + j] = byte


@_jit
def int2_decode(codes, scales, table, out):
    """Packed int2 codes -> `out` = level * block scale; `table`: byte -> its four levels (fp32)."""
    for b in range(scales.size):
        s = scales[b]
        for j in range(32):
            c = codes[b * 32 + j]
            o = b * 128 + 4 * j
            out[o] = table[c, 0] * s
            out[o + 1] = table[c, 1] * s
            out[o + 2] = table[c, 2] * s
            out[o + 3] = table[c, 3] * s


@_jit
def sign1_decode(codes, scales, table, out):
    """Packed sign1 bits -> `out` = level * block scale; `table`: byte -> its eight levels (fp32)."""
    for b in range(scales.size):
        s = scales[b]
        for j in range(16):
            c = codes[b * 16 + j]
            o = b * 128 + 8 * j
            for t in range(8):
                out[o + t] = table[c, t] * s


@_jit
def topk_encode(x, bits, k, scales, index, codes):
    """Blocks of 256 of `x` (fp32; `bits`: the same memory as int32) -> the k largest keys' positions ascending
    (`index`, rows of k), the scale, and the nibbles (`codes`, rows of k/2)."""
    keys = np.empty(256, dtype=np.int32)
    kept = np.empty(k, dtype=np.int32)
    for b in range(scales.size):
        base = b * 256
        for i in range(256):
            keys[i] = (bits[base + i] & np.int32(0x7FFFFF00)) | np.int32(255 - i)
        for j in range(k):  # k passes of a row max (vectorized), each winner's key then set below every key
            m = np.int32(-1)
            for i in range(256):
                m = keys[i] if keys[i] > m else m
            p = np.int32(255) - (m & np.int32(255))
            keys[p] = np.int32(-1)
            t = j  # kept in ascending position
            while t > 0 and kept[t - 1] > p:
                kept[t] = kept[t - 1]
                t -= 1
            kept[t] = p
        s = _ZERO
        finite = True
        for j in range(k):
            index[b, j] = kept[j]
            v = abs(x[base + kept[j]])
            s = v if v > s else s
            finite &= v <= _INF
        if not finite or s == _INF:
            scales[b] = _NAN  # refused by `codecs`
            continue
        scales[b] = s
        d = s if s > _ZERO else _ONE
        for j in range(0, k, 2):
            low = np.int32(np.rint((x[base + kept[j]] / d) * _SEVEN)) + 8
            high = np.int32(np.rint((x[base + kept[j + 1]] / d) * _SEVEN)) + 8
            codes[b, j >> 1] = low | (high << 4)


@_jit
def topk_decode(scales, index, codes, values, out, numel):
    """A top-k payload -> `out` (`numel` values, all zero on entry): nibble value * scale at each kept position.
    Returns 0, or 1 + the first block whose indices do not strictly increase, that holds nibble 0, or a nonzero
    value past the end."""
    k = index.shape[1]
    for b in range(scales.size):
        base = b * 256
        s = scales[b]
        previous = -1
        for j in range(k):
            p = np.int32(index[b, j])
            c = np.int32(codes[b, j >> 1])
            nibble = (c >> 4) if j & 1 else (c & 15)
            if p <= previous or nibble == 0 or (base + p >= numel and nibble != 8):
                return b + 1
            previous = p
            if base + p < numel:
                out[base + p] = values[nibble] * s
    return 0
