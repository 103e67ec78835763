"""paged_write / paged_gather on Ascend's paged-KV kernels, where the pool's layout is theirs.

``npu_scatter_pa_kv_cache`` and ``npu_gather_pa_kv_cache`` with ``cache_mode="Norm"`` take a pool
``[num_blocks, block_size, heads, head_dim]``, contiguous, and tokens ``[T, heads, head_dim]``.
Both move a key and a value cache together; the contract's pool is one tensor, so it is passed
as both (the kernel writes the same bytes to the same slots twice). Negative slots (padding) are
dropped before the write: the kernel requires every slot in range. The gather reads whole
blocks: each table row is one sequence of ``M * block_size`` tokens; negative table entries
read block 0 and are zeroed after. Pools of other layouts use plain torch indexing (the contract's
reference, registered as "torch_indexing").
"""

from __future__ import annotations

import torch
import torch_npu

# npu_scatter_pa_kv_cache's documented dtypes (hifloat8 aside, which torch does not have).
DTYPES = (torch.float16, torch.float32, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.uint16,
          torch.int32, torch.uint32, torch.float8_e5m2, torch.float8_e4m3fn)


def _kernel_layout(cache) -> bool:
    return cache.dim() == 4 and cache.dtype in DTYPES and cache.is_contiguous() and cache.numel() > 0


def supports_write(chip, cache, values, slot_mapping) -> bool:
    return chip.paged_kernels and _kernel_layout(cache) and values.is_contiguous()


def write(chip, cache, values, slot_mapping):
    keep = slot_mapping >= 0
    tokens, slots = values[keep], slot_mapping[keep]
    if slots.numel():
        torch_npu.npu_scatter_pa_kv_cache(tokens, tokens, cache, cache, slots, cache_mode="Norm")


def supports_gather(chip, cache, block_table) -> bool:
    return chip.paged_kernels and _kernel_layout(cache) and block_table.numel() > 0


def gather(chip, cache, block_table):
    table = block_table.reshape(-1, block_table.shape[-1])
    seqs, blocks = table.shape
    tokens_per_seq = blocks * cache.shape[1]
    seq_lens = torch.full((seqs,), tokens_per_seq, dtype=torch.int32, device=cache.device)
    out = cache.new_empty((seqs * tokens_per_seq, *cache.shape[2:]))
    torch_npu.npu_gather_pa_kv_cache(cache, cache, table.clamp(min=0).to(torch.int32), seq_lens, out, out)
    out = out.view(seqs, blocks, *cache.shape[1:])
    unused = (table < 0).view(seqs, blocks, *([1] * (cache.dim() - 1)))
    out = torch.where(unused, torch.zeros((), dtype=cache.dtype, device=cache.device), out)
    return out.reshape(*block_table.shape, *cache.shape[1:])
