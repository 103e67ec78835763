"""cuda-triton fp4_matmul: MXFP4 weights times bf16 / fp16 / fp32 activations, one Triton kernel.

What the kernel does, per output tile, for each K step:

* loads the packed weight bytes (evict-first: each weight byte is read once per call) and their
  E8M0 scales, and dequantizes them **in registers** to bf16 -- exactly: every MXFP4 value is a
  bf16 value (:func:`_dequantize`). No dequantized weight is ever written to device memory;
* splits ``x`` into 1 (bf16), 2 (fp16) or 3 (fp32) bf16 parts whose sum is exactly ``x``
  (:func:`_x_part`; fp32 rows of values below 2^-100 are first lifted by 2^50), so that one bf16
  tensor-core product per part gives the exact products of ``x`` and the weights, accumulated in
  fp32 as the contract asks;
* accumulates with ``tl.dot`` in fp32; the epilogue adds the bias and rounds once to ``x``'s dtype.

Two schedules of that kernel, chosen per call by the tile table in ``hw.py``:

* **decode** (M <= 16; weights are the only bytes that matter): "swap AB", the weight tile is the
  left operand (``out^T = W x^T``) so the tensor core's 64-row side is spent on N, not on the tiny
  M; K is split across programs (``split_k``) so that every SM streams weights, and the partial
  sums are added in a fixed order by a second small kernel (deterministic). Inside a tile K is
  visited in a permuted order (:func:`_mma_k_order`; a dot product does not depend on the order
  of its terms), chosen so that each thread's share of the weight operand is a run of contiguous
  bytes: wide loads instead of byte loads.
* **prefill** (large M): ``out = x W^T`` with the dequantized ``W^T`` tile staged in shared
  memory for the tensor cores, grouped tile order for L2 reuse.

Under ``TRITON_INTERPRET=1`` (tests on CPU) the same kernel runs with small tiles, its tensor-core
operands held as float32 (the interpreter mishandles bf16; the values are the same). The op is also
exposed as ``torch.ops.apt_hal_triton.fp4_matmul`` (a ``torch.library.triton_op``), which lets
``torch.compile`` trace into the kernels; the registered apt_hal implementation calls the plain
launcher instead (no dispatcher hop in eager).

No ``prepare_weights`` repacking is offered. Its usual purpose, wide weight loads straight into
the tensor-core operand layout, is met on the plain layout (the K permutation above for decode;
the shared-memory stage for prefill). What a repacked bit layout could still save is ALU work:
dequantization here costs 7 instructions per weight byte (5 integer, 2 bf16x2 multiplies), and a
layout whose nibbles are pre-spread to their bf16 bit positions needs about 4. That matters only
where decode is ALU-bound rather than memory-bound (the benchmark's % of copy bandwidth says).
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
from apt_hal.registry import impl

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


# ---------------------------------------------------------------------------------------------
# Triton device functions
# ---------------------------------------------------------------------------------------------


# Triton 3.6's interpreter mishandles bf16: tl.dot multiplies the raw bits of bf16 operands, and
# widening a bf16 subnormal to float32 gives 0. Under it (INTERPRETER=True) the kernel forms the
# same exact values through float32 and multiplies float32 operands ("ieee"); on the GPU the
# operands are bf16. The values are identical either way: every operand is exact in bf16.


@triton.jit
def _e8m0_scale(codes, INTERPRETER: tl.constexpr):
    """E8M0 scale codes (uint8) -> 2^(code-127) exactly, 0xFF -> NaN, as bf16 (float32 under the
    interpreter). bf16 has float32's exponent range, so every E8M0 value is a bf16 value: code c
    is the bf16 with exponent field c, except code 0 (2^-127, a subnormal) and 0xFF."""
    if INTERPRETER:
        c = codes.to(tl.uint32)
        bits = tl.where(c == 0, 0x00400000, c << 23)
        return tl.where(c == 255, 0x7FC00000, bits).to(tl.float32, bitcast=True)
    else:
        c = codes.to(tl.uint16)
        bits = tl.where(c == 0, 0x0040, c << 7)
        return tl.where(c == 255, 0x7FC0, bits).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequantize(packed, scale, INTERPRETER: tl.constexpr):
    """Packed E2M1 bytes (any int type, values 0..255) [..., C] and scales (from
    :func:`_e8m0_scale`) broadcastable to [..., C, 2] -> the weights [..., C, 2] in K order
    (element 2i from the low nibble of byte i) as tensor-core operands (bf16).

    Each byte becomes one 32-bit word holding its two elements as a bf16 pair: the E2M1 sign bit
    goes to the bf16 sign and the 3 exponent/mantissa bits go right under bf16's exponent field,
    which encodes value * 2^-126 for every code (code 1, 0.5, lands on a bf16 subnormal, so the
    encoding is uniform). One multiplication by 2^126 and one by the scale, both exact, finish.
    ``b * 0x40040`` places the low nibble's magnitude at bits 6..8 and the high nibble's at bits
    22..24 (copies of b at offsets 6 and 18); ``b * 0x1001000`` places the two sign bits at bits
    15 and 31. The compiler keeps each pair in one register.

    Both multiplications are bf16 multiplications (``mul.bf16x2``: two elements per instruction),
    so dequantization costs 5 integer and 2 floating-point instructions per byte.
    """
    b = packed.to(tl.uint32)
    pair = ((b * 0x40040) & 0x01C001C0) | ((b * 0x1001000) & 0x80008000)
    if INTERPRETER:
        lo = (pair << 16).to(tl.float32, bitcast=True)
        hi = (pair & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        lo = (pair & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        hi = (pair >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.join(lo, hi) * 8.507059173023462e37 * scale  # 2^126 * scale


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
def _mma_k_order(t, BK: tl.constexpr, K_AXIS: tl.constexpr):
    """Permute the K axis (axis K_AXIS of a 2-D tile of K extent BK) into the order the tensor
    core's 16-bit operand layout gives each thread: thread t of a quad holds K offsets
    {2t, 2t+1, 2t+8, 2t+9} of every 16-wide step. Natural offset t*BK/4 + 4c + 2h + e goes to
    position 16c + 8h + 2t + e, so each thread's elements come from BK/4 contiguous K offsets."""
    C: tl.constexpr = BK // 16
    if K_AXIS == 1:
        R: tl.constexpr = t.shape[0]
        return t.reshape(R, 4, C, 2, 2).permute(0, 2, 3, 1, 4).reshape(R, BK)
    else:
        R: tl.constexpr = t.shape[1]
        return t.reshape(4, C, 2, 2, R).permute(1, 2, 0, 3, 4).reshape(BK, R)


@triton.jit
def _accumulate(acc, w, xp, SWAP_AB: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + xp @ w^T (acc [BLOCK_M, BLOCK_N]) or, swapped, acc + w @ xp^T (acc [BLOCK_N, BLOCK_M])
    with K visited in the order of :func:`_mma_k_order` (w is already in that order)."""
    if SWAP_AB:
        a = w
        b = _mma_k_order(xp.T, BLOCK_K, 0)
    else:
        a = xp
        b = w.T
    if INTERPRETER:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _accumulate_x(acc, w, xv, X_PARTS: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_K: tl.constexpr,
                  INTERPRETER: tl.constexpr):
    """acc + the product of the weight tile w and the x tile xv [BLOCK_M, BLOCK_K], x split into
    X_PARTS exact bf16 parts (:func:`_x_part`), one tensor-core product each."""
    if X_PARTS == 1:
        return _accumulate(acc, w, _operand(xv, INTERPRETER), SWAP_AB, BLOCK_K, INTERPRETER)
    rest = xv.to(tl.float32)
    if X_PARTS == 2:
        for _ in tl.static_range(2):
            xp, rest = _x_part(rest)
            acc = _accumulate(acc, w, _operand(xp, INTERPRETER), SWAP_AB, BLOCK_K, INTERPRETER)
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
        part = _accumulate(part, w, _operand(xp, INTERPRETER), SWAP_AB, BLOCK_K, INTERPRETER)
    if SWAP_AB:
        return acc + part / lift[None, :]
    else:
        return acc + part / lift[:, None]


@triton.jit
def _fp4_matmul_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    X_PARTS: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETER: tl.constexpr,
):
    """out[M, N] = x[M, K] @ dequantize(w)[N, K]^T (+ bias). Program (.., s) covers K_STEPS blocks
    of BLOCK_K starting at block s * K_STEPS; with SPLIT_K > 1 it writes its fp32 partial sum to
    out_ptr + s * M * N (no bias). K_STEPS is a compile-time constant: one compiled variant per
    (K, split), and a loop bound that Triton's interpreter (which needs Python ints) can run."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if SWAP_AB:  # decode: few M tiles; consecutive programs walk N
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
    mask_n = offs_n < N
    rows_n = offs_n % N  # weight rows past N re-read row n % N (unmasked loads); never stored
    offs_kb = tl.arange(0, BLOCK_K // 2)  # weight bytes
    offs_ks = tl.arange(0, BLOCK_K // 32)  # scales
    offs_k = tl.arange(0, BLOCK_K)

    k0 = pid_k * (K_STEPS * BLOCK_K)
    # int64 row offsets: N * K/2 and M * stride_xm can pass 2^31.
    w_tile = w_ptr + rows_n[:, None].to(tl.int64) * stride_wn + (k0 // 2 + offs_kb)[None, :]
    s_tile = s_ptr + rows_n[:, None].to(tl.int64) * stride_sn + (k0 // 32 + offs_ks)[None, :]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :]

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, K_STEPS):
        if EVEN_K:
            packed = tl.load(w_tile, eviction_policy="evict_first")
            codes = tl.load(s_tile)
            xv = tl.load(x_tile, mask=mask_m[:, None], other=0.0)
        else:
            k_left = K - (k0 + i * BLOCK_K)
            packed = tl.load(w_tile, mask=offs_kb[None, :] < k_left // 2, other=0, eviction_policy="evict_first")
            codes = tl.load(s_tile, mask=offs_ks[None, :] < k_left // 32, other=127)
            xv = tl.load(x_tile, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        scale = _e8m0_scale(codes, INTERPRETER)
        scale = tl.broadcast_to(scale[:, :, None], (BLOCK_N, BLOCK_K // 32, 16)).reshape(BLOCK_N, BLOCK_K // 2)
        w = _dequantize(packed, scale[:, :, None], INTERPRETER).reshape(BLOCK_N, BLOCK_K)
        if SWAP_AB:
            w = _mma_k_order(w, BLOCK_K, 1)
        acc = _accumulate_x(acc, w, xv, X_PARTS, SWAP_AB, BLOCK_K, INTERPRETER)
        w_tile += BLOCK_K // 2
        s_tile += BLOCK_K // 32
        x_tile += BLOCK_K

    if SWAP_AB:
        acc = acc.T
    out_tile = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if SPLIT_K > 1:
        out_tile += pid_k.to(tl.int64) * M * N
        tl.store(out_tile, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _split_k_sum_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                        HAS_BIAS: tl.constexpr):
    """out = sum over s of part[s] (+ bias), in a fixed order (deterministic), rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def choose_config(m: int, n: int, k: int, x_dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """The schedule for an (M, N, K) problem: the tile table of hw.py, plus split-K when the M x N
    tiles are too few to fill the GPU (hw.FP4_MATMUL_CTAS_PER_SM programs per SM). The fp32
    partial sums cost 8 * split * M * N bytes of traffic; split is kept to at most K / (16 M),
    which bounds that by the weight bytes (N * K * 17/32)."""
    cfg = TileConfig(**hw.fp4_matmul_tiles(m, _X_PARTS[x_dtype]))
    tiles_mn = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    want = hw.device_properties()["sm_count"] * hw.FP4_MATMUL_CTAS_PER_SM
    split = min(want // tiles_mn, k // (16 * m), triton.cdiv(k, cfg.block_k), hw.FP4_MATMUL_MAX_SPLIT_K)
    return dataclasses.replace(cfg, split_k=max(split, 1))


def launch(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
           config: Optional[TileConfig] = None, wrap: Callable = lambda kernel: kernel) -> torch.Tensor:
    """fp4_matmul on arguments the contract has checked. ``config`` overrides the schedule of
    :func:`choose_config` (benchmark sweeps, tests); its ``split_k`` is lowered to a divisor of
    the number of K blocks so that all splits cover equal K ranges. ``wrap`` is
    ``torch.library.wrap_triton`` inside the triton_op (torch.compile traces the launches)."""
    k = x.shape[-1]
    n = w_packed.shape[0]
    m = math.prod(x.shape[:-1])
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    if k == 0:  # an empty sum: the bias alone
        out.zero_()
        if bias is not None:
            out += bias
        return out.reshape(*x.shape[:-1], n)
    x2 = x.reshape(m, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()  # the kernel reads rows of x with unit stride
    cfg = config or choose_config(m, n, k, x.dtype)
    k_blocks = triton.cdiv(k, cfg.block_k)
    split = max(d for d in range(1, cfg.split_k + 1) if k_blocks % d == 0)  # equal K ranges
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    with hw.device_guard(x):
        wrap(_fp4_matmul_kernel)[grid](
            x2, mxfp4.as_uint8(w_packed), mxfp4.as_uint8(w_scales), bias, target,
            m, n, k, x2.stride(0), k // 2, k // mxfp4.BLOCK, n,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, K_STEPS=k_blocks // split,
            X_PARTS=_X_PARTS[x.dtype], SWAP_AB=cfg.swap_ab, SPLIT_K=split, GROUP_M=cfg.group_m,
            EVEN_K=k % cfg.block_k == 0, HAS_BIAS=bias is not None, INTERPRETER=hw.interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split > 1:
            block = 1024
            wrap(_split_k_sum_kernel)[(triton.cdiv(m * n, block),)](
                target, bias, out, m * n, n, SPLIT_K=split, BLOCK=block, HAS_BIAS=bias is not None, num_warps=4)
    return out.reshape(*x.shape[:-1], n)


@impl(ops.fp4_matmul, backend="cuda-triton", name="triton", traceable="apt_hal_triton::fp4_matmul")
def fp4_matmul_triton(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launch(x, w_packed, w_scales, bias)


@torch.library.triton_op("apt_hal_triton::fp4_matmul", mutates_args=())
def fp4_matmul_op(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same kernels as a torch.library op whose launches torch.compile can trace."""
    return launch(x, w_packed, w_scales, bias, wrap=torch.library.wrap_triton)
