"""xpu implementations: vllm-xpu-kernels' rotary kernel where it loads (vllm_xpu_rotary.py), then
the shared Triton kernels of cuda-triton with Intel's configuration (arch.py), through the Triton
backend that torch's XPU build ships."""

from apt_hal.backends import _vendor_rotary
from apt_hal.backends.triton_vendor import register_shared_kernels
from apt_hal.backends.xpu import arch

# Registered first: tried before the Triton kernel for the calls it supports.
VLLM_XPU_UNAVAILABLE = _vendor_rotary.bind("xpu", "apt_hal.backends.xpu.vllm_xpu_rotary", "vllm-xpu-kernels")
register_shared_kernels("xpu", lambda device: arch.XE)
