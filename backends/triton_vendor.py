"""The vendor layer under the shared Triton kernels (backends/cuda_triton): which GPU family the
current call is for, and what that changes.

The kernels are one code base for NVIDIA, AMD and Intel. What differs is data: the wavefront
size, the shared-memory (LDS) budget, whether TMA and Hopper's wgmma exist, the tile tables and
vendor launch options (AMD's ``waves_per_eu`` and ``matrix_instr_nonkdim``), and whether inline
PTX may be used. ``hw.py`` reads the current :class:`TritonVendor`; the rocm and xpu backends set
theirs around each call with :func:`using`. cuda-triton sets nothing: :data:`NVIDIA` is the default.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class TritonVendor:
    name: str  # "nvidia", "amd", "intel"
    family: str  # Triton's target family: "cuda", "hip", "xpu"
    arch: str  # "sm_90", "gfx942", ...
    warp_size: int  # threads of a warp / wavefront / sub-group
    shared_memory_bytes: int  # shared memory (LDS, SLM) one program may use
    tma: bool = False  # Hopper's Tensor Memory Accelerator (tensor descriptors, the "tma" MoE kernel)
    # Tile tables replacing hw.py's NVIDIA ones on real hardware (None: keep hw.py's): fp4_matmul
    # as (most rows M, TileConfig fields) pairs, the first whose bound is not exceeded; the MoE
    # GEMMs as (most rows per expert, up tile, down tile) triples, as hw.MOE_GEMM_TILES.
    fp4_matmul_tiles: Optional[tuple] = None
    moe_gemm_tiles: Optional[tuple] = None
    launch_options: Mapping[str, int] = dataclasses.field(default_factory=dict)  # extra kernel launch options
    # input_precision of dots with 16-bit operands (exact in any mode, so only what the compiler
    # accepts matters: Triton rejects "tf32" for gfx950, whose allowed set is ieee/bf16x3/bf16x6).
    half_dot_precision: str = "tf32"


NVIDIA = TritonVendor("nvidia", "cuda", "sm_90", warp_size=32, shared_memory_bytes=227 * 1024, tma=True)

_current: contextvars.ContextVar[TritonVendor] = contextvars.ContextVar("apt_hal_triton_vendor", default=NVIDIA)


def current() -> TritonVendor:
    return _current.get()


@contextlib.contextmanager
def using(vendor: TritonVendor):
    """The shared kernels launch with ``vendor``'s configuration inside this block."""
    token = _current.set(vendor)
    try:
        yield vendor
    finally:
        _current.reset(token)


def pure_triton(family: str) -> bool:
    """Whether kernels for this Triton target family take their pure-Triton path (the kernels'
    ``INTERPRETER`` constexpr): everything but NVIDIA, since the other path has inline PTX
    (cuda_triton/nvidia_ptx.py) that only NVIDIA's compiler accepts."""
    return family != "cuda"


def _device_of(args: tuple, kwargs: dict):
    import torch

    return next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _with_vendor(fn: Callable, vendor_for: Callable) -> Callable:
    @functools.wraps(fn)  # keeps the contract's parameter names, which registration checks
    def run(*args, **kwargs):
        with using(vendor_for(_device_of(args, kwargs))):
            return fn(*args, **kwargs)
    return run


def _supports(entry, vendor_for: Callable) -> Callable:
    def supports(*args, **kwargs):
        vendor = vendor_for(_device_of(args, kwargs))
        if vendor is None:
            return False
        if entry.supports is None:
            return True
        with using(vendor):
            return entry.supports(*args, **kwargs)
    return supports


def register_shared_kernels(backend: str, vendor_for: Callable[[Any], Optional[TritonVendor]]) -> None:
    """Register every cuda-triton implementation for ``backend``, each call launched with the
    configuration ``vendor_for(device of its first tensor)``; a None configuration (an
    architecture without one) declines the call, so the reference serves it with a warning."""
    from apt_hal import registry
    from apt_hal.backends.cuda_triton import impls  # noqa: F401  (registers the shared kernels)

    for op in registry.contracts():
        for entry in registry.implementations(op, "cuda-triton"):
            registry.register_impl(op, backend, _with_vendor(entry.fn, vendor_for), name=entry.name.split(".", 1)[1],
                                   supports=_supports(entry, vendor_for))
