"""cuda-triton kernels for the four MoE steps of :mod:`apt_hal.contracts.moe_dispatch`.

* route: one kernel; softmax then top-k (optionally renormalized) or top-k then softmax, ties
  to the lower expert index, float32 weights and int32 ids.
* permute: a counting sort on the GPU in three launches: per-block expert histograms over the
  assignments in priority order, one program scanning them (ranks, kept and dropped starts,
  ``expert_offsets``), and a scatter in priority order.
* experts: two grouped GEMMs over the expert-sorted rows. The up projection gathers the token
  rows and applies the activation in its epilogue; the down projection adds its bias and writes
  the zeros of the dropped rows. Weights in ``x``'s dtype, or MXFP4 decoded in registers.
* combine: invert the row order, then gather each token's rows and sum them in ``j`` order in
  float32 (no atomics: deterministic).

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

from apt_hal import ops
from apt_hal.backends.cuda_triton import hw
from apt_hal.backends.cuda_triton.mxfp4_decode import dequantize_tile
from apt_hal.contracts.moe_dispatch import ACTIVATIONS
from apt_hal.registry import impl

_SWIGLU = tl.constexpr(ACTIVATIONS.index("swiglu"))
_GELU = tl.constexpr(ACTIVATIONS.index("gelu"))
_GPT_OSS = tl.constexpr(ACTIVATIONS.index("gpt_oss_swiglu"))

_PERMUTE_BLOCK = 128  # assignments per histogram/scatter program (the scatter compares them pairwise)


def _plain(kernel):
    """Launch a kernel as is (eager); ``torch.library.wrap_triton`` is the traceable alternative."""
    return kernel


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels index 1-D and [E, n] operands as contiguous (a no-op when they are)."""
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
    x = tl.load(logits_ptr + row[:, None] * stride_t + col[None, :] * stride_e,
                mask=(col < E)[None, :], other=float("-inf")).to(tl.float32)
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
    out = tok[:, None] * TOP_K + slot
    keep = in_tok[:, None] & chosen
    tl.store(weights_ptr + out, w, mask=keep)
    tl.store(ids_ptr + out, ids, mask=keep)


def route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax_topk", renormalize: bool = False,
          *, launch=_plain) -> Tuple[torch.Tensor, torch.Tensor]:
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
def _priority_block(ids_ptr, block, T, S, top_k, BLOCK: tl.constexpr):
    """Assignments of one block of priorities (every token's first choice by token index, then
    every second choice, ...) and their experts, -1 past the last."""
    p = block * BLOCK + tl.arange(0, BLOCK)
    assignment = (p % T) * top_k + p // T
    expert = tl.load(ids_ptr + assignment, mask=p < S, other=-1).to(tl.int32)
    return assignment, expert


@triton.jit
def _permute_count_kernel(ids_ptr, hist_ptr, T, S, E, top_k, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    block = tl.program_id(0)
    _, expert = _priority_block(ids_ptr, block, T, S, top_k, BLOCK)
    col = tl.arange(0, E_PAD)
    counts = tl.sum((expert[:, None] == col[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + block * E + col, counts, mask=col < E)


@triton.jit
def _permute_scan_kernel(hist_ptr, offsets_ptr, drop_start_ptr, n_blocks, E, capacity,
                         ROWS: tl.constexpr, E_PAD: tl.constexpr):
    # One program: the histograms become each block's first rank per expert (in place), then
    # the experts' kept counts give expert_offsets and the dropped ones the rows after them.
    col = tl.arange(0, E_PAD)
    real = col < E
    seen = tl.zeros([E_PAD], tl.int32)
    b0 = tl.full([], 0, tl.int32)  # a tensor, so the loop-carried value keeps one type
    while b0 < n_blocks:  # not `for range(n_blocks)`: the interpreter fails on run-time bounds
        rows = b0 + tl.arange(0, ROWS)
        mask = (rows < n_blocks)[:, None] & real[None, :]
        ptrs = hist_ptr + rows[:, None] * E + col[None, :]
        h = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(h, axis=0) - h + seen[None, :], mask=mask)
        seen += tl.sum(h, axis=0)
        b0 += ROWS
    kept = tl.where(capacity < 0, seen, tl.minimum(seen, capacity))
    dropped = seen - kept
    n_kept = tl.sum(kept, axis=0)
    tl.store(offsets_ptr + col, (tl.cumsum(kept, axis=0) - kept).to(tl.int64), mask=real)
    tl.store(offsets_ptr + E, n_kept.to(tl.int64))
    tl.store(drop_start_ptr + col, n_kept + tl.cumsum(dropped, axis=0) - dropped, mask=real)


@triton.jit
def _permute_scatter_kernel(ids_ptr, hist_ptr, offsets_ptr, drop_start_ptr, order_ptr, T, S, E, top_k,
                            capacity, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    assignment, expert = _priority_block(ids_ptr, block, T, S, top_k, BLOCK)
    valid = (expert >= 0) & (expert < E)  # ids out of range are a contract error: never index with them
    i = tl.arange(0, BLOCK)
    earlier_same = (expert[:, None] == expert[None, :]) & (i[None, :] < i[:, None])
    rank = tl.load(hist_ptr + block * E + expert, mask=valid, other=0) + tl.sum(earlier_same.to(tl.int32), axis=1)
    kept = (capacity < 0) | (rank < capacity)
    start = tl.where(kept, tl.load(offsets_ptr + expert, mask=valid, other=0).to(tl.int32),
                     tl.load(drop_start_ptr + expert, mask=valid, other=0) - capacity)
    tl.store(order_ptr + start + rank, assignment.to(tl.int32), mask=valid)


def permute(topk_ids: torch.Tensor, num_experts: int, capacity: int = -1, *,
            launch=_plain) -> Tuple[torch.Tensor, torch.Tensor]:
    """``moe_permute`` on the GPU: (sorted_assignments int32 [S], expert_offsets int64 [E+1])."""
    t, k = topk_ids.shape
    s = t * k
    ids = topk_ids.contiguous()
    order = ids.new_empty((s,), dtype=torch.int32)
    offsets = ids.new_empty((num_experts + 1,), dtype=torch.int64)
    n_blocks = triton.cdiv(s, _PERMUTE_BLOCK)
    hist = ids.new_empty((n_blocks, num_experts), dtype=torch.int32)
    drop_start = ids.new_empty((num_experts,), dtype=torch.int32)
    e_pad = _pow2(num_experts)
    with hw.device_guard(ids):
        if n_blocks:
            launch(_permute_count_kernel)[(n_blocks,)](ids, hist, t, s, num_experts, k,
                                                       BLOCK=_PERMUTE_BLOCK, E_PAD=e_pad, num_warps=4)
        launch(_permute_scan_kernel)[(1,)](hist, offsets, drop_start, n_blocks, num_experts, capacity,
                                           ROWS=max(2, 2048 // e_pad), E_PAD=e_pad, num_warps=4)
        if n_blocks:
            launch(_permute_scatter_kernel)[(n_blocks,)](ids, hist, offsets, drop_start, order, t, s, num_experts,
                                                         k, capacity, BLOCK=_PERMUTE_BLOCK, num_warps=4)
    return order, offsets


# ---------------------------------------------------------------------------------------------
# 3. experts: grouped GEMMs over expert-sorted rows
# ---------------------------------------------------------------------------------------------


@triton.jit
def _expert_tile(pid, offsets_ptr, n_tiles, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """The work of program ``pid``: (expert, first row, the expert's end row, n tile, busy).

    Programs go expert by expert; inside an expert, n tile by n tile with the row tiles fastest,
    so the programs sharing a weight tile run together and the expert's rows stay in L2.
    ``busy`` programs have work; from ``pid == busy`` on, the expert returned is ``E``.
    """
    eid = tl.arange(0, E_PAD)
    lo = tl.load(offsets_ptr + eid, mask=eid < E, other=0)
    hi = tl.load(offsets_ptr + eid + 1, mask=eid < E, other=0)
    m_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    work = m_tiles * n_tiles
    work_end = tl.cumsum(work, axis=0)
    e = tl.sum((work_end <= pid).to(tl.int64), axis=0)  # int64: it multiplies weight strides
    mine = eid == e
    m_tiles_e = tl.maximum(tl.sum(tl.where(mine, m_tiles, 0), axis=0), 1)
    local = pid - tl.sum(tl.where(mine, work_end - work, 0), axis=0)
    row0 = tl.sum(tl.where(mine, lo, 0), axis=0) + (local % m_tiles_e) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), axis=0)
    return e, row0, row_end, local // m_tiles_e, tl.sum(work, axis=0)


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
def _moe_up_kernel(x_ptr, assign_ptr, offsets_ptr, w_ptr, w_scales_ptr, b_ptr, act_ptr,
                   F, top_k, stride_x, alpha, limit, E, K: tl.constexpr,
                   ACTIVATION: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, E_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # act[r, n] = activation(x[token(r)] @ w_up[e]^T + b_up[e]) for the F activation columns n
    # of this tile; gated activations accumulate the gate and the up column side by side.
    # K (= d) is a compile-time constant: a model's widths are fixed, the K loop's trip count is
    # then known, and Triton 3.6's interpreter (with numpy 2.4) fails on run-time loop bounds.
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    n_tiles = tl.cdiv(F, BLOCK_N)
    e, row0, row_end, n_tile, _ = _expert_tile(tl.program_id(0), offsets_ptr, n_tiles, E, E_PAD, BLOCK_M)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    in_expert = rows < row_end
    # Rows past the expert's end repeat its last row (no masked loads) and are not stored.
    tokens = tl.load(assign_ptr + tl.minimum(rows, row_end - 1)).to(tl.int64) // top_k
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = tl.minimum(cols, F - 1).to(tl.int64)  # inside the weight; masked at the store
    if ACTIVATION == _GELU:
        U = F
        gate_rows = w_cols
        up_rows = w_cols
    elif ACTIVATION == _GPT_OSS:
        U = 2 * F
        gate_rows = 2 * w_cols  # interleaved: gate, up, gate, up, ...
        up_rows = gate_rows + 1
    else:
        U = 2 * F
        gate_rows = w_cols  # halves: all gates, then all ups
        up_rows = w_cols + F
    if QUANT:
        w_e = w_ptr + e * U * (K // 2)
        s_e = w_scales_ptr + e * U * (K // 32)
    else:
        w_e = w_ptr + e * U * K
        s_e = w_e  # no scales
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    x_rows = x_ptr + tokens[:, None] * stride_x
    kk = tl.arange(0, BLOCK_K)
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_rows + (k0 + kk)[None, :])
        else:
            a = tl.load(x_rows + (k0 + kk)[None, :], mask=(k0 + kk < K)[None, :], other=0.0)
        gate = _dot(a, _weight_tile(w_e, s_e, gate_rows, k0, K, DTYPE, QUANT, BLOCK_N, BLOCK_K, INTERPRETER),
                    gate, DOT_PRECISION, INTERPRETER)
        if ACTIVATION != _GELU:
            up = _dot(a, _weight_tile(w_e, s_e, up_rows, k0, K, DTYPE, QUANT, BLOCK_N, BLOCK_K, INTERPRETER),
                      up, DOT_PRECISION, INTERPRETER)
    if HAS_BIAS:
        gate += tl.load(b_ptr + e * U + gate_rows).to(tl.float32)[None, :]
        if ACTIVATION != _GELU:
            up += tl.load(b_ptr + e * U + up_rows).to(tl.float32)[None, :]
    h = _activate(gate, up, alpha, limit, ACTIVATION)
    tl.store(act_ptr + rows[:, None] * F + cols[None, :], h.to(DTYPE),
             mask=in_expert[:, None] & (cols < F)[None, :])


@triton.jit
def _moe_down_kernel(act_ptr, offsets_ptr, w_ptr, w_scales_ptr, b_ptr, y_ptr, S, N, E, K: tl.constexpr,
                     QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     INTERPRETER: tl.constexpr, E_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[r] = act[r] @ w_down[e]^T + b_down[e] (K = F, a compile-time constant as in the up
    # projection); the spare programs zero the dropped rows.
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    e, row0, row_end, n_tile, busy = _expert_tile(pid, offsets_ptr, n_tiles, E, E_PAD, BLOCK_M)
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    if e >= E:
        spare = pid - busy
        rows = tl.load(offsets_ptr + E) + (spare // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (spare % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], tl.zeros([BLOCK_M, BLOCK_N], DTYPE),
                 mask=(rows < S)[:, None] & (cols < N)[None, :])
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    # Rows past the expert's end repeat its last row (no masked loads) and are not stored.
    a_rows = act_ptr + tl.minimum(rows, row_end - 1)[:, None] * K
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    if QUANT:
        w_e = w_ptr + e * N * (K // 2)
        s_e = w_scales_ptr + e * N * (K // 32)
    else:
        w_e = w_ptr + e * N * K
        s_e = w_e  # no scales
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_rows + (k0 + kk)[None, :])
        else:
            a = tl.load(a_rows + (k0 + kk)[None, :], mask=(k0 + kk < K)[None, :], other=0.0)
        acc = _dot(a, _weight_tile(w_e, s_e, w_rows, k0, K, DTYPE, QUANT, BLOCK_N, BLOCK_K, INTERPRETER),
                   acc, DOT_PRECISION, INTERPRETER)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * N + w_rows).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(DTYPE),
             mask=(rows < row_end)[:, None] & (cols < N)[None, :])


def _row_tiles(s: int, num_experts: int, block_m: int) -> int:
    """Row tiles a grouped GEMM launches, whatever the split of ``s`` rows over the experts.

    Each used expert adds at most one partial tile and no tile is empty, so the tiles with work
    number at most ``min(ceil(s/BLOCK_M) + min(E, s), s)``. The spare programs of the down
    projection are then always enough to zero the dropped rows: with ``kept`` rows kept, the
    spares number more than ``(s - kept)/BLOCK_M`` row tiles' worth.
    """
    return min(triton.cdiv(s, block_m) + min(num_experts, s), s)


def gemm_tiles(s: int, num_experts: int, f: int, d: int, dtype: torch.dtype) -> Tuple[dict, dict]:
    """Tiles of the up and down projections (``f`` and ``d`` output columns) for ``s`` rows over
    ``num_experts`` experts: the tuning table's entry for the average rows per used expert, with
    narrower n tiles when the grid would leave SMs idle (decode: few experts used)."""
    used = min(num_experts, s)
    tiles = hw.moe_gemm_tiles(s / max(used, 1), dtype)
    for t, n in zip(tiles, (f, d)):
        row_tiles = max(used, triton.cdiv(s, t["BLOCK_M"]))  # about the tiles that have rows
        while t["BLOCK_N"] > hw.MOE_MIN_BLOCK_N and row_tiles * triton.cdiv(n, t["BLOCK_N"]) < hw.stream_min_programs():
            t["BLOCK_N"] //= 2
    return tiles


def experts(x: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
            w_up: torch.Tensor, w_down: torch.Tensor, w_up_scales: Optional[torch.Tensor] = None,
            w_down_scales: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
            b_down: Optional[torch.Tensor] = None, top_k: int = 1, activation: str = "swiglu",
            alpha: float = 1.702, limit: float = 7.0, *, launch=_plain,
            tiles: Optional[Tuple[dict, dict]] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``moe_experts`` on the GPU. ``tiles`` overrides :func:`gemm_tiles` (tuning sweeps);
    ``out`` is a contiguous [S, d] output to write (every row is written)."""
    s, d = sorted_assignments.shape[0], x.shape[1]
    num_experts = w_up.shape[0]
    quant = w_up_scales is not None
    f = w_down.shape[2] * (2 if quant else 1)
    y = x.new_empty((s, d)) if out is None else out
    if s == 0 or d == 0:
        return y
    x = x if x.stride(1) == 1 else x.contiguous()
    sorted_assignments, expert_offsets, b_up, b_down = map(_dense, (sorted_assignments, expert_offsets, b_up, b_down))
    act = x.new_empty((s, f))
    up_tiles, down_tiles = tiles or gemm_tiles(s, num_experts, f, d, x.dtype)
    common = dict(QUANT=quant, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                  INTERPRETER=hw.interpreting(), E_PAD=_pow2(num_experts))
    with hw.device_guard(x):
        grid = _row_tiles(s, num_experts, up_tiles["BLOCK_M"]) * triton.cdiv(f, up_tiles["BLOCK_N"])
        launch(_moe_up_kernel)[(grid,)](
            x, sorted_assignments, expert_offsets, w_up, w_up_scales, b_up, act, f, top_k, x.stride(0),
            float(alpha), float(limit), num_experts, K=d, ACTIVATION=ACTIVATIONS.index(activation),
            HAS_BIAS=b_up is not None, **common, **up_tiles)
        grid = _row_tiles(s, num_experts, down_tiles["BLOCK_M"]) * triton.cdiv(d, down_tiles["BLOCK_N"])
        launch(_moe_down_kernel)[(grid,)](
            act, expert_offsets, w_down, w_down_scales, b_down, y, s, d, num_experts, K=f,
            HAS_BIAS=b_down is not None, **common, **down_tiles)
    return y


# ---------------------------------------------------------------------------------------------
# 4. combine
# ---------------------------------------------------------------------------------------------


@triton.jit
def _invert_kernel(order_ptr, row_of_ptr, S, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = r < S
    tl.store(row_of_ptr + tl.load(order_ptr + r, mask=inside, other=0), r, mask=inside)


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
        row = tl.load(row_of_ptr + a, mask=in_tok, other=0)
        kept = in_tok & (row < n_kept)  # a dropped assignment contributes 0, whatever its weight
        w = tl.load(weights_ptr + a, mask=kept, other=0.0)
        v = tl.load(y_ptr + row.to(tl.int64)[:, None] * stride_y + col[None, :], mask=kept[:, None] & in_col,
                    other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * D + col[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_tok[:, None] & in_col)


def combine(y: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
            topk_weights: torch.Tensor, *, launch=_plain, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``moe_combine`` on the GPU. ``out`` is a contiguous [T, d] output to write (every element is written)."""
    t, k = topk_weights.shape
    s, d = t * k, y.shape[1]
    out = y.new_empty((t, d)) if out is None else out
    if t == 0 or d == 0:
        return out
    y = y if y.stride(1) == 1 else y.contiguous()
    sorted_assignments, expert_offsets, topk_weights = map(_dense, (sorted_assignments, expert_offsets, topk_weights))
    row_of = torch.empty(s, dtype=torch.int32, device=y.device)
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
# Registration: apt_hal implementations (direct launches) and traceable triton_ops
# ---------------------------------------------------------------------------------------------


@impl(ops.moe_route, backend="cuda-triton", name="triton")
def moe_route_triton(router_logits, top_k, scoring, renormalize):
    return route(router_logits, top_k, scoring, renormalize)


@impl(ops.moe_permute, backend="cuda-triton", name="triton")
def moe_permute_triton(topk_ids, num_experts, capacity):
    return permute(topk_ids, num_experts, capacity)


@impl(ops.moe_experts, backend="cuda-triton", name="triton")
def moe_experts_triton(x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales,
                       b_up, b_down, top_k, activation, alpha, limit):
    return experts(x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales,
                   b_up, b_down, top_k, activation, alpha, limit)


@impl(ops.moe_combine, backend="cuda-triton", name="triton")
def moe_combine_triton(y, sorted_assignments, expert_offsets, topk_weights):
    return combine(y, sorted_assignments, expert_offsets, topk_weights)


_wrap = torch.library.wrap_triton


@torch.library.triton_op("apt_hal_triton::moe_route", mutates_args=())
def moe_route_op(router_logits: torch.Tensor, top_k: int, scoring: str,
                 renormalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return route(router_logits, top_k, scoring, renormalize, launch=_wrap)


@torch.library.triton_op("apt_hal_triton::moe_permute", mutates_args=())
def moe_permute_op(topk_ids: torch.Tensor, num_experts: int, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return permute(topk_ids, num_experts, capacity, launch=_wrap)


@torch.library.triton_op("apt_hal_triton::moe_experts", mutates_args=())
def moe_experts_op(x: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor, w_up_scales: Optional[torch.Tensor],
                   w_down_scales: Optional[torch.Tensor], b_up: Optional[torch.Tensor],
                   b_down: Optional[torch.Tensor], top_k: int, activation: str, alpha: float,
                   limit: float) -> torch.Tensor:
    return experts(x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales,
                   b_up, b_down, top_k, activation, alpha, limit, launch=_wrap)


@torch.library.triton_op("apt_hal_triton::moe_combine", mutates_args=())
def moe_combine_op(y: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
    return combine(y, sorted_assignments, expert_offsets, topk_weights, launch=_wrap)
