"""Cases for the four MoE steps: moe_route, moe_permute, moe_experts, moe_combine.

Router logits keep a guaranteed gap of at least 0.25 between any two values of a token (so also
between the k-th and (k+1)-th), on a grid that bf16 and fp16 hold exactly: rounding cannot flip
routing, and ids must match exactly. Exact ties are a case of their own (all-zero logits: the spec
sends ties to the lower expert index). The inputs of permute/experts/combine are built with the
reference moe_permute on the CPU, so every backend starts from the same assignments.
"""

from __future__ import annotations

import math

import torch

from apt_hal import mxfp4, ops
from apt_hal.conformance.spec import FLOATS, Case, OpSpec, randint, randn, spread, strided_variants, variants

QUICK = (torch.bfloat16,)
INDEX = (torch.int32, torch.int64)


def router_logits(g, t: int, e: int, dtype, scale: float = 1.0) -> torch.Tensor:
    """``[t, e]`` logits: per token a random order of the experts, consecutive ranks 0.5 apart plus
    a jitter of 0..3/16, so any two values differ by >= 0.3125 * scale (multiples of 1/16 below
    8 * scale: exact in bf16 and fp16 for power-of-two scales)."""
    ranks = torch.argsort(torch.rand(t, e, generator=g), dim=1).float()
    jitter = randint(g, 0, 4, (t, e)).float() / 16
    return ((ranks * 0.5 + jitter - e * 0.25) * scale).to(dtype)


def expert_ids(g, t: int, e: int, k: int, used=None, dtype=torch.int64) -> torch.Tensor:
    """``[t, k]`` distinct experts per token, drawn from ``used`` (default: all ``e``)."""
    pool = torch.tensor(used if used is not None else range(e))
    pick = torch.argsort(torch.rand(t, len(pool), generator=g), dim=1)[:, :k]
    return pool[pick].to(dtype)


# ---- route -------------------------------------------------------------------------------------


def _route(t, e, k, scoring="softmax_topk", renormalize=False, logits="gap"):
    def make(g, dtype):
        if logits == "ties":
            x = torch.zeros(t, e, dtype=dtype)
        else:  # "largest": the gap grid scaled to about max/4 (a power of two keeps it exact)
            scale = 2.0 ** (math.floor(math.log2(torch.finfo(dtype).max)) - 4) if logits == "largest" else 1.0
            x = router_logits(g, t, e, dtype, scale)
        return dict(router_logits=x, top_k=k, scoring=scoring, renormalize=renormalize)

    return make


def _route_cases() -> list[Case]:
    op = "moe_route"
    cases = variants(op, FLOATS, "softmax_topk_t7_e8_k2", _route(7, 8, 2), quick_dtypes="*", reduction=8)
    cases += variants(op, FLOATS, "topk_softmax_t6_e8_k4", _route(6, 8, 4, "topk_softmax"), quick_dtypes="*",
                      reduction=8)
    for name, make in [("renormalize_t5_e8_k3", _route(5, 8, 3, renormalize=True)),
                       ("k1_e1", _route(4, 1, 1)), ("ties", _route(5, 8, 3, logits="ties")),
                       ("ties_topk_softmax", _route(5, 8, 3, "topk_softmax", logits="ties")),
                       ("edge_largest", _route(6, 8, 2, logits="largest")), ("empty_t0", _route(0, 8, 2))]:
        cases += variants(op, FLOATS, name, make, quick_dtypes=QUICK, reduction=8)
    cases += variants(op, FLOATS, "t257_e64_k8", _route(257, 64, 8, renormalize=True), reduction=64)
    cases += strided_variants(Case(op, torch.bfloat16, "t7_e8_k2", _route(7, 8, 2), reduction=8),
                              [("router_logits", None)])

    def bad(name, raises, value_check=False, **changes):
        def make(g, dtype):
            return {**_route(4, 8, 2)(g, dtype), **{k: v(g) if callable(v) else v for k, v in changes.items()}}
        return Case(op, torch.float32, "error_" + name, make, quick=True, raises=raises, value_check=value_check)

    def nan_logits(g):
        x = router_logits(g, 4, 8, torch.float32)
        x[1, 3] = float("nan")
        return x

    cases += [bad("nan_logits", "'router_logits'", value_check=True, router_logits=nan_logits),
              bad("top_k_above_e", "'top_k'", top_k=9), bad("top_k_zero", "'top_k'", top_k=0),
              bad("unknown_scoring", "'scoring'", scoring="sigmoid"),
              bad("logits_1d", "'router_logits'", router_logits=lambda g: randn(g, (8,)))]
    return cases


# ---- permute -----------------------------------------------------------------------------------


def _permute(t, e, k, capacity=-1, used=None):
    def make(g, dtype):
        return dict(topk_ids=expert_ids(g, t, e, k, used, dtype), num_experts=e, capacity=capacity)

    return make


def _permute_cases() -> list[Case]:
    op = "moe_permute"
    cases = variants(op, INDEX, "dropless_t9_e4_k2", _permute(9, 4, 2), quick_dtypes="*")
    for name, make, feats in [("capacity3", _permute(9, 4, 2, 3), ("capacity",)),
                              ("capacity0", _permute(5, 4, 2, 0), ("capacity",)),
                              ("empty_experts", _permute(7, 8, 2, used=(1, 6)), ()),
                              ("k1_e1", _permute(5, 1, 1), ()), ("empty_t0", _permute(0, 4, 2), ())]:
        cases += variants(op, INDEX, name, make, quick_dtypes=(torch.int32,), features=feats)
    cases += variants(op, INDEX, "t257_e16_k4", _permute(257, 16, 4))
    cases += variants(op, INDEX, "capacity_t257_e16_k4", _permute(257, 16, 4, 50), features=("capacity",))
    cases += strided_variants(Case(op, torch.int32, "t9_e4_k2", _permute(9, 4, 2)), [("topk_ids", None)])

    def bad(name, raises, value_check=False, **changes):
        def make(g, dtype):
            return {**_permute(6, 4, 2)(g, dtype), **changes}
        return Case(op, torch.int32, "error_" + name, make, quick=True, raises=raises, value_check=value_check)

    cases += [bad("id_out_of_range", "'topk_ids'", value_check=True,
                  topk_ids=torch.tensor([[0, 1], [2, 4]], dtype=torch.int32)),
              bad("num_experts_zero", "'num_experts'", num_experts=0),
              bad("capacity_below_minus_one", "'capacity'", capacity=-2),
              bad("ids_1d", "'topk_ids'", topk_ids=torch.tensor([0, 1, 2], dtype=torch.int32)),
              bad("float_ids", "'topk_ids'", topk_ids=torch.zeros(3, 2))]
    return cases


# ---- experts -----------------------------------------------------------------------------------


def _assignments(g, t, e, k, capacity, used):
    """(sorted_assignments, expert_offsets) of random routing, by the reference moe_permute."""
    return ops.moe_permute.reference(expert_ids(g, t, e, k, used), e, capacity)


def _experts(t, e, k, d, f, activation="swiglu", mxfp4_weights=False, bias=False, capacity=-1, used=None):
    u = f if activation == "gelu" else 2 * f
    # gpt-oss's clamp (limit 7) must matter: its up-projection is scaled so |h| often exceeds 7.
    up_scale = (4.0 if activation == "gpt_oss_swiglu" else 1.0) / math.sqrt(d)

    def weight(g, shape, scale, dtype):
        w = randn(g, shape, torch.float32, scale)
        return mxfp4.quantize(w) if mxfp4_weights else (w.to(dtype), None)

    def make(g, dtype):
        x = randn(g, (t, d), dtype)
        order, offsets = _assignments(g, t, e, k, capacity, used)
        w_up, s_up = weight(g, (e, u, d), up_scale, dtype)
        w_down, s_down = weight(g, (e, d, f), 1 / math.sqrt(f), dtype)
        return dict(x=x, sorted_assignments=order, expert_offsets=offsets, w_up=w_up, w_down=w_down,
                    w_up_scales=s_up, w_down_scales=s_down, b_up=randn(g, (e, u), dtype) if bias else None,
                    b_down=randn(g, (e, d), dtype) if bias else None, top_k=k, activation=activation,
                    alpha=1.702, limit=7.0)

    return make


def _experts_cases() -> list[Case]:
    op = "moe_experts"
    d, f = 64, 96
    cases = variants(op, FLOATS, "swiglu_t5_e4_k2", _experts(5, 4, 2, d, f), quick_dtypes="*", reduction=d + f)
    for name, make, feats in [
        ("gelu", _experts(5, 4, 2, d, f, "gelu"), ("gelu",)),
        ("gpt_oss_swiglu", _experts(5, 4, 2, d, f, "gpt_oss_swiglu"), ("gpt_oss_swiglu",)),
        ("bias", _experts(5, 4, 2, d, f, bias=True), ("bias",)),
        ("mxfp4", _experts(5, 4, 2, d, f, mxfp4_weights=True), ("mxfp4_experts",)),
        ("mxfp4_gpt_oss_bias", _experts(6, 4, 2, d, f, "gpt_oss_swiglu", True, True),
         ("mxfp4_experts", "gpt_oss_swiglu", "bias")),
        ("capacity", _experts(9, 4, 2, d, f, capacity=3), ("capacity",)),
        ("empty_experts", _experts(6, 8, 2, d, f, used=(2, 5)), ()),
        ("decode_t1_e8_k2", _experts(1, 8, 2, d, f), ()),
        ("empty_t0", _experts(0, 4, 2, d, f), ()),
    ]:
        cases += variants(op, FLOATS, name, make, quick_dtypes=QUICK, features=feats, reduction=d + f)
    cases += variants(op, FLOATS, "t64_e8_k2_d256_f512", _experts(64, 8, 2, 256, 512), reduction=768)
    cases += variants(op, FLOATS, "mxfp4_t33_e8_k4_d256_f256", _experts(33, 8, 4, 256, 256, mxfp4_weights=True),
                      features=("mxfp4_experts",), reduction=512)
    # The weights must be contiguous; every other tensor may have any strides.
    cases += strided_variants(Case(op, torch.bfloat16, "bias_t3_d32_f32", _experts(3, 4, 2, 32, 32, bias=True),
                                   features=("bias",), reduction=64),
                              [("x", None), ("x", 1), ("sorted_assignments", None), ("expert_offsets", None),
                               ("b_up", None), ("b_down", None)])

    def bad(name, raises, **changes):
        def make(g, dtype):
            args = _experts(4, 4, 2, 64, 64)(g, dtype)
            return {**args, **{k: v(args) for k, v in changes.items()}}
        return Case(op, torch.float32, "error_" + name, make, quick=True, raises=raises)

    cases += [bad("w_up_dtype", "'w_up'", w_up=lambda a: a["w_up"].to(torch.bfloat16)),
              bad("one_scale_only", "'w_up_scales'", w_up_scales=lambda a: torch.zeros(4, 128, 2, dtype=torch.uint8)),
              bad("offsets_size", "'expert_offsets'", expert_offsets=lambda a: a["expert_offsets"][:-1]),
              bad("odd_up_width", "w_up", w_up=lambda a: a["w_up"][:, :-1].contiguous()),
              bad("w_down_strided", "'w_down'", w_down=lambda a: spread(a["w_down"], 1)),
              bad("assignments_size", "'sorted_assignments'",
                  sorted_assignments=lambda a: a["sorted_assignments"][:-1])]
    return cases


# ---- combine -----------------------------------------------------------------------------------


def _combine(t, e, k, d, capacity=-1):
    def make(g, dtype):
        order, offsets = _assignments(g, t, e, k, capacity, None)
        weights = torch.softmax(randn(g, (t, k)), dim=-1)
        return dict(y=randn(g, (t * k, d), dtype), sorted_assignments=order, expert_offsets=offsets,
                    topk_weights=weights)

    return make


def _combine_cases() -> list[Case]:
    op = "moe_combine"
    cases = variants(op, FLOATS, "t6_e4_k2_d64", _combine(6, 4, 2, 64), quick_dtypes="*", reduction=2)
    for name, make, feats in [("capacity", _combine(9, 4, 2, 64, capacity=2), ("capacity",)),
                              ("k1", _combine(5, 4, 1, 32), ()), ("k4_d96", _combine(7, 8, 4, 96), ()),
                              ("empty_t0", _combine(0, 4, 2, 64), ())]:
        cases += variants(op, FLOATS, name, make, quick_dtypes=QUICK, features=feats, reduction=4)
    cases += variants(op, FLOATS, "t257_e16_k4_d512", _combine(257, 16, 4, 512), reduction=4)
    cases += strided_variants(Case(op, torch.bfloat16, "capacity", _combine(9, 4, 2, 64, capacity=2),
                                   features=("capacity",), reduction=2),
                              [("y", None), ("y", 1), ("sorted_assignments", None), ("expert_offsets", None),
                               ("topk_weights", None)])

    def bad(name, raises, **changes):
        def make(g, dtype):
            args = _combine(4, 4, 2, 32)(g, dtype)
            return {**args, **{k: v(args) for k, v in changes.items()}}
        return Case(op, torch.float32, "error_" + name, make, quick=True, raises=raises)

    cases += [bad("weights_dtype", "'topk_weights'", topk_weights=lambda a: a["topk_weights"].to(torch.bfloat16)),
              bad("y_rows", "'y'", y=lambda a: a["y"][:-1])]
    return cases


SPECS = [
    OpSpec("moe_route", ops.moe_route, ops.moe_route.reference, ("topk_weights", "topk_ids"), _route_cases),
    OpSpec("moe_permute", ops.moe_permute, ops.moe_permute.reference, ("sorted_assignments", "expert_offsets"),
           _permute_cases, features=("capacity",)),
    OpSpec("moe_experts", ops.moe_experts, ops.moe_experts.reference, ("y",), _experts_cases,
           features=("mxfp4_experts", "capacity", "gelu", "gpt_oss_swiglu", "bias")),
    OpSpec("moe_combine", ops.moe_combine, ops.moe_combine.reference, ("out",), _combine_cases,
           features=("capacity",)),
]
