"""moe_dispatch: a mixture-of-experts FFN layer as four replaceable steps.

``moe_dispatch(x, router_logits, w_up, w_down, ...)`` = route -> permute -> experts -> combine.
Each step is its own op, so a backend can replace any one of them (an NPU router feeding
generic experts, a fused grouped GEMM, an atomics-free combine).

Notation: ``T`` tokens, ``E`` experts, ``k`` experts per token, ``d`` model width, ``F`` expert
hidden width, ``S = T*k`` assignments. Assignment ``a = t*k + j`` is token ``t``'s ``j``-th choice.

1. ``moe_route(router_logits [T, E], top_k, scoring, renormalize) -> (topk_weights, topk_ids)``
   ``router_logits`` float32/bfloat16/float16. ``-inf`` means "never route to this expert": if
   it is still among a token's top ``k`` its weight is exactly 0. NaN, ``+inf`` and a row of all
   ``-inf`` are errors (value check: routing would be undefined); at check level ``"none"`` or
   ``"metadata"`` a backend gives such a row ``k`` weights of 0 (never NaN) and ids ``0 .. k-1``.
   ``scoring="softmax_topk"`` (Mixtral, Qwen-MoE, Switch): ``p = softmax(logits)`` in float32,
   the ``k`` largest ``p`` in descending order; with ``renormalize`` they are divided by their sum.
   ``scoring="topk_softmax"`` (gpt-oss): the ``k`` largest logits, then a softmax over those ``k``
   (``renormalize`` changes nothing). Ties go to the lower expert index, so every backend routes
   alike. Returns ``topk_weights`` float32 ``[T, k]`` and ``topk_ids`` int32 ``[T, k]``.
2. ``moe_permute(topk_ids [T, k], num_experts, capacity) -> (sorted_assignments, expert_offsets)``
   Orders the ``S`` assignments by expert. ``num_experts`` and ``capacity`` are ints (a float
   capacity is an error). ``capacity = -1`` is dropless. Otherwise each expert
   keeps at most ``capacity`` assignments, chosen deterministically in priority order: every
   token's first choice before any second choice, and within one choice by token index (the
   Switch/GShard rule). ``sorted_assignments`` int32 ``[S]`` lists the kept assignments grouped
   by expert (expert 0 first; inside an expert in priority order), then the dropped ones in
   (expert, priority) order. ``expert_offsets`` int64 ``[E+1]``: expert ``e`` owns rows
   ``[offsets[e], offsets[e+1])``; ``offsets[E]`` is the number kept. Ids outside ``[0, E)`` are
   an error (value check); below that check level an assignment with such an id belongs to no
   expert: it is listed among the dropped ones and counts in no offset.
3. ``moe_experts(x [T, d], sorted_assignments, expert_offsets, w_up, w_down, w_up_scales,
   w_down_scales, b_up, b_down, top_k, activation, alpha, limit) -> y [S, d]``
   Row ``r < offsets[E]`` of ``y`` is expert ``e``'s FFN (``offsets[e] <= r < offsets[e+1]``) of
   token ``sorted_assignments[r] // top_k``; rows ``>= offsets[E]`` (dropped) are 0.
   ``sorted_assignments`` must hold values in ``[0, S)`` and ``expert_offsets`` start at 0, not
   decrease and end ``<= S`` (value checks); below that check level a row whose assignment is
   out of range is 0, and offsets are read as 0 followed by the running maximum of
   ``offsets[1:]``, each clamped to ``[0, S]`` (valid offsets are read as they are).
   Weights are stacked per expert in ``nn.Linear`` layout ``[E, out, in]``: ``w_up [E, U, d]``,
   ``w_down [E, d, F]``, in ``x``'s dtype; or MXFP4 (see :mod:`apt_hal.mxfp4`) when the scales
   are given: ``w_up`` uint8 ``[E, U, d/2]`` with ``w_up_scales [E, U, d/32]``, likewise
   ``w_down``. Optional biases ``b_up [E, U]``, ``b_down [E, d]`` in ``x``'s dtype.
   ``activation`` (with ``h = x @ w_up[e]^T + b_up[e]``, ``U`` its width):
   ``"swiglu"``: ``U = 2F``, gate = ``h[:, :F]``, up = ``h[:, F:]``, ``silu(gate) * up``;
   ``"gelu"``: ``U = F``, ``gelu(h)`` (erf form);
   ``"gpt_oss_swiglu"``: ``U = 2F`` interleaved, gate = ``h[:, 0::2]``, up = ``h[:, 1::2]``,
   gate clamped above at ``limit``, up clamped to ``[-limit, limit]``,
   ``(up + 1) * gate * sigmoid(alpha * gate)``.
   Then ``y = act @ w_down[e]^T + b_down[e]``. Reference arithmetic is float32 throughout;
   implementations accumulate in float32 and may round ``act`` to ``x``'s dtype.
4. ``moe_combine(y [S, d], sorted_assignments, expert_offsets, topk_weights [T, k]) -> out [T, d]``
   ``out[t] = sum_j topk_weights[t, j] * y[row of assignment t*k+j]`` over kept assignments, in
   float32, in ``j`` order, rounded once to ``y``'s dtype. A token whose assignments were all
   dropped gets 0 (the caller's residual connection carries it). ``sorted_assignments`` must be
   a permutation of ``[0, S)`` and ``expert_offsets`` as in step 3 (value checks); below that
   check level a row whose assignment is out of range contributes nothing, and an assignment
   named by several rows takes the last of them (the highest row; nothing if that row is dropped).

``moe_dispatch`` also returns the router statistics and the auxiliary losses (:class:`MoEOutput`):
``tokens_per_expert`` (kept, int64 ``[E]``), ``dropped`` (int64 scalar), the Switch load-balance
loss ``E * sum_e f_e * P_e`` (``f_e``: fraction of the ``S`` assignments routed to ``e`` before
capacity; ``P_e``: mean softmax probability of ``e``) and the router z-loss
``mean_t logsumexp(logits_t)^2``. Both losses are differentiable with respect to the logits, are
0 for an empty batch (``T = 0``), and are computed when read.

Gradients flow through ``moe_route`` (weights w.r.t. logits), ``moe_experts`` (w.r.t. ``x``, the
unquantized weights and biases) and ``moe_combine`` (w.r.t. ``y`` and the weights).

All tensors must share one device. ``x`` may have leading dimensions; ``moe_dispatch`` flattens
them to ``T`` and restores them. Index and offset tensors, logits, ``x``, ``y`` and the weights
of step 4 may have any strides; the expert weights and their scales must be contiguous.

Invalid values: the references always run the value checks above and raise
:class:`~apt_hal.errors.ContractError`; backends run them under ``apt_hal.set_checks("values")``.
At ``"none"`` and ``"metadata"`` a backend never reads or writes out of bounds whatever the
indices hold, and gives the defined results stated in each step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from apt_hal import checks, mxfp4
from apt_hal.contract import contract, tracing, value_checks_enabled
from apt_hal.errors import ContractError

SCORINGS = ("softmax_topk", "topk_softmax")
ACTIVATIONS = ("swiglu", "gelu", "gpt_oss_swiglu")

# ---------------------------------------------------------------------------------------------
# 1. route
# ---------------------------------------------------------------------------------------------


def _check_route(router_logits, top_k, scoring, renormalize):
    checks.tensor("moe_route", "router_logits", router_logits, dtypes=checks.FLOAT_DTYPES, ndim=2)
    checks.integer("moe_route", "top_k", top_k)
    e = router_logits.shape[1]
    if not 1 <= top_k <= e:
        checks.fail("moe_route", f"argument 'top_k' must be in [1, E={e}], got {top_k}")
    checks.choice("moe_route", "scoring", scoring, SCORINGS)


def _check_route_values(router_logits, top_k, scoring, renormalize):
    checks.no_nan("moe_route", "router_logits", router_logits)
    if not router_logits.numel() or not checks.holds_values(router_logits):
        return
    if (router_logits == float("inf")).any():
        checks.fail("moe_route", "argument 'router_logits' contains +inf, which this contract does not accept "
                                 "(-inf is allowed: never route to that expert)")
    unroutable = (router_logits == float("-inf")).all(dim=1)
    if unroutable.any():
        checks.fail("moe_route", f"argument 'router_logits' has {int(unroutable.sum())} row(s) of all -inf "
                                 f"(first: token {int(unroutable.nonzero()[0])}): "
                                 "such a token has no expert to route to")


def _fake_route(router_logits, top_k, scoring, renormalize):
    t = router_logits.shape[0]
    return (router_logits.new_empty((t, top_k), dtype=torch.float32),
            router_logits.new_empty((t, top_k), dtype=torch.int32))


def _topk_lower_index_wins(v: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # A stable descending sort keeps equal values in index order: ties go to the lower expert.
    vals, idx = torch.sort(v, dim=-1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]


@contract(fake=_fake_route, check=_check_route, check_values=_check_route_values,
          differentiable=("router_logits",))
def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax_topk",
              renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing; step 1 of the apt_hal.contracts.moe_dispatch spec."""
    if value_checks_enabled():
        _check_route_values(router_logits, top_k, scoring, renormalize)
    logits = router_logits.float()
    if scoring == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        _, ids = _topk_lower_index_wins(probs, top_k)
        w = probs.gather(1, ids)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
    else:
        _, ids = _topk_lower_index_wins(logits, top_k)
        w = torch.softmax(logits.gather(1, ids), dim=-1)
    return w, ids.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# 2. permute (the dispatch step)
# ---------------------------------------------------------------------------------------------


def _check_permute(topk_ids, num_experts, capacity):
    checks.tensor("moe_permute", "topk_ids", topk_ids, dtypes=checks.INDEX_DTYPES, ndim=2)
    checks.integer("moe_permute", "num_experts", num_experts)
    checks.integer("moe_permute", "capacity", capacity)
    if num_experts < 1:
        checks.fail("moe_permute", f"argument 'num_experts' must be positive, got {num_experts}")
    if capacity < -1:
        checks.fail("moe_permute", f"argument 'capacity' must be -1 (dropless) or >= 0, got {capacity}")


def _check_permute_values(topk_ids, num_experts, capacity):
    checks.index_range("moe_permute", "topk_ids", topk_ids, 0, num_experts)


def _fake_permute(topk_ids, num_experts, capacity):
    return (topk_ids.new_empty((topk_ids.numel(),), dtype=torch.int32),
            topk_ids.new_empty((num_experts + 1,), dtype=torch.int64))


@contract(fake=_fake_permute, check=_check_permute, check_values=_check_permute_values)
def moe_permute(topk_ids: torch.Tensor, num_experts: int, capacity: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group assignments by expert, dropping over capacity; step 2 of the moe_dispatch spec."""
    if value_checks_enabled():
        _check_permute_values(topk_ids, num_experts, capacity)
    t, k = topk_ids.shape
    s = t * k
    dev = topk_ids.device
    experts = topk_ids.reshape(-1).long()  # [S], assignment a = t*k + j
    a = torch.arange(s, device=dev)
    priority = (a % k) * t + a // k  # first choices of all tokens, then second choices, ...
    order = torch.argsort(experts * s + priority)  # (expert, priority); keys are distinct
    counts = torch.bincount(experts, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(s, device=dev) - starts[experts[order]]  # rank within its expert
    keep = rank < capacity if capacity >= 0 else torch.ones_like(rank, dtype=torch.bool)
    order = order[torch.argsort((~keep).to(torch.int8), stable=True)]  # kept first, order kept
    kept_counts = torch.clamp(counts, max=capacity) if capacity >= 0 else counts
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(kept_counts, 0)])
    return order.to(torch.int32), offsets


# ---------------------------------------------------------------------------------------------
# 3. experts
# ---------------------------------------------------------------------------------------------


def _check_experts(x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales,
                   b_up, b_down, top_k, activation, alpha, limit):
    op = "moe_experts"
    checks.tensor(op, "x", x, dtypes=checks.FLOAT_DTYPES, ndim=2)
    checks.tensor(op, "sorted_assignments", sorted_assignments, dtypes=checks.INDEX_DTYPES, ndim=1)
    checks.tensor(op, "expert_offsets", expert_offsets, dtypes=(torch.int64,), ndim=1)
    checks.choice(op, "activation", activation, ACTIVATIONS)
    t, d = x.shape
    checks.integer(op, "top_k", top_k)
    if top_k < 1:
        checks.fail(op, f"argument 'top_k' must be positive, got {top_k}")
    checks.size(op, "sorted_assignments", sorted_assignments, 0, t * top_k, f"T*top_k = {t}*{top_k}")
    quant = w_up_scales is not None
    if quant != (w_down_scales is not None):
        checks.fail(op, "give both 'w_up_scales' and 'w_down_scales' (MXFP4 experts) or neither")
    wdt = (torch.uint8,) if quant else (x.dtype,)
    checks.tensor(op, "w_up", w_up, dtypes=wdt, ndim=3)
    checks.tensor(op, "w_down", w_down, dtypes=wdt, ndim=3)
    e = w_up.shape[0]
    checks.size(op, "expert_offsets", expert_offsets, 0, e + 1, f"E+1 with E={e} from 'w_up'")
    checks.size(op, "w_down", w_down, 0, e, "E from 'w_up'")
    kd = d // 2 if quant else d
    if quant and d % mxfp4.BLOCK:
        checks.fail(op, f"MXFP4 experts need d={d} to be a multiple of {mxfp4.BLOCK}")
    checks.size(op, "w_up", w_up, 2, kd, f"{'d/2' if quant else 'd'} with d={d} from 'x'")
    u = w_up.shape[1]
    f = u // 2 if activation != "gelu" else u
    if activation != "gelu" and u % 2:
        checks.fail(op, f"activation {activation!r} needs an even w_up width (gate and up), got {u}")
    checks.size(op, "w_down", w_down, 1, d, f"d={d} from 'x'")
    if quant and f % mxfp4.BLOCK:
        checks.fail(op, f"MXFP4 experts need F={f} to be a multiple of {mxfp4.BLOCK}")
    checks.size(op, "w_down", w_down, 2, f // 2 if quant else f, f"{'F/2' if quant else 'F'} with F={f}")
    if quant:
        checks.tensor(op, "w_up_scales", w_up_scales, dtypes=(torch.uint8,), ndim=3)
        checks.tensor(op, "w_down_scales", w_down_scales, dtypes=(torch.uint8,), ndim=3)
        if tuple(w_up_scales.shape) != (e, u, d // mxfp4.BLOCK):
            checks.fail(op, f"argument 'w_up_scales' must have shape {[e, u, d // mxfp4.BLOCK]}, "
                            f"got {list(w_up_scales.shape)}")
        if tuple(w_down_scales.shape) != (e, d, f // mxfp4.BLOCK):
            checks.fail(op, f"argument 'w_down_scales' must have shape {[e, d, f // mxfp4.BLOCK]}, "
                            f"got {list(w_down_scales.shape)}")
    if b_up is not None:
        checks.tensor(op, "b_up", b_up, dtypes=(x.dtype,), ndim=2)
        if tuple(b_up.shape) != (e, u):
            checks.fail(op, f"argument 'b_up' must have shape {[e, u]}, got {list(b_up.shape)}")
    if b_down is not None:
        checks.tensor(op, "b_down", b_down, dtypes=(x.dtype,), ndim=2)
        if tuple(b_down.shape) != (e, d):
            checks.fail(op, f"argument 'b_down' must have shape {[e, d]}, got {list(b_down.shape)}")
    for name, w in (("w_up", w_up), ("w_down", w_down), ("w_up_scales", w_up_scales), ("w_down_scales", w_down_scales)):
        if w is not None and not w.is_contiguous():
            checks.fail(op, f"argument '{name}' must be contiguous")
    checks.same_device(op, ("x", "sorted_assignments", "expert_offsets", "w_up", "w_down", "w_up_scales",
                            "w_down_scales", "b_up", "b_down"),
                       (x, sorted_assignments, expert_offsets, w_up, w_down, w_up_scales, w_down_scales, b_up, b_down))


def _check_offsets(op, expert_offsets, s):
    if not checks.holds_values(expert_offsets):
        return
    if expert_offsets[0] != 0 or (expert_offsets[1:] < expert_offsets[:-1]).any() or expert_offsets[-1] > s:
        checks.fail(op, f"argument 'expert_offsets' must start at 0, not decrease and end <= {s}, "
                        f"got {expert_offsets.tolist()}")


def _check_experts_values(x, sorted_assignments, expert_offsets, *rest):
    checks.index_range("moe_experts", "sorted_assignments", sorted_assignments, 0, sorted_assignments.shape[0])
    _check_offsets("moe_experts", expert_offsets, sorted_assignments.shape[0])


def _fake_experts(x, sorted_assignments, *rest):
    return x.new_empty((sorted_assignments.shape[0], x.shape[1]))


def apply_activation(h: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The expert activation of step 3, on ``h = x @ w_up^T + b_up`` (float32)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def _expert_weight(w, scales, e):
    if scales is None:
        return w[e].float()
    return mxfp4.dequantize(w[e], scales[e], torch.float32)


@contract(fake=_fake_experts, check=_check_experts, check_values=_check_experts_values,
          differentiable=("x", "w_up", "w_down", "b_up", "b_down"))
def moe_experts(x: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, w_up_scales: Optional[torch.Tensor] = None,
                w_down_scales: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
                b_down: Optional[torch.Tensor] = None, top_k: int = 1, activation: str = "swiglu",
                alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Grouped expert FFNs over expert-sorted rows; step 3 of the moe_dispatch spec."""
    if value_checks_enabled():
        _check_experts_values(x, sorted_assignments, expert_offsets)
    num_experts = w_up.shape[0]
    s = sorted_assignments.shape[0]
    rows = x.float()[sorted_assignments.long() // top_k]  # [S, d]
    y = rows.new_zeros((s, x.shape[1]))
    if not tracing():
        # Eager: compute only the rows each expert owns.
        bounds = expert_offsets.tolist()
        for e in range(num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                y[lo:hi] = _ffn(rows[lo:hi], w_up, w_down, w_up_scales, w_down_scales, b_up, b_down, e,
                                activation, alpha, limit)
    else:
        # Traced (a gradient under torch.compile): no data-dependent shapes, so every expert runs
        # on every row and a mask keeps its own; the same function, E/k times the arithmetic.
        r = torch.arange(s, device=x.device)
        owner = torch.searchsorted(expert_offsets, r, right=True) - 1  # == E for dropped rows
        for e in range(num_experts):
            ye = _ffn(rows, w_up, w_down, w_up_scales, w_down_scales, b_up, b_down, e, activation, alpha, limit)
            y = torch.where((owner == e).unsqueeze(1), ye, y)
    return y.to(x.dtype)


def _ffn(rows, w_up, w_down, w_up_scales, w_down_scales, b_up, b_down, e, activation, alpha, limit):
    h = rows @ _expert_weight(w_up, w_up_scales, e).T
    if b_up is not None:
        h = h + b_up[e].float()
    out = apply_activation(h, activation, alpha, limit) @ _expert_weight(w_down, w_down_scales, e).T
    if b_down is not None:
        out = out + b_down[e].float()
    return out


# ---------------------------------------------------------------------------------------------
# 4. combine
# ---------------------------------------------------------------------------------------------


def _check_combine(y, sorted_assignments, expert_offsets, topk_weights):
    op = "moe_combine"
    checks.tensor(op, "y", y, dtypes=checks.FLOAT_DTYPES, ndim=2)
    checks.tensor(op, "sorted_assignments", sorted_assignments, dtypes=checks.INDEX_DTYPES, ndim=1)
    checks.tensor(op, "expert_offsets", expert_offsets, dtypes=(torch.int64,), ndim=1)
    checks.tensor(op, "topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2)
    s = topk_weights.numel()
    checks.size(op, "y", y, 0, s, "T*k from 'topk_weights'")
    checks.size(op, "sorted_assignments", sorted_assignments, 0, s, "T*k from 'topk_weights'")
    if expert_offsets.shape[0] < 1:
        checks.fail(op, "argument 'expert_offsets' must have E+1 >= 1 elements, got none")
    checks.same_device(op, ("y", "sorted_assignments", "expert_offsets", "topk_weights"),
                       (y, sorted_assignments, expert_offsets, topk_weights))


def _check_combine_values(y, sorted_assignments, expert_offsets, topk_weights):
    checks.permutation("moe_combine", "sorted_assignments", sorted_assignments)
    _check_offsets("moe_combine", expert_offsets, sorted_assignments.shape[0])


def _fake_combine(y, sorted_assignments, expert_offsets, topk_weights):
    return y.new_empty((topk_weights.shape[0], y.shape[1]))


@contract(fake=_fake_combine, check=_check_combine, check_values=_check_combine_values,
          differentiable=("y", "topk_weights"))
def moe_combine(y: torch.Tensor, sorted_assignments: torch.Tensor, expert_offsets: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs; step 4 of the moe_dispatch spec."""
    if value_checks_enabled():
        _check_combine_values(y, sorted_assignments, expert_offsets, topk_weights)
    t, k = topk_weights.shape
    s = t * k
    row_of = torch.empty(s, dtype=torch.long, device=y.device)
    row_of[sorted_assignments.long()] = torch.arange(s, device=y.device)  # assignment -> row
    kept = (row_of < expert_offsets[-1]).reshape(t, k)
    contrib = y.float()[row_of].reshape(t, k, y.shape[1])  # [T, k, d]
    w = torch.where(kept, topk_weights, torch.zeros((), device=y.device))
    out = torch.zeros((t, y.shape[1]), dtype=torch.float32, device=y.device)
    for j in range(k):  # in j order, as the spec states
        out = out + w[:, j:j + 1] * torch.where(kept[:, j:j + 1], contrib[:, j], torch.zeros((), device=y.device))
    return out.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# The whole layer
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MoEOutput:
    """What :func:`moe_dispatch` returns."""

    output: torch.Tensor  # shaped like x
    topk_ids: torch.Tensor  # int32 [T, k]
    topk_weights: torch.Tensor  # float32 [T, k]
    tokens_per_expert: torch.Tensor  # int64 [E], kept assignments
    dropped: torch.Tensor  # int64 scalar, assignments dropped over capacity
    router_logits: torch.Tensor  # [T, E], as given

    # The losses are computed when read (each read computes them anew): a generation step, which
    # never reads them, launches none of their kernels (about a dozen per MoE layer and step).
    # Properties, not functools.cached_property, whose lock torch.compile cannot trace (Python 3.11).
    @property
    def load_balance_loss(self) -> torch.Tensor:
        """float32 scalar: the Switch load-balance loss (see the module docstring)."""
        return load_balance_loss(self.router_logits, self.topk_ids)

    @property
    def z_loss(self) -> torch.Tensor:
        """float32 scalar: the router z-loss."""
        return router_z_loss(self.router_logits)


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: Optional[float]) -> int:
    """Per-expert capacity ``ceil(capacity_factor * T * k / E)``; -1 (dropless) when the factor is None."""
    if capacity_factor is None:
        return -1
    if capacity_factor <= 0:
        raise ValueError(f"apt_hal.moe_dispatch: capacity_factor must be positive, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def load_balance_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Switch load-balance loss ``E * sum_e f_e * P_e`` (differentiable through ``P_e``)."""
    e = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    ids = topk_ids.reshape(-1).long()
    # index_add_, not bincount: bincount reads the largest id on the host, a sync per MoE layer.
    counts = torch.zeros(e, dtype=torch.float32, device=ids.device).index_add_(
        0, ids, torch.ones(ids.shape, dtype=torch.float32, device=ids.device))
    f = counts / max(ids.numel(), 1)
    mean_probs = probs.sum(dim=0) / max(router_logits.shape[0], 1)  # 0 for an empty batch, not NaN
    return e * (f * mean_probs).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE)."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().sum() / max(router_logits.shape[0], 1)


def moe_dispatch(x: torch.Tensor, router_logits: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                 top_k: int, scoring: str = "softmax_topk", renormalize: bool = False,
                 activation: str = "swiglu", w_up_scales: Optional[torch.Tensor] = None,
                 w_down_scales: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
                 b_down: Optional[torch.Tensor] = None, capacity_factor: Optional[float] = None,
                 alpha: float = 1.702, limit: float = 7.0) -> MoEOutput:
    """The whole MoE FFN: route, permute, experts, combine; see the module docstring."""
    from apt_hal import ops  # the dispatching entry points of the four steps

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    logits = router_logits.reshape(-1, router_logits.shape[-1])
    if logits.shape[0] != x2.shape[0]:
        raise ContractError(f"apt_hal.moe_dispatch: 'router_logits' has {logits.shape[0]} tokens, "
                                   f"'x' has {x2.shape[0]}")
    num_experts = w_up.shape[0]
    if logits.shape[1] != num_experts:
        raise ContractError(f"apt_hal.moe_dispatch: 'router_logits' scores {logits.shape[1]} experts, "
                                   f"'w_up' stacks {num_experts}")
    weights, ids = ops.moe_route(logits, top_k, scoring, renormalize)
    cap = capacity_for(x2.shape[0], top_k, num_experts, capacity_factor)
    order, offsets = ops.moe_permute(ids, num_experts, cap)
    y = ops.moe_experts(x2, order, offsets, w_up, w_down, w_up_scales, w_down_scales, b_up, b_down,
                        top_k, activation, alpha, limit)
    out = ops.moe_combine(y, order, offsets, weights)
    kept = offsets[1:] - offsets[:-1]
    return MoEOutput(
        output=out.reshape(*lead, out.shape[-1]),
        topk_ids=ids,
        topk_weights=weights,
        tokens_per_expert=kept,
        dropped=ids.numel() - offsets[-1],
        router_logits=logits,
    )
