"""One tiny kernel per MXFP4 decode path of backends/cuda_triton/mxfp4_decode.py, for
tests/test_mxfp4_decode.py: each decodes packed ``[N, K/2]`` and scales ``[N, K/32]`` (uint8) into
``out [N, K]`` (the output's dtype), as the kernels that use the path do. Compiled for GPUs in a
subprocess by module name, so they live outside the test module."""

import triton
import triton.language as tl

from apt_hal.backends.cuda_triton import mxfp4_decode


@triton.jit
def _offsets(N: tl.constexpr, COLS: tl.constexpr):
    return tl.arange(0, N)[:, None] * COLS + tl.arange(0, COLS)[None, :]


@triton.jit
def tile_kernel(p_ptr, s_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, INTERPRETER: tl.constexpr):
    """:func:`dequantize_tile` (the MoE expert GEMMs), in the output's dtype."""
    packed = tl.load(p_ptr + _offsets(N, K // 2))
    scales = tl.load(s_ptr + _offsets(N, K // 32))
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + _offsets(N, K), mxfp4_decode.dequantize_tile(packed, scales, N, K, DTYPE, INTERPRETER))


@triton.jit
def words_kernel(p_ptr, s_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, INTERPRETER: tl.constexpr):
    """:func:`float32_codes_from_words` scaled by :func:`scaled_block_sums` as the decode GEMVs
    (MoE, fp4_matmul) scale their block sums: each code stands for a sum here."""
    words = tl.load(p_ptr.to(tl.pointer_type(tl.uint32)) + _offsets(N, K // 8))
    scales = tl.load(s_ptr + _offsets(N, K // 32))
    codes = tl.reshape(mxfp4_decode.float32_codes_from_words(words, INTERPRETER), [N, K // 32, 32])
    values = mxfp4_decode.scaled_block_sums(codes, scales)
    tl.store(out_ptr + _offsets(N, K), mxfp4_decode.decoded_to(tl.reshape(values, [N, K]), out_ptr.dtype.element_ty,
                                                                INTERPRETER))


@triton.jit
def mma_words_kernel(p_ptr, s_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, BIG_SCALES: tl.constexpr,
                     INTERPRETER: tl.constexpr):
    """:func:`dequantize_mma_words` (fp4_matmul's tensor-core operands)."""
    words = tl.load(p_ptr.to(tl.pointer_type(tl.uint32)) + _offsets(N, K // 8))
    scales = tl.load(s_ptr + _offsets(N, K // 32))
    w = mxfp4_decode.dequantize_mma_words(words, scales, BIG_SCALES, INTERPRETER)
    tl.store(out_ptr + _offsets(N, K), mxfp4_decode.decoded_to(w, out_ptr.dtype.element_ty, INTERPRETER))
