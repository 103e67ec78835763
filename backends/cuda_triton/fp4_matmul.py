"""cuda-triton fp4_matmul: MXFP4 weights times bf16 / fp16 / fp32 activations.

What the kernel does, per output tile, for each K step:

* loads the packed weights as 32-bit words of 8 codes (evict-first: each weight byte is read
  once per call) and their E8M0 scales, and dequantizes them **in registers** to bf16 -- exactly:
  every MXFP4 value is a bf16 value (:func:`~.mxfp4_decode.dequantize_mma_words`). Two codes 16
  bits apart in a word become one bf16 pair in one register (3-4 integer instructions), and one
  ``mul.bf16x2`` applies the scale -- while every scale of the tile is at most 2, which real
  weights' scales are; a tile that read a larger (or NaN) scale is computed again with a second exact
  multiplication. About 2.3 instructions per weight;
* splits ``x`` into 1 (bf16), 2 (fp16) or 3 (fp32) bf16 parts whose sum is exactly ``x``
  (:func:`_x_part`; fp32 rows of values below 2^-100 are first lifted by 2^50), so that one bf16
  tensor-core product per part gives the exact products of ``x`` and the weights, accumulated in
  fp32 as the contract asks;
* accumulates with ``tl.dot`` in fp32; the epilogue adds the bias and rounds once to ``x``'s dtype.

Schedules, chosen per call by the tile table in ``hw.py``:

* **decode** (M <= 64; weights are the only bytes that matter): "swap AB", the weight tile is the
  left operand (``out^T = W x^T``, from registers) so the tensor core's 64-row side is spent on N,
  not on the tiny M; K is split across programs (``split_k``) so that every SM streams weights,
  and the partial sums are added in a fixed order (deterministic), by default by a second small
  kernel (:func:`_split_k_sum_kernel`).
  Inside a tile K is visited in a permuted order (:func:`_mma_k_order`; a dot product does not
  depend on the order of its terms), chosen so that each thread's share of the weight operand is
  a run of contiguous words, and each of its operand registers one pair of codes of
  :func:`~.mxfp4_decode.dequantize_mma_words`.
  ``x`` gets the same order, in registers per tile or, with ``x_permuted``, once before the
  launch (its tiles then go straight to shared memory).
* **fused reduction** (``fused_reduce``; ``hw.FP4_MATMUL_FUSED_REDUCE``, on by default):
  the split-K partials are added by the tile's last program instead of a second kernel
  (:func:`_epilogue`): each program stores its float32 partial to the workspace, then counts its
  arrival on the tile's int32 counter (an acquire-release atomic, after a barrier so that the
  whole program's stores are released); the program that arrives last loads all partials through
  L2 and adds them in split order, the same code and order as the second kernel, hence the same
  bits, then adds the bias, rounds, stores, and resets the counter to zero. Why: at ~20 us a
  call, the second launch and its pass over the partials are a measurable part of decode.
  The counters are one zeroed buffer per device and stream (:func:`split_counters`), left at zero
  by every launch, so CUDA-graph replays reuse it; launches on one stream run one after another,
  and launches on two streams get two buffers, so concurrent calls never share a counter.
* **CUDA-core GEMV** (``cuda_core``; ``hw.FP4_MATMUL_GEMV_MAX_M``, M = 1 by default): for
  M <= 4 the tensor cores' 16-row tile is mostly padding, and feeding them costs operand shuffles.
  :func:`_gemv_k_loop` gives each program ``block_n`` weight rows and a K range (split-K as
  above, either reduction); a thread loads 16-byte runs of a row (4 words: the 32 codes of one
  MX block), decodes them with the float16-pair trick
  (:func:`~.mxfp4_decode.float32_codes_from_words`, 3 instructions per code), multiplies them
  by x in float32, sums each MX block (products exact for bf16 and fp16 x; fp32 products are
  rounded once, within the contract's float32 accumulation), and scales each block sum once
  (:func:`~.mxfp4_decode.scaled_block_sums`). Every x dtype; ``block_m`` 1, 2 or 4 rows.
* **prefill** (larger M): ``out = x W^T`` with the dequantized ``W^T`` tile staged in shared
  memory for the tensor cores, grouped tile order for L2 reuse.
* **materialize** (bf16 x, M >= ``hw.FP4_MATMUL_MATERIALIZE_MIN_M``): one kernel writes the exact
  bf16 weights, then cuBLAS multiplies (``F.linear``). There the GEMM is matrix-bound: cuBLAS runs
  near the tensor cores' rate, which a Triton kernel that waits for each step's tensor-core
  product before dequantizing the next tile does not, and the extra pass (2 bytes written and
  read per weight) costs a few % of the GEMM. Memory: a transient ``N x K`` bf16 buffer. cuBLAS
  accumulates in fp32, but follows PyTorch's global
  ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction`` (default True), which
  lets it add split-K partial sums in bf16 on shapes where it splits K; set it to False for fp32
  throughout.

Under ``TRITON_INTERPRET=1`` (tests on CPU) the same kernels run with small tiles, their
tensor-core operands held as float32 (the interpreter mishandles bf16; the values are the same).
The op is also exposed as ``torch.ops.apt_hal_triton.fp4_matmul`` (a ``torch.library.triton_op``),
which lets ``torch.compile`` trace into the kernels; the registered apt_hal implementation calls
the plain launcher instead (no dispatcher hop in eager).

No ``prepare_weights`` repacking is offered: wide weight loads straight into the tensor-core
operand layout are met on the plain layout (the K permutation above), and the dequantization's
ALU cost is already near what a repacked bit layout would allow (the nibble moves are 3-4
instructions per pair of weights, the scale one multiplication).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from apt_hal import mxfp4, ops
from apt_hal.backends.cuda_triton import hw
from apt_hal.backends.cuda_triton.mxfp4_decode import (
    decoded_to,
    dequantize_mma_words,
    float32_codes_from_words,
    row_block_sums,
    scaled_block_sums,
)
from apt_hal.backends.cuda_triton.registration import direct, kernel_op

# Number of bf16 parts that represent each activation dtype exactly (8 significant bits each).
_X_PARTS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch schedule; see the module docstring. ``block_m`` is the M extent of a tile."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool  # decode schedule: weight tile on the left, K order permuted
    split_k: int = 1
    group_m: int = 8  # prefill: tiles visited in groups of group_m rows (L2 reuse of weights)
    x_permuted: bool = False  # swap_ab: x permuted into the kernel's K order before the launch
    materialize: bool = False  # bf16 x, large M: dequantize to bf16 (block_n x block_k tiles), cuBLAS
    fused_reduce: bool = False  # split_k > 1: the last split program of a tile adds the partials (one launch)
    cuda_core: bool = False  # M <= 4: fp32 dot products on CUDA cores (block_m: 1, 2 or 4 rows), no tensor cores


# ---------------------------------------------------------------------------------------------
# Triton device functions
# ---------------------------------------------------------------------------------------------


# Triton 3.6's interpreter mishandles bf16: tl.dot multiplies the raw bits of bf16 operands, and
# widening a bf16 subnormal to float32 gives 0. Under it (INTERPRETER=True) the kernel forms the
# same exact values through float32 and multiplies float32 operands ("ieee"); on the GPU the
# operands are bf16. The values are identical either way: every operand is exact in bf16.


@triton.jit
def _x_part(rest):
    """Split float32 ``rest`` into (part, remainder), both float32, with part + remainder == rest
    exactly and part a bf16 value: ``rest`` truncated to 8 significant bits (a bit mask, so it
    never rounds up to Inf). Non-finite values go wholly into the part, NaN stays NaN."""
    bits = rest.to(tl.uint32, bitcast=True) & 0xFFFF0000
    part = tl.where(rest == rest, bits.to(tl.float32, bitcast=True), float("nan"))
    remainder = rest - part
    remainder = tl.where(remainder == remainder, remainder, 0.0)  # Inf - Inf
    return part, remainder


@triton.jit
def _operand(t, INTERPRETER: tl.constexpr):
    """A tile of bf16 values as a tensor-core operand: bf16 (float32 under the interpreter)."""
    if INTERPRETER:
        return t.to(tl.float32)
    else:
        return t.to(tl.bfloat16)


@triton.jit
def _mma_k_order(t, K_AXIS: tl.constexpr):
    """Permute the K axis of a 2-D tile (axis K_AXIS, extent BK) into the order in which the
    tensor core's 16-bit operand layout gives each thread the code pairs of
    :func:`~.mxfp4_decode.dequantize_mma_words`: thread
    t of a quad holds K positions {2t, 2t+1, 2t+8, 2t+9} of every 16-wide step, and each of its
    registers should hold codes j and j+4 of one 32-bit word of its own run of BK/4 contiguous
    weights. Natural offset t*BK/4 + 8*wl + 4e + 2*j1 + j0 goes to position
    32*wl + 16*j1 + 8*j0 + 2t + e."""
    if K_AXIS == 1:
        R: tl.constexpr = t.shape[0]
        BK: tl.constexpr = t.shape[1]
        return t.reshape(R, 4, BK // 32, 2, 2, 2).permute(0, 2, 4, 5, 1, 3).reshape(R, BK)
    else:
        R: tl.constexpr = t.shape[1]
        BK: tl.constexpr = t.shape[0]
        return t.reshape(4, BK // 32, 2, 2, 2, R).permute(1, 3, 4, 0, 2, 5).reshape(BK, R)


@triton.jit
def _accumulate(acc, w, xp, SWAP_AB: tl.constexpr, X_PERMUTED: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + xp @ w^T (acc [BLOCK_M, BLOCK_N]) or, swapped, acc + w @ xp^T (acc [BLOCK_N, BLOCK_M])
    with K visited in the order of :func:`_mma_k_order` (w is already in that order; xp too when
    X_PERMUTED)."""
    if SWAP_AB:
        a = w
        if X_PERMUTED:
            b = xp.T
        else:
            b = _mma_k_order(xp.T, 0)
    else:
        a = xp
        b = w.T
    if INTERPRETER:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _accumulate_x(acc, w, xv, X_PARTS: tl.constexpr, SWAP_AB: tl.constexpr, X_PERMUTED: tl.constexpr,
                  INTERPRETER: tl.constexpr):
    """acc + the product of the weight tile w and the x tile xv [BLOCK_M, BLOCK_K], x split into
    X_PARTS exact bf16 parts (:func:`_x_part`), one tensor-core product each."""
    if X_PARTS == 1:
        return _accumulate(acc, w, _operand(xv, INTERPRETER), SWAP_AB, X_PERMUTED, INTERPRETER)
    rest = xv.to(tl.float32)
    if X_PARTS == 2:
        for _ in tl.static_range(2):
            xp, rest = _x_part(rest)
            acc = _accumulate(acc, w, _operand(xp, INTERPRETER), SWAP_AB, X_PERMUTED, INTERPRETER)
        return acc
    # float32 x: bf16 parts represent multiples of 2^-133 only, so x is split exactly when
    # |x| >= 2^-110. Rows of the tile whose largest |x| is below 2^-100 are lifted by 2^50 (exact)
    # and their products scaled back; in other rows, what the parts cannot hold is below 2^-33 of
    # the row's largest term, under float32 accumulation's own error.
    lift = tl.where(tl.max(tl.abs(rest), axis=1) < 7.888609052210118e-31, 1.125899906842624e15, 1.0)
    rest = rest * lift[:, None]  # 2^-100, 2^50
    part = tl.zeros(acc.shape, dtype=tl.float32)
    for _ in tl.static_range(3):
        xp, rest = _x_part(rest)
        part = _accumulate(part, w, _operand(xp, INTERPRETER), SWAP_AB, X_PERMUTED, INTERPRETER)
    if SWAP_AB:
        return acc + part / lift[None, :]
    else:
        return acc + part / lift[:, None]


@triton.jit
def _k_loop(acc, x_tile, w_tile, s_tile, mask_m, K, k0, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
            X_PARTS: tl.constexpr, SWAP_AB: tl.constexpr, X_PERMUTED: tl.constexpr, EVEN_K: tl.constexpr,
            BIG_SCALES: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + the tile's products over K_STEPS blocks of BLOCK_K from the tile pointers (x: [BLOCK_M,
    BLOCK_K], w: uint32 words [BLOCK_N, BLOCK_K / 8], s: scales [BLOCK_N, BLOCK_K / 32]) at K offset
    k0 (BIG_SCALES: see :func:`~.mxfp4_decode.dequantize_mma_words`); and the largest scale code read."""
    offs_kw = tl.arange(0, BLOCK_K // 8)
    offs_ks = tl.arange(0, BLOCK_K // 32)
    offs_k = tl.arange(0, BLOCK_K)
    top = tl.zeros(s_tile.shape, dtype=tl.uint8)
    # Scales are loaded one step ahead by hand: a tile row has only BLOCK_K / 32 of them, too few
    # bytes per thread for the asynchronous copies that pipeline the other loads.
    codes_next = tl.load(s_tile, mask=offs_ks[None, :] < (K - k0) // 32, other=127)
    for i in range(0, K_STEPS):
        codes = codes_next
        s_tile += BLOCK_K // 32
        k_left = K - (k0 + i * BLOCK_K)
        if EVEN_K:
            codes_next = tl.load(s_tile, mask=i + 1 < K_STEPS, other=127)
            words = tl.load(w_tile, eviction_policy="evict_first")
            xv = tl.load(x_tile, mask=mask_m[:, None], other=0.0)
        else:
            codes_next = tl.load(s_tile, mask=(offs_ks[None, :] < (k_left - BLOCK_K) // 32) & (i + 1 < K_STEPS),
                                 other=127)
            words = tl.load(w_tile, mask=offs_kw[None, :] < k_left // 8, other=0, eviction_policy="evict_first")
            xv = tl.load(x_tile, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        top = tl.maximum(top, codes)
        w = dequantize_mma_words(words.to(tl.uint32, bitcast=True), codes, BIG_SCALES, INTERPRETER)
        if SWAP_AB:
            w = _mma_k_order(w, 1)
        acc = _accumulate_x(acc, w, xv, X_PARTS, SWAP_AB, X_PERMUTED, INTERPRETER)
        w_tile += BLOCK_K // 8
        x_tile += BLOCK_K
    return acc, tl.max(top)


@triton.jit
def _first_tiles(x_ptr, w_ptr, s_ptr, offs_m, rows_n, k0, stride_xm, stride_wn, stride_sn, BLOCK_K: tl.constexpr):
    """Pointers to a program's first K step: x [BLOCK_M, BLOCK_K], the weight words [BLOCK_N,
    BLOCK_K / 8] and their scales [BLOCK_N, BLOCK_K / 32], K offset k0."""
    # int64 row offsets: N * K/8 and M * stride_xm can pass 2^31.
    w_tile = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    s_tile = s_ptr + rows_n[:, None].to(tl.int64) * stride_sn + (k0 // 32 + tl.arange(0, BLOCK_K // 32))[None, :]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :]
    return x_tile, w_tile, s_tile


@triton.jit
def _sum_partials(part_tile, split_stride, mask, SPLIT_K: tl.constexpr, CACHE: tl.constexpr):
    """The SPLIT_K float32 partial sums at part_tile + s * split_stride, added in split order s = 0,
    1, ... (the same bits whichever kernel adds them). CACHE: the loads' cache modifier."""
    total = tl.load(part_tile, mask=mask, other=0.0, cache_modifier=CACHE)
    for _ in tl.static_range(1, SPLIT_K):
        part_tile += split_stride  # pointer steps: s * split_stride could pass 2^31
        total += tl.load(part_tile, mask=mask, other=0.0, cache_modifier=CACHE)
    return total


@triton.jit
def _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_bias, HAS_BIAS: tl.constexpr):
    """out tile = acc [BLOCK_M, BLOCK_N] (float32) + bias, rounded once to out's dtype."""
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_tile = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def _epilogue(acc, out_ptr, part_ptr, counter_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_bias, tile,
              pid_k, SPLIT_K: tl.constexpr, FUSED_REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Finish output tile ``tile`` from this program's float32 sum acc [BLOCK_M, BLOCK_N] over its K range.

    Without split-K: add the bias, round, store. With split-K the sum goes to the workspace
    part_ptr [SPLIT_K, M, N] at split pid_k; then either :func:`_split_k_sum_kernel` adds the
    partials after this kernel, or (FUSED_REDUCE) the tile's last program to arrive does, here:
    each program counts its arrival on the tile's int32 counter, and the one that sees SPLIT_K - 1
    earlier arrivals adds all partials in split order (:func:`_sum_partials`), so the result does
    not depend on which program came last, and resets the counter to zero for the next call."""
    if SPLIT_K == 1:
        _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_bias, HAS_BIAS)
    else:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        part_tile = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part_tile + pid_k.to(tl.int64) * M * N, acc, mask=mask)
        if FUSED_REDUCE:
            # All threads' partial stores precede the arrival (one thread performs the atomic; its
            # release then covers them); the acquire makes the other programs' partials visible.
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                # Through L2 only (".cg"): other SMs wrote these partials during this launch,
                # and this SM's L1 is not kept coherent with their stores.
                total = _sum_partials(part_tile, M * N, mask, SPLIT_K, ".cg")
                _store_output(total, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_bias, HAS_BIAS)
                tl.store(counter_ptr + tile, 0)  # every program of the tile has arrived: no race


@triton.jit
def _gemv_operands(x_tile, w_tile, s_tile, mask_m, k_left, present, EVEN_K: tl.constexpr):
    """One K step's x [BLOCK_M, BLOCK_K], weight words [BLOCK_N, BLOCK_K / 8] and scale codes
    [BLOCK_N, BLOCK_K / 32], k_left of K from its start on; nothing is read unless ``present``
    (the step after the last; the values are then unused)."""
    BLOCK_K: tl.constexpr = x_tile.shape[1]
    if EVEN_K:
        w_ok = present
        s_ok = present
        x_ok = mask_m[:, None] & present
    else:
        w_ok = (tl.arange(0, BLOCK_K // 8) < k_left // 8)[None, :] & present
        s_ok = (tl.arange(0, BLOCK_K // 32) < k_left // 32)[None, :] & present
        x_ok = mask_m[:, None] & (tl.arange(0, BLOCK_K) < k_left)[None, :] & present
    words = tl.load(w_tile, mask=w_ok, other=0, eviction_policy="evict_first")
    scale_codes = tl.load(s_tile, mask=s_ok, other=127, eviction_policy="evict_first")
    xv = tl.load(x_tile, mask=x_ok, other=0.0)
    return xv, words, scale_codes


@triton.jit
def _gemv_k_loop(x_tile, w_tile, s_tile, mask_m, K, k0, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 K_STEPS: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """[BLOCK_N, BLOCK_M] float32: the products of a tile's weight rows and x rows over K_STEPS
    blocks of BLOCK_K from K offset k0, on CUDA cores. Each MX block's 32 products are summed
    first (codes times x: exact for bf16 and fp16 x, and at most one rounding for fp32 x), then
    scaled once (:func:`~.mxfp4_decode.scaled_block_sums`); the block sums stay in each thread's
    registers, one accumulator per block column, until one reduction at the end. Each weight row
    is BLOCK_K / 8 contiguous 32-bit words per step: the loads vectorize to 16 bytes a thread, 4
    words, the 32 codes of one MX block. The next step's operands are loaded before this step's
    arithmetic (Triton's pipeliner stages only loads that feed tl.dot), so that the weights of
    one step stream in while the previous one is decoded."""
    R: tl.constexpr = w_tile.shape[0]
    KB: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros([R, KB, BLOCK_M], dtype=tl.float32)
    next_operands = _gemv_operands(x_tile, w_tile, s_tile, mask_m, K - k0, True, EVEN_K)
    for i in range(0, K_STEPS):
        xv, words, scale_codes = next_operands
        x_tile += BLOCK_K
        w_tile += BLOCK_K // 8
        s_tile += BLOCK_K // 32
        next_operands = _gemv_operands(x_tile, w_tile, s_tile, mask_m, K - (k0 + (i + 1) * BLOCK_K),
                                       i + 1 < K_STEPS, EVEN_K)
        codes = tl.reshape(float32_codes_from_words(words.to(tl.uint32, bitcast=True), INTERPRETER), [R, KB, 32])
        sums = row_block_sums(codes, tl.reshape(xv.to(tl.float32), [BLOCK_M, KB, 32]), BLOCK_M)
        acc += scaled_block_sums(sums, scale_codes)
    return tl.sum(acc, axis=1)


@triton.jit
def _mma_tile(x_tile, w_tile, s_tile, mask_m, K, k0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, X_PARTS: tl.constexpr, SWAP_AB: tl.constexpr,
              X_PERMUTED: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32: the tile's products over K_STEPS blocks of BLOCK_K from K offset
    k0, on tensor cores (:func:`_k_loop`)."""
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Scale factors are one multiplication per weight pair while every scale is at most 2 (code
    # 128; real weights' scales are below 1), two otherwise: the tile is computed the fast way,
    # and again the exact way in the rare case that it read a larger (or NaN) scale.
    result, top = _k_loop(acc, x_tile, w_tile, s_tile, mask_m, K, k0, BLOCK_K, K_STEPS, X_PARTS, SWAP_AB,
                          X_PERMUTED, EVEN_K, False, INTERPRETER)
    if top > 128:
        result, top = _k_loop(acc, x_tile, w_tile, s_tile, mask_m, K, k0, BLOCK_K, K_STEPS, X_PARTS, SWAP_AB,
                              X_PERMUTED, EVEN_K, True, INTERPRETER)
    if SWAP_AB:
        result = result.T
    return result


@triton.jit
def _fp4_matmul_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, counter_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om, stride_bias,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    X_PARTS: tl.constexpr, SWAP_AB: tl.constexpr, X_PERMUTED: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, FUSED_REDUCE: tl.constexpr,
    CUDA_CORE: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """out[M, N] = x[M, K] @ dequantize(w)[N, K]^T (+ bias), on tensor cores or (CUDA_CORE, M <= 4)
    CUDA cores (:func:`_gemv_k_loop`). Program (.., s) covers K_STEPS blocks of BLOCK_K starting at
    block s * K_STEPS; with SPLIT_K > 1 its partial sum goes through :func:`_epilogue`. K_STEPS is
    a compile-time constant: one compiled variant per (K, split), and a loop bound that Triton's
    interpreter (which needs Python ints) can run. w_ptr: the packed weights as 32-bit words,
    stride_wn words per row; bias: stride_bias apart."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if SWAP_AB or CUDA_CORE:  # decode: few M tiles; consecutive programs walk N
        pid_m = pid // num_n
        pid_n = pid % num_n
    else:  # prefill: groups of GROUP_M tile rows share weight tiles in L2
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % rows
        pid_n = (pid % (GROUP_M * num_n)) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    rows_n = offs_n % N  # weight rows past N re-read row n % N (unmasked loads); never stored

    k0 = pid_k * (K_STEPS * BLOCK_K)
    x_tile, w_tile, s_tile = _first_tiles(x_ptr, w_ptr, s_ptr, offs_m, rows_n, k0, stride_xm, stride_wn, stride_sn,
                                          BLOCK_K)

    if CUDA_CORE:
        acc = _gemv_k_loop(x_tile, w_tile, s_tile, mask_m, K, k0, BLOCK_M, BLOCK_K, K_STEPS, EVEN_K, INTERPRETER).T
    else:
        acc = _mma_tile(x_tile, w_tile, s_tile, mask_m, K, k0, BLOCK_M, BLOCK_N, BLOCK_K, K_STEPS, X_PARTS, SWAP_AB,
                        X_PERMUTED, EVEN_K, INTERPRETER)
    _epilogue(acc, out_ptr, part_ptr, counter_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_bias, pid, pid_k,
              SPLIT_K, FUSED_REDUCE, HAS_BIAS)


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INTERPRETER: tl.constexpr):
    """out[N, K] (bf16) = the exact weights of w (uint32 words [N, K/8]) and its scales [N, K/32]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_s = tl.program_id(1) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows[:, None] < N
    words = tl.load(w_ptr + rows[:, None].to(tl.int64) * (K // 8) + offs_w[None, :],
                    mask=row_ok & (offs_w[None, :] < K // 8), other=0)
    codes = tl.load(s_ptr + rows[:, None].to(tl.int64) * (K // 32) + offs_s[None, :],
                    mask=row_ok & (offs_s[None, :] < K // 32), other=127)
    w = dequantize_mma_words(words.to(tl.uint32, bitcast=True), codes, True, INTERPRETER)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :], decoded_to(w, tl.bfloat16, INTERPRETER),
             mask=row_ok & (offs_k[None, :] < K))


@triton.jit
def _split_k_sum_kernel(part_ptr, bias_ptr, out_ptr, MN, N, stride_bias, SPLIT_K: tl.constexpr,
                        BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out = sum over s of part[s] (+ bias), in split order (deterministic), rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = _sum_partials(part_ptr + offs, MN, mask, SPLIT_K, "")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + (offs % N) * stride_bias, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


# Arrival counters of the fused split-K reduction, per device and stream: int32 zeros, and every
# launch leaves them at zero (each tile's last program resets its counter), so one buffer serves
# every call on its stream, eager or replayed from a CUDA graph (launches on one stream never
# overlap; two streams get two buffers). A buffer outgrown is kept, not freed: a captured graph may
# still point at it.
_SPLIT_COUNTERS: dict[tuple, list[torch.Tensor]] = {}  # (device, stream id) -> buffers, the newest last
_MIN_SPLIT_COUNTERS = 4096  # output tiles: N / block_n of decode shapes, with room


def split_counters(device: torch.device, tiles: int, launch: Callable = direct) -> torch.Tensor:
    """At least ``tiles`` zeroed int32 counters on ``device`` for the fused split-K reduction."""
    if launch is not direct:  # traced by torch.compile: a fresh buffer is an op of the graph, no global state
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    # One buffer per stream: two streams' launches may run at once, and a shared counter would let
    # one tile's last arrival be counted for the other's.
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
    held = _SPLIT_COUNTERS.setdefault((device, stream), [])
    if held and held[-1].numel() >= tiles:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The zeros would be written only when the graph replays: this buffer belongs to the graph.
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    held.append(torch.zeros(max(tiles, _MIN_SPLIT_COUNTERS), dtype=torch.int32, device=device))
    return held[-1]


def choose_config(m: int, n: int, k: int, x_dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """The schedule for an (M, N, K) problem: the tile table of hw.py, plus split-K when the M x N
    tiles are too few to fill the GPU (one wave of hw.FP4_MATMUL_PROGRAMS_PER_SM programs per SM,
    hw.FP4_MATMUL_GEMV_PROGRAMS_PER_SM for the CUDA-core GEMV), its partials added as
    hw.FP4_MATMUL_FUSED_REDUCE says (up to hw.FP4_MATMUL_FUSED_REDUCE_MAX_M rows).
    The fp32 partial sums cost 8 * split * M * N bytes of traffic; split is kept to at most
    K / (16 M), which bounds that by the weight bytes (N * K * 17/32)."""
    cfg = TileConfig(**hw.fp4_matmul_tiles(m, _X_PARTS[x_dtype]))
    if cfg.materialize:
        return cfg
    fused = hw.FP4_MATMUL_FUSED_REDUCE and m <= hw.FP4_MATMUL_FUSED_REDUCE_MAX_M
    return dataclasses.replace(cfg, split_k=split_to_fill(cfg, m, n, k), fused_reduce=fused)


def split_to_fill(cfg: TileConfig, m: int, n: int, k: int) -> int:
    """choose_config's split-K for the tiles of ``cfg`` (see there)."""
    tiles_mn = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    per_sm = hw.FP4_MATMUL_GEMV_PROGRAMS_PER_SM if cfg.cuda_core else hw.FP4_MATMUL_PROGRAMS_PER_SM
    want = hw.device_properties()["sm_count"] * per_sm
    split = min(want // tiles_mn, k // (16 * m), triton.cdiv(k, cfg.block_k), hw.FP4_MATMUL_MAX_SPLIT_K)
    return max(split, 1)


def effective_split(cfg: TileConfig, k: int) -> int:
    """The split-K a launch uses: ``cfg.split_k`` lowered to a divisor of the number of K blocks,
    so that all splits cover equal K ranges."""
    k_blocks = triton.cdiv(k, cfg.block_k)
    return max(d for d in range(1, cfg.split_k + 1) if k_blocks % d == 0)


def permute_k(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """x [M, K] with each block of block_k columns in the kernel's K order (:func:`_mma_k_order`)."""
    m, k = x.shape
    return x.reshape(m, k // block_k, 4, block_k // 32, 2, 2, 2).permute(0, 1, 3, 5, 6, 2, 4).reshape(m, k)


def matmul(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
           *, config: Optional[TileConfig] = None, launch: Callable = direct) -> torch.Tensor:
    """fp4_matmul on arguments the contract has checked. ``config`` overrides the schedule of
    :func:`choose_config` (benchmark sweeps, tests); its ``split_k`` is lowered by
    :func:`effective_split`. ``launch`` is
    registration.direct or ``torch.library.wrap_triton`` (the traced triton_op)."""
    k = x.shape[-1]
    n = w_packed.shape[0]
    m = math.prod(x.shape[:-1])
    if m == 0 or n == 0 or k == 0:  # k == 0: an empty sum, the bias alone
        out = torch.zeros((m, n), dtype=x.dtype, device=x.device)
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], n)
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()  # the kernel reads rows of x with unit stride
    words = mxfp4.as_uint8(w_packed)
    if words.storage_offset() % 4:
        words = words.clone()  # the kernels read the packed weights as 32-bit words
    words = words.view(torch.int32)
    scales = mxfp4.as_uint8(w_scales)
    cfg = config or choose_config(m, n, k, x.dtype)
    if cfg.materialize:
        if x.dtype != torch.bfloat16:
            raise ValueError(f"the materialize schedule needs bfloat16 x (exact bf16 weights), got {x.dtype}")
        w = torch.empty((n, k), dtype=torch.bfloat16, device=x.device)
        with hw.device_guard(x):
            launch(_dequantize_kernel)[(triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))](
                words, scales, w, n, k, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, INTERPRETER=hw.pure_triton(),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return torch.nn.functional.linear(x2, w, bias).reshape(*x.shape[:-1], n)
    if cfg.cuda_core and cfg.block_m not in (1, 2, 4):
        raise ValueError(f"the cuda_core schedule takes block_m 1, 2 or 4 rows, got {cfg.block_m}")
    k_blocks = triton.cdiv(k, cfg.block_k)
    split = effective_split(cfg, k)
    x_permuted = cfg.swap_ab and cfg.x_permuted and k % cfg.block_k == 0 and not cfg.cuda_core
    if x_permuted:
        x2 = permute_k(x2, cfg.block_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bias_stride = 0 if bias is None else bias.stride(0)
    partials = None if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    fused = split > 1 and cfg.fused_reduce
    counters = split_counters(x.device, grid[0], launch) if fused else None
    with hw.device_guard(x):
        launch(_fp4_matmul_kernel)[grid](
            x2, words, scales, bias, out, partials, counters, m, n, k, x2.stride(0), k // 8, k // mxfp4.BLOCK, n,
            bias_stride, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, K_STEPS=k_blocks // split,
            X_PARTS=_X_PARTS[x.dtype], SWAP_AB=cfg.swap_ab and not cfg.cuda_core, X_PERMUTED=x_permuted,
            SPLIT_K=split, GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None,
            FUSED_REDUCE=fused, CUDA_CORE=cfg.cuda_core, INTERPRETER=hw.pure_triton(), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **hw.launch_options(),
        )
        if split > 1 and not fused:
            block = 1024
            launch(_split_k_sum_kernel)[(triton.cdiv(m * n, block),)](
                partials, bias, out, m * n, n, bias_stride, SPLIT_K=split, BLOCK=block, HAS_BIAS=bias is not None,
                num_warps=4)
    return out.reshape(*x.shape[:-1], n)


# The apt_hal implementation and its traceable triton_op (registration.py).
fp4_matmul_triton = kernel_op(ops.fp4_matmul)(matmul)
