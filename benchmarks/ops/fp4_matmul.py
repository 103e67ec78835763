"""Benchmark: cuda-triton ``fp4_matmul`` (MXFP4 weights, bf16 activations) against bf16
``F.linear`` on the dequantized weight (cuBLAS), against "dequantize, then ``F.linear``" as users
write it today, and against gemlite's ``A16W4_MXFP`` Triton kernel (pip ``gemlite``) on the same
packed weights and scales, all timed in the same run the same way with the harness (CUDA graphs,
rotating inputs: enough weight copies to exceed the L2 cache twice). Where gemlite is not
installed its column says so; a gemlite result is held to the norm bound below before it is timed.

Shapes (the issue): (K, N) in {(8192, 8192), (4096, 14336), (14336, 4096)}, M in {1, 16, 128, 4096}.
Targets, as speed-ups over bf16 cuBLAS: M = 1 and 16 >= 3.0x, M = 128 >= 1.8x, M = 4096 >= 0.97x.
% ceiling: for M <= 16, weight bytes (N*K/2 + N*K/32) per second against the measured copy rate;
for larger M, TFLOP/s (2*M*N*K) against the measured bf16 GEMM rate.

Before a shape is timed, apt_hal's result is checked against the contract's reference (float32
dequantization and float32 matmul) on the GPU with the bounds of tests/test_cuda_triton_fp4_matmul.py:
relative-norm error < 1e-2 (bf16 results), and element-wise |out - ref| <= 2 ulp |ref| +
(2 ulp + 4 sqrt(K) 2^-24) sum_k |x||w| (output rounding plus float32 accumulation order); the bf16
cuBLAS baseline is held to the norm bound. A wrong result raises instead of
reporting a time. ``gpu_checks`` first runs GPU-size cases the interpreter tests cannot afford
(fp16 / fp32 x, bias, odd N, a partial last K block, scale codes 0..230, float32 subnormal x,
every schedule -- x permuted or not, materialize -- with scales up to 1 and up to 8, which the
kernel computes in one and two passes) and torch.compile of the triton_op (decode, materialize).

Run from the repository root on a GPU:
``python -m benchmarks.ops.fp4_matmul [--quick] [--sweep [all|decode]] [--no-table]``; ``--tiny`` is
a CPU smoke test (K = N = 256, M = 1 and 16, host clock, no GPU checks). ``--sweep`` also times
other tile schedules on the shapes of SWEEP_SHAPES (tuning data for hw.fp4_matmul_tiles), and
what decode spends outside its main kernel; ``--sweep decode`` only the decode shapes of issue 16
(DECODE_SWEEP_SHAPES: the three (K, N) at M = 1 and 16, and M = 128 at K = N = 8192), and
``--no-table`` skips the GPU checks and the table. Each sweep line is one schedule
(:func:`describe`): ``mma`` the tensor-core kernel (``swap=1``: the decode schedule, weight tile on
the left; ``xperm=1``: x permuted before the launch), ``gemv`` the CUDA-core GEMV; ``bm bn bk``
its tile (M rows, N rows, K per step), ``warps`` and ``stages`` its launch, ``split`` the split-K
programs per tile, then how their partials are added: ``+sum-kernel`` by a second kernel,
``fused`` by the last program of each tile; then microseconds per call, % of the copy ceiling
(M <= 16) or TFLOP/s, the speed-up over bf16 cuBLAS (timed on the same shape, printed first),
and ``(default)`` on choose_config's choice.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
import triton

import apt_hal
from apt_hal import mxfp4, ops
from apt_hal.backends.cuda_triton import fp4_matmul as kernels
from benchmarks import harness

SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096)]  # (K, N)
ROWS = [1, 16, 128, 4096]
TARGET_SPEEDUP = {1: 3.0, 16: 3.0, 128: 1.8, 4096: 0.97}  # over bf16 cuBLAS (issue 16)
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}
REL_NORM = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


# ---- inputs and checks --------------------------------------------------------------------------


def make_weights(n: int, k: int, gen: torch.Generator, top_code: int = 127):
    """MXFP4 weights on ``gen``'s device: every E2M1 code, scales over 2^-10 .. 2^(top_code - 127)
    (the default: typical LLM weights)."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=gen.device, generator=gen)
    scales = torch.randint(117, top_code + 1, (n, k // mxfp4.BLOCK), dtype=torch.uint8, device=gen.device,
                           generator=gen)
    return packed, scales


def weight_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * k // mxfp4.BLOCK


def check(name, out, x, packed, scales, bias=None, elementwise=True):
    """Raise unless ``out`` matches the contract's reference (bounds in the module docstring)."""
    ref = ops.fp4_matmul.reference(x, packed, scales, bias)
    if out.shape != ref.shape or out.dtype != ref.dtype:
        raise AssertionError(f"{name}: got {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    if not rel < REL_NORM[x.dtype]:  # written so that NaN fails too
        raise AssertionError(f"{name}: relative-norm error {rel:.2e} >= {REL_NORM[x.dtype]}; not timed")
    if elementwise:
        k = x.shape[-1]
        w = mxfp4.dequantize(packed, scales, torch.float32)
        magnitude = (x.float().abs().reshape(-1, k) @ w.abs().T).reshape(ref.shape).double()
        ulp = ULP[x.dtype]
        bound = 2 * ulp * ref.double().abs() + (2 * ulp + 4 * k ** 0.5 * 2.0 ** -24) * magnitude
        excess = (out.double() - ref.double()).abs() - bound
        if not excess.max().item() <= 0:
            raise AssertionError(f"{name}: {(excess > 0).sum().item()} element(s) off the reference beyond "
                                 f"the bound (worst excess {excess.max().item():.3g}); not timed")


def fp4_linear(x, packed, scales, bias=None):
    if not x.is_cuda:  # the CPU smoke test: whichever backend the registry picks there
        return ops.fp4_matmul(x, packed, scales, bias)
    with apt_hal.use("cuda-triton", strict=True):
        return ops.fp4_matmul(x, packed, scales, bias)


GEMLITE = "gemlite A16W4_MXFP"


def gemlite_layer(packed, scales):
    """gemlite's A16W4_MXFP layer on apt_hal's MXFP4 weights, or why there is none (a string).

    gemlite takes pre-packed weights as they are here (uint8 [N, K/2], two E2M1 codes a byte, low
    nibble first, its code order) and the E8M0 scales [N, K/32] as ``torch.float8_e8m0fnu``: it
    converts whatever dtype it is given to that one, so uint8 codes would be read as numbers."""
    try:
        from gemlite.helper import A16W4_MXFP
    except ImportError:
        return "not installed"
    return A16W4_MXFP(device=str(packed.device), dtype=torch.bfloat16).from_packed_weights(
        packed, scales.view(torch.float8_e8m0fnu))


def time_gemlite(make, label: str, set_bytes: int):
    """gemlite's microseconds per call on rotating weight sets, checked first; or why not (a string).
    A gemlite failure (its import, its kernels, a wrong result) fills its column and the log, and
    leaves the other columns to be timed."""
    if not torch.cuda.is_available():
        return "GPU only"  # gemlite imports and runs only with CUDA
    try:
        x, packed, scales = make()
        layer = gemlite_layer(packed, scales)
        if isinstance(layer, str):
            return layer
        check(f"gemlite {label}", layer(x), x, packed, scales, elementwise=False)

        def make_layer():
            x_, packed_, scales_ = make()
            return x_, gemlite_layer(packed_, scales_)
        return harness.time_calls(harness.rotating(make_layer, lambda x_, layer_: layer_(x_), set_bytes))
    except Exception as e:  # a baseline's failure is reported, not fatal
        print(f"gemlite {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
              flush=True)
        return f"failed ({type(e).__name__})"


def dequantize_then_linear(x, packed, scales):
    """What users write today: materialize the bf16 weight, then cuBLAS."""
    return F.linear(x, mxfp4.dequantize(packed, scales, x.dtype))


def gpu_checks() -> None:
    """GPU-size correctness cases beyond the timed shapes; raises on the first wrong result."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, k, n in [(1, 4096 + 32, 1000), (16, 8192, 4097), (300, 4096 + 96, 1000), (700, 4096 + 32, 1000)]:
            packed, scales = make_weights(n, k, gen)
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
            check(f"fp4_matmul {dtype} M={m} K={k} N={n}", fp4_linear(x, packed, scales, bias),
                  x, packed, scales, bias)
    packed, scales = make_weights(1000, 4096, gen)
    scales = torch.randint(0, 231, scales.shape, dtype=torch.uint8, device="cuda", generator=gen)
    x = torch.randn(5, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    check("fp4_matmul scale codes 0..230 (subnormal 2^-127 included)", fp4_linear(x, packed, scales), x, packed, scales)
    scales.fill_(245)
    x = (torch.rand(20, 4096, device="cuda", generator=gen) - 0.5) * 2.0 ** -126  # float32 subnormals
    check("fp4_matmul float32 subnormal x, weights ~2^120", fp4_linear(x, packed, scales), x, packed, scales)
    for swap, split, x_permuted in [(True, 1, False), (True, 4, False), (True, 2, True), (False, 1, False),
                                    (False, 3, False)]:
        cfg = kernels.TileConfig(block_m=16 if swap else 128, block_n=128, block_k=128, num_warps=8,
                                 num_stages=3, swap_ab=swap, split_k=split, x_permuted=x_permuted)
        k = 4096 if x_permuted else 4096 + 64  # only whole K blocks are permuted
        for top_code in (127, 130):  # one pass; a second pass for scales above 2
            packed, scales = make_weights(1000, k, gen, top_code)
            x = torch.randn(40, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            check(f"fp4_matmul schedule {cfg}, scales up to 2^{top_code - 127}",
                  kernels.matmul(x, packed, scales, config=cfg), x, packed, scales)
    cfg = kernels.TileConfig(**kernels.hw.FP4_MATMUL_MATERIALIZE_TILE)
    packed, scales = make_weights(1000, 4096 + 32, gen, 130)
    x = torch.randn(40, 4096 + 32, device="cuda", dtype=torch.bfloat16, generator=gen)
    check(f"fp4_matmul schedule {cfg}", kernels.matmul(x, packed, scales, config=cfg), x, packed, scales)
    print("gpu checks: fp4_matmul matches the reference (bf16/fp16/fp32, bias, odd K and N, extreme scales, "
          "subnormal x, every schedule)", flush=True)
    packed, scales = make_weights(512, 1024, gen)
    try:
        compiled = torch.compile(lambda a: torch.ops.apt_hal_triton.fp4_matmul(a, packed, scales) * 2,
                                 fullgraph=True, dynamic=False)
        for m in (16, 600):  # decode (split-K), materialize
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
            torch.testing.assert_close(compiled(x), 2 * kernels.matmul(x, packed, scales), rtol=0, atol=0)
        print("gpu checks: torch.compile(fullgraph) of torch.ops.apt_hal_triton.fp4_matmul matches eager", flush=True)
    except Exception as e:  # reported, not fatal: it is not a wrong kernel result
        print(f"gpu checks: torch.compile of the triton_op FAILED: {type(e).__name__}: {e}", flush=True)


# ---- timing -------------------------------------------------------------------------------------


def _row(ceilings: harness.Ceilings, m: int, k: int, n: int, device: str = "cuda") -> harness.Row:
    gen = torch.Generator(device=device).manual_seed(m * 7 + k + n)

    def make():
        packed, scales = make_weights(n, k, gen)
        return torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen), packed, scales

    x, packed, scales = make()
    label = f"M={m} K={k} N={n}"
    check(f"apt_hal {label}", fp4_linear(x, packed, scales), x, packed, scales)
    w_bf16 = mxfp4.dequantize(packed, scales, torch.bfloat16)
    check(f"bf16 cuBLAS {label}", F.linear(x, w_bf16), x, packed, scales, elementwise=False)
    del w_bf16

    set_bytes = weight_bytes(n, k) + 2 * m * (k + n)
    ours = harness.time_calls(harness.rotating(make, fp4_linear, set_bytes))

    def make_bf16():
        x_, packed_, scales_ = make()
        return x_, mxfp4.dequantize(packed_, scales_, torch.bfloat16)

    baselines = {
        "bf16 cuBLAS": harness.time_calls(harness.rotating(make_bf16, F.linear, 2 * (n * k + m * (k + n)))),
        "dequant+linear": harness.time_calls(harness.rotating(make, dequantize_then_linear, set_bytes)),
        GEMLITE: time_gemlite(make, label, set_bytes),
    }
    speedup = baselines["bf16 cuBLAS"] / ours
    if m <= 16:
        pct, ceiling = 100 * weight_bytes(n, k) / ours / 1e3 / ceilings.copy_gbps, "copy"
    else:
        pct, ceiling = 100 * 2 * m * n * k / ours / 1e6 / ceilings.gemm_tflops, "gemm"
    target = TARGET_SPEEDUP[m]
    return harness.Row(ops.fp4_matmul.name, f"{label} bf16", ours, baselines, pct, ceiling,
                       f">= {target:g}x bf16 cuBLAS", speedup >= target)


TINY_SHAPES, TINY_ROWS = [(256, 256)], [1, 16]


def run(ceilings: harness.Ceilings, quick: bool = False, tiny: bool = False) -> list[harness.Row]:
    if tiny:  # CPU smoke test: the table's columns on tiny shapes, host clock
        return [_row(ceilings, m, k, n, device="cpu") for k, n in TINY_SHAPES for m in TINY_ROWS]
    gpu_checks()
    shapes = SHAPES[:1] if quick else SHAPES
    return [_row(ceilings, m, k, n) for k, n in shapes for m in ROWS]


# ---- tuning data ----------------------------------------------------------------------------------


def check_decode_schedules() -> None:
    """Before the sweep, at GPU sizes (a bias, N = 1000, a partial last K tile): the fused
    split-K reduction gives the bits of the two-kernel one with all SMs racing for the counters,
    and leaves them at zero; the CUDA-core GEMV matches the reference for every x dtype. A failure
    is printed, not raised: these schedules are off by default, and the sweep goes on (its lines
    for a failing schedule say FAILED)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    k, n = 8192 - 64, 1000  # every tile below splits K as asked: 64, 32 or 16 K tiles, the last partial
    packed, scales = make_weights(n, k, gen, 130)
    cases = [(_config(16, 128, 128, 8, 4, True, 8, fused=True), 16, torch.bfloat16),
             (_gemv(1, 32, 256, 4, 1, 4), 1, torch.bfloat16), (_gemv(1, 32, 512, 4, 1, 4), 1, torch.float32),
             (_gemv(4, 32, 256, 4, 1, 4), 3, torch.float16)]
    for cfg, m, dtype in cases:
        assert kernels.effective_split(cfg, k) == cfg.split_k
        name = f"sweep check fp4_matmul {describe(cfg)} {dtype} M={m}"
        try:
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
            fused = kernels.matmul(x, packed, scales, bias, config=cfg)
            check(name, fused, x, packed, scales, bias)
            if any(c.any() for held in kernels._SPLIT_COUNTERS.values() for c in held):
                raise AssertionError("split-K counters not left at zero")
            if dtype == torch.bfloat16:
                separate = kernels.matmul(x, packed, scales, bias, config=dataclasses.replace(cfg, fused_reduce=False))
                if not torch.equal(fused, separate):
                    raise AssertionError("the fused reduction differs from the two-kernel one")
            print(f"{name}: ok", flush=True)
        except Exception as e:
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)


def _config(bm, bn, bk, warps, stages, swap, split, x_permuted=False, fused=False):
    return kernels.TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                              swap_ab=swap, split_k=split, x_permuted=x_permuted, fused_reduce=fused)


def _gemv(bm, bn, bk, warps, stages, split):
    return kernels.TileConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                              swap_ab=False, split_k=split, fused_reduce=True, cuda_core=True)


# CUDA-core GEMV tiles (block_n, block_k, warps, stages) for M <= 4: hw.FP4_MATMUL_GEMV_TILE, the
# MoE decode GEMV's tiles (hw.MOE_GEMV_TILES) and their neighbours, each with the split-K of
# choose_config's rule and with whole rows of K (split 1: no partial sums at all). One stage:
# Triton pipelines only loads that feed tl.dot (more stages compile to the same code); the
# kernel loads one step ahead itself. ptxas (sm_90a, M = 1): 92, 160, 95 and 145 registers.
GEMV_TILES = [(32, 256, 4, 1), (32, 512, 4, 1), (16, 512, 4, 1), (64, 256, 4, 1)]


def _decode_candidates(m: int, k: int, n: int) -> list[kernels.TileConfig]:
    """Issue 16's decode candidates (M <= 16): the default (two kernels: split-K partials, then
    their sum), the same with the fused reduction, fused tensor-core tiles around it, and for
    M <= 4 the CUDA-core GEMV with the fused reduction."""
    auto = kernels.choose_config(m, n, k)
    configs = [auto, dataclasses.replace(auto, fused_reduce=True)]
    tc = [(16, 128, 128, 8, 4, split) for split in (2, 8)] + [(16, 64, 128, 4, 4, 8), (16, 64, 256, 4, 3, 8)]
    configs += [_config(*tile[:5], True, tile[5], fused=True) for tile in tc]
    if m <= 4:
        block_m = 1 if m <= 1 else 2 if m <= 2 else 4
        for bn, bk, warps, stages in GEMV_TILES:
            tile = _gemv(block_m, bn, bk, warps, stages, 1)
            configs += [tile, dataclasses.replace(tile, split_k=kernels.split_to_fill(tile, m, n, k))]
    configs = [dataclasses.replace(c, split_k=kernels.effective_split(c, k)) for c in configs]
    return list(dict.fromkeys(c if c.split_k > 1 else dataclasses.replace(c, fused_reduce=False) for c in configs))


def _candidates(m: int, k: int, n: int) -> list[kernels.TileConfig]:
    """The default schedule first, then others around it (few: every one compiles anew)."""
    if m <= 16:
        return _decode_candidates(m, k, n)
    configs = [kernels.choose_config(m, n, k)]
    if m <= 128:
        auto = configs[0]
        if auto.split_k > 1:
            configs.append(dataclasses.replace(auto, fused_reduce=True))
        configs += [_config(128, 128, 64, 8, 3, False, split) for split in (2, 4)]
        configs += [_config(128, 128, 128, 8, 3, False, 2)]
        configs += [_config(128, 128, 64, 8, 3, True, split, True) for split in (1, 2, 4)]
        configs += [_config(128, 64, 64, 4, 4, True, split, True) for split in (2, 4)]
        configs += [_config(128, 128, 64, 8, 3, True, 2, False)]
    else:
        configs += [_config(128, 128, 64, 4, 3, False, 1), _config(256, 128, 64, 8, 3, False, 1),
                    kernels.TileConfig(**kernels.hw.FP4_MATMUL_MATERIALIZE_TILE)]
    return list(dict.fromkeys(configs))


# (M, K, N): issue 16's decode shapes first, then where prefill schedules and materialize cross over.
DECODE_SWEEP_SHAPES = [(m, k, n) for k, n in SHAPES for m in (1, 16)] + [(128, 8192, 8192)]
SWEEP_SHAPES = DECODE_SWEEP_SHAPES + [(256, 8192, 8192), (512, 8192, 8192), (4096, 8192, 8192)]


def describe(cfg: kernels.TileConfig) -> str:
    """A candidate's label in the sweep's lines (the module docstring says what each field means)."""
    if cfg.materialize:
        return f"materialize (dequantize bn={cfg.block_n} bk={cfg.block_k}, cuBLAS)"
    if cfg.cuda_core:
        kind = "gemv"
    else:
        kind = f"mma swap={int(cfg.swap_ab)} xperm={int(cfg.x_permuted)}"
    reduce = "" if cfg.split_k == 1 else " fused" if cfg.fused_reduce else " +sum-kernel"
    return (f"{kind} bm={cfg.block_m} bn={cfg.block_n} bk={cfg.block_k} warps={cfg.num_warps} "
            f"stages={cfg.num_stages} split={cfg.split_k}{reduce}")


def sweep(ceilings: harness.Ceilings, quick: bool = False, decode_only: bool = False) -> None:
    """Time other tile schedules, each checked against the reference first (element-wise bound
    for M <= 128, norm bound beyond), with rotating inputs as in the table; one line per schedule,
    with its speed-up over bf16 cuBLAS timed on the same shape. From M = 256 up, only the default
    and the materialize schedule (where fused and materialized cross over); a fused reduction must
    also give the same bits twice. ``decode_only``: the shapes of DECODE_SWEEP_SHAPES (at M = 128,
    the default with and without the fused reduction), no side kernels."""
    shapes = DECODE_SWEEP_SHAPES if decode_only else SWEEP_SHAPES
    check_decode_schedules()
    for m, k, n in (shapes[:2] if quick else shapes):
        gen = torch.Generator(device="cuda").manual_seed(1)

        def make():
            packed, scales = make_weights(n, k, gen)
            return torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen), packed, scales

        sets = [make() for _ in range(max(1, min(16, -(-120 * 2 ** 20 // weight_bytes(n, k)))))]
        cublas = _time_cublas(sets[0], m, k, n)
        label = f"sweep fp4_matmul M={m} K={k} N={n}"
        print(f"{label} bf16 cuBLAS: {cublas:8.1f} us", flush=True)
        configs = sweep_configs(m, k, n, decode_only)
        auto = configs[0]
        for cfg in configs:
            run_cfg = lambda x, p, s, cfg=cfg: kernels.matmul(x, p, s, config=cfg)  # noqa: E731
            try:
                out = run_cfg(*sets[0])
                check("sweep", out, *sets[0], elementwise=m <= 128)
                if cfg.fused_reduce and not torch.equal(run_cfg(*sets[0]), out):
                    raise AssertionError("the fused reduction gave other bits on a second call")
                t = harness.time_calls([lambda s=s: run_cfg(*s) for s in sets])
            except Exception as e:  # a schedule that does not compile or fit is tuning data too
                print(f"{label} {describe(cfg)}: FAILED {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)
                continue
            if m <= 16:
                perf = f"{100 * weight_bytes(n, k) / t / 1e3 / ceilings.copy_gbps:5.1f}% copy"
            else:
                perf = f"{2 * m * n * k / t / 1e6:6.1f} TFLOP/s"
            print(f"{label} {describe(cfg)}: {t:8.1f} us  {perf}  {cublas / t:5.2f}x cuBLAS"
                  f"{'  (default)' if cfg == auto else ''}", flush=True)
    if not decode_only:
        _sweep_side_kernels(ceilings)


def sweep_configs(m: int, k: int, n: int, decode_only: bool = False) -> list[kernels.TileConfig]:
    """The schedules the sweep times on one shape, choose_config's first (its split-K lowered as
    the launch lowers it): see :func:`sweep`."""
    auto = kernels.choose_config(m, n, k)
    auto = dataclasses.replace(auto, split_k=kernels.effective_split(auto, k))
    if auto.split_k == 1:  # the launch fuses nothing without partial sums; the label says so too
        auto = dataclasses.replace(auto, fused_reduce=False)
    if decode_only and m > 16:
        return [auto] + ([dataclasses.replace(auto, fused_reduce=True)] if auto.split_k > 1 else [])
    if 256 <= m < 4096:
        return list(dict.fromkeys([auto, kernels.TileConfig(**kernels.hw.fp4_matmul_tiles(256)),
                                   kernels.TileConfig(**kernels.hw.FP4_MATMUL_MATERIALIZE_TILE)]))
    return list(dict.fromkeys([auto] + _candidates(m, k, n)))


def _time_cublas(inputs, m: int, k: int, n: int) -> float:
    """bf16 F.linear on the dequantized weights of ``inputs``' shape, rotating weight copies."""
    x, packed, scales = inputs
    w = mxfp4.dequantize(packed, scales, torch.bfloat16)
    check("sweep bf16 cuBLAS", F.linear(x, w), x, packed, scales, elementwise=False)
    calls = harness.rotating(lambda: (x, w.clone()), F.linear, 2 * (n * k + m * (k + n)))
    return harness.time_calls(calls)


def _sweep_side_kernels(ceilings: harness.Ceilings) -> None:
    """The kernels around the main one, alone: the split-K sum and x's permutation (decode), the
    dequantization pass of the materialize schedule (per tile, with its bandwidth)."""
    part = torch.randn(4, 1, 8192, device="cuda")
    out = torch.empty(1, 8192, device="cuda", dtype=torch.bfloat16)
    t_sum = harness.time_calls([lambda: kernels._split_k_sum_kernel[(8,)](
        part, None, out, 8192, 8192, SPLIT_K=4, BLOCK=1024, HAS_BIAS=False, num_warps=4)])
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    t_perm = harness.time_calls([lambda: kernels.permute_k(x, 128)])
    print(f"sweep fp4_matmul M=1 N=8192: split-K sum of 4 partials alone {t_sum:.1f} us; "
          f"x permutation alone {t_perm:.1f} us", flush=True)
    n = k = 8192
    gen = torch.Generator(device="cuda").manual_seed(2)
    sets = [make_weights(n, k, gen) for _ in range(4)]
    w = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    for bn, bk, warps in [(32, 256, 4), (64, 256, 8), (16, 512, 4)]:
        def dequantize(packed, scales, bn=bn, bk=bk, warps=warps):
            kernels._dequantize_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
                packed.view(torch.int32), scales, w, n, k, BLOCK_N=bn, BLOCK_K=bk,
                INTERPRETER=kernels.hw.interpreting(), num_warps=warps)
        dequantize(*sets[0])
        if not torch.equal(w.float(), mxfp4.dequantize(*sets[0], torch.float32)):
            raise AssertionError(f"dequantize kernel bn={bn} bk={bk}: not the exact weights; not timed")
        t = harness.time_calls([lambda s=s: dequantize(*s) for s in sets])
        moved = weight_bytes(n, k) + 2 * n * k
        print(f"sweep fp4_matmul materialize pass N=K=8192 bn={bn} bk={bk} warps={warps}: {t:.1f} us, "
              f"{moved / t / 1e3:.0f} GB/s ({100 * moved / t / 1e3 / ceilings.copy_gbps:.0f}% copy)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only K = N = 8192")
    parser.add_argument("--sweep", nargs="?", const="all", choices=("all", "decode"),
                        help="also time other tile schedules; 'decode': only issue 16's decode shapes")
    parser.add_argument("--no-table", action="store_true", help="skip the GPU checks and the table (with --sweep)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: K = N = 256, M = 1 and 16")
    args = parser.parse_args()
    measured = harness.measure_host_ceilings() if args.tiny else harness.measure_ceilings()
    print(f"{measured.device}: copy {measured.copy_gbps:.0f} GB/s, bf16 GEMM {measured.gemm_tflops:.0f} TFLOP/s",
          flush=True)
    if not args.no_table:
        harness.print_table(run(measured, quick=args.quick, tiny=args.tiny))
    if args.sweep:
        sweep(measured, quick=args.quick, decode_only=args.sweep == "decode")
