"""Eager overhead of one op call through apt_hal, against calling the implementation directly.

A backend whose implementations return a preallocated result (they do no work) isolates what
apt_hal adds per call: argument binding, the contract's metadata checks (or none, with
``apt_hal.set_checks("none")``), the eager fast-path test and implementation selection. The torch dispatcher
path (``torch.ops.apt_hal.<op>``, what traced code and autograd use) is shown beside it.

    python benchmarks/overhead.py            # prints one table, microseconds per call
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import apt_hal
from apt_hal import mxfp4, ops, registry


def _timeit(fn, n: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean microseconds per call over ``n`` calls."""
    for _ in range(n // 10):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def _cases():
    torch.manual_seed(0)
    p, s = mxfp4.quantize(torch.randn(64, 64))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q, k = torch.randn(1, 4, 8, 64), torch.randn(1, 4, 2, 64)
    pos = torch.arange(4).unsqueeze(0)
    cache = torch.randn(16, 64)
    pool = torch.zeros(8, 4, 2, 8)
    return [
        ("fp4_matmul", ops.fp4_matmul, (x, p, s, None), x.new_empty(4, 64)),
        ("rotary", ops.rotary, (q, k, pos, cache, "neox"), (q.clone(), k.clone())),
        ("paged_gather", ops.paged_gather, (pool, torch.tensor([[0, 1]])), torch.empty(1, 2, 4, 2, 8)),
        ("moe_route", ops.moe_route, (torch.randn(4, 8), 2, "softmax_topk", True),
         (torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32))),
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000, help="calls per timing run (default 20000)")
    args = ap.parse_args(argv)

    registry.register_backend(registry.Backend(
        name="bench-null", device_type="cpu", probe=lambda: registry.Probe(True, "benchmark only"),
        implementations="builtins"), origin="benchmarks/overhead.py")
    rows = []
    for name, op, call_args, result in _cases():
        def null_impl(*a, _r=result):
            return _r

        null_impl.__signature__ = op.__signature__  # the registry checks parameter names
        registry.register_impl(op, "bench-null", null_impl, name="null")
        with apt_hal.use("bench-null", strict=True):
            direct = _timeit(lambda: null_impl(*call_args), args.calls)
            hal = _timeit(lambda: op(*call_args), args.calls)
            previous = apt_hal.set_checks("none")
            unchecked = _timeit(lambda: op(*call_args), args.calls)
            apt_hal.set_checks(previous)
            dispatcher = _timeit(lambda: op.overload(*call_args), args.calls // 4)
        rows.append((name, direct, hal - direct, unchecked - direct, dispatcher - direct))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per call "
          f"(median of 7 runs of {args.calls} calls)")
    print("overhead = time of the call minus time of calling the implementation directly")
    print("| op | implementation called directly | apt_hal.ops overhead, checks 'metadata' (default) "
          "| apt_hal.ops overhead, checks 'none' | torch.ops.apt_hal dispatcher overhead |")
    print("|---|---|---|---|---|")
    for name, direct, hal, unchecked, disp in rows:
        print(f"| {name} | {direct:.2f} | {hal:.2f} | {unchecked:.2f} | {disp:.2f} |")


if __name__ == "__main__":
    main()
