"""xpu: Intel GPUs through torch's native XPU device (no intel-extension-for-pytorch needed); on
CPU tensors under TRITON_INTERPRET=1, with the Intel configuration (tests)."""

import os

import torch

from apt_hal.backends._probe import installed
from apt_hal.backends.cuda_triton import BACKEND as _CUDA_TRITON
from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    if not installed("triton"):
        return Probe(False, "triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The shared kernels with Intel tiles, run by Triton's interpreter on CPU tensors: for
        # correctness checks of the Intel configuration only, so "auto" never picks it.
        return Probe(True, "Triton interpreter on CPU tensors with the Intel configuration "
                           "(TRITON_INTERPRET=1; correct, slow; not an Intel GPU)", device_type="cpu", auto=False)
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu._is_compiled():
        return Probe(False, "this torch build has no XPU support")
    if not xpu.is_available():
        return Probe(False, "no Intel GPU is visible")
    return Probe(True, f"{xpu.device_count()} device(s): {xpu.get_device_name(0)}")


BACKEND = Backend(
    name="xpu",
    device_type="xpu",
    probe=probe,
    implementations="apt_hal.backends.xpu.impls",
    packages=("pytorch-triton-xpu", "vllm-xpu-kernels"),
    install_hint="pip install torch --index-url https://download.pytorch.org/whl/xpu on a machine with an Intel GPU",
    auto_rank=4,
    description="Intel GPUs: the shared Triton kernels with Intel tiles",
    claims=_CUDA_TRITON.claims,  # the same kernels
)
