"""paged_tensor on Gaudi: ``index_copy_`` / ``index_select``, as vllm-gaudi's cache ops do.

Plain torch ops, which Gaudi's graph compiler lowers itself. ``paged_write`` views the pool as
``[num_blocks * block_size, *item]`` and needs its first two dimensions mergeable (a per-layer
view with a strided first dimension goes to the contract's indexing instead); ``paged_gather``
and ``paged_copy_blocks`` work on any pool.
"""

from __future__ import annotations

import torch


def supports_write(cache, values, slot_mapping) -> bool:
    return cache.stride(0) == cache.shape[1] * cache.stride(1)


def write(cache, values, slot_mapping):
    keep = slot_mapping >= 0
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping[keep].long(), values[keep])


def gather(cache, block_table):
    ids = block_table.reshape(-1).long()
    blocks = cache.index_select(0, ids.clamp(min=0))
    unused = (ids < 0).view(-1, *([1] * (cache.dim() - 1)))
    blocks = torch.where(unused, torch.zeros((), dtype=cache.dtype, device=cache.device), blocks)
    return blocks.reshape(*block_table.shape, *cache.shape[1:])


def copy_blocks(src, src_ids, dst, dst_ids):
    dst.index_copy_(0, dst_ids.long(), src.index_select(0, src_ids.long()).to(dst.device))
