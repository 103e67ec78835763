"""rocm implementations: aiter's rotary kernel where amd-aiter loads (aiter_rotary.py), then the
shared Triton kernels of cuda-triton with AMD's configuration (arch.py) for the GPU's
architecture. Architectures without a configuration decline every call, so the reference serves
them with a warning."""

from typing import Optional

import torch

from apt_hal import registry
from apt_hal.backends._probe import import_binding
from apt_hal.backends.rocm import arch
from apt_hal.backends.triton_vendor import TritonVendor, register_shared_kernels

# Registered first: tried before the Triton kernel for the calls it supports.
AITER, AITER_UNAVAILABLE = import_binding("apt_hal.backends.rocm.aiter_rotary", "amd-aiter")
if AITER is None:
    registry.log.info("apt_hal rocm: aiter rotary not bound: %s", AITER_UNAVAILABLE)
else:
    registry.register_impl("rotary", "rocm", AITER.rotary, name="aiter", supports=AITER.supports)
    registry.register_impl("rotary_", "rocm", AITER.rotary_, name="aiter", supports=AITER.supports)


def vendor_for(device: torch.device) -> Optional[TritonVendor]:
    return arch.ARCHES.get(arch.current_arch(device))


register_shared_kernels("rocm", vendor_for)
