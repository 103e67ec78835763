"""Edge cases of the shared argument checks (regressions found while writing kernels)."""

import pytest
import torch

from apt_hal import ContractError, ops


def test_int32_index_tensors_accept_negative_entries():
    # -1 marks an unused block-table entry; a bound beyond int32's range must not wrap.
    pool = torch.arange(24.0).reshape(4, 2, 3)
    out = ops.paged_gather.reference(pool, torch.tensor([2, -1], dtype=torch.int32))
    assert torch.equal(out[0], pool[2]) and torch.equal(out[1], torch.zeros(2, 3))
    with pytest.raises(ContractError, match=r"'block_table' must hold values in \[0, 4\) or negative, found 4"):
        ops.paged_gather.reference(pool, torch.tensor([4], dtype=torch.int32))


def test_strided_scalar_items_are_dense_enough():
    # values [T] with scalar items has no inner dimension to be contiguous in.
    cache = torch.zeros(2, 4)
    values = torch.tensor([1.0, 9.0, 2.0, 9.0, 3.0, 9.0])[::2]
    ops.paged_write(cache, values, torch.tensor([0, 5, -1]))
    assert cache.flatten().tolist() == [1, 0, 0, 0, 0, 2, 0, 0]


def test_upper_bounds_beyond_the_dtype_do_not_wrap():
    # A pool of 2**31 slots: every int32 slot is in range; the bound must not wrap to negative.
    from apt_hal import checks

    checks.index_range("paged_write", "slot_mapping", torch.tensor([0, 5, -1], dtype=torch.int32), 0, 2 ** 31,
                       negative_ok=True)
