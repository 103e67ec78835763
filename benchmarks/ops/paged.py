"""Benchmark: cuda-triton ``paged_gather`` / ``paged_write`` / ``paged_copy_blocks`` against the
PyTorch calls a user would write, timed in the same run.

Targets (the issue):
* gather / write of 4096 blocks of [16, 8, 128] bf16 (from / into a pool of 16384 blocks) reach
  >= 90% of the measured copy bandwidth; baselines ``index_select`` / ``index_copy_``. Bytes
  counted: the blocks read once and written once. (A same-device ``paged_copy_blocks`` row is
  added, against ``index_select`` + ``index_copy_``.)
* tier prefetch host -> device of 1 GiB in blocks, issued on a side stream (as
  ``PagedTensor.prefetch`` does) while a bf16 GEMM loop runs on the default stream, reaches
  >= 90% of the measured pinned host -> device rate. Reported: the copy's effective rate (bytes /
  time from the call to the last block landing on the device, the CPU gather included), and the
  GEMM loop's time against the same loop alone (its slowdown). The GEMM loop is sized to 1.25x
  the copy's time alone, so the copy overlaps it throughout. Baseline: a plain pinned
  ``.to("cuda", non_blocking=True)`` of one contiguous 1 GiB tensor under the same load. Two
  cases: host blocks forming one contiguous run (no CPU gather: the copy engine reads the pool)
  and scattered host blocks (gathered on the CPU into a pinned staging buffer first).

Every apt_hal result is compared byte for byte with the contract's reference (or, for the 1 GiB
prefetch, with the host blocks) before it is timed; a wrong result raises instead.

Run from the repository root on a GPU: ``python -m benchmarks.ops.paged [--quick] [--sweep]``.
``--sweep`` also prints gather / write timings at other tile sizes (tuning data).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

import apt_hal
from apt_hal import ops
from apt_hal.backends.cuda_triton import paged as triton_paged
from benchmarks import harness

BLOCK_SHAPE = (16, 8, 128)
DTYPE = torch.bfloat16
DEVICE = "cuda"  # the on-device rows also run on CPU tensors under TRITON_INTERPRET=1 (for checking this file)
N_BLOCKS = 4096
POOL_BLOCKS = 16384
BLOCK_BYTES = math.prod(BLOCK_SHAPE) * 2
COPY_TARGET_PCT = 90.0
H2D_TARGET_PCT = 90.0
GEMM_N = 8192


def same_bytes(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    """Raise unless ``got`` holds exactly the bytes of ``expected``."""
    if got.shape != expected.shape or not torch.equal(got.view(torch.int16), expected.view(torch.int16)):
        raise AssertionError(f"{name}: result differs from the reference; not timed")


def _time(make, fn, bytes_per_set: int) -> float:
    return harness.time_calls(harness.rotating(make, fn, bytes_per_set))


def _pool(blocks: int) -> torch.Tensor:
    return torch.randn(blocks, *BLOCK_SHAPE, device=DEVICE).to(DTYPE)


def _ids(n: int, high: int, device) -> torch.Tensor:
    return torch.randperm(high, device=device)[:n]


def _copy_row(op: str, ours: float, baselines: dict, moved: int, ceilings: harness.Ceilings) -> harness.Row:
    pct = 100 * moved / ours / 1e3 / ceilings.copy_gbps
    return harness.Row(op, f"{N_BLOCKS} blocks of {list(BLOCK_SHAPE)} bf16, pool of {POOL_BLOCKS}", ours, baselines,
                       pct, "copy", f">= {COPY_TARGET_PCT:g}% copy", pct >= COPY_TARGET_PCT)


# ---- on one device ----------------------------------------------------------------------------


def gather_row(ceilings: harness.Ceilings) -> harness.Row:
    pool = _pool(POOL_BLOCKS)

    def make():
        return pool, _ids(N_BLOCKS, POOL_BLOCKS, DEVICE)

    p, table = make()
    expected = ops.paged_gather.reference(p, table)
    with apt_hal.use("cuda-triton", strict=True):
        same_bytes("apt_hal paged_gather", ops.paged_gather(p, table), expected)
        moved = 2 * N_BLOCKS * BLOCK_BYTES
        ours = _time(make, ops.paged_gather, moved)
    base = _time(make, lambda p, t: torch.index_select(p, 0, t), moved)
    return _copy_row("paged_gather", ours, {"index_select": base}, moved, ceilings)


def write_row(ceilings: harness.Ceilings) -> harness.Row:
    pool = _pool(POOL_BLOCKS)
    slots_per_block = BLOCK_SHAPE[0]

    def make():  # a prefill: whole blocks, each written slot by slot in order
        blocks = _ids(N_BLOCKS, POOL_BLOCKS, DEVICE)
        slots = (blocks[:, None] * slots_per_block + torch.arange(slots_per_block, device=DEVICE)).reshape(-1)
        values = torch.randn(N_BLOCKS * slots_per_block, *BLOCK_SHAPE[1:], device=DEVICE).to(DTYPE)
        return pool, values, slots

    p, values, slots = make()
    expected = p.clone()
    ops.paged_write.reference(expected, values, slots)
    with apt_hal.use("cuda-triton", strict=True):
        ops.paged_write(p, values, slots)
        same_bytes("apt_hal paged_write", p, expected)
        moved = 2 * N_BLOCKS * BLOCK_BYTES
        ours = _time(make, ops.paged_write, moved)
    base = _time(make, lambda p, v, s: p.view(-1, *BLOCK_SHAPE[1:]).index_copy_(0, s, v), moved)
    return _copy_row("paged_write", ours, {"index_copy_": base}, moved, ceilings)


def copy_blocks_row(ceilings: harness.Ceilings) -> harness.Row:
    src, dst = _pool(POOL_BLOCKS), _pool(POOL_BLOCKS)

    def make():
        return src, _ids(N_BLOCKS, POOL_BLOCKS, DEVICE), dst, _ids(N_BLOCKS, POOL_BLOCKS, DEVICE)

    s, s_ids, d, d_ids = make()
    expected = d.clone()
    ops.paged_copy_blocks.reference(s, s_ids, expected, d_ids)
    with apt_hal.use("cuda-triton", strict=True):
        ops.paged_copy_blocks(s, s_ids, d, d_ids)
        same_bytes("apt_hal paged_copy_blocks", d, expected)
        moved = 2 * N_BLOCKS * BLOCK_BYTES
        ours = _time(make, ops.paged_copy_blocks, moved)
    base = _time(make, lambda s, si, d, di: d.index_copy_(0, di, s.index_select(0, si)), moved)
    return _copy_row("paged_copy_blocks", ours, {"index_select+index_copy_": base}, moved, ceilings)


# ---- host -> device prefetch under compute ---------------------------------------------------------


def _stream_time(fn, stream) -> float:
    """Microseconds from enqueueing ``fn`` on ``stream`` (host work inside it included) to its end."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def _overlapped(copy, gemm, n_gemm: int, side) -> tuple[float, float]:
    """(copy us on ``side``, GEMM loop us on the default stream), the copy issued once the loop is queued."""
    torch.cuda.synchronize()
    g0, g1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g0.record()
    for _ in range(n_gemm):
        gemm()
    g1.record()
    with torch.cuda.stream(side):
        c0.record()
        copy()
        c1.record()
    torch.cuda.synchronize()
    return c0.elapsed_time(c1) * 1e3, g0.elapsed_time(g1) * 1e3


def prefetch_rows(ceilings: harness.Ceilings, total_bytes: int, repeats: int = 3,
                  priority: int = 0) -> list[harness.Row]:
    """The prefetch rows; ``priority`` is the side stream's (0: default, as PagedTensor's)."""
    n = total_bytes // BLOCK_BYTES
    host = torch.empty((n + 64, *BLOCK_SHAPE), dtype=DTYPE, pin_memory=True)
    host.copy_(_pool(n + 64))
    device_pool = torch.empty((n, *BLOCK_SHAPE), dtype=DTYPE, device="cuda")
    dst_ids = _ids(n, n, "cuda")
    flat = host[:n]  # the baseline moves the same bytes as one contiguous tensor
    x = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=DTYPE)
    w = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=DTYPE)
    side = torch.cuda.Stream(priority=priority)

    def gemm():
        F.linear(x, w)

    default = torch.cuda.current_stream()
    gemm_us = statistics.median(_stream_time(gemm, default) for _ in range(5))
    size = f"{total_bytes / 2 ** 30:g} GiB = {n} x {list(BLOCK_SHAPE)} bf16"

    def measure(copy) -> tuple[float, float, int, float, float]:
        """Microseconds of the copy alone and under the GEMM loop; the loop's GEMMs, and its
        microseconds alone and under the copy (medians of ``repeats``)."""
        copy()
        alone = statistics.median(_stream_time(copy, side) for _ in range(repeats))
        n_gemm = max(1, math.ceil(1.25 * alone / gemm_us))
        loop_alone = statistics.median(_stream_time(lambda: [gemm() for _ in range(n_gemm)], default)
                                       for _ in range(repeats))
        runs = sorted(_overlapped(copy, gemm, n_gemm, side) for _ in range(repeats))
        return alone, runs[len(runs) // 2][0], n_gemm, loop_alone, runs[len(runs) // 2][1]

    base_alone, base_loaded, *_ = measure(lambda: flat.to("cuda", non_blocking=True))
    rows = []
    for case, src_ids in (("host blocks one run", torch.arange(32, 32 + n)),
                          ("host blocks scattered", _ids(n, n + 64, "cpu"))):
        def copy():
            with apt_hal.use("cuda-triton", strict=True):
                ops.paged_copy_blocks(host, src_ids, device_pool, dst_ids)

        device_pool.zero_()
        copy()
        torch.cuda.synchronize()
        same_bytes(f"apt_hal paged_copy_blocks host->device ({case})", device_pool[dst_ids],
                   host[src_ids].to("cuda"))
        alone, loaded, n_gemm, loop_alone, loop_loaded = measure(copy)
        pct = 100 * total_bytes / loaded / 1e3 / ceilings.h2d_gbps
        rows.append(harness.Row(
            "paged_copy_blocks", f"prefetch h2d {size}, {case}, side stream (priority {priority}) under a "
                                 f"bf16 GEMM loop (alone: apt_hal {total_bytes / alone / 1e3:.1f} GB/s, "
                                 f"pinned .to() {total_bytes / base_alone / 1e3:.1f} GB/s)",
            loaded, {"pinned .to() under GEMM": base_loaded}, pct, "h2d",
            f">= {H2D_TARGET_PCT:g}% h2d under GEMM", pct >= H2D_TARGET_PCT))
        rows.append(harness.Row(
            "bf16 GEMM loop", f"{n_gemm} x F.linear {GEMM_N}^3 while the prefetch above runs "
                              f"(slowdown {100 * (loop_loaded / loop_alone - 1):+.1f}%)",
            loop_loaded, {"GEMM loop alone": loop_alone}, None, "", "slowdown reported", None))
    return rows


def run(ceilings: harness.Ceilings, quick: bool = False) -> list[harness.Row]:
    rows = [gather_row(ceilings), write_row(ceilings)]
    if not quick:
        rows.append(copy_blocks_row(ceilings))
    rows += prefetch_rows(ceilings, (256 if quick else 1024) << 20)
    return rows


def sweep(ceilings: harness.Ceilings) -> None:
    """Gather and write times at other tile sizes (data for tuning hw.STREAM_TILE_BYTES), and the
    prefetch on a high-priority side stream (whether PagedTensor should use one)."""
    pool = _pool(POOL_BLOCKS)
    table = _ids(N_BLOCKS, POOL_BLOCKS, "cuda")
    out = torch.empty((N_BLOCKS, *BLOCK_SHAPE), dtype=DTYPE, device="cuda")
    pool_w, out_w = triton_paged._word_rows(pool, out, unit=BLOCK_BYTES)
    slots = (table[:, None] * BLOCK_SHAPE[0] + torch.arange(BLOCK_SHAPE[0], device="cuda")).reshape(-1)
    values = out.view(-1, *BLOCK_SHAPE[1:])
    slot_bytes = BLOCK_BYTES // BLOCK_SHAPE[0]
    pool_slots_w, values_w = triton_paged._word_rows(pool, values, unit=slot_bytes)
    moved = 2 * N_BLOCKS * BLOCK_BYTES
    for tile in (4096, 8192, 16384, 32768, 65536):
        gather = harness.time_calls([lambda: triton_paged.launch_copy_rows(
            pool_w, table, out_w, None, N_BLOCKS, out_w.shape[1], tile_bytes=tile)])
        write = harness.time_calls([lambda: triton_paged.launch_copy_rows(
            values_w, None, pool_slots_w, slots, len(slots), values_w.shape[1], dst_rows_per_block=BLOCK_SHAPE[0],
            tile_bytes=tile)])
        print(f"sweep paged tile {tile:>6} B: gather {gather:7.1f} us "
              f"({100 * moved / gather / 1e3 / ceilings.copy_gbps:5.1f}% copy), write {write:7.1f} us "
              f"({100 * moved / write / 1e3 / ceilings.copy_gbps:5.1f}% copy)", flush=True)
    harness.print_table(prefetch_rows(ceilings, 1 << 30, priority=-1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time other tile sizes")
    args = parser.parse_args()
    measured = harness.measure_ceilings()
    print(f"{measured.device}: copy {measured.copy_gbps:.0f} GB/s, pinned h2d {measured.h2d_gbps:.1f} GB/s", flush=True)
    harness.print_table(run(measured, quick=args.quick))
    if args.sweep:
        sweep(measured)
