"""Every NVIDIA-specific assumption of the cuda-triton kernels lives here, so rocm and xpu can
reuse the kernels by changing this one place: warp size, shared-memory budget, Hopper-only
features, and the per-device tuning tables. The rocm and xpu backends change it through the
current vendor (backends/triton_vendor.py), which the functions below read. The one exception is
code: NVIDIA-only instructions (inline PTX) live in nvidia_ptx.py, reached only in the kernels'
branch where their ``INTERPRETER`` constexpr, :func:`pure_triton`, is False."""

from __future__ import annotations

import functools
import os

import torch

from apt_hal.backends import triton_vendor


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): correctness runs on small shapes."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_tiles() -> bool:
    """Small tiles for the interpreter's correctness runs, unless APT_HAL_HARDWARE_TILES=1 asks for
    the hardware tile tables (the compile matrix captures those to compile what GPUs would run)."""
    return interpreting() and os.environ.get("APT_HAL_HARDWARE_TILES") != "1"


def pure_triton() -> bool:
    """The kernels' INTERPRETER constexpr: True under the interpreter and on every GPU but NVIDIA's,
    whose other path has the inline PTX of nvidia_ptx.py (see triton_vendor.pure_triton). The name
    predates AMD and Intel builds; read it as "pure Triton": the portable path."""
    return interpreting() or triton_vendor.pure_triton(triton_vendor.current().family)


def half_dot_precision() -> str:
    """input_precision of dots with 16-bit operands (exact in any mode): the current vendor's."""
    return triton_vendor.current().half_dot_precision


def launch_options() -> dict:
    """Vendor launch options of the current vendor (AMD: waves_per_eu, matrix_instr_nonkdim)."""
    return dict(triton_vendor.current().launch_options)


@functools.lru_cache(maxsize=None)
def device_properties(index: int = 0) -> dict:
    """SM count, shared memory per block and compute capability of a CUDA device; conservative
    H100-like defaults under the interpreter (the numbers only pick tile shapes there)."""
    if interpreting() or not torch.cuda.is_available():
        return {"sm_count": 132, "smem_per_block": 227 * 1024, "capability": (9, 0), "name": "interpreter"}
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 48 * 1024)
    return {"sm_count": p.multi_processor_count, "smem_per_block": smem,
            "capability": (p.major, p.minor), "name": p.name}


# ---- memory-bound kernels (rotary, paged copies) ---------------------------------------------

# Bytes one program moves per tile: 16 KiB keeps about four 16-byte accesses per thread in flight
# at 8 warps, enough to cover HBM latency on Hopper without spilling registers.
STREAM_TILE_BYTES = 16 * 1024

# Programs per SM a memory-bound grid should reach before its tiles shrink to make more: small
# inputs (a decode step, a few tokens written) would otherwise leave most SMs idle.
MIN_PROGRAMS_PER_SM = 4


def stream_tile(unit_bytes: int, tile_bytes: int = STREAM_TILE_BYTES) -> int:
    """How many units of ``unit_bytes`` (words, heads) fill one memory-bound tile, rounded down to
    a power of two as Triton block shapes must be; at least 1."""
    units = max(1, tile_bytes // unit_bytes)
    return 1 << (units.bit_length() - 1)


def stream_num_warps(tile_bytes: int) -> int:
    """Warps for a memory-bound tile of ``tile_bytes``: about four 16-byte accesses per thread."""
    warps = max(1, tile_bytes // (triton_vendor.current().warp_size * 16 * 4))
    return min(8, 1 << (warps.bit_length() - 1))


def stream_min_programs(index: int = 0) -> int:
    """Programs a memory-bound grid should have before tiles shrink: several per SM. 1 under the
    interpreter, which runs programs one after another (there the fewest, largest tiles are fastest)."""
    if interpreter_tiles():
        return 1
    return device_properties(index)["sm_count"] * MIN_PROGRAMS_PER_SM


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current device: Triton launches on the current device,
    so a tensor on another GPU would otherwise be read by the wrong one."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)  # a negative index is a no-op


# ---- MoE grouped GEMMs (moe.py) ----------------------------------------------------------------

# Tiles of the two expert GEMMs by average rows per used expert: (most rows, up tiles, down
# tiles), the first entry whose bound is not exceeded. KIND names the kernel (moe.py, section 3).
# BLOCK_N counts output columns (a gated up projection loads a gate and an up weight row per
# column). Decode streams weights: the 16-row tile tl.dot needs at least, long K tiles, 4 stages
# in flight. Prefill is MMA-bound: 128-row tiles on 8 warps use wgmma; 3 stages of 128x64
# activations + 128x64 weights take 96 KiB of shared memory, and two 128x64 float32
# accumulators fit 8 warps' registers without spills (checked with ptxas for sm_90).
MOE_GEMM_TILES = (
    (16, dict(KIND="mma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
     dict(KIND="mma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
    (64, dict(KIND="mma", BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
     dict(KIND="mma", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),
    (float("inf"), dict(KIND="mma", BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
     dict(KIND="mma", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
)

# Prefill (more rows per expert than the table's second bound) with weights in x's dtype on
# Hopper: TMA tiles. Each program computes a 128 x 256 output tile (up: 128 gate and 128 up
# columns) in two warpgroups, 64 x 256 float32 accumulators each (128 registers a thread);
# 4 stages of 128x64 + 256x64 bf16 operands take 192 KiB of shared memory (ptxas for sm_90a:
# up 178 registers, no spills).
MOE_TMA_TILES = (dict(KIND="tma", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
                 dict(KIND="tma", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4))

# MXFP4 decode with at most this many rows per used expert takes the CUDA-core kernel ("gemv"):
# its multiply-adds grow with the rows (one per row and weight), the tensor-core tile's padding
# does not. BLOCK_M (1, 2 or 4) is the rows per expert rounded up to a power of two.
MOE_GEMV_MAX_ROWS = 4
MOE_GEMV_TILES = (dict(KIND="gemv", BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=1),
                  dict(KIND="gemv", BLOCK_N=32, BLOCK_K=512, num_warps=4, num_stages=1))

# MXFP4 weights with more rows per expert than the gemv kernel takes, up to the 16 of one
# tensor-core tile: longer K tiles than for bf16 weights (the decode needs more independent work
# per load). Best of the 2026-11-22 H100 sweep for both projections at T=1 and T=64 (Mixtral).
MOE_MXFP4_MMA_TILES = (dict(KIND="mma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4),
                       dict(KIND="mma", BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=4))

# float32 activations take IEEE float32 dots on CUDA cores (no tensor cores): small tiles, or the
# operands and accumulators spill.
MOE_FP32_TILES = dict(KIND="mma", BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)

# Narrowest n tile the decode grids shrink to when few experts leave SMs idle (narrower tiles
# cost more instructions per weight element than they win back in parallelism). The gemv kernel
# reads whole rows per thread, so it can go narrower.
MOE_MIN_BLOCK_N = 32
MOE_GEMV_MIN_BLOCK_N = 8


def moe_gemm_tiles(rows_per_expert: float, dtype: torch.dtype, quant: bool = False, tma: bool = False) -> tuple:
    """Fresh copies of the (up, down) tiles for ``rows_per_expert`` rows per used expert, MXFP4
    weights or not; ``tma``: the prefill TMA kernel may be used (see MOE_TMA_TILES)."""
    if dtype == torch.float32:
        return dict(MOE_FP32_TILES), dict(MOE_FP32_TILES)
    if quant and rows_per_expert <= MOE_GEMV_MAX_ROWS:
        block_m = 1 if rows_per_expert <= 1 else 2 if rows_per_expert <= 2 else 4
        return tuple(dict(t, BLOCK_M=block_m) for t in MOE_GEMV_TILES)
    if quant and rows_per_expert <= MOE_GEMM_TILES[0][0]:
        return tuple(dict(t) for t in MOE_MXFP4_MMA_TILES)
    if tma and rows_per_expert > MOE_GEMM_TILES[1][0]:
        return tuple(dict(t) for t in MOE_TMA_TILES)
    table = triton_vendor.current().moe_gemm_tiles or MOE_GEMM_TILES
    up, down = next((up, down) for bound, up, down in table if rows_per_expert <= bound)
    return dict(up), dict(down)


def has_tma(index: int = 0) -> bool:
    """Hopper and later: the Tensor Memory Accelerator behind Triton's tensor descriptors."""
    return triton_vendor.current().tma and device_properties(index)["capability"][0] >= 9


# ---- fp4_matmul (fp4_matmul.py) ---------------------------------------------------------------
# Programs per SM that split-K fills with one wave on decode shapes: what the decode tile's
# registers allow (below). More waves of shorter programs measured slower (2026-11-22 sweep).
FP4_MATMUL_PROGRAMS_PER_SM = 2
FP4_MATMUL_MAX_SPLIT_K = 16

# bf16 x with at least this many rows: dequantize the weights to bf16 once (a copy-bound pass
# writing 2 bytes per weight), then cuBLAS. At large M the GEMM is matrix-bound and cuBLAS runs
# near the tensor cores' rate, which a Triton kernel that also dequantizes (serialized with
# wgmma in each program) does not; the pass is a few % of the GEMM from here on.
FP4_MATMUL_MATERIALIZE_MIN_M = 512
FP4_MATMUL_MATERIALIZE_TILE = dict(block_m=1, block_n=32, block_k=256, num_warps=4, num_stages=1, swap_ab=False,
                                   materialize=True)


def _env_choice(name: str, default: str, allowed: tuple) -> str:
    value = os.environ.get(name, default)
    if value not in allowed:
        raise ValueError(f"environment variable {name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


# Decode schedule switches (see fp4_matmul.py's module docstring), chosen by the GPU sweep
# (``python -m benchmarks.ops.fp4_matmul --no-table --sweep decode``, H100, docs/benchmarks.md);
# the environment variables set them at import, tests and sweeps set these attributes.
# * FUSED_REDUCE: split-K partial sums added by the last program of each tile (one launch)
#   instead of a second kernel; same bits. Up to FUSED_REDUCE_MAX_M rows: 1-5% faster at M = 16
#   in the sweep, but at M = 128 (K = N = 8192) 71 us against 50 us for the two kernels, the last
#   program of each tile reading 128 rows of partials alone.
# * GEMV_MAX_M: up to this many rows (0 to 4), the CUDA-core GEMV schedule (FP4_MATMUL_GEMV_TILE,
#   split-K filling FP4_MATMUL_GEMV_PROGRAMS_PER_SM programs per SM), which needs no tensor-core
#   tile padded to 16 rows. 1: at M = 1 the 64 x 256 GEMV tile took 17.4-20.8 us (2.23-2.59x
#   bf16 cuBLAS) on the three decode shapes, where the best tensor-core tile of the same run took
#   18.7-25.1 us (2.03-2.41x); M = 2..4 were not measured.
#   64 x 256 tiles: 145 registers at M = 1 (ptxas, sm_90a), 3 programs of 4 warps per SM.
FP4_MATMUL_FUSED_REDUCE = _env_choice("APT_HAL_FP4_MATMUL_FUSED_REDUCE", "1", ("0", "1")) == "1"
FP4_MATMUL_FUSED_REDUCE_MAX_M = 16
FP4_MATMUL_GEMV_MAX_M = int(_env_choice("APT_HAL_FP4_MATMUL_GEMV_MAX_M", "1", ("0", "1", "2", "3", "4")))
FP4_MATMUL_GEMV_TILE = dict(block_n=64, block_k=256, num_warps=4, num_stages=1, swap_ab=False, cuda_core=True)
FP4_MATMUL_GEMV_PROGRAMS_PER_SM = 4


def fp4_matmul_tiles(m: int, x_parts: int = 1) -> dict:
    """Tile schedule of the fp4_matmul kernel (fields of its TileConfig) by the number of rows M
    and the number of bf16 parts of x (1 bf16, 2 fp16, 3 fp32).

    * M <= FP4_MATMUL_GEMV_MAX_M (1 by default): the CUDA-core GEMV.
    * M <= 16 (decode): weight tile on the left of the tensor-core product (64 rows per
      warpgroup), M padded to 16 (8 would make Triton use mma.sync and stage the dequantized
      weights in shared memory); 128 x 128 weight tiles: 121 registers, 40 KB shared memory,
      2 programs of 8 warps per SM (256-wide K steps need 171 registers: one program per SM).
    * M <= 64: still swapped, x tile as wide as M.
    * larger M: x tile on the left, 128 x 128 output tiles; from FP4_MATMUL_MATERIALIZE_MIN_M
      rows (bf16 x), dequantize + cuBLAS. Triton waits for each K step's tensor-core product
      before dequantizing the next weight tile, so dequantization overlaps the tensor cores only
      across programs. Up to 256 rows and for fp16/fp32 x (split into 2-3 parts in registers),
      8 warps; beyond, 4-warp programs that fit two per SM.
    Every x tile is read by all N / block_n weight tiles: for M ~ 128, x traffic (from L2)
    approaches the weight bytes. Under the interpreter: small tiles, same schedules.
    (Register and shared-memory figures: ptxas for sm_90a, bf16 x.)
    """
    if x_parts == 1 and m >= FP4_MATMUL_MATERIALIZE_MIN_M:
        return dict(FP4_MATMUL_MATERIALIZE_TILE)
    if m <= FP4_MATMUL_GEMV_MAX_M:
        block_m = 1 if m <= 1 else 2 if m <= 2 else 4
        if interpreter_tiles():
            return dict(FP4_MATMUL_GEMV_TILE, block_m=block_m, block_n=16, block_k=64)
        return dict(FP4_MATMUL_GEMV_TILE, block_m=block_m)
    if interpreter_tiles():
        if m <= 16:
            return dict(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=1, swap_ab=True)
        return dict(block_m=32, block_n=32, block_k=64, num_warps=4, num_stages=1, swap_ab=False)
    vendor_table = triton_vendor.current().fp4_matmul_tiles
    if vendor_table:
        return dict(next(tile for bound, tile in vendor_table if m <= bound))
    if m <= 16:
        return dict(block_m=16, block_n=128, block_k=128, num_warps=8, num_stages=4, swap_ab=True)
    if m <= 64:
        return dict(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3, swap_ab=True)
    if m <= 256 or x_parts > 1:
        return dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, swap_ab=False)
    return dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3, swap_ab=False)


# ---- GPU reads of pinned host memory (paged.py: scattered host -> GPU block copies) -------------

# Under unified virtual addressing (every 64-bit CUDA platform) a kernel reads pinned host memory
# at its host address, and Triton takes a pinned CPU tensor as a pointer argument (its launcher
# asks the driver for the device address). Scattered host blocks then need no CPU gather.
PINNED_HOST_READABLE = True

# Those reads cross PCIe, so a few programs fill the link provided enough bytes are in flight
# (bandwidth x latency: 55 GB/s x ~4 us under load is ~220 KB); few programs also leave most SMs
# to the compute the copy overlaps. A capped grid loops over the blocks: 16 programs of 32 KiB
# tiles (8 warps, 8 x 16 bytes per thread) keep 512 KiB in flight.
HOST_READ_PROGRAMS = 16
HOST_READ_TILE_BYTES = 32 * 1024
