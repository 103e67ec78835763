"""The four moe_dispatch steps on Ascend's MoE routing kernels.

* route: ``npu_moe_gating_top_k_softmax(logits, None, k)`` (A2/A3) or ``npu_moe_gating_top_k``
  with ``norm_type=0`` (softmax), one group (A5), on float32 logits: both return the top-k
  softmax probabilities. ``renormalize`` divides them by their sum, and so does "topk_softmax":
  a softmax over the k largest logits equals the top-k probabilities renormalized.
* permute: ``npu_moe_init_routing_v2`` sorts the assignments by expert (dropless,
  ``expert_tokens_num_type=1`` gives the per-expert counts). It is given one row per assignment
  in the contract's priority order (``K=1``, row ``j*T + t``), so its stable order inside an
  expert is the contract's; capacity is applied to its output with a few tensor ops.
* experts: two ``npu_grouped_matmul`` calls (up, down) over the expert-sorted rows with the
  per-expert row counts as ``group_list`` (``group_list_type=1``) and the weights as transposed
  views ``[E, in, out]``; biases and the activation run in float32 between them.
* combine: ``npu_moe_finalize_routing`` on float32 rows and weights, with
  ``expanded_src_to_dst_row`` indexed choice-major (``t + j*T``) as the op defines it.

Per-argument mapping: docs/npu.md.
"""

from __future__ import annotations

import torch
import torch_npu

from apt_hal.contracts.moe_dispatch import apply_activation

# npu_moe_init_routing_v2: expert_num is at most 10240 in count mode.
MAX_EXPERTS = 10240


# ---- route ------------------------------------------------------------------------------------


def supports_route(chip, router_logits, top_k, scoring, renormalize) -> bool:
    experts = router_logits.shape[1]
    if chip.router == "npu_moe_gating_top_k":
        return 2 < experts <= 2048  # its constraints for one group of experts
    return top_k <= 1024


def route(chip, router_logits, top_k, scoring, renormalize):
    logits = router_logits.float()
    if logits.shape[0] == 0:
        return logits.new_empty((0, top_k)), logits.new_empty((0, top_k), dtype=torch.int32)
    if chip.router == "npu_moe_gating_top_k":
        weights, ids, _ = torch_npu.npu_moe_gating_top_k(
            logits, top_k, k_group=1, group_count=1, group_select_mode=0, renorm=0, norm_type=0,
            out_flag=False, routed_scaling_factor=1.0, eps=1e-20)
    else:
        weights, ids, _ = torch_npu.npu_moe_gating_top_k_softmax(logits, None, k=top_k)
    if renormalize or scoring == "topk_softmax":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


# ---- permute ----------------------------------------------------------------------------------


def supports_permute(chip, topk_ids, num_experts, capacity) -> bool:
    return num_experts <= MAX_EXPERTS


def permute(chip, topk_ids, num_experts, capacity):
    t, k = topk_ids.shape
    s = t * k
    dev = topk_ids.device
    if s == 0:
        return (torch.empty(0, dtype=torch.int32, device=dev),
                torch.zeros(num_experts + 1, dtype=torch.int64, device=dev))
    by_priority = topk_ids.t().reshape(s, 1).to(torch.int32)  # row r = j*T + t
    # The kernel also gathers activation rows; moe_permute has none, so a one-column placeholder.
    placeholder = torch.zeros((s, 1), dtype=torch.int8, device=dev)
    _, sources, counts, _ = torch_npu.npu_moe_init_routing_v2(
        placeholder, by_priority, active_num=s, expert_num=num_experts, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, num_experts], row_idx_type=1)
    rows = sources.long()  # row_idx_type=1: entry i is the source row of sorted row i
    order = (rows % t) * k + rows // t  # row j*T + t is assignment t*k + j
    counts = counts.long()
    if capacity >= 0:
        order, counts = _apply_capacity(order, counts, capacity)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(counts, 0)])
    return order.to(torch.int32), offsets


def _apply_capacity(order, counts, capacity):
    """Keep each expert's first ``capacity`` rows (already in priority order); the dropped rows
    follow all kept ones, still in (expert, priority) order."""
    ends = torch.cumsum(counts, 0)
    row = torch.arange(order.shape[0], device=order.device)
    expert = torch.searchsorted(ends, row, right=True)
    rank = row - (ends - counts)[expert]
    dropped = (rank >= capacity).to(torch.int8)
    return order[torch.argsort(dropped, stable=True)], counts.clamp(max=capacity)


# ---- experts ----------------------------------------------------------------------------------


def supports_experts(chip, x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales,
                     b_up, b_down, top_k, activation, alpha, limit) -> bool:
    return w_up_scales is None  # MXFP4 experts: npu_grouped_matmul takes no E8M0 scales here


def _grouped_matmul(rows, weight, counts):
    """rows [S, in] @ weight[e]^T for each expert's run of rows; weight [E, out, in]."""
    return torch_npu.npu_grouped_matmul(
        [rows], [weight.transpose(1, 2)], group_list=counts, split_item=2, group_type=0,
        group_list_type=1, output_dtype=rows.dtype)[0]


def experts(chip, x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales,
            b_up, b_down, top_k, activation, alpha, limit):
    s = sorted_assignments.shape[0]
    if s == 0:
        return x.new_zeros((0, x.shape[1]))
    num_experts = w_up.shape[0]
    rows = x[sorted_assignments.long() // top_k]
    counts = expert_offsets[1:] - expert_offsets[:-1]
    row = torch.arange(s, device=x.device)
    expert = (torch.searchsorted(expert_offsets, row, right=True) - 1).clamp(max=num_experts - 1)
    h = _grouped_matmul(rows, w_up, counts).float()
    if b_up is not None:
        h = h + b_up.float()[expert]
    act = apply_activation(h, activation, alpha, limit).to(x.dtype)
    y = _grouped_matmul(act, w_down, counts).float()
    if b_down is not None:
        y = y + b_down.float()[expert]
    # Rows past the kept ones are outside every group: the kernel leaves them undefined.
    kept = (row < expert_offsets[-1]).unsqueeze(1)
    return torch.where(kept, y, torch.zeros((), device=x.device)).to(x.dtype)


# ---- combine ----------------------------------------------------------------------------------


def combine(chip, y, sorted_assignments, expert_offsets, topk_weights):
    t, k = topk_weights.shape
    s = t * k
    if t == 0:
        return y.new_zeros((0, y.shape[1]))
    row = torch.arange(s, device=y.device)
    kept = (row < expert_offsets[-1]).unsqueeze(1)
    # Dropped assignments must add exactly 0, whatever their rows of y hold.
    rows = torch.where(kept, y.float(), torch.zeros((), device=y.device))
    row_of = torch.empty(s, dtype=torch.long, device=y.device)
    row_of[sorted_assignments.long()] = row  # assignment t*k + j -> its row
    src_to_dst = row_of.view(t, k).t().reshape(s).to(torch.int32)  # indexed t + j*T
    out = torch_npu.npu_moe_finalize_routing(rows, None, None, None, topk_weights.float(), src_to_dst, None,
                                             drop_pad_mode=0, k=k)
    return out.to(y.dtype)
