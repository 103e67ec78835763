"""Bit-exact tests of apt_hal.mxfp4 against the rules in its docstring (OCP MX v1.0, FLOOR scale,
round-half-to-even elements, saturation at ±6, NaN/Inf blocks -> NaN scale).

Expected bits come from hand-written tables, from ``spec_quantize_block`` (a plain-Python rendering
of the spec, written independently of mxfp4.py: frexp for the exponent, nearest-value search for
the rounding) and from ONNX's reference evaluator (an independent FP4/E8M0 decoder).
"""

import math

import pytest
import torch

from apt_hal import mxfp4

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes of codes 0..7
FMAX32 = torch.finfo(torch.float32).max


# ---- the spec in plain Python ----------------------------------------------------------------


def spec_quantize_block(values):
    """(scale code, 32 element codes) of one block; Python floats hold every float32 exactly."""
    if any(not math.isfinite(v) for v in values):
        return 0xFF, [0] * 32
    amax = max(abs(v) for v in values)
    if amax == 0:
        return 0, [0] * 32
    _, e = math.frexp(amax)  # amax = m * 2**e with 0.5 <= m < 1: floor(log2(amax)) = e - 1
    shared = min(max(e - 1 - 2, -127), 127)
    codes = []
    for v in values:
        y = math.ldexp(v, -shared)  # exact: a power-of-two scaling within float64's range
        # The nearest magnitude; on a tie the even code (mantissa bit 0). Values above 6 get 6.
        mag = min(range(8), key=lambda c: (abs(abs(y) - GRID[c]), c % 2))
        codes.append(mag | (8 if math.copysign(1.0, y) < 0 else 0))
    return shared + 127, codes


def spec_decode(code, scale):
    if scale == 0xFF:
        return math.nan
    return (-1.0 if code & 8 else 1.0) * GRID[code & 7] * 2.0 ** (scale - 127)


def spec_pack(codes):
    return [lo | (hi << 4) for lo, hi in zip(codes[0::2], codes[1::2])]


def spec_quantize(w):
    """Packed bytes and scale codes of a 2-D float tensor, as nested lists."""
    packed, scales = [], []
    for row in w.tolist():
        prow, srow = [], []
        for b in range(0, len(row), 32):
            s, codes = spec_quantize_block(row[b:b + 32])
            srow.append(s)
            prow += spec_pack(codes)
        packed.append(prow)
        scales.append(srow)
    return packed, scales


def assert_same_bits(actual, expected):
    """Identical values bit for bit (so -0 differs from +0); NaN at exactly the same positions."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[actual.dtype]
    a, e = actual.view(ints)[~nan], expected.view(ints)[~nan]
    bad = (a != e).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} values differ, first: {actual[~nan][bad[0]]} vs {expected[~nan][bad[0]]}"


def quantize_matches_spec(w):
    packed, scales = mxfp4.quantize(w)
    exp_packed, exp_scales = spec_quantize(w)
    assert packed.tolist() == exp_packed
    assert scales.tolist() == exp_scales
    return packed, scales


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


def block(*values):
    """One block: the given values, then zeros."""
    return f32(list(values) + [0.0] * (32 - len(values)))


# ---- every representable value ---------------------------------------------------------------


def all_codes_grid(seed=0):
    """[253, 32] blocks of exact MXFP4 values: row s holds each of the 16 codes twice (shuffled)
    at scale 2^(s-127), so its amax is 6*2^(s-127) and its scale code must be s. Scale codes 253 and
    254 need an amax of at least 4*2^126 = 2^128, beyond float32: quantize never produces them."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.arange(16).repeat(2)[torch.randperm(32, generator=g)] for _ in range(253)])
    values = [[spec_decode(c, s) for c in row] for s, row in enumerate(codes.tolist())]
    return codes.to(torch.uint8), torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_scale_and_code_round_trips_exactly(dtype):
    codes, values = all_codes_grid()
    w = values.to(dtype)
    assert torch.equal(w.double(), values)  # the grid is exact in this dtype
    packed, scales = mxfp4.quantize(w)
    assert torch.equal(scales[:, 0], torch.arange(253, dtype=torch.uint8))
    assert torch.equal(mxfp4.unpack_codes(packed), codes)  # -0 included: code 8
    assert_same_bits(mxfp4.dequantize(packed, scales, dtype), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_every_scale_and_code(dtype):
    # All 256 scale codes x 16 element codes, packed by hand: the exact value rounded once to dtype.
    # Magnitudes >= 2^128 (scale codes 253-254 with large elements) overflow float32 and bfloat16 to
    # Inf; float16 overflows above 65504 and rounds tiny values to its subnormals or to 0.
    codes = torch.arange(16).repeat(2).tolist()
    packed = torch.tensor([spec_pack(codes)] * 256, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.uint8).unsqueeze(1)
    exact = torch.tensor([[spec_decode(c, s) for c in codes] for s in range(256)], dtype=torch.float64)
    assert_same_bits(mxfp4.dequantize(packed, scales, dtype), exact.to(dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # 6*2^127 -> Inf
def test_dequantize_agrees_with_onnx_reference_decoder():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    g = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (256, 16), dtype=torch.uint8, generator=g)
    scales = torch.arange(256, dtype=torch.uint8).unsqueeze(1)  # every scale code, NaN included
    n, k = 256, 32
    inits = [helper.make_tensor("w", TensorProto.FLOAT4E2M1, [n, k], packed.numpy().tobytes(), raw=True),
             helper.make_tensor("s", TensorProto.FLOAT8E8M0, [n, k // 32], scales.numpy().tobytes(), raw=True)]
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1, block_size=32,
                            output_dtype=TensorProto.FLOAT)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, k])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    onnx.checker.check_model(model)
    (expected,) = ReferenceEvaluator(model).run(None, {})
    assert_same_bits(mxfp4.dequantize(packed, scales), torch.from_numpy(expected))


# ---- rounding and scale rules ----------------------------------------------------------------


def test_gaussian_data_uses_every_code_and_matches_the_spec():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    packed, _ = quantize_matches_spec(w)
    assert set(mxfp4.unpack_codes(packed).unique().tolist()) == set(range(16))


def test_random_blocks_over_the_whole_exponent_range_match_the_spec():
    g = torch.Generator().manual_seed(3)
    exps = torch.randint(-150, 124, (64, 4, 1), generator=g).double()
    w = (torch.randn(64, 4, 32, generator=g, dtype=torch.float64) * torch.exp2(exps)).float().reshape(64, 128)
    assert (w.abs() < torch.finfo(torch.float32).tiny).any()  # float32 subnormals are covered
    packed, scales = quantize_matches_spec(w)
    exact = [[spec_decode(c, srow[i // 32]) for i, c in enumerate(crow)]
             for crow, srow in zip(mxfp4.unpack_codes(packed).tolist(), scales.tolist())]
    assert_same_bits(mxfp4.dequantize(packed, scales), torch.tensor(exact, dtype=torch.float32))


# (midpoint, code just below it, code just above it, code on the exact tie: the even one)
MIDPOINTS = [(0.25, 0, 1, 0), (0.75, 1, 2, 2), (1.25, 2, 3, 2), (1.75, 3, 4, 4), (2.5, 4, 5, 4),
             (3.5, 5, 6, 6), (5.0, 6, 7, 6)]


@pytest.mark.parametrize("e", [-120, -1, 0, 7, 100])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_round_half_to_even_at_every_midpoint(e, sign):
    mids = f32([m for m, *_ in MIDPOINTS]) * 2.0 ** e
    below = torch.nextafter(mids, torch.zeros(()))
    above = torch.nextafter(mids, torch.full((), math.inf))
    anchor = f32([4.0 * 2.0 ** e])  # amax in [4, 8) * 2^e: the scale is 2^e
    w = (torch.cat([anchor, mids, below, above, torch.zeros(32 - 22)]) * sign).unsqueeze(0)
    packed, scales = quantize_matches_spec(w)
    assert scales.item() == e + 127
    _, lows, highs, ties = zip(*MIDPOINTS)
    expected = [6, *ties, *lows, *highs]
    sign_bit = 8 if sign < 0 else 0
    assert mxfp4.unpack_codes(packed)[0, :22].tolist() == [c | sign_bit for c in expected]


def test_values_between_6_and_8_times_the_scale_saturate_to_6():
    for e in (-100, 0, 60):
        s = 2.0 ** e
        w = block(6.5 * s, -7.0 * s, 7.5 * s, -(8.0 - 2.0 ** -21) * s, (6.0 + 2.0 ** -21) * s).unsqueeze(0)
        packed, scales = quantize_matches_spec(w)
        assert scales.item() == e + 127
        assert mxfp4.unpack_codes(packed)[0, :5].tolist() == [7, 15, 7, 15, 7]
        assert mxfp4.dequantize(packed, scales)[0, :5].tolist() == [6 * s, -6 * s, 6 * s, -6 * s, 6 * s]


TINY = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal float32


@pytest.mark.parametrize("amax, scale_code", [
    (1.0, 125),
    (6.0, 127),
    (8.0 - 2.0 ** -21, 127),  # the float32 just below a power of two
    (8.0, 128),  # exactly a power of two
    (2.0 ** 10, 135),
    (2.0 ** 10 - 2.0 ** -14, 134),
    (2.0 ** -124, 1),
    (2.0 ** -125, 0),
    (TINY, 0),  # floor(log2) - 2 = -128: clamped to the smallest scale
    (2.0 ** -127, 0),  # float32 subnormals
    (3.0 * 2.0 ** -140, 0),
    (2.0 ** -149, 0),
    (2.0 ** 127, 252),
    (FMAX32, 252),  # the largest float32: 252 is the largest scale quantize can produce
])
def test_scale_is_floor_log2_amax_minus_2(amax, scale_code):
    g = torch.Generator().manual_seed(4)
    others = (torch.rand(31, generator=g, dtype=torch.float64) * 2 - 1) * amax  # |x| < amax
    w = torch.cat([f32([amax]), others.float()]).unsqueeze(0)
    w = w[:, torch.randperm(32, generator=g)]
    _, scales = quantize_matches_spec(w)
    _, scales_neg = quantize_matches_spec(-w)
    assert scales.item() == scales_neg.item() == scale_code


def test_subnormal_blocks_keep_their_values_under_the_smallest_scale():
    # Scale code 0 is 2^-127: float32 subnormals quantize like any other value relative to it.
    w = block(2.0 ** -127, -3.0 * 2.0 ** -129, 2.0 ** -130, 6.0 * 2.0 ** -127).unsqueeze(0)
    packed, scales = quantize_matches_spec(w)
    assert scales.item() == 0
    assert mxfp4.unpack_codes(packed)[0, :4].tolist() == [2, 10, 0, 7]  # 1, -1 (tie 0.75 -> 1), 0, 6
    assert mxfp4.dequantize(packed, scales)[0, :4].tolist() == [2.0 ** -127, -2.0 ** -127, 0.0, 6.0 * 2.0 ** -127]


def test_zero_blocks_and_signed_zeros():
    w = torch.stack([torch.zeros(32), -torch.zeros(32), block(-0.0, 1.0, -0.01)])
    packed, scales = quantize_matches_spec(w)
    assert scales[:, 0].tolist() == [0, 0, 125]
    codes = mxfp4.unpack_codes(packed)
    assert codes[0].tolist() == [0] * 32 and codes[1].tolist() == [0] * 32  # amax 0: every element +0
    assert codes[2, :3].tolist() == [8, 6, 8]  # -0 and a negative value rounding to 0 keep their sign
    out = mxfp4.dequantize(packed, scales)
    assert_same_bits(out[:2], torch.zeros(2, 32))
    assert torch.signbit(out[2, 0]) and torch.signbit(out[2, 2])


# ---- NaN and Inf -----------------------------------------------------------------------------


def test_nan_or_inf_makes_its_block_nan_and_leaves_the_others_alone():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 64, generator=g)
    w[0, 5], w[1, 40], w[2, 0] = math.nan, math.inf, -math.inf
    packed, scales = quantize_matches_spec(w)
    bad = torch.tensor([[True, False], [False, True], [True, False]])
    assert torch.equal(scales == 0xFF, bad)
    codes = mxfp4.unpack_codes(packed).reshape(3, 2, 32)
    assert (codes[bad] == 0).all()
    clean_packed, clean_scales = mxfp4.quantize(torch.where(bad.repeat_interleave(32, 1), 0.0, w))
    assert torch.equal(scales[~bad], clean_scales[~bad])
    assert torch.equal(codes[~bad], mxfp4.unpack_codes(clean_packed).reshape(3, 2, 32)[~bad])
    out = mxfp4.dequantize(packed, scales).reshape(3, 2, 32)
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()


def test_nonfinite_raise():
    w = torch.randn(2, 32)
    w[1, 3] = math.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        mxfp4.quantize(w, nonfinite="raise")
    mxfp4.quantize(torch.randn(2, 32), nonfinite="raise")  # finite input is fine
    with pytest.raises(ValueError, match="nonfinite must be 'nan' or 'raise'"):
        mxfp4.quantize(w, nonfinite="clamp")


# ---- packing order and torch dtypes ----------------------------------------------------------


def test_element_2i_is_the_low_nibble():
    w = block(0.5, -6.0, 1.0, 0.0, 3.0).unsqueeze(0)  # codes 1, 15, 2, 0, 5 under scale 2^0
    packed, scales = mxfp4.quantize(w)
    assert scales.item() == 127
    assert packed[0, :3].tolist() == [0xF1, 0x02, 0x05]
    assert mxfp4.unpack_codes(packed)[0, :5].tolist() == [1, 15, 2, 0, 5]


@pytest.mark.skipif(not mxfp4.HAS_TORCH_FP4, reason="this torch has no float4_e2m1fn_x2 / float8_e8m0fnu")
def test_torch_dtype_views():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    packed, scales = mxfp4.quantize(w)
    tp, ts = mxfp4.to_torch_dtypes(packed, scales)
    assert (tp.dtype, ts.dtype) == (torch.float4_e2m1fn_x2, torch.float8_e8m0fnu)
    assert tp.shape == packed.shape and ts.shape == scales.shape  # one float4_e2m1fn_x2 = two elements
    assert tp.data_ptr() == packed.data_ptr() and ts.data_ptr() == scales.data_ptr()  # views, no copy
    up, us = mxfp4.from_torch_dtypes(tp, ts)
    assert up.dtype == us.dtype == torch.uint8 and torch.equal(up, packed) and torch.equal(us, scales)
    assert_same_bits(mxfp4.dequantize(tp, ts), mxfp4.dequantize(packed, scales))
    assert torch.equal(mxfp4.unpack_codes(tp), mxfp4.unpack_codes(packed))
    with pytest.raises(TypeError, match="expected uint8, float4_e2m1fn_x2 or float8_e8m0fnu"):
        mxfp4.as_uint8(packed.to(torch.int8))


@pytest.mark.skipif(not mxfp4.HAS_TORCH_FP4, reason="this torch has no float8_e8m0fnu")
def test_torch_e8m0_decode_equals_ours():
    codes = torch.arange(256, dtype=torch.uint8)
    theirs = codes.view(torch.float8_e8m0fnu).to(torch.float32)
    ones = torch.full((256, 16), 0x22, dtype=torch.uint8)  # every element code 2 = 1.0
    ours = mxfp4.dequantize(ones, codes.unsqueeze(1))[:, 0]
    assert_same_bits(ours, theirs)


# ---- input dtypes, shapes, errors ------------------------------------------------------------


@pytest.mark.parametrize("dtype, exp_range", [(torch.float16, (-26, 14)), (torch.bfloat16, (-135, 125))])
def test_half_precision_inputs_quantize_like_their_exact_float32_values(dtype, exp_range):
    g = torch.Generator().manual_seed(7)
    exps = torch.randint(*exp_range, (16, 4, 1), generator=g).double()
    w = (torch.randn(16, 4, 32, generator=g, dtype=torch.float64) * torch.exp2(exps)).to(dtype).reshape(16, 128)
    assert (w != 0).any() and torch.isfinite(w).all()
    p16, s16 = mxfp4.quantize(w)
    p32, s32 = quantize_matches_spec(w.float())
    assert torch.equal(p16, p32) and torch.equal(s16, s32)


def test_leading_dims_and_strided_input():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(2, 3, 64, generator=g)
    packed, scales = mxfp4.quantize(w)
    assert packed.shape == (2, 3, 32) and scales.shape == (2, 3, 2)
    flat_p, flat_s = mxfp4.quantize(w.reshape(6, 64))
    assert torch.equal(packed.reshape(6, 32), flat_p) and torch.equal(scales.reshape(6, 2), flat_s)
    assert_same_bits(mxfp4.dequantize(packed, scales), mxfp4.dequantize(flat_p, flat_s).reshape(2, 3, 64))
    wt = torch.randn(64, 5, generator=g).t()  # non-contiguous [5, 64]
    assert all(torch.equal(a, b) for a, b in zip(mxfp4.quantize(wt), mxfp4.quantize(wt.contiguous())))


def test_errors():
    with pytest.raises(ValueError, match=r"multiple of 32, got shape \(4, 48\)"):
        mxfp4.quantize(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        mxfp4.quantize(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="got torch.int32"):
        mxfp4.quantize(torch.zeros(4, 32, dtype=torch.int32))
    with pytest.raises(TypeError, match="'w' must be a tensor, got list"):
        mxfp4.quantize([0.0] * 32)
    packed, scales = mxfp4.quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="do not describe one"):
        mxfp4.dequantize(packed, scales[:, :1])
    with pytest.raises(ValueError, match="do not describe one"):
        mxfp4.dequantize(packed[:3], scales)


def test_dequantize_checks_its_arguments():
    packed, scales = mxfp4.quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="'packed' must have at least 1 dimension, got a 0-dim tensor"):
        mxfp4.dequantize(packed[0, 0], scales)
    with pytest.raises(ValueError, match="'scales' must have at least 1 dimension"):
        mxfp4.dequantize(packed, scales[0, 0])
    with pytest.raises(TypeError, match="'packed' must be a tensor, got list"):
        mxfp4.dequantize(packed.tolist(), scales)
    with pytest.raises(TypeError, match="'scales' must be uint8 .*, got torch.float32"):
        mxfp4.dequantize(packed, scales.float())
    with pytest.raises(TypeError, match="'dtype' must be one of .*, got 'float32'"):
        mxfp4.dequantize(packed, scales, "float32")
    with pytest.raises(ValueError, match="'scales' is on meta but 'packed' is on cpu"):
        mxfp4.dequantize(packed, scales.to("meta"))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_dequantize_refuses_integer_dtypes_that_cannot_hold_nan(dtype):
    # Before: a NaN block (scale 0xFF) became -2147483648 in int32.
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    with pytest.raises(TypeError, match=rf"'dtype' must be one of .*, got {dtype}"):
        mxfp4.dequantize(packed, torch.full((1, 1), 0xFF, dtype=torch.uint8), dtype)


def test_quantize_and_dequantize_k_zero():
    # Before: quantize of [N, 0] failed with a reshape error, though K = 0 is a multiple of 32.
    packed, scales = mxfp4.quantize(torch.zeros(3, 0))
    assert packed.shape == (3, 0) and scales.shape == (3, 0) and packed.dtype == scales.dtype == torch.uint8
    assert mxfp4.dequantize(packed, scales).shape == (3, 0)


def test_quantize_and_dequantize_meta_tensors_give_shapes():
    packed, scales = mxfp4.quantize(torch.empty(2, 3, 64, device="meta"), nonfinite="raise")
    assert packed.is_meta and packed.shape == (2, 3, 32) and scales.shape == (2, 3, 2)
    out = mxfp4.dequantize(packed, scales, torch.bfloat16)
    assert out.is_meta and out.shape == (2, 3, 64) and out.dtype == torch.bfloat16
