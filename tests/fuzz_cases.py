"""Generated calls of every public op for tests/test_fuzz_ops.py: a valid call built from a drawn
seed and sizes, then (usually) one mutation that may make it invalid (wrong shape, dtype or
device, a non-tensor, a strided or expanded layout, NaN/Inf, an out-of-range index, a float where
an int belongs). The contract's reference decides what is invalid; these builders only propose.

Shapes are tiny: Triton's interpreter runs every program instance in Python.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from hypothesis import strategies as st

from apt_hal import mxfp4, ops
from apt_hal.conformance.spec import random_bytes

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INDEX = (torch.int32, torch.int64)


@dataclasses.dataclass
class Call:
    op: object  # an apt_hal Op
    args: list
    dtype: torch.dtype  # the input dtype the tolerance table is keyed by
    reduction: int = 1  # the longest reduction, for tolerances per sqrt(K)
    mutation: str = "valid"
    invalid_index: Optional[str] = None  # the argument holding an out-of-range index, if any
    cpu_args: Optional[list] = None  # the arguments before they were moved to the meta device

    @property
    def names(self) -> list[str]:
        return self.op._names


# ---- layouts with the same values -------------------------------------------------------------


def strided_like(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t``'s values in a view whose dimension ``dim`` has twice the dense stride."""
    shape = list(t.shape)
    shape[dim] *= 2
    # Filled and copied as same-size integers: torch has no fill or copy for its fp4/e8m0 dtypes.
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    base = torch.zeros(shape, dtype=bits, device=t.device)
    index = [slice(None)] * t.dim()
    index[dim] = slice(None, None, 2)
    view = base[tuple(index)]
    view.copy_(t.view(bits))
    return view.view(t.dtype)


def to_meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s shape, dtype and strides (``.to("meta")`` would make it dense)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def twin(t):
    """A copy of ``t`` with the same strides and storage offset (so an expanded or strided view
    stays one): the reference mutates twins, the backend the originals."""
    if not isinstance(t, torch.Tensor):
        return t
    storage = t.untyped_storage()
    copy = storage.clone() if not t.is_meta else storage
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(copy, t.storage_offset(), t.shape, t.stride())


def set_flat(t: torch.Tensor, i: int, value) -> None:
    """``t.flatten()[i] = value`` in place, whatever ``t``'s strides."""
    t[tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape))] = value


# ---- seeds and values -------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ---- mutations ---------------------------------------------------------------------------------

GENERIC = ("non_tensor", "dtype", "ndim", "mixed_meta", "all_meta", "strided", "strided_first", "none")


def mutate_generic(draw, call: Call, kinds, tensor_positions) -> None:
    """Apply one generic mutation, drawn from ``kinds``, to a drawn tensor argument."""
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return
    if kind == "all_meta":
        call.cpu_args = list(call.args)
        metas = {}  # one meta tensor per CPU tensor, so an argument passed twice stays one
        call.args = [metas.setdefault(id(a), to_meta(a)) if isinstance(a, torch.Tensor) else a for a in call.args]
        call.mutation = "all_meta"
        return
    present = [i for i in tensor_positions if isinstance(call.args[i], torch.Tensor)]
    if not present:
        return
    if kind == "strided_each":  # the same values, some operands in a strided layout
        strided = []
        for i in present:
            a = call.args[i]
            if a.dim() and draw(st.booleans()):
                call.args[i] = strided_like(a, draw(st.integers(0, a.dim() - 1)))
                strided.append(call.names[i])
        call.mutation = f"strided {', '.join(strided)}"
        return
    i = draw(st.sampled_from(present))
    a = call.args[i]
    name = call.names[i]
    if a.element_size() == 1:
        a = a.view(torch.uint8)  # torch's float4/float8 storage has no tolist() or conversions
    if kind == "non_tensor":
        call.args[i] = draw(st.sampled_from([a.tolist() if a.numel() < 64 else 1.5, 3, "x"]))
    elif kind == "dtype":
        choices = [d for d in (torch.float64, torch.float32, torch.float16, torch.int8, torch.int32, torch.int64,
                               torch.uint8, torch.bool) if d != a.dtype]
        call.args[i] = a.to(draw(st.sampled_from(choices)))
    elif kind == "ndim":
        call.args[i] = a.unsqueeze(0) if draw(st.booleans()) or a.dim() == 0 else a[0] if a.shape[0] else a.sum(0)
    elif kind == "mixed_meta":
        call.args[i] = a.to("meta")
        if all(t.is_meta for t in call.args if isinstance(t, torch.Tensor)):  # its only tensor
            call.cpu_args = [a if j == i else t for j, t in enumerate(call.args)]
    elif kind in ("strided", "strided_first"):
        if a.dim() == 0:
            return
        call.args[i] = strided_like(a, 0 if kind == "strided_first" else a.dim() - 1)
    call.mutation = f"{kind}:{name}"


# ---- builders, one per op: (draw, backend-independent) -> Call ------------------------------------


def _maybe_nonfinite(draw, g, t: torch.Tensor, what=(math.nan, math.inf, -math.inf)) -> str:
    if t.numel() and draw(st.integers(0, 4)) == 0:
        value = draw(st.sampled_from(what))
        set_flat(t, int(torch.randint(t.numel(), (1,), generator=g)), value)
        return f"value {value}"
    return ""


def fp4_matmul(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    dtype = draw(st.sampled_from(FLOATS))
    k = draw(st.sampled_from((32, 64, 32, 0)))
    n = draw(st.integers(1, 4))
    lead = draw(st.sampled_from(((), (0,), (1,), (3,), (2, 2))))
    if not lead and draw(st.booleans()):
        lead = (2,)
    x = _randn(g, (*lead, k), dtype)
    packed, scales = mxfp4.quantize(_randn(g, (n, k), torch.float32))
    if draw(st.integers(0, 5)) == 0 and scales.numel():
        set_flat(scales, 0, mxfp4.E8M0_NAN)
    if mxfp4.HAS_TORCH_FP4 and draw(st.integers(0, 5)) == 0:
        packed, scales = mxfp4.to_torch_dtypes(packed, scales)
    bias = _randn(g, (n,), dtype) if draw(st.booleans()) else None
    call = Call(ops.fp4_matmul, [x, packed, scales, bias], dtype, reduction=max(k, 1))
    note = _maybe_nonfinite(draw, g, x)
    if note:
        call.mutation = note
    return call


def moe_route(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    dtype = draw(st.sampled_from(FLOATS))
    t, e = draw(st.integers(0, 4)), draw(st.integers(1, 5))
    logits = _randn(g, (t, e), torch.float32)
    if draw(st.booleans()):
        logits = (logits * 2).round() / 2  # exact ties: the lower expert index wins
    logits = logits.to(dtype)
    top_k = draw(st.integers(1, e))
    scoring = draw(st.sampled_from(("softmax_topk", "topk_softmax")))
    call = Call(ops.moe_route, [logits, top_k, scoring, draw(st.booleans())], dtype)
    special = special or draw(st.sampled_from(("", "", "nonfinite", "index", "top_k", "scoring")))
    if special == "nonfinite":
        call.mutation = _maybe_nonfinite(draw, g, logits) or "valid"
    elif special == "index" and t:  # a row of all -inf: no expert to route to
        logits[draw(st.integers(0, t - 1))] = -math.inf
        call.mutation, call.invalid_index = "row of -inf", "router_logits"
    elif special == "top_k":
        call.args[1] = draw(st.sampled_from((0, e + 1, 1.5, True, -1)))
        call.mutation = f"top_k={call.args[1]!r}"
    elif special == "scoring":
        call.args[2] = draw(st.sampled_from(("softmax", "", None)))
        call.mutation = f"scoring={call.args[2]!r}"
    return call


def _topk_ids(g, t, k, e, dtype):
    """``t`` rows of ``k`` distinct experts in ``[0, e)``."""
    return torch.argsort(torch.rand((t, e), generator=g), dim=1)[:, :k].to(dtype)


def moe_permute(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    t, e = draw(st.integers(0, 5)), draw(st.integers(1, 5))
    k = draw(st.integers(1, e))
    ids = _topk_ids(g, t, k, e, draw(st.sampled_from(INDEX)))
    capacity = draw(st.integers(-1, t * k + 1))
    call = Call(ops.moe_permute, [ids, e, capacity], ids.dtype)
    special = special or draw(st.sampled_from(("", "", "index", "capacity", "num_experts")))
    if special == "index" and ids.numel():
        set_flat(ids, draw(st.integers(0, ids.numel() - 1)), draw(st.sampled_from((-1, e, e + 7, -5))))
        call.mutation, call.invalid_index = "expert id out of range", "topk_ids"
    elif special == "capacity":
        call.args[2] = draw(st.sampled_from((1.5, -2, float(capacity), None)))
        call.mutation = f"capacity={call.args[2]!r}"
    elif special == "num_experts":
        call.args[1] = draw(st.sampled_from((0, -1, 2.0)))
        call.mutation = f"num_experts={call.args[1]!r}"
    return call


def _routing(draw, g, t, k, e):
    ids = _topk_ids(g, t, k, e, torch.int64)
    capacity = draw(st.sampled_from((-1, -1, 0, 1, 2)))
    order, offsets = ops.moe_permute.reference(ids, e, capacity)
    if draw(st.booleans()):
        order = order.long()
    return order, offsets


def _break_routing(draw, call: Call, special: str, permutation_matters: bool) -> None:
    """An out-of-range (or, where a permutation is required, repeated) sorted assignment, or
    broken expert offsets; ``call.args[1:3]`` are ``sorted_assignments, expert_offsets``."""
    order, offsets = call.args[1], call.args[2]
    if special == "offsets":
        offsets[draw(st.integers(0, offsets.numel() - 1))] += draw(st.sampled_from((-1, 1, order.numel() + 1)))
        call.mutation = "expert_offsets broken"
        return
    call.mutation = _bad_assignments(draw, order, permutation_matters) or "valid"
    call.invalid_index = "sorted_assignments" if call.mutation != "valid" else None


def _bad_assignments(draw, order: torch.Tensor, permutation_matters: bool) -> str:
    s = order.numel()
    if not s:
        return ""
    kinds = ("too_large", "negative") + (("repeated",) if permutation_matters else ())
    kind = draw(st.sampled_from(kinds))
    r = draw(st.integers(0, s - 1))
    if kind == "repeated":
        order[r] = order[(r + 1) % s] if s > 1 else s
    else:
        order[r] = s + draw(st.integers(0, 3)) if kind == "too_large" else -1 - draw(st.integers(0, 3))
    return f"sorted_assignments {kind}"


def moe_experts(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    dtype = draw(st.sampled_from(FLOATS))
    quant = draw(st.integers(0, 4)) == 0
    t, e = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    k = draw(st.integers(1, e))
    activation = draw(st.sampled_from(("swiglu", "gelu", "gpt_oss_swiglu")))
    d, f = (32, 32) if quant else (draw(st.sampled_from((2, 4, 8))), draw(st.sampled_from((1, 2, 4))))
    u = f if activation == "gelu" else 2 * f
    order, offsets = _routing(draw, g, t, k, e)
    x = _randn(g, (t, d), dtype)
    if quant:
        w_up, s_up = mxfp4.quantize(_randn(g, (e, u, d), torch.float32, 0.3))
        w_down, s_down = mxfp4.quantize(_randn(g, (e, d, f), torch.float32, 0.3))
    else:
        w_up, w_down = _randn(g, (e, u, d), dtype, 0.3), _randn(g, (e, d, f), dtype, 0.3)
        s_up = s_down = None
    b_up = _randn(g, (e, u), dtype) if draw(st.booleans()) else None
    b_down = _randn(g, (e, d), dtype) if draw(st.booleans()) else None
    call = Call(ops.moe_experts, [x, order, offsets, w_up, w_down, s_up, s_down, b_up, b_down, k, activation,
                                  1.702, 7.0], dtype, reduction=d + f)
    special = special or draw(st.sampled_from(("", "", "index", "offsets", "top_k", "activation", "nonfinite")))
    if special in ("index", "offsets"):
        _break_routing(draw, call, special, permutation_matters=False)
    elif special == "top_k":
        call.args[9] = draw(st.sampled_from((0, k + 1, 1.0)))
        call.mutation = f"top_k={call.args[9]!r}"
    elif special == "activation":
        call.args[10] = draw(st.sampled_from(("relu", "")))
        call.mutation = f"activation={call.args[10]!r}"
    elif special == "nonfinite":
        call.mutation = _maybe_nonfinite(draw, g, x) or "valid"
    return call


def moe_combine(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    dtype = draw(st.sampled_from(FLOATS))
    t, e = draw(st.integers(0, 4)), draw(st.integers(1, 4))
    k = draw(st.integers(1, e))
    d = draw(st.integers(1, 5))
    order, offsets = _routing(draw, g, t, k, e)
    y = _randn(g, (t * k, d), dtype)
    weights = torch.rand((t, k), generator=g)
    call = Call(ops.moe_combine, [y, order, offsets, weights], dtype, reduction=k)
    special = special or draw(st.sampled_from(("", "", "index", "offsets", "nonfinite")))
    if special in ("index", "offsets"):
        _break_routing(draw, call, special, permutation_matters=True)
    elif special == "nonfinite":
        call.mutation = _maybe_nonfinite(draw, g, y) or "valid"
    return call


def _rotary(draw, op, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    dtype = draw(st.sampled_from(FLOATS))
    b, s = draw(st.integers(0, 2)), draw(st.integers(0, 3))
    hq = draw(st.integers(1, 3))
    hk = draw(st.sampled_from((1, hq)))
    d = draw(st.sampled_from((2, 4, 6, 8)))
    r = 2 * draw(st.integers(1, d // 2))
    p = draw(st.integers(1, 6))
    q, k = _randn(g, (b, s, hq, d), dtype), _randn(g, (b, s, hk, d), dtype)
    if draw(st.integers(0, 3)) == 0:  # heads of a fused projection: strided outside head_dim
        q = strided_like(q, 2)
    positions = torch.randint(0, p, (b, s), generator=g, dtype=draw(st.sampled_from(INDEX)))
    angles = torch.rand(p, r // 2, generator=g) * 6.3
    cache = torch.cat([angles.cos(), angles.sin()], dim=1)
    call = Call(op, [q, k, positions, cache, draw(st.sampled_from(("neox", "gptj")))], dtype)
    special = special or draw(st.sampled_from(("", "", "index", "style", "expanded", "same", "nonfinite")))
    if special == "index" and positions.numel():
        set_flat(positions, draw(st.integers(0, positions.numel() - 1)), draw(st.sampled_from((-1, p, p + 5))))
        call.mutation, call.invalid_index = "position out of range", "positions"
    elif special == "style":
        call.args[4] = draw(st.sampled_from(("interleaved", "")))
        call.mutation = f"style={call.args[4]!r}"
    elif special == "expanded" and b * s:
        i = draw(st.sampled_from((0, 1)))
        call.args[i] = call.args[i][:, :, :1].expand_as(call.args[i])
        call.mutation = f"expanded {call.names[i]}"
    elif special == "same" and hq == hk:
        call.args[1] = q
        call.mutation = "q is k"
    elif special == "nonfinite":
        call.mutation = _maybe_nonfinite(draw, g, q) or "valid"
    return call


def rotary(draw, special: str = "") -> Call:
    return _rotary(draw, ops.rotary, special)


def rotary_(draw, special: str = "") -> Call:
    return _rotary(draw, ops.rotary_, special)


POOL_DTYPES = (torch.float32, torch.bfloat16, torch.uint8, torch.int64, torch.bool)


def _pool(g, blocks, block_size, item, dtype):
    if dtype == torch.bool:
        return torch.randint(0, 2, (blocks, block_size, *item), generator=g).bool()
    return random_bytes(g, (blocks, block_size, *item), dtype)


def _pool_shape(draw):
    return (draw(st.integers(0, 3)), draw(st.integers(1, 3)),
            draw(st.sampled_from(((), (2,), (1, 3), (2, 2)))), draw(st.sampled_from(POOL_DTYPES)))


def paged_write(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    blocks, bs, item, dtype = _pool_shape(draw)
    cache = _pool(g, blocks, bs, item, dtype)
    slots = blocks * bs
    t = draw(st.integers(0, slots + 1))
    slot_mapping = torch.cat([torch.randperm(slots, generator=g), torch.full((t,), -1)])[:t]
    slot_mapping = slot_mapping[torch.randperm(t, generator=g)].to(draw(st.sampled_from(INDEX)))
    values = _pool(g, 1, t, item, dtype)[0] if t else torch.zeros((0, *item), dtype=dtype)
    call = Call(ops.paged_write, [cache, values, slot_mapping], dtype)
    special = special or draw(st.sampled_from(("", "", "index", "duplicate", "expanded")))
    if special == "index" and t:
        slot_mapping[draw(st.integers(0, t - 1))] = slots + draw(st.integers(0, 3))
        call.mutation, call.invalid_index = "slot out of range", "slot_mapping"
    elif special == "duplicate" and t >= 2 and slots:
        slot_mapping[:2] = draw(st.integers(0, slots - 1))
        call.mutation = "duplicate slot"
    elif special == "expanded" and blocks:
        call.args[0] = cache[:1].expand_as(cache)
        call.mutation = "expanded cache"
    return call


def paged_gather(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    blocks, bs, item, dtype = _pool_shape(draw)
    cache = _pool(g, blocks, bs, item, dtype)
    table_shape = draw(st.sampled_from(((0,), (1,), (3,), (2, 2), (1, 2, 2))))
    table = torch.randint(-1, max(blocks, 0), table_shape, generator=g).to(draw(st.sampled_from(INDEX)))
    call = Call(ops.paged_gather, [cache, table], dtype)
    if (special or draw(st.sampled_from(("", "", "index")))) == "index" and table.numel():
        set_flat(table, draw(st.integers(0, table.numel() - 1)), blocks + draw(st.integers(0, 3)))
        call.mutation, call.invalid_index = "block id out of range", "block_table"
    return call


def paged_copy_blocks(draw, special: str = "") -> Call:
    g = _gen(draw(st.integers(0, 2 ** 31)))
    blocks, bs, item, dtype = _pool_shape(draw)
    dst_blocks = draw(st.integers(0, 3))
    src, dst = _pool(g, blocks, bs, item, dtype), _pool(g, dst_blocks, bs, item, dtype)
    n = draw(st.integers(0, min(blocks, dst_blocks)))
    id_dtype = draw(st.sampled_from(INDEX))
    src_ids = torch.randint(0, max(blocks, 1), (n,), generator=g).to(id_dtype)
    dst_ids = torch.randperm(dst_blocks, generator=g)[:n].to(id_dtype)
    call = Call(ops.paged_copy_blocks, [src, src_ids, dst, dst_ids], dtype)
    special = special or draw(st.sampled_from(("", "", "src_index", "dst_index", "duplicate", "expanded", "same_pool")))
    if special == "index":
        special = draw(st.sampled_from(("src_index", "dst_index")))
    if special in ("src_index", "dst_index") and n:
        ids, high = (src_ids, blocks) if special == "src_index" else (dst_ids, dst_blocks)
        ids[draw(st.integers(0, n - 1))] = draw(st.sampled_from((-1, high, high + 4)))
        call.mutation = call.invalid_index = special.replace("_index", "_ids")
    elif special == "duplicate" and n >= 2:
        dst_ids[1] = dst_ids[0]
        call.mutation = "duplicate dst id"
    elif special == "expanded" and dst_blocks:
        call.args[2] = dst[:1].expand_as(dst)
        call.mutation = "expanded dst"
    elif special == "same_pool" and n and blocks == dst_blocks:
        call.args[2] = src  # copy-on-write inside one pool
        call.mutation = "dst is src"
    return call


BUILDERS: dict[str, Callable] = {f.__name__: f for f in (
    fp4_matmul, moe_route, moe_permute, moe_experts, moe_combine, rotary, rotary_, paged_write, paged_gather,
    paged_copy_blocks)}
