"""paged_write, paged_gather and paged_copy_blocks as one Triton row-copy kernel.

The three ops move bytes and never convert, so every tensor is first viewed as a matrix of
integer *words* (the widest of 8, 4, 2 or 1 bytes that divides every row length, block stride
and address involved): every dtype, fp8 and uint8 included, is copied bit for bit, and aligned
rows move as 16-byte vector accesses. The word matrices are built from ``view`` calls only, never
``as_strided``: torch.compile cannot functionalize a kernel's write through an ``as_strided`` view.

The kernel copies rows: ``dst row dst_ids[i] = src row src_ids[i]`` (ids omitted: ``i``). Source
rows sit ``stride(0)`` words apart (blocks of a pool, possibly a per-layer view of a larger
allocation, or tokens); destination row ``j`` is row ``j % rows_per_block`` of block
``j // rows_per_block`` (a slot, for writes). Ids may have any stride. A source id outside the
source rows (negative included) reads zeros, a destination id outside the destination skips the
row: whatever the check level, no id is ever followed out of its pool. Then

* ``paged_write``   = rows of ``values`` -> slots of the pool (``rows_per_block = block_size``);
* ``paged_gather``  = blocks of the pool named by the table -> a dense output;
* ``paged_copy_blocks`` on one device = pool blocks -> pool blocks, one launch. Across devices see
  :func:`copy_blocks_across_devices`: host blocks reach a GPU through the copy engine when they
  are one contiguous run of pinned memory, else the kernel on the GPU reads them directly from
  pinned host memory; other directions stage the blocks in one contiguous buffer.

A program copies ``[rows, cols]`` tiles of ``hw.STREAM_TILE_BYTES``, one tile per program on a
GPU's own memory (tiles shrink, fewer rows, only when the grid would otherwise have too few
programs to fill the GPU); a grid capped at fewer programs than tiles loops over them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from apt_hal import ops
from apt_hal.backends.cuda_triton import hw
from apt_hal.backends.cuda_triton.registration import direct, kernel_op
from apt_hal.contract import tracing

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@triton.jit
def _copy_rows_kernel(src, src_ids, src_id_stride, src_rows, src_row_stride, dst, dst_ids, dst_id_stride, dst_rows,
                      dst_rows_per_block, dst_block_stride, n_rows, row_len, col_blocks, SKIP_BAD_SRC: tl.constexpr,
                      ROWS: tl.constexpr, COLS: tl.constexpr):
    n_tiles = tl.cdiv(n_rows, ROWS) * col_blocks
    tile = tl.program_id(0)
    # One pass per program unless the grid is capped. (`while`, as the interpreter's range() needs ints.)
    while tile < n_tiles:
        rows = (tile // col_blocks).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        s = rows
        if src_ids is not None:
            s = tl.load(src_ids + rows * src_id_stride, mask=row_ok).to(tl.int64)
        d = rows
        if dst_ids is not None:
            d = tl.load(dst_ids + rows * dst_id_stride, mask=row_ok).to(tl.int64)
        # Ids outside the pools are never followed, whatever the check level: a source row out of
        # range reads zeros (or, SKIP_BAD_SRC, skips its row), a destination out of range is skipped.
        s_ok = row_ok & (s >= 0) & (s < src_rows)
        d_ok = row_ok & (d >= 0) & (d < dst_rows)
        if SKIP_BAD_SRC:
            d_ok = d_ok & s_ok
        src_at = s * src_row_stride
        dst_at = (d // dst_rows_per_block) * dst_block_stride + (d % dst_rows_per_block) * row_len
        cols = (tile % col_blocks) * COLS + tl.arange(0, COLS)
        col_ok = (cols < row_len)[None, :]
        x = tl.load(src + src_at[:, None] + cols[None, :], mask=s_ok[:, None] & col_ok, other=0)
        tl.store(dst + dst_at[:, None] + cols[None, :], x, mask=d_ok[:, None] & col_ok)
        tile += tl.num_programs(0)


def launch_copy_rows(src: torch.Tensor, src_ids: Optional[torch.Tensor], dst: torch.Tensor,
                     dst_ids: Optional[torch.Tensor], n_rows: int, row_len: int, *, dst_rows_per_block: int = 1,
                     launch=direct, tile_bytes: int = hw.STREAM_TILE_BYTES,
                     max_programs: Optional[int] = None, num_warps: Optional[int] = None,
                     skip_bad_src: bool = False) -> None:
    """Copy ``n_rows`` rows of ``row_len`` words between word matrices ``src``/``dst`` (``[blocks,
    block_len]``, dim 0 strided); see the module docstring. The id vectors may have any stride.
    ``launch`` is registration.direct or ``wrap_triton``. ``max_programs`` caps the grid
    (each program then loops over tiles); ``num_warps`` overrides the warps a tile of ``tile_bytes``
    gets; ``skip_bad_src``: a source id out of range skips its row instead of writing zeros."""
    if n_rows == 0 or row_len == 0:
        return
    word = src.element_size()
    most = hw.stream_tile(word, tile_bytes)
    cols = min(triton.next_power_of_2(row_len), most)
    rows = min(most // cols, triton.next_power_of_2(n_rows))
    col_blocks = triton.cdiv(row_len, cols)
    enough = max_programs or hw.stream_min_programs(dst.device.index or 0)
    while rows > 1 and triton.cdiv(n_rows, rows) * col_blocks < enough:
        rows //= 2
    tiles = triton.cdiv(n_rows, rows) * col_blocks
    with hw.device_guard(dst):
        launch(_copy_rows_kernel)[(min(tiles, max_programs or tiles),)](
            src, src_ids, _stride(src_ids), src.shape[0], src.stride(0), dst, dst_ids, _stride(dst_ids),
            dst.shape[0] * dst_rows_per_block, dst_rows_per_block, dst.stride(0), n_rows, row_len, col_blocks,
            SKIP_BAD_SRC=skip_bad_src, ROWS=rows, COLS=cols,
            num_warps=num_warps or hw.stream_num_warps(rows * cols * word))


def _stride(ids: Optional[torch.Tensor]) -> int:
    return 0 if ids is None else ids.stride(0)


# ---- word views -----------------------------------------------------------------------------------


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[n, *dense]`` as the ``[n, row_bytes]`` uint8 matrix of the same memory."""
    rows = t.unsqueeze(1) if t.dim() == 1 else t.flatten(1)  # views: the dense dimensions merge
    return rows.view(torch.uint8)


def _word_rows(*tensors: torch.Tensor, unit: int) -> list[torch.Tensor]:
    """Views of ``tensors`` as ``[n, row_bytes / w]`` matrices of the widest integer word ``w`` that
    divides ``unit`` (bytes of the smallest piece copied), every row stride and every address."""
    rows = [_byte_rows(t) for t in tensors]
    # Traced tensors have no address: rely on torch's allocators aligning every storage.
    addresses = [r.storage_offset() if tracing() else r.data_ptr() for r in rows]
    for w in (8, 4, 2, 1):
        if unit % w == 0 and all(r.stride(0) % w == 0 and a % w == 0 for r, a in zip(rows, addresses)):
            return [r.view(_WORD_DTYPES[w]) for r in rows]
    raise AssertionError("unreachable: 1-byte words divide everything")


# ---- paged_write ----------------------------------------------------------------------------------


@kernel_op(ops.paged_write)
def paged_write_triton(cache, values, slot_mapping, *, launch):
    slot_bytes = math.prod(values.shape[1:]) * values.element_size()
    if values.shape[0] == 0 or slot_bytes == 0:
        return
    cache_w, values_w = _word_rows(cache, values, unit=slot_bytes)
    slot_len = slot_bytes // cache_w.element_size()
    launch_copy_rows(values_w, None, cache_w, slot_mapping, values.shape[0], slot_len,
                     dst_rows_per_block=cache.shape[1], launch=launch)


# ---- paged_gather ---------------------------------------------------------------------------------


@kernel_op(ops.paged_gather)
def paged_gather_triton(cache, block_table, *, launch):
    out = torch.empty((*block_table.shape, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
    n = block_table.numel()
    if out.numel():
        block_bytes = math.prod(cache.shape[1:]) * cache.element_size()
        cache_w, out_w = _word_rows(cache, out.view(n, *cache.shape[1:]), unit=block_bytes)
        launch_copy_rows(cache_w, block_table.reshape(n), out_w, None, n, out_w.shape[1], launch=launch)
    return out


# ---- paged_copy_blocks ----------------------------------------------------------------------------


def _host_run(rows: torch.Tensor, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """``rows[a:a+n]`` when host ``ids`` are ``a, a+1, .., a+n-1`` and that slice is one contiguous
    piece of pinned memory: the blocks are then their own staging buffer, and the copy engine
    moves them with no gather or scatter on the CPU."""
    if tracing() or not rows.is_pinned():
        return None
    first, n = int(ids[0]), ids.numel()
    if first < 0 or first + n > rows.shape[0] or not torch.equal(ids, torch.arange(first, first + n, dtype=ids.dtype)):
        return None
    run = rows[first:first + n]
    return run if run.is_contiguous() else None


def read_pinned_host(host_w: torch.Tensor, host_ids: torch.Tensor, dst_w: torch.Tensor, dst_ids: torch.Tensor,
                     launch=direct, programs: int = hw.HOST_READ_PROGRAMS,
                     tile_bytes: int = hw.HOST_READ_TILE_BYTES, num_warps: Optional[int] = None) -> None:
    """``dst_w[dst_ids] = host_w[host_ids]`` read by the GPU itself from pinned host memory (zero
    copy: no CPU gather, no staging buffer), by a grid of ``programs`` that loops over the blocks;
    see hw.HOST_READ_PROGRAMS. The host blocks are read in stream order."""
    ids = host_ids.to(dst_w.device, non_blocking=True)
    launch_copy_rows(host_w, ids, dst_w, dst_ids, ids.numel(), dst_w.shape[1], launch=launch, tile_bytes=tile_bytes,
                     max_programs=programs, num_warps=num_warps, skip_bad_src=True)
    # torch's pinned-memory allocator hands a freed block out again only once the copies recorded
    # on it have finished, and a kernel's reads are not recorded: a one-word copy from the same
    # allocation, queued after the kernel, records them (the host pool may be freed at once).
    torch.empty(1, dtype=host_w.dtype, device=dst_w.device).copy_(host_w[0, :1], non_blocking=True)


def _gather_blocks(src_w: torch.Tensor, src_ids: torch.Tensor, pin: bool, launch) -> torch.Tensor:
    """The blocks ``src_ids`` of word matrix ``src_w`` as one contiguous ``[n, block_len]`` tensor on
    ``src_w``'s device (pinned if asked, on the host)."""
    n, block_len = src_ids.numel(), src_w.shape[1]
    staged = torch.empty((n, block_len), dtype=src_w.dtype, device=src_w.device, pin_memory=pin)
    if src_w.device.type == "cpu":
        torch.index_select(src_w, 0, src_ids, out=staged)
    else:
        launch_copy_rows(src_w, src_ids, staged, None, n, block_len, launch=launch)
    return staged


def copy_blocks_across_devices(src, src_ids, dst, dst_ids, launch=direct) -> None:
    """``dst[dst_ids] = src[src_ids]`` for pools on different devices (host <-> GPU, or two GPUs).

    To a GPU: a contiguous run of pinned host blocks is its own staging buffer (one copy-engine
    transfer); other pinned host blocks are read by the kernel on the GPU itself
    (:func:`read_pinned_host`: no CPU gather serialised before the transfer); pageable host blocks
    and another GPU's blocks are gathered into one contiguous staging buffer (pinned, on the host)
    and moved by ONE copy. The kernel then scatters the moved blocks.
    To the host: the GPU gathers the blocks into one staging buffer, one copy brings it to pinned
    memory, and the CPU scatters it (none of that for a contiguous run of pinned host blocks).

    Host memory and stream order: a copy *from* pinned host memory reads the host blocks in stream
    order (the copy engine or the kernel reads them); from pageable memory, when called (the CPU
    gathers them). A copy *to* the host has landed when the call returns, so the CPU may read or
    reuse those blocks at once, and no later host-side gather can read bytes still in flight.
    """
    n = src_ids.numel()
    block_bytes = math.prod(src.shape[1:]) * src.element_size()
    if n == 0 or block_bytes == 0 or src.shape[0] == 0 or dst.shape[0] == 0:
        return  # (an empty pool: every pair is out of range and skipped)
    src_ids, dst_ids = _drop_invalid_pairs(src_ids, src.shape[0], dst_ids, dst.shape[0])
    src_w, dst_w = _word_rows(src, dst, unit=block_bytes)
    if dst.device.type == "cpu":
        _copy_to_host(src_w, src_ids, dst_w, dst_ids, launch)
        return
    from_host = src.device.type == "cpu"
    run = _host_run(src_w, src_ids) if from_host else None
    if run is None and from_host and src.is_pinned() and hw.PINNED_HOST_READABLE:
        read_pinned_host(src_w, src_ids, dst_w, dst_ids, launch)
        return
    staged = run if run is not None else _gather_blocks(src_w, src_ids, pin=from_host, launch=launch)
    launch_copy_rows(staged.to(dst.device, non_blocking=True), None, dst_w, dst_ids, n, dst_w.shape[1], launch=launch)


def _drop_invalid_pairs(src_ids: torch.Tensor, src_blocks: int, dst_ids: torch.Tensor,
                        dst_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids for a cross-device copy in which a pair with an id out of range is skipped: its source
    id becomes 0 (a block that exists, so no gather leaves the pool) and its destination id -1
    (which every scatter skips). Towards a GPU, no host synchronisation: the mask moves like the
    ids; towards the host, the CPU waits for it (that copy waits for its blocks anyway)."""
    src_ok = (src_ids >= 0) & (src_ids < src_blocks)  # on the source's device, like src_ids
    src_ok_at_dst = src_ok.to(dst_ids.device, non_blocking=dst_ids.device.type != "cpu")
    keep = src_ok_at_dst & (dst_ids >= 0) & (dst_ids < dst_blocks)
    return torch.where(src_ok, src_ids, 0), torch.where(keep, dst_ids, -1)


def _copy_to_host(src_w, src_ids, host_w, host_ids, launch) -> None:
    staged = _gather_blocks(src_w, src_ids, pin=False, launch=launch)
    run = _host_run(host_w, host_ids)
    if run is not None:
        run.copy_(staged)  # blocking (see copy_blocks_across_devices)
        return
    if staged.device.type != "cpu":
        host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
        host.copy_(staged)  # blocking, then the CPU scatters
        staged = host
    keep = host_ids >= 0  # skipped pairs (see _drop_invalid_pairs)
    host_w.index_copy_(0, host_ids[keep].long(), staged[keep])  # index_copy_ takes int64 ids only


@kernel_op(ops.paged_copy_blocks)
def paged_copy_blocks_triton(src, src_ids, dst, dst_ids, *, launch):
    if src.device != dst.device:
        copy_blocks_across_devices(src, src_ids, dst, dst_ids, launch)
        return
    block_bytes = math.prod(src.shape[1:]) * src.element_size()
    if src_ids.numel() and block_bytes:
        src_w, dst_w = _word_rows(src, dst, unit=block_bytes)
        launch_copy_rows(src_w, src_ids, dst_w, dst_ids, src_ids.numel(), src_w.shape[1], launch=launch,
                         skip_bad_src=True)

