"""xpu: Intel GPUs through torch's native XPU device (intel-extension-for-pytorch optional)."""

import torch

from apt_hal.backends._probe import installed
from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu._is_compiled():
        return Probe(False, "this torch build has no XPU support")
    if not xpu.is_available():
        return Probe(False, "no Intel GPU is visible")
    ipex = "; intel-extension-for-pytorch installed" if installed("intel_extension_for_pytorch") else ""
    return Probe(True, f"{xpu.device_count()} device(s): {xpu.get_device_name(0)}{ipex}")


BACKEND = Backend(
    name="xpu",
    device_type="xpu",
    probe=probe,
    implementations="apt_hal.backends.xpu.impls",
    packages=("intel-extension-for-pytorch",),
    install_hint="pip install torch --index-url https://download.pytorch.org/whl/xpu on a machine with an Intel GPU",
    auto_rank=4,
    description="Intel GPUs",
)
