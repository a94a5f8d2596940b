"""Property tests of p2p_diloco.core.codecs against naive per-element references.

The block references below are plain Python loops over numpy float32 scalars (IEEE,
one rounding per operation), written from the format definition in the module
docstring, not from the vectorized code: decoded values must match them to the bit.
Error bounds are the ones derived in the module docstring, checked per element.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2p_diloco.core import codecs
from p2p_diloco.core.codecs import CODECS, Codec, CodecError, get_codec
from codec_bounds import SPARSE_K, error_bound, mean_scaled_block, topk_block

NAMES = ["fp32", "fp16", "int8", "fp4", "int2", "sign1", "top4", "top16"]
BLOCK_NAMES = ["int8", "fp4", "int2", "sign1"]
SPARSE_NAMES = ["top4", "top16"]
ABSMAX_NAMES = ["int8", "fp4"]  # (the block's absmax comes back exactly)
F32 = np.float32
FP16_MAX = 65504.0

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- inputs -------------------------------------------------------------------------------

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# mantissa * 2^exponent: several magnitudes per vector so blocks get very different scales
scaled_f32 = st.builds(
    lambda m, e: float(F32(m * 2.0**e)),
    st.floats(-1.0, 1.0, width=32),
    st.integers(-130, 100),
)
fp16_range = st.floats(-FP16_MAX, FP16_MAX, width=32)


def vectors(elements=st.one_of(finite_f32, scaled_f32), max_size=400):
    return hnp.arrays(np.float32, st.integers(0, max_size), elements=elements)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).copy())


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy()


def assert_same_bits(actual: torch.Tensor, expected: np.ndarray) -> None:
    """Bit equality, except that +0 and -0 are the same value."""
    a, e = actual.numpy(), np.asarray(expected, dtype=np.float32)
    assert a.shape == e.shape
    same = (a.view(np.int32) == e.view(np.int32)) | ((a == 0) & (e == 0))
    assert same.all(), f"first mismatch at {np.flatnonzero(~same)[0]}: {a[~same][:4]} vs {e[~same][:4]}"


# ---- naive references ------------------------------------------------------------------


def block_scales(values: np.ndarray) -> list[F32]:
    return [F32(max((abs(F32(v)) for v in values[i : i + 128]), default=F32(0))) for i in range(0, len(values), 128)]


def prescaled(block, scale: F32):
    """The tiny-scale rule: 0 < scale < 2^-100 -> x and scale times 2^64 (exact)."""
    if 0 < scale < 2.0**-100:
        return [F32(F32(v) * F32(2.0**64)) for v in block], F32(scale * F32(2.0**64))
    return [F32(v) for v in block], scale


def reference_fp4(values: np.ndarray) -> np.ndarray:
    out = []
    for i, scale in zip(range(0, len(values), 128), block_scales(values)):
        block, s = prescaled(values[i : i + 128], scale)
        inv = F32(1) / s if s > 0 else F32(1)
        for v in block:
            r = abs(F32(v * inv))
            if r < 2.0**-7:
                k = 0
            else:  # smallest k with r below the linear midpoint 1.5 * 2^(k-7); 7 otherwise
                k = next((k for k in range(1, 7) if r < 1.5 * 2.0 ** (k - 7)), 7)
            magnitude = F32(0) if k == 0 else F32(F32(2.0 ** (k - 7)) * scale)
            out.append(-magnitude if v < 0 else magnitude)
    return np.array(out, dtype=np.float32)


def reference_int8(values: np.ndarray) -> np.ndarray:
    out = []
    for i, scale in zip(range(0, len(values), 128), block_scales(values)):
        block, s = prescaled(values[i : i + 128], scale)
        multiplier = F32(127) / s if s > 0 else F32(127)
        for v in block:
            q = round(float(F32(v * multiplier)))  # Python round: half to even
            assert -127 <= q <= 127
            out.append(F32(F32(F32(q) / F32(127)) * scale))
    return np.array(out, dtype=np.float32)


def reference_int2(values: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(values), 128):
        stored, s, block = mean_scaled_block("int2", values[i : i + 128])
        inv = F32(1.5) / s if s > 0 else F32(1.5)
        levels = [F32(-1), F32(-1 / 3), F32(1 / 3), F32(1)]
        for v in block:
            code = min(max(math.floor(F32(v * inv)) + 2, 0), 3)
            out.append(F32(levels[code] * stored))
    return np.array(out, dtype=np.float32)


def reference_sign1(values: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(values), 128):
        stored, _, block = mean_scaled_block("sign1", values[i : i + 128])
        out.extend(-stored if np.signbit(v) else stored for v in block)
    return np.array(out, dtype=np.float32)


def reference_topk(name: str, values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values), dtype=np.float32)
    for start in range(0, len(values), 256):
        block = values[start:start + 256]
        kept, s = topk_block(SPARSE_K[name], block)
        for i in kept:
            if i < len(block):
                r = F32(F32(block[i]) / s) if s > 0 else F32(0)
                q = round(float(F32(r * F32(7))))  # Python round: half to even
                assert -7 <= q <= 7
                out[start + i] = F32(F32(F32(q) / F32(7)) * s)
    return out


def reference(name: str, values: np.ndarray) -> np.ndarray:
    if name in SPARSE_NAMES:
        return reference_topk(name, values)
    if name == "fp32":
        return values.astype(np.float32)
    if name == "fp16":
        return values.astype(np.float16).astype(np.float32)
    return {"int8": reference_int8, "fp4": reference_fp4, "int2": reference_int2, "sign1": reference_sign1}[name](
        values)


def forge(codec: Codec, numel: int, payload: bytes, *, magic=codecs.MAGIC, version=codecs.VERSION, format_id=None):
    """A payload with a correct CRC, so only the field under test is wrong."""
    fid = codec.format_id if format_id is None else format_id
    return struct.pack("<2sBBQI", magic, version, fid, numel, zlib.crc32(payload)) + payload


# ---- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(data=st.data())
def test_decode_matches_reference_bit_for_bit_and_bound(name, data):
    elements = fp16_range if name == "fp16" else st.one_of(finite_f32, scaled_f32)
    values = data.draw(vectors(elements))
    codec = get_codec(name)
    x = as_tensor(values)
    payload = codec.encode(x)
    assert len(payload) == codec.wire_size(len(values))
    decoded = codec.decode(payload, len(values))
    assert decoded.dtype == torch.float32 and decoded.shape == (len(values),)
    assert_same_bits(decoded, reference(name, values))
    error = np.abs(decoded.numpy().astype(np.float64) - values.astype(np.float64))
    assert (error <= error_bound(name, values)).all()
    assert_same_bits(codec.roundtrip(x), decoded.numpy())


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_reference_rounding_edges(name):
    """Thresholds exactly: 2^-7 -> 2^-6, 1.5 * 2^j ties up, just below stays down."""
    below = lambda v: float(np.nextafter(F32(v), F32(0)))  # noqa: E731
    edges = [1.0, -1.0, 0.75, below(0.75), 0.375, below(0.375), 2.0**-7, below(2.0**-7), 1.5 * 2.0**-7, 0.0, -0.0]
    edges += [k / 254 for k in range(0, 255, 7)] + [(k + 0.5) / 127 for k in range(0, 127, 9)]
    values = np.array(edges, dtype=np.float32)
    decoded = get_codec(name).roundtrip(as_tensor(values))
    assert_same_bits(decoded, reference(name, values))
    if name == "fp4":
        expected = [1, -1, 1, 0.5, 0.5, 0.25, 2.0**-6, 0, 2.0**-6, 0, 0]
        assert decoded[: len(expected)].tolist() == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "numel",
    [0, 1, 2, 3, 127, 128, 129, 255, 256, 257, 1000, codecs._CHUNK - 1, codecs._CHUNK + 1, 2 * codecs._CHUNK + 129,
     codecs._TOPK_CHUNK + 257]
)
def test_lengths_and_wire_size(name, numel):
    codec = get_codec(name)
    x = torch.randn(numel)
    payload = codec.encode(x)
    assert len(payload) == codec.wire_size(numel)
    if numel % codec.block_size == 0:
        assert codec.wire_size(numel) - codecs.HEADER_SIZE == numel * codec.bits_per_value / 8
    decoded = codec.decode(payload, numel)
    assert decoded.shape == (numel,)
    if numel <= 1000:
        assert_same_bits(decoded, reference(name, x.numpy()))
    else:
        error = (decoded - x).abs().double().numpy()
        assert (error <= error_bound(name, x.numpy())).all()


@pytest.mark.parametrize("name", NAMES)
def test_zeros(name):
    codec = get_codec(name)
    for numel in (1, 128, 300):
        decoded = codec.decode(codec.encode(torch.zeros(numel)), numel)
        assert torch.equal(decoded, torch.zeros(numel))
    decoded = codec.decode(codec.encode(-torch.zeros(200)), 200)
    assert (decoded == 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("magnitude", [1e-30, 1e-42, 1e30])
def test_tiny_and_huge_magnitudes(name, magnitude):
    codec = get_codec(name)
    values = (np.random.default_rng(0).standard_normal(300) * magnitude).astype(np.float32)
    x = as_tensor(values)
    if name == "fp16" and magnitude > FP16_MAX:
        with pytest.raises(CodecError, match="fp16 range"):
            codec.encode(x)
        return
    decoded = codec.decode(codec.encode(x), 300)
    assert_same_bits(decoded, reference(name, values))
    error = np.abs(decoded.numpy().astype(np.float64) - values.astype(np.float64))
    assert (error <= error_bound(name, values)).all()
    if name in ABSMAX_NAMES:  # the block absmax itself comes back exactly
        for i in range(0, 300, 128):
            j = i + int(np.argmax(np.abs(values[i : i + 128])))
            assert decoded[j].item() == values[j]


def test_fp16_range_edge():
    codec = get_codec("fp16")
    assert codec.roundtrip(torch.tensor([65504.0, -65519.0])).tolist() == [65504.0, -65504.0]
    with pytest.raises(CodecError, match="fp16 range"):
        codec.encode(torch.tensor([1.0, 65520.0]))


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_and_low_precision_inputs(name):
    codec = get_codec(name)
    base = torch.randn(70, 33)
    for x in (base.t(), base[::3, 1::2], base.t()[5:, ::4], base.unsqueeze(0).expand(2, 70, 33)):
        assert not x.is_contiguous()
        assert codec.encode(x) == codec.encode(x.contiguous())
        assert_same_bits(codec.roundtrip(x), codec.decode(codec.encode(x.contiguous()), x.numel()).numpy())
    for dtype in (torch.float16, torch.bfloat16):
        low = base.to(dtype)
        assert codec.encode(low) == codec.encode(low.float())
    with pytest.raises(CodecError, match="dtype"):
        codec.encode(base.double())
    with pytest.raises(CodecError, match="dtype"):
        codec.encode(torch.arange(10))


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(values=vectors(fp16_range, max_size=700), cuts=st.lists(st.integers(0, 6), max_size=4))
def test_split_at_block_multiples_decodes_identically(name, values, cuts):
    codec = get_codec(name)
    x = as_tensor(values)
    whole = codec.roundtrip(x)
    bounds = sorted({min(c * codec.block_size * (1 if codec.block_size > 1 else 37), len(values)) for c in cuts})
    edges = [0, *bounds, len(values)]
    parts = [codec.decode(codec.encode(x[a:b]), b - a) for a, b in zip(edges, edges[1:])]
    assert_same_bits(torch.cat(parts), whole.numpy())


@FEW
@given(values=vectors(max_size=600))
def test_fp4_values_are_signed_powers_of_two_times_the_block_scale(values):
    codec = get_codec("fp4")
    payload = codec.encode(as_tensor(values))
    blocks = -(-len(values) // 128)
    scales = np.frombuffer(payload, dtype="<f4", count=blocks, offset=codecs.HEADER_SIZE)
    assert scales.tolist() == [float(s) for s in block_scales(values)]
    decoded = codec.decode(payload, len(values)).numpy()
    for i, value in enumerate(decoded):
        s = scales[i // 128]
        allowed = {0.0} | {float(sign * F32(F32(2.0 ** (k - 7)) * s)) for k in range(1, 8) for sign in (1, -1)}
        assert float(value) in allowed


def test_fp4_packing_layout():
    codec = get_codec("fp4")
    payload = codec.encode(torch.tensor([1.0, -0.5, 0.0, 2.0**-6, -1.0]))
    codes = payload[codecs.HEADER_SIZE + 4 :]
    # nibbles: 1 -> 0x7, -0.5 -> 0x8|6 = 0xE, 0 -> 0x0, 2^-6 -> 0x1, -1 -> 0xF, padding 0
    assert codes == bytes([0xE7, 0x10, 0x0F])


# ---- invalid input ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_nan_or_inf_anywhere_in_input_is_rejected(name, data):
    numel = data.draw(st.integers(1, 400))
    position = data.draw(st.integers(0, numel - 1))
    bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    x = torch.randn(numel)
    x[position] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        get_codec(name).encode(x)
    with pytest.raises(CodecError, match="NaN or Inf"):
        get_codec(name).roundtrip(x)


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_any_flipped_byte_is_rejected(name, data):
    codec = get_codec(name)
    numel = data.draw(st.integers(0, 300))
    payload = bytearray(codec.encode(torch.randn(numel)))
    position = data.draw(st.integers(0, len(payload) - 1))
    payload[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CodecError):
        codec.decode(bytes(payload), numel)


@pytest.mark.parametrize("name", NAMES)
@FEW
@given(data=st.data())
def test_truncated_and_oversized_are_rejected_by_name(name, data):
    codec = get_codec(name)
    numel = data.draw(st.integers(0, 300))
    payload = codec.encode(torch.randn(numel))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(CodecError, match="truncated"):
        codec.decode(payload[:cut], numel)
    extra = data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(CodecError, match="oversized"):
        codec.decode(payload + extra, numel)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_format_numel_magic_version(name):
    codec = get_codec(name)
    payload = codec.encode(torch.randn(200))
    for other in NAMES:
        if other != name:
            with pytest.raises(CodecError, match=f"payload is {name}, decoder is {other}"):
                get_codec(other).decode(payload, 200)
    body = payload[codecs.HEADER_SIZE :]
    with pytest.raises(CodecError, match="unknown format id 99"):
        codec.decode(forge(codec, 200, body, format_id=99), 200)
    with pytest.raises(CodecError, match="numel mismatch: header says 200, expected 199"):
        codec.decode(payload, 199)
    with pytest.raises(CodecError, match="magic"):
        codec.decode(forge(codec, 200, body, magic=b"XX"), 200)
    with pytest.raises(CodecError, match="version"):
        codec.decode(forge(codec, 200, body, version=codecs.VERSION + 1), 200)
    with pytest.raises(CodecError, match="CRC"):
        codec.decode(payload[:-1] + bytes([payload[-1] ^ 1]), 200)
    assert_same_bits(codec.decode(forge(codec, 200, body), 200), codec.decode(payload, 200).numpy())


@pytest.mark.parametrize("name", BLOCK_NAMES)
@pytest.mark.parametrize("scale", [math.nan, math.inf, -1.0, -1e-30])
def test_invalid_scale_with_valid_crc_is_rejected(name, scale):
    codec = get_codec(name)
    body = bytearray(codec.encode(torch.randn(300))[codecs.HEADER_SIZE :])
    struct.pack_into("<f", body, 4 * 2, scale)  # third block's scale
    with pytest.raises(CodecError, match="block scale.*block 2"):
        codec.decode(forge(codec, 300, bytes(body)), 300)


def test_int8_code_minus_128_is_rejected():
    codec = get_codec("int8")
    body = bytearray(codec.encode(torch.randn(130))[codecs.HEADER_SIZE :])
    body[2 * 4 + 129] = 0x80
    with pytest.raises(CodecError, match="-128"):
        codec.decode(forge(codec, 130, bytes(body)), 130)


@pytest.mark.parametrize("name,dtype", [("fp32", "<f4"), ("fp16", "<f2")])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_with_valid_crc_are_rejected(name, dtype, bad):
    codec = get_codec(name)
    values = np.ones(10, dtype=dtype)
    values[7] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        codec.decode(forge(codec, 10, values.tobytes()), 10)


@pytest.mark.parametrize("name", NAMES)
def test_buffer_types_and_arguments(name):
    codec = get_codec(name)
    x = torch.randn(257)
    payload = codec.encode(x)
    expected = codec.decode(payload, 257)
    for data in (bytearray(payload), memoryview(payload), memoryview(b"pad" + payload)[3:]):
        assert torch.equal(codec.decode(data, 257), expected)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode("not bytes", 257)
    with pytest.raises(CodecError, match="numel"):
        codec.decode(payload, -1)
    with pytest.raises(CodecError, match="numel"):
        codec.wire_size(-1)
    with pytest.raises(CodecError, match="Tensor"):
        codec.encode([1.0, 2.0])


def test_table_of_formats():
    assert list(CODECS) == NAMES
    assert len({codec.format_id for codec in CODECS.values()}) == len(CODECS)
    assert {name: CODECS[name].bits_per_value for name in NAMES} == {"fp32": 32, "fp16": 16, "int8": 8.25, "fp4": 4.25,
                                                                      "int2": 2.25, "sign1": 1.25, "top4": 0.3125,
                                                                      "top16": 0.875}
    assert {name: CODECS[name].block_size for name in NAMES} == {"fp32": 1, "fp16": 1, "int8": 128, "fp4": 128,
                                                                 "int2": 128, "sign1": 128, "top4": 256, "top16": 256}
    assert {name: CODECS[name].mean_codec.name for name in NAMES} == {**{n: n for n in NAMES}, "top4": "top16"}
    for name in NAMES:
        assert get_codec(name) is CODECS[name] and get_codec(name).name == name
    with pytest.raises(CodecError, match="fp32, fp16, int8, fp4, int2, sign1, top4, top16"):
        get_codec("fp8")


@FEW
@given(values=vectors(max_size=600))
def test_int2_and_sign1_take_their_levels_times_a_mean_magnitude_scale(values):
    """Every decoded value is a level times its block's stored scale; the scale follows the block's mean |x|
    (to 2^-16 of its absmax), so a block of one outlier and small values keeps their sign and size class."""
    for name, levels in (("int2", (-1, -1 / 3, 1 / 3, 1)), ("sign1", (-1, 1))):
        codec = get_codec(name)
        payload = codec.encode(as_tensor(values))
        blocks = -(-len(values) // 128)
        scales = np.frombuffer(payload, dtype="<f4", count=blocks, offset=codecs.HEADER_SIZE)
        decoded = codec.decode(payload, len(values)).numpy()
        for i, value in enumerate(decoded):
            s = scales[i // 128]
            assert float(value) in {float(F32(F32(level) * s)) for level in levels}
            if s > 0 and value != 0:
                assert (value < 0) == np.signbit(values[i]) or name == "int2" and abs(values[i]) <= s / 3 * 2


def test_int2_and_sign1_packing_layout():
    x = torch.tensor([1.0, -1.0, 0.1, -0.1] * 32)  # one block: mean |x| = 0.55, s = min(1.875 m, 1) = 1
    int2 = get_codec("int2").encode(x)
    assert struct.unpack_from("<f", int2, codecs.HEADER_SIZE)[0] == 1.0
    # codes 3 (x >= 2/3 s), 0 (x < -2/3 s), 2 (0 <= x < 2/3 s), 1: 3 | 0 << 2 | 2 << 4 | 1 << 6 = 0x63
    assert int2[codecs.HEADER_SIZE + 4 :] == bytes([0x63]) * 32
    sign1 = get_codec("sign1").encode(x)
    assert sign1[codecs.HEADER_SIZE + 4 :] == bytes([0b10101010]) * 16  # negatives' bits set, the first lowest
    assert get_codec("sign1").decode(sign1, 128)[:4].tolist() == pytest.approx([0.55, -0.55, 0.55, -0.55], rel=1e-4)


# ---- sparse formats ------------------------------------------------------------------------


def test_topk_keeps_the_largest_magnitudes_and_breaks_ties_by_position():
    x = torch.zeros(300)
    x[[3, 70, 71, 200]] = torch.tensor([1.0, -2.0, 0.5, 0.25])
    x[100] = 0.25  # ties 200: the lower position is kept
    decoded = get_codec("top4").roundtrip(x)
    assert decoded.nonzero().flatten().tolist() == [3, 70, 71, 100]
    assert decoded[70].item() == -2.0
    equal = torch.full((256,), 0.5)
    assert get_codec("top4").roundtrip(equal).nonzero().flatten().tolist() == [0, 1, 2, 3]
    # within 2^-15 of each other counts as a tie (lowest 8 bits of the key are the position)
    close = torch.zeros(256)
    close[[9, 5]] = torch.tensor([1.0, float(np.nextafter(F32(1.0), F32(0)))])
    close[[20, 30]] = torch.tensor([3.0, 2.0])
    close[40] = 0.5
    assert get_codec("top4").roundtrip(close).nonzero().flatten().tolist() == [5, 9, 20, 30]


def test_topk_packing_layout():
    x = torch.zeros(256)
    x[[250, 7, 9, 8]] = torch.tensor([1.0, -1.0, 0.5, -0.25])
    payload = get_codec("top4").encode(x)
    body = payload[codecs.HEADER_SIZE:]
    assert struct.unpack_from("<f", body)[0] == 1.0
    assert list(body[4:8]) == [7, 8, 9, 250]
    # -1 -> q -7 -> 1, -0.25 -> q round(-1.75) = -2 -> 6, 0.5 -> q round(3.5) = 4 -> 12, 1 -> 15
    assert list(body[8:10]) == [1 | 6 << 4, 12 | 15 << 4]


@FEW
@given(data=st.data())
def test_the_mean_of_top4_contributions_keeps_its_whole_support_in_top16(data):
    members = data.draw(st.integers(1, 4))
    numel = data.draw(st.integers(1, 700))
    top4, top16 = get_codec("top4"), get_codec("top16")
    decoded = [top4.roundtrip(torch.randn(numel) * data.draw(st.floats(1e-3, 1e3))) for _ in range(members)]
    mean = sum(decoded) / members
    sent = top16.roundtrip(mean)
    assert not bool((sent[mean == 0] != 0).any())
    # nothing of the mean is dropped: every value, kept or not, is within the kept values' bound s/14
    padded = torch.zeros(-(-numel // 256) * 256)
    padded[:numel] = mean.abs()
    scale = padded.view(-1, 256).amax(dim=1).repeat_interleave(256)[:numel].double()
    error = (sent - mean).abs().double()
    assert bool((error <= scale / 14 + (mean.abs().double() + scale) * 2.0**-20 + 2.0**-140).all())


@pytest.mark.parametrize("name", SPARSE_NAMES)
@PROPERTY
@given(data=st.data())
def test_sparse_inputs_match_the_reference(name, data):
    # blocks of zeros with at most k + 1 values (top16's usual input: a mean of top4 contributions): the same bits
    # as the reference, tiny subnormals ranking as zeros do (by position)
    k = SPARSE_K[name]
    numel = data.draw(st.integers(1, 1200))
    values = np.zeros(numel, dtype=np.float32)
    for start in range(0, numel, 256):
        size = min(256, numel - start)
        count = data.draw(st.integers(0, min(size, k + 1)))
        where = data.draw(st.lists(st.integers(0, size - 1), min_size=count, max_size=count, unique=True))
        for i in where:
            values[start + i] = data.draw(st.one_of(finite_f32, scaled_f32, st.sampled_from([1e-45, -3e-43, 5e-44])))
    decoded = get_codec(name).roundtrip(as_tensor(values))
    assert_same_bits(decoded, reference(name, values))


# ---- the compiled kernels (`codec_kernels`) and the vectorized code: the same bytes ----------------------------

KERNEL_NAMES = ["int2", "sign1", "top4", "top16"]
PATHS = ["kernels", "vectorized"]


@contextlib.contextmanager
def codec_path(path: str):
    """Run the codecs on `path`: their compiled kernels (numba is a dependency: they must load) or the vectorized
    torch/numpy code (where numba is missing, or P2P_DILOCO_CODEC_KERNELS=0)."""
    saved = codecs._kernels()
    if path == "kernels":
        assert saved is not None or os.environ.get("P2P_DILOCO_CODEC_KERNELS") == "0", "the codec kernels did not load"
        if saved is None:
            pytest.skip("P2P_DILOCO_CODEC_KERNELS=0")
    codecs._KERNELS = saved if path == "kernels" else None
    try:
        yield
    finally:
        codecs._KERNELS = saved


def outcome(do):
    try:
        return do()
    except CodecError as e:
        return f"CodecError: {e}"


@pytest.mark.parametrize("name", KERNEL_NAMES)
@FEW
@given(data=st.data())
def test_the_kernels_and_the_vectorized_code_write_and_read_the_same_bytes(name, data):
    # every magnitude (tiny blocks are encoded again prescaled), signed zeros, subnormals, sometimes NaN or Inf
    special = st.sampled_from([0.0, -0.0, 1e-42, -3e-39, 1e-31, 2.0**-101, 3e38])
    elements = st.one_of(finite_f32, scaled_f32, special)
    values = data.draw(vectors(elements, max_size=600))
    if len(values) and data.draw(st.integers(0, 9)) == 0:
        values[data.draw(st.integers(0, len(values) - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    codec = get_codec(name)
    runs = []
    for path in PATHS:
        with codec_path(path):
            payload = outcome(lambda: bytes(codec.encode(as_tensor(values))))
            decoded = payload if isinstance(payload, str) else bits(codec.decode(payload, len(values)))
            runs.append((payload, decoded))
    (payload, decoded), (vectorized_payload, vectorized_decoded) = runs
    assert payload == vectorized_payload
    if not isinstance(payload, str):  # (the default path against the reference: the tests above)
        assert np.array_equal(decoded, vectorized_decoded)


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_both_paths_agree_over_many_chunks(name):
    numel = 3 * codecs._TOPK_CHUNK + 300  # (chunks of both kinds, a partial last block, magnitudes 1e-40..1e30)
    x = torch.randn(numel) * torch.logspace(-40, 30, numel).to(torch.float32)
    codec, runs = get_codec(name), []
    for path in PATHS:
        with codec_path(path):
            payload = bytes(codec.encode(x))
            runs.append((payload, bits(codec.decode(payload, numel))))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])


def test_kernels_that_write_other_bytes_on_this_machine_are_not_used(monkeypatch):
    from p2p_diloco.core import codec_kernels

    def off_by_one_bit(x, scales, codes, int2):
        codec_kernels.mean_scaled_encode(x, scales, codes, int2)
        codes[:1] ^= 1

    wrong = types.SimpleNamespace(**{name: getattr(codec_kernels, name) for name in codec_kernels.__all__})
    wrong.mean_scaled_encode = off_by_one_bit
    monkeypatch.setattr(codecs, "_KERNELS", codecs._KERNELS)  # (restored afterwards)
    assert codecs._kernels_problem(wrong) == "int2's kernels write other bytes than its vectorized code"
    assert codecs._kernels_problem(codec_kernels) is None
    monkeypatch.setattr(codecs, "_KERNELS", codecs._KERNELS_UNSET)
    monkeypatch.setattr(codecs, "_kernels_problem", lambda kernels: "a problem")
    with pytest.warns(RuntimeWarning, match="without their compiled kernels: a problem; slower, the same bytes"):
        assert codecs._kernels() is None
    int2 = get_codec("int2")  # the vectorized code, once and for all in this process
    assert torch.equal(int2.decode(int2.encode(torch.ones(200)), 200), torch.ones(200)) and codecs._KERNELS is None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", SPARSE_NAMES)
def test_invalid_sparse_payloads_with_valid_crc_are_rejected(name, path):
    with codec_path(path):
        refused_on_this_path(name)


def refused_on_this_path(name):
    codec = get_codec(name)
    k = SPARSE_K[name]
    numel = 600  # blocks: 256, 256, 88
    body = bytes(codec.encode(torch.randn(numel))[codecs.HEADER_SIZE:])
    index_at, codes_at = 4 * 3, 4 * 3 + 3 * k

    def refused(change, match):
        forged = bytearray(body)
        change(forged)
        with pytest.raises(CodecError, match=match):
            codec.decode(forge(codec, numel, bytes(forged)), numel)

    def swap(b):  # block 1's first two indices out of order
        b[index_at + k], b[index_at + k + 1] = b[index_at + k + 1], b[index_at + k]

    def repeat(b):
        b[index_at + k + 1] = b[index_at + k]

    refused(swap, "block 1's indices .* not strictly increasing")
    refused(repeat, "block 1's indices .* not strictly increasing")
    refused(lambda b: b.__setitem__(codes_at + k // 2, b[codes_at + k // 2] & 0xF0), "block 1 holds code 0")
    refused(lambda b: b.__setitem__(codes_at + 2 * (k // 2), b[codes_at + 2 * (k // 2)] & 0x0F), "block 2 holds code 0")

    def past_end(b):  # the last block's last index moved past the 88 values, with a nonzero code
        b[index_at + 3 * k - 1] = 255
        b[codes_at + 3 * (k // 2) - 1] = (b[codes_at + 3 * (k // 2) - 1] & 0x0F) | 0x10
    refused(past_end, "past the end")
    for scale in (math.nan, math.inf, -1.0):
        refused(lambda b: struct.pack_into("<f", b, 8, scale), "block scale.*block 2")
    # zero padding past the end is fine (a short last block keeps its padding when it has fewer than k values)
    short = torch.tensor([1.0, -2.0, 0.0])
    assert codec.decode(codec.encode(short), 3).tolist() == [float(F32(F32(4 / 7) * 2)), -2.0, 0.0]
