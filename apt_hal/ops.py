"""The dispatching entry points of every op contract.

Call these (``apt_hal.ops.rotary(...)``); the registry picks the implementation. Each one's
``.reference`` is the contract's oracle, and ``torch.ops.apt_hal.<name>`` is the same op as the
torch dispatcher and ``torch.export`` see it.
"""

from apt_hal.contracts.fp4_matmul import fp4_matmul
from apt_hal.contracts.moe_dispatch import (
    MoEOutput,
    moe_combine,
    moe_dispatch,
    moe_experts,
    moe_permute,
    moe_route,
)
from apt_hal.contracts.paged_tensor import paged_copy_blocks, paged_gather, paged_write
from apt_hal.contracts.rotary import rotary, rotary_

# Every op a backend can implement (moe_dispatch is their composition, not an op of its own).
ALL_OPS = (fp4_matmul, moe_route, moe_permute, moe_experts, moe_combine, rotary, rotary_,
           paged_write, paged_gather, paged_copy_blocks)

__all__ = ["ALL_OPS", "MoEOutput"] + [op.name for op in ALL_OPS] + ["moe_dispatch"]
