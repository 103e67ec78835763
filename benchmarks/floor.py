"""The weight-bytes floor of a decode step: the bytes of every weight one step must read, over the
device's copy bandwidth measured in the same run.

Issue 16 measures model decode at batch 1 against this floor: a step reads each weight once, and
no kernel reads memory faster than a device-to-device copy does. For MoE models only the experts a
batch-1 step touches count (top_k of n_experts per layer); an untied embedding table counts for
nothing (a lookup reads one row).
"""

from __future__ import annotations

import statistics
import time

import torch

# Names of the per-expert tensors (weights, MXFP4 scales, biases): a batch-1 step reads top_k of them.
EXPERT_TENSORS = ("w_up", "w_down", "b_up", "b_down", "experts")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes`` (median of ``repeats``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page faults, clocks
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def weight_bytes_per_step(model) -> int:
    """Bytes of the weights one batch-1 decode step of an apt_hal model must read."""
    cfg = model.config
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed" in name and not cfg.tie_embeddings:
            continue  # an embedding lookup reads one row, not the table
        n = t.numel() * t.element_size()
        if cfg.n_experts and any(k in name.split(".")[-1] for k in EXPERT_TENSORS):
            n = n * cfg.top_k // cfg.n_experts
        total += n
    return total
