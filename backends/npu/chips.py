"""Per-chip adaptors: every difference between Ascend chips that the npu bindings care about.

The bindings ask the adaptor, never the chip name (vllm-ascend's ``BaseDeviceAdaptor`` pattern).
Each fact below comes from torch-npu 2.13.0's ``_op_plugin_docs.py`` ("支持的型号" / product
sections of each op); none was confirmed on hardware.

Importing this module imports no vendor code: :func:`for_device_name` takes the name that
``torch_npu.npu.get_device_name()`` returns.
"""

from __future__ import annotations

from typing import Optional


class AscendAdaptor:
    """Atlas A2 (Ascend910B*): the baseline the other chips differ from."""

    family = "A2"
    # npu_apply_rotary_pos_emb (q and k in one call): rotary modes, and the head dims it accepts
    # (None: any even width up to the op's limit).
    fused_rotary_modes: tuple[str, ...] = ("half",)
    fused_rotary_dims: Optional[tuple[int, ...]] = (64, 128)
    # npu_rotary_mul: rotary modes, and "D < 896" from its constraints.
    rotary_mul_modes: tuple[str, ...] = ("half", "interleave")
    rotary_mul_max_dim = 894
    # The MoE routing kernels: npu_moe_gating_top_k_softmax, npu_moe_init_routing_v2,
    # npu_grouped_matmul and npu_moe_finalize_routing.
    moe_kernels = True
    router = "npu_moe_gating_top_k_softmax"
    # fp4_matmul with MXFP4 weights and unquantized x (npu_weight_quant_batchmatmul, weight_dtype
    # float4_e2m1fn_x2): torch-npu documents the float4 dtypes for the Ascend 950 only.
    mxfp4_weights = False
    mxfp4_reason = "MXFP4 weights need an Ascend 950 (A5)"
    # npu_scatter_pa_kv_cache / npu_gather_pa_kv_cache with cache_mode="Norm" (ND layout).
    paged_kernels = True

    def __init__(self, device_name: str = ""):
        self.device_name = device_name or self.family

    def fused_rotary(self, mode: str, rotary_dim: int) -> bool:
        """Whether npu_apply_rotary_pos_emb handles this mode and width."""
        return mode in self.fused_rotary_modes and (
            self.fused_rotary_dims is None or rotary_dim in self.fused_rotary_dims)

    def rotary_mul(self, mode: str, rotary_dim: int) -> bool:
        """Whether npu_rotary_mul handles this mode and width."""
        return mode in self.rotary_mul_modes and rotary_dim <= self.rotary_mul_max_dim

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device_name!r})"


class A3Adaptor(AscendAdaptor):
    """Atlas A3 (Ascend910_93*): the A2 op set."""

    family = "A3"


class A5Adaptor(AscendAdaptor):
    """Ascend 950 (Atlas 350): wider fused rotary, MXFP4, and npu_moe_gating_top_k as the router
    (the softmax-only router documents A2/A3 only)."""

    family = "A5"
    fused_rotary_modes = ("half", "interleave")
    fused_rotary_dims = None
    router = "npu_moe_gating_top_k"
    mxfp4_weights = True
    mxfp4_reason = ""

    def fused_rotary(self, mode: str, rotary_dim: int) -> bool:
        return mode in self.fused_rotary_modes and rotary_dim <= 1024


class Ascend310PAdaptor(AscendAdaptor):
    """Atlas inference series (Ascend310P*): npu_rotary_mul in "half" mode with head_dim 128 only,
    no MoE routing kernels, no MXFP4."""

    family = "310P"
    fused_rotary_modes = ()
    rotary_mul_modes = ("half",)
    moe_kernels = False

    def rotary_mul(self, mode: str, rotary_dim: int) -> bool:
        return mode in self.rotary_mul_modes and rotary_dim == 128


# Device-name prefixes, most specific first.
_BY_PREFIX = (("Ascend910_93", A3Adaptor), ("Ascend910B", AscendAdaptor), ("Ascend950", A5Adaptor),
              ("Ascend310P", Ascend310PAdaptor))


def for_device_name(name: str) -> AscendAdaptor:
    """The adaptor for a device name such as ``"Ascend910B3"``. Unknown names get the A2 baseline,
    whose ops are the most widely documented."""
    for prefix, cls in _BY_PREFIX:
        if name.startswith(prefix):
            return cls(name)
    return AscendAdaptor(name)
