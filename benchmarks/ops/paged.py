"""Benchmark: cuda-triton ``paged_gather`` / ``paged_write`` / ``paged_copy_blocks`` against the
PyTorch calls a user would write, timed in the same run (steady state, see harness.steady_us).

Targets (the issue):
* gather / write of 4096 blocks of [16, 8, 128] bf16 (from / into a pool of 16384 blocks) reach
  >= 90% of the measured copy bandwidth; baselines ``index_select`` / ``index_copy_``. Bytes
  counted: the blocks read once and written once. (A same-device ``paged_copy_blocks`` row is
  added, against ``index_select`` + ``index_copy_``.)
* tier prefetch host -> device of 1 GiB in blocks, issued on a side stream (as
  ``PagedTensor.prefetch`` does) while a bf16 GEMM loop runs on the default stream, reaches
  >= 90% of the measured pinned host -> device rate. Reported: the copy's effective rate (bytes /
  time from the call to the last block landing on the device, host work included), and the
  GEMM loop's time against the same loop alone (its slowdown). The GEMM loop is sized to 1.25x
  the copy's time alone, so the copy overlaps it throughout. Baseline: a plain pinned
  ``.to("cuda", non_blocking=True)`` of one contiguous 1 GiB tensor under the same load. Two
  cases: host blocks forming one contiguous run (the copy engine reads the pool) and scattered
  host blocks (the kernel on the GPU reads them from pinned memory).

Every apt_hal result is compared byte for byte with the contract's reference (or, for the 1 GiB
prefetch, with the host blocks) before it is timed; a wrong result raises instead.

Run from the repository root on a GPU: ``python -m benchmarks.ops.paged [--quick] [--sweep]``.
``--sweep`` also prints tuning data: gather / write at other tiles and grid sizes next to a plain
copy of the same bytes, and the ways to move scattered host blocks (the GPU reading pinned memory
at several grid shapes, the earlier CPU gather + one copy, a chunked CPU-gather pipeline), each
alone and under the GEMM loop, on side streams of priority 0 and -1.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import types

import torch
import torch.nn.functional as F

import apt_hal
from apt_hal import ops
from apt_hal.backends.cuda_triton import hw
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


def _pool(blocks: int) -> torch.Tensor:
    return torch.randn(blocks, *BLOCK_SHAPE, device=DEVICE).to(DTYPE)


def _ids(n: int, high: int, device) -> torch.Tensor:
    return torch.randperm(high, device=device)[:n]


def _copy_row(op: str, times: dict, moved: int, ceilings: harness.Ceilings) -> harness.Row:
    ours = times.pop("apt_hal")
    pct = 100 * moved / ours / 1e3 / ceilings.copy_gbps
    return harness.Row(op, f"{N_BLOCKS} blocks of {list(BLOCK_SHAPE)} bf16, pool of {POOL_BLOCKS}", ours, times,
                       pct, "copy", f">= {COPY_TARGET_PCT:g}% copy", pct >= COPY_TARGET_PCT)


def _steady(make, variants: dict, moved: int) -> dict:
    """Steady-state microseconds of each variant (name -> fn of ``make()``'s inputs), apt_hal's
    under the cuda-triton policy."""
    with apt_hal.use("cuda-triton", strict=True):
        return harness.steady_us({name: harness.rotating(make, fn, moved) for name, fn in variants.items()})


# ---- on one device ----------------------------------------------------------------------------

MOVED = 2 * N_BLOCKS * BLOCK_BYTES  # every on-device row reads and writes 4096 blocks


def gather_row(ceilings: harness.Ceilings) -> harness.Row:
    pool = _pool(POOL_BLOCKS)

    def make():
        return pool, _ids(N_BLOCKS, POOL_BLOCKS, DEVICE)

    p, table = make()
    expected = ops.paged_gather.reference(p, table)
    with apt_hal.use("cuda-triton", strict=True):
        same_bytes("apt_hal paged_gather", ops.paged_gather(p, table), expected)
    times = _steady(make, {"apt_hal": ops.paged_gather, "index_select": lambda p, t: torch.index_select(p, 0, t)},
                    MOVED)
    return _copy_row("paged_gather", times, MOVED, ceilings)


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
    times = _steady(make, {"apt_hal": ops.paged_write,
                           "index_copy_": lambda p, v, s: p.view(-1, *BLOCK_SHAPE[1:]).index_copy_(0, s, v)}, MOVED)
    return _copy_row("paged_write", times, MOVED, ceilings)


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
    def baseline(s, si, d, di):
        d.index_copy_(0, di, s.index_select(0, si))

    times = _steady(make, {"apt_hal": ops.paged_copy_blocks, "index_select+index_copy_": baseline}, MOVED)
    return _copy_row("paged_copy_blocks", times, MOVED, ceilings)


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


def _prefetch_setting(total_bytes: int) -> types.SimpleNamespace:
    """A pinned host pool of ``total_bytes`` of blocks (+64 spare), a device pool, the GEMM."""
    n = total_bytes // BLOCK_BYTES
    host = torch.empty((n + 64, *BLOCK_SHAPE), dtype=DTYPE, pin_memory=True)
    host.copy_(_pool(n + 64))
    x = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=DTYPE)
    w = torch.randn(GEMM_N, GEMM_N, device="cuda", dtype=DTYPE)

    def gemm():
        F.linear(x, w)

    gemm_us = statistics.median(_stream_time(gemm, torch.cuda.current_stream()) for _ in range(5))
    return types.SimpleNamespace(n=n, total_bytes=total_bytes, host=host, gemm=gemm, gemm_us=gemm_us,
                                 device_pool=torch.empty((n, *BLOCK_SHAPE), dtype=DTYPE, device="cuda"),
                                 dst_ids=_ids(n, n, "cuda"), size=f"{total_bytes / 2 ** 30:g} GiB = {n} x "
                                                                  f"{list(BLOCK_SHAPE)} bf16")


def _check_prefetch(setting, copy, expected: torch.Tensor, name: str) -> None:
    """Raise unless ``copy`` lands ``expected`` (the host blocks, on the GPU) in the device pool."""
    setting.device_pool.zero_()
    copy()
    torch.cuda.synchronize()
    same_bytes(name, setting.device_pool[setting.dst_ids], expected)


def _measure(setting, copy, side, repeats: int = 3) -> types.SimpleNamespace:
    """The copy's microseconds alone and under the GEMM loop; the loop's GEMMs, and its
    microseconds alone and under the copy (medians of ``repeats``)."""
    copy()
    torch.cuda.synchronize()  # a copy's host buffers are reused by the next call
    alone = statistics.median(_stream_time(copy, side) for _ in range(repeats))
    n_gemm = max(1, math.ceil(1.25 * alone / setting.gemm_us))
    default = torch.cuda.current_stream()
    loop_alone = statistics.median(_stream_time(lambda: [setting.gemm() for _ in range(n_gemm)], default)
                                   for _ in range(repeats))
    runs = sorted(_overlapped(copy, setting.gemm, n_gemm, side) for _ in range(repeats))
    loaded, loop_loaded = runs[len(runs) // 2]
    return types.SimpleNamespace(alone=alone, loaded=loaded, n_gemm=n_gemm, loop_alone=loop_alone,
                                 loop_loaded=loop_loaded, slowdown=100 * (loop_loaded / loop_alone - 1))


def prefetch_rows(ceilings: harness.Ceilings, total_bytes: int, priority: int = 0) -> list[harness.Row]:
    """The prefetch rows; ``priority`` is the side stream's (0: default, as PagedTensor's)."""
    setting = _prefetch_setting(total_bytes)
    side = torch.cuda.Stream(priority=priority)
    flat = setting.host[:setting.n]  # the baseline moves the same bytes as one contiguous tensor
    base = _measure(setting, lambda: flat.to("cuda", non_blocking=True), side)
    rows = []
    for case, src_ids in (("host blocks one run", torch.arange(32, 32 + setting.n)),
                          ("host blocks scattered", _ids(setting.n, setting.n + 64, "cpu"))):
        def copy():
            with apt_hal.use("cuda-triton", strict=True):
                ops.paged_copy_blocks(setting.host, src_ids, setting.device_pool, setting.dst_ids)

        _check_prefetch(setting, copy, setting.host[src_ids].to("cuda"),
                        f"apt_hal paged_copy_blocks host->device ({case})")
        m = _measure(setting, copy, side)
        pct = 100 * total_bytes / m.loaded / 1e3 / ceilings.h2d_gbps
        rows.append(harness.Row(
            "paged_copy_blocks", f"prefetch h2d {setting.size}, {case}, side stream (priority {priority}) under a "
                                 f"bf16 GEMM loop (alone: apt_hal {total_bytes / m.alone / 1e3:.1f} GB/s, "
                                 f"pinned .to() {total_bytes / base.alone / 1e3:.1f} GB/s)",
            m.loaded, {"pinned .to() under GEMM": base.loaded}, pct, "h2d",
            f">= {H2D_TARGET_PCT:g}% h2d under GEMM", pct >= H2D_TARGET_PCT))
        rows.append(harness.Row(
            "bf16 GEMM loop", f"{m.n_gemm} x F.linear {GEMM_N}^3 while the prefetch above runs "
                              f"(slowdown {m.slowdown:+.1f}%)",
            m.loop_loaded, {"GEMM loop alone": m.loop_alone}, None, "", "slowdown reported", None))
    return rows


def run(ceilings: harness.Ceilings, quick: bool = False) -> list[harness.Row]:
    rows = [gather_row(ceilings), write_row(ceilings)]
    if not quick:
        rows.append(copy_blocks_row(ceilings))
    rows += prefetch_rows(ceilings, (256 if quick else 1024) << 20)
    return rows


# ---- tuning data (--sweep) -------------------------------------------------------------------------


def copy_rows_sweep(ceilings: harness.Ceilings) -> None:
    """Gather and write at other tile sizes and grid caps (data for hw.STREAM_TILE_BYTES), next to
    a plain copy of the same bytes (what this size can reach)."""
    pool = _pool(POOL_BLOCKS)
    table = _ids(N_BLOCKS, POOL_BLOCKS, "cuda")
    out = torch.empty((N_BLOCKS, *BLOCK_SHAPE), dtype=DTYPE, device="cuda")
    pool_w, out_w = triton_paged._word_rows(pool, out, unit=BLOCK_BYTES)
    slots = (table[:, None] * BLOCK_SHAPE[0] + torch.arange(BLOCK_SHAPE[0], device="cuda")).reshape(-1)
    values = out.view(-1, *BLOCK_SHAPE[1:])
    pool_slots_w, values_w = triton_paged._word_rows(pool, values, unit=BLOCK_BYTES // BLOCK_SHAPE[0])
    sms = hw.device_properties()["sm_count"]
    variants = {"plain copy of the same bytes (out.copy_(pool[:4096]))": [lambda: out.copy_(pool[:N_BLOCKS])]}
    for tile in (8192, 16384, 32768):
        for cap in (None, 4 * sms, 16 * sms):
            grid = "one tile per program" if cap is None else f"{cap} programs looping"
            variants[f"gather tile {tile:>5} B, {grid}"] = [lambda tile=tile, cap=cap: triton_paged.launch_copy_rows(
                pool_w, table, out_w, None, N_BLOCKS, out_w.shape[1], tile_bytes=tile, max_programs=cap)]
            variants[f"write  tile {tile:>5} B, {grid}"] = [lambda tile=tile, cap=cap: triton_paged.launch_copy_rows(
                values_w, None, pool_slots_w, slots, len(slots), values_w.shape[1], dst_rows_per_block=BLOCK_SHAPE[0],
                tile_bytes=tile, max_programs=cap)]
    for name, us in harness.steady_us(variants).items():
        pct = 100 * MOVED / us / 1e3 / ceilings.copy_gbps
        print(f"sweep paged {name}: {us:7.1f} us ({pct:5.1f}% copy)", flush=True)


def _pipelined_cpu_gather(host_w, src_ids, dst_w, dst_ids, buffers) -> None:
    """Prototype of the chunked alternative (not in the library): the CPU gathers chunk i+1 into
    one pinned buffer while chunk i's copy is in flight from another."""
    chunk, done = buffers[0].shape[0], [None] * len(buffers)
    for i, a in enumerate(range(0, src_ids.numel(), chunk)):
        j = i % len(buffers)
        if done[j] is not None:
            done[j].synchronize()
        part = buffers[j][:min(chunk, src_ids.numel() - a)]
        torch.index_select(host_w, 0, src_ids[a:a + chunk], out=part)
        moved = part.to(dst_w.device, non_blocking=True)
        done[j] = torch.cuda.current_stream().record_event()
        triton_paged.launch_copy_rows(moved, None, dst_w, dst_ids[a:a + chunk], part.shape[0], dst_w.shape[1])


def host_to_device_sweep(ceilings: harness.Ceilings, total_bytes: int = 1 << 30) -> None:
    """The ways to move scattered pinned host blocks to the GPU, alone and under the GEMM loop."""
    setting = _prefetch_setting(total_bytes)
    src_ids = _ids(setting.n, setting.n + 64, "cpu")
    host_w, dst_w = triton_paged._word_rows(setting.host, setting.device_pool, unit=BLOCK_BYTES)
    staging = torch.empty((setting.n, host_w.shape[1]), dtype=host_w.dtype, pin_memory=True)
    for threads in sorted({1, 4, torch.get_num_threads()}):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        torch.index_select(host_w, 0, src_ids, out=staging)
        seconds = time.perf_counter() - start
        torch.set_num_threads(previous)
        print(f"sweep h2d scattered: CPU gather alone ({threads} threads) {total_bytes / seconds / 1e9:5.1f} GB/s",
              flush=True)

    def staged_copy():  # what apt_hal did before the GPU read pinned memory itself
        staged = triton_paged._gather_blocks(host_w, src_ids, pin=True, kernel=triton_paged._copy_rows_kernel)
        triton_paged.launch_copy_rows(staged.to("cuda", non_blocking=True), None, dst_w, setting.dst_ids, setting.n,
                                      dst_w.shape[1])

    variants = {"CPU gather + one copy (before)": staged_copy}
    for chunk_mib in (32, 128):
        rows = (chunk_mib << 20) // BLOCK_BYTES
        buffers = [torch.empty((rows, host_w.shape[1]), dtype=host_w.dtype, pin_memory=True) for _ in range(2)]
        variants[f"CPU gather pipelined, 2 x {chunk_mib} MiB pinned chunks"] = (
            lambda buffers=buffers: _pipelined_cpu_gather(host_w, src_ids, dst_w, setting.dst_ids, buffers))
    for programs, tile_kib, warps in ((4, 128, 32), (8, 64, 16), (8, 32, 8), (16, 32, 8), (32, 16, 8), (64, 16, 8),
                                      (132, 16, 8)):
        default = " (default)" if (programs, tile_kib << 10) == (hw.HOST_READ_PROGRAMS, hw.HOST_READ_TILE_BYTES) else ""
        variants[f"GPU reads pinned host, {programs} programs x {tile_kib} KiB, {warps} warps{default}"] = (
            lambda p=programs, t=tile_kib << 10, w=warps: triton_paged.read_pinned_host(
                host_w, src_ids, dst_w, setting.dst_ids, programs=p, tile_bytes=t, num_warps=w))
    expected = setting.host[src_ids].to("cuda")
    for name, copy in variants.items():
        _check_prefetch(setting, copy, expected, name)
    del expected
    for priority in (0, -1):
        side = torch.cuda.Stream(priority=priority)
        for name, copy in variants.items():
            m = _measure(setting, copy, side)
            alone, loaded = total_bytes / m.alone / 1e3, total_bytes / m.loaded / 1e3
            print(f"sweep h2d scattered {setting.size}, {name}, priority {priority:+d}: alone {alone:5.1f} GB/s "
                  f"({100 * alone / ceilings.h2d_gbps:3.0f}% h2d), under GEMM {loaded:5.1f} GB/s "
                  f"({100 * loaded / ceilings.h2d_gbps:3.0f}% h2d), GEMM loop {m.slowdown:+.1f}%", flush=True)


def sweep(ceilings: harness.Ceilings) -> None:
    copy_rows_sweep(ceilings)
    host_to_device_sweep(ceilings)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also print tuning data")
    args = parser.parse_args()
    measured = harness.measure_ceilings()
    print(f"{measured.device}: copy {measured.copy_gbps:.0f} GB/s, pinned h2d {measured.h2d_gbps:.1f} GB/s", flush=True)
    harness.print_table(run(measured, quick=args.quick))
    if args.sweep:
        sweep(measured)
