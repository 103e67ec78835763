"""PagedTensor tier moves on an accelerator: bit-exact checks and timings, printed as one table.

    python benchmarks/paged_store.py              # on a GPU machine (CUDA, or any torch.accelerator)
    python benchmarks/paged_store.py --quick      # a small smoke run, on the CPU if there is no GPU

Every route moves ``--blocks`` KV blocks of one layer ([2, 16, 8, 128] bf16, 64 KiB each) through
the store and checks that they come back bit-exact (an exception otherwise). Each figure is the
median of ``--repeats`` runs, beside the ceiling measured in the same run: a pinned
``copy_(non_blocking=True)`` of the same bytes. Disk figures include the OS page cache (the file
was just written): they show the store's own cost, not the drive's. "overlap" is the share of the
shorter of (prefetch, compute) hidden when a prefetch from host runs beside compute on a side
stream: 100% = fully hidden (meaningless on the CPU, which has no streams).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from apt_hal import ops
from apt_hal.device import synchronize
from apt_hal.paged_store import PagedTensor

BLOCK = (2, 16, 8, 128)  # K and V of one layer: block_size 16, 8 heads, head_dim 128


def _median_s(fn, repeats: int, setup=None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize(DEVICE)
        t = time.perf_counter()
        fn()
        synchronize(DEVICE)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _check(store, ids, original) -> None:
    got = ops.paged_gather(store.pool, store.device_slots(ids))
    if not torch.equal(got.view(torch.int16), original.view(torch.int16)):
        raise AssertionError("blocks came back with different bytes")


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    DEVICE = torch.device(accelerator.type if accelerator else "cpu")
    n = 64 if args.quick else args.blocks
    block_bytes = torch.Size(BLOCK).numel() * 2
    gb = n * block_bytes / 1e9

    rows = []  # (route, seconds, ceiling seconds or None)
    with tempfile.TemporaryDirectory() as tmp:
        store = PagedTensor(BLOCK, torch.bfloat16, DEVICE, n, n, str(Path(tmp) / "blocks.bin"), n)
        ids = store.allocate(n)  # all on the device
        original = torch.randn(n, *BLOCK, device=DEVICE).to(torch.bfloat16)
        ops.paged_copy_blocks(original, torch.arange(n, device=DEVICE), store.pool, store.device_slots(ids).long())

        pinned = torch.empty((n, *BLOCK), dtype=torch.bfloat16, pin_memory=DEVICE.type != "cpu")
        scratch = torch.empty_like(original)
        h2d = _median_s(lambda: scratch.copy_(pinned, non_blocking=True), args.repeats)
        d2h = _median_s(lambda: pinned.copy_(scratch, non_blocking=True), args.repeats)

        routes = [
            ("device -> host (evict)", lambda: store.evict(ids, "host"), lambda: store.device_slots(ids), d2h),
            ("host -> device (device_slots)", lambda: store.device_slots(ids), lambda: store.evict(ids, "host"), h2d),
            ("host -> device (prefetch + wait)", lambda: store.prefetch(ids).wait(),
             lambda: store.evict(ids, "host"), h2d),
            ("device -> disk (evict)", lambda: store.evict(ids, "disk"), lambda: store.device_slots(ids), d2h),
            ("disk -> device (device_slots)", lambda: store.device_slots(ids), lambda: store.evict(ids, "disk"), h2d),
            ("disk -> device (prefetch + wait)", lambda: store.prefetch(ids).wait(),
             lambda: store.evict(ids, "disk"), h2d),
        ]
        for name, fn, setup, ceiling in routes:
            rows.append((name, _median_s(fn, args.repeats, setup), ceiling))
            _check(store, ids, original)

        hits = ids[: min(64, n)]
        store.device_slots(hits)
        calls = 200
        hit_s = _median_s(lambda: [store.device_slots(hits) for _ in range(calls)], args.repeats) / calls

        x = torch.randn(1024, 1024, device=DEVICE)
        compute = lambda: [x @ x for _ in range(8 if args.quick else 64)]  # noqa: E731
        compute_s = _median_s(compute, args.repeats)
        prefetch_s = _median_s(lambda: store.prefetch(ids).wait(), args.repeats, lambda: store.evict(ids, "host"))

        def both():
            handle = store.prefetch(ids)
            compute()
            handle.wait()

        both_s = _median_s(both, args.repeats, lambda: store.evict(ids, "host"))
        _check(store, ids, original)
        overlap = (compute_s + prefetch_s - both_s) / min(compute_s, prefetch_s)
        store.close()

    print(f"device: {DEVICE} ({torch.accelerator.current_accelerator() if accelerator else 'no accelerator'}), "
          f"{n} blocks of {list(BLOCK)} bf16 = {gb * 1e3:.1f} MB per move, median of {args.repeats}")
    print(f"{'route':36} {'ms':>9} {'GB/s':>8} {'ceiling GB/s':>13} {'% of ceiling':>13}")
    for name, s, ceiling in rows:
        print(f"{name:36} {s * 1e3:9.2f} {gb / s:8.2f} {gb / ceiling:13.2f} {100 * ceiling / s:12.1f}%")
    print(f"device_slots, {len(hits)} blocks already on the device: {hit_s * 1e6:.1f} us per call")
    print(f"prefetch from host beside compute: compute {compute_s * 1e3:.2f} ms, prefetch {prefetch_s * 1e3:.2f} ms, "
          f"both {both_s * 1e3:.2f} ms, overlap {100 * overlap:.0f}%")


DEVICE = torch.device("cpu")

if __name__ == "__main__":
    main()
