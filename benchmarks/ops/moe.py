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
    python -m benchmarks.ops.moe --sweep prefill|bf16|mxfp4   # only: tile shapes of the expert GEMMs
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import apt_hal
from apt_hal import mxfp4, ops
from apt_hal.contracts.moe_dispatch import activate
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
    act = activate(h, c.activation).to(dt)
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
    act = activate(h.float(), c.activation).to(layer.x.dtype)
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


def run(ceilings: harness.Ceilings, quick: bool = False) -> list[harness.Row]:
    decode = [MIXTRAL_DECODE[0], MIXTRAL_DECODE[3]] if quick else MIXTRAL_DECODE + GPT_OSS_DECODE
    rows = []
    with apt_hal.use("cuda-triton", strict=True):
        rows += prefill_rows(ceilings)
        torch.cuda.empty_cache()
        for case in decode:
            rows += decode_rows(case, ceilings)
            torch.cuda.empty_cache()
    return rows


# ---- tile sweep (tuning data for hw.MOE_GEMM_TILES) -------------------------------------------


SWEEPS = {
    "prefill": ([PREFILL], [(m, n, 64, w, st) for m in (64, 128) for n in (64, 128, 256) for w in (4, 8)
                            for st in (3, 4)]),
    "bf16": (MIXTRAL_DECODE[0:3:2], [(16, n, k, w, 4) for n in (32, 64, 128) for k in (128, 256) for w in (4, 8)]),
    "mxfp4": (MIXTRAL_DECODE[3:6:2], [(16, n, k, w, 4) for n in (32, 64, 128) for k in (128, 256) for w in (4, 8)]),
}


def sweep(name: str) -> None:
    """Time moe_experts over the tile shapes of SWEEPS[name] (BLOCK_M, BLOCK_N output columns,
    BLOCK_K, warps, stages): the up projection's first (the down projection at its default),
    then the down projection's (the up projection at its best)."""
    from apt_hal.backends.cuda_triton import moe

    cases, grid = SWEEPS[name]
    candidates = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st) for m, n, k, w, st in grid]
    for case in cases:
        layer = make_layer(case, DEVICE, seed=0)
        c = layer.case
        w, ids = ops.moe_route.reference(layer.logits, c.top_k, c.scoring, c.renormalize)
        order, offsets = ops.moe_permute.reference(ids, c.experts, -1)
        args = (layer.x, order, offsets, *layer.weights(), c.top_k, c.activation)
        ref = ops.moe_experts.reference(*args)
        best = list(moe.gemm_tiles(order.numel(), c.experts, c.f, c.d, layer.x.dtype))
        for which in (0, 1):
            results = []
            for tiles in candidates:
                pair = tuple(tiles if i == which else best[i] for i in (0, 1))
                try:
                    err = _rel(moe.experts(*args, tiles=pair), ref)
                    us = harness.time_calls([lambda: moe.experts(*args, tiles=pair)]) if err < 1e-2 else float("nan")
                except Exception as exc:  # e.g. out of shared memory for this tile
                    print(f"  {tiles}: {type(exc).__name__}", flush=True)
                    continue
                results.append((us, tiles, err))
            results.sort(key=lambda r: (math.isnan(r[0]), r[0]))
            print(f"sweep {case} {'up' if which == 0 else 'down'} projection (us, tiles, rel err):")
            for us, tiles, err in results[:8]:
                print(f"  {us:10.1f}  {tiles}  {err:.1e}")
            if results and not math.isnan(results[0][0]):
                best[which] = results[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--sweep", choices=SWEEPS, help="only time tile shapes of the expert GEMMs for these shapes")
    args = parser.parse_args()
    if args.sweep:
        with apt_hal.use("cuda-triton", strict=True):
            sweep(args.sweep)
        return
    ceilings = harness.measure_ceilings()
    print(ceilings, flush=True)
    harness.print_table(run(ceilings, quick=args.quick))


if __name__ == "__main__":
    main()
