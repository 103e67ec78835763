"""rocm: AMD GPUs through torch's ROCm build (torch's "cuda" device type, HIP underneath)."""

import torch

from apt_hal.backends._probe import installed
from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    if torch.version.hip is None:
        return Probe(False, "this torch build has no ROCm support")
    if not installed("triton"):
        return Probe(False, "triton is not installed")
    if not torch.cuda.is_available():
        return Probe(False, "no AMD GPU is visible")
    return Probe(True, f"ROCm {torch.version.hip}, {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}")


BACKEND = Backend(
    name="rocm",
    device_type="cuda",
    probe=probe,
    implementations="apt_hal.backends.rocm.impls",
    packages=("triton",),
    install_hint="pip install torch --index-url https://download.pytorch.org/whl/rocm6.4 on a machine with an AMD GPU",
    auto_rank=1,
    description="AMD GPUs (ROCm)",
)
