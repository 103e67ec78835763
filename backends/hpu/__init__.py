"""hpu: Intel Gaudi through habana-frameworks (the SynapseAI PyTorch bridge).

Declaration and probe only: nothing here imports habana_frameworks. The bindings are in
``impls.py`` and its modules; docs/hpu.md maps every argument.
"""

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
    # What the bound kernels cover (docs/hpu.md); the other ops are not claimed.
    claims={
        **{op: {"dtypes": ["float32", "bfloat16", "float16"], "features": ["gptj", "partial", "gqa", "strided"]}
           for op in ("rotary", "rotary_")},
        "moe_experts": {"dtypes": ["bfloat16"], "features": ["capacity", "mxfp4_experts"]},
        **{op: {"dtypes": ["*"], "features": ["strided_pool"]} for op in ("paged_write", "paged_gather")},
        "paged_copy_blocks": {"dtypes": ["*"], "features": ["strided_pool", "cross_device"]},
    },
)
