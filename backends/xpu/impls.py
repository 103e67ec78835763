"""xpu implementations: vllm-xpu-kernels' rotary kernel where it loads (vllm_xpu_rotary.py), then
the shared Triton kernels of cuda-triton with Intel's configuration (arch.py), through the Triton
backend that torch's XPU build ships."""

from apt_hal import registry
from apt_hal.backends._probe import import_binding
from apt_hal.backends.triton_vendor import register_shared_kernels
from apt_hal.backends.xpu import arch

# Registered first: tried before the Triton kernel for the calls it supports.
VLLM_XPU, VLLM_XPU_UNAVAILABLE = import_binding("apt_hal.backends.xpu.vllm_xpu_rotary", "vllm-xpu-kernels")
if VLLM_XPU is None:
    registry.log.info("apt_hal xpu: vllm-xpu-kernels rotary not bound: %s", VLLM_XPU_UNAVAILABLE)
else:
    registry.register_impl("rotary", "xpu", VLLM_XPU.rotary, name="vllm_xpu", supports=VLLM_XPU.supports)
    registry.register_impl("rotary_", "xpu", VLLM_XPU.rotary_, name="vllm_xpu", supports=VLLM_XPU.supports)

register_shared_kernels("xpu", lambda device: arch.XE)
