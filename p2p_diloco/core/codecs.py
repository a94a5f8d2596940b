"""Quantization codecs for outer-gradient payloads sent over the network.

A codec turns a float tensor into self-describing bytes and back. ``encode`` takes
any shape of fp32/fp16/bf16 (contiguous or not) and flattens it; ``decode`` returns a
1-D fp32 tensor of the expected length **or raises CodecError** -- it never returns
garbage. Everything is dequantized to fp32; accumulation is the caller's business.

Wire format (every codec, all integers little endian)::

    offset  size  field
    0       2     magic  b"SD"
    2       1     version (1)
    3       1     format_id (table below)
    4       8     numel (uint64)
    12      4     CRC32 (zlib.crc32) of the payload = bytes [16:]
    16      ...   payload

Block formats (int8, fp4) split the flattened vector into blocks of 128 elements
(the last one zero-padded internally, never on the wire) and send the payload as
``[fp32 scale per block][codes]``; scale = block absmax. Blocks are independent, so
splitting a vector at multiples of ``block_size`` and encoding the parts decodes to
exactly the same values as encoding the whole.

Formats (one table, ``CODECS``); bytes per value exclude the 16-byte header.
Error bounds are per element; ``s`` is the element's block scale (block absmax),
``slop`` is float rounding of the scale arithmetic, ~2^-22 relative plus a few
subnormal ulps (2^-149) absolute:

=======  ==  ===============  ===================================================
name     id  bytes per value  |x - q| bound
=======  ==  ===============  ===================================================
fp32     1   4                0 (exact)
fp16     2   2                |x| * 2^-11 for |x| >= 2^-14 (normal range),
                              2^-25 below (subnormal spacing 2^-24 / 2);
                              |x| > 65504 rounding to inf -> CodecError on encode
int8     3   1 + 4/128        s/254 + slop   (q = round(127 * x/s) in [-127, 127])
fp4      4   0.5 + 4/128      max(|x|/3, s * 2^-7) + slop
int2     5   0.25 + 4/128     max(s/3, |x| - s) + slop   (s: a mean-magnitude scale)
sign1    6   0.125 + 4/128    max(s, |x| - s) + slop     (s: the mean magnitude)
top4     7   (4 + 4 + 2)/256  kept: s/14 + slop; dropped: |x| (q = 0)
top16    8   (4 + 16 + 8)/256 kept: s/14 + slop; dropped: |x| (q = 0)
=======  ==  ===============  ===================================================

top4 and top16 are sparse: of each block of **256** values they keep the k = 4 (16)
largest magnitudes (1.6 % / 6.25 %) and send ``[fp32 scale per block][k index bytes per
block][k/2 code bytes per block]``. Which k: each element's key is the int32 bit pattern of
|x| with its lowest 8 bits replaced by 255 - position (magnitudes within 2^-15 of each
other rank by the lower position; Inf and NaN rank above every finite value, so a
non-finite input is always kept and refused); the k largest keys are kept, their
positions sent in ascending order, one byte each. s = the largest kept |x| (the block
absmax), r = fp32(x / s) (one IEEE division: no tiny-scale rule needed), q =
round_half_even(fp32(7 r)) in -7..7, nibble q + 8 (so 0 is never written), two per byte,
the first slot in the low nibble; decode: fp32((nibble - 8) / 7) * s at the position,
0 elsewhere. A last block of L < 256 values is zero-padded; padding ranks below every
real value, so it is kept only when L < k, always with nibble 8. The weighted mean of
M k-sparse contributions is up to M*k sparse: a reducer sends it in the codec's
``mean_codec`` (top4's is top16: exact support for groups of up to 4; a larger group's
mean keeps its 16 largest per block), every other codec's is itself.

fp4 is E3M0: a nibble ``sign<<3 | k``; k = 0 is zero, k in 1..7 is 2^(k-7), so
``q = ±s * {0, 2^-6, ..., 2^-1, 1}``. Exactly: r = x * fp32(1/s) in fp32 (in a block
with 0 < s < 2^-100, where 1/s could overflow, x and s are first scaled by 2^64, which
is exact), then |r| is rounded to nearest in the linear domain: between 2^j and
2^(j+1) at 1.5*2^j (ties up), between 0 and 2^-6 at 2^-7 (ties up). Hence the bound:
just below/above 1.5*2^j the error is 0.5*2^j <= |r|/3, and below 2^-6 it is at most
2^-7 (in units of s). Zero encodes as nibble 0 (never -0); nibble 8 decodes to 0. Two
values per byte, element 2i in the low nibble; an odd count leaves the last high
nibble 0. int8 is q = round_half_even(x * fp32(127/s)) (same tiny-scale rule) and
decodes as fp32(q/127) * s, which cannot overflow.

int2 and sign1 scale a block by its *mean* magnitude, not its absmax (an absmax
scale would put most of a Gaussian block's values on the smallest level): with a the
block absmax, u_i = round_half_even(|x_i| * fp32(65536/a)) (integers 0..65536, so
their sum S is exact in any order: one result on every machine), m = fp32(fp32(S *
2^-23) * a), the mean |x| to 2^-16 of a. int2's scale is s = min(fp32(1.875 m), a)
(1.875 m is 1.5 sigma for Gaussian values: the 4-level quantizer's best step), its
levels s * {-1, -1/3, 1/3, 1}, code = clamp(floor(fp32(x * fp32(1.5/s))) + 2, 0, 3),
four codes per byte, the first in the lowest bits. sign1's scale is s = m, its levels +-s, bit = the sign bit of x (-0 is -s),
eight per byte, the first lowest. A
block with 0 < a < 2^-100 is first scaled by 2^64 (exact) and its stored scale is
fp32(s * 2^-64) (rounded where subnormal). Relative L2 error on Gaussian values: int2
0.33, sign1 0.62 (fp4: 0.19).

Decode rejects (CodecError naming the problem): a payload shorter than the header or
than ``wire_size`` ("truncated") or longer ("oversized"), bad magic, unknown version,
a payload of another format (naming it), a numel other than the expected one, a CRC
mismatch, NaN/Inf/negative scales, int8 code -128, non-finite fp32/fp16 values; for top4
and top16 also indices that do not strictly increase, nibble 0, and a nonzero value at a
padded position past the end.
Decoded int8/fp4 values are finite whenever the scales are (|code| <= 1 per scale).

Implementation: plain torch and numpy, vectorized; block formats run over chunks of
``_CHUNK`` elements with reused scratch buffers so every pass stays in cache and no
full-size temporaries are allocated. fp4 encode uses the fp32 bit pattern of r:
``(bits >> 22) + 512`` is sign/exponent/first-mantissa-bit, i.e. exactly the
linear rounding decision, looked up in a 1024-entry table; decode looks a packed
byte up in a 256-entry table of fp32 pairs and multiplies by the block scale.
int2 and sign1 do their per-block arithmetic and their codes in numpy (a call costs
less than torch's, and these codecs make many short ones): an int2 code is the sum
of three compares, four of them packed by one integer multiply; sign1's bits go
through ``np.packbits``; a block whose scale comes out below 2^-99 (or not finite)
is looked at again after the pass and, if tiny, encoded again prescaled. top4/top16
select by k passes of a row max over their keys (each winner's key then set to -1),
which costs a fraction of a per-row ``torch.topk``. Where numba is installed (a
dependency) these four formats run ``codec_kernels`` instead: the same steps fused into
one compiled pass per block, the same bytes and values to the bit, 2-3x faster; the
code here remains their fallback (P2P_DILOCO_CODEC_KERNELS=0, or no numba).
Scales and values are stored in host byte order, which must be little endian.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import warnings
import zlib
from abc import ABC, abstractmethod

import numpy as np
import torch

__all__ = ["CodecError", "Codec", "CODECS", "get_codec", "HEADER_SIZE", "MAGIC", "VERSION"]

if sys.byteorder != "little":  # pragma: no cover - payloads are defined little endian
    raise ImportError("p2p_diloco.core.codecs assumes a little-endian host")

MAGIC = b"SD"
VERSION = 1
_HEADER = struct.Struct("<2sBBQI")
HEADER_SIZE = _HEADER.size  # 16
_ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHUNK = 1 << 17  # elements per in-cache pass of the block codecs (multiple of 128)
_TOPK_CHUNK = 1 << 19  # ... and of the sparse ones' selection (k passes over it: fewer, longer calls; measured)


class CodecError(ValueError):
    """Raised for any invalid payload or input; message names the problem."""


class Codec(ABC):
    """Encode a float tensor to bytes and decode it back with validation.

    Guarantee: ``decode`` either returns a fresh 1-D fp32 tensor of exactly ``numel``
    finite values or raises CodecError; it never writes to the input buffer. Codecs are
    stateless and thread-safe (scratch buffers live for one call only).
    """

    name: str
    format_id: int
    block_size: int
    bits_per_value: float

    # ---- public API -------------------------------------------------------------
    def wire_size(self, numel: int) -> int:
        """Exact byte count of ``encode`` for ``numel`` elements, header included."""
        return HEADER_SIZE + self._payload_size(_check_numel(numel))

    def encode(self, x: torch.Tensor) -> bytes:
        flat = _flatten(x)
        numel = flat.numel()
        buf = _fresh(self.wire_size(numel), torch.uint8)
        payload = buf[HEADER_SIZE:]
        self._encode_payload(flat, payload)
        view = memoryview(buf.numpy())
        crc = zlib.crc32(view[HEADER_SIZE:])
        _HEADER.pack_into(view, 0, MAGIC, VERSION, self.format_id, numel, crc)
        return view.tobytes()

    def decode(self, data: bytes | bytearray | memoryview, numel: int) -> torch.Tensor:
        numel = _check_numel(numel)
        view = _as_byte_view(data)
        size = len(view)
        if size < HEADER_SIZE:
            raise CodecError(
                f"{self.name} payload truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        magic, version, format_id, header_numel, crc = _HEADER.unpack_from(view, 0)
        if magic != MAGIC:
            raise CodecError(f"bad magic {magic!r} (expected {MAGIC!r}): not a p2p_diloco codec payload")
        if version != VERSION:
            raise CodecError(f"unsupported codec version {version} (this decoder reads version {VERSION})")
        if format_id != self.format_id:
            other = _NAME_BY_ID.get(format_id, f"unknown format id {format_id}")
            raise CodecError(f"format mismatch: payload is {other}, decoder is {self.name}")
        if header_numel != numel:
            raise CodecError(f"numel mismatch: header says {header_numel}, expected {numel}")
        expected = self.wire_size(numel)
        if size != expected:
            kind = "truncated" if size < expected else "oversized"
            raise CodecError(f"{self.name} payload {kind}: {size} bytes, expected {expected} for numel={numel}")
        actual_crc = zlib.crc32(view[HEADER_SIZE:])
        if actual_crc != crc:
            raise CodecError(f"CRC mismatch: header {crc:#010x}, payload {actual_crc:#010x} (corrupted payload)")
        with warnings.catch_warnings():  # read-only buffer: we never write to it
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.frombuffer(view, dtype=torch.uint8, offset=HEADER_SIZE) if numel else _EMPTY_U8
        return self._decode_payload(payload, numel)

    @property
    def mean_codec(self) -> "Codec":
        """The codec a reducer sends the weighted mean of this codec's contributions in: the same one, except for
        sparse formats (the mean of several k-sparse vectors is up to group-size * k sparse)."""
        return self

    def prepare(self) -> None:
        """Load what this codec and its mean's codec run on now (their compiled kernels: a second or two the first
        time in a process), not in the middle of the first round that uses them."""
        for codec in (self, self.mean_codec):
            codec.roundtrip(torch.zeros(codec.block_size))

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """Same values as ``decode(encode(x), x.numel())`` without header, CRC or bytes copies."""
        flat = _flatten(x)
        payload = torch.empty(self._payload_size(flat.numel()), dtype=torch.uint8)
        self._encode_payload(flat, payload)
        return self._decode_payload(payload, flat.numel())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} id={self.format_id} {self.bits_per_value} bits/value>"

    # ---- per-format hooks ---------------------------------------------------------
    @abstractmethod
    def _payload_size(self, numel: int) -> int: ...

    @abstractmethod
    def _encode_payload(self, flat: torch.Tensor, payload: torch.Tensor) -> None:
        """Write the payload for 1-D float ``flat`` into uint8 ``payload``; CodecError if not finite."""

    @abstractmethod
    def _decode_payload(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """Validate and dequantize a CRC-checked uint8 payload to a fresh 1-D fp32 tensor."""


# ---- element formats ------------------------------------------------------------------


class Fp32Codec(Codec):
    name, format_id, block_size, bits_per_value = "fp32", 1, 1, 32.0

    def _payload_size(self, numel: int) -> int:
        return 4 * numel

    def _encode_payload(self, flat, payload):
        values = payload.view(torch.float32)
        values.copy_(flat)
        if not _all_finite(values):
            raise CodecError("input contains NaN or Inf")

    def _decode_payload(self, payload, numel):
        out = _fresh(numel)
        out.copy_(payload.view(torch.float32))
        if not _all_finite(out):
            raise CodecError("fp32 payload contains NaN or Inf")
        return out


class Fp16Codec(Codec):
    name, format_id, block_size, bits_per_value = "fp16", 2, 1, 16.0

    def _payload_size(self, numel: int) -> int:
        return 2 * numel

    def _encode_payload(self, flat, payload):
        values = payload.view(torch.float16)
        values.copy_(flat)
        if not _all_finite(values):
            if not _all_finite(flat):
                raise CodecError("input contains NaN or Inf")
            biggest = flat.abs().max().item()
            raise CodecError(f"input value {biggest:g} is beyond the fp16 range (max 65504) and would become inf")

    def _decode_payload(self, payload, numel):
        out = _fresh(numel)
        out.copy_(payload.view(torch.float16))
        if not _all_finite(out):
            raise CodecError("fp16 payload contains NaN or Inf")
        return out


# ---- block formats --------------------------------------------------------------------


class _BlockCodec(Codec):
    """Blockwise absmax scaling: payload = fp32 scale per block of 128, then codes."""

    block_size = 128
    code_bits: int

    def _payload_size(self, numel: int) -> int:
        blocks = -(-numel // self.block_size)
        return 4 * blocks + (numel * self.code_bits + 7) // 8

    def _code_bytes(self, numel: int) -> int:
        return (numel * self.code_bits + 7) // 8

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = -(-numel // self.block_size)
        return payload[: 4 * blocks].view(torch.float32), payload[4 * blocks :]

    def _encode_payload(self, flat, payload):
        numel = flat.numel()
        scales, codes = self._split(payload, numel)
        scratch = self._encode_scratch(min(numel, _CHUNK))
        full = numel - numel % self.block_size
        for start in range(0, full, _CHUNK):
            stop = min(start + _CHUNK, full)
            code_slice = codes[self._code_bytes(start) : self._code_bytes(stop)]
            self._encode_chunk(flat[start:stop], scales[start // 128 : stop // 128], code_slice, scratch)
        if full < numel:  # the last, partial block: zero-padded to a full one
            padded = torch.zeros(self.block_size, dtype=torch.float32)
            padded[: numel - full] = flat[full:]
            padded_codes = torch.empty(self._code_bytes(self.block_size), dtype=torch.uint8)
            self._encode_chunk(padded, scales[full // 128 :], padded_codes, scratch)
            codes[self._code_bytes(full) :] = padded_codes[: codes.numel() - self._code_bytes(full)]
        self._fix_tiny_blocks(flat, scales, codes)
        bad = ~torch.isfinite(scales)
        if bad.any():
            block = int(bad.nonzero()[0])
            raise CodecError(f"input contains NaN or Inf (first in block {block}, elements {block * 128}..)")

    def _fix_tiny_blocks(self, flat, scales, codes):
        """Blocks whose scale is below 2^-100 (1/scale could overflow): encode them again
        scaled up by 2^64, which is exact for every fp32 and leaves the stored scale as is."""
        tiny = (scales > 0) & (scales < _TINY_SCALE)
        if tiny.any():
            blocks = tiny.nonzero().flatten()
            self._encode_blocks(self._gather_blocks(flat, blocks) * _TINY_RESCALE, blocks, torch.empty(blocks.numel()),
                                codes)

    def _gather_blocks(self, flat, blocks):
        """The values of the blocks numbered `blocks`, one row each, zero-padded past the end."""
        position = blocks[:, None] * self.block_size + torch.arange(self.block_size)
        inside = position < flat.numel()
        src = torch.zeros(blocks.numel(), self.block_size, dtype=torch.float32)
        src[inside] = flat[position[inside]]
        return src

    def _encode_blocks(self, src, blocks, scales_out, codes):
        """Encode rows `src` (one block each) and write their codes over those of the blocks numbered `blocks`."""
        count, bytes_per_block = blocks.numel(), self._code_bytes(self.block_size)
        block_codes = torch.empty(count * bytes_per_block, dtype=torch.uint8)
        self._encode_chunk(src.view(-1), scales_out, block_codes, self._encode_scratch(count * self.block_size))
        code_position = blocks[:, None] * bytes_per_block + torch.arange(bytes_per_block)
        inside = code_position < codes.numel()
        codes[code_position[inside]] = block_codes.view(count, bytes_per_block)[inside]

    def _decode_payload(self, payload, numel):
        scales, codes = self._split(payload, numel)
        _check_scales(self.name, scales)
        self._check_codes(codes)
        out = _fresh(numel)
        scratch = self._decode_scratch(min(numel, _CHUNK))
        full = numel - numel % self.block_size
        for start in range(0, full, _CHUNK):
            stop = min(start + _CHUNK, full)
            code_slice = codes[self._code_bytes(start) : self._code_bytes(stop)]
            self._decode_chunk(code_slice, scales[start // 128 : stop // 128], out[start:stop], scratch)
        if full < numel:  # the last, partial block: codes zero-padded to a full one
            padded_codes = torch.zeros(self._code_bytes(self.block_size), dtype=torch.uint8)
            tail = codes[self._code_bytes(full) :]
            padded_codes[: tail.numel()] = tail
            padded_out = torch.empty(self.block_size, dtype=torch.float32)
            self._decode_chunk(padded_codes, scales[full // 128 :], padded_out, scratch)
            out[full:] = padded_out[: numel - full]
        return out

    def _check_codes(self, codes: torch.Tensor) -> None:
        """Reject code patterns no encoder produces (default: every pattern is valid)."""

    @abstractmethod
    def _encode_scratch(self, n: int) -> dict: ...

    @abstractmethod
    def _encode_chunk(self, src, scales_out, codes_out, scratch) -> None:
        """src: 1-D float, length a multiple of 128; writes len/128 scales and the codes."""

    @abstractmethod
    def _decode_scratch(self, n: int) -> dict: ...

    @abstractmethod
    def _decode_chunk(self, codes, scales, out, scratch) -> None:
        """codes for len(out) elements (multiple of 128) -> fp32 values into out."""


def _block_scales(blocks, scales_out, scratch, numerator: torch.Tensor) -> torch.Tensor:
    """scales_out = per-row absmax (NaN/Inf propagate); returns numerator / scale per row
    (numerator for all-zero rows; may overflow for scales below 2^-100: the caller redoes those)."""
    nb = blocks.shape[0]
    lo, inv = scratch["lo"][:nb], scratch["inv"][:nb]
    torch.amax(blocks, dim=1, out=scales_out)
    torch.amin(blocks, dim=1, out=lo)
    torch.maximum(scales_out, lo.neg_(), out=scales_out)
    torch.where(scales_out > 0, scales_out, _ONE, out=inv)
    torch.div(numerator, inv, out=inv)
    return inv


class Int8Codec(_BlockCodec):
    name, format_id, bits_per_value, code_bits = "int8", 3, 8.25, 8

    def _encode_scratch(self, n):
        n = -(-n // 128) * 128
        return {"r": torch.empty(n), "lo": torch.empty(n // 128), "inv": torch.empty(n // 128)}

    def _encode_chunk(self, src, scales_out, codes_out, scratch):
        n = src.numel()
        blocks = src.view(-1, 128)
        inv = _block_scales(blocks, scales_out, scratch, _127)
        r = scratch["r"][:n]
        torch.mul(blocks, inv[:, None], out=r.view(-1, 128))  # |r| <= 127 (+ rounding < 0.5)
        r.round_()
        codes_out.view(torch.int8).copy_(r)

    def _check_codes(self, codes):
        if codes.numel() and int(codes.view(torch.int8).min()) == -128:
            raise CodecError("int8 payload contains code -128 (valid codes are -127..127)")

    def _decode_scratch(self, n):
        return {}

    def _decode_chunk(self, codes, scales, out, scratch):
        torch.div(codes.view(torch.int8), 127.0, out=out)  # |q/127| <= 1: cannot overflow below
        out.view(-1, 128).mul_(scales[:, None])


def _fp4_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Encode table: (fp32 bits >> 22) + 512 -> nibble. Decode table: byte -> (lo, hi) fp32 pair as int64."""
    encode = torch.zeros(1024, dtype=torch.uint8)
    for index in range(1024):
        sign, magnitude = (index < 512), index % 512  # arithmetic shift: negative r gives index < 512
        exponent, half = magnitude >> 1, magnitude & 1  # biased exponent, first mantissa bit
        if exponent >= 127:
            k = 7  # r >= 1 (only r == 1 occurs)
        elif exponent >= 121:
            k = min(exponent - 120 + half, 7)  # 2^j or, from 1.5 * 2^j up, 2^(j+1)
        elif exponent == 120:
            k = 1  # r in [2^-7, 2^-6) -> 2^-6
        else:
            k = 0
        if exponent == 255:
            k = 0  # NaN/Inf never reach here (scales are checked), keep the table total
        encode[index] = (sign << 3 | k) if k else 0
    values = [0.0] + [2.0 ** (k - 7) for k in range(1, 8)]
    nibble = torch.tensor(values + [-v for v in values], dtype=torch.float32)
    nibble[8] = 0.0
    byte = torch.arange(256)
    pairs = torch.stack([nibble[byte & 15], nibble[byte >> 4]], dim=1).contiguous()
    return encode, pairs.view(torch.int64).view(256)


_FP4_ENCODE, _FP4_DECODE = _fp4_tables()
_FP4_ENCODE_X17 = _FP4_ENCODE * 17  # nibble in both halves of a byte (0..255), for packing


class Fp4Codec(_BlockCodec):
    name, format_id, bits_per_value, code_bits = "fp4", 4, 4.25, 4

    def _encode_scratch(self, n):
        n = -(-n // 128) * 128
        return {
            "r": torch.empty(n),
            "nib": torch.empty(n, dtype=torch.uint8),
            "lo": torch.empty(n // 128),
            "inv": torch.empty(n // 128),
        }

    def _encode_chunk(self, src, scales_out, codes_out, scratch):
        n = src.numel()
        blocks = src.view(-1, 128)
        inv = _block_scales(blocks, scales_out, scratch, _ONE)
        r = scratch["r"][:n]
        torch.mul(blocks, inv[:, None], out=r.view(-1, 128))  # |r| <= 1 (+ 1 ulp)
        index = r.view(torch.int32)
        torch.bitwise_right_shift(index, 22, out=index)
        index.add_(512)
        # table gives nibble*17 = nibble | nibble << 4; a little-endian int16 over two such
        # bytes (a, b), shifted right by 4, has low byte a | b << 4: the packed pair.
        nib = scratch["nib"][:n]
        torch.index_select(_FP4_ENCODE_X17, 0, index, out=nib)
        torch.bitwise_right_shift(nib.view(torch.int16), 4, out=codes_out)  # keeps the low byte

    def _decode_scratch(self, n):
        return {"index": torch.empty(-(-n // 128) * 64, dtype=torch.int32)}

    def _decode_chunk(self, codes, scales, out, scratch):
        index = scratch["index"][: codes.numel()]
        index.copy_(codes)
        torch.index_select(_FP4_DECODE, 0, index, out=out.view(torch.int64))
        out.view(-1, 128).mul_(scales[:, None])


class _MeanScaledCodec(_BlockCodec):
    """Block formats of 1 or 2 bits whose scale follows the block's mean magnitude, not its absmax (the module
    docstring: `a`, `S`, `m`, the prescale of tiny blocks, the stored scale)."""

    levels: tuple[float, ...]  # code -> value in units of the block scale

    def _scale(self, m: np.ndarray, a: np.ndarray) -> np.ndarray:
        """The block scale (fp32) from the mean magnitude `m` and the absmax `a`."""
        raise NotImplementedError

    def _codes(self, blocks: torch.Tensor, s: np.ndarray, scratch: dict, codes_out: torch.Tensor) -> None:
        """Write the packed codes of `blocks` (rows of 128) under scales `s` into `codes_out`."""
        raise NotImplementedError

    def _encode_scratch(self, n):
        n = -(-n // 128) * 128
        return {"r": torch.empty(n), "code": np.empty(n, dtype=np.uint8),
                "more": np.empty(n, dtype=np.bool_), "words": np.empty(n // 4, dtype=np.uint32)}

    def _encode_chunk(self, src, scales_out, codes_out, scratch):
        kernels = _kernels()
        if kernels is not None:
            kernels.mean_scaled_encode(src.numpy(), scales_out.numpy(), codes_out.numpy(), self.code_bits == 2)
            return
        # (the passes over the chunk in torch, the per-block arithmetic and the codes in numpy: the faster of the
        # two for each, measured)
        n = src.numel()
        blocks = src.view(-1, 128)
        r = scratch["r"][:n].view(-1, 128)
        a = torch.amax(torch.abs(blocks, out=r), dim=1).numpy()  # the block absmax (NaN propagates)
        with np.errstate(over="ignore", invalid="ignore"):  # (65536/a is inf where a < 2^-112: redone below)
            inv = np.divide(_65536_NP, np.where(a > 0, a, _ONE_NP))
            r.mul_(torch.from_numpy(inv)[:, None]).round_()  # u = round(65536 |x| / a) in 0..65536
            # S, the sum of integers below 2^24: exact in any order (one result on every machine)
            m = r.sum(dim=1).numpy() * _2_TO_MINUS_23 * a  # a * S / 2^23: the mean |x| to 2^-16 of a
            s = self._scale(m, a)
            self._codes(blocks, s, scratch, codes_out)
        scales_out.numpy()[:] = s

    def _fix_tiny_blocks(self, flat, scales, codes):
        """Blocks with 0 < a < 2^-100, encoded again with x and a times 2^64 (exact), their stored scale s * 2^-64
        (rounded where that is subnormal). Such a block's scale is below 2^-99, or NaN or Inf (65536/a overflowed);
        every other block's is at least a/128 >= 2^-107: those not in 2^-99..Inf are looked at again."""
        candidates = (~((scales >= 2.0**-99) & (scales < float("inf")))).nonzero().flatten()
        if not candidates.numel():
            return
        src = self._gather_blocks(flat, candidates)
        a = src.abs().amax(dim=1)
        tiny = (a > 0) & (a < _TINY_SCALE)
        if tiny.any():
            blocks = candidates[tiny]
            block_scales = torch.empty(blocks.numel())
            self._encode_blocks(src[tiny] * _TINY_RESCALE, blocks, block_scales, codes)
            scales[blocks] = block_scales * (_ONE / _TINY_RESCALE_T)

    def _decode_scratch(self, n):
        return {"index": torch.empty(self._code_bytes(-(-n // 128) * 128), dtype=torch.int32)}

    def _decode_chunk(self, codes, scales, out, scratch):
        kernels = _kernels()
        if kernels is not None:
            decode = kernels.int2_decode if self.code_bits == 2 else kernels.sign1_decode
            decode(codes.numpy(), scales.numpy(), self._table_np, out.numpy())
            return
        index = scratch["index"][: codes.numel()]
        index.copy_(codes)
        torch.index_select(self._table, 0, index, out=out.view(codes.numel(), -1))
        out.view(-1, 128).mul_(scales[:, None])


def _level_table(levels: tuple[float, ...], per_byte: int) -> torch.Tensor:
    """byte -> its `per_byte` codes' levels (fp32), the first code in the lowest bits."""
    bits = 8 // per_byte
    values = torch.tensor(levels, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([values[(byte >> (bits * i)) & ((1 << bits) - 1)] for i in range(per_byte)], dim=1)


class Int2Codec(_MeanScaledCodec):
    name, format_id, bits_per_value, code_bits = "int2", 5, 2.25, 2
    levels = (-1.0, -1.0 / 3, 1.0 / 3, 1.0)

    def _scale(self, m, a):
        return np.minimum(m * _1_875_NP, a)

    def _codes(self, blocks, s, scratch, codes_out):
        n = blocks.numel()
        inv = np.divide(_1_5_NP, np.where(s > 0, s, _ONE_NP))  # 1.5 / s
        y = torch.mul(blocks, torch.from_numpy(inv)[:, None], out=scratch["r"][:n].view(-1, 128)).numpy()
        # code = clamp(floor(y) + 2, 0, 3) = [y >= -1] + [y >= 0] + [y >= 1], one byte each
        y, code, more = y.reshape(-1), scratch["code"][:n], scratch["more"][:n]
        np.greater_equal(y, -1.0, out=code.view(np.bool_))
        np.greater_equal(y, 0.0, out=more)
        np.add(code, more.view(np.uint8), out=code)
        np.greater_equal(y, 1.0, out=more)
        np.add(code, more.view(np.uint8), out=code)
        # four codes c0..c3 in the bytes of a little-endian uint32 word w: the top byte of w * (2^24 + 2^18 + 2^12
        # + 2^6) mod 2^32 is c0 | c1 << 2 | c2 << 4 | c3 << 6 (the other products fall above bit 31, or below
        # bit 24 with a sum under 2^24: no carry)
        words = scratch["words"][: n // 4]
        np.multiply(code.view(np.uint32), _INT2_PACK, out=words)
        codes_out.numpy()[:] = words.view(np.uint8)[3::4]


class Sign1Codec(_MeanScaledCodec):
    name, format_id, bits_per_value, code_bits = "sign1", 6, 1.25, 1
    levels = (1.0, -1.0)

    def _scale(self, m, a):
        return m

    def _codes(self, blocks, s, scratch, codes_out):
        bits = scratch["more"][: blocks.numel()]
        np.signbit(blocks.numpy().reshape(-1), out=bits)  # -0 is -s
        codes_out.numpy()[:] = np.packbits(bits, bitorder="little")  # eight to a byte, the first lowest


Int2Codec._table = _level_table(Int2Codec.levels, 4)
Sign1Codec._table = _level_table(Sign1Codec.levels, 8)
Int2Codec._table_np, Sign1Codec._table_np = Int2Codec._table.numpy(), Sign1Codec._table.numpy()


# ---- sparse formats -------------------------------------------------------------------


class _TopKCodec(Codec):
    """The k largest magnitudes of each block of 256 (the module docstring): payload =
    [fp32 scale per block][k index bytes per block][k/2 code bytes per block]."""

    block_size = 256
    k: int
    mean_name: str  # the format a reducer sends the mean of k-sparse contributions in

    @property
    def mean_codec(self) -> Codec:
        return CODECS[self.mean_name]

    def _payload_size(self, numel: int) -> int:
        return -(-numel // 256) * (4 + self.k + self.k // 2)

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nb, k = -(-numel // 256), self.k
        return (payload[: 4 * nb].view(torch.float32), payload[4 * nb : (4 + k) * nb].view(nb, k),
                payload[(4 + k) * nb :].view(nb, k // 2))

    def _encode_payload(self, flat, payload):
        numel = flat.numel()
        scales, index, codes = self._split(payload, numel)
        full = numel - numel % 256
        for start in range(0, full, _TOPK_CHUNK):
            stop = min(start + _TOPK_CHUNK, full)
            b0, b1 = start // 256, stop // 256
            self._encode_blocks(flat[start:stop].view(-1, 256), scales[b0:b1], index[b0:b1], codes[b0:b1])
        if full < numel:  # the last, partial block: zero-padded to a full one
            padded = torch.zeros(1, 256)
            padded[0, : numel - full] = flat[full:]
            self._encode_blocks(padded, scales[-1:], index[-1:], codes[-1:])
        bad = ~torch.isfinite(scales)
        if bad.any():
            block = int(bad.nonzero()[0])
            raise CodecError(f"input contains NaN or Inf (first in block {block}, elements {block * 256}..)")

    def _encode_blocks(self, blocks, scales_out, index_out, codes_out):
        kernels = _kernels()
        if kernels is not None:
            x = blocks.reshape(-1).numpy()
            kernels.topk_encode(x, x.view(np.int32), self.k, scales_out.numpy(), index_out.numpy(),
                                codes_out.numpy())
            return
        # a unique key per element: |x|'s fp32 bits (ordered as |x| is; Inf and NaN above every finite value) with
        # their lowest 8 bits replaced by 255 - position, so magnitudes within 2^-15 of each other rank by the
        # lower position first: every machine keeps the same k elements
        nb = blocks.shape[0]
        key = blocks.view(torch.int32).bitwise_and(0x7FFFFF00).bitwise_or_(_REVERSED_256)
        # the k largest keys, one at a time: a row's largest, then that element's key set to -1 (below every key);
        # k passes of amax cost a fraction of torch.topk's per-row selection (measured: 22 ms against 57 for top4
        # of 16M values, 67 against 171 for top16)
        flat, top = key.view(-1), torch.empty(self.k, nb, dtype=torch.int32)
        last = torch.arange(255, nb * 256, 256)  # each row's last element in `flat`
        for j in range(self.k):
            largest = torch.amax(key, dim=1, out=top[j])
            flat.index_fill_(0, last - largest.bitwise_and(255), -1)
        index = torch.from_numpy(np.sort((255 - (top & 255)).numpy().T, axis=1))  # ascending positions
        values = blocks.reshape(-1)[(last[:, None] - 255 + index).reshape(-1)].view(nb, self.k)
        s = values.abs().amax(dim=1)
        scales_out.copy_(s)
        r = values / torch.where(s > 0, s, _ONE)[:, None]  # in [-1, 1], one IEEE division
        q = r.mul_(_7).round_().add_(8).to(torch.uint8)  # 1..15 (8: zero); NaN blocks are refused by the caller
        index_out.copy_(index)
        codes_out.copy_(q[:, 0::2].bitwise_or_(q[:, 1::2].bitwise_left_shift_(4)))

    def _decode_payload(self, payload, numel):
        scales, index, codes = self._split(payload, numel)
        _check_scales(self.name, scales)
        nb = scales.numel()
        if nb == 0:
            return _fresh(0)
        kernels = _kernels()
        if kernels is not None:
            out = _fresh_zeros(numel)
            if not kernels.topk_decode(scales.numpy(), index.numpy(), codes.numpy(), _NIBBLE_VALUES_NP, out.numpy(),
                                       numel):
                return out
            # a malformed block: the checks below name it
        position = index.to(torch.int64)
        if self.k > 1:
            unordered = position[:, 1:] <= position[:, :-1]
            if unordered.any():
                block = int(unordered.any(dim=1).nonzero()[0])
                raise CodecError(f"{self.name} payload: block {block}'s indices {index[block].tolist()} are not "
                                 "strictly increasing")
        nibbles = torch.stack((codes.bitwise_and(15), codes.bitwise_right_shift(4)), dim=2).view(nb, self.k)
        if (nibbles == 0).any():
            block = int((nibbles == 0).any(dim=1).nonzero()[0])
            raise CodecError(f"{self.name} payload: block {block} holds code 0, which no encoder writes")
        tail = numel - (nb - 1) * 256  # values in the last block
        if tail < 256 and bool(((position[-1] >= tail) & (nibbles[-1] != 8)).any()):
            raise CodecError(f"{self.name} payload: a nonzero value past the end ({numel} values)")
        values = torch.index_select(_NIBBLE_VALUES, 0, nibbles.view(-1).to(torch.int32)).view(nb, self.k)
        values.mul_(scales[:, None])
        out = _fresh(numel)
        full = numel // 256
        if full:
            where = position[:full].add_(torch.arange(0, full * 256, 256)[:, None])  # flat positions
            out[: full * 256].zero_().index_copy_(0, where.view(-1), values[:full].reshape(-1))
        if full < nb:
            padded = torch.zeros(1, 256).scatter_(1, position[full:], values[full:])
            out[full * 256 :] = padded[0, :tail]
        if kernels is not None:  # pragma: no cover - the kernel and these checks refuse the same payloads
            raise CodecError(f"{self.name} payload: a malformed block")
        return out


class Top4Codec(_TopKCodec):
    name, format_id, bits_per_value, k, mean_name = "top4", 7, 0.3125, 4, "top16"


class Top16Codec(_TopKCodec):
    name, format_id, bits_per_value, k, mean_name = "top16", 8, 0.875, 16, "top16"


# ---- helpers ----------------------------------------------------------------------------

_EMPTY_U8 = torch.empty(0, dtype=torch.uint8)
_ONE, _127, _7 = torch.tensor(1.0), torch.tensor(127.0), torch.tensor(7.0)
_REVERSED_256 = 255 - torch.arange(256, dtype=torch.int32)  # the tie-break part of a top-k key: the lower index ranks first
_NIBBLE_VALUES = (torch.arange(16, dtype=torch.float32) - 8) / 7  # a top-k code -> its value in units of the scale
_NIBBLE_VALUES_NP = _NIBBLE_VALUES.numpy()
_TINY_SCALE, _TINY_RESCALE = 2.0**-100, 2.0**64
_TINY_RESCALE_T = torch.tensor(_TINY_RESCALE)
_INT2_PACK = np.uint32(2**24 + 2**18 + 2**12 + 2**6)
_ONE_NP, _65536_NP, _1_5_NP, _1_875_NP = np.float32(1), np.float32(65536), np.float32(1.5), np.float32(1.875)
_2_TO_MINUS_23 = np.float32(2.0**-23)


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return madvise
    except (OSError, AttributeError):  # pragma: no cover
        return None


_MADVISE = _load_madvise()
_MADV_HUGEPAGE, _HUGE_PAGE = 14, 1 << 21


def _fresh(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new 1-D tensor. On Linux a large one is advised onto transparent huge pages
    before first touch: faulting in 64 MB of 4 KB pages costs about as much as decoding it."""
    out = torch.empty(numel, dtype=dtype)
    size = numel * out.element_size()
    if _MADVISE is not None and size >= 4 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        stop = (out.data_ptr() + size) // _HUGE_PAGE * _HUGE_PAGE
        _MADVISE(start, stop - start, _MADV_HUGEPAGE)  # advisory: failure only costs speed
    return out


def _fresh_zeros(numel: int) -> torch.Tensor:
    """`_fresh`, zeroed. calloc (numpy's zeros) takes a large one straight from the system, whose pages are zero
    already: no pass over it here (a sparse decode then writes only its kept values)."""
    out = np.zeros(numel, dtype=np.float32)
    size = out.nbytes
    if _MADVISE is not None and size >= 4 * _HUGE_PAGE:
        start = -(-out.ctypes.data // _HUGE_PAGE) * _HUGE_PAGE
        stop = (out.ctypes.data + size) // _HUGE_PAGE * _HUGE_PAGE
        _MADVISE(start, stop - start, _MADV_HUGEPAGE)  # (before first touch, as `_fresh`)
    return torch.from_numpy(out)


_KERNELS_UNSET = object()
_KERNELS = _KERNELS_UNSET
_KERNELS_LOCK = threading.Lock()  # (one thread loads and checks them; the others wait for its verdict)
_FORCED = threading.local()  # a path forced in this thread only: `_kernels_problem` runs both


def _kernels():
    """`codec_kernels` (the compiled per-block loops), or None: numba missing, P2P_DILOCO_CODEC_KERNELS=0, or kernels
    that fail `_kernels_problem` on this machine (then with a warning: every peer must write the same bytes).
    Imported on first use: a run of the codecs without kernels (fp4, the default) never loads numba."""
    global _KERNELS
    forced = getattr(_FORCED, "kernels", _KERNELS_UNSET)
    if forced is not _KERNELS_UNSET:
        return forced
    if _KERNELS is _KERNELS_UNSET:
        with _KERNELS_LOCK:
            if _KERNELS is _KERNELS_UNSET:
                problem = "P2P_DILOCO_CODEC_KERNELS=0"
                if os.environ.get("P2P_DILOCO_CODEC_KERNELS", "1") != "0":
                    try:
                        from p2p_diloco.core import codec_kernels
                    except ImportError as e:
                        problem = f"numba is not installed ({e})"
                    except Exception as e:  # e.g. numba finds nowhere to cache them (set NUMBA_CACHE_DIR)
                        problem = f"they do not load ({type(e).__name__}: {e})"
                    else:
                        problem = _kernels_problem(codec_kernels)
                    if problem is not None:
                        warnings.warn(f"codecs int2/sign1/top4/top16 run without their compiled kernels: {problem}; "
                                      "slower, the same bytes", RuntimeWarning, stacklevel=3)
                _KERNELS = codec_kernels if problem is None else None
    return _KERNELS


def _kernels_problem(kernels) -> str | None:
    """What is wrong with `kernels` on this machine, or None: each codec that has them encodes and decodes values of
    every kind (magnitudes 1e-40..1e30, zeros, a tiny block, a partial last block) to the same bytes and values as
    the vectorized code."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=generator) * torch.logspace(-40, 30, 3000, dtype=torch.float64).float()
    x[256:512] = 0.0
    x[600:700] *= 2.0**-80
    for codec in CODECS.values():
        if not isinstance(codec, (_MeanScaledCodec, _TopKCodec)):
            continue
        results = []
        for path in (kernels, None):
            _FORCED.kernels = path
            try:
                payload = codec.encode(x)
                results.append((bytes(payload), codec.decode(payload, x.numel()).view(torch.int32)))
            except Exception as e:  # a kernel that does not compile here, or a bug
                return f"{codec.name}: {type(e).__name__}: {e}"
            finally:
                del _FORCED.kernels
        (fast, fast_values), (slow, slow_values) = results
        if fast != slow or not torch.equal(fast_values, slow_values):
            return f"{codec.name}'s kernels write other bytes than its vectorized code"
    return None


def _check_scales(name: str, scales: torch.Tensor) -> None:
    """A payload's block scales are finite and >= 0; CodecError naming the first bad block otherwise."""
    bad = ~(scales >= 0) | ~torch.isfinite(scales)
    if bad.any():
        block = int(bad.nonzero()[0])
        raise CodecError(
            f"{name} payload has {int(bad.sum())} invalid block scale(s) (NaN, Inf or negative); "
            f"first: block {block} = {scales[block].item()!r}"
        )


def _check_numel(numel) -> int:
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise CodecError(f"numel must be a non-negative int, got {numel!r}")
    return numel


def _flatten(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _ACCEPTED_DTYPES:
        raise CodecError(f"unsupported dtype {x.dtype} (accepted: fp32, fp16, bf16)")
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    flat = x.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return flat


def _all_finite(t: torch.Tensor) -> bool:
    """One pass, no full-size temporary: min/max propagate NaN and show Inf."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _as_byte_view(data) -> memoryview:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, bytearray or memoryview, got {type(data).__name__}")
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


CODECS: dict[str, Codec] = {codec.name: codec for codec in (Fp32Codec(), Fp16Codec(), Int8Codec(), Fp4Codec(),
                                                             Int2Codec(), Sign1Codec(), Top4Codec(), Top16Codec())}
_NAME_BY_ID = {codec.format_id: codec.name for codec in CODECS.values()}


def get_codec(name: str) -> Codec:
    """The codec called ``name``; CodecError listing the known names otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(CODECS)}") from None
