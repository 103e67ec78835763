"""cuda-triton MoE kernels (route, permute, experts, combine) against the contract's references.

Runs the Triton kernels on a GPU when there is one, else in Triton's CPU interpreter (conftest
sets TRITON_INTERPRET=1). Tolerances:

* route: ids exactly equal (logits keep a margin between consecutive values, so no near-tie can
  order two experts differently; exact ties are tested separately); weights to rtol 1e-5 (float32
  exp and sums in another order than torch's).
* permute: both outputs exactly equal.
* experts: float32 accumulation, the activation and the output rounded to x's dtype: relative-norm
  error < 1e-2 for bf16/fp16 (2e-5 for float32), and elementwise rtol 2^-6 with atol 2% of the
  output's RMS (one bf16 rounding of act spreads over F products). Dropped rows exactly 0.
* combine: float32 sums in j order, rounded once: one ulp for bf16 (the interpreter truncates
  float32 -> bf16 stores, a GPU rounds to nearest even), 1e-5 for float32 (a GPU fuses the
  multiply-adds, which moves each partial sum by up to an ulp).
"""

import importlib

import pytest
import torch
import triton
import triton.language as tl

import apt_hal
from apt_hal import mxfp4, ops, registry
from apt_hal.backends.cuda_triton import moe
from apt_hal.backends.cuda_triton.mxfp4_decode import (
    WORD_CODE_SCALE,
    dequantize_tile,
    e8m0_to_float32,
    float32_codes_from_words,
)
from apt_hal.contracts import moe_dispatch as moe_dispatch_contract
from apt_hal.contracts.moe_dispatch import ACTIVATIONS

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (T, E, k): decode, a few tokens, an odd count; one expert; k=1 and k=2.
ROUTE_CASES = [(t, e, k) for t in (1, 5, 33) for e in (1, 4, 8) for k in (1, 2) if k <= e]
if DEV == "cuda":
    ROUTE_CASES += [(4096, 8, 2), (1000, 128, 4), (77, 256, 8)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def margin_logits(t, e, dtype, g):
    """Logits whose values in a row are >= 0.4 apart, also after rounding to ``dtype``."""
    levels = torch.argsort(torch.rand(t, e, generator=g), dim=1).float() * 0.5
    return (levels + 0.1 * torch.rand(t, e, generator=g) - 1.5).to(dtype).to(DEV)


def skewed_ids(t, e, k, g):
    """Distinct experts per token, drawn from about half of the experts: others stay empty."""
    used = torch.randperm(e, generator=g)[: max(k, (e + 1) // 2)]
    pick = torch.argsort(torch.rand(t, used.numel(), generator=g), dim=1)[:, :k]
    return used[pick].to(torch.int32).to(DEV)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def assert_experts_close(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    limit = 2e-5 if ref.dtype == torch.float32 else 1e-2
    assert rel_err(y, ref) < limit, f"relative-norm error {rel_err(y, ref):.2e} >= {limit}"
    rms = ref.float().square().mean().sqrt().item()
    rtol = 1e-5 if ref.dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(y, ref, rtol=rtol, atol=0.02 * rms if ref.dtype != torch.float32 else 1e-5 * rms,
                               equal_nan=False)


# ---- route --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring,renormalize", [("softmax_topk", False), ("softmax_topk", True),
                                                 ("topk_softmax", False)])
@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "T{}-E{}-k{}".format(*c))
def test_route_matches_reference(case, scoring, renormalize):
    t, e, k = case
    dtype = (torch.float32, torch.bfloat16, torch.float16)[sum(case) % 3]
    logits = margin_logits(t, e, dtype, gen(sum(case)))
    ref_w, ref_ids = ops.moe_route.reference(logits, k, scoring, renormalize)
    with apt_hal.use("cuda-triton", strict=True):
        w, ids = ops.moe_route(logits, k, scoring, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-7, equal_nan=False)


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
def test_route_ties_go_to_the_lower_expert(scoring):
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0],  # all tied
                           [1.0, 3.0, 3.0, 0.0, 3.0],  # a three-way tie for first
                           [-inf, 0.5, -inf, -inf, -inf],  # -inf logits still rank by index
                           [2.0, -1.0, 2.0, 2.0, -1.0]], device=DEV)
    ref_w, ref_ids = ops.moe_route.reference(logits, 3, scoring, False)
    with apt_hal.use("cuda-triton", strict=True):
        w, ids = ops.moe_route(logits, 3, scoring, False)
    assert ids.tolist() == ref_ids.tolist() == [[0, 1, 2], [1, 2, 4], [1, 0, 2], [0, 2, 3]]
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7, equal_nan=False)


# ---- permute ------------------------------------------------------------------------------------


PERMUTE_CASES = [(1, 4, 2), (5, 8, 2), (33, 4, 1), (33, 1, 1), (33, 8, 2), (300, 8, 2)]  # 300x2: 5 blocks
if DEV == "cuda":
    PERMUTE_CASES += [(4096, 8, 2), (3000, 128, 8)]


@pytest.mark.parametrize("capacity", [-1, 0, 1, 7])
@pytest.mark.parametrize("case", PERMUTE_CASES, ids=lambda c: "T{}-E{}-k{}".format(*c))
def test_permute_matches_reference_exactly(case, capacity):
    t, e, k = case
    ids = skewed_ids(t, e, k, gen(sum(case) + capacity))
    if capacity == 7:
        ids = ids.long()  # int64 ids are accepted too
    ref_order, ref_offsets = ops.moe_permute.reference(ids, e, capacity)
    with apt_hal.use("cuda-triton", strict=True):
        order, offsets = ops.moe_permute(ids, e, capacity)
    assert order.dtype == torch.int32 and offsets.dtype == torch.int64
    assert torch.equal(order, ref_order)
    assert torch.equal(offsets, ref_offsets)


def test_permute_with_no_tokens():
    ids = torch.empty(0, 2, dtype=torch.int32, device=DEV)
    with apt_hal.use("cuda-triton", strict=True):
        order, offsets = ops.moe_permute(ids, 4, -1)
    assert order.shape == (0,) and offsets.tolist() == [0] * 5


# ---- experts ------------------------------------------------------------------------------------


def make_experts(e, d, f, activation, quant, dtype, bias, g):
    """Stacked expert weights scaled so activations and outputs are O(1), in dtype or MXFP4."""
    u = f if activation == "gelu" else 2 * f
    w_up = torch.randn(e, u, d, generator=g) / d ** 0.5
    w_down = torch.randn(e, d, f, generator=g) / f ** 0.5
    if quant:
        (w_up, up_scales), (w_down, down_scales) = mxfp4.quantize(w_up), mxfp4.quantize(w_down)
    else:
        w_up, w_down, up_scales, down_scales = w_up.to(dtype), w_down.to(dtype), None, None
    b_up = (0.1 * torch.randn(e, u, generator=g)).to(dtype) if bias else None
    b_down = (0.1 * torch.randn(e, d, generator=g)).to(dtype) if bias else None
    return tuple(None if w is None else w.to(DEV) for w in (w_up, w_down, up_scales, down_scales, b_up, b_down))


def experts_args(t, e, k, capacity, activation, quant, dtype=torch.bfloat16, bias=True, d=64, f=96, seed=0):
    g = gen(seed)
    x = torch.randn(t, d, generator=g).to(dtype).to(DEV)
    order, offsets = ops.moe_permute.reference(skewed_ids(t, e, k, g), e, capacity)
    weights = make_experts(e, d, f, activation, quant, dtype, bias, g)
    return (x, order, offsets, *weights, k, activation, 1.702, 7.0)


# (T, E, k, capacity): decode, empty experts, capacity dropping, one expert.
EXPERT_CASES = [(1, 4, 2, -1), (5, 8, 2, 1), (33, 4, 1, -1), (33, 1, 1, 20), (33, 8, 2, 6)]
if DEV == "cuda":
    EXPERT_CASES += [(1000, 8, 2, -1), (64, 32, 4, -1)]


@pytest.mark.parametrize("quant", [False, True], ids=["bf16", "mxfp4"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: "T{}-E{}-k{}-cap{}".format(*c))
def test_experts_match_reference(case, activation, quant):
    big = DEV == "cuda" and case[0] >= 64
    args = experts_args(*case, activation, quant, bias=sum(case) % 2 == 0, seed=sum(case),
                        d=256 if big else 64, f=512 if big else 96)
    ref = ops.moe_experts.reference(*args)
    with apt_hal.use("cuda-triton", strict=True):
        y = ops.moe_experts(*args)
    assert_experts_close(y, ref)
    kept = int(args[2][-1])
    assert torch.equal(y[kept:], torch.zeros_like(y[kept:]))  # dropped rows are exactly 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "mxfp4"])
def test_experts_other_dtypes(dtype, quant):
    args = experts_args(5, 4, 2, -1, "swiglu", quant, dtype=dtype, seed=11)
    with apt_hal.use("cuda-triton", strict=True):
        y = ops.moe_experts(*args)
    assert_experts_close(y, ops.moe_experts.reference(*args))


# Explicit tiles of each kernel kind: K loops of several steps with no masked tail and with one
# (d=96, F=160: tails of 32; TMA zero-fills the columns past K), several row tiles per expert (the
# m-fastest tile order), partial n tiles (a TMA gate block then reaches into the up rows), one row
# tile per expert with spare programs, the gemv kernel at 1, 2 and 4 rows a tile, and the TMA
# kernel (tensor descriptors; halves layouts only).
TILINGS = {
    "mma-bk32-bm16": (dict(KIND="mma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                      dict(KIND="mma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)),
    "mma-bm32-bn64": (dict(KIND="mma", BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
                      dict(KIND="mma", BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)),
    "mma-bm64-bk128": (dict(KIND="mma", BLOCK_M=64, BLOCK_N=16, BLOCK_K=128),
                       dict(KIND="mma", BLOCK_M=64, BLOCK_N=32, BLOCK_K=64)),
    "tma-bm16-bk32": (dict(KIND="tma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                      dict(KIND="tma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32)),
    "tma-bm64-bn64": (dict(KIND="tma", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
                      dict(KIND="tma", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)),
    "gemv-bm1": (dict(KIND="gemv", BLOCK_M=1, BLOCK_N=16, BLOCK_K=64),
                 dict(KIND="gemv", BLOCK_M=1, BLOCK_N=32, BLOCK_K=128)),
    "gemv-bm2": (dict(KIND="gemv", BLOCK_M=2, BLOCK_N=8, BLOCK_K=128),
                 dict(KIND="gemv", BLOCK_M=2, BLOCK_N=16, BLOCK_K=64)),
    "gemv-bm4": (dict(KIND="gemv", BLOCK_M=4, BLOCK_N=32, BLOCK_K=64),
                 dict(KIND="gemv", BLOCK_M=4, BLOCK_N=8, BLOCK_K=32)),
}
# (tiling, MXFP4 weights, activation): mma takes both weight formats, tma weights in x's dtype
# (gate and up rows in halves), gemv MXFP4 weights.
TILING_CASES = ([(t, q, "gpt_oss_swiglu") for t in TILINGS if t.startswith("mma") for q in (False, True)]
                + [(t, False, a) for t in TILINGS if t.startswith("tma") for a in ("swiglu", "gelu")]
                + [(t, True, "gpt_oss_swiglu") for t in TILINGS if t.startswith("gemv")]
                + [("gemv-bm2", True, "swiglu"), ("gemv-bm4", True, "gelu")])


# TMA tiles read whole tiles of rows: past an expert's last row, the next expert's rows or the
# unwritten activations of dropped rows, whose garbage (NaN under the interpreter) is never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("tiling,quant,activation", TILING_CASES,
                         ids=lambda c: {True: "mxfp4", False: "bf16"}.get(c, c) if isinstance(c, bool) else c)
def test_every_tiling_writes_every_row(tiling, quant, activation):
    """The output is poisoned with NaN: a row or column a tiling misses fails, dropped rows included.
    The gemv kernel, made for a few rows per expert, gets fewer tokens (the interpreter is slow)."""
    t, capacity = (6, 2) if tiling.startswith("gemv") else (40, 15)
    args = experts_args(t, 4, 2, capacity, activation, quant, seed=12, d=96, f=160)
    y = torch.full((2 * t, 96), float("nan"), dtype=torch.bfloat16, device=DEV)
    tiles = tuple(dict(t, num_warps=4, num_stages=2) for t in TILINGS[tiling])
    assert moe.experts(*args, tiles=tiles, out=y) is y
    assert_experts_close(y, ops.moe_experts.reference(*args))


def test_experts_nan_scale_poisons_its_block_only():
    args = list(experts_args(5, 2, 1, -1, "gelu", True, bias=False, seed=13))
    w_down_scales = args[6].clone()
    w_down_scales[:, 3, 0] = mxfp4.E8M0_NAN  # output column 3 of every expert reads a NaN block
    args[6] = w_down_scales
    with apt_hal.use("cuda-triton", strict=True):
        y = ops.moe_experts(*args)
    assert torch.isnan(y[:, 3]).all()
    others = torch.cat([y[:, :3], y[:, 4:]], dim=1)
    ref = ops.moe_experts.reference(*args)
    assert_experts_close(others, torch.cat([ref[:, :3], ref[:, 4:]], dim=1))


def test_gemv_large_activations_times_small_scales_stay_finite():
    """float32 rows near 2^125 through MXFP4 experts with scales near 2^-30 (gelu): every product
    and output is a finite float32, so each block sum scaled to its weights must be too (scaling
    a block sum by 2^14 before the scale overflowed)."""
    args = list(experts_args(1, 2, 1, -1, "gelu", False, dtype=torch.float32, bias=False, seed=14))
    g = gen(15)
    w_up = torch.randn(2, 96, 64, generator=g) * 2.0 ** -30
    w_down = torch.randn(2, 64, 96, generator=g) * 2.0 ** -30
    (args[3], args[5]), (args[4], args[6]) = [[t.to(DEV) for t in mxfp4.quantize(w)] for w in (w_up, w_down)]
    args[0] = args[0] * 2.0 ** 125
    tiles = tuple(dict(t, num_warps=4, num_stages=1) for t in TILINGS["gemv-bm1"])
    y = moe.experts(*args, tiles=tiles)
    ref = ops.moe_experts.reference(*args)
    assert torch.isfinite(ref).all() and torch.isfinite(y).all()
    assert_experts_close(y, ref)


@triton.jit
def _decode_kernel(packed_ptr, scales_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, INTERPRETER: tl.constexpr):
    n = tl.arange(0, N)[:, None]
    packed = tl.load(packed_ptr + n * (K // 2) + tl.arange(0, K // 2)[None, :])
    scales = tl.load(scales_ptr + n * (K // 32) + tl.arange(0, K // 32)[None, :])
    values = dequantize_tile(packed, scales, N, K, out_ptr.dtype.element_ty, INTERPRETER)
    tl.store(out_ptr + n * K + tl.arange(0, K)[None, :], values)


@triton.jit
def _decode_words_kernel(packed_ptr, scales_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr,
                         INTERPRETER: tl.constexpr):
    n = tl.arange(0, N)[:, None]
    words = tl.load(packed_ptr.to(tl.pointer_type(tl.uint32)) + n * (K // 8) + tl.arange(0, K // 8)[None, :])
    scales = tl.load(scales_ptr + n * (K // 32) + tl.arange(0, K // 32)[None, :])
    codes = tl.reshape(float32_codes_from_words(words, INTERPRETER), [N, K // 32, 32])
    values = (codes * WORD_CODE_SCALE) * tl.reshape(e8m0_to_float32(scales), [N, K // 32, 1])
    tl.store(out_ptr + n * K + tl.arange(0, K)[None, :], tl.reshape(values, [N, K]))


def _every_code_and_scale():
    """Every byte value (twice) and scales from the subnormal 2^-127 to 2^127 and NaN."""
    scale_codes = [0, 1, 2, 100, 126, 127, 128, 129, 200, 252, 253, 254, 255, 127, 120, 130]
    packed = (torch.arange(16 * 32) % 256).to(torch.uint8).reshape(16, 32)
    scales = torch.tensor(scale_codes * 2, dtype=torch.uint8).reshape(16, 2)
    return packed, scales


def _assert_bits_equal(out, ref, skip_bf16_subnormals):
    assert torch.equal(out.isnan(), ref.isnan()) and int(ref.isnan().sum()) == 64
    compared = ~ref.isnan()
    if skip_bf16_subnormals:
        # The interpreter's float32 -> bf16 conversion loses bf16 subnormals (|v| < 2^-126; 48 of
        # these 1024 values): compared on a GPU only.
        compared &= (ref == 0) | (ref.float().abs() >= 2.0 ** -126)
    bits = torch.int32 if out.dtype == torch.float32 else torch.int16
    assert torch.equal(out[compared].view(bits), ref[compared].view(bits))  # -0.0 included


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # 6 * 2^127 is inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mxfp4_decode_is_exact(dtype):
    """The in-register decode equals apt_hal.mxfp4.dequantize rounded to the tile's dtype, bit
    for bit: every byte value, scales from the subnormal 2^-127 to 2^127 (products underflowing
    and overflowing), and the NaN scale. (bf16 on a GPU takes the bf16-pair path.)"""
    packed, scales = _every_code_and_scale()
    out = torch.full((16, 64), 7.0, dtype=dtype, device=DEV)
    _decode_kernel[(1,)](packed.to(DEV), scales.to(DEV), out, N=16, K=64, INTERPRETER=DEV == "cpu")
    ref = mxfp4.dequantize(packed, scales, torch.float32).to(dtype).to(DEV)
    _assert_bits_equal(out, ref, DEV == "cpu" and dtype == torch.bfloat16)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_mxfp4_word_decode_is_exact():
    """The gemv kernel's decode (8 codes per 32-bit word, float16 pairs widened to float32, times
    2^14 and the scale) equals apt_hal.mxfp4.dequantize in float32 bit for bit, on the same codes
    and scales as above."""
    packed, scales = _every_code_and_scale()
    out = torch.full((16, 64), 7.0, dtype=torch.float32, device=DEV)
    _decode_words_kernel[(1,)](packed.to(DEV), scales.to(DEV), out, N=16, K=64, INTERPRETER=DEV == "cpu")
    _assert_bits_equal(out, mxfp4.dequantize(packed, scales, torch.float32).to(DEV), False)


@pytest.mark.parametrize("quant", [False, True], ids=["bf16", "mxfp4"])
def test_strided_inputs(quant):
    """Views as models pass them: x a slice of a wider activation, biases and the row order
    strided, the weights of the combine transposed. Results equal those on contiguous copies."""
    x, order, offsets, w_up, w_down, up_s, down_s, b_up, b_down, *rest = experts_args(5, 4, 2, 3, "swiglu", quant,
                                                                                      seed=14)
    wide = torch.cat([x, x], dim=1)
    x_view = wide[:, : x.shape[1]]
    b_up_view = b_up.t().contiguous().t()
    order_view = torch.stack([order, order], dim=1)[:, 0]
    assert not (x_view.is_contiguous() or b_up_view.is_contiguous() or order_view.is_contiguous())
    with apt_hal.use("cuda-triton", strict=True):
        y = ops.moe_experts(x_view, order_view, offsets, w_up, w_down, up_s, down_s, b_up_view, b_down, *rest)
        weights = torch.rand(2, 5, generator=gen(15)).to(DEV).t()
        out = ops.moe_combine(y, order_view, offsets, weights)
    y_ref = ops.moe_experts.reference(x, order, offsets, w_up, w_down, up_s, down_s, b_up, b_down, *rest)
    assert_experts_close(y, y_ref)
    torch.testing.assert_close(out, ops.moe_combine.reference(y, order, offsets, weights.contiguous()),
                               rtol=2 ** -7, atol=1e-6, equal_nan=False)


# ---- combine ------------------------------------------------------------------------------------


COMBINE_CASES = [(1, 4, 2, -1), (5, 8, 2, 1), (33, 4, 1, -1), (33, 8, 2, 5), (33, 1, 1, 0)]
if DEV == "cuda":
    COMBINE_CASES += [(4096, 8, 2, -1), (333, 64, 8, 30)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", COMBINE_CASES, ids=lambda c: "T{}-E{}-k{}-cap{}".format(*c))
def test_combine_matches_reference(case, dtype):
    t, e, k, capacity = case
    d = 1000 if DEV == "cuda" else 72
    g = gen(sum(case))
    order, offsets = ops.moe_permute.reference(skewed_ids(t, e, k, g), e, capacity)
    y = torch.randn(t * k, d, generator=g).to(dtype).to(DEV)
    y[int(offsets[-1]):] = float("nan")  # dropped rows must not be read into the sums
    weights = torch.rand(t, k, generator=g).to(DEV)
    ref = ops.moe_combine.reference(y, order, offsets, weights)
    with apt_hal.use("cuda-triton", strict=True):
        out = ops.moe_combine(y, order, offsets, weights)
    poisoned = torch.full((t, d), float("nan"), dtype=dtype, device=DEV)
    assert moe.combine(y, order, offsets, weights, out=poisoned) is poisoned
    # float32: a few ulps of the partial sums (a GPU fuses the multiply-adds); bf16: one ulp.
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2 ** -7, 1e-6)
    for result in (out, poisoned):
        torch.testing.assert_close(result, ref, rtol=rtol, atol=atol, equal_nan=False)


# ---- the whole layer, what runs, traceable ops --------------------------------------------------


def reference_layer(x, logits, w_up, w_down, w_up_scales=None, w_down_scales=None, b_up=None, b_down=None,
                    top_k=2, scoring="softmax_topk", renormalize=False, activation="swiglu", capacity=-1):
    """The layer composed of the four references, on any device."""
    weights, ids = ops.moe_route.reference(logits, top_k, scoring, renormalize)
    order, offsets = ops.moe_permute.reference(ids, w_up.shape[0], capacity)
    y = ops.moe_experts.reference(x, order, offsets, w_up, w_down, w_up_scales, w_down_scales, b_up, b_down,
                                  top_k, activation)
    return ids, offsets, ops.moe_combine.reference(y, order, offsets, weights)



@pytest.mark.parametrize("quant", [False, True], ids=["bf16", "mxfp4"])
def test_moe_dispatch_on_cuda_triton(quant):
    t, e, k, d, f = 33, 8, 2, 64, 96
    g = gen(21)
    x = torch.randn(t, d, generator=g).bfloat16().to(DEV)
    logits = margin_logits(t, e, torch.float32, g)
    w_up, w_down, up_scales, down_scales, b_up, b_down = make_experts(e, d, f, "gpt_oss_swiglu", quant,
                                                                      torch.bfloat16, True, g)
    kwargs = dict(w_up_scales=up_scales, w_down_scales=down_scales, b_up=b_up, b_down=b_down, top_k=k,
                  scoring="topk_softmax", activation="gpt_oss_swiglu")
    capacity = moe_dispatch_contract.capacity_for(t, k, e, 1.0)
    ref_ids, ref_offsets, ref_out = reference_layer(x, logits, w_up, w_down, **kwargs, capacity=capacity)
    with apt_hal.use("cuda-triton", strict=True):
        out = ops.moe_dispatch(x, logits, w_up, w_down, **kwargs, capacity_factor=1.0)
    assert torch.equal(out.topk_ids, ref_ids)
    assert torch.equal(out.tokens_per_expert, ref_offsets.diff())
    assert int(out.dropped) == t * k - int(ref_offsets[-1]) > 0
    assert rel_err(out.output, ref_out) < 1e-2


def test_the_triton_implementations_are_what_runs():
    t, e, k = 5, 4, 2
    logits = margin_logits(t, e, torch.float32, gen(31))
    args = experts_args(t, e, k, 2, "swiglu", True, seed=31)
    x, order, offsets = args[:3]
    y_in = torch.randn(t * k, x.shape[1], generator=gen(32)).bfloat16().to(DEV)
    weights = torch.rand(t, k, generator=gen(33)).to(DEV)
    calls = {
        ops.moe_route: (moe.moe_route_triton, torch.ops.apt_hal_triton.moe_route, (logits, k, "softmax_topk", True)),
        ops.moe_permute: (moe.moe_permute_triton, torch.ops.apt_hal_triton.moe_permute,
                          (ops.moe_route.reference(logits, k)[1], e, 2)),
        ops.moe_experts: (moe.moe_experts_triton, torch.ops.apt_hal_triton.moe_experts, args),
        ops.moe_combine: (moe.moe_combine_triton, torch.ops.apt_hal_triton.moe_combine,
                          (y_in, order, offsets, weights)),
    }
    for op, (registered, traceable, op_args) in calls.items():
        with apt_hal.use("cuda-triton", strict=True):
            assert registry.select(op, DEV, op_args) is registered
            via_op = op(*op_args)
        direct, traced = registered(*op_args), traceable(*op_args)
        for a, b, c in zip(*(o if isinstance(o, tuple) else (o,) for o in (via_op, direct, traced))):
            assert torch.equal(a, b) and torch.equal(a, c), op.name


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="torch.compile traces into Triton kernels only on a GPU")
@pytest.mark.parametrize("t,quant", [(64, False), (1024, False), (4, True)],
                         ids=["mma", "prefill", "mxfp4-gemv"])
def test_torch_compile_traces_the_triton_ops(t, quant):
    """Each expert kernel kind under torch.compile: 16 rows per expert (tensor-core tiles), 256
    (a prefill shape: eager takes the TMA kernel on Hopper; the triton_op keeps to pointer tiles,
    since a host tensor descriptor needs concrete sizes), 1 with MXFP4 weights (the CUDA-core kernel)."""
    e, k, d, f = 8, 2, 256, 512
    g = gen(41)
    x = torch.randn(t, d, generator=g).bfloat16().to(DEV)
    logits = margin_logits(t, e, torch.float32, g)
    w_up, w_down, up_scales, down_scales, _, _ = make_experts(e, d, f, "swiglu", quant, torch.bfloat16, False, g)

    def layer(x, logits, w_up, w_down, up_scales, down_scales):
        w, ids = torch.ops.apt_hal_triton.moe_route(logits, k, "softmax_topk", True)
        order, offsets = torch.ops.apt_hal_triton.moe_permute(ids, e, -1)
        y = torch.ops.apt_hal_triton.moe_experts(x, order, offsets, w_up, w_down, up_scales, down_scales, None, None,
                                                 k, "swiglu", 1.702, 7.0)
        return torch.ops.apt_hal_triton.moe_combine(y, order, offsets, w)

    out = torch.compile(layer, fullgraph=True)(x, logits, w_up, w_down, up_scales, down_scales)
    *_, ref = reference_layer(x, logits, w_up, w_down, up_scales, down_scales, top_k=k, renormalize=True)
    assert rel_err(out, ref) < 1e-2


# ---- the benchmark's correctness gate -----------------------------------------------------------


def test_benchmark_refuses_a_wrong_kernel(monkeypatch):
    """benchmarks/ops/moe.py checks each shape before timing it: its check passes on the kernels
    and names the step whose output is wrong (a broken kernel is reported, never timed)."""
    bench = importlib.import_module("benchmarks.ops.moe")
    case = bench.Case(tokens=5, d=64, f=96, experts=4, top_k=2, quant=True, activation="gpt_oss_swiglu",
                      bias=True, scoring="topk_softmax", renormalize=False)
    layer = bench.make_layer(case, DEV, seed=0)
    assert bench.check(layer) is None
    right = moe.down_projection

    def scaled_down_projection(*args):  # what the experts launcher calls: args[5] is the output it writes
        right(*args)
        args[5].mul_(1.05)

    monkeypatch.setattr(moe, "down_projection", scaled_down_projection)
    assert bench.check(layer).startswith("experts: relative-norm error")
