"""A fake ``torch_npu`` for glue tests: each op the npu bindings call, computed on whatever device
its tensors are on with the formula torch-npu 2.13.0's ``_op_plugin_docs.py`` gives for it, and
recorded with the arguments it was called with (``module.calls``).

Each op also enforces the documented constraints a binding could get wrong (layout, dtype, mode,
shapes), raising ``ValueError`` naming the constraint. Outputs the documentation leaves undefined
are filled with NaN, so a binding that reads them fails its test.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import types

import torch

from apt_hal import mxfp4

FLOAT4_E2M1FN_X2 = 296  # torch_npu's own dtype id for float4_e2m1fn_x2 (not a torch.dtype)


@dataclasses.dataclass
class Call:
    name: str
    args: tuple
    kwargs: dict


def require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"fake torch_npu: {what}")


def _a2_or_a3(device_name: str) -> bool:
    return device_name.startswith(("Ascend910B", "Ascend910_93"))


# ---- rotary -----------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "half":
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    require(rotate is None, "the rotate matrix is not modelled")
    require(input.dim() == 4 and input.shape[-1] % 2 == 0 and input.shape[-1] < 896,
            "input must be 4-D, D even, D < 896")
    require(rotary_mode in ("half", "interleave"), f"rotary_mode {rotary_mode!r}")
    require(r1.dtype == r2.dtype == input.dtype, "r1, r2 and input must share a dtype")
    if rotary_mode == "interleave":  # BSND input: r1/r2 only as 1S1D
        require(tuple(r1.shape) == (1, input.shape[1], 1, input.shape[3]),
                f"interleave needs r1 1S1D, got {tuple(r1.shape)}")
    return r1 * input + r2 * _rotate(input, rotary_mode)


def _apply_rotary_pos_emb(device_name):
    def npu_apply_rotary_pos_emb(query, key, cos, sin, *, layout="BSND", rotary_mode="half"):
        require(layout == "BSND" and query.dim() == key.dim() == 4, "layout BSND with 4-D query and key")
        d = query.shape[-1]
        require(tuple(cos.shape) == tuple(sin.shape) == (query.shape[0], query.shape[1], 1, d),
                 f"cos/sin must be (B, S, 1, D), got {tuple(cos.shape)}")
        require(query.dtype == key.dtype == cos.dtype == sin.dtype, "query, key, cos and sin must share a dtype")
        if _a2_or_a3(device_name):
            require(rotary_mode == "half" and d in (64, 128), "A2/A3: rotary_mode 'half' and D 64 or 128 only")
        else:
            require(rotary_mode in ("half", "interleave") and d <= 1024, "rotary_mode half/interleave, D <= 1024")
        query.copy_(cos * query + sin * _rotate(query, rotary_mode))  # documented: updated in place
        key.copy_(cos * key + sin * _rotate(key, rotary_mode))
        return query, key
    return npu_apply_rotary_pos_emb


# ---- moe --------------------------------------------------------------------------------------


def _softmax_topk(x: torch.Tensor, k: int):
    probs = torch.softmax(x.float(), dim=-1)
    vals, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    return probs, vals[:, :k], idx[:, :k].to(torch.int32)


def npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    require(x.dim() == 2 and finished is None, "2-D x, no 'finished' mask")
    require(0 < k <= min(x.shape[-1], 1024), f"k={k}")
    _, y, expert_idx = _softmax_topk(x, k)
    t = x.shape[0]
    row_idx = (torch.arange(k, device=x.device) * t).unsqueeze(0) + torch.arange(t, device=x.device).unsqueeze(1)
    return y.to(x.dtype), expert_idx, row_idx.to(torch.int32)


def npu_moe_gating_top_k(x, k, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                         eps=1e-20):
    require(bias is None and input_ids is None and tid2eid is None, "bias and hash routing are not modelled")
    require((k_group, group_count, renorm, norm_type) == (1, 1, 0, 0), "modelled: one group, softmax, renorm=0")
    require(2 < x.shape[-1] <= 2048 and 1 <= k <= x.shape[-1], f"E={x.shape[-1]}, k={k}")
    probs, y, expert_idx = _softmax_topk(x, k)
    return (y * routed_scaling_factor).to(x.dtype), expert_idx, probs


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                            expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                            quant_mode=-1, active_expert_range=(), row_idx_type=0):
    require(expert_idx.dtype == torch.int32 and expert_idx.dim() == 2, "expert_idx int32 (NUM_ROWS, K)")
    require(drop_pad_mode == 0 and quant_mode == -1, "modelled: dropless, unquantized")
    require(expert_tokens_num_type == 1 and expert_tokens_num_flag, "modelled: per-expert counts (type 1)")
    require(0 < expert_num <= 10240 and list(active_expert_range) == [0, expert_num], "expert_num, full range")
    flat = expert_idx.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # sorted row i comes from flat index order[i]
    k = expert_idx.shape[1]
    expanded_x = x[order // k]
    if row_idx_type == 1:
        expanded_row_idx = order
    else:
        expanded_row_idx = torch.empty_like(order)
        expanded_row_idx[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=expert_num).to(torch.int64)
    expanded_scale = torch.full((flat.numel(),), float("nan"), device=x.device)  # undefined without scale
    return expanded_x, expanded_row_idx.to(torch.int32), counts, expanded_scale


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       output_dtype=None, tuning_config=None):
    require(len(x) == 1 and len(weight) == 1 and weight[0].dim() == 3, "one x [M, K] and one weight [E, K, N]")
    require(group_type == 0 and split_item in (2, 3) and group_list_type in (0, 1), "group_type 0, one output")
    require(bias is None and scale is None and antiquant_scale is None, "modelled: unquantized, no bias")
    a, w = x[0], weight[0]
    require(a.shape[1] == w.shape[1] and a.dtype == w.dtype,
            f"x {tuple(a.shape)} {a.dtype} vs weight {tuple(w.shape)} {w.dtype}")
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    require(counts.dtype == torch.int64 and counts.numel() == w.shape[0], "group_list int64, one entry per expert")
    groups = torch.split(a, counts.tolist() + [a.shape[0] - int(counts.sum())])
    out = torch.cat([(x_e.float() @ w[e].float()) for e, x_e in enumerate(groups[:-1])]
                    + [torch.full((groups[-1].shape[0], w.shape[2]), float("nan"), device=a.device)])  # undefined rows
    out = out.to(output_dtype or a.dtype)
    return [out]


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1):
    rows = expanded_permuted_rows
    require(skip1 is None and skip2 is None and bias is None, "modelled: no skips, no bias")
    require(drop_pad_mode == 0 and expanded_src_to_dst_row.dtype == torch.int32, "dropless, int32 index")
    require(scales.dtype == rows.dtype and scales.shape[1] == k, "scales (NUM_ROWS, K) in the rows' dtype")
    t = scales.shape[0]
    dst = expanded_src_to_dst_row.long()
    out = torch.zeros((t, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    for j in range(k):
        out = out + scales[:, j:j + 1] * rows[dst[j * t:(j + 1) * t]]  # index i + j*NUM_ROWS
    return out


# ---- fp4 --------------------------------------------------------------------------------------


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                 weight_dtype=None):
    require(weight_dtype == FLOAT4_E2M1FN_X2 and weight.dtype == torch.uint8, "uint8 weight with weight_dtype float4")
    require(x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and x.numel() > 0, "x (M, K) bf16/fp16")
    k, n = x.shape[1], weight.shape[1]
    require(weight.shape[0] * 2 == k and weight.stride(0) == 1, "weight as the transposed view (K/2, N) packed along K")
    require(antiquant_group_size == 32 and antiquant_scale.dtype == torch.float8_e8m0fnu
             and tuple(antiquant_scale.shape) == (k // 32, n), "E8M0 scales (K/32, N), group size 32")
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        require(bias.dtype == want, f"bias must be {want} for {x.dtype} x")
    w = mxfp4.dequantize(weight.t(), antiquant_scale.view(torch.uint8).t(), torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---- paged ------------------------------------------------------------------------------------


def npu_scatter_pa_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, compress_lens=None,
                            compress_seq_offsets=None, seq_lens=None, cache_mode="PA_NZ"):
    require(cache_mode == "Norm", "cache_mode 'Norm' (ND pools)")
    for tokens, cache in ((key, key_cache), (value, value_cache)):
        require(tokens.dim() == 3 and cache.dim() == 4 and tuple(cache.shape[2:]) == tuple(tokens.shape[1:]),
                 "tokens (T, H, D) and cache (blocks, block_size, H, D)")
        require(tokens.is_contiguous() and cache.is_contiguous() and tokens.dtype == cache.dtype,
                "contiguous, one dtype")
    slots = slot_mapping.long()
    require(bool(((slots >= 0) & (slots < key_cache.shape[0] * key_cache.shape[1])).all()), "slots in range")
    for tokens, cache in ((key, key_cache), (value, value_cache)):
        cache.view(-1, *cache.shape[2:])[slots] = tokens


def npu_gather_pa_kv_cache(key_cache, value_cache, block_tables, seq_lens, key, value, *, seq_offset=None,
                           is_seq_lens_cumsum=False):
    require(seq_offset is None and not is_seq_lens_cumsum, "modelled: plain per-sequence lengths")
    require(block_tables.dtype == torch.int32 and block_tables.dim() == 2, "block_tables int32 (B, M)")
    blocks = block_tables.long()
    require(bool(((blocks >= 0) & (blocks < key_cache.shape[0])).all()), "block ids in range")
    for cache, out in ((key_cache, key), (value_cache, value)):
        tokens = [cache[blocks[b]].reshape(-1, *cache.shape[2:])[:n] for b, n in enumerate(seq_lens.tolist())]
        out.copy_(torch.cat(tokens))


# ---- the module -------------------------------------------------------------------------------

_OPS = (npu_rotary_mul, npu_moe_gating_top_k_softmax, npu_moe_gating_top_k, npu_moe_init_routing_v2,
        npu_grouped_matmul, npu_moe_finalize_routing, npu_weight_quant_batchmatmul, npu_scatter_pa_kv_cache,
        npu_gather_pa_kv_cache)


def make(device_name: str = "Ascend910B3") -> types.ModuleType:
    """A fresh fake ``torch_npu`` module reporting ``device_name``; its calls go to ``.calls``."""
    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    mod.calls = []
    mod.float4_e2m1fn_x2 = FLOAT4_E2M1FN_X2
    mod.npu = types.SimpleNamespace(get_device_name=lambda device=None: device_name)

    def recording(fn, name):
        def op(*args, **kwargs):
            mod.calls.append(Call(name, args, kwargs))
            return fn(*args, **kwargs)
        return op

    for fn in (*_OPS, _apply_rotary_pos_emb(device_name)):
        setattr(mod, fn.__name__, recording(fn, fn.__name__))
    return mod
