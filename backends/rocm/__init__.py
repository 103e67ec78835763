"""rocm: AMD GPUs through torch's ROCm build (torch's "cuda" device type, HIP underneath); on CPU
tensors under TRITON_INTERPRET=1, with the AMD configuration of APT_HAL_ROCM_ARCH (tests)."""

import os

import torch

from apt_hal.backends._probe import installed
from apt_hal.backends.cuda_triton import BACKEND as _CUDA_TRITON
from apt_hal.backends.rocm.arch import interpreter_arch
from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    if not installed("triton"):
        return Probe(False, "triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The shared kernels with AMD tiles, run by Triton's interpreter on CPU tensors: for
        # correctness checks of the AMD configuration only, so "auto" never picks it.
        return Probe(True, f"Triton interpreter on CPU tensors with the AMD {interpreter_arch()} configuration "
                           "(TRITON_INTERPRET=1; correct, slow; not an AMD GPU)", device_type="cpu", auto=False)
    if torch.version.hip is None:
        return Probe(False, "this torch build has no ROCm support")
    if not torch.cuda.is_available():
        return Probe(False, "no AMD GPU is visible")
    arch = torch.cuda.get_device_properties(0).gcnArchName.split(":")[0]
    return Probe(True, f"ROCm {torch.version.hip}, {torch.cuda.device_count()} device(s): "
                       f"{torch.cuda.get_device_name(0)} ({arch})")


BACKEND = Backend(
    name="rocm",
    device_type="cuda",
    probe=probe,
    implementations="apt_hal.backends.rocm.impls",
    packages=("triton", "amd-aiter"),
    install_hint="pip install torch --index-url https://download.pytorch.org/whl/rocm6.4 on a machine with an AMD GPU",
    auto_rank=1,
    description="AMD GPUs (ROCm): the shared Triton kernels with AMD tiles",
    claims=_CUDA_TRITON.claims,  # the same kernels
)
