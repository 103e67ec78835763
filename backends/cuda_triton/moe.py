"""cuda-triton kernels for the four MoE steps of :mod:`apt_hal.contracts.moe_dispatch`.

* route: one kernel; softmax then top-k (optionally renormalized) or top-k then softmax, ties
  to the lower expert index, float32 weights and int32 ids.
* permute: a counting sort on the GPU in three launches: per-block expert histograms over the
  assignments in priority order, one program scanning them (ranks, kept and dropped starts,
  ``expert_offsets``), and a scatter in priority order.
* experts: two grouped GEMMs over the expert-sorted rows. The up projection gathers the token
  rows and applies the activation in its epilogue; the down projection adds its bias and writes
  the zeros of the dropped rows. Weights in ``x``'s dtype, or MXFP4 decoded in registers. Three
  kernels by rows per expert (section 3): tensor-core tiles loaded through pointers, the same
  with TMA tensor descriptors for prefill on Hopper, and CUDA-core dot products for MXFP4 decode.
* combine: invert the row order, then gather each token's rows and sum them in ``j`` order in
  float32 (no atomics: deterministic).

Index operands may hold anything at check levels "none" and "metadata" (the value checks that
reject bad indices run only at "values"); no kernel follows an index out of its tensor, and the
result is defined: a routing row holding NaN or +inf, or only -inf, gets experts 0..k-1 with
weight 0; permute puts the assignments whose id is outside ``[0, E)`` last, after the dropped
ones (``expert_offsets`` count only valid ids); experts read ``expert_offsets`` as described in
:func:`_expert_tile` and give a zero row for an assignment outside ``[0, S)``; combine ignores
such assignments, a token's assignment that no row names contributes 0, and one named by
several rows uses the last.

No step reads a tensor value on the host and every grid depends on shapes only, so a whole
layer can be captured in a CUDA graph. The grouped GEMMs launch a fixed number of row tiles
(see :func:`_row_tiles`) and each program finds its expert from ``expert_offsets`` on the GPU;
experts without rows cost no work and their weights are never read.

Each launcher is also a ``torch.library.triton_op`` (``apt_hal_triton::moe_*``) that launches
through ``wrap_triton``, so torch.compile can trace into the kernels; the registered apt_hal
implementations call the launchers directly, without a dispatcher hop.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from apt_hal import ops
from apt_hal.backends.cuda_triton import hw
from apt_hal.backends.cuda_triton.mxfp4_decode import (
    dequantize_tile,
    float32_codes_from_words,
    row_block_sums,
    scaled_block_sums,
)
from apt_hal.backends.cuda_triton.registration import direct, kernel_op
from apt_hal.contracts.moe_dispatch import ACTIVATIONS

_SWIGLU = tl.constexpr(ACTIVATIONS.index("swiglu"))
_GELU = tl.constexpr(ACTIVATIONS.index("gelu"))
_GPT_OSS = tl.constexpr(ACTIVATIONS.index("gpt_oss_swiglu"))

_PERMUTE_BLOCK = 128  # assignments per histogram/scatter program (the scatter compares them pairwise)


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels index these small read-only 1-D and [E, n] operands as contiguous: a strided one
    is copied before the launch (a no-op when it is contiguous)."""
    return None if t is None else t.contiguous()


def _pow2(n: int) -> int:
    # Block sizes are powers of two; 2 at least, so no tensor has a dimension of 1.
    return max(2, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------
# 1. route
# ---------------------------------------------------------------------------------------------


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_t, stride_e,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, SOFTMAX_FIRST: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, E_PAD)
    in_tok = tok < T
    row = tl.minimum(tok, T - 1).to(tl.int64)  # rows past T repeat the last one, unstored
    real = (col < E)[None, :]
    x = tl.load(logits_ptr + row[:, None] * stride_t + col[None, :] * stride_e,
                mask=real, other=float("-inf")).to(tl.float32)
    # A row holding NaN or +inf, or only -inf, has no defined routing (a value-check error): it
    # gets experts 0..k-1 (a row of zeros ties everywhere) with weight 0, never NaN.
    undefined = tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=1) > 0
    no_finite = tl.max((real & (x > float("-inf"))).to(tl.int32), axis=1) == 0
    bad = undefined | no_finite
    x = tl.where(bad[:, None] & real, 0.0, x)
    if SOFTMAX_FIRST:
        z = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = z / tl.sum(z, axis=1)[:, None]
    else:
        scores = x
    # k rounds of "the largest score not taken yet, the lowest expert index on a tie"; a mask
    # (not a -inf score) marks what is taken, so -inf logits still rank by index.
    taken = tl.broadcast_to((col >= E)[None, :], [BLOCK_T, E_PAD])
    slot = tl.arange(0, K_PAD)[None, :]
    top = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(taken, float("-inf"), scores), axis=1)
        pick = tl.min(tl.where(~taken & (scores == best[:, None]), col[None, :], E_PAD), axis=1)
        taken = taken | (col[None, :] == pick[:, None])
        top = tl.where(slot == j, best[:, None], top)
        ids = tl.where(slot == j, pick[:, None], ids)
    chosen = slot < TOP_K
    if SOFTMAX_FIRST:
        w = top
        if RENORMALIZE:
            w = w / tl.sum(tl.where(chosen, w, 0.0), axis=1)[:, None]
    else:
        z = tl.where(chosen, tl.exp(top - tl.max(tl.where(chosen, top, float("-inf")), axis=1)[:, None]), 0.0)
        w = z / tl.sum(z, axis=1)[:, None]
    w = tl.where(bad[:, None], 0.0, w)
    out = tok[:, None] * TOP_K + slot
    keep = in_tok[:, None] & chosen
    tl.store(weights_ptr + out, w, mask=keep)
    tl.store(ids_ptr + out, ids, mask=keep)


def route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax_topk", renormalize: bool = False,
          *, launch=direct) -> Tuple[torch.Tensor, torch.Tensor]:
    """``moe_route`` on the GPU: (topk_weights float32 [T, k], topk_ids int32 [T, k])."""
    t, e = router_logits.shape
    weights = router_logits.new_empty((t, top_k), dtype=torch.float32)
    ids = router_logits.new_empty((t, top_k), dtype=torch.int32)
    if t == 0:
        return weights, ids
    e_pad = _pow2(e)
    block_t = min(_pow2(t), max(2, 2048 // e_pad))
    with hw.device_guard(router_logits):
        launch(_route_kernel)[(triton.cdiv(t, block_t),)](
            router_logits, weights, ids, t, e, router_logits.stride(0), router_logits.stride(1),
            TOP_K=top_k, K_PAD=_pow2(top_k), SOFTMAX_FIRST=scoring == "softmax_topk",
            RENORMALIZE=bool(renormalize), BLOCK_T=block_t, E_PAD=e_pad, num_warps=4)
    return weights, ids


# ---------------------------------------------------------------------------------------------
# 2. permute: counting sort by expert in priority order
# ---------------------------------------------------------------------------------------------


@triton.jit
def _priority_block(ids_ptr, stride_t, stride_k, block, T, S, E, top_k, BLOCK: tl.constexpr):
    """Assignments of one block of priorities (every token's first choice by token index, then
    every second choice, ...) and their experts: -1 past the last, E (the bucket of ids out of
    range, compared before any narrowing) for an id outside [0, E)."""
    p = block * BLOCK + tl.arange(0, BLOCK)
    token = p % T
    j = p // T
    raw = tl.load(ids_ptr + token.to(tl.int64) * stride_t + j.to(tl.int64) * stride_k, mask=p < S, other=0)
    expert = tl.where(p < S, tl.where((raw >= 0) & (raw < E), raw, E), -1).to(tl.int32)
    return token * top_k + j, expert


@triton.jit
def _permute_count_kernel(ids_ptr, stride_t, stride_k, hist_ptr, T, S, E, top_k, BLOCK: tl.constexpr,
                          E_PAD: tl.constexpr):
    # Histograms of E + 1 buckets: the experts, then the ids out of range.
    block = tl.program_id(0)
    _, expert = _priority_block(ids_ptr, stride_t, stride_k, block, T, S, E, top_k, BLOCK)
    col = tl.arange(0, E_PAD)
    counts = tl.sum((expert[:, None] == col[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + block * (E + 1) + col, counts, mask=col <= E)


@triton.jit
def _permute_scan_kernel(hist_ptr, offsets_ptr, drop_start_ptr, n_blocks, E, capacity,
                         ROWS: tl.constexpr, E_PAD: tl.constexpr):
    # One program: the histograms become each block's first rank per bucket (in place), then the
    # experts' kept counts give expert_offsets and the dropped ones the rows after them; the ids
    # out of range (bucket E) are all dropped, last.
    col = tl.arange(0, E_PAD)
    real = col < E
    buckets = col <= E
    seen = tl.zeros([E_PAD], tl.int32)
    b0 = tl.full([], 0, tl.int32)  # a tensor, so the loop-carried value keeps one type
    while b0 < n_blocks:  # not `for range(n_blocks)`: the interpreter fails on run-time bounds
        rows = b0 + tl.arange(0, ROWS)
        mask = (rows < n_blocks)[:, None] & buckets[None, :]
        ptrs = hist_ptr + rows[:, None] * (E + 1) + col[None, :]
        h = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(h, axis=0) - h + seen[None, :], mask=mask)
        seen += tl.sum(h, axis=0)
        b0 += ROWS
    kept = tl.where(real, tl.where(capacity < 0, seen, tl.minimum(seen, capacity)), 0)
    dropped = seen - kept
    n_kept = tl.sum(kept, axis=0)
    tl.store(offsets_ptr + col, (tl.cumsum(kept, axis=0) - kept).to(tl.int64), mask=real)
    tl.store(offsets_ptr + E, n_kept.to(tl.int64))
    tl.store(drop_start_ptr + col, n_kept + tl.cumsum(dropped, axis=0) - dropped, mask=buckets)


@triton.jit
def _permute_scatter_kernel(ids_ptr, stride_t, stride_k, hist_ptr, offsets_ptr, drop_start_ptr, order_ptr, T, S, E,
                            top_k, capacity, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    assignment, expert = _priority_block(ids_ptr, stride_t, stride_k, block, T, S, E, top_k, BLOCK)
    valid = expert >= 0
    i = tl.arange(0, BLOCK)
    earlier_same = (expert[:, None] == expert[None, :]) & (i[None, :] < i[:, None])
    rank = tl.load(hist_ptr + block * (E + 1) + expert, mask=valid, other=0) + tl.sum(earlier_same.to(tl.int32), axis=1)
    cap = tl.where(expert == E, 0, capacity)  # the out-of-range bucket keeps nothing
    kept = (cap < 0) | (rank < cap)
    start = tl.where(kept, tl.load(offsets_ptr + expert, mask=valid & (expert < E), other=0).to(tl.int32),
                     tl.load(drop_start_ptr + expert, mask=valid, other=0) - cap)
    tl.store(order_ptr + start + rank, assignment.to(tl.int32), mask=valid)


def permute(topk_ids: torch.Tensor, num_experts: int, capacity: int = -1, *,
            launch=direct) -> Tuple[torch.Tensor, torch.Tensor]:
    """``moe_permute`` on the GPU: (sorted_assignments int32 [S], expert_offsets int64 [E+1])."""
    t, k = topk_ids.shape
    s = t * k
    ids = topk_ids
    order = ids.new_empty((s,), dtype=torch.int32)
    offsets = ids.new_empty((num_experts + 1,), dtype=torch.int64)
    n_blocks = triton.cdiv(s, _PERMUTE_BLOCK)
    buckets = num_experts + 1  # the experts, then the ids out of range
    hist = ids.new_empty((n_blocks, buckets), dtype=torch.int32)
    drop_start = ids.new_empty((buckets,), dtype=torch.int32)
    e_pad = _pow2(buckets)
    with hw.device_guard(ids):
        if n_blocks:
            launch(_permute_count_kernel)[(n_blocks,)](ids, *ids.stride(), hist, t, s, num_experts, k,
                                                       BLOCK=_PERMUTE_BLOCK, E_PAD=e_pad, num_warps=4)
        launch(_permute_scan_kernel)[(1,)](hist, offsets, drop_start, n_blocks, num_experts, capacity,
                                           ROWS=max(2, 2048 // e_pad), E_PAD=e_pad, num_warps=4)
        if n_blocks:
            launch(_permute_scatter_kernel)[(n_blocks,)](ids, *ids.stride(), hist, offsets, drop_start, order, t, s,
                                                         num_experts, k, capacity, BLOCK=_PERMUTE_BLOCK, num_warps=4)
    return order, offsets


# ---------------------------------------------------------------------------------------------
# 3. experts: grouped GEMMs over expert-sorted rows
# ---------------------------------------------------------------------------------------------
#
# Each projection runs one of three kernels, picked per call from the rows per used expert by
# hw.moe_gemm_tiles (the "KIND" of a tile configuration):
# * "mma": tl.dot over tiles loaded through pointers, the token rows gathered in the load;
#   weights in x's dtype, or MXFP4 decoded in registers. Any shape, dtype and GPU.
# * "tma": prefill with weights in x's dtype on Hopper. The token rows are first gathered into a
#   contiguous [S, d] buffer (one pass), so that both operands are plain 2-D tiles that the Tensor
#   Memory Accelerator loads (tensor descriptors): no address arithmetic or gather in the K loop.
# * "gemv": decode with MXFP4 weights and a few rows per expert. A tensor-core tile would spend
#   most of its rows on padding while the decode of the weights sets the pace; here the weights
#   stream through 16-byte loads, are decoded 8 codes per 32-bit word (about 3 instructions a
#   code) and meet each row in float32 multiply-adds on CUDA cores.
# Every program owns one expert's tile: a tile never mixes experts (_expert_tile).


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _expert_tile(pid, offsets_ptr, n_tiles, E, S, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """The work of program ``pid``: (expert, first row, the expert's end row, n tile, busy, kept).

    Programs go expert by expert; inside an expert, n tile by n tile with the row tiles fastest,
    so the programs sharing a weight tile run together and the expert's rows stay in L2.
    ``busy`` programs have work; from ``pid == busy`` on, the expert returned is ``E``. ``kept``
    rows (the first) belong to experts, the others are dropped.
    Whatever ``expert_offsets`` hold, expert ``e`` owns rows ``[o[e], o[e+1])`` of the offsets
    ``o`` read as 0, then the running maximum of ``expert_offsets[1:]`` clamped to ``[0, S]``:
    valid offsets are unchanged, and no row outside ``[0, S)`` or of two experts is ever touched.
    """
    eid = tl.arange(0, E_PAD)
    real = eid < E
    lo = tl.load(offsets_ptr + eid, mask=real & (eid > 0), other=0)
    hi = tl.load(offsets_ptr + eid + 1, mask=real, other=0)
    lo = tl.associative_scan(tl.minimum(tl.maximum(lo, 0), S), 0, _larger)
    hi = tl.associative_scan(tl.minimum(tl.maximum(hi, 0), S), 0, _larger)
    m_tiles = tl.where(real, (hi - lo + BLOCK_M - 1) // BLOCK_M, 0)
    work = m_tiles * n_tiles
    work_end = tl.cumsum(work, axis=0)
    e = tl.sum((work_end <= pid).to(tl.int64), axis=0)  # int64: it multiplies weight strides
    mine = eid == e
    m_tiles_e = tl.maximum(tl.sum(tl.where(mine, m_tiles, 0), axis=0), 1)
    local = pid - tl.sum(tl.where(mine, work_end - work, 0), axis=0)
    row0 = tl.sum(tl.where(mine, lo, 0), axis=0) + (local % m_tiles_e) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), axis=0)
    return e, row0, row_end, local // m_tiles_e, tl.sum(work, axis=0), tl.max(hi, axis=0)


@triton.jit
def _gated_rows(cols, F, ACTIVATION: tl.constexpr):
    """w_up rows of the gate and the up halves of activation columns ``cols``, and w_up's width U."""
    if ACTIVATION == _GELU:
        return cols, cols, F
    elif ACTIVATION == _GPT_OSS:
        return 2 * cols, 2 * cols + 1, 2 * F  # interleaved: gate, up, gate, up, ...
    else:
        return cols, cols + F, 2 * F  # halves: all gates, then all ups


@triton.jit
def _weight_tile(w_e, s_e, rows, k0, K: tl.constexpr, DTYPE: tl.constexpr, QUANT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """Rows ``rows`` (int64 [BLOCK_N]) of one expert's [rows, K] weight, columns k0..k0+BLOCK_K,
    as a [BLOCK_K, BLOCK_N] dot operand in DTYPE; MXFP4 weights are decoded here, in registers."""
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    if QUANT:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        kg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        packed_ptrs = w_e + rows[:, None] * (K // 2) + kb[None, :]
        scale_ptrs = s_e + rows[:, None] * (K // 32) + kg[None, :]
        if EVEN_K:
            packed = tl.load(packed_ptrs)
            scales = tl.load(scale_ptrs)
        else:
            packed = tl.load(packed_ptrs, mask=(kb < K // 2)[None, :], other=0)
            scales = tl.load(scale_ptrs, mask=(kg < K // 32)[None, :], other=127)
        tile = tl.trans(dequantize_tile(packed, scales, BLOCK_N, BLOCK_K, DTYPE, INTERPRETER))
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_e + rows[None, :] * K + kk[:, None]
        if EVEN_K:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(kk < K)[:, None], other=0.0)
    return tile


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    if INTERPRETER and a.dtype == tl.bfloat16:
        # Triton 3.6's interpreter stores bf16 as uint16 and its tl.dot multiplies those bits as
        # integers; widening is exact and the accumulation is float32 either way.
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _activate(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    if ACTIVATION == _SWIGLU:
        h = gate * tl.sigmoid(gate) * up
    elif ACTIVATION == _GELU:
        h = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        h = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    return h


@triton.jit
def _store_act(gate, up, act_ptr, b_ptr, e, U, gate_rows, up_rows, rows, row_end, cols, F, alpha, limit,
               ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The up projection's epilogue on [BLOCK_M, BLOCK_N] float32 sums: bias, activation, store."""
    if HAS_BIAS:
        gate += tl.load(b_ptr + e * U + gate_rows).to(tl.float32)[None, :]
        if ACTIVATION != _GELU:
            up += tl.load(b_ptr + e * U + up_rows).to(tl.float32)[None, :]
    h = _activate(gate, up, alpha, limit, ACTIVATION)
    tl.store(act_ptr + rows[:, None] * F + cols[None, :], h.to(act_ptr.dtype.element_ty),
             mask=(rows < row_end)[:, None] & (cols < F)[None, :])


@triton.jit
def _token_rows(assign_ptr, rows, row_end, S, top_k):
    """The token of each row ``rows`` (those past the expert's end repeat its last row), and
    whether its assignment is in ``[0, S)``; an assignment out of range reads token 0."""
    a = tl.load(assign_ptr + tl.minimum(rows, row_end - 1)).to(tl.int64)
    ok = (a >= 0) & (a < S)
    return tl.where(ok, a, 0) // top_k, ok


@triton.jit
def _store_y(acc, y_ptr, b_ptr, assign_ptr, e, S, N, w_rows, rows, row_end, cols, HAS_BIAS: tl.constexpr):
    """The down projection's epilogue on [BLOCK_M, BLOCK_N] float32 sums: bias, store; a row whose
    assignment is out of range is zero (``assign_ptr`` None: every assignment is valid)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * N + w_rows).to(tl.float32)[None, :]
    if assign_ptr is not None:
        _, ok = _token_rows(assign_ptr, rows, row_end, S, 1)
        acc = tl.where(ok[:, None], acc, 0.0)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < row_end)[:, None] & (cols < N)[None, :])


@triton.jit
def _zero_dropped_rows(spare, kept, y_ptr, S, N, n_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Spare program ``spare`` (0, 1, ...) of a down projection writes zeros over one tile of the
    dropped rows, which follow the ``kept`` ones (see _row_tiles: there are spares enough)."""
    rows = kept + (spare // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (spare % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], tl.zeros([BLOCK_M, BLOCK_N], y_ptr.dtype.element_ty),
             mask=(rows < S)[:, None] & (cols < N)[None, :])


@triton.jit
def _expert_weights(w, w_scales_ptr, e, rows_per_expert, K: tl.constexpr, QUANT: tl.constexpr):
    """Base pointers of expert ``e``'s [rows_per_expert, K] weight and its scales (MXFP4: K/2
    bytes and K/32 scales a row; otherwise no scales, and the weight pointer stands in)."""
    if QUANT:
        return w + e * rows_per_expert * (K // 2), w_scales_ptr + e * rows_per_expert * (K // 32)
    w_e = w + e * rows_per_expert * K
    return w_e, w_e


@triton.jit
def _load_columns(row_ptrs, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0..k0+BLOCK_K of the rows ``row_ptrs`` ([BLOCK_M, 1] pointers), zeros past K."""
    kk = k0 + tl.arange(0, BLOCK_K)
    if K % BLOCK_K == 0:
        return tl.load(row_ptrs + kk[None, :])
    return tl.load(row_ptrs + kk[None, :], mask=(kk < K)[None, :], other=0.0)


@triton.jit
def _moe_up_kernel(x, assign_ptr, offsets_ptr, w, w_scales_ptr, b_ptr, act_ptr,
                   S, F, top_k, stride_x, alpha, limit, E, K: tl.constexpr,
                   ACTIVATION: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, E_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # act[r, n] = activation(x[token(r)] @ w_up[e]^T + b_up[e]) for the F activation columns n
    # of this tile; gated activations accumulate the gate and the up column side by side.
    # With TMA, x is a tensor descriptor over the token rows already in expert order and w one
    # over w_up as [E*U, K] (halves layouts only: a block of gate rows, then one of up rows);
    # otherwise both are pointers and the rows of x are gathered here.
    # K (= d) is a compile-time constant: a model's widths are fixed, the K loop's trip count is
    # then known, and Triton 3.6's interpreter (with numpy 2.4) fails on run-time loop bounds.
    n_tiles = tl.cdiv(F, BLOCK_N)
    e, row0, row_end, n_tile, _, _ = _expert_tile(tl.program_id(0), offsets_ptr, n_tiles, E, S, E_PAD, BLOCK_M)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past F read row F-1 (inside the weight) and are masked at the store.
    gate_rows, up_rows, U = _gated_rows(tl.minimum(cols, F - 1).to(tl.int64), F, ACTIVATION)
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if TMA:
        tl.static_assert(ACTIVATION != _GPT_OSS, "TMA tiles need the gate and up rows in blocks")
        a_row = row0.to(tl.int32)  # rows past the expert belong to the next one: never stored
        gate_row = (e * U + n_tile * BLOCK_N).to(tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = x.load([a_row, k0])
            gate = _dot(a, w.load([gate_row, k0]).T, gate, DOT_PRECISION, INTERPRETER)
            if ACTIVATION != _GELU:
                up = _dot(a, w.load([gate_row + F, k0]).T, up, DOT_PRECISION, INTERPRETER)
    else:
        DTYPE: tl.constexpr = x.dtype.element_ty
        # Rows past the expert's end repeat its last row (no masked loads) and are not stored.
        tokens, _ = _token_rows(assign_ptr, rows, row_end, S, top_k)
        x_rows = x + tokens[:, None] * stride_x
        w_e, s_e = _expert_weights(w, w_scales_ptr, e, U, K, QUANT)
        for k0 in range(0, K, BLOCK_K):
            a = _load_columns(x_rows, k0, K, BLOCK_K)
            gate = _dot(a, _weight_tile(w_e, s_e, gate_rows, k0, K, DTYPE, QUANT, BLOCK_N, BLOCK_K, INTERPRETER),
                        gate, DOT_PRECISION, INTERPRETER)
            if ACTIVATION != _GELU:
                up = _dot(a, _weight_tile(w_e, s_e, up_rows, k0, K, DTYPE, QUANT, BLOCK_N, BLOCK_K, INTERPRETER),
                          up, DOT_PRECISION, INTERPRETER)
    _store_act(gate, up, act_ptr, b_ptr, e, U, gate_rows, up_rows, rows, row_end, cols, F, alpha, limit,
               ACTIVATION, HAS_BIAS)


@triton.jit
def _moe_down_kernel(act, assign_ptr, offsets_ptr, w, w_scales_ptr, b_ptr, y_ptr, S, N, E, K: tl.constexpr,
                     QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     INTERPRETER: tl.constexpr, E_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[r] = act[r] @ w_down[e]^T + b_down[e] (K = F, a compile-time constant as in the up
    # projection); the spare programs zero the dropped rows. With TMA, act and w (w_down as
    # [E*N, K]) are tensor descriptors, else pointers.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    e, row0, row_end, n_tile, busy, kept = _expert_tile(pid, offsets_ptr, n_tiles, E, S, E_PAD, BLOCK_M)
    if e >= E:
        _zero_dropped_rows(pid - busy, kept, y_ptr, S, N, n_tiles, BLOCK_M, BLOCK_N)
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if TMA:
        a_row = row0.to(tl.int32)  # rows past the expert belong to the next one: never stored
        w_row = (e * N + n_tile * BLOCK_N).to(tl.int32)
        for k0 in range(0, K, BLOCK_K):
            acc = _dot(act.load([a_row, k0]), w.load([w_row, k0]).T, acc, DOT_PRECISION, INTERPRETER)
    else:
        DTYPE: tl.constexpr = y_ptr.dtype.element_ty
        # Rows past the expert's end repeat its last row (no masked loads) and are not stored.
        a_rows = act + tl.minimum(rows, row_end - 1)[:, None] * K
        w_e, s_e = _expert_weights(w, w_scales_ptr, e, N, K, QUANT)
        for k0 in range(0, K, BLOCK_K):
            a = _load_columns(a_rows, k0, K, BLOCK_K)
            acc = _dot(a, _weight_tile(w_e, s_e, w_rows, k0, K, DTYPE, QUANT, BLOCK_N, BLOCK_K, INTERPRETER),
                       acc, DOT_PRECISION, INTERPRETER)
    _store_y(acc, y_ptr, b_ptr, assign_ptr, e, S, N, w_rows, rows, row_end, cols, HAS_BIAS)


@triton.jit
def _gemv_step(acc, w_e, s_e, w_rows, x_ptr, x_rows, k0, K: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, MASKED: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc [R, BLOCK_K/32, BLOCK_M] plus the products of columns k0..k0+BLOCK_K (per MX block)."""
    R: tl.constexpr = w_rows.shape[0]
    KB: tl.constexpr = BLOCK_K // 32
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # 32-bit words of 8 codes
    kb = k0 // 32 + tl.arange(0, KB)
    kx = k0 + tl.arange(0, BLOCK_K)
    word_ptrs = w_e.to(tl.pointer_type(tl.uint32)) + w_rows[:, None] * (K // 8) + kw[None, :]
    scale_ptrs = s_e + w_rows[:, None] * (K // 32) + kb[None, :]
    x_ptrs = x_ptr + x_rows[:, None] + kx[None, :]
    if MASKED:
        words = tl.load(word_ptrs, mask=(kw < K // 8)[None, :], other=0)
        scales = tl.load(scale_ptrs, mask=(kb < K // 32)[None, :], other=127)
        xs = tl.load(x_ptrs, mask=(kx < K)[None, :], other=0.0)
    else:
        words = tl.load(word_ptrs)
        scales = tl.load(scale_ptrs)
        xs = tl.load(x_ptrs)
    codes = tl.reshape(float32_codes_from_words(words, INTERPRETER), [R, KB, 32])
    sums = row_block_sums(codes, tl.reshape(xs.to(tl.float32), [BLOCK_M, KB, 32]), BLOCK_M)
    # Codes are values * 2^-14: undo that exactly before the scale (which may be large).
    return acc + scaled_block_sums(sums, scales)


@triton.jit
def _mxfp4_gemv(w_e, s_e, w_rows, x_ptr, x_rows, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                INTERPRETER: tl.constexpr):
    """[R, BLOCK_M] float32: the MXFP4 weight rows ``w_rows`` (int64 [R]) of one expert times
    BLOCK_M rows of x that start at element offsets ``x_rows`` (int64 [BLOCK_M]). The sums stay
    per MX block in each thread's registers until the end (one cross-thread reduction)."""
    FULL: tl.constexpr = K // BLOCK_K * BLOCK_K
    acc = tl.zeros([w_rows.shape[0], BLOCK_K // 32, BLOCK_M], tl.float32)
    for k0 in range(0, FULL, BLOCK_K):
        acc = _gemv_step(acc, w_e, s_e, w_rows, x_ptr, x_rows, k0, K, BLOCK_M, BLOCK_K, False, INTERPRETER)
    if FULL < K:
        acc = _gemv_step(acc, w_e, s_e, w_rows, x_ptr, x_rows, FULL, K, BLOCK_M, BLOCK_K, True, INTERPRETER)
    return tl.sum(acc, axis=1)


@triton.jit
def _moe_up_gemv_kernel(xs_ptr, offsets_ptr, w_ptr, w_scales_ptr, b_ptr, act_ptr, S, F, alpha, limit, E,
                        K: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETER: tl.constexpr,
                        E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The up projection of _moe_up_kernel for MXFP4 weights on CUDA cores (see _mxfp4_gemv), on
    # the token rows gathered in expert order in float32 (xs [S, K]); a gated activation reads the
    # gate and up rows of its columns as one set of 2*BLOCK_N weight rows.
    n_tiles = tl.cdiv(F, BLOCK_N)
    e, row0, row_end, n_tile, _, _ = _expert_tile(tl.program_id(0), offsets_ptr, n_tiles, E, S, E_PAD, BLOCK_M)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    x_rows = tl.minimum(rows, row_end - 1) * K  # rows past the expert's end: its last row, not stored
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    gate_rows, up_rows, U = _gated_rows(tl.minimum(cols, F - 1).to(tl.int64), F, ACTIVATION)
    w_e, s_e = _expert_weights(w_ptr, w_scales_ptr, e, U, K, True)
    if ACTIVATION == _GELU:
        gate = tl.trans(_mxfp4_gemv(w_e, s_e, gate_rows, xs_ptr, x_rows, K, BLOCK_M, BLOCK_K, INTERPRETER))
        up = gate
    else:
        both = _mxfp4_gemv(w_e, s_e, tl.reshape(tl.join(gate_rows, up_rows), [2 * BLOCK_N]),
                           xs_ptr, x_rows, K, BLOCK_M, BLOCK_K, INTERPRETER)  # [2*BLOCK_N, BLOCK_M]: gate, up, ...
        gate, up = tl.split(tl.permute(tl.reshape(both, [BLOCK_N, 2, BLOCK_M]), (2, 0, 1)))
    _store_act(gate, up, act_ptr, b_ptr, e, U, gate_rows, up_rows, rows, row_end, cols, F, alpha, limit,
               ACTIVATION, HAS_BIAS)


@triton.jit
def _moe_down_gemv_kernel(act_ptr, assign_ptr, offsets_ptr, w_ptr, w_scales_ptr, b_ptr, y_ptr, S, N, E,
                          K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, INTERPRETER: tl.constexpr, E_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The down projection of _moe_down_kernel for MXFP4 weights on CUDA cores (see _mxfp4_gemv).
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    e, row0, row_end, n_tile, busy, kept = _expert_tile(pid, offsets_ptr, n_tiles, E, S, E_PAD, BLOCK_M)
    if e >= E:
        _zero_dropped_rows(pid - busy, kept, y_ptr, S, N, n_tiles, BLOCK_M, BLOCK_N)
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    w_e, s_e = _expert_weights(w_ptr, w_scales_ptr, e, N, K, True)
    acc = _mxfp4_gemv(w_e, s_e, w_rows, act_ptr, tl.minimum(rows, row_end - 1) * K, K, BLOCK_M, BLOCK_K,
                      INTERPRETER)
    _store_y(tl.trans(acc), y_ptr, b_ptr, assign_ptr, e, S, N, w_rows, rows, row_end, cols, HAS_BIAS)


@triton.jit
def _gather_rows_kernel(x_ptr, assign_ptr, xs_ptr, S, D, stride_x, top_k,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # xs[r] = x[sorted_assignments[r] // top_k] in xs's dtype: the token rows in expert order, for
    # the "tma" kind (x's dtype) and the "gemv" kind (float32: widened once, not in every program).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    a = tl.load(assign_ptr + r, mask=r < S, other=0).to(tl.int64)
    tokens = tl.where((a >= 0) & (a < S), a, 0) // top_k  # out of range: token 0, zeroed by the down projection
    mask = (r < S)[:, None] & (c < D)[None, :]
    row = tl.load(x_ptr + tokens[:, None] * stride_x + c[None, :], mask=mask)
    tl.store(xs_ptr + r.to(tl.int64)[:, None] * D + c[None, :], row.to(xs_ptr.dtype.element_ty), mask=mask)


def _gather_rows(x: torch.Tensor, sorted_assignments: torch.Tensor, top_k: int, dtype: torch.dtype,
                 launch) -> torch.Tensor:
    """x's token rows in expert order, [S, d] in ``dtype``."""
    s, d = sorted_assignments.shape[0], x.shape[1]
    xs = x.new_empty((s, d), dtype=dtype)
    block_d = min(_pow2(d), 256)
    block_r = hw.stream_tile(block_d * xs.element_size())
    while block_r > 1 and triton.cdiv(s, block_r) * triton.cdiv(d, block_d) < hw.stream_min_programs():
        block_r //= 2
    launch(_gather_rows_kernel)[(triton.cdiv(s, block_r), triton.cdiv(d, block_d))](
        x, sorted_assignments, xs, s, d, x.stride(0), top_k, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=hw.stream_num_warps(block_r * block_d * xs.element_size()))
    return xs


def _row_tiles(s: int, num_experts: int, block_m: int) -> int:
    """Row tiles a grouped GEMM launches, whatever the split of ``s`` rows over the experts.

    Each used expert adds at most one partial tile and no tile is empty, so the tiles with work
    number at most ``min(ceil(s/BLOCK_M) + min(E, s), s)``. The spare programs of the down
    projection are then always enough to zero the dropped rows: with ``kept`` rows kept, the
    spares number more than ``(s - kept)/BLOCK_M`` row tiles' worth.
    """
    return min(triton.cdiv(s, block_m) + min(num_experts, s), s)


def gemm_tiles(s: int, num_experts: int, f: int, d: int, dtype: torch.dtype, quant: bool = False,
               tma: bool = False) -> Tuple[dict, dict]:
    """Kernels and tiles of the up and down projections (``f`` and ``d`` output columns) for ``s``
    rows over ``num_experts`` experts: the tuning table's entry for the average rows per used
    expert, with narrower n tiles when the grid would leave SMs idle (decode: few experts used).
    ``tma``: the "tma" kind may be chosen (Hopper, weights in x's dtype, descriptor-ready)."""
    used = min(num_experts, s)
    tiles = hw.moe_gemm_tiles(s / max(used, 1), dtype, quant, tma)
    for t, n in zip(tiles, (f, d)):
        row_tiles = max(used, triton.cdiv(s, t["BLOCK_M"]))  # about the tiles that have rows
        narrowest = hw.MOE_GEMV_MIN_BLOCK_N if t["KIND"] == "gemv" else hw.MOE_MIN_BLOCK_N
        while t["BLOCK_N"] > narrowest and row_tiles * triton.cdiv(n, t["BLOCK_N"]) < hw.stream_min_programs():
            t["BLOCK_N"] //= 2
    return tiles


def _launch_config(tiles: dict) -> dict:
    """Kernel keyword arguments of a tile configuration (all of it but its KIND)."""
    return {k: v for k, v in tiles.items() if k != "KIND"}


def default_tiles(x: torch.Tensor, s: int, w_up: torch.Tensor, w_down: torch.Tensor, quant: bool,
                  activation: str, allow_tma: bool = True) -> Tuple[dict, dict]:
    """The kernels and tiles :func:`experts` runs by default: :func:`gemm_tiles`, with the kinds
    that these tensors allow. "gemv" loads weight rows as 16-byte vectors and "tma" describes them
    (and the activations) as TMA tiles, which need 16-byte aligned bases and row pitches."""
    d, f = x.shape[1], w_down.shape[2] * (2 if quant else 1)
    # torch's allocator aligns every storage to at least 256 bytes, so only the offset into the
    # storage decides; unlike data_ptr() this also works on the fake tensors of torch.compile.
    aligned = all(w.storage_offset() * w.element_size() % 16 == 0 for w in (w_up, w_down))
    tma = (allow_tma and aligned and hw.has_tma() and not quant and x.dtype != torch.float32
           and activation != "gpt_oss_swiglu" and d * x.element_size() % 16 == 0 and f * x.element_size() % 16 == 0)
    return gemm_tiles(s, w_up.shape[0], f, d, x.dtype, quant and aligned, tma)


def up_projection(x: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
                  w_up: torch.Tensor, w_up_scales: Optional[torch.Tensor], b_up: Optional[torch.Tensor],
                  top_k: int, activation: str, alpha: float, limit: float, act: torch.Tensor, tiles: dict,
                  launch=direct) -> torch.Tensor:
    """act [S, F] = the activation of x's rows times w_up (rows of dropped assignments unwritten)."""
    s, d = sorted_assignments.shape[0], x.shape[1]
    num_experts, f = w_up.shape[0], act.shape[1]
    grid = (_row_tiles(s, num_experts, tiles["BLOCK_M"]) * triton.cdiv(f, tiles["BLOCK_N"]),)
    common = dict(S=s, F=f, alpha=float(alpha), limit=float(limit), E=num_experts, K=d,
                  ACTIVATION=ACTIVATIONS.index(activation), HAS_BIAS=b_up is not None, E_PAD=_pow2(num_experts),
                  **_launch_config(tiles))
    if tiles["KIND"] == "gemv":
        xs = _gather_rows(x, sorted_assignments, top_k, torch.float32, launch)
        launch(_moe_up_gemv_kernel)[grid](xs, expert_offsets, w_up, w_up_scales, b_up, act,
                                          INTERPRETER=hw.pure_triton(), **common)
        return act
    common.update(top_k=top_k, stride_x=x.stride(0), QUANT=w_up_scales is not None, TMA=tiles["KIND"] == "tma",
                  DOT_PRECISION=_dot_precision(x.dtype), INTERPRETER=hw.pure_triton())
    if tiles["KIND"] == "tma":
        xs = _gather_rows(x, sorted_assignments, top_k, x.dtype, launch)
        x = TensorDescriptor.from_tensor(xs, [tiles["BLOCK_M"], tiles["BLOCK_K"]])
        w_up = TensorDescriptor.from_tensor(w_up.view(-1, d), [tiles["BLOCK_N"], tiles["BLOCK_K"]])
    launch(_moe_up_kernel)[grid](x, sorted_assignments, expert_offsets, w_up, w_up_scales, b_up, act, **common)
    return act


def down_projection(act: torch.Tensor, expert_offsets: torch.Tensor, w_down: torch.Tensor,
                    w_down_scales: Optional[torch.Tensor], b_down: Optional[torch.Tensor], y: torch.Tensor,
                    tiles: dict, launch=direct, sorted_assignments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [S, d] = act's rows times w_down plus b_down; the rows of dropped assignments are zeros, and
    so are those whose ``sorted_assignments`` entry is out of range (None: none is)."""
    (s, f), d = act.shape, y.shape[1]
    num_experts = w_down.shape[0]
    grid = (_row_tiles(s, num_experts, tiles["BLOCK_M"]) * triton.cdiv(d, tiles["BLOCK_N"]),)
    common = dict(S=s, N=d, E=num_experts, K=f, HAS_BIAS=b_down is not None, E_PAD=_pow2(num_experts),
                  **_launch_config(tiles))
    if tiles["KIND"] == "gemv":
        launch(_moe_down_gemv_kernel)[grid](act, sorted_assignments, expert_offsets, w_down, w_down_scales, b_down, y,
                                            INTERPRETER=hw.pure_triton(), **common)
        return y
    if tiles["KIND"] == "tma":
        act = TensorDescriptor.from_tensor(act, [tiles["BLOCK_M"], tiles["BLOCK_K"]])
        w_down = TensorDescriptor.from_tensor(w_down.view(-1, f), [tiles["BLOCK_N"], tiles["BLOCK_K"]])
    launch(_moe_down_kernel)[grid](act, sorted_assignments, expert_offsets, w_down, w_down_scales, b_down, y,
                                   QUANT=w_down_scales is not None, TMA=tiles["KIND"] == "tma",
                                   DOT_PRECISION=_dot_precision(y.dtype), INTERPRETER=hw.pure_triton(), **common)
    return y


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 activations are multiplied exactly (IEEE); bf16/fp16 operands are exact in any mode.
    return "ieee" if dtype == torch.float32 else hw.half_dot_precision()


def experts(x: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
            w_up: torch.Tensor, w_down: torch.Tensor, w_up_scales: Optional[torch.Tensor] = None,
            w_down_scales: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
            b_down: Optional[torch.Tensor] = None, top_k: int = 1, activation: str = "swiglu",
            alpha: float = 1.702, limit: float = 7.0, *, launch=direct,
            tiles: Optional[Tuple[dict, dict]] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``moe_experts`` on the GPU. ``tiles`` overrides :func:`default_tiles` (tuning sweeps, tests):
    an (up, down) pair of tile configurations of hw.py's form; ``out`` is a contiguous [S, d]
    output to write (every row is written)."""
    s, d = sorted_assignments.shape[0], x.shape[1]
    quant = w_up_scales is not None
    f = w_down.shape[2] * (2 if quant else 1)
    y = x.new_empty((s, d)) if out is None else out
    if s == 0 or d == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    sorted_assignments, expert_offsets, b_up, b_down = map(_dense, (sorted_assignments, expert_offsets, b_up, b_down))
    # Traced launches (the triton_op) take no TMA kind: a host-side TensorDescriptor needs concrete
    # sizes, and Inductor traces with symbolic ones ("Cannot call numel() on tensor with symbolic
    # sizes", torch 2.11 / Triton 3.6 on an H100). Compiled prefill runs the tensor-core pointer kernel.
    allow_tma = launch is not torch.library.wrap_triton
    tiles = tiles or default_tiles(x, s, w_up, w_down, quant, activation, allow_tma)
    # The gemv kernel reads its input rows in float32: the activations stay unrounded for it.
    act = x.new_empty((s, f), dtype=torch.float32 if tiles[1]["KIND"] == "gemv" else x.dtype)
    with hw.device_guard(x):
        up_projection(x, sorted_assignments, expert_offsets, w_up, w_up_scales, b_up, top_k, activation, alpha,
                      limit, act, tiles[0], launch)
        down_projection(act, expert_offsets, w_down, w_down_scales, b_down, y, tiles[1], launch, sorted_assignments)
    return y


# ---------------------------------------------------------------------------------------------
# 4. combine
# ---------------------------------------------------------------------------------------------


@triton.jit
def _invert_kernel(order_ptr, row_of_ptr, S, BLOCK: tl.constexpr):
    # row_of[a] = the row r with order[r] == a (row_of starts at -1: no row). For an order that is
    # not a permutation the result is still defined, whatever the check level: entries outside
    # [0, S) are ignored, and an assignment named by several rows gets the last (atomic max).
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = r < S
    a = tl.load(order_ptr + r, mask=inside, other=0).to(tl.int64)
    tl.atomic_max(row_of_ptr + a, r, mask=inside & (a >= 0) & (a < S), sem="relaxed")


@triton.jit
def _combine_kernel(y_ptr, row_of_ptr, offsets_ptr, weights_ptr, out_ptr, T, D, stride_y, E,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_tok = tok < T
    in_col = (col < D)[None, :]
    n_kept = tl.load(offsets_ptr + E)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for j in tl.static_range(TOP_K):  # in j order, as the spec sums
        a = tok * TOP_K + j
        row = tl.load(row_of_ptr + a, mask=in_tok, other=-1)
        kept = in_tok & (row >= 0) & (row < n_kept)  # a dropped assignment contributes 0, whatever its weight
        w = tl.load(weights_ptr + a, mask=kept, other=0.0)
        v = tl.load(y_ptr + row.to(tl.int64)[:, None] * stride_y + col[None, :], mask=kept[:, None] & in_col,
                    other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * D + col[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_tok[:, None] & in_col)


def combine(y: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
            topk_weights: torch.Tensor, *, launch=direct, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``moe_combine`` on the GPU. ``out`` is a contiguous [T, d] output to write (every element is written)."""
    t, k = topk_weights.shape
    s, d = t * k, y.shape[1]
    out = y.new_empty((t, d)) if out is None else out
    if t == 0 or d == 0:
        return out
    y = y if y.stride(1) == 1 else y.contiguous()
    sorted_assignments, expert_offsets, topk_weights = map(_dense, (sorted_assignments, expert_offsets, topk_weights))
    row_of = torch.full((s,), -1, dtype=torch.int32, device=y.device)
    block_d = min(_pow2(d), 512)
    tile_tokens = max(2, hw.STREAM_TILE_BYTES // (block_d * y.element_size() * k))
    block_t = min(_pow2(t), 1 << (tile_tokens.bit_length() - 1))
    while block_t > 2 and triton.cdiv(t, block_t) * triton.cdiv(d, block_d) < hw.stream_min_programs():
        block_t //= 2
    with hw.device_guard(y):
        launch(_invert_kernel)[(triton.cdiv(s, 1024),)](sorted_assignments, row_of, s, BLOCK=1024, num_warps=4)
        launch(_combine_kernel)[(triton.cdiv(t, block_t), triton.cdiv(d, block_d))](
            y, row_of, expert_offsets, topk_weights, out, t, d, y.stride(0),
            expert_offsets.shape[0] - 1, TOP_K=k, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=hw.stream_num_warps(block_t * block_d * y.element_size() * k))
    return out


# ---------------------------------------------------------------------------------------------
# Registration: apt_hal implementations and their traceable triton_ops (registration.py)
# ---------------------------------------------------------------------------------------------


moe_route_triton = kernel_op(ops.moe_route)(route)
moe_permute_triton = kernel_op(ops.moe_permute)(permute)
moe_experts_triton = kernel_op(ops.moe_experts)(experts)
moe_combine_triton = kernel_op(ops.moe_combine)(combine)
