"""cuda-triton fp4_matmul kernels against the contract's reference.

Runs under Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)
and unmodified on a CUDA GPU, where the shapes grow. Every case is run through
``apt_hal.use("cuda-triton", strict=True)`` (a fallback to the reference would raise), on fresh
seeded inputs, with outputs compared by relative-norm error and by an element-wise bound (NaN
fails both).

Tolerances. The kernel's products are exact (MXFP4 values are bf16 values and x is split into
exact bf16 parts) and accumulate in fp32, so its result differs from the reference only by the
order of the fp32 additions and by the final rounding to x's dtype (under the interpreter, fp32->bf16
stores truncate: up to one bf16 ulp). Hence, with ulp the relative spacing of x's dtype:
  * relative-norm error < 1e-2 (bf16 results), 2e-3 (fp16), 1e-4 (fp32);
  * element-wise, |out - ref| <= 2 ulp |ref| + (2 ulp + 4 sqrt(K) 2^-24) sum_k |x||w|: the output
    rounding, plus two float32 summation orders (typical error ~ sqrt(K) 2^-24 of sum |terms|).
"""

import dataclasses

import pytest
import torch

import apt_hal
from apt_hal import mxfp4
from apt_hal.backends.cuda_triton import fp4_matmul as kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"
REL_NORM = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}

M_SIZES = [0, 1, 3, 16, 33] + ([128, 600] if GPU else [])
K_SIZES = [32, 96, 256] + ([4096] if GPU else [])
N_SIZES = [1, 17, 64] + ([1000] if GPU else [])


def make_weights(n: int, k: int, gen: torch.Generator, top_code: int = 127 + 3):
    """Random MXFP4 weights: every E2M1 code, scales spread over 2^-12 .. 2^(top_code - 127).
    The default reaches scales above 2, which the kernels handle with a second pass; real
    weights' scales are below 1 (top_code <= 128: the one-pass path)."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.randint(127 - 12, top_code + 1, (n, k // 32), dtype=torch.uint8, generator=gen)
    return packed.to(DEV), scales.to(DEV)


def run(x, packed, scales, bias=None):
    """The cuda-triton implementation through apt_hal's dispatch, fallback forbidden."""
    with apt_hal.use("cuda-triton", strict=True):
        return apt_hal.ops.fp4_matmul(x, packed, scales, bias)


def elementwise_excess(out, ref, x, packed, scales):
    """|out - ref| minus its bound (module docstring), per element; <= 0 where within bounds."""
    k = x.shape[-1]
    magnitude = (x.float().abs().reshape(-1, k) @ mxfp4.dequantize(packed, scales).abs().T).reshape(ref.shape)
    ulp = ULP[x.dtype]
    bound = 2 * ulp * ref.double().abs() + (2 * ulp + 4 * k ** 0.5 * 2.0 ** -24) * magnitude.double()
    return (out.double() - ref.double()).abs() - bound


def check(out, x, packed, scales, bias=None):
    ref = apt_hal.ops.fp4_matmul.reference(x, packed, scales, bias)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    if ref.numel() == 0:
        return
    err = (out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    assert err < REL_NORM[x.dtype], f"relative-norm error {err:.3g}"
    excess = elementwise_excess(out, ref, x, packed, scales)
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} element(s) beyond the bound, worst {excess.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", M_SIZES)
def test_matches_reference_over_shapes(m, dtype):
    gen = torch.Generator().manual_seed(1000 + m)
    for k in K_SIZES:
        for n in N_SIZES:
            packed, scales = make_weights(n, k, gen, top_code=128 if n % 2 else 130)
            x = torch.randn(m, k, generator=gen).to(DEV, dtype)
            bias = torch.randn(n, generator=gen).to(DEV, dtype) if (k + n) % 2 else None
            check(run(x, packed, scales, bias), x, packed, scales, bias)


SCHEDULES = [  # (swap_ab, split_k, x_permuted): both schedules, with and without split-K
    (True, 1, False), (True, 3, False), (True, 1, True), (True, 2, True), (False, 1, False), (False, 2, False)]


@pytest.mark.parametrize("swap_ab,split_k,x_permuted", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_code", [128, 130])  # one pass; a second pass for scales above 2
def test_every_schedule_matches_reference(swap_ab, split_k, x_permuted, dtype, top_code):
    """Each schedule of the kernel, forced through launch(config=...), on odd M and N with a bias.
    K: 3.5 blocks (a partial last block; split-K lowers 3 to a divisor of 4 blocks), or 4 blocks
    where x is permuted (only whole blocks are)."""
    bm, bn, bk = (16, 64, 64) if not GPU else (16 if swap_ab else 64, 64, 128)
    cfg = kernels.TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=4, num_stages=2,
                             swap_ab=swap_ab, split_k=split_k, x_permuted=x_permuted)
    gen = torch.Generator().manual_seed(10 + split_k + top_code)
    m, n, k = (5 if swap_ab else 37), 70, (4 * bk if x_permuted else 7 * bk // 2)
    packed, scales = make_weights(n, k, gen, top_code)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    bias = torch.randn(n, generator=gen).to(DEV, dtype)
    check(kernels.matmul(x, packed, scales, bias, config=cfg), x, packed, scales, bias)


@pytest.mark.parametrize("top_code", [128, 130])
def test_materialize_schedule_matches_reference(top_code):
    """Large-M bf16 schedule: weights dequantized to bf16 by a kernel (exactly), then F.linear.
    K: a partial last dequantization tile; N: a partial last row tile."""
    cfg = kernels.TileConfig(block_m=1, block_n=32, block_k=128 if not GPU else 256, num_warps=4, num_stages=1,
                             swap_ab=False, materialize=True)
    gen = torch.Generator().manual_seed(20 + top_code)
    m, n, k = 9, 70, 3 * cfg.block_k // 2
    packed, scales = make_weights(n, k, gen, top_code)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.bfloat16)
    check(kernels.matmul(x, packed, scales, bias, config=cfg), x, packed, scales, bias)
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.matmul(x.half(), packed, scales, config=cfg)


def test_dequantize_kernel_is_exact():
    """The weights the materialize schedule feeds to cuBLAS equal mxfp4.dequantize bit for bit:
    every E2M1 code, every scale code (0 = 2^-127 subnormal, 0xFF = NaN)."""
    n, k = 40, 256
    packed = torch.arange(n * k // 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, k // 2)
    scales = torch.arange(n * k // 32, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, k // 32)
    packed, scales = packed.to(DEV), scales.to(DEV)
    out = torch.full((n, k), 7.0, dtype=torch.bfloat16, device=DEV)
    kernels._dequantize_kernel[(2, 2)](packed.view(torch.int32), scales, out, n, k, BLOCK_N=32, BLOCK_K=128,
                                        INTERPRETER=kernels.hw.interpreting())
    ref = mxfp4.dequantize(packed, scales, torch.float32)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    assert torch.equal(out.float()[finite], ref[finite])


def test_registered_function_is_what_runs():
    gen = torch.Generator().manual_seed(1)
    packed, scales = make_weights(17, 96, gen)
    x = torch.randn(3, 96, generator=gen).to(DEV, torch.bfloat16)
    direct = kernels.fp4_matmul_triton(x, packed, scales, None)
    torch.testing.assert_close(run(x, packed, scales), direct, rtol=0, atol=0)
    check(direct, x, packed, scales)


@pytest.mark.parametrize("m", [1, 40])  # decode (swap AB, split K) and prefill schedules
def test_every_output_is_written(m, monkeypatch):
    """Outputs are poisoned with NaN before the kernels run: an unwritten element would stay NaN.
    torch.empty is patched for the whole test, so the launcher's output and its split-K partial
    sums (M = 1 splits K here) both start as NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    k = 4096 if GPU else 256
    assert kernels.choose_config(1, 70, k).split_k > 1
    monkeypatch.setattr(torch, "empty", nan_empty)
    gen = torch.Generator().manual_seed(2)
    packed, scales = make_weights(70, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    bias = torch.randn(70, generator=gen).to(DEV, torch.bfloat16)
    check(run(x, packed, scales, bias), x, packed, scales, bias)


def test_leading_batch_dims_and_noncontiguous_x():
    gen = torch.Generator().manual_seed(3)
    packed, scales = make_weights(33, 128, gen)
    big = torch.randn(2, 3, 5, 256, generator=gen).to(DEV, torch.bfloat16)
    x = big[:, :, 1:4, ::2]  # [2, 3, 3, 128], strided in every dimension
    assert not x.is_contiguous()
    out = run(x, packed, scales)
    assert out.shape == (2, 3, 3, 33)
    check(out, x, packed, scales)
    xt = torch.randn(64, 4, generator=gen).to(DEV, torch.float16).T  # [4, 64] column-major
    packed2, scales2 = make_weights(8, 64, gen)
    check(run(xt, packed2, scales2), xt, packed2, scales2)


def test_weights_at_an_odd_storage_offset():
    """The kernels read packed weights as 32-bit words: a view starting mid-word still works."""
    gen = torch.Generator().manual_seed(9)
    packed, scales = make_weights(17, 64, gen)
    storage = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=DEV)
    shifted = storage[1:].view(packed.shape)
    shifted.copy_(packed)
    assert shifted.storage_offset() % 4 and shifted.is_contiguous()
    x = torch.randn(3, 64, generator=gen).to(DEV, torch.bfloat16)
    torch.testing.assert_close(run(x, shifted, scales), run(x, packed, scales), rtol=0, atol=0)


@pytest.mark.parametrize("m", [2, 20])
def test_nan_scale_poisons_exactly_its_outputs(m):
    gen = torch.Generator().manual_seed(4)
    packed, scales = make_weights(20, 96, gen)
    scales[5, 1] = mxfp4.E8M0_NAN
    scales[6, 2] = mxfp4.E8M0_NAN  # a block of +1.0 only, times x > 0: NaN, not +Inf
    packed[6, 32:48] = 0x22
    x = torch.randn(m, 96, generator=gen).to(DEV, torch.bfloat16).abs()
    out = run(x, packed, scales)
    assert torch.isnan(out[:, 5:7]).all()
    finite = (torch.arange(20, device=DEV) < 5) | (torch.arange(20, device=DEV) > 6)
    assert not torch.isnan(out[:, finite]).any()
    check(out[:, finite], x, packed[finite], scales[finite])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_extreme_scales_and_special_x_values(dtype):
    """Scale codes 0 (2^-127, subnormal), 1 and 245 (sums stay below float32's max, so no
    summation order can overflow); zero weights; Inf and NaN in x propagate as in the reference."""
    gen = torch.Generator().manual_seed(5)
    k = 64
    packed, scales = make_weights(6, k, gen)
    scales[0] = 0
    scales[1] = 1
    scales[2] = 245
    packed[3] = 0  # +0 everywhere
    x = torch.rand(4, k, generator=gen).to(DEV, dtype) + 0.5
    x[1, 7] = float("inf")
    x[2, 9] = float("nan")
    out = run(x, packed, scales)
    ref = apt_hal.ops.fp4_matmul.reference(x, packed, scales)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    # Rows 0 and 1 of w are tiny (scales 2^-127, 2^-126): the bound is relative to each output's
    # own magnitude, so they are checked as strictly as the others.
    finite = torch.isfinite(ref)
    excess = elementwise_excess(out, ref, x, packed, scales)[finite]
    assert (excess <= 0).all(), f"worst excess {excess.max().item():.3g}"


@pytest.mark.parametrize("m", [1, 20])
def test_float32_subnormal_activations_times_huge_weights(m):
    """fp32 x below 2^-126 with weights near 2^120: bf16 parts cannot hold x's low bits unless the
    kernel lifts such rows first; the outputs are ordinary numbers and must match."""
    gen = torch.Generator().manual_seed(8)
    packed, scales = make_weights(24, 128, gen)
    scales.fill_(245)
    x = (torch.rand(m, 128, generator=gen) * 2 - 1).to(DEV) * 2.0 ** -127
    x[0, :64] *= 2.0 ** 60  # a row mixing tiny and small values
    check(run(x, packed, scales), x, packed, scales)


def test_torch_fp4_dtype_views_are_accepted():
    if not mxfp4.HAS_TORCH_FP4:
        pytest.skip(f"torch {torch.__version__} has no float4_e2m1fn_x2 dtype")
    gen = torch.Generator().manual_seed(6)
    packed, scales = make_weights(17, 64, gen)
    x = torch.randn(3, 64, generator=gen).to(DEV, torch.bfloat16)
    p4, s8 = mxfp4.to_torch_dtypes(packed, scales)
    torch.testing.assert_close(run(x, p4, s8), run(x, packed, scales), rtol=0, atol=0)


def test_triton_op_matches_the_eager_launcher():
    """torch.ops.apt_hal_triton.fp4_matmul launches the same kernels through wrap_triton."""
    gen = torch.Generator().manual_seed(7)
    packed, scales = make_weights(17, 96, gen)
    x = torch.randn(3, 96, generator=gen).to(DEV, torch.bfloat16)
    bias = torch.randn(17, generator=gen).to(DEV, torch.bfloat16)
    torch.testing.assert_close(torch.ops.apt_hal_triton.fp4_matmul(x, packed, scales, bias),
                               kernels.fp4_matmul_triton(x, packed, scales, bias), rtol=0, atol=0)


def test_empty_k_gives_the_bias():
    x = torch.randn(3, 0, device=DEV, dtype=torch.bfloat16)
    packed = torch.zeros(5, 0, dtype=torch.uint8, device=DEV)
    scales = torch.zeros(5, 0, dtype=torch.uint8, device=DEV)
    bias = torch.randn(5, device=DEV, dtype=torch.bfloat16)
    torch.testing.assert_close(run(x, packed, scales, bias), bias.expand(3, 5), rtol=0, atol=0)


def test_config_choice_splits_k_only_when_tiles_are_few():
    """Split-K engages when the M x N tiles cannot fill the GPU, never beyond one wave of programs
    or K / (16 M) (partial sums' traffic at most the weight bytes), and not at all for large M,
    where bf16 x takes the materialize schedule."""
    hw = kernels.hw
    for m, n, k in [(1, 1024, 8192), (16, 1024, 14336), (5, 512, 4096)]:
        cfg = kernels.choose_config(m, n, k)
        gemv = m <= hw.FP4_MATMUL_GEMV_MAX_M  # the CUDA-core GEMV, one row: M = 1 by default
        assert cfg.cuda_core == gemv and cfg.swap_ab != gemv
        per_sm = hw.FP4_MATMUL_GEMV_PROGRAMS_PER_SM if gemv else hw.FP4_MATMUL_PROGRAMS_PER_SM
        tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
        assert 1 < cfg.split_k <= k // (16 * m)
        assert tiles * cfg.split_k <= hw.device_properties()["sm_count"] * per_sm
        assert cfg.fused_reduce == (hw.FP4_MATMUL_FUSED_REDUCE and m <= hw.FP4_MATMUL_FUSED_REDUCE_MAX_M)
    assert kernels.choose_config(4096, 8192, 8192).materialize
    fused = kernels.choose_config(4096, 8192, 8192, torch.float16)
    assert not fused.materialize and not fused.swap_ab and fused.split_k == 1


# ---- decode schedules: fused split-K reduction, CUDA-core GEMV ---------------------------------


def _decode_config(kind: str, m: int, split_k: int, fused_reduce: bool) -> kernels.TileConfig:
    """A decode-sized schedule of each kernel: "swap" (tensor cores, weight tile left), "prefill"
    (tensor cores, x tile left) or "gemv" (CUDA cores, block_m rounded up to 1, 2 or 4)."""
    bk = 64 if not GPU else 128
    if kind == "gemv":
        return kernels.TileConfig(block_m=1 if m <= 1 else 2 if m <= 2 else 4, block_n=16, block_k=bk, num_warps=4,
                                  num_stages=1, swap_ab=False, split_k=split_k, fused_reduce=fused_reduce,
                                  cuda_core=True)
    return kernels.TileConfig(block_m=16, block_n=32 if not GPU else 64, block_k=bk, num_warps=4, num_stages=2,
                              swap_ab=kind == "swap", split_k=split_k, fused_reduce=fused_reduce)


def _nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating tensors (outputs and split-K partials): an
    element no kernel writes stays NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def _counters_are_zero():
    return all(int(c.abs().sum()) == 0 for held in kernels._SPLIT_COUNTERS.values() for c in held)


@pytest.mark.parametrize("kind", ["swap", "prefill", "gemv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_reduce_equals_the_two_kernel_sum_bit_for_bit(kind, dtype, monkeypatch):
    """The last program of each tile adds the partials in split order: the same bits as the
    separate sum kernel, every output written (outputs and partials start as NaN), and the
    counters back at zero after each call (a captured CUDA graph replays on the same buffer).
    K: 7 blocks of 32 more than 3 whole K tiles (a partial last tile, split 3 lowered to 2)."""
    _nan_empty(monkeypatch)
    gen = torch.Generator().manual_seed(30)
    m = 3 if kind == "gemv" else 5
    n, k = 71, 7 * (64 if not GPU else 128) // 2
    packed, scales = make_weights(n, k, gen, top_code=130)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    bias = torch.randn(n, generator=gen).to(DEV, dtype)
    for with_bias in (None, bias):
        separate = kernels.matmul(x, packed, scales, with_bias, config=_decode_config(kind, m, 3, False))
        for _ in range(2):  # the second call reuses the counters the first left at zero
            fused = kernels.matmul(x, packed, scales, with_bias, config=_decode_config(kind, m, 3, True))
            assert _counters_are_zero()
            assert torch.equal(fused, separate)
        check(fused, x, packed, scales, with_bias)


@pytest.mark.skipif(not GPU, reason="two CUDA streams running at once need a GPU")
def test_fused_reduce_on_two_streams_at_once():
    """Fused split-K launches queued on two streams at the same time (the reduction is on by
    default) each give the bits of the two-kernel sum: each stream has its own counters."""
    gen = torch.Generator().manual_seed(31)
    n, k = 4096, 8192
    packed, scales = make_weights(n, k, gen, top_code=130)
    xs = [torch.randn(1, k, generator=gen).to(DEV, torch.bfloat16) for _ in range(2)]
    fused, separate = (_decode_config("gemv", 1, 8, True), _decode_config("gemv", 1, 8, False))
    expected = [kernels.matmul(x, packed, scales, config=separate) for x in xs]
    streams = [torch.cuda.Stream() for _ in xs]
    outs = [[], []]
    torch.cuda.synchronize()
    for _ in range(50):
        for i, (x, stream) in enumerate(zip(xs, streams)):
            with torch.cuda.stream(stream):
                outs[i].append(kernels.matmul(x, packed, scales, config=fused))
    torch.cuda.synchronize()
    for want, got in zip(expected, outs):
        assert all(torch.equal(out, want) for out in got)
    assert _counters_are_zero()


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])  # 6: two row tiles of 4
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("split_k,fused_reduce", [(1, False), (3, False), (2, True)])
def test_cuda_core_schedule_matches_reference(m, dtype, split_k, fused_reduce):
    """The CUDA-core GEMV on odd N with a bias, K 3.5 tiles (a partial last tile), scales up to 8
    (codes above 128, which only the tensor-core kernel treats separately)."""
    gen = torch.Generator().manual_seed(40 + m + split_k)
    cfg = _decode_config("gemv", m, split_k, fused_reduce)
    n, k = 37, 7 * cfg.block_k // 2
    packed, scales = make_weights(n, k, gen, top_code=130)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    bias = torch.randn(n, generator=gen).to(DEV, dtype)
    check(kernels.matmul(x, packed, scales, bias, config=cfg), x, packed, scales, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_core_extreme_scales_nan_blocks_and_special_x(dtype):
    """Scale codes 0 (2^-127), 1 and 245 (above 240: the two-factor scaling), a NaN scale block
    (NaN in exactly its outputs), Inf and NaN in x as in the reference."""
    gen = torch.Generator().manual_seed(50)
    cfg = _decode_config("gemv", 4, 2, True)
    n, k = 8, 2 * cfg.block_k
    packed, scales = make_weights(n, k, gen)
    scales[0] = 0
    scales[1] = 1
    scales[2] = 245
    scales[3, 1] = mxfp4.E8M0_NAN
    x = torch.rand(4, k, generator=gen).to(DEV, dtype) + 0.5
    x[1, 7] = float("inf")
    x[2, 9] = float("nan")
    out = kernels.matmul(x, packed, scales, config=cfg)
    ref = apt_hal.ops.fp4_matmul.reference(x, packed, scales)
    assert torch.isnan(out[:, 3]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    finite = torch.isfinite(ref)
    excess = elementwise_excess(out, ref, x, packed, scales)[finite]
    assert (excess <= 0).all(), f"worst excess {excess.max().item():.3g}"


def test_cuda_core_large_x_times_small_scales_does_not_overflow():
    """x near 2^125 with scales 2^-27: every product and sum is a finite float32, and so must be
    each block's scaled sum (scaling the block sum by 2^14 before the scale would overflow)."""
    gen = torch.Generator().manual_seed(51)
    cfg = _decode_config("gemv", 1, 1, False)
    n, k = 16, cfg.block_k
    packed, scales = make_weights(n, k, gen)
    packed.fill_(0x77)  # every code 6.0: the largest block sums
    scales.fill_(100)
    x = torch.full((1, k), 2.0 ** 125, device=DEV)
    out = kernels.matmul(x, packed, scales, config=cfg)
    assert torch.isfinite(out).all()
    check(out, x, packed, scales)


def test_cuda_core_schedule_rejects_other_row_counts():
    cfg = dataclasses.replace(_decode_config("gemv", 1, 1, False), block_m=8)
    gen = torch.Generator().manual_seed(52)
    packed, scales = make_weights(16, 64, gen)
    with pytest.raises(ValueError, match="block_m 1, 2 or 4"):
        kernels.matmul(torch.randn(1, 64, device=DEV), packed, scales, config=cfg)


def test_default_decode_schedule_is_the_gemv_at_one_row_and_fused_up_to_16_rows():
    """The defaults the H100 decode sweep chose (hw.py): one row takes the CUDA-core GEMV, 2 to 16
    rows the tensor cores, split-K partials added by the fused reduction in both (not beyond 16 rows)."""
    for m in (1, 4, 16):
        cfg = kernels.choose_config(m, 1024, 8192)
        assert cfg.cuda_core == (m == 1) and cfg.swap_ab == (m > 1)
        assert cfg.fused_reduce and cfg.split_k > 1
    assert not kernels.choose_config(128, 8192, 8192).fused_reduce  # slower there (hw.py)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_switches_select_the_decode_schedules(dtype, monkeypatch):
    """With the hw switches on, M <= GEMV_MAX_M takes the CUDA-core GEMV (every x dtype, rows per
    tile 1, 2 or 4), larger decode M the tensor cores, both with the fused reduction; the
    registered op then matches the reference and leaves the counters at zero."""
    monkeypatch.setattr(kernels.hw, "FP4_MATMUL_FUSED_REDUCE", True)
    monkeypatch.setattr(kernels.hw, "FP4_MATMUL_GEMV_MAX_M", 4)
    for m, block_m in [(1, 1), (2, 2), (3, 4), (4, 4)]:
        cfg = kernels.choose_config(m, 1024, 8192, dtype)
        assert cfg.cuda_core and cfg.block_m == block_m and cfg.fused_reduce and cfg.split_k > 1
    cfg = kernels.choose_config(5, 1024, 8192, dtype)
    assert cfg.swap_ab and not cfg.cuda_core and cfg.fused_reduce
    gen = torch.Generator().manual_seed(53)
    k = 4096 if GPU else 256
    packed, scales = make_weights(70, k, gen)
    bias = torch.randn(70, generator=gen).to(DEV, dtype)
    for m in (1, 3, 5):
        assert kernels.choose_config(m, 70, k, dtype).split_k > 1
        x = torch.randn(m, k, generator=gen).to(DEV, dtype)
        check(run(x, packed, scales, bias), x, packed, scales, bias)
        assert _counters_are_zero()


def test_bad_schedule_switch_in_the_environment_is_rejected(monkeypatch):
    monkeypatch.setenv("APT_HAL_FP4_MATMUL_GEMV_MAX_M", "8")
    with pytest.raises(ValueError, match="APT_HAL_FP4_MATMUL_GEMV_MAX_M must be one of 0, 1, 2, 3, 4"):
        kernels.hw._env_choice("APT_HAL_FP4_MATMUL_GEMV_MAX_M", "0", ("0", "1", "2", "3", "4"))


@pytest.mark.skipif(not GPU, reason="torch.compile traces into Triton kernels only on a GPU")
@pytest.mark.parametrize("m", [1, 16, 128], ids=["gemv", "swap-fused", "prefill"])
def test_torch_compile_traces_each_default_schedule(m):
    """torch.compile(fullgraph) of the traceable op gives eager's bits with each default schedule:
    M = 1 the CUDA-core GEMV (Inductor rebuilds its source from the helpers' names: it once failed
    with "NameError: nvidia_ptx is not defined"), M = 16 the fused split-K tensor-core tile, M = 128
    the prefill tiles with the two-kernel reduction."""
    gen = torch.Generator().manual_seed(60 + m)
    n, k = 1024, 4096
    packed, scales = make_weights(n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.bfloat16)
    op = torch.ops.apt_hal_triton.fp4_matmul
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
    torch.testing.assert_close(compiled(x, packed, scales, bias), op(x, packed, scales, bias), rtol=0, atol=0)
