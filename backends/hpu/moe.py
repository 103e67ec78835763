"""moe_experts on Gaudi: ``torch.ops.hpu.mixture_of_experts``, the fused bf16 MoE kernel.

The kernel takes tokens with their top-k experts and weights and returns the weighted sum. The
contract's step 3 wants one output row per (expert-sorted) assignment, so each row goes in as its
own token with one expert and weight 1: ``hidden_states`` = the gathered rows ``[S, d]``,
``expert_routing_table`` = the row's expert ``[S, 1]`` int64, ``router_weights`` = ones ``[S, 1]``
bf16, ``w12`` = ``w_up`` split per expert (``[2F, d]``, gate rows first, as vLLM lays out w13),
``w3`` = ``w_down`` per expert (``[d, F]``), ``permuted_weights=True`` (``[out, in]``, nn.Linear
layout), ``activation="silu"``, ``experts_min=0``, ``experts_max=E-1`` (inclusive). Rows past
``offsets[E]`` (dropped) are computed with the last expert and zeroed.

MXFP4 experts are dequantized to bf16 first (vllm-gaudi's default; its native MXFP4 variant,
``mixture_of_experts.mxfp4_fused_weights`` behind ``HPU_MXFP4_NATIVE=1``, is not bound: its
argument layout is not published). Dequantizing at load time, once, is the model's choice; this
binding does it per call.
"""

from __future__ import annotations

import torch

from apt_hal import mxfp4


def supports(x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales, b_up, b_down,
             top_k, activation, alpha, limit) -> bool:
    return x.dtype == torch.bfloat16 and activation == "swiglu" and b_up is None and b_down is None


def experts(x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales, b_up, b_down,
            top_k, activation, alpha, limit):
    s = sorted_assignments.shape[0]
    if s == 0:
        return x.new_zeros((0, x.shape[1]))
    if w_up_scales is not None:
        w_up = mxfp4.dequantize(w_up, w_up_scales, torch.bfloat16)
        w_down = mxfp4.dequantize(w_down, w_down_scales, torch.bfloat16)
    num_experts = w_up.shape[0]
    row = torch.arange(s, device=x.device)
    expert = (torch.searchsorted(expert_offsets, row, right=True) - 1).clamp(max=num_experts - 1)
    y = torch.ops.hpu.mixture_of_experts(
        hidden_states=x[sorted_assignments.long() // top_k], expert_routing_table=expert.unsqueeze(1),
        router_weights=torch.ones((s, 1), dtype=x.dtype, device=x.device), w12=list(w_up.unbind(0)),
        w3=list(w_down.unbind(0)), permuted_weights=True, activation="silu", experts_min=0,
        experts_max=num_experts - 1)
    kept = (row < expert_offsets[-1]).unsqueeze(1)
    return torch.where(kept, y, torch.zeros((), dtype=y.dtype, device=x.device))
