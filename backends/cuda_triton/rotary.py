"""Rotary embedding (``rotary`` and ``rotary_``) as one Triton kernel for q and k together.

One program rotates a block of heads of one token: it loads the token's position and its cos/sin
row once, then the two elements of every pair as ``[heads, R/2]`` tiles (NeoX: the two contiguous
halves of the rotated dimensions; GPT-J: one contiguous ``[heads, R]`` tile split into even and
odd elements in registers, so every access is a wide contiguous one), rotates them in float32
and rounds once on the store. The grid is ``tokens x (q head blocks + k head blocks)``, so q and
k share one launch. Out of place, the unrotated tail ``R..D`` is copied; in place it is left
untouched.

Head blocks are as large as one tile of ``hw.STREAM_TILE_BYTES`` allows and shrink only when the
grid would have too few programs to fill the GPU (a decode step of one token). B, S and H of q
and k, and both dimensions of ``positions``, may have any strides; offsets are computed in int64.
A position outside ``[0, len(cos_sin_cache))`` rotates by the identity (its cache row is never
read), whatever the check level.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from apt_hal import ops
from apt_hal.backends.cuda_triton import hw
from apt_hal.backends.cuda_triton.registration import direct, kernel_op


@triton.jit
def _rotate_heads(x, out, x_head_stride, out_head_stride, first_head, n_heads, cos, sin,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL: tl.constexpr, TAIL_PAD: tl.constexpr,
                  NEOX: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate heads ``first_head .. first_head + BLOCK_H`` (those below ``n_heads``) of one token.
    ``x``/``out`` point at the token's head 0; ``cos``/``sin`` are ``[1, HALF_PAD]`` float32."""
    heads = first_head + tl.arange(0, BLOCK_H)[:, None]
    head_ok = heads < n_heads
    src = x + heads.to(tl.int64) * x_head_stride
    dst = out + heads.to(tl.int64) * out_head_stride
    if NEOX:  # pairs (i, i + R/2): two contiguous halves
        i = tl.arange(0, HALF_PAD)[None, :]
        ok = head_ok & (i < HALF)
        a = tl.load(src + i, mask=ok).to(tl.float32)
        b = tl.load(src + HALF + i, mask=ok).to(tl.float32)
    else:  # pairs (2i, 2i + 1): one contiguous load of all R, split into even and odd in registers
        r = tl.arange(0, 2 * HALF_PAD)[None, :]
        r_ok = head_ok & (r < 2 * HALF)
        pairs = tl.load(src + r, mask=r_ok).to(tl.float32)
        a, b = tl.split(tl.reshape(pairs, [BLOCK_H, HALF_PAD, 2]))
    a_rot = a * cos - b * sin
    b_rot = b * cos + a * sin
    out_ty = out.dtype.element_ty
    if NEOX:
        tl.store(dst + i, a_rot.to(out_ty), mask=ok)
        tl.store(dst + HALF + i, b_rot.to(out_ty), mask=ok)
    else:
        tl.store(dst + r, tl.reshape(tl.join(a_rot, b_rot), [BLOCK_H, 2 * HALF_PAD]).to(out_ty), mask=r_ok)
    if TAIL > 0:  # out of place with R < D: the dimensions past R pass through
        t = tl.arange(0, TAIL_PAD)[None, :]
        t_ok = head_ok & (t < TAIL)
        tl.store(dst + 2 * HALF + t, tl.load(src + 2 * HALF + t, mask=t_ok), mask=t_ok)


@triton.jit
def _rotary_kernel(q, k, q_out, k_out, positions, cos_sin_cache, n_positions, seq_len, q_heads, k_heads,
                   q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, qo_sb, qo_ss, qo_sh, ko_sb, ko_ss, ko_sh, pos_sb, pos_ss,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL: tl.constexpr, TAIL_PAD: tl.constexpr,
                   NEOX: tl.constexpr, Q_BLOCK_H: tl.constexpr, K_BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    b = token // seq_len
    s = token % seq_len
    pos = tl.load(positions + b * pos_sb + s * pos_ss).to(tl.int64)
    i = tl.arange(0, HALF_PAD)[None, :]
    # A position outside the cache rotates by the identity (cos 1, sin 0): the row is never read.
    pos_i = pos + i * 0  # the position per lane: a mask of the load's shape
    ok = (i < HALF) & (pos_i >= 0) & (pos_i < n_positions)
    row = cos_sin_cache + pos * (2 * HALF)
    cos = tl.load(row + i, mask=ok, other=1.0)
    sin = tl.load(row + HALF + i, mask=ok, other=0.0)
    q_blocks = tl.cdiv(q_heads, Q_BLOCK_H)
    if block < q_blocks:
        _rotate_heads(q + b * q_sb + s * q_ss, q_out + b * qo_sb + s * qo_ss, q_sh, qo_sh, block * Q_BLOCK_H,
                      q_heads, cos, sin, HALF, HALF_PAD, TAIL, TAIL_PAD, NEOX, Q_BLOCK_H)
    else:
        _rotate_heads(k + b * k_sb + s * k_ss, k_out + b * ko_sb + s * ko_ss, k_sh, ko_sh,
                      (block - q_blocks) * K_BLOCK_H, k_heads, cos, sin, HALF, HALF_PAD, TAIL, TAIL_PAD, NEOX,
                      K_BLOCK_H)


def heads_per_program(n_tokens: int, q_heads: int, k_heads: int, head_bytes: int,
                      min_programs: int) -> Tuple[int, int]:
    """Heads of q and of k one program rotates: a full tile each, halved (the larger first) until
    the grid has ``min_programs`` programs or every program has one head."""
    most = hw.stream_tile(head_bytes)
    bq = min(triton.next_power_of_2(max(q_heads, 1)), most)
    bk = min(triton.next_power_of_2(max(k_heads, 1)), most)
    while n_tokens * (triton.cdiv(q_heads, bq) + triton.cdiv(k_heads, bk)) < min_programs and max(bq, bk) > 1:
        if bq >= bk:
            bq //= 2
        else:
            bk //= 2
    return bq, bk


def launch_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                  style: str, q_out: torch.Tensor, k_out: torch.Tensor, *, launch=direct,
                  heads: Optional[Tuple[int, int]] = None) -> None:
    """Rotate ``q``/``k`` into ``q_out``/``k_out`` (the same tensors: in place). ``launch`` is
    registration.direct or ``wrap_triton``; ``heads`` overrides :func:`heads_per_program`."""
    batch, seq, q_heads, dim = q.shape
    k_heads = k.shape[2]
    n_tokens = batch * seq
    if n_tokens == 0 or q_heads + k_heads == 0:
        return
    half = cos_sin_cache.shape[1] // 2
    tail = 0 if q_out is q else dim - 2 * half  # in place, the tail already holds its values
    if heads is None:
        heads = heads_per_program(n_tokens, q_heads, k_heads, dim * q.element_size(),
                                  hw.stream_min_programs(q.device.index or 0))
    bq, bk = heads
    grid = (n_tokens, triton.cdiv(q_heads, bq) + triton.cdiv(k_heads, bk))
    with hw.device_guard(q):
        launch(_rotary_kernel)[grid](
            q, k, q_out, k_out, positions, cos_sin_cache, cos_sin_cache.shape[0], seq, q_heads, k_heads,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], *positions.stride(),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), TAIL=tail, TAIL_PAD=triton.next_power_of_2(max(tail, 1)),
            NEOX=style == "neox", Q_BLOCK_H=bq, K_BLOCK_H=bk,
            num_warps=hw.stream_num_warps(max(bq, bk) * dim * q.element_size()))


# ---- registration: the apt_hal implementations and their traceable triton_ops (registration.py) ---


@kernel_op(ops.rotary)
def rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                  style: str = "neox", *, launch) -> Tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    launch_rotary(q, k, positions, cos_sin_cache, style, q_out, k_out, launch=launch)
    return q_out, k_out


@kernel_op(ops.rotary_)
def rotary_triton_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   style: str = "neox", *, launch) -> None:
    launch_rotary(q, k, positions, cos_sin_cache, style, q, k, launch=launch)
