"""Every MXFP4 decode path of backends/cuda_triton/mxfp4_decode.py against apt_hal.mxfp4.dequantize,
bit for bit: every E2M1 code under scale codes across E8M0's range (0, the subnormal 2^-127; 127,
one; 254, the largest; 255, NaN), in each output dtype. The interpreter runs the portable branch;
the NVIDIA branch (inline PTX) is compiled for sm_90, and the portable one for gfx942."""

import pathlib

import mxfp4_decode_kernels as kernels  # tests/ is on sys.path under pytest
import pytest
import torch

from apt_hal import mxfp4
from apt_hal.conformance import compile_matrix as cm

TESTS = pathlib.Path(__file__).parent
N, K = 16, 64
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# 32 scale codes, one per block of 32 values: the ends and the middle of E8M0's range.
SCALE_CODES = [0, 1, 2, 3, 60, 100, 110, 120, 124, 125, 126, 127, 128, 129, 130, 131,
               132, 140, 150, 200, 240, 248, 250, 251, 252, 253, 254, 255, 127, 0, 255, 128]


def _weights(scale_codes=SCALE_CODES):
    """Packed bytes 0..255 twice: each block of 16 bytes holds every code in its low nibbles."""
    packed = (torch.arange(N * K // 2) % 256).to(torch.uint8).reshape(N, K // 2)
    scales = torch.tensor(scale_codes, dtype=torch.uint8).reshape(N, K // 32)
    return packed, scales


def _assert_bit_exact(out, packed, scales):
    want = mxfp4.dequantize(packed, scales, out.dtype)
    nan = want.isnan()
    same = torch.where(nan, out.isnan(), (out == want) & (out.signbit() == want.signbit()))  # -0.0 is not 0.0
    assert same.all(), f"first mismatches: got {out[~same][:4].tolist()}, want {want[~same][:4].tolist()}"


def _run(kernel, dtype, scale_codes=SCALE_CODES, **constexprs):
    packed, scales = _weights(scale_codes)
    out = torch.empty(N, K, dtype=dtype)
    kernel[(1,)](packed, scales, out, N, K, INTERPRETER=True, **constexprs)
    _assert_bit_exact(out, packed, scales)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_path_is_exact(dtype):
    _run(kernels.tile_kernel, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_word_path_is_exact(dtype):
    _run(kernels.words_kernel, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_word_path_is_exact(dtype):
    _run(kernels.mma_words_kernel, dtype, BIG_SCALES=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_word_path_without_big_scales_is_exact_up_to_scale_two(dtype):
    """fp4_matmul's fast pass (one multiplication) covers tiles whose scale codes are at most 128."""
    _run(kernels.mma_words_kernel, dtype, [min(c, 128) for c in SCALE_CODES], BIG_SCALES=False)


def _launch(kernel, out, interpreter, **constexprs):
    signature = {"p_ptr": "*u8", "s_ptr": "*u8", "out_ptr": out, "N": "constexpr", "K": "constexpr",
                 **{name: "constexpr" for name in constexprs}, "INTERPRETER": "constexpr"}
    return {"module": "mxfp4_decode_kernels", "kernel": kernel, "signature": signature,
            "constexprs": {"N": N, "K": K, **constexprs, "INTERPRETER": interpreter}, "options": {"num_warps": 4}}


# (kernel, its extra constexprs, the NVIDIA-only instructions its NVIDIA branch must contain)
PATHS = [("tile_kernel", {}, []),
         ("words_kernel", {}, ["{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }"]),
         ("mma_words_kernel", {"BIG_SCALES": True}, ["mul.rn.bf16x2 $0, $1, $2;"])]


def test_nvidia_branches_compile_for_sm90_and_portable_ones_for_amd_without_assembly(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    jobs = [{"launch": _launch(kernel, "*bf16", False, **extra), "target": "sm_90"} for kernel, extra, _ in PATHS]
    jobs += [{"launch": _launch(kernel, "*bf16", True, **extra), "target": "gfx942"} for kernel, extra, _ in PATHS]
    results = cm._compile_all(jobs, 2)
    for (kernel, _, asm), nvidia, amd in zip(PATHS, results[:len(PATHS)], results[len(PATHS):]):
        assert nvidia["status"] == cm.COMPILED, (kernel, nvidia.get("message"))
        assert nvidia["inline_asm"] == asm, kernel
        assert amd["status"] == cm.COMPILED, (kernel, amd.get("message"))
        assert amd["inline_asm"] == [], kernel
