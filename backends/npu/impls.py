"""npu implementations: torch_npu's fused kernels behind the contracts, chosen per chip.

Importing torch_npu registers torch's "npu" device (it renames PrivateUse1; apt_hal never does).
The chip's adaptor (:mod:`apt_hal.backends.npu.chips`) decides which kernels this host gets; a
call a kernel cannot take (its ``supports`` says so) goes to the next implementation, or to the
reference with a warning. On a chip without MXFP4, fp4_matmul is registered as declining every
call, with the reason in its name, so ``apt_hal.explain()`` and the fallback warning show why.
"""

from functools import partial

import torch_npu

from apt_hal import ops, registry
from apt_hal.backends.npu import chips, fp4, moe, paged, rotary

CHIP = chips.for_device_name(torch_npu.npu.get_device_name())


def _register(op, fn, name, supports=None):
    registry.register_impl(op, "npu", partial(fn, CHIP), name=name,
                           supports=partial(supports, CHIP) if supports else None)


_ROTARY = "npu_apply_rotary_pos_emb+npu_rotary_mul" if CHIP.fused_rotary_modes else "npu_rotary_mul"
_register(ops.rotary, rotary.rotary, _ROTARY, rotary.supports)
_register(ops.rotary_, rotary.rotary_, _ROTARY, rotary.supports)

if CHIP.moe_kernels:
    _register(ops.moe_route, moe.route, CHIP.router, moe.supports_route)
    _register(ops.moe_permute, moe.permute, "npu_moe_init_routing_v2", moe.supports_permute)
    _register(ops.moe_experts, moe.experts, "npu_grouped_matmul", moe.supports_experts)
    _register(ops.moe_combine, moe.combine, "npu_moe_finalize_routing")

if CHIP.mxfp4_weights:
    _register(ops.fp4_matmul, fp4.fp4_matmul, "npu_weight_quant_batchmatmul", fp4.supports)
else:
    _register(ops.fp4_matmul, fp4.fp4_matmul, f"reference ({CHIP.device_name}: {CHIP.mxfp4_reason})", fp4.declines)

_register(ops.paged_write, paged.write, "npu_scatter_pa_kv_cache", paged.supports_write)
_register(ops.paged_gather, paged.gather, "npu_gather_pa_kv_cache", paged.supports_gather)
for _op in (ops.paged_write, ops.paged_gather, ops.paged_copy_blocks):
    registry.register_impl(_op, "npu", _op.reference, name="torch_indexing")
