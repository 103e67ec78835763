"""npu: Huawei Ascend through torch_npu (which registers torch's PrivateUse1 device as "npu").

Declaration and probe only: nothing here imports torch_npu (installing torch-npu without CANN
breaks ``import torch``, and ``import apt_hal`` must stay cheap). The bindings are in
``impls.py`` and its modules, the per-chip differences in ``chips.py``; docs/npu.md maps every
argument.
"""

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
    # What the Atlas A2/A3 kernels cover (docs/npu.md). fp4_matmul is native on the Ascend 950 only
    # and MXFP4 experts nowhere, so neither is claimed.
    claims={
        **{op: {"dtypes": ["float32", "bfloat16", "float16"], "features": ["gptj", "partial", "gqa", "strided"]}
           for op in ("rotary", "rotary_")},
        "moe_route": {"dtypes": ["float32", "bfloat16", "float16"], "features": []},
        "moe_permute": {"dtypes": ["int32", "int64"], "features": ["capacity"]},
        "moe_experts": {"dtypes": ["float32", "bfloat16", "float16"],
                        "features": ["capacity", "gelu", "gpt_oss_swiglu", "bias"]},
        "moe_combine": {"dtypes": ["float32", "bfloat16", "float16"], "features": ["capacity"]},
        **{op: {"dtypes": ["*"], "features": ["strided_pool"]} for op in ("paged_write", "paged_gather")},
        "paged_copy_blocks": {"dtypes": ["*"], "features": ["strided_pool", "cross_device"]},
    },
)
