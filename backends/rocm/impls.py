"""rocm implementations: aiter's rotary kernel where amd-aiter loads (aiter_rotary.py), then the
shared Triton kernels of cuda-triton with AMD's configuration (arch.py) for the GPU's
architecture. Architectures without a configuration decline every call, so the reference serves
them with a warning."""

from typing import Optional

import torch

from apt_hal.backends import _vendor_rotary
from apt_hal.backends.rocm import arch
from apt_hal.backends.triton_vendor import TritonVendor, register_shared_kernels

# Registered first: tried before the Triton kernel for the calls it supports.
AITER_UNAVAILABLE = _vendor_rotary.bind("rocm", "apt_hal.backends.rocm.aiter_rotary", "amd-aiter")


def vendor_for(device: torch.device) -> Optional[TritonVendor]:
    return arch.ARCHES.get(arch.current_arch(device))


register_shared_kernels("rocm", vendor_for)
