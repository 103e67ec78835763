"""npu: Huawei Ascend through torch_npu (which registers torch's PrivateUse1 device as "npu")."""

from apt_hal.backends._probe import device_files, installed
from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    if not installed("torch_npu"):
        return Probe(False, "torch_npu is not installed")
    devs = device_files("/dev/davinci[0-9]*")
    if not devs:
        return Probe(False, "no Ascend device (/dev/davinci* absent)")
    return Probe(True, f"torch_npu installed, {len(devs)} Ascend device(s)")


BACKEND = Backend(
    name="npu",
    device_type="npu",
    probe=probe,
    implementations="apt_hal.backends.npu.impls",
    packages=("torch-npu",),
    install_hint="pip install torch-npu matching your torch version, with the CANN toolkit, on an Ascend host",
    auto_rank=3,
    description="Huawei Ascend",
)
