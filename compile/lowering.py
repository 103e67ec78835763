"""The lowering table: how every apt_hal op becomes ONNX, per target profile, in one place.

A *profile* is what an exported graph must run on: ``onnx`` (portable; validated on ONNX
Runtime's CPU provider) or ``tensorrt`` (the ONNX parser of TensorRT 10.15, strongly typed).
:data:`LOWERINGS` maps each profile to one translation per op, with the reason for the choice;
``apt-compile --list-lowerings`` prints it. A translation is a Python function that the exporter
calls with the op's arguments (``torch.onnx.export(..., custom_translation_table=...)``) and that
builds the op's graph with ONNX Script ops of the target opset.

Every translation computes exactly what the op's reference computes, operation for operation, in
the same precision: float32 arithmetic, the input dtype only at the edges (one rounding to the
output dtype), integer outputs bit for bit. What may differ from eager PyTorch is only what any
two float32 libraries differ in: the order of a MatMul's accumulation, ``exp`` and ``erf``
implementations, fused multiply-adds. The validation tolerances (:mod:`apt_hal.compile.validate`)
are about exactly that.

Choices worth knowing
---------------------
* ``fp4_matmul`` (``onnx``): ONNX Runtime has no FP4 DequantizeLinear kernel, so the packed codes
  are decoded in the graph: one Gather of a 256-entry table turns each byte into its two E2M1
  values (low nibble first) and one Gather of a 256-entry table turns each E8M0 scale into
  2^(e-127) (NaN for 0xFF); both products are exact in float32, as in :func:`apt_hal.mxfp4.dequantize`.
  The weights stay packed in the file (4.25 bits per weight).
* ``fp4_matmul`` (``tensorrt``): decoded as for ``onnx`` by default. TensorRT documents its FP4
  (TensorRT >= 10.8, Blackwell GPUs) only as NVFP4: FP8 E4M3 block scales, blocks of 16; MXFP4's
  E8M0 block-32 scales appear in its documentation for MXFP8 only. ``fp4="qdq"`` (opset >= 24)
  still writes ``DequantizeLinear`` with FLOAT4E2M1 elements and FLOAT8E8M0 block-32 scales, for
  a TensorRT that accepts them; the readiness report marks those nodes unsupported. The
  translation emits the node on the uint8 storage; :func:`retype_fp4_weights` then gives the
  weight initializers their FP4/E8M0 types (ONNX's BitCast arrives in opset 26).
* Masked attention (``tensorrt``): torch exports ``scaled_dot_product_attention``'s boolean mask
  as ONNX ``Attention`` with a BOOL ``attn_mask``, which TensorRT's operator list does not take;
  :func:`additive_attention_masks` feeds each such node ``Where(mask, 0, lowest)`` of its query
  dtype instead, after the translation. ``onnx`` keeps the BOOL mask (ONNX Runtime runs it).
* ``rotary``: the standard ``RotaryEmbedding`` (opset >= 23) for float32, where it is the same
  arithmetic; float16/bfloat16 use the decomposition, because the reference computes in float32
  and rounds once while ``RotaryEmbedding`` computes in the input dtype with a cache of that dtype.
* ``moe_dispatch``: an exact decomposition, never ``com.microsoft.MoE``, which applies its own
  softmax to the router logits, has no capacity or dropping and returns none of the routing
  outputs: it does not compute this contract. Routing is ``TopK`` (ONNX breaks ties by the lower
  index, as the contract does); the expert sort is a counting sort (one-hot, ``CumSum``,
  ``ScatterElements``), exact and independent of any sort's stability; each expert's FFN runs
  on its own rows only (``Slice`` by the offsets), as the eager reference does.
  ``tensorrt`` counts in float32 because TensorRT's ``CumSum`` is float-only: exact up to
  2^24 token-expert assignments per call.
* ``rotary_``, ``paged_write`` and ``paged_copy_blocks`` mutate their arguments;
  :mod:`apt_hal.compile.export` replaces them by functional twins before the ONNX translation,
  which then returns the new values (``paged_write``: ``ScatterND`` into the pool; negative slots,
  padding, write to a scratch row that is dropped, so no real slot is written twice).
* ``paged_*`` move bytes of any dtype, so they use only Gather, Scatter, Concat, Reshape and
  Cast, which ONNX Runtime implements for every type (its ``Where`` has no bfloat16): a negative
  block-table entry names a zero block appended to the pool.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Optional

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import values as onnxscript_values

from apt_hal import mxfp4

FLOAT, INT32, INT64 = ir.DataType.FLOAT, ir.DataType.INT32, ir.DataType.INT64


@dataclasses.dataclass(frozen=True)
class Profile:
    """A target: the opsets it accepts and the choices its lowerings make."""

    name: str
    description: str
    default_opset: int
    min_opset: int
    max_opset: int
    counter_dtype: ir.DataType  # integer counting in moe_permute (TensorRT's CumSum is float-only)

    def ir_version(self, opset: int) -> int:
        """The IR version written: the lowest that holds ``opset`` (runtimes reject newer ones;
        onnx 1.23 would write 14, ONNX Runtime 1.31 reads at most 13)."""
        return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])


PROFILES = {
    "onnx": Profile("onnx", "portable ONNX, validated on ONNX Runtime's CPU provider", default_opset=23,
                    min_opset=18, max_opset=25, counter_dtype=INT64),
    "tensorrt": Profile("tensorrt", "TensorRT 10.15 ONNX parser (opsets 9-24), strongly typed network",
                        default_opset=24, min_opset=18, max_opset=24, counter_dtype=FLOAT),
}

FP4_MODES = ("decode", "qdq")  # how fp4_matmul's weights are expressed
FP4_QDQ_MIN_OPSET = 24  # FLOAT8E8M0 scales
ROTARY_EMBEDDING_MIN_OPSET = 23


@dataclasses.dataclass(frozen=True)
class Target:
    """A profile at one opset with its choices resolved: what the translations read."""

    profile: Profile
    opset: int
    fp4: str  # "decode" or "qdq"

    @functools.cached_property
    def op(self):
        """The ONNX Script opset the translations build with: the target's opset exactly."""
        return onnxscript_values.Opset("", self.opset)


def resolve_target(profile: str, opset: Optional[int] = None, fp4: Optional[str] = None) -> Target:
    """Check the profile, opset and FP4 mode; fill the default (``decode``; ``qdq`` only when asked)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown target {profile!r}; expected one of {', '.join(PROFILES)}")
    p = PROFILES[profile]
    opset = p.default_opset if opset is None else opset
    if not p.min_opset <= opset <= p.max_opset:
        raise ValueError(f"target {profile!r} accepts opsets {p.min_opset}..{p.max_opset}, got --opset {opset}")
    if fp4 is None:  # TensorRT documents FP4 DequantizeLinear only as NVFP4, not MXFP4's E8M0 block-32 layout
        fp4 = "decode"
    if fp4 not in FP4_MODES:
        raise ValueError(f"fp4 must be one of {', '.join(FP4_MODES)}, got {fp4!r}")
    if fp4 == "qdq" and (profile != "tensorrt" or opset < FP4_QDQ_MIN_OPSET):
        raise ValueError(f"fp4='qdq' needs target 'tensorrt' at opset >= {FP4_QDQ_MIN_OPSET} (FLOAT8E8M0 scales); "
                         f"ONNX Runtime has no FP4 DequantizeLinear kernel, so target 'onnx' decodes")
    return Target(p, opset, fp4)


# ---------------------------------------------------------------------------------------------
# Small graph helpers (every `op` is the target opset's onnxscript Opset)
# ---------------------------------------------------------------------------------------------


def _const(op, array: np.ndarray):
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def _f32(op, x):
    return x if x.dtype == FLOAT else op.Cast(x, to=FLOAT)


def _to(op, x, dtype: ir.DataType):
    """The float32 value ``x`` rounded once to ``dtype``."""
    return x if dtype == FLOAT else op.Cast(x, to=dtype)


def _scalar_dim(op, x, axis: int):
    """``x.shape[axis]`` as a 0-d int64 tensor (dynamic dimensions included)."""
    return op.Squeeze(op.Shape(x, start=axis, end=axis + 1))


def _rank(x) -> int:
    return len(x.shape)


@functools.lru_cache(maxsize=None)
def _byte_table() -> np.ndarray:
    """[256, 2] float32: the two E2M1 values of each byte, element 2i (low nibble) first."""
    e2m1 = mxfp4.e2m1_table(torch.float32).numpy()
    codes = np.arange(256)
    return np.stack([e2m1[codes & 0xF], e2m1[codes >> 4]], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _scale_table() -> np.ndarray:
    """[256] float32: 2^(e-127) for e < 255 (exact; 2^-127 is a float32 subnormal), NaN for 0xFF."""
    finite = np.ldexp(np.float32(1.0), np.arange(mxfp4.E8M0_NAN) - mxfp4.E8M0_BIAS).astype(np.float32)
    return np.append(finite, np.float32(np.nan))


def decode_mxfp4(t: Target, packed, scales):
    """uint8 ``packed [..., K/2]`` and ``scales [..., K/32]`` -> float32 ``[..., K]``, exactly.

    With ``t.fp4 == "qdq"`` a ``DequantizeLinear`` along the last axis instead (see
    :func:`retype_fp4_weights`); its values are the same.
    """
    op = t.op
    for name, v in (("packed", packed), ("scales", scales)):
        if v.dtype != ir.DataType.UINT8:
            raise TypeError(f"MXFP4 {name} must be stored as uint8 for export, got {v.dtype}; "
                            "view torch's float4_e2m1fn_x2/float8_e8m0fnu storage with apt_hal.mxfp4.from_torch_dtypes")
    lead = [0] * (_rank(packed) - 1)  # Reshape's 0 copies a dimension: shapes may be symbolic
    if t.fp4 == "qdq":
        return op.DequantizeLinear(packed, scales, axis=_rank(packed) - 1, block_size=mxfp4.BLOCK,
                                   output_dtype=FLOAT)
    pairs = op.Gather(_const(op, _byte_table()), op.Cast(packed, to=INT32))  # [..., K/2, 2]
    blocks = op.Reshape(pairs, lead + [-1, mxfp4.BLOCK])  # [..., K/32, 32]
    scale = op.Gather(_const(op, _scale_table()), op.Cast(scales, to=INT32))  # [..., K/32]
    return op.Reshape(op.Mul(blocks, op.Unsqueeze(scale, [-1])), lead + [-1])


# ---------------------------------------------------------------------------------------------
# fp4_matmul
# ---------------------------------------------------------------------------------------------


def fp4_matmul(t: Target, x, w_packed, w_scales, bias=None):
    op = t.op
    w = decode_mxfp4(t, w_packed, w_scales)  # [N, K]
    y = op.MatMul(_f32(op, x), op.Transpose(w, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, _f32(op, bias))
    return _to(op, y, x.dtype)


# ---------------------------------------------------------------------------------------------
# rotary
# ---------------------------------------------------------------------------------------------


def rotary(t: Target, q, k, positions, cos_sin_cache, style="neox"):
    static_heads = isinstance(q.shape[2], int) and isinstance(k.shape[2], int)  # RotaryEmbedding's num_heads
    if t.opset >= ROTARY_EMBEDDING_MIN_OPSET and q.dtype == FLOAT and static_heads:
        return _rotary_standard(t, q, positions, cos_sin_cache, style), \
            _rotary_standard(t, k, positions, cos_sin_cache, style)
    return _rotary_decomposed(t, q, k, positions, cos_sin_cache, style)


def _rotary_standard(t: Target, x, positions, cache, style):
    """ONNX RotaryEmbedding on ``x [B, S, H, D]`` viewed as ``[B, S, H*D]``."""
    op = t.op
    half = cache.shape[1] // 2
    cos = op.Slice(cache, [0], [half], [1])
    sin = op.Slice(cache, [half], [2 * half], [1])
    y = op.RotaryEmbedding(op.Reshape(x, [0, 0, -1]), cos, sin, op.Cast(positions, to=INT64),
                           interleaved=int(style == "gptj"), num_heads=x.shape[2], rotary_embedding_dim=2 * half)
    return op.Reshape(y, op.Shape(x))


def _rotary_decomposed(t: Target, q, k, positions, cache, style):
    """The reference's arithmetic: float32, ``a*cos - b*sin`` and ``b*cos + a*sin``, one rounding."""
    op = t.op
    half = cache.shape[1] // 2
    cs = op.Unsqueeze(op.Gather(cache, op.Cast(positions, to=INT64)), [2])  # [B, S, 1, R]
    cos = op.Slice(cs, [0], [half], [3])
    sin = op.Slice(cs, [half], [2 * half], [3])

    def rotate(x):
        xf = _f32(op, x)
        d = x.shape[3]
        if style == "neox":
            a = op.Slice(xf, [0], [half], [3])
            b = op.Slice(xf, [half], [2 * half], [3])
        else:
            a = op.Slice(xf, [0], [2 * half], [3], [2])
            b = op.Slice(xf, [1], [2 * half], [3], [2])
        ra = op.Sub(op.Mul(a, cos), op.Mul(b, sin))
        rb = op.Add(op.Mul(b, cos), op.Mul(a, sin))
        if style == "neox":
            out = op.Concat(ra, rb, axis=3)
        else:  # interleave the pairs back: [..., R/2, 2] -> [..., R]
            out = op.Reshape(op.Concat(op.Unsqueeze(ra, [4]), op.Unsqueeze(rb, [4]), axis=4), [0, 0, 0, -1])
        if 2 * half < d:
            out = op.Concat(out, op.Slice(xf, [2 * half], [d], [3]), axis=3)
        return _to(op, out, x.dtype)

    return rotate(q), rotate(k)


# ---------------------------------------------------------------------------------------------
# moe: route, permute, experts, combine
# ---------------------------------------------------------------------------------------------


def moe_route(t: Target, router_logits, top_k, scoring="softmax_topk", renormalize=False):
    op = t.op
    logits = _f32(op, router_logits)
    if scoring == "softmax_topk":
        weights, ids = op.TopK(op.Softmax(logits, axis=-1), [top_k], axis=-1, largest=1, sorted=1)
        if renormalize:
            weights = op.Div(weights, op.ReduceSum(weights, [-1], keepdims=1))
    else:
        top, ids = op.TopK(logits, [top_k], axis=-1, largest=1, sorted=1)
        weights = op.Softmax(top, axis=-1)
    return weights, op.Cast(ids, to=INT32)


def moe_permute(t: Target, topk_ids, num_experts, capacity=-1):
    """A counting sort. In priority order (first choices of all tokens, then second choices, ...)
    each assignment's rank within its expert is a cumulative count; its row in the output is its
    expert's start plus that rank (kept ones), or past the kept rows (dropped ones)."""
    op = t.op
    c = t.profile.counter_dtype
    ids = op.Cast(topk_ids, to=INT64)  # [T, k]
    experts = op.Reshape(op.Transpose(ids, perm=[1, 0]), [-1])  # [S] in priority order
    s = _scalar_dim(op, experts, 0)
    assignment = op.Reshape(op.Transpose(op.Reshape(op.Range(0, s, 1), op.Shape(ids)), perm=[1, 0]), [-1])
    onehot = op.Cast(op.Equal(op.Unsqueeze(experts, [1]), op.Range(0, num_experts, 1)), to=c)  # [S, E]
    before = op.CumSum(onehot, op.Constant(value_int=0), exclusive=1)  # same-expert assignments before
    rank = op.ReduceSum(op.Mul(onehot, before), [1], keepdims=0)  # [S]
    counts = op.ReduceSum(onehot, [0], keepdims=0)  # [E]
    if not (isinstance(capacity, int) and capacity < 0):  # a symbolic capacity (from T) is never -1
        cap = op.CastLike(capacity, counts)
        kept_counts = op.Min(counts, cap)
        kept_starts = op.CumSum(kept_counts, op.Constant(value_int=0), exclusive=1)
        dropped_starts = op.Add(op.CumSum(op.Sub(counts, kept_counts), op.Constant(value_int=0), exclusive=1),
                                op.ReduceSum(kept_counts, [0], keepdims=1))
        row = op.Where(op.Less(rank, cap), op.Add(op.Gather(kept_starts, experts), rank),
                       op.Add(op.Gather(dropped_starts, experts), op.Sub(rank, cap)))
    else:
        kept_counts = counts
        row = op.Add(op.Gather(op.CumSum(counts, op.Constant(value_int=0), exclusive=1), experts), rank)
    order = op.ScatterElements(op.Expand(op.Constant(value_int=0), op.Unsqueeze(s, [0])), op.Cast(row, to=INT64),
                               assignment, axis=0)
    kept_ends = op.Cast(op.CumSum(kept_counts, op.Constant(value_int=0)), to=INT64)
    offsets = op.Concat(op.Constant(value_ints=[0]), kept_ends, axis=0)
    return op.Cast(order, to=INT32), offsets


def _activate(op, h, u: int, activation, alpha, limit):
    """The contract's expert activation on float32 ``h [rows, u]``, in the reference's operation order."""
    if activation == "swiglu":
        f = u // 2
        gate, up = op.Slice(h, [0], [f], [1]), op.Slice(h, [f], [2 * f], [1])
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    if activation == "gelu":  # erf form: x * 0.5 * (1 + erf(x / sqrt(2)))
        return op.Mul(op.Mul(h, 0.5), op.Add(op.Erf(op.Mul(h, float(np.float32(1 / np.sqrt(2))))), 1.0))
    gate = op.Min(op.Slice(h, [0], [u], [1], [2]), op.Constant(value_float=limit))  # clamp(max=limit)
    up = op.Clip(op.Slice(h, [1], [u], [1], [2]), -float(limit), float(limit))
    return op.Mul(op.Mul(op.Add(up, 1.0), gate), op.Sigmoid(op.Mul(gate, float(alpha))))


def moe_experts(t: Target, x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales=None,
                w_down_scales=None, b_up=None, b_down=None, top_k=1, activation="swiglu", alpha=1.702, limit=7.0):
    """Each expert's FFN on its own rows ``[offsets[e], offsets[e+1])`` (unrolled over the static
    expert count); the dropped rows past ``offsets[E]`` are zeros."""
    op = t.op
    num_experts, u = w_up.shape[0], w_up.shape[1]
    rows = op.Gather(_f32(op, x), op.Div(op.Cast(sorted_assignments, to=INT64), op.Constant(value_int=top_k)))
    if w_up_scales is not None:
        w_up, w_down = decode_mxfp4(t, w_up, w_up_scales), decode_mxfp4(t, w_down, w_down_scales)
    w_up_t = op.Transpose(_f32(op, w_up), perm=[0, 2, 1])  # [E, d, U]
    w_down_t = op.Transpose(_f32(op, w_down), perm=[0, 2, 1])  # [E, F, d]
    outs = []
    for e in range(num_experts):
        lo, hi = op.Slice(expert_offsets, [e], [e + 1]), op.Slice(expert_offsets, [e + 1], [e + 2])
        h = op.MatMul(op.Slice(rows, lo, hi, [0]), op.Gather(w_up_t, op.Constant(value_int=e)))
        if b_up is not None:
            h = op.Add(h, op.Gather(_f32(op, b_up), op.Constant(value_int=e)))
        out = op.MatMul(_activate(op, h, u, activation, alpha, limit), op.Gather(w_down_t, op.Constant(value_int=e)))
        if b_down is not None:
            out = op.Add(out, op.Gather(_f32(op, b_down), op.Constant(value_int=e)))
        outs.append(out)
    kept = op.Concat(*outs, axis=0)
    s = op.Shape(sorted_assignments)
    dropped_shape = op.Concat(op.Sub(s, op.Shape(kept, start=0, end=1)), op.Shape(x, start=1, end=2), axis=0)
    zeros = op.ConstantOfShape(dropped_shape, value=ir.tensor(np.zeros(1, np.float32)))
    return _to(op, op.Concat(kept, zeros, axis=0), x.dtype)


def moe_combine(t: Target, y, sorted_assignments, expert_offsets, topk_weights):
    """``out[t] = sum_j w[t, j] * y[row of t*k+j]`` over kept assignments, in ``j`` order."""
    op = t.op
    k = topk_weights.shape[1]
    order = op.Cast(sorted_assignments, to=INT64)
    s = _scalar_dim(op, order, 0)
    row_of = op.ScatterElements(op.Expand(op.Constant(value_int=0), op.Unsqueeze(s, [0])), order,
                                op.Range(0, s, 1), axis=0)  # assignment -> row
    kept = op.Reshape(op.Less(row_of, op.Slice(expert_offsets, [-1], [2 ** 62])), [-1, k])  # [T, k]
    contrib = op.Reshape(op.Gather(_f32(op, y), row_of), op.Concat(op.Constant(value_ints=[-1, k]),
                                                                    op.Shape(y, start=1, end=2), axis=0))
    weights = op.Where(kept, topk_weights, 0.0)
    out = None
    for j in range(k):
        keep_j = op.Slice(kept, [j], [j + 1], [1])  # [T, 1]
        term = op.Mul(op.Slice(weights, [j], [j + 1], [1]),
                      op.Where(keep_j, op.Squeeze(op.Slice(contrib, [j], [j + 1], [1]), [1]), 0.0))
        out = term if out is None else op.Add(out, term)
    return _to(op, out, y.dtype)


# ---------------------------------------------------------------------------------------------
# paged_tensor
# ---------------------------------------------------------------------------------------------


def paged_gather(t: Target, cache, block_table):
    """Gather from the pool with one zero block appended, which negative entries name: only
    Gather, Concat and Cast, which move any dtype's bytes (ONNX Runtime's Where has no bfloat16)."""
    op = t.op
    zero = op.Expand(op.CastLike(0, cache), op.Concat(op.Constant(value_ints=[1]), op.Shape(cache, start=1), axis=0))
    padded = op.Concat(cache, zero, axis=0)
    ids = op.Cast(block_table, to=INT64)
    ids = op.Where(op.Less(ids, op.Constant(value_int=0)), _scalar_dim(op, cache, 0), ids)
    return op.Gather(padded, ids, axis=0)


def paged_write(t: Target, cache, values, slot_mapping):
    """The new pool: ``cache`` with ``values[t]`` in slot ``slot_mapping[t]`` (negative: skipped)."""
    op = t.op
    item = op.Shape(cache, start=2)
    flat = op.Reshape(cache, op.Concat(op.Constant(value_ints=[-1]), item, axis=0))  # [slots, *item]
    slots = _scalar_dim(op, flat, 0)
    scratch = op.Expand(op.CastLike(0, cache), op.Concat(op.Constant(value_ints=[1]), item, axis=0))
    padded = op.Concat(flat, scratch, axis=0)  # a scratch row for the skipped tokens
    slot = op.Cast(slot_mapping, to=INT64)
    target = op.Where(op.Less(slot, op.Constant(value_int=0)), slots, slot)
    written = op.ScatterND(padded, op.Unsqueeze(target, [1]), values)
    return op.Reshape(op.Slice(written, [0], op.Unsqueeze(slots, [0]), [0]), op.Shape(cache))


def paged_copy_blocks(t: Target, src, src_ids, dst, dst_ids):
    """The new ``dst``: ``dst[dst_ids[i]] = src[src_ids[i]]`` (ids unique, as the contract requires)."""
    op = t.op
    blocks = op.Gather(src, op.Cast(src_ids, to=INT64), axis=0)
    return op.ScatterND(dst, op.Unsqueeze(op.Cast(dst_ids, to=INT64), [1]), blocks)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lowering:
    translate: Callable  # (target, *op args) -> ONNX values
    how: str  # one line for people: what the graph holds, and why


_DECODE = "exact MXFP4 decode (256-entry byte and scale tables, Gather) + MatMul in float32"
_ROTARY = ("RotaryEmbedding (opset >= 23, float32); else the exact float32 decomposition "
           "(Gather cos/sin by position, Mul/Sub/Add, Concat)")
_COMMON = {
    "moe_route": "Softmax + TopK (ties to the lower index, as the contract) [+ ReduceSum renormalization]",
    "moe_experts": "Gather rows; per expert Slice(offsets) + MatMul + activation + MatMul, MXFP4 weights as "
                   "fp4_matmul's; zero rows for dropped",
    "moe_combine": "ScatterElements (assignment -> row), Gather, Where, weighted Add in choice order",
    "paged_write": "ScatterND into the pool (functional twin; negative slots go to a dropped scratch row)",
    "paged_gather": "Gather from the pool with a zero block appended (negative table entries name it)",
    "paged_copy_blocks": "Gather + ScatterND (functional twin returning the new destination pool)",
}
_TRANSLATIONS = {"fp4_matmul": fp4_matmul, "rotary": rotary, "moe_route": moe_route, "moe_permute": moe_permute,
                 "moe_experts": moe_experts, "moe_combine": moe_combine, "paged_write": paged_write,
                 "paged_gather": paged_gather, "paged_copy_blocks": paged_copy_blocks}

LOWERINGS: dict[str, dict[str, Lowering]] = {
    "onnx": {
        "fp4_matmul": Lowering(fp4_matmul, _DECODE + " (ONNX Runtime has no FP4 DequantizeLinear kernel)"),
        "rotary": Lowering(rotary, _ROTARY),
        "moe_permute": Lowering(moe_permute, "counting sort: one-hot, CumSum (int64), ScatterElements"),
        **{name: Lowering(_TRANSLATIONS[name], how) for name, how in _COMMON.items()},
    },
    "tensorrt": {
        "fp4_matmul": Lowering(fp4_matmul, _DECODE + " (TensorRT documents FP4 only as NVFP4: FP8 scales, block "
                                           "16); fp4='qdq': DequantizeLinear FLOAT4E2M1 + FLOAT8E8M0 block-32 scales "
                                           "(opset 24) + MatMul"),
        "rotary": Lowering(rotary, _ROTARY + " (TensorRT parses RotaryEmbedding from 10.15)"),
        "moe_permute": Lowering(moe_permute, "counting sort: one-hot, CumSum in float32 (TensorRT's CumSum is "
                                             "float-only; exact below 2^24 assignments), ScatterElements"),
        **{name: Lowering(_TRANSLATIONS[name], how) for name, how in _COMMON.items()},
    },
}
# rotary_ (in place) is exported as rotary: the functionalization pass rewrites it (see export.py).


def translation_table(target: Target, op_targets: dict[str, object]) -> dict:
    """``{torch op overload: translation}`` for ``torch.onnx.export``; ``op_targets`` maps each op
    name to the overload the exported graph calls (the functional twins for mutating ops)."""
    table = LOWERINGS[target.profile.name]
    return {overload: _bind(table[name].translate, target) for name, overload in op_targets.items()}


def _bind(translate: Callable, target: Target) -> Callable:
    """``translate`` with its target bound: the signature the exporter sees is the op's own."""

    def translation(*args, **kwargs):
        return translate(target, *args, **kwargs)

    sig = inspect.signature(translate)
    translation.__name__ = translate.__name__
    translation.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return translation


def retype_fp4_weights(model) -> int:
    """Give the uint8 operands of every blocked FP4 ``DequantizeLinear`` their ONNX types, in place.

    ``packed [..., K/2]`` uint8 becomes FLOAT4E2M1 ``[..., K]`` and ``scales`` FLOAT8E8M0: the same
    bytes (ONNX packs FLOAT4E2M1 two per byte, the first element in the low nibble, as MXFP4 storage
    does). The operands must be initializers (module buffers, parameters): a graph input cannot be
    retyped. Returns the number of nodes changed.
    """
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        packed, scales = (inits.get(name) for name in node.input[:2])
        if packed is None or scales is None:
            raise ValueError(f"FP4 DequantizeLinear node {node.name!r}: its weights {list(node.input[:2])} must "
                             "be initializers (module buffers) to be typed FLOAT4E2M1/FLOAT8E8M0; export with "
                             "fp4='decode'")
        if packed.data_type != onnx.TensorProto.UINT8 or scales.data_type != onnx.TensorProto.UINT8:
            continue
        raw_p, raw_s = onnx.numpy_helper.to_array(packed).tobytes(), onnx.numpy_helper.to_array(scales).tobytes()
        packed.ClearField("int32_data")
        scales.ClearField("int32_data")
        packed.data_type, packed.raw_data = onnx.TensorProto.FLOAT4E2M1, raw_p
        packed.dims[-1] *= 2
        scales.data_type, scales.raw_data = onnx.TensorProto.FLOAT8E8M0, raw_s
        changed += 1
    return changed


# The compute dtypes whose lowest finite value float32 holds exactly: the additive mask is built in
# float32 (ONNX Runtime's Where has no bfloat16) and cast once, without rounding.
_MASK_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
                onnx.TensorProto.BFLOAT16: torch.bfloat16}


def additive_attention_masks(model) -> int:
    """Feed every ``Attention`` node whose ``attn_mask`` is BOOL an additive mask instead, in place,
    in the main graph and every subgraph: ``Where(mask, 0, lowest)`` in float32 (ONNX Runtime's
    Where has no bfloat16; float32 holds every ``lowest`` used here exactly), cast to the
    node's query dtype when it is float16 or bfloat16. Returns the number of nodes changed.

    Why: torch exports ``scaled_dot_product_attention``'s boolean mask as a BOOL ``attn_mask``,
    which TensorRT's operator list does not take (its Attention types are FP32, FP16, BF16, INT8,
    FP8); a float mask is added to the scores, so an entry of ``lowest`` drops its key exactly as
    False does (its softmax weight underflows to 0). ``lowest`` is the query dtype's lowest finite
    value, not ``-inf`` and not a -1e4 class constant: for a row with no key to attend to, ONNX
    Runtime gives the BOOL mask and a mask of ``lowest`` the same output (zeros, float32 and
    float16 alike), while ``-inf`` makes a plain softmax NaN (``-inf - -inf``) and -1e4 gives
    a softmax over the masked keys (every score shifted alike), not zeros. (apt_hal's models
    never emit such a row: ``apt_hal.models.layers.attention_mask`` lets it attend to every key.)
    The ``onnx`` target keeps the BOOL mask: ONNX Runtime runs it and the graph is smaller.
    """
    graphs = list(_all_graphs(model.graph))
    types = _elem_types(graphs)
    if any(n.op_type == "Attention" and len(n.input) > 3 and {n.input[0], n.input[3]} - {""} - set(types)
           for g in graphs for n in g.node):  # a type the exporter did not declare: infer it
        types.update(_elem_types(list(_all_graphs(onnx.shape_inference.infer_shapes(model).graph))))
    taken = {name for g in graphs for node in g.node for name in [*node.input, *node.output]} | \
        {v.name for g in graphs for v in [*g.input, *g.output, *g.initializer]}
    return _additive_masks_in(model.graph, types, taken)


def _all_graphs(graph):
    """``graph`` and every subgraph inside it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        yield from (g for sub in _subgraphs(node) for g in _all_graphs(sub))


def _subgraphs(node) -> list:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _elem_types(graphs) -> dict:
    """The element type of every value ``graphs`` declare (inputs, outputs, value_info,
    initializers), by name."""
    types = {}
    for g in graphs:
        types.update({v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]
                      if v.type.tensor_type.elem_type})
        types.update({i.name: i.data_type for i in g.initializer})
    return types


def _additive_masks_in(graph, types: dict, taken: set) -> int:
    """:func:`additive_attention_masks` on ``graph`` (its subgraphs first); new value names avoid
    ``taken`` (every name of the model: a subgraph sees its outer scopes) and join it."""
    changed = sum(_additive_masks_in(sub, types, taken) for node in graph.node for sub in _subgraphs(node))

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    made: dict = {}  # (bool mask, dtype) -> its additive mask: one per mask, however many layers share it
    nodes, own = [], 0
    for node in graph.node:
        mask = node.input[3] if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and \
            len(node.input) > 3 else ""
        dtype = types.get(node.input[0]) if mask else None
        if mask and types.get(mask) == onnx.TensorProto.BOOL and dtype in _MASK_DTYPES:
            if (mask, dtype) not in made:
                nodes += _additive_mask_nodes(graph, mask, dtype, fresh)
                made[(mask, dtype)] = nodes[-1].output[0]
            node.input[3] = made[(mask, dtype)]
            own += 1
        nodes.append(node)
    if own:
        nodes = [_copy(n) for n in nodes]  # graph.node is rebuilt: hold no references into it
        del graph.node[:]
        graph.node.extend(nodes)
    return changed + own


def _copy(node):
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _additive_mask_nodes(graph, mask: str, dtype: int, fresh: Callable[[str], str]) -> list:
    """``Where(mask, 0, lowest)`` in float32 (then a Cast to ``dtype`` unless float32), ``lowest``
    being ``dtype``'s lowest finite value; the two scalars become initializers of ``graph``, the
    last node's output is the additive mask."""
    zero, neg, where = fresh(f"{mask}_zero"), fresh(f"{mask}_lowest"), fresh(f"{mask}_additive")
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.0, np.float32), zero),
                              onnx.numpy_helper.from_array(np.array(torch.finfo(_MASK_DTYPES[dtype]).min,
                                                                    np.float32), neg)])
    nodes = [onnx.helper.make_node("Where", [mask, zero, neg], [where], name=where)]
    if dtype != onnx.TensorProto.FLOAT:
        cast = fresh(f"{mask}_additive_{onnx.TensorProto.DataType.Name(dtype).lower()}")
        nodes.append(onnx.helper.make_node("Cast", [where], [cast], name=cast, to=dtype))
    return nodes
