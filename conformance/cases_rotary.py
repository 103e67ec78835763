"""Cases for rotary (out of place) and rotary_ (in place): both styles, partial rotary, GQA,
strided views (slices of a fused qkv buffer, and the [B, H, S, D] layout transposed), int32 and
int64 positions in no particular order, empty and decode-sized inputs, and edge values."""

from __future__ import annotations

import math

import torch

from apt_hal import ops
from apt_hal.conformance.spec import (
    EDGES,
    FLOATS,
    Case,
    OpSpec,
    edge_values,
    randint,
    randn,
    spread,
    strided_variants,
    variants,
)

QUICK = (torch.bfloat16,)


def _cache(g, positions: int, rot: int) -> torch.Tensor:
    """A float32 ``[P, R]`` cos/sin cache of random angles."""
    theta = torch.rand(positions, rot // 2, generator=g) * (2 * math.pi)
    return torch.cat([torch.cos(theta), torch.sin(theta)], dim=1)


def _rotary(b, s, hq, hk, d, rot=None, style="neox", layout="dense", pos_dtype=torch.int64, edge=None):
    """``layout``: "dense"; "qkv" (q and k are head slices of one [B, S, Hq + 2 Hk, D] buffer, as a
    fused projection gives); "bhsd" (q and k are [B, H, S, D] tensors seen as [B, S, H, D])."""
    rot = rot or d

    def values(g, shape, dtype):
        # headroom 4: a rotation adds two products, so max/4 inputs cannot overflow.
        return randn(g, shape, dtype) if edge is None else edge_values(g, shape, dtype, edge, headroom=4.0)

    def make(g, dtype):
        if layout == "qkv":
            qkv = values(g, (b, s, hq + 2 * hk, d), dtype)
            q, k = qkv[:, :, :hq], qkv[:, :, hq:hq + hk]
        elif layout == "bhsd":
            q = values(g, (b, hq, s, d), dtype).transpose(1, 2)
            k = values(g, (b, hk, s, d), dtype).transpose(1, 2)
        else:
            q, k = values(g, (b, s, hq, d), dtype), values(g, (b, s, hk, d), dtype)
        p = 2 * s + 3
        return dict(q=q, k=k, positions=randint(g, 0, p, (b, s), pos_dtype), cos_sin_cache=_cache(g, p, rot),
                    style=style)

    return make


def _cases(op: str) -> list[Case]:
    cases = variants(op, FLOATS, "neox_b2_s3_h4_d64", _rotary(2, 3, 4, 4, 64), quick_dtypes="*")
    cases += variants(op, FLOATS, "gptj_b2_s3_h4_d64", _rotary(2, 3, 4, 4, 64, style="gptj"), quick_dtypes="*",
                      features=("gptj",))
    for name, make, feats in [
        ("partial_neox_r32_d64", _rotary(1, 4, 2, 2, 64, rot=32), ("partial",)),
        ("partial_gptj_r16_d80", _rotary(1, 4, 2, 2, 80, rot=16, style="gptj"), ("partial", "gptj")),
        ("gqa_hq8_hk2", _rotary(1, 3, 8, 2, 64), ("gqa",)),
        ("strided_qkv", _rotary(2, 3, 4, 2, 64, layout="qkv"), ("strided", "gqa")),
        ("strided_bhsd", _rotary(2, 3, 4, 4, 32, layout="bhsd", style="gptj"), ("strided", "gptj")),
        ("int32_positions", _rotary(2, 3, 2, 2, 32, pos_dtype=torch.int32), ()),
        ("head_dim_80", _rotary(1, 3, 3, 3, 80), ()),
        ("decode_b5_s1", _rotary(5, 1, 4, 2, 64), ("gqa",)),
        ("empty_s0", _rotary(2, 0, 4, 4, 64), ()),
    ] + [(f"edge_{e}", _rotary(1, 3, 2, 2, 32, edge=e), ()) for e in EDGES]:
        cases += variants(op, FLOATS, name, make, quick_dtypes=QUICK, features=feats)
    cases += variants(op, FLOATS, "prefill_b2_s128_h8_d128", _rotary(2, 128, 8, 8, 128))
    cases += variants(op, FLOATS, "prefill_gqa_qkv_b2_s64_hq16_hk4", _rotary(2, 64, 16, 4, 128, layout="qkv"),
                      features=("strided", "gqa"))
    # q and k may be strided in every dimension but head_dim; the cache must be contiguous.
    cases += strided_variants(Case(op, torch.bfloat16, "gqa_hq4_hk2", _rotary(2, 3, 4, 2, 64), features=("gqa",)),
                              [("q", 3), ("k", 3), ("positions", None)])

    def bad(name, raises, value_check=False, **changes):
        def make(g, dtype):
            args = _rotary(1, 3, 2, 2, 32)(g, dtype)
            return {**args, **{k: v(args) for k, v in changes.items()}}
        return Case(op, torch.float32, "error_" + name, make, quick=True, raises=raises, value_check=value_check)

    cases += [
        bad("position_out_of_range", "'positions'", value_check=True,
            positions=lambda a: torch.full_like(a["positions"], a["cos_sin_cache"].shape[0])),
        bad("odd_rotary_width", "'cos_sin_cache'", cos_sin_cache=lambda a: a["cos_sin_cache"][:, :31].contiguous()),
        bad("rotary_width_above_head_dim", "'cos_sin_cache'",
            cos_sin_cache=lambda a: torch.cat([a["cos_sin_cache"]] * 2, dim=1)),
        bad("k_shape", "'k'", k=lambda a: a["k"][:, :2]),
        bad("positions_shape", "'positions'", positions=lambda a: a["positions"][:, :2]),
        bad("unknown_style", "'style'", style=lambda a: "rotate_half"),
        bad("strided_head_dim", "'q'", q=lambda a: a["q"].transpose(2, 3).contiguous().transpose(2, 3)),
        bad("cache_dtype", "'cos_sin_cache'", cos_sin_cache=lambda a: a["cos_sin_cache"].to(torch.bfloat16)),
        bad("cache_strided", "'cos_sin_cache'", cos_sin_cache=lambda a: spread(a["cos_sin_cache"], 1)),
    ]
    return cases


def _rotary_cases() -> list[Case]:
    return _cases("rotary")


def _rotary_inplace_cases() -> list[Case]:
    return _cases("rotary_")


FEATURES = ("gptj", "partial", "gqa", "strided")
SPECS = [
    OpSpec("rotary", ops.rotary, ops.rotary.reference, ("q_out", "k_out"), _rotary_cases, features=FEATURES),
    OpSpec("rotary_", ops.rotary_, ops.rotary_.reference, ("q", "k"), _rotary_inplace_cases, mutates=True,
           features=FEATURES),
]
