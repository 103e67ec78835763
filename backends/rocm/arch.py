"""AMD Instinct configurations of the shared Triton kernels, per architecture, as data.

Hardware facts (AMD's CDNA3 / CDNA4 ISA guides and instinct docs): 64-lane wavefronts; LDS of
64 KiB per CU on gfx942 (MI300X/MI325X) and 160 KiB on gfx950 (MI350X/MI355X); bf16 MFMA shapes
16x16x16 and 32x32x8 on gfx942, 16x16x32 and 32x32x16 on gfx950 (which adds the scaled
f8f6f4 MFMA that MXFP4 ``tl.dot_scaled`` lowers to). Triton on AMD double-buffers through LDS
(``num_stages=2`` is its software pipeline's usual depth), picks the MFMA size from
``matrix_instr_nonkdim`` (16 here: the decode tiles have 16 rows) and takes ``waves_per_eu`` as
an occupancy hint.

The tiles are **untuned**: chosen to fit these limits (tests/test_rocm_xpu.py checks every tile
against them) and compiled for both architectures by the compile matrix; no AMD GPU has run them.
"""

from __future__ import annotations

import functools
import os

import torch

from apt_hal.backends.triton_vendor import TritonVendor

KIB = 1024

# Launch options for every matrix kernel: 16x16 MFMAs; 2 waves per SIMD leaves room for the
# dequantization's registers.
_MFMA_OPTIONS = {"matrix_instr_nonkdim": 16, "waves_per_eu": 2}


def _tile(block_m, block_n, block_k, warps, **extra):
    return dict(KIND="mma", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=2,
                **_MFMA_OPTIONS, **extra)


def _fp4(block_m, block_n, block_k, warps, swap_ab):
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=warps, num_stages=2, swap_ab=swap_ab)


# (most rows per expert, up tile, down tile), as hw.MOE_GEMM_TILES. 64 KiB of LDS: two stages of
# [BLOCK_M, BLOCK_K] activations and (up: gate and up) [BLOCK_N, BLOCK_K] bf16 weights.
_GFX942_MOE = (
    (16, _tile(16, 64, 64, 4), _tile(16, 64, 64, 4)),
    (64, _tile(64, 64, 64, 4), _tile(64, 64, 64, 4)),
    (float("inf"), _tile(128, 64, 32, 8), _tile(128, 128, 32, 8)),
)
# 160 KiB of LDS: longer K steps, and K a multiple of the 32 of gfx950's bf16 MFMA.
_GFX950_MOE = (
    (16, _tile(16, 64, 128, 4), _tile(16, 64, 128, 4)),
    (64, _tile(64, 64, 64, 4), _tile(64, 128, 64, 4)),
    (float("inf"), _tile(128, 64, 64, 8), _tile(128, 128, 64, 8)),
)
# (most rows M, fp4_matmul TileConfig fields): weights on the left while M is small.
_GFX942_FP4 = ((16, _fp4(16, 64, 128, 4, True)), (64, _fp4(64, 64, 64, 4, True)),
               (float("inf"), _fp4(128, 64, 64, 8, False)))
_GFX950_FP4 = ((16, _fp4(16, 64, 128, 4, True)), (64, _fp4(64, 128, 128, 4, True)),
               (float("inf"), _fp4(128, 128, 64, 8, False)))

ARCHES = {
    "gfx942": TritonVendor("amd", "hip", "gfx942", warp_size=64, shared_memory_bytes=64 * KIB,
                           fp4_matmul_tiles=_GFX942_FP4, moe_gemm_tiles=_GFX942_MOE, launch_options=_MFMA_OPTIONS,
                           half_dot_precision="ieee"),
    "gfx950": TritonVendor("amd", "hip", "gfx950", warp_size=64, shared_memory_bytes=160 * KIB,
                           fp4_matmul_tiles=_GFX950_FP4, moe_gemm_tiles=_GFX950_MOE, launch_options=_MFMA_OPTIONS,
                           half_dot_precision="ieee"),
}
# K of the bf16 MFMA each architecture's matrix_instr_nonkdim=16 tiles use: BLOCK_K must be a multiple.
MFMA_K = {"gfx942": 16, "gfx950": 32}
MAX_WARPS = 16  # 1024 work-items per workgroup, 64 per wavefront


def interpreter_arch() -> str:
    """The architecture whose configuration the interpreter runs (no GPU to ask): APT_HAL_ROCM_ARCH."""
    return os.environ.get("APT_HAL_ROCM_ARCH", "gfx942")


@functools.lru_cache(maxsize=None)
def gpu_arch(index: int = 0) -> str:
    """The GPU's architecture name: gcnArchName without its feature flags ("gfx942:sramecc+:xnack-")."""
    return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]


def current_arch(device: torch.device) -> str:
    if device.type == "cpu":  # Triton's interpreter
        return interpreter_arch()
    return gpu_arch(device.index or 0)
