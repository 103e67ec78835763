"""Benchmark harness shared by every op's benchmark: timing, ceilings, one table.

Timing: the calls to time are captured in one CUDA graph, each on its own input set (rotating
inputs so a small shape cannot live in L2 between calls), and the graph is replayed; the median
over replays divided by the number of calls is the time per call. This removes launch gaps that
would otherwise dominate decode shapes. Ceilings (device copy bandwidth, bf16 GEMM rate, pinned
host-to-device rate) are measured in the same run, so ratios and percentages compare like with like.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Optional, Sequence, Union

import torch


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    apt_hal_us: float
    baselines: dict  # name -> microseconds, or why the column has no time (e.g. "not installed")
    ceiling_pct: Optional[float] = None  # % of the relevant ceiling reached by apt_hal
    ceiling: str = ""  # which ceiling ("copy", "gemm", "h2d", "hbm-bytes")
    target: str = ""  # the target, e.g. ">= 3.0x bf16"
    met: Optional[bool] = None  # whether the target is met, judged by the caller from measured numbers


def time_calls(calls: Sequence[Callable[[], object]], replays: int = 20, warmup: int = 3,
               use_graph: bool = True) -> float:
    """Median microseconds per call of ``calls`` (each call usually on its own inputs). Without a
    CUDA GPU (the CPU smoke tests) the host clock times plain calls."""
    if not torch.cuda.is_available():
        return _host_time_calls(calls, replays, warmup)
    for _ in range(warmup):
        for c in calls:
            c()
    torch.cuda.synchronize()
    if use_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:  # warm the allocator on the capture stream
                c()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run = graph.replay
    else:
        def run():
            for c in calls:
                c()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def _host_time_calls(calls: Sequence[Callable[[], object]], replays: int, warmup: int) -> float:
    for _ in range(warmup):
        for c in calls:
            c()
    times = []
    for _ in range(replays):
        start = time.perf_counter()
        for c in calls:
            c()
        times.append((time.perf_counter() - start) * 1e6 / len(calls))
    return statistics.median(times)


def rotating(make_inputs: Callable[[], tuple], fn: Callable, bytes_per_set: int,
             l2_bytes: int = 60 << 20, max_sets: int = 16) -> list[Callable[[], object]]:
    """Calls of ``fn`` on enough distinct input sets that together they exceed the L2 cache twice."""
    n = max(1, min(max_sets, -(-2 * l2_bytes // max(bytes_per_set, 1))))
    sets = [make_inputs() for _ in range(n)]
    return [lambda s=s: fn(*s) for s in sets]


@dataclasses.dataclass
class Ceilings:
    copy_gbps: float  # device-to-device copy, bytes read + written
    gemm_tflops: float  # bf16 F.linear, M=N=K=8192
    h2d_gbps: float  # pinned host-to-device, 1 GiB
    device: str


def measure_host_ceilings() -> Ceilings:
    """The CPU smoke tests' stand-ins: a 64 MiB host copy and a float32 1024-cube matmul (no H2D)."""
    from benchmarks.floor import copy_bandwidth

    x = torch.randn(1024, 1024)
    gemm_us = _host_time_calls([lambda: x @ x], replays=3, warmup=1)
    return Ceilings(copy_gbps=copy_bandwidth(torch.device("cpu"), 1 << 26) / 1e9,
                    gemm_tflops=2 * 1024 ** 3 / gemm_us / 1e6, h2d_gbps=float("nan"), device="cpu")


def _time_copies(n: int) -> tuple[float, float]:
    """Microseconds for an n-byte device-to-device copy and an n-byte pinned host-to-device copy."""
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_us = time_calls([lambda: b.copy_(a)], replays=10, use_graph=False)
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h2d_us = time_calls([lambda: a.copy_(h, non_blocking=True)], replays=5, use_graph=False)
    return copy_us, h2d_us


def _time_gemm(size: int) -> float:
    """Microseconds for a bfloat16 size-cube matmul."""
    x = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return time_calls([lambda: torch.nn.functional.linear(x, w)], replays=10, use_graph=False)


def measure_ceilings() -> Ceilings:
    n = 1 << 30  # 1 GiB
    copy_us, h2d_us = _time_copies(n)
    gemm_us = _time_gemm(8192)
    # The helpers' buffers are freed on return; give their memory back before the benchmarks run.
    torch.cuda.empty_cache()
    return Ceilings(copy_gbps=2 * n / copy_us / 1e3, gemm_tflops=2 * 8192 ** 3 / gemm_us / 1e6,
                    h2d_gbps=n / h2d_us / 1e3, device=torch.cuda.get_device_name())


def print_table(rows: Sequence[Row]) -> str:
    """Print (and return) one table: op, shape, apt_hal time, each baseline, ratios, ceiling %."""
    names: list[str] = []
    for r in rows:
        for n in r.baselines:
            if n not in names:
                names.append(n)
    head = ["op", "shape", "apt_hal us"] + [f"{n} us" for n in names] + [f"vs {n}" for n in names] + \
           ["% ceiling", "target", "met"]
    body = []
    for r in rows:
        cells = [r.op, r.shape, f"{r.apt_hal_us:.1f}"]
        cells += [_time_cell(r.baselines.get(n)) for n in names]
        cells += ["" if isinstance(r.baselines.get(n, ""), str) else f"{r.baselines[n] / r.apt_hal_us:.2f}x"
                  for n in names]
        cells += [f"{r.ceiling_pct:.0f}% {r.ceiling}" if r.ceiling_pct is not None else "", r.target,
                  {None: "", True: "yes", False: "NO"}[r.met]]
        body.append(cells)
    return markdown_table(head, body)


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Print (and return) a markdown table of string cells, columns padded to their widest cell."""
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |" for cells in body]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _time_cell(value: Union[float, str, None]) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else f"{value:.1f}"


# ---- steady-state timing ------------------------------------------------------------------
# A memory-bound kernel of a few hundred microseconds timed right after the GPU sat idle runs while
# its clocks come back up, and a graph of one such call also times the replay's launch gap. So
# steady_us() fills each graph with at least GRAPH_US of work, keeps the GPU busy for WARM_US
# first, and times the variants in alternating rounds, reporting each one's median: a drift in
# clocks or temperature during a row reaches every variant alike.

GRAPH_US = 2000.0
WARM_US = 200_000.0
ROUNDS = 3


def _filled(calls: Sequence[Callable[[], object]]) -> tuple[list, float]:
    """``calls`` repeated so that one pass takes at least GRAPH_US; with the microseconds of a pass."""
    one_pass = time_calls(calls, replays=3, warmup=1) * len(calls)
    repeat = max(1, math.ceil(GRAPH_US / one_pass))
    return list(calls) * repeat, one_pass * repeat


def warm(calls: Sequence[Callable[[], object]], pass_us: float) -> None:
    """Keep the GPU busy with ``calls`` (one pass taking ``pass_us``) for about WARM_US."""
    time_calls(calls, replays=max(1, math.ceil(WARM_US / pass_us)), warmup=1)


def steady_us(variants: dict[str, Sequence[Callable[[], object]]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median microseconds per call of each variant (name -> calls), timed as the module says."""
    filled = {name: _filled(calls) for name, calls in variants.items()}
    warm(*next(iter(filled.values())))
    times: dict[str, list[float]] = {name: [] for name in filled}
    for _ in range(rounds):
        for name, (calls, _) in filled.items():
            times[name].append(time_calls(calls))
    return {name: statistics.median(t) for name, t in times.items()}
