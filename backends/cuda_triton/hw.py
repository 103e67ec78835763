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
