"""hpu: Intel Gaudi through habana-frameworks (the SynapseAI PyTorch bridge)."""

from apt_hal.backends._probe import device_files, installed
from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    if not installed("habana_frameworks"):
        return Probe(False, "habana-frameworks (Intel Gaudi software) is not installed")
    devs = device_files("/dev/accel/accel*") + device_files("/dev/hl[0-9]*")
    if not devs:
        return Probe(False, "no Gaudi device (/dev/accel/accel* and /dev/hl* absent)")
    return Probe(True, f"habana-frameworks installed, {len(devs)} device file(s)")


BACKEND = Backend(
    name="hpu",
    device_type="hpu",
    probe=probe,
    implementations="apt_hal.backends.hpu.impls",
    packages=("habana-torch-plugin",),
    install_hint="install the Intel Gaudi software stack (habana-frameworks) on a Gaudi host",
    auto_rank=2,
    description="Intel Gaudi",
)
