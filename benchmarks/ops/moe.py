"""MoE benchmark: the four cuda-triton steps against what users run today, on one GPU.

Rows and the issue's targets:

* prefill, T=4096, d=4096, F=14336, E=8, top-2, bf16, SwiGLU (Mixtral): the layer's TFLOP/s
  >= 85% of the dense bf16 TFLOP/s measured at the same shape (two F.linear over the S = T*k
  rows, the same FLOPs). Baselines: a per-expert loop as Hugging Face writes it, and sort +
  ``torch._grouped_mm`` where the installed torch has it. Plus the experts step alone and the
  route/permute/combine steps against their references (information).
* decode, T in {1, 8, 64}, bf16 and MXFP4 experts (Mixtral shape; gpt-oss-120b shape in MXFP4):
  ``moe_experts`` moves the bytes of the experts it uses at >= 70% of the measured copy
  bandwidth. Baselines: bf16 F.linear over the same experts (cuBLAS), and the whole layer
  against the per-expert loop (dequantize-then-loop for MXFP4) and sort + grouped_mm.

Every shape is checked against the contract's references on the GPU before it is timed; a
wrong result is reported as a row marked WRONG, never timed.

Run on a GPU (from the repository root):
    python -m benchmarks.ops.moe            # checks + timings, one table
    python -m benchmarks.ops.moe --quick    # fewer shapes
    python -m benchmarks.ops.moe --sweep prefill|bf16|mxfp4 [--budget S]   # only: each projection
                                            # alone at its default and at candidate tiles
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import apt_hal
from apt_hal import mxfp4, ops
from apt_hal.contracts.moe_dispatch import apply_activation
from benchmarks import harness

OP = "moe"
DEVICE = "cuda"  # the timings need a GPU; tests run the correctness gate on the CPU interpreter


@dataclasses.dataclass(frozen=True)
class Case:
    tokens: int
    d: int
    f: int
    experts: int
    top_k: int
    quant: bool
    activation: str = "swiglu"
    bias: bool = False
    scoring: str = "softmax_topk"
    renormalize: bool = True

    def __str__(self) -> str:
        return (f"T={self.tokens} d={self.d} F={self.f} E={self.experts} k={self.top_k} "
                f"{'mxfp4' if self.quant else 'bf16'} {self.activation}{' +bias' if self.bias else ''}")


PREFILL = Case(4096, 4096, 14336, 8, 2, quant=False)
MIXTRAL_DECODE = [Case(t, 4096, 14336, 8, 2, quant=q) for q in (False, True) for t in (1, 8, 64)]
GPT_OSS_DECODE = [Case(t, 2880, 2880, 128, 4, quant=True, activation="gpt_oss_swiglu", bias=True,
                       scoring="topk_softmax", renormalize=False) for t in (1, 64)]


@dataclasses.dataclass
class Layer:
    case: Case
    x: torch.Tensor
    logits: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    w_up_scales: Optional[torch.Tensor]
    w_down_scales: Optional[torch.Tensor]
    b_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]

    def weights(self) -> tuple:
        return self.w_up, self.w_down, self.w_up_scales, self.w_down_scales, self.b_up, self.b_down


def _random_mxfp4(shape, k: int, device, g) -> tuple:
    """Uniformly random E2M1 codes with scales near 1/(2.9*sqrt(k)), so y has unit scale
    (2.9 is the RMS of a uniformly random E2M1 value); valid MXFP4, no quantizer needed."""
    codes = torch.randint(0, 256, (*shape, k // 2), dtype=torch.uint8, device=device, generator=g)
    center = 127 - round(math.log2(2.9 * math.sqrt(k)))
    scales = torch.randint(center - 1, center + 2, (*shape, k // mxfp4.BLOCK), dtype=torch.uint8, device=device,
                           generator=g)
    return codes, scales


def make_layer(case: Case, device, seed: int) -> Layer:
    """Random inputs of one shape. Router logits keep a margin between an expert's rank
    neighbours, so routing cannot flip on a near-tie between two correct implementations."""
    g = torch.Generator(device=device).manual_seed(seed)
    t, d, f, e = case.tokens, case.d, case.f, case.experts
    u = f if case.activation == "gelu" else 2 * f
    levels = torch.argsort(torch.rand(t, e, device=device, generator=g), dim=1).float() * 0.5
    logits = levels + 0.1 * torch.rand(t, e, device=device, generator=g)
    x = torch.randn(t, d, device=device, generator=g).bfloat16()
    if case.quant:
        (w_up, up_s), (w_down, down_s) = _random_mxfp4((e, u), d, device, g), _random_mxfp4((e, d), f, device, g)
    else:
        w_up = (torch.randn(e, u, d, device=device, generator=g) / math.sqrt(d)).bfloat16()
        w_down = (torch.randn(e, d, f, device=device, generator=g) / math.sqrt(f)).bfloat16()
        up_s = down_s = None
    b_up = (0.1 * torch.randn(e, u, device=device, generator=g)).bfloat16() if case.bias else None
    b_down = (0.1 * torch.randn(e, d, device=device, generator=g)).bfloat16() if case.bias else None
    return Layer(case, x, logits, w_up, w_down, up_s, down_s, b_up, b_down)


# ---- the layer on apt_hal, and the baselines --------------------------------------------------


def apt_hal_layer(layer: Layer) -> torch.Tensor:
    c = layer.case
    w, ids = ops.moe_route(layer.logits, c.top_k, c.scoring, c.renormalize)
    order, offsets = ops.moe_permute(ids, c.experts, -1)
    y = ops.moe_experts(layer.x, order, offsets, *layer.weights(), c.top_k, c.activation)
    return ops.moe_combine(y, order, offsets, w)


def _route_torch(layer: Layer):
    c = layer.case
    if c.scoring == "softmax_topk":
        w, ids = torch.topk(torch.softmax(layer.logits, dim=-1), c.top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True) if c.renormalize else w), ids
    top, ids = torch.topk(layer.logits, c.top_k, dim=-1)
    return torch.softmax(top, dim=-1), ids


def _expert_ffn(layer: Layer, e: int, rows: torch.Tensor) -> torch.Tensor:
    """One expert's FFN as eager PyTorch writes it (MXFP4 weights dequantized first, as users do)."""
    c, dt = layer.case, layer.x.dtype
    w_up = mxfp4.dequantize(layer.w_up[e], layer.w_up_scales[e], dt) if c.quant else layer.w_up[e]
    w_down = mxfp4.dequantize(layer.w_down[e], layer.w_down_scales[e], dt) if c.quant else layer.w_down[e]
    h = F.linear(rows, w_up, None if layer.b_up is None else layer.b_up[e])
    act = apply_activation(h, c.activation).to(dt)
    return F.linear(act, w_down, None if layer.b_down is None else layer.b_down[e])


def hf_loop_layer(layer: Layer) -> torch.Tensor:
    """The Hugging Face Mixtral/gpt-oss pattern: a Python loop over the experts that got tokens."""
    w, ids = _route_torch(layer)
    out = torch.zeros_like(layer.x)
    for e in torch.unique(ids).tolist():  # a host sync, as in transformers
        tok, j = torch.where(ids == e)
        y = _expert_ffn(layer, e, layer.x[tok]) * w[tok, j, None].to(layer.x.dtype)
        out.index_add_(0, tok, y)
    return out


def grouped_mm_layer(layer: Layer) -> torch.Tensor:
    """Sort by expert, two torch._grouped_mm calls, scatter back (no host sync)."""
    c = layer.case
    w, ids = _route_torch(layer)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = (flat[:, None] == torch.arange(c.experts, device=flat.device)).sum(0)
    ends = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // c.top_k
    h = torch._grouped_mm(layer.x[tok], layer.w_up.transpose(1, 2), offs=ends)
    act = apply_activation(h.float(), c.activation).to(layer.x.dtype)
    y = torch._grouped_mm(act, layer.w_down.transpose(1, 2), offs=ends)
    return torch.zeros_like(layer.x).index_add_(0, tok, y * w.reshape(-1)[order, None].to(y.dtype))


def _used_experts(layer: Layer) -> list[int]:
    return torch.unique(_route_torch(layer)[1]).tolist()


def _touched_bytes(layer: Layer) -> int:
    """Bytes moe_experts must move: the weights, scales and biases of the experts the routing
    uses, x read and y written (the activations between the projections are noise at decode)."""
    weights = sum(w[e].numel() * w.element_size() for e in _used_experts(layer) for w in layer.weights()
                  if w is not None)
    return weights + layer.x.numel() * layer.x.element_size() * (1 + layer.case.top_k)


# ---- correctness gate -------------------------------------------------------------------------


def _rel(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def check(layer: Layer) -> Optional[str]:
    """None when every cuda-triton step matches the contract's reference on ``layer``'s inputs,
    else what is wrong. Tolerances as in tests/test_cuda_triton_moe.py: route ids and permute
    exactly, route weights to 1e-5, experts and combine relative-norm error < 1e-2 (bf16)."""
    c = layer.case
    ref_w, ref_ids = ops.moe_route.reference(layer.logits, c.top_k, c.scoring, c.renormalize)
    ref_order, ref_offsets = ops.moe_permute.reference(ref_ids, c.experts, -1)
    args = (layer.x, ref_order, ref_offsets, *layer.weights(), c.top_k, c.activation)
    ref_y = ops.moe_experts.reference(*args)
    ref_out = ops.moe_combine.reference(ref_y, ref_order, ref_offsets, ref_w)
    with apt_hal.use("cuda-triton", strict=True):
        w, ids = ops.moe_route(layer.logits, c.top_k, c.scoring, c.renormalize)
        order, offsets = ops.moe_permute(ref_ids, c.experts, -1)
        y = ops.moe_experts(*args)
        out = ops.moe_combine(ref_y, ref_order, ref_offsets, ref_w)
    if not torch.equal(ids, ref_ids):
        return "route: ids differ from the reference"
    if not torch.allclose(w, ref_w, rtol=1e-5, atol=1e-7):
        return f"route: weights off by {(w - ref_w).abs().max().item():.2e}"
    if not (torch.equal(order, ref_order) and torch.equal(offsets, ref_offsets)):
        return "permute: differs from the reference"
    for name, got, ref in (("experts", y, ref_y), ("combine", out, ref_out)):
        if not bool(torch.isfinite(got).all()) or _rel(got, ref) >= 1e-2:
            return f"{name}: relative-norm error {_rel(got, ref):.2e} (limit 1e-2)"
    return None


# ---- timing -----------------------------------------------------------------------------------


def _time(calls: list[Callable], graph: bool = True) -> float:
    try:
        return harness.time_calls(calls, use_graph=graph)
    except RuntimeError as err:  # a baseline that cannot be captured in a CUDA graph
        if not graph:
            raise
        print(f"moe: timed without a CUDA graph ({str(err).splitlines()[0][:100]})", flush=True)
        torch.cuda.synchronize()
        return harness.time_calls(calls, use_graph=False)


def _layers(case: Case, touched_bytes: int) -> list[Layer]:
    """Input sets (weights included) for rotating timing: as many as harness.rotating makes, so
    the bytes they touch exceed L2 twice and no call finds its experts' weights in L2."""
    seeds = itertools.count()
    return [make() for make in harness.rotating(lambda: (make_layer(case, DEVICE, next(seeds)),),
                                                lambda layer: layer, touched_bytes)]


def _wrong(case: Case, what: str, message: str) -> harness.Row:
    print(f"moe: {case}: NOT TIMED, {message}", flush=True)
    return harness.Row(OP, f"{what} {case}", float("nan"), {}, target=f"WRONG: {message}", met=False)


def _grouped_mm_available(layer: Layer) -> bool:
    if layer.case.quant or not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch.testing.assert_close(grouped_mm_layer(layer), hf_loop_layer(layer), rtol=5e-2, atol=5e-2)
        return True
    except (RuntimeError, AssertionError) as err:
        print(f"moe: no torch._grouped_mm baseline ({str(err).splitlines()[0][:100]})", flush=True)
        return False


def prefill_rows(ceilings: harness.Ceilings) -> list[harness.Row]:
    case = PREFILL
    layer = make_layer(case, DEVICE, seed=0)
    wrong = check(layer)
    if wrong:
        return [_wrong(case, "layer", wrong)]
    c, s = layer.case, case.tokens * case.top_k
    flops = 2 * s * c.d * 3 * c.f  # up (2F wide) and down
    xs = layer.x.repeat_interleave(c.top_k, dim=0)
    act = torch.randn(s, c.f, device=DEVICE).bfloat16()
    dense_us = _time([lambda: (F.linear(xs, layer.w_up[0]), F.linear(act, layer.w_down[0]))])
    layer_us = _time([lambda: apt_hal_layer(layer)])
    baselines = {"dense F.linear": dense_us, "hf loop": _time([lambda: hf_loop_layer(layer)], graph=False)}
    if _grouped_mm_available(layer):
        baselines["grouped_mm"] = _time([lambda: grouped_mm_layer(layer)])
    pct = 100 * dense_us / layer_us
    rows = [harness.Row(OP, f"layer {case} ({flops / layer_us / 1e6:.0f} TFLOP/s)", layer_us, baselines,
                        pct, "dense bf16 at shape", ">= 85% dense", pct >= 85)]

    # The steps alone (information): experts against dense, the others against their references.
    w, ids = ops.moe_route(layer.logits, c.top_k, c.scoring, c.renormalize)
    order, offsets = ops.moe_permute(ids, c.experts, -1)
    y = ops.moe_experts(layer.x, order, offsets, *layer.weights(), c.top_k, c.activation)
    experts_us = _time([lambda: ops.moe_experts(layer.x, order, offsets, *layer.weights(), c.top_k, c.activation)])
    rows.append(harness.Row(OP, f"moe_experts {case}", experts_us, {"dense F.linear": dense_us},
                            100 * dense_us / experts_us, "dense bf16 at shape", "(info)"))
    steps = {
        "moe_route": (ops.moe_route, (layer.logits, c.top_k, c.scoring, c.renormalize)),
        "moe_permute": (ops.moe_permute, (ids, c.experts, -1)),
        "moe_combine": (ops.moe_combine, (y, order, offsets, w)),
    }
    for name, (op, args) in steps.items():
        reference_us = _time([lambda: op.reference(*args)], graph=False)
        rows.append(harness.Row(OP, f"{name} {case}", _time([lambda: op(*args)]), {"torch reference": reference_us},
                                target="(info)"))
    return rows


def decode_rows(case: Case, ceilings: harness.Ceilings) -> list[harness.Row]:
    layer = make_layer(case, DEVICE, seed=0)
    wrong = check(layer)
    if wrong:
        return [_wrong(case, "moe_experts", wrong)]
    c = layer.case
    used = _used_experts(layer)
    layers = _layers(case, _touched_bytes(layer))
    touched = sum(map(_touched_bytes, layers)) / len(layers)  # the sets route differently

    def experts_call(lay):
        w, ids = ops.moe_route(lay.logits, c.top_k, c.scoring, c.renormalize)
        order, offsets = ops.moe_permute(ids, c.experts, -1)
        return lambda: ops.moe_experts(lay.x, order, offsets, *lay.weights(), c.top_k, c.activation)

    experts_us = _time([experts_call(lay) for lay in layers])
    # cuBLAS on the same experts in bf16, one token row each (the weights' bytes dominate).
    bf16 = [(mxfp4.dequantize(layer.w_up[e], layer.w_up_scales[e], torch.bfloat16),
             mxfp4.dequantize(layer.w_down[e], layer.w_down_scales[e], torch.bfloat16)) if c.quant
            else (layer.w_up[e], layer.w_down[e]) for e in used]
    xs, acts = layer.x[:1], torch.randn(1, c.f, device=DEVICE).bfloat16()
    cublas_us = _time([lambda: [(F.linear(xs, wu), F.linear(acts, wd)) for wu, wd in bf16]])
    pct = 100 * touched / experts_us / 1e3 / ceilings.copy_gbps
    rows = [harness.Row(OP, f"moe_experts {case} ({touched / 1e6:.0f} MB, {len(layers)} sets)", experts_us,
                        {"bf16 F.linear same experts": cublas_us}, pct, "copy", ">= 70% HBM", pct >= 70)]
    layer_us = _time([lambda lay=lay: apt_hal_layer(lay) for lay in layers])
    baselines = {"hf loop": _time([lambda: hf_loop_layer(layer)], graph=False)}
    if _grouped_mm_available(layer):
        baselines["grouped_mm"] = _time([lambda: grouped_mm_layer(layer)])
    rows.append(harness.Row(OP, f"layer {case}", layer_us, baselines,
                            100 * touched / layer_us / 1e3 / ceilings.copy_gbps, "copy", "(info)"))
    return rows


def _progress(rows: list[harness.Row]) -> list[harness.Row]:
    """Print each row as it is measured (a run cut short still shows what it measured)."""
    for r in rows:
        pct = "" if r.ceiling_pct is None else f", {r.ceiling_pct:.0f}% {r.ceiling}"
        print(f"moe: {r.shape}: {r.apt_hal_us:.1f} us{pct} {r.target}", flush=True)
    return rows


def run(ceilings: harness.Ceilings, quick: bool = False) -> list[harness.Row]:
    decode = [MIXTRAL_DECODE[0], MIXTRAL_DECODE[3]] if quick else MIXTRAL_DECODE + GPT_OSS_DECODE
    rows = []
    with apt_hal.use("cuda-triton", strict=True):
        rows += _progress(prefill_rows(ceilings))
        torch.cuda.empty_cache()
        for case in decode:
            rows += _progress(decode_rows(case, ceilings))
            torch.cuda.empty_cache()
    return rows


# ---- tile sweep (tuning data for the MOE_* tables of hw.py) ----------------------------------


def _tiles(kind: str, m: int, n: int, k: int, warps: int, stages: int) -> dict:
    return dict(KIND=kind, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages)


def _gemv(n: int, k: int, warps: int = 4) -> dict:
    return _tiles("gemv", 0, n, k, warps, 1)  # BLOCK_M 0: the default's, set per case


# name -> (cases, up candidates, down candidates), each candidate timed after the default.
SWEEPS = {
    # TMA tiles (1 or 2 programs per SM) against the pointer-loaded kernel at the last sweep's best.
    "prefill": ([PREFILL],
                [_tiles("mma", 128, 128, 64, 8, 4), _tiles("tma", 128, 128, 64, 8, 3),
                 _tiles("tma", 128, 64, 64, 4, 3), _tiles("tma", 128, 64, 128, 4, 3)],
                [_tiles("mma", 128, 256, 64, 8, 4), _tiles("tma", 128, 256, 64, 8, 3),
                 _tiles("tma", 128, 128, 64, 8, 3), _tiles("tma", 128, 128, 128, 8, 3)]),
    # MXFP4 decode: the CUDA-core kernel's n and k tiles at 1, 2 or 4 rows a tile (T=1, T=8,
    # gpt-oss), the tensor-core kernel against it, and where it is the default (Mixtral T=64).
    "mxfp4": ([MIXTRAL_DECODE[3], GPT_OSS_DECODE[0], MIXTRAL_DECODE[4], GPT_OSS_DECODE[1], MIXTRAL_DECODE[5]],
              [_gemv(16, 256), _gemv(64, 256), _gemv(32, 512), _gemv(32, 256, 8),
               _tiles("mma", 16, 64, 256, 4, 4), _tiles("mma", 16, 128, 256, 8, 4)],
              [_gemv(16, 512), _gemv(8, 1024), _gemv(32, 256), _gemv(16, 512, 8),
               _tiles("mma", 16, 64, 256, 4, 4), _tiles("mma", 16, 128, 256, 8, 4)]),
    "bf16": (MIXTRAL_DECODE[0:3:2],
             [_tiles("mma", 16, n, k, w, 4) for n in (32, 64, 128) for k in (128, 256) for w in (4, 8)],
             [_tiles("mma", 16, n, k, w, 4) for n in (32, 64, 128) for k in (128, 256) for w in (4, 8)]),
}


def _projection_bytes(layer: Layer, which: int) -> int:
    """Bytes of the weights (scales and biases included) of one projection over the used experts."""
    tensors = (layer.w_up, layer.w_up_scales, layer.b_up) if which == 0 else (layer.w_down, layer.w_down_scales,
                                                                              layer.b_down)
    return sum(t[e].numel() * t.element_size() for e in _used_experts(layer) for t in tensors if t is not None)


@dataclasses.dataclass
class _Projections:
    """One input set of a sweep: moe_experts' arguments, split into its two projections. The
    activations between them are float32 for the gemv kernel, in x's dtype for the others."""

    layer: Layer
    order: torch.Tensor
    offsets: torch.Tensor
    y: torch.Tensor  # [S, d]
    acts: dict = dataclasses.field(default_factory=dict)  # float32 or not -> [S, F]

    @classmethod
    def routed(cls, layer: Layer) -> "_Projections":
        c = layer.case
        _, ids = ops.moe_route.reference(layer.logits, c.top_k, c.scoring, c.renormalize)
        order, offsets = ops.moe_permute.reference(ids, c.experts, -1)
        return cls(layer, order, offsets, layer.x.new_empty((order.numel(), c.d)))

    def experts_args(self) -> tuple:
        return (self.layer.x, self.order, self.offsets, *self.layer.weights(), self.layer.case.top_k,
                self.layer.case.activation)

    def act(self, float32: bool) -> torch.Tensor:
        if float32 not in self.acts:
            self.acts[float32] = self.layer.x.new_empty((self.order.numel(), self.layer.case.f),
                                                        dtype=torch.float32 if float32 else self.layer.x.dtype)
        return self.acts[float32]

    def up(self, tiles: dict, act: torch.Tensor):
        from apt_hal.backends.cuda_triton import moe
        lay = self.layer
        return moe.up_projection(lay.x, self.order, self.offsets, lay.w_up, lay.w_up_scales, lay.b_up,
                                 lay.case.top_k, lay.case.activation, 1.702, 7.0, act, tiles)

    def down(self, tiles: dict, act: torch.Tensor):
        from apt_hal.backends.cuda_triton import moe
        lay = self.layer
        return moe.down_projection(act, self.offsets, lay.w_down, lay.w_down_scales, lay.b_down, self.y, tiles)


def _sweep_candidates(default: dict, candidates: list) -> list:
    """The default, then the candidates: gemv tiles (their BLOCK_M set to the default's) only where
    the default is the gemv kernel (few rows per expert), the others everywhere."""
    out = [default]
    for tiles in candidates:
        if tiles["KIND"] == "gemv":
            if default["KIND"] != "gemv":
                continue
            tiles = dict(tiles, BLOCK_M=default["BLOCK_M"])
        if tiles not in out:
            out.append(tiles)
    return out


def _time_projection(sets: list, which: int, tiles: dict, default: tuple) -> float:
    """Microseconds of one projection at ``tiles`` (the other at its default) over the input sets."""
    gemv_down = (default[1] if which == 0 else tiles)["KIND"] == "gemv"  # float32 activations
    if which == 0:
        return harness.time_calls([lambda run=run: run.up(tiles, run.act(gemv_down)) for run in sets])
    for run in sets:  # the down projection's input: each set's activations
        run.up(default[0], run.act(gemv_down))
    return harness.time_calls([lambda run=run: run.down(tiles, run.act(gemv_down)) for run in sets])


def sweep(name: str, budget_s: float) -> None:
    """Time each projection of moe_experts alone at its default tiles and at the candidates of
    SWEEPS[name] (the other projection at its default), up and down candidates in turn. Each
    candidate is first checked: the experts' output with it must match the reference
    (relative-norm error < 1e-2), else it is reported WRONG and not timed. Decode shapes rotate
    over input sets that exceed L2 twice. The cases share ``budget_s`` seconds: once a case's
    share is spent, it starts no new candidate."""
    from apt_hal.backends.cuda_triton import moe

    start = time.monotonic()
    copy_gbps = harness.measure_ceilings().copy_gbps
    cases, up_candidates, down_candidates = SWEEPS[name]
    for i, case in enumerate(cases):
        deadline = time.monotonic() + (start + budget_s - time.monotonic()) / (len(cases) - i)
        prefill = case.tokens >= 1024
        first = make_layer(case, DEVICE, 0)
        sets = [_Projections.routed(lay) for lay in ([first] if prefill else _layers(case, _touched_bytes(first)))]
        args = sets[0].experts_args()
        ref = ops.moe_experts.reference(*args)
        default = moe.default_tiles(sets[0].layer.x, sets[0].order.numel(), sets[0].layer.w_up,
                                    sets[0].layer.w_down, case.quant, case.activation)
        print(f"sweep {case} ({len(sets)} input sets); default tiles {default}", flush=True)
        trials = [(which, tiles) for pair in itertools.zip_longest(
            _sweep_candidates(default[0], up_candidates), _sweep_candidates(default[1], down_candidates))
            for which, tiles in enumerate(pair) if tiles is not None]
        for which, tiles in trials:
            label = ("up", "down")[which]
            if time.monotonic() > deadline:
                print("  budget spent", flush=True)
                break
            try:
                err = _rel(moe.experts(*args, tiles=(tiles, default[1]) if which == 0 else (default[0], tiles)), ref)
                if not err < 1e-2:
                    print(f"  {label:4} WRONG (relative-norm error {err:.1e})  {tiles}", flush=True)
                    continue
                us = _time_projection(sets, which, tiles, default)
            except Exception as exc:  # e.g. out of shared memory for this tile
                print(f"  {label:4} {type(exc).__name__}: {str(exc).splitlines()[0][:90]}  {tiles}", flush=True)
                continue
            if prefill:
                flops = 2 * sets[0].order.numel() * case.d * case.f * (2 if which == 0 and case.activation != "gelu"
                                                                       else 1)
                rate = f"{flops / us / 1e6:6.0f} TFLOP/s"
            else:
                gbps = sum(_projection_bytes(run.layer, which) for run in sets) / len(sets) / us / 1e3
                rate = f"{gbps:6.0f} GB/s = {100 * gbps / copy_gbps:3.0f}% copy"
            tag = "default" if tiles is default[which] else "       "
            print(f"  {label:4} {tag} {us:9.1f} us  {rate}  {tiles}  err {err:.1e}", flush=True)
        del first, sets
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--sweep", choices=SWEEPS, help="only time tile shapes of the expert GEMMs for these shapes")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which a sweep starts nothing new")
    args = parser.parse_args()
    if args.sweep:
        with apt_hal.use("cuda-triton", strict=True):
            sweep(args.sweep, args.budget)
        return
    ceilings = harness.measure_ceilings()
    print(ceilings, flush=True)
    harness.print_table(run(ceilings, quick=args.quick))


if __name__ == "__main__":
    main()
