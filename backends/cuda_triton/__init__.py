"""cuda-triton: Triton kernels on NVIDIA GPUs; on CPU tensors under TRITON_INTERPRET=1 (tests)."""

import os

import torch

from apt_hal.backends._probe import installed
from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    if not installed("triton"):
        return Probe(False, "triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The same kernels, run by Triton's interpreter on CPU tensors: for correctness checks
        # only, so "auto" never picks it.
        return Probe(True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1; correct, slow)",
                     device_type="cpu", auto=False)
    if torch.version.cuda is None:
        why = "this torch build has no CUDA support"
        return Probe(False, why + (" (it is a ROCm build: use the 'rocm' backend)" if torch.version.hip else ""))
    if not torch.cuda.is_available():
        return Probe(False, "no CUDA device is visible")
    n = torch.cuda.device_count()
    return Probe(True, f"CUDA {torch.version.cuda}, {n} device(s): {torch.cuda.get_device_name(0)}")


BACKEND = Backend(
    name="cuda-triton",
    device_type="cuda",
    probe=probe,
    implementations="apt_hal.backends.cuda_triton.impls",
    packages=("triton",),
    install_hint="pip install 'apt-hal[triton]' with a CUDA build of torch on a machine with an NVIDIA GPU",
    auto_rank=0,
    description="Triton kernels for NVIDIA GPUs",
    # What the kernels are written to support: every dtype and feature of the conformance vocabulary.
    # A failing claim is a FAIL to fix, not a reason to shrink this.
    claims={
        **{op: {"dtypes": ["float32", "bfloat16", "float16"], "features": []}
           for op in ("mxfp4_quantize", "moe_route")},
        "fp4_matmul": {"dtypes": ["float32", "bfloat16", "float16"],
                       "features": ["bias", "batch_dims", "noncontiguous_x", "nan_scale", "torch_fp4_dtypes"]},
        "moe_permute": {"dtypes": ["int32", "int64"], "features": ["capacity"]},
        "moe_experts": {"dtypes": ["float32", "bfloat16", "float16"],
                        "features": ["mxfp4_experts", "capacity", "gelu", "gpt_oss_swiglu", "bias"]},
        "moe_combine": {"dtypes": ["float32", "bfloat16", "float16"], "features": ["capacity"]},
        **{op: {"dtypes": ["float32", "bfloat16", "float16"], "features": ["gptj", "partial", "gqa", "strided"]}
           for op in ("rotary", "rotary_")},
        **{op: {"dtypes": ["*"], "features": ["strided_pool"]} for op in ("paged_write", "paged_gather")},
        "paged_copy_blocks": {"dtypes": ["*"], "features": ["strided_pool", "cross_device"]},
    },
)
