"""The moe_dispatch contract and its four steps (route, permute, experts, combine), through
apt_hal.ops, checked against hand-worked cases, plain-Python restatements of the spec, a dense
differentiable PyTorch MoE, and Hugging Face's Mixtral and gpt-oss MoE blocks built locally."""

import math

import pytest
import torch
import torch.nn.functional as F

import apt_hal
from apt_hal import mxfp4, ops

FP32 = dict(rtol=1e-5, atol=1e-5)  # float32 arithmetic in a different order (fp32 assert_close scale)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_experts(e, d, f, *, gated=True, bias=True, seed=0, scale=0.3):
    g = gen(seed)
    u = 2 * f if gated else f
    w_up = torch.randn(e, u, d, generator=g) * scale
    w_down = torch.randn(e, d, f, generator=g) * scale
    b_up = torch.randn(e, u, generator=g) * scale if bias else None
    b_down = torch.randn(e, d, generator=g) * scale if bias else None
    return w_up, w_down, b_up, b_down


def plain_moe(x, logits, w_up, w_down, b_up=None, b_down=None, *, top_k, scoring="softmax_topk",
              renormalize=False, activation="swiglu", alpha=1.702, limit=7.0):
    """The spec's math written densely, token by choice, with differentiable torch ops."""
    x = x.reshape(-1, x.shape[-1]).float()
    logits = logits.reshape(-1, logits.shape[-1]).float()
    probs = logits.softmax(-1)
    if scoring == "softmax_topk":
        ids = probs.topk(top_k).indices
        weights = probs.gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:
        ids = logits.topk(top_k).indices
        weights = logits.gather(1, ids).softmax(-1)
    h = torch.einsum("tkud,td->tku", w_up[ids].float(), x)
    if b_up is not None:
        h = h + b_up[ids].float()
    if activation == "swiglu":
        half = h.shape[-1] // 2
        act = F.silu(h[..., :half]) * h[..., half:]
    elif activation == "gelu":
        act = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    else:
        gate, up = h[..., 0::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
        act = (up + 1) * gate * torch.sigmoid(alpha * gate)
    y = torch.einsum("tkdf,tkf->tkd", w_down[ids].float(), act)
    if b_down is not None:
        y = y + b_down[ids].float()
    out = (weights.unsqueeze(-1) * y).sum(1)
    e = logits.shape[1]
    f = torch.zeros(e).index_add_(0, ids.reshape(-1), torch.ones(ids.numel())) / ids.numel()
    lb = e * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return out, weights, ids, lb, z


# ---- 1. route --------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_routing(renormalize):
    logits = torch.randn(7, 6, generator=gen(1))
    weights, ids = ops.moe_route(logits, 3, "softmax_topk", renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (7, 3)
    for t, row in enumerate(logits.double().tolist()):
        z = sum(math.exp(v) for v in row)
        probs = [math.exp(v) / z for v in row]
        best = sorted(range(6), key=lambda e: -probs[e])[:3]
        expect = [probs[e] for e in best]
        if renormalize:
            expect = [p / sum(expect) for p in expect]
        assert ids[t].tolist() == best
        torch.testing.assert_close(weights[t].double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_topk_softmax_routing_and_renormalize_changes_nothing():
    logits = torch.randn(7, 6, generator=gen(2))
    weights, ids = ops.moe_route(logits, 2, "topk_softmax", False)
    for t, row in enumerate(logits.double().tolist()):
        best = sorted(range(6), key=lambda e: -row[e])[:2]
        z = sum(math.exp(row[e]) for e in best)
        assert ids[t].tolist() == best
        torch.testing.assert_close(weights[t].double(), torch.tensor([math.exp(row[e]) / z for e in best],
                                                                     dtype=torch.float64), rtol=1e-6, atol=1e-7)
    w2, ids2 = ops.moe_route(logits, 2, "topk_softmax", True)
    assert torch.equal(w2, weights) and torch.equal(ids2, ids)


@pytest.mark.parametrize("scoring", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_lower_expert_index(scoring, dtype):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, -1.0, 0.0, -1.0, 5.0],
                           [-1.0, 7.0, -1.0, -1.0, 7.0]], dtype=dtype)
    _, ids = ops.moe_route(logits, 3, scoring, False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [4, 0, 2], [1, 4, 0]]


def test_route_accepts_half_precision_logits_computing_in_float32():
    logits = torch.randn(5, 4, generator=gen(3)).to(torch.bfloat16)
    w, ids = ops.moe_route(logits, 2, "softmax_topk", True)
    w32, ids32 = ops.moe_route(logits.float(), 2, "softmax_topk", True)
    assert w.dtype == torch.float32 and torch.equal(w, w32) and torch.equal(ids, ids32)


def test_route_errors():
    logits = torch.randn(4, 5)
    bad = logits.clone()
    bad[2, 1] = math.nan
    with pytest.raises(apt_hal.ContractError, match=r"moe_route: argument 'router_logits' contains NaN"):
        ops.moe_route(bad, 2)
    for k in (0, 6):
        with pytest.raises(apt_hal.ContractError, match=rf"argument 'top_k' must be in \[1, E=5\], got {k}"):
            ops.moe_route(logits, k)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'scoring' must be one of .*'softmax'"):
        ops.moe_route(logits, 2, "softmax")
    with pytest.raises(apt_hal.ContractError, match=r"argument 'router_logits' must have 2 dimensions"):
        ops.moe_route(logits[None], 2)


# ---- 2. permute ------------------------------------------------------------------------------


def spec_permute(ids, num_experts, capacity):
    """Sorted assignments and offsets by the spec's words, in plain Python."""
    t, k = len(ids), len(ids[0])
    by_expert = [[] for _ in range(num_experts)]
    for a in sorted(range(t * k), key=lambda a: (a % k, a // k)):  # first choices by token, then second...
        by_expert[ids[a // k][a % k]].append(a)
    cap = None if capacity < 0 else capacity
    kept = [a for rows in by_expert for a in rows[:cap]]
    dropped = [a for rows in by_expert for a in rows[cap:]] if cap is not None else []
    offsets = [0]
    for rows in by_expert:
        offsets.append(offsets[-1] + len(rows[:cap]))
    return kept + dropped, offsets


def random_ids(t, k, e, seed):
    g = gen(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)


@pytest.mark.parametrize("capacity", [-1, 0, 1, 2, 3, 100])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_permute_matches_the_priority_rule(capacity, index_dtype):
    ids = random_ids(11, 3, 5, seed=4)
    order, offsets = ops.moe_permute(ids.to(index_dtype), 5, capacity)
    assert order.dtype == torch.int32 and offsets.dtype == torch.int64
    exp_order, exp_offsets = spec_permute(ids.tolist(), 5, capacity)
    assert order.tolist() == exp_order and offsets.tolist() == exp_offsets
    counts = torch.bincount(ids.reshape(-1).long(), minlength=5)
    kept = counts if capacity < 0 else counts.clamp(max=capacity)
    assert torch.equal(offsets[1:] - offsets[:-1], kept)  # each expert keeps min(count, C)


def test_capacity_drops_by_priority_hand_worked():
    # Assignments a = t*2 + j. Expert 0 gets a0, a2, a6 (first choices) and a5 (a second choice):
    # capacity 2 keeps a0, a2. Expert 1 gets a4 (first choice) before a1, a7: keeps a4, a1.
    # Expert 2 keeps a3. Dropped, in (expert, priority) order: a6, a5, a7.
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]], dtype=torch.int32)
    order, offsets = ops.moe_permute(ids, 3, 2)
    assert order.tolist() == [0, 2, 4, 1, 3, 6, 5, 7]
    assert offsets.tolist() == [0, 2, 4, 5]


def test_permute_errors():
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    for bad in (-1, 4):
        message = rf"argument 'topk_ids' must hold values in \[0, 4\), found {bad}"
        with pytest.raises(apt_hal.ContractError, match=message):
            ops.moe_permute(torch.tensor([[0, bad]], dtype=torch.int32), 4, -1)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'capacity' must be -1 \(dropless\) or >= 0, got -2"):
        ops.moe_permute(ids, 4, -2)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'num_experts' must be positive, got 0"):
        ops.moe_permute(ids, 0, -1)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'topk_ids' must have dtype int32 or int64, got float32"):
        ops.moe_permute(ids.float(), 4, -1)


# ---- 3. experts ------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_one_expert_top1_is_a_dense_ffn(activation):
    d, f = 16, 24
    w_up, w_down, b_up, b_down = random_experts(1, d, f, gated=activation == "swiglu", seed=5)
    x = torch.randn(2, 3, d, generator=gen(6))
    out = ops.moe_dispatch(x, torch.zeros(2, 3, 1), w_up, w_down, top_k=1, activation=activation,
                           b_up=b_up, b_down=b_down)
    h = F.linear(x, w_up[0], b_up[0])
    act = F.silu(h[..., :f]) * h[..., f:] if activation == "swiglu" else F.gelu(h)
    dense = F.linear(act, w_down[0], b_down[0])
    assert out.output.shape == x.shape
    torch.testing.assert_close(out.output, dense, **FP32)
    assert out.topk_weights.eq(1).all() and out.tokens_per_expert.tolist() == [6] and out.dropped.item() == 0


def _hf_block(module, seed):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(seed)) * 0.5)
            seed += 1
    return module.eval()


def test_equals_transformers_mixtral_sparse_moe_block():
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2)
    config._experts_implementation = "eager"  # the reference loop in modeling_mixtral.py
    block = _hf_block(MixtralSparseMoeBlock(config), seed=7)
    x = torch.randn(2, 5, 32, generator=gen(8))
    with torch.no_grad():
        expected = block(x)
        logits = F.linear(x, block.gate.weight)
        # Each expert's gate_up_proj is cat(w1, w3) along the output dim, down_proj is w2: the
        # apt_hal layout [E, 2F, d] / [E, d, F] with "swiglu" (gate first).
        out = ops.moe_dispatch(x, logits, block.experts.gate_up_proj, block.experts.down_proj, top_k=2,
                               scoring="softmax_topk", renormalize=True, activation="swiglu")
    torch.testing.assert_close(out.output, expected, **FP32)


def test_equals_transformers_gpt_oss_mlp():
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    # A small swiglu_limit so that the clamps of gate and up really act on this data.
    config = GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=5, num_experts_per_tok=2,
                          swiglu_limit=1.5, swiglu_alpha=1.3)
    config._experts_implementation = "eager"
    mlp = _hf_block(GptOssMLP(config), seed=9)
    x = torch.randn(2, 6, 32, generator=gen(10))
    experts = mlp.experts
    # transformers up to 5.17 hard-code alpha 1.702 and limit 7.0 here, ignoring the config.
    experts.alpha, experts.limit = config.swiglu_alpha, config.swiglu_limit
    with torch.no_grad():
        expected, scores = mlp(x)
        logits = F.linear(x, mlp.router.weight, mlp.router.bias)
        # gpt-oss stores [E, in, out] (x @ W); apt_hal takes nn.Linear's [E, out, in]. Its gate_up
        # columns interleave gate and up, which is what "gpt_oss_swiglu" reads.
        out = ops.moe_dispatch(x, logits, experts.gate_up_proj.transpose(1, 2).contiguous(),
                               experts.down_proj.transpose(1, 2).contiguous(), top_k=2, scoring="topk_softmax",
                               activation="gpt_oss_swiglu", b_up=experts.gate_up_proj_bias,
                               b_down=experts.down_proj_bias, alpha=config.swiglu_alpha, limit=config.swiglu_limit)
        h = x.reshape(-1, 32) @ experts.gate_up_proj + experts.gate_up_proj_bias[:, None]
    assert (h[..., 0::2] > 1.5).any() and (h[..., 1::2].abs() > 1.5).any()  # the clamps are exercised
    torch.testing.assert_close(out.output, expected, **FP32)
    torch.testing.assert_close(out.topk_weights, scores, **FP32)


def test_mxfp4_experts_equal_experts_on_the_dequantized_weights():
    d, f, e = 64, 32, 4
    w_up, w_down, b_up, b_down = random_experts(e, d, f, seed=11)
    (up_p, up_s), (down_p, down_s) = mxfp4.quantize(w_up), mxfp4.quantize(w_down)
    x = torch.randn(9, d, generator=gen(12)).to(torch.bfloat16)
    logits = torch.randn(9, e, generator=gen(13))
    kw = dict(top_k=2, scoring="topk_softmax", activation="gpt_oss_swiglu", b_up=b_up.bfloat16(),
              b_down=b_down.bfloat16())
    quant = ops.moe_dispatch(x, logits, up_p, down_p, w_up_scales=up_s, w_down_scales=down_s, **kw)
    dense = ops.moe_dispatch(x, logits, mxfp4.dequantize(up_p, up_s, torch.bfloat16),
                             mxfp4.dequantize(down_p, down_s, torch.bfloat16), **kw)
    # MXFP4 values are exact in bfloat16 and both compute in float32: the same numbers.
    assert quant.output.dtype == torch.bfloat16
    torch.testing.assert_close(quant.output, dense.output, rtol=0, atol=0)


def test_experts_without_tokens():
    d, f, e = 16, 8, 4
    w_up, w_down, b_up, b_down = random_experts(e, d, f, seed=14)
    x = torch.randn(5, d, generator=gen(15))
    logits = torch.randn(5, e, generator=gen(16))
    logits[:, [0, 2]] += 20.0  # every token picks experts 0 and 2
    out = ops.moe_dispatch(x, logits, w_up, w_down, top_k=2, b_up=b_up, b_down=b_down)
    assert out.tokens_per_expert.tolist() == [5, 0, 5, 0]
    expected, *_ = plain_moe(x, logits, w_up, w_down, b_up, b_down, top_k=2)
    torch.testing.assert_close(out.output, expected, **FP32)


def test_an_empty_batch():
    # No tokens (an idle rank, an empty decode step): an empty output, nothing routed.
    w_up, w_down, b_up, b_down = random_experts(4, 16, 8, seed=32)
    out = ops.moe_dispatch(torch.randn(2, 0, 16), torch.randn(2, 0, 4), w_up, w_down, top_k=2, b_up=b_up,
                           b_down=b_down)
    assert out.output.shape == (2, 0, 16) and out.topk_ids.shape == (0, 2)
    assert out.tokens_per_expert.tolist() == [0, 0, 0, 0] and out.dropped.item() == 0
    # The auxiliary losses are defined as 0 for no tokens: a NaN would poison the training loss.
    assert out.load_balance_loss.item() == 0 and out.z_loss.item() == 0


def test_experts_errors():
    d, f, e = 64, 32, 2
    w_up, w_down, _, _ = random_experts(e, d, f, bias=False, seed=17)
    (up_p, up_s), (down_p, _) = mxfp4.quantize(w_up), mxfp4.quantize(w_down)
    x = torch.randn(3, d)
    order, offsets = ops.moe_permute(torch.zeros(3, 1, dtype=torch.int32), e, -1)
    with pytest.raises(apt_hal.ContractError, match="give both 'w_up_scales' and 'w_down_scales'"):
        ops.moe_experts(x, order, offsets, up_p, down_p, up_s, None)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'w_up' must have dtype float32, got bfloat16"):
        ops.moe_experts(x, order, offsets, w_up.bfloat16(), w_down)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'b_up' must have shape \[2, 64\]"):
        ops.moe_experts(x, order, offsets, w_up, w_down, b_up=torch.zeros(2, 32))
    with pytest.raises(apt_hal.ContractError, match=r"argument 'expert_offsets' must have size 3"):
        ops.moe_experts(x, order, offsets[:2], w_up, w_down)


# ---- 4. combine ------------------------------------------------------------------------------


def test_combine_sums_in_j_order():
    # Token 0 chooses experts 2, 1, 0, so its rows come in the reverse of j order. Summed in j order
    # (2^24 + 1) - 2^24 = 0 in float32; summed in row order it would be (-2^24 + 1) + 2^24 = 1.
    ids = torch.tensor([[2, 1, 0]], dtype=torch.int32)
    order, offsets = ops.moe_permute(ids, 3, -1)
    assert order.tolist() == [2, 1, 0]
    y = torch.tensor([[-2.0 ** 24], [1.0], [2.0 ** 24]])  # rows of assignments j=2, j=1, j=0
    out = ops.moe_combine(y, order, offsets, torch.ones(1, 3))
    assert out.tolist() == [[0.0]]


def test_combine_ignores_dropped_assignments():
    # Capacity 1: expert 0 keeps token 0's first choice, expert 1 token 0's second choice; tokens
    # 1 and 2 lose both. Rows of dropped assignments hold NaN here: they must not be read.
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]], dtype=torch.int32)
    order, offsets = ops.moe_permute(ids, 2, 1)
    assert order[:2].tolist() == [0, 1] and offsets.tolist() == [0, 1, 2]
    y = torch.full((6, 4), math.nan)
    y[0], y[1] = torch.arange(4.0), 10 * torch.arange(4.0)
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    out = ops.moe_combine(y, order, offsets, weights)
    assert out.tolist() == [(0.75 * torch.arange(4.0) + 2.5 * torch.arange(4.0)).tolist(), [0.0] * 4, [0.0] * 4]


def test_dispatch_with_capacity_reports_drops_and_zeroes_fully_dropped_tokens():
    d, f, e, t = 16, 8, 4, 12
    w_up, w_down, _, _ = random_experts(e, d, f, bias=False, seed=18)
    x = torch.randn(t, d, generator=gen(19))
    logits = torch.randn(t, e, generator=gen(20))
    logits[:, 0] += 20.0  # every token picks experts 0 then 1: the last tokens lose both choices
    logits[:, 1] += 10.0
    out = ops.moe_dispatch(x, logits, w_up, w_down, top_k=2, capacity_factor=1.0)
    cap = math.ceil(1.0 * t * 2 / e)
    assert (out.tokens_per_expert <= cap).all()
    assert out.dropped.item() == t * 2 - out.tokens_per_expert.sum().item() > 0
    order, _ = spec_permute(out.topk_ids.tolist(), e, cap)
    kept = torch.zeros(t * 2, dtype=torch.bool)
    kept[order[:out.tokens_per_expert.sum()]] = True
    kept = kept.reshape(t, 2)
    # The expected output: the dense per-choice FFN, weighted, over the kept choices only.
    h = torch.einsum("tkud,td->tku", w_up[out.topk_ids.long()], x)
    act = F.silu(h[..., :f]) * h[..., f:]
    y = torch.einsum("tkdf,tkf->tkd", w_down[out.topk_ids.long()], act)
    expected = (torch.where(kept, out.topk_weights, 0.0).unsqueeze(-1) * y).sum(1)
    torch.testing.assert_close(out.output, expected, **FP32)
    lost = (~kept).all(1)
    assert lost.tolist() == [False] * 6 + [True] * 6
    assert (out.output[lost] == 0).all() and (out.output[~lost] != 0).all()


# ---- losses ----------------------------------------------------------------------------------


def test_losses_match_hand_formulas():
    rows = [[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [0.0, 0.0, 3.0], [-2.0, 1.0, 0.5]]
    logits = torch.tensor(rows)
    out = ops.moe_dispatch(torch.randn(4, 8), logits, *random_experts(3, 8, 4, bias=False, seed=21)[:2], top_k=1)
    probs = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in rows]
    top1 = [max(range(3), key=lambda e: p[e]) for p in probs]  # experts 2, 0, 2, 1
    f = [top1.count(e) / 4 for e in range(3)]
    p_mean = [sum(p[e] for p in probs) / 4 for e in range(3)]
    lb = 3 * sum(fe * pe for fe, pe in zip(f, p_mean))
    z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in rows) / 4
    assert out.topk_ids.reshape(-1).tolist() == top1 == [2, 0, 2, 1]
    assert out.load_balance_loss.item() == pytest.approx(lb, rel=1e-6)
    assert out.z_loss.item() == pytest.approx(z, rel=1e-6)


def test_load_balance_loss_is_one_under_uniform_routing():
    """LB = E * sum_e f_e P_e with sum_e f_e = sum_e P_e = 1. If either f or P is uniform (1/E each),
    LB = E * (1/E) * 1 = 1, whatever the other is. With top-1 routing where every token sends
    probability ~1 to one expert, f_0 = P_0 ~ 1 and LB ~ E, its maximum."""
    e, d = 4, 8
    w_up, w_down, _, _ = random_experts(e, d, 4, bias=False, seed=22)
    x = torch.randn(8, d, generator=gen(23))

    def lb(logits, k):
        return ops.moe_dispatch(x, logits, w_up, w_down, top_k=k).load_balance_loss.item()

    uniform_p = torch.zeros(8, e)  # P uniform; the ties send every token to experts 0..k-1
    assert lb(uniform_p, 1) == pytest.approx(1.0, rel=1e-6) and lb(uniform_p, 2) == pytest.approx(1.0, rel=1e-6)
    uniform_f = 3.0 * torch.eye(e).repeat(2, 1) + torch.randn(8, e, generator=gen(24)) * 0.1  # 2 tokens per expert
    assert lb(uniform_f, 1) == pytest.approx(1.0, rel=1e-6)
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 30.0
    assert lb(collapsed, 1) == pytest.approx(e, rel=1e-6)


def test_load_balance_loss_counts_assignments_before_capacity():
    e, d = 4, 8
    w_up, w_down, _, _ = random_experts(e, d, 4, bias=False, seed=25)
    x, logits = torch.randn(8, d, generator=gen(26)), torch.randn(8, e, generator=gen(27))
    logits[:, 1] += 5.0
    free = ops.moe_dispatch(x, logits, w_up, w_down, top_k=2)
    capped = ops.moe_dispatch(x, logits, w_up, w_down, top_k=2, capacity_factor=0.5)
    assert capped.dropped.item() > 0
    assert capped.load_balance_loss.item() == free.load_balance_loss.item()


def test_loss_gradients_reach_the_logits():
    t, e, k = 6, 5, 2
    logits = torch.randn(t, e, generator=gen(28), requires_grad=True)
    w_up, w_down, _, _ = random_experts(e, 8, 4, bias=False, seed=29)
    out = ops.moe_dispatch(torch.randn(t, 8), logits, w_up, w_down, top_k=k)
    (g_lb,) = torch.autograd.grad(out.load_balance_loss, logits, retain_graph=True)
    (g_z,) = torch.autograd.grad(out.z_loss, logits)
    p = torch.softmax(logits.detach().double(), -1)
    f = torch.bincount(out.topk_ids.reshape(-1).long(), minlength=e).double() / (t * k)
    # d/dl_ti of E * sum_e f_e * mean_t p_te = (E/T) * p_ti * (f_i - sum_e f_e p_te)
    expect_lb = e / t * p * (f - (p * f).sum(-1, keepdim=True))
    # d/dl_ti of mean_t lse_t^2 = (2/T) * lse_t * p_ti
    expect_z = 2 / t * torch.logsumexp(logits.detach().double(), -1, keepdim=True) * p
    torch.testing.assert_close(g_lb.double(), expect_lb, **FP32)
    torch.testing.assert_close(g_z.double(), expect_z, **FP32)


# ---- gradients, compile, export --------------------------------------------------------------

CONFIGS = {
    "mixtral": dict(scoring="softmax_topk", renormalize=True, activation="swiglu"),
    "gpt-oss": dict(scoring="topk_softmax", activation="gpt_oss_swiglu", limit=1.0),
    "gelu": dict(scoring="softmax_topk", activation="gelu"),
}


def _leaves(e=4, d=16, f=8, activation="swiglu", seed=30):
    w_up, w_down, b_up, b_down = random_experts(e, d, f, gated=activation != "gelu", seed=seed, scale=0.5)
    g = gen(seed + 1)
    x, logits = torch.randn(2, 3, d, generator=g), torch.randn(2, 3, e, generator=g)
    return [t.requires_grad_() for t in (x, logits, w_up, w_down, b_up, b_down)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_a_plain_pytorch_moe(name):
    cfg = CONFIGS[name]
    leaves = _leaves(activation=cfg["activation"])
    x, logits, w_up, w_down, b_up, b_down = leaves
    dy = torch.randn(2, 3, x.shape[-1], generator=gen(31))

    out = ops.moe_dispatch(x, logits, w_up, w_down, top_k=2, b_up=b_up, b_down=b_down, **cfg)
    loss = (out.output * dy).sum() + 0.3 * out.load_balance_loss + 0.1 * out.z_loss
    grads = torch.autograd.grad(loss, leaves)

    p_out, p_weights, p_ids, p_lb, p_z = plain_moe(x, logits, w_up, w_down, b_up, b_down, top_k=2, **cfg)
    assert torch.equal(out.topk_ids.long(), p_ids)
    torch.testing.assert_close(out.topk_weights, p_weights, **FP32)
    torch.testing.assert_close(out.output, p_out.reshape(out.output.shape), **FP32)
    p_loss = (p_out * dy.reshape(-1, dy.shape[-1])).sum() + 0.3 * p_lb + 0.1 * p_z
    p_grads = torch.autograd.grad(p_loss, leaves)
    for leaf_name, g, pg in zip(("x", "router_logits", "w_up", "w_down", "b_up", "b_down"), grads, p_grads):
        assert g is not None and g.abs().sum() > 0, leaf_name
        torch.testing.assert_close(g, pg, rtol=1e-4, atol=1e-5, msg=lambda m: f"d/d{leaf_name}: {m}")


class _MoE(torch.nn.Module):
    def forward(self, x, logits, w_up, w_down, b_up, b_down):
        out = ops.moe_dispatch(x, logits, w_up, w_down, top_k=2, b_up=b_up, b_down=b_down, **CONFIGS["gpt-oss"])
        return out.output, out.load_balance_loss, out.z_loss


def _targets(graph):
    return {n.target for n in graph.nodes if n.op == "call_function"}


FOUR_OPS = {torch.ops.apt_hal.moe_route.default, torch.ops.apt_hal.moe_permute.default,
            torch.ops.apt_hal.moe_experts.default, torch.ops.apt_hal.moe_combine.default}


def test_torch_compile_fullgraph_forward_and_backward_equal_eager():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    model = _MoE()
    leaves = _leaves(activation="gpt_oss_swiglu")
    eager = model(*leaves)
    eager_grads = torch.autograd.grad(eager[0].sum() + eager[1] + eager[2], leaves)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    got = compiled(*leaves)
    assert FOUR_OPS <= _targets(graphs[0].graph)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same ops run on the same inputs
    # The backward graph is the references' vjp traced with fake tensors: the experts reference
    # takes its masked path (every expert on every row), so values agree to rounding, not bits.
    got_grads = torch.autograd.grad(got[0].sum() + got[1] + got[2], leaves)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b, **FP32)


def test_torch_export_keeps_the_four_ops():
    model = _MoE()
    args = tuple(t.detach() for t in _leaves(activation="gpt_oss_swiglu"))
    ep = torch.export.export(model, args)
    assert FOUR_OPS <= _targets(ep.graph)
    for a, b in zip(ep.module()(*args), model(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- invalid values (issue 10) -------------------------------------------------------------


@pytest.mark.parametrize("assignments", [[0, 0, 1, 2], [0, 1, 2, 9], [0, 1, 2, -1]],
                         ids=["repeated", "too large", "negative"])
@pytest.mark.parametrize("checks", ["metadata", "values"])
def test_combine_rejects_assignments_that_are_not_a_permutation(assignments, checks):
    # Before: the reference read uninitialised memory (wrong output, or an IndexError at a huge index).
    apt_hal.set_checks(checks)
    try:
        with pytest.raises(apt_hal.ContractError, match=r"moe_combine: argument 'sorted_assignments' must"):
            ops.moe_combine.reference(torch.randn(4, 3), torch.tensor(assignments), torch.tensor([0, 4]),
                                      torch.rand(2, 2))
    finally:
        apt_hal.set_checks("metadata")


def test_combine_rejects_bad_offsets_and_no_offsets():
    y, order, weights = torch.randn(4, 3), torch.arange(4), torch.rand(2, 2)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'expert_offsets' must start at 0, not decrease"):
        ops.moe_combine(y, order, torch.tensor([0, 5]), weights)
    with pytest.raises(apt_hal.ContractError, match=r"argument 'expert_offsets' must have E\+1 >= 1 elements"):
        ops.moe_combine(y, order, torch.zeros(0, dtype=torch.int64), weights)


@pytest.mark.parametrize("bad,message", [(math.inf, r"contains \+inf"), (math.nan, "contains NaN")])
def test_route_rejects_nan_and_plus_inf(bad, message):
    logits = torch.randn(3, 4)
    logits[1, 2] = bad
    with pytest.raises(apt_hal.ContractError, match=rf"moe_route: argument 'router_logits' {message}"):
        ops.moe_route.reference(logits, 2)


def test_route_rejects_a_row_of_all_minus_inf():
    logits = torch.randn(3, 4)
    logits[2] = -math.inf
    with pytest.raises(apt_hal.ContractError, match=r"'router_logits' has 1 row\(s\) of all -inf \(first: token 2\)"):
        ops.moe_route.reference(logits, 2)


@pytest.mark.parametrize("scoring,renormalize", [("softmax_topk", False), ("softmax_topk", True),
                                                 ("topk_softmax", False)])
def test_minus_inf_experts_get_weight_exactly_zero(scoring, renormalize):
    logits = torch.tensor([[-math.inf, 0.5, -math.inf, 0.25], [1.0, -math.inf, -math.inf, -math.inf]])
    weights, ids = ops.moe_route.reference(logits, 3, scoring, renormalize)
    assert not weights.isnan().any()
    assert ids.tolist() == [[1, 3, 0], [0, 1, 2]]  # the -inf ones last, ties to the lower index
    assert weights[0, 2] == 0 and weights[1, 1:].tolist() == [0.0, 0.0]
    assert weights[1, 0] == 1.0


@pytest.mark.parametrize("capacity", [1.5, 2.0, True, "2"])
def test_permute_rejects_a_capacity_that_is_not_an_int(capacity):
    # Before: capacity=1.5 returned float32 offsets although the spec says int64.
    with pytest.raises(apt_hal.ContractError, match=r"moe_permute: argument 'capacity' must be an int"):
        ops.moe_permute(torch.tensor([[0], [1]]), 2, capacity)


def test_top_k_and_num_experts_must_be_ints():
    with pytest.raises(apt_hal.ContractError, match=r"moe_route: argument 'top_k' must be an int, got float"):
        ops.moe_route(torch.randn(3, 4), 1.5)
    with pytest.raises(apt_hal.ContractError, match=r"moe_permute: argument 'num_experts' must be an int"):
        ops.moe_permute(torch.tensor([[0]]), 2.0)


def test_meta_tensors_give_shapes_not_item_errors():
    # Before: "Tensor.item() cannot be called on meta tensors" from the reference's value checks.
    meta = dict(device="meta")
    previous = apt_hal.set_checks("values")
    try:
        weights, ids = ops.moe_route(torch.empty(5, 4, **meta), 2)
        assert (weights.shape, weights.dtype, ids.dtype, ids.device.type) == (
            (5, 2), torch.float32, torch.int32, "meta")
        order, offsets = ops.moe_permute(torch.empty(5, 2, dtype=torch.int32, **meta), 4, 3)
        assert order.shape == (10,) and offsets.shape == (5,) and offsets.dtype == torch.int64
        w_up, w_down = torch.empty(4, 12, 8, **meta), torch.empty(4, 8, 6, **meta)
        y = ops.moe_experts(torch.empty(5, 8, **meta), order, offsets, w_up, w_down, top_k=2)
        assert y.shape == (10, 8) and y.is_meta
        assert ops.moe_combine(y, order, offsets, weights).shape == (5, 8)
    finally:
        apt_hal.set_checks(previous)


def test_meta_mixed_with_cpu_names_the_argument():
    with pytest.raises(apt_hal.ContractError, match=r"argument 'topk_weights' is on cpu"):
        ops.moe_combine(torch.empty(4, 3, device="meta"), torch.empty(4, dtype=torch.int32, device="meta"),
                        torch.empty(3, dtype=torch.int64, device="meta"), torch.rand(2, 2))
