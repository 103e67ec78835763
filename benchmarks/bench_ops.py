"""Benchmark every op's cuda-triton kernels against the baselines users would write, in one run.

    python -m benchmarks.bench_ops                       # all ops, one table (needs a CUDA GPU)
    python -m benchmarks.bench_ops --ops rotary paged    # some of them
    python -m benchmarks.bench_ops --quick --markdown out.md

The ceilings (device copy bandwidth, bf16 GEMM rate, pinned host-to-device rate) are measured
first, in the same process, and every row's "% ceiling" refers to them. Each op's module in
benchmarks/ops/ checks its results against the contract's reference before it times anything.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from benchmarks import harness

OPS = ("fp4_matmul", "moe", "rotary", "paged")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_ops: not run: no CUDA GPU (these are GPU kernel benchmarks)", file=sys.stderr)
        return 2
    ceilings = harness.measure_ceilings()
    print(f"device: {ceilings.device}; torch {torch.__version__}; ceilings: copy {ceilings.copy_gbps:.0f} GB/s, "
          f"bf16 GEMM {ceilings.gemm_tflops:.0f} TFLOP/s, pinned H2D {ceilings.h2d_gbps:.1f} GB/s", flush=True)
    rows = []
    for name in args.ops:
        rows += importlib.import_module(f"benchmarks.ops.{name}").run(ceilings, quick=args.quick)
    table = harness.print_table(rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
