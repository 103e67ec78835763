"""Cases for fp4_matmul and the mxfp4_quantize pseudo-op (apt_hal.mxfp4.quantize run on the
backend's device, compared bit for bit with the same call on the CPU)."""

from __future__ import annotations

import math

import torch

from apt_hal import mxfp4, ops
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

QUICK = (torch.bfloat16,)  # feature and edge cases: one dtype in the quick suite, all in the full one


def _weights(g, n: int, k: int, exp_range=(-4, 3)):
    """Random MXFP4 weights: every E2M1 code (both zeros included) and block scales 2^e, e in range."""
    packed = randint(g, 0, 256, (n, k // 2), torch.uint8)
    scales = (mxfp4.E8M0_BIAS + randint(g, *exp_range, (n, k // mxfp4.BLOCK))).to(torch.uint8)
    return packed, scales


def _matmul(lead, k: int, n: int, *, bias=False, transpose_x=False, edge=None, nan_scale=False,
            torch_dtypes=False):
    def make(g, dtype):
        exp_range = (-4, 3)
        if edge is None:
            x = randn(g, (*lead, k), dtype)
        else:
            x = edge_values(g, (*lead, k), dtype, edge, headroom=4.0)
            if edge == "largest":
                exp_range = (-12, -11)  # |w| <= 6 * 2^-12: sums of K products stay below max/4
            elif edge == "subnormal":  # x * w ~ 2^-10: normal outputs, so flushing x to zero shows
                e = -round(math.log2(torch.finfo(dtype).tiny)) - 8
                exp_range = (e, e + 1)
        packed, scales = _weights(g, n, k, exp_range)
        if nan_scale:
            scales.view(-1)[::5] = mxfp4.E8M0_NAN  # every output using one of these blocks is NaN
        if torch_dtypes:
            packed, scales = mxfp4.to_torch_dtypes(packed, scales)
        if transpose_x:  # same values, column-major: the last dimension is strided
            x = x.reshape(-1, k).T.contiguous().T.reshape(*lead, k)
        return dict(x=x, w_packed=packed, w_scales=scales, bias=randn(g, (n,), dtype) if bias else None)

    return make


def _fp4_cases() -> list[Case]:
    op = "fp4_matmul"
    cases = []
    # The decode path (M = 1, 16) and the prefill path (M = 33), with odd N and K = 3*32.
    for name, lead, k, n in [("m1_k256_n64", (1,), 256, 64), ("m16_k96_n17", (16,), 96, 17),
                             ("m33_k128_n33", (33,), 128, 33)]:
        cases += variants(op, FLOATS, name, _matmul(lead, k, n), quick_dtypes="*", reduction=k)
    for name, lead, k, n in [("m4_k64_n1", (4,), 64, 1), ("m128_k1024_n256", (128,), 1024, 256),
                             ("m1_k4096_n512", (1,), 4096, 512), ("m257_k2048_n300", (257,), 2048, 300)]:
        cases += variants(op, FLOATS, name, _matmul(lead, k, n), reduction=k)
    specials = [
        ("bias", _matmul((5,), 64, 24, bias=True), ("bias",)),
        ("batch_dims", _matmul((2, 3), 64, 9), ("batch_dims",)),
        ("noncontiguous_x", _matmul((7,), 64, 8, transpose_x=True), ("noncontiguous_x",)),
        ("nan_scale", _matmul((4,), 64, 8, nan_scale=True), ("nan_scale",)),
        ("torch_fp4_dtypes", _matmul((3,), 64, 8), ("torch_fp4_dtypes",)),
        ("empty_m0", _matmul((0,), 64, 8), ()),
    ]
    for name, make, feats in specials:
        cases += variants(op, FLOATS, name, make, quick_dtypes=QUICK, features=feats, reduction=64)
    # Edge values in every dtype, also in the quick suite: kernels treat each x dtype differently
    # (cuda-triton splits fp16 and fp32 x into bf16 parts), and the edges are where that shows.
    for e in EDGES:
        cases += variants(op, FLOATS, f"edge_{e}", _matmul((4,), 64, 8, edge=e), quick_dtypes="*", reduction=64)
    # The weights must be contiguous (error cases below); x and bias may have any strides.
    cases += strided_variants(Case(op, torch.bfloat16, "bias", _matmul((5,), 64, 24, bias=True), features=("bias",),
                                   reduction=64), [("x", None), ("x", 1), ("bias", None)])

    def bad(name, raises, **changes):
        def make(g, dtype):
            args = _matmul((3,), 64, 8, bias=True)(g, dtype)
            args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
            return args
        return Case(op, torch.float32, "error_" + name, make, quick=True, raises=raises)

    cases += [
        bad("k_not_multiple_of_32", "'x'", x=lambda a: a["x"][:, :48],
            w_packed=lambda a: a["w_packed"][:, :24].contiguous()),
        bad("w_packed_shape", "'w_packed'", w_packed=lambda a: a["w_packed"][:, :16].contiguous()),
        bad("w_scales_shape", "'w_scales'", w_scales=lambda a: a["w_scales"][:, :1].contiguous()),
        bad("x_dtype", "'x'", x=lambda a: a["x"].to(torch.int32)),
        bad("bias_shape", "'bias'", bias=lambda a: a["bias"][:5]),
        bad("bias_dtype", "'bias'", bias=lambda a: a["bias"].to(torch.float16)),
        bad("w_packed_noncontiguous", "'w_packed'", w_packed=lambda a: a["w_packed"].T.contiguous().T),
        bad("w_scales_strided", "'w_scales'", w_scales=lambda a: spread(a["w_scales"], 1)),
    ]
    return cases


# ---- mxfp4 quantize ---------------------------------------------------------------------------


def _ties(g, rows: int, k: int, dtype):
    """Blocks whose amax is 6 * 2^e, holding the E2M1 midpoints (ties, to even), values in (6, 8)
    (which saturate to 6) and -0, each times 2^e, with random signs and a random e per block."""
    specials = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.0])
    blocks = rows * k // mxfp4.BLOCK
    vals = specials[randint(g, 0, len(specials), (blocks, mxfp4.BLOCK))]
    vals[:, 0] = 6.0
    sign = torch.where(torch.rand(vals.shape, generator=g) < 0.5, -1.0, 1.0)
    exp = randint(g, -20, 20, (blocks, 1))
    return torch.ldexp(vals * sign, exp.float()).reshape(rows, k).to(dtype)


def _quantize_input(shape, kind="normal"):
    def make(g, dtype):
        rows, k = math.prod(shape[:-1]), shape[-1]
        if kind == "normal":  # each block its own magnitude, 2^-30 .. 2^30
            w = randn(g, (rows, k // mxfp4.BLOCK, mxfp4.BLOCK))
            w = torch.ldexp(w, randint(g, -30, 30, (rows, k // mxfp4.BLOCK, 1)).float()).reshape(rows, k).to(dtype)
        elif kind == "ties":
            w = _ties(g, rows, k, dtype)
        else:
            w = edge_values(g, (rows, k), dtype, kind, headroom=1.0)
        return dict(w=w.reshape(shape))

    return make


def _quantize_cases() -> list[Case]:
    op = "mxfp4_quantize"
    cases = variants(op, FLOATS, "rows5_k96", _quantize_input((5, 96)), quick_dtypes="*")
    cases += variants(op, FLOATS, "rows256_k4096", _quantize_input((256, 4096)))
    for kind in ("ties", *EDGES):
        cases += variants(op, FLOATS, f"edge_{kind}", _quantize_input((4, 64), kind), quick_dtypes=QUICK)
    cases += variants(op, FLOATS, "batch_dims", _quantize_input((2, 3, 64)), quick_dtypes=QUICK)
    cases += strided_variants(Case(op, torch.bfloat16, "rows5_k96", _quantize_input((5, 96))), [("w", None)])
    cases += [
        Case(op, torch.float32, "error_k_not_multiple_of_32", lambda g, dt: dict(w=randn(g, (2, 48), dt)),
             quick=True, raises="multiple of 32", error=ValueError),
        Case(op, torch.float32, "error_integer_w", lambda g, dt: dict(w=randint(g, 0, 5, (2, 64))),
             quick=True, raises="'w'", error=TypeError),
    ]
    return cases


SPECS = [
    OpSpec("fp4_matmul", ops.fp4_matmul, ops.fp4_matmul.reference, ("y",), _fp4_cases,
           features=("bias", "batch_dims", "noncontiguous_x", "nan_scale", "torch_fp4_dtypes")),
    # Not an op contract: the same torch code on the backend's device must give the CPU's bits.
    OpSpec("mxfp4_quantize", mxfp4.quantize, mxfp4.quantize, ("packed", "scales"), _quantize_cases),
]
