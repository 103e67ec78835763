"""paged_tensor: block-paged storage (a KV cache, or any per-token tensor) and its three ops.

A *pool* is a tensor ``[num_blocks, block_size, *item]``: ``num_blocks`` fixed-size blocks of
``block_size`` slots, each slot an ``item`` (for a KV cache, ``[heads, head_dim]``). Slot ``s``
is block ``s // block_size``, offset ``s % block_size``. The pool's first dimension may be
strided (a per-layer view of a larger allocation); the dimensions after it must be dense.
Any dtype: the ops move bytes and never convert or round.

Ops
---
``paged_write(cache, values [T, *item], slot_mapping [T])``: ``cache[slot] = values[t]``; a
negative slot skips its token (padding). Mutates ``cache``. Two tokens writing one slot is an
error (value check): the result would depend on the backend. A slot at or beyond
``num_blocks*block_size`` is an error (value check); below that check level it is skipped like
a negative one.

``paged_gather(cache, block_table [*batch, M]) -> [*batch, M, block_size, *item]``: the blocks
a table names, in order; a negative entry gives a zero block (an unused table slot). An entry at
or beyond ``num_blocks`` is an error (value check); below that check level it gives a zero block
too (so gathering from an empty pool gives zeros).

``paged_copy_blocks(src, src_ids [n], dst, dst_ids [n])``: ``dst[dst_ids[i]] = src[src_ids[i]]``,
whole blocks, between pools of one block shape and dtype, possibly on different devices (the
tier moves: device <-> pinned host). Mutates ``dst``. Ids are int32/int64 on their pool's device;
repeated ``dst_ids`` and ids outside ``[0, num_blocks)`` of their pool are errors (value checks);
below that check level a pair whose ``src`` or ``dst`` id is out of range is skipped. In stream order like any
torch op: copies to or from pinned host memory may be asynchronous; the store
(:class:`apt_hal.paged_store.PagedTensor`) waits for them before it reads or reuses a block (events for its
side-stream prefetches, a device synchronisation before the CPU touches host blocks).

Layout: ``values`` is dense after its first dimension; index tensors (``slot_mapping``,
``block_table``, ``src_ids``, ``dst_ids``) may have any strides. A mutated pool (``cache`` of
``paged_write``, ``dst`` of ``paged_copy_blocks``) must not have elements sharing memory (a
stride-0, ``expand``-ed dimension): a ContractError names it.

Index checks (values in range) are value checks: references always run them, backends under
``APT_HAL_CHECKS=values`` (:func:`apt_hal.set_checks`); at ``"none"`` and ``"metadata"`` a backend
never reads or writes outside a pool and gives the defined results above. The in-place ops run
every check on every argument before they write anything.

The tiered store that keeps pools on device, host and disk is :class:`apt_hal.paged_store.PagedTensor`.
"""

from __future__ import annotations

import torch

from apt_hal import checks
from apt_hal.contract import contract, value_checks_enabled


def _check_pool(op: str, name: str, pool: torch.Tensor) -> None:
    checks.tensor(op, name, pool, min_ndim=2)
    if pool.dim() > 1 and pool.numel():
        checks.inner_contiguous(op, name, pool, from_dim=1)


# ---------------------------------------------------------------------------------------------
# paged_write
# ---------------------------------------------------------------------------------------------


def _check_write(cache, values, slot_mapping):
    op = "paged_write"
    _check_pool(op, "cache", cache)
    checks.writable(op, "cache", cache)
    item = tuple(cache.shape[2:])
    checks.tensor(op, "values", values, dtypes=(cache.dtype,), ndim=1 + len(item))
    if tuple(values.shape[1:]) != item:
        checks.fail(op, f"argument 'values' must have shape [T, {', '.join(map(str, item))}] to match the "
                        f"cache's items, got {list(values.shape)}")
    if values.numel():
        checks.inner_contiguous(op, "values", values, from_dim=1)
    checks.tensor(op, "slot_mapping", slot_mapping, dtypes=checks.INDEX_DTYPES, ndim=1)
    checks.size(op, "slot_mapping", slot_mapping, 0, values.shape[0], "T from 'values'")
    checks.same_device(op, ("cache", "values", "slot_mapping"), (cache, values, slot_mapping))


def _check_write_values(cache, values, slot_mapping):
    slots = cache.shape[0] * cache.shape[1]
    checks.index_range("paged_write", "slot_mapping", slot_mapping, 0, slots, negative_ok=True)
    used = slot_mapping[slot_mapping >= 0]
    if used.numel() != torch.unique(used).numel():
        checks.fail("paged_write", "argument 'slot_mapping' names one slot more than once")


def _fake_write(cache, values, slot_mapping):
    return None


@contract(fake=_fake_write, check=_check_write, check_values=_check_write_values, mutates_args=("cache",))
def paged_write(cache: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter tokens into pool slots; see the apt_hal.contracts.paged_tensor spec."""
    if value_checks_enabled():
        _check_write_values(cache, values, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = cache.shape[1]
    cache[slots // bs, slots % bs] = values[keep]


# ---------------------------------------------------------------------------------------------
# paged_gather
# ---------------------------------------------------------------------------------------------


def _check_gather(cache, block_table):
    op = "paged_gather"
    _check_pool(op, "cache", cache)
    checks.tensor(op, "block_table", block_table, dtypes=checks.INDEX_DTYPES, min_ndim=1)
    checks.same_device(op, ("cache", "block_table"), (cache, block_table))


def _check_gather_values(cache, block_table):
    checks.index_range("paged_gather", "block_table", block_table, 0, cache.shape[0], negative_ok=True)


def _fake_gather(cache, block_table):
    return cache.new_empty((*block_table.shape, *cache.shape[1:]))


@contract(fake=_fake_gather, check=_check_gather, check_values=_check_gather_values)
def paged_gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Gather whole blocks by a block table; see the apt_hal.contracts.paged_tensor spec."""
    if value_checks_enabled():
        _check_gather_values(cache, block_table)
    ids = block_table.reshape(-1).long()
    if cache.shape[0] == 0:  # an empty pool: every entry is negative (checked), so every block is zero
        return cache.new_zeros((*block_table.shape, *cache.shape[1:]))
    valid = ids >= 0
    out = cache[ids.clamp(min=0)]
    out = torch.where(valid.reshape(-1, *([1] * (cache.dim() - 1))), out, torch.zeros((), dtype=cache.dtype,
                                                                                      device=cache.device))
    return out.reshape(*block_table.shape, *cache.shape[1:])


# ---------------------------------------------------------------------------------------------
# paged_copy_blocks
# ---------------------------------------------------------------------------------------------


def _check_copy(src, src_ids, dst, dst_ids):
    op = "paged_copy_blocks"
    _check_pool(op, "src", src)
    _check_pool(op, "dst", dst)
    checks.writable(op, "dst", dst)
    if src.dtype != dst.dtype or tuple(src.shape[1:]) != tuple(dst.shape[1:]):
        checks.fail(op, f"'src' blocks {list(src.shape[1:])} {src.dtype} and 'dst' blocks {list(dst.shape[1:])} "
                        f"{dst.dtype} must have one shape and dtype")
    checks.tensor(op, "src_ids", src_ids, dtypes=checks.INDEX_DTYPES, ndim=1)
    checks.tensor(op, "dst_ids", dst_ids, dtypes=checks.INDEX_DTYPES, ndim=1)
    checks.size(op, "dst_ids", dst_ids, 0, src_ids.shape[0], "n from 'src_ids'")
    checks.same_device(op, ("src", "src_ids"), (src, src_ids))
    checks.same_device(op, ("dst", "dst_ids"), (dst, dst_ids))


def _check_copy_values(src, src_ids, dst, dst_ids):
    checks.index_range("paged_copy_blocks", "src_ids", src_ids, 0, src.shape[0])
    checks.index_range("paged_copy_blocks", "dst_ids", dst_ids, 0, dst.shape[0])
    if dst_ids.numel() != torch.unique(dst_ids).numel():
        checks.fail("paged_copy_blocks", "argument 'dst_ids' names one block more than once")


def _fake_copy(src, src_ids, dst, dst_ids):
    return None


@contract(fake=_fake_copy, check=_check_copy, check_values=_check_copy_values, mutates_args=("dst",),
          device_args=("src", "dst"))
def paged_copy_blocks(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """Copy whole blocks between pools (and devices); see the apt_hal.contracts.paged_tensor spec."""
    if value_checks_enabled():
        _check_copy_values(src, src_ids, dst, dst_ids)
    blocks = src[src_ids.long()]
    dst[dst_ids.long()] = blocks.to(dst.device)
