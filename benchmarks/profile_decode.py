"""Where a batch-1 decode step's time goes: GPU busy time vs gaps, and kernel time by kind.

Before optimising model decode (issue 16 asks for >= 65% of the weight-bytes floor), this profiles
generation of the 1B presets with random bf16 weights (and their MXFP4 copies) on the GPU:

* the wall time per decoded token (generate with device graphs, as users run it);
* the weight-bytes floor: the bytes of every weight a step reads (for MoE, only the experts it
  touches: top_k of n_experts per layer at batch 1) over the device-to-device copy bandwidth
  measured in the same run;
* from a torch.profiler trace of the decode steps, the GPU busy time (the union of kernel
  intervals) and the gaps between kernels, and, from a second trace without device graphs, the
  kernel time per step grouped by kind.

    python -m benchmarks.profile_decode                    # apt-dense-1b and apt-moe-1b, bf16 and MXFP4
    python -m benchmarks.profile_decode --models dense --decode-len 32
"""

from __future__ import annotations

import argparse
import collections
import copy
import time

import torch
import triton

import apt_hal
from apt_hal.models import GenerationConfig, ModelConfig, build_model, convert_experts, generate
from apt_hal.nn import convert_model_to_mxfp4
from benchmarks.floor import copy_bandwidth, weight_bytes_per_step
from benchmarks.streaming import covered  # this one runs as a script too: it keeps the helper

# Kernel name fragments -> kind (first match wins); what matches none is "other".
KINDS = (("fp4", "fp4_matmul"), ("split_k", "fp4_matmul"), ("moe", "moe"), ("route", "moe"),
         ("permute", "moe"), ("combine", "moe"), ("rotary", "rotary"), ("copy_rows", "paged"),
         ("gather_rows", "paged"), ("softmax", "attention softmax"), ("gemv", "cuBLAS gemv/gemm"),
         ("gemm", "cuBLAS gemv/gemm"), ("nvjet", "cuBLAS gemv/gemm"), ("xmma", "cuBLAS gemv/gemm"),
         ("cutlass", "cuBLAS gemv/gemm"), ("splitKreduce", "cuBLAS gemv/gemm"),
         ("reduce", "reductions (norms, sampling)"),
         ("elementwise", "elementwise"), ("vectorized", "elementwise"), ("index", "indexing"),
         ("scatter", "indexing"), ("gather", "indexing"), ("copy", "copies"))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for frag, k in KINDS if frag.lower() in low), "other")


def wall_per_token(model, prompt, decode_len: int, graphs: bool) -> float:
    def run(n):
        generate(model, prompt, GenerationConfig(max_new_tokens=n, greedy=True, graphs=graphs))
    run(1 + decode_len)  # warm-up: compilation, graph capture
    apt_hal.synchronize()
    t0 = time.perf_counter()
    run(1)
    apt_hal.synchronize()
    t1 = time.perf_counter()
    run(1 + decode_len)
    apt_hal.synchronize()
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / decode_len


def trace(model, prompt, decode_len: int, graphs: bool):
    """(GPU busy seconds, kernel seconds by kind, kernel seconds by name, kernels seen) over the
    decode steps, from one profiled generation (prefill subtracted by profiling it alone)."""
    def kernels(n):
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            generate(model, prompt, GenerationConfig(max_new_tokens=n, greedy=True, graphs=graphs))
            apt_hal.synchronize()
        return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    def busy(events):
        return covered([(e.time_range.start, e.time_range.end) for e in events]) / 1e6

    generate(model, prompt, GenerationConfig(max_new_tokens=2, greedy=True, graphs=graphs))  # warm-up
    first, full = kernels(1), kernels(1 + decode_len)
    by_kind, by_name = collections.Counter(), collections.Counter()
    for e in full:
        by_kind[kind_of(e.name)] += e.time_range.elapsed_us() / 1e6
        by_name[e.name[:70]] += e.time_range.elapsed_us() / 1e6
    for e in first:
        by_kind[kind_of(e.name)] -= e.time_range.elapsed_us() / 1e6
        by_name[e.name[:70]] -= e.time_range.elapsed_us() / 1e6
    return busy(full) - busy(first), by_kind, by_name, len(full) - len(first)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--no-mxfp4", action="store_true")
    args = ap.parse_args(argv)
    device = apt_hal.get_device()
    if device.type != "cuda":
        raise SystemExit("profile_decode needs a CUDA GPU (it reads CUDA kernel times from torch.profiler)")
    bw = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__} triton {triton.__version__}; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s (bytes read + written); prompt {args.prompt_len}, "
          f"{args.decode_len} decoded tokens, batch 1")
    rows = []
    for family in args.models:
        cfg = ModelConfig.preset(f"apt-{family}-1b", dtype="bfloat16")
        torch.manual_seed(0)
        model = build_model(cfg, device=device).eval()
        variants = [("bf16", model)]
        if not args.no_mxfp4:
            q = copy.deepcopy(model)
            if cfg.n_experts:
                convert_experts(q, True)
            convert_model_to_mxfp4(q, exclude=("lm_head", "router"))
            variants.append(("mxfp4", q))
        torch.manual_seed(2)
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len)).tolist()
        for weights, m in variants:
            floor = weight_bytes_per_step(m) / bw  # a step reads its weights once, at the copy's memory throughput
            wall = wall_per_token(m, prompt, args.decode_len, graphs=True)
            busy_g, _, _, seen_g = trace(m, prompt, args.decode_len, graphs=True)
            busy_e, kinds, names, _ = trace(m, prompt, args.decode_len, graphs=False)
            n = args.decode_len
            rows.append((f"apt-{family}-1b", weights, wall, floor, busy_g / n, seen_g / n, busy_e / n, kinds, names))
    print()
    print("| model | weights | wall/token (graphs) | tok/s | floor | % of floor | GPU busy/token (graphs) | "
          "gaps (graphs) | kernels/token | GPU busy/token (no graphs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, weights, wall, floor, busy_g, seen_g, busy_e, _, _ in rows:
        print(f"| {model} | {weights} | {wall * 1e6:.0f} us | {1 / wall:.0f} | {floor * 1e6:.0f} us | "
              f"{100 * floor / wall:.0f}% | {busy_g * 1e6:.0f} us | {(wall - busy_g) * 1e6:.0f} us | "
              f"{seen_g:.0f} | {busy_e * 1e6:.0f} us |")
    for model, weights, *_, kinds, names in rows:
        n = args.decode_len
        total = sum(kinds.values())
        print(f"\n{model} {weights}: kernel time per decoded token without graphs, by kind "
              f"(total {total / n * 1e6:.0f} us)")
        for k, s in kinds.most_common():
            print(f"  {k:<32} {s / n * 1e6:8.1f} us  {100 * s / total:5.1f}%")
        print("  top kernels:")
        for k, s in names.most_common(8):
            print(f"    {s / n * 1e6:8.1f} us  {k}")


if __name__ == "__main__":
    main()
