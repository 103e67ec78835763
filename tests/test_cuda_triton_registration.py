"""registration.kernel_op: every cuda-triton op is one launcher, registered as an apt_hal
implementation wired to its traceable triton_op, both with the contract's schema."""

import pytest

from apt_hal import impl_schema, ops, registry
from apt_hal.backends.cuda_triton import impls  # noqa: F401  (registers the cuda-triton kernels)
from apt_hal.backends.cuda_triton.registration import NAMESPACE, kernel_op


def test_every_implementation_names_its_triton_op_with_the_contract_schema():
    checked = []
    for name, contract in registry.contracts().items():
        for entry in registry.implementations(name, "cuda-triton"):
            assert entry.traceable == f"{NAMESPACE}::{name}", entry.name
            traced = impl_schema.traceable_schema(entry.traceable)
            assert traced is not None, entry.traceable
            assert impl_schema.difference(impl_schema.parse(contract.schema), traced) is None, entry.traceable
            checked.append(name)
    assert sorted(checked) == sorted(["fp4_matmul", "moe_route", "moe_permute", "moe_experts", "moe_combine",
                                      "rotary", "rotary_", "paged_write", "paged_gather", "paged_copy_blocks"])


def test_a_launcher_without_a_keyword_only_launch_is_refused():
    def rotary(q, k, positions, cos_sin_cache, style="neox", launch=None):
        return q, k

    with pytest.raises(TypeError, match="launcher .*rotary of rotary needs a keyword-only 'launch'"):
        kernel_op(ops.rotary)(rotary)
    assert [e.name for e in registry.implementations("rotary", "cuda-triton")] == ["cuda-triton.triton"]
