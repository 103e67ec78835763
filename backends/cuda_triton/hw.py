"""Every NVIDIA-specific assumption of the cuda-triton kernels lives here, so rocm and xpu can
reuse the kernels by changing this one place: warp size, shared-memory budget, Hopper-only
features, and the per-device tuning tables."""

from __future__ import annotations

import functools
import os

import torch

WARP_SIZE = 32  # NVIDIA; AMD CDNA wavefronts are 64


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): correctness runs on small shapes."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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


def is_hopper(index: int = 0) -> bool:
    return device_properties(index)["capability"][0] == 9


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
    warps = max(1, tile_bytes // (WARP_SIZE * 16 * 4))
    return min(8, 1 << (warps.bit_length() - 1))


def stream_min_programs(index: int = 0) -> int:
    """Programs a memory-bound grid should have before tiles shrink: several per SM. 1 under the
    interpreter, which runs programs one after another (there the fewest, largest tiles are fastest)."""
    if interpreting():
        return 1
    return device_properties(index)["sm_count"] * MIN_PROGRAMS_PER_SM


def device_guard(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current device: Triton launches on the current device,
    so a tensor on another GPU would otherwise be read by the wrong one."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)  # a negative index is a no-op


# ---- MoE grouped GEMMs (moe.py) ----------------------------------------------------------------

# Tiles of the two expert GEMMs by average rows per used expert: (most rows, up tiles, down
# tiles), the first entry whose bound is not exceeded. BLOCK_N counts output columns (a gated
# up projection loads a gate and an up weight row per column). Decode streams weights: the
# 16-row tile tl.dot needs at least, long K tiles, 4 stages in flight. Prefill is MMA-bound:
# 128-row tiles on 8 warps use wgmma; 3 stages of 128x64 activations + 128x64 weights take 96 KiB
# of shared memory, and two 128x64 float32 accumulators fit 8 warps' registers without spills
# (checked with ptxas for sm_90).
MOE_GEMM_TILES = (
    (16, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
     dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)),
    (float("inf"), dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)),
)

# float32 activations take IEEE float32 dots on CUDA cores (no tensor cores): small tiles, or the
# operands and accumulators spill.
MOE_FP32_TILES = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)

# Narrowest n tile the decode grids shrink to when few experts leave SMs idle (narrower tiles
# cost more instructions per weight element than they win back in parallelism).
MOE_MIN_BLOCK_N = 32


def moe_gemm_tiles(rows_per_expert: float, dtype: torch.dtype) -> tuple:
    """Fresh copies of the (up, down) tiles for ``rows_per_expert`` rows per used expert."""
    if dtype == torch.float32:
        return dict(MOE_FP32_TILES), dict(MOE_FP32_TILES)
    up, down = next((up, down) for bound, up, down in MOE_GEMM_TILES if rows_per_expert <= bound)
    return dict(up), dict(down)


# ---- fp4_matmul (fp4_matmul.py) ---------------------------------------------------------------
# Programs per SM that split-K aims for on decode shapes: enough resident warps to keep weight
# loads in flight while others dequantize.
FP4_MATMUL_CTAS_PER_SM = 4
FP4_MATMUL_MAX_SPLIT_K = 16


def fp4_matmul_tiles(m: int, x_parts: int = 1) -> dict:
    """Tile schedule of the fp4_matmul kernel (fields of its TileConfig) by the number of rows M
    and the number of bf16 parts of x (1 bf16, 2 fp16, 3 fp32).

    * M <= 16 (decode): weight tile on the left of the tensor-core product (64 rows per
      warpgroup), M padded to 16; 127 registers: 2 programs of 8 warps per SM.
    * M <= 64: still swapped, x tile as wide as M.
    * larger M: x tile on the left, 128 x 128 output tiles. Triton waits for each K step's
      tensor-core product before dequantizing the next weight tile, so dequantization overlaps
      the tensor cores only across programs: from M > 256 (no split-K), 4-warp programs that fit
      two per SM (219 registers, 72 KB shared memory). Up to 256 rows, 8 warps: split-K's float32
      partial-sum epilogue spills registers with 4. fp16/fp32 x (split into 2-3 parts in
      registers) also take 8 warps (no spills).
    Every x tile is read by all N / block_n weight tiles: for M ~ 128, x traffic (from L2)
    approaches the weight bytes. Under the interpreter: small tiles, same schedules.
    (Register and shared-memory figures: ptxas for sm_90a, bf16 x.)
    """
    if interpreting():
        if m <= 16:
            return dict(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=1, swap_ab=True)
        return dict(block_m=32, block_n=32, block_k=64, num_warps=4, num_stages=1, swap_ab=False)
    if m <= 16:
        return dict(block_m=16, block_n=128, block_k=256, num_warps=8, num_stages=3, swap_ab=True)
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
