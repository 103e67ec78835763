"""hpu implementations: Gaudi's fused rotary and MoE kernels, and plain-torch paged storage.

Importing the bridge registers torch's "hpu" device. What is not bound, and why (docs/hpu.md):
moe_route / moe_permute / moe_combine (the fused MoE kernel covers them only as a whole layer;
they run the reference's torch ops on the device), and fp4_matmul (no MX-format matmul is
published for Gaudi 2/3: the reference runs, and ``explain()`` shows the reason).
"""

import habana_frameworks.torch.core  # noqa: F401  (registers the hpu device with torch)

from apt_hal import ops, registry
from apt_hal.backends.hpu import moe, paged, rotary

registry.register_impl(ops.rotary, "hpu", rotary.rotary, name="hpex.apply_rotary_pos_emb")
registry.register_impl(ops.rotary_, "hpu", rotary.rotary_, name="hpex.apply_rotary_pos_emb")
registry.register_impl(ops.moe_experts, "hpu", moe.experts, name="hpu.mixture_of_experts", supports=moe.supports)
registry.register_impl(ops.paged_write, "hpu", paged.write, name="index_copy_", supports=paged.supports_write)
registry.register_impl(ops.paged_write, "hpu", ops.paged_write.reference, name="torch_indexing")
registry.register_impl(ops.paged_gather, "hpu", paged.gather, name="index_select")
registry.register_impl(ops.paged_copy_blocks, "hpu", paged.copy_blocks, name="index_select+index_copy_")
registry.register_impl(ops.fp4_matmul, "hpu", ops.fp4_matmul.reference,
                       name="reference (no MXFP4 matmul in the Gaudi software stack)", supports=lambda *args: False)
