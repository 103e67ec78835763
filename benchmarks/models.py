"""Prefill and decode throughput of the APT models against transformers, eager and static-cache compiled.

For apt-dense-1b (Llama-shaped) and apt-moe-1b (Mixtral-shaped): random bf16 weights are built,
saved with apt_hal.models.hf.save_pretrained and loaded into transformers' LlamaForCausalLM /
MixtralForCausalLM twice: with attn_implementation="eager" (generated eagerly) and with the default
attention (sdpa) generated with ``cache_implementation="static"``, for which transformers'
``generate`` compiles the decode step with torch.compile (its CompileConfig: mode
"reduce-overhead") on a GPU. All three hold the same weights in the same run; the logits are
compared before anything is timed. Each model then generates greedily from the same random
prompts: prefill tokens/s = B * prompt_len / time(1 new token); decode tokens/s =
B * decode_len / (time(1 + decode_len new tokens) - time(1 new token)). Medians of --repeats
runs after warm-ups. The MXFP4 rows convert the experts and every linear layer but lm_head and
the routers to MXFP4 and time the same (transformers' columns are its bf16 models: it has no MXFP4
Llama/Mixtral path); the weight-memory ratio is their MXFP4 bytes over the bf16 bytes of the same
weights.

The floor (batch 1): the weight bytes one decode step must read (benchmarks/floor.py: for MoE
only the top_k experts per layer it touches) over the device-to-device copy bandwidth measured in
the same run; "% of floor" is apt_hal's decode tokens/s over the floor's.

    python -m benchmarks.models            # GPU: 1B models, bf16 + MXFP4, batch 1 and 16, 512-token prompts
    python -m benchmarks.models --tiny     # CPU smoke test: tiny presets, float32, static cache not compiled

Targets (issue 16): batch-1 decode >= 65% of the floor and faster than transformers static-cache
compiled; prefill >= 1.0x transformers static-cache compiled. MXFP4 weights <= 0.28x of bf16 (issue 5).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from typing import Optional

import torch
import triton

import apt_hal
from apt_hal.models import GenerationConfig, ModelConfig, build_model, convert_experts, generate
from apt_hal.models.hf import save_pretrained
from apt_hal.nn import MXFP4Linear, convert_model_to_mxfp4
from benchmarks import harness
from benchmarks.floor import copy_bandwidth, weight_bytes_per_step

FLOOR_TARGET = 0.65  # batch-1 decode, fraction of the weight-bytes floor
PREFILL_TARGET = 1.0  # over transformers static-cache compiled
MEMORY_TARGET = 0.28


@dataclasses.dataclass
class Row:
    model: str
    weights: str
    batch: int
    # engine -> tokens/s; engines: apt (apt_hal), eager (transformers), static (transformers static cache,
    # compiled on a GPU)
    prefill: dict
    decode: dict
    floor: Optional[float] = None  # decode tokens/s at the weight-bytes floor (batch 1 only)


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernel compilation, allocator
    times = []
    for _ in range(repeats):
        apt_hal.synchronize()
        start = time.perf_counter()
        fn()
        apt_hal.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _throughput(run, batch: int, prompt_len: int, decode_len: int, repeats: int) -> tuple:
    """(prefill tokens/s, decode tokens/s) of ``run(new_tokens)``."""
    run(1 + decode_len)  # warm-up at full length first: a static cache is sized (and compiled) for the longest run
    first = _seconds(lambda: run(1), repeats)
    full = _seconds(lambda: run(1 + decode_len), repeats)
    return batch * prompt_len / first, batch * decode_len / max(full - first, 1e-9)


def _ours(model, prompts: torch.Tensor, compile_decode: bool = False):
    rows = prompts.tolist()

    def run(n):
        out = generate(model, rows, GenerationConfig(max_new_tokens=n, greedy=True, compile=compile_decode))
        assert all(len(t) == n for t in out)
    return run


def _theirs(model, prompts: torch.Tensor, **generate_options):
    """Greedy generation with transformers; ``generate_options`` as ``generate`` spells them, e.g.
    ``cache_implementation="static"`` (and ``disable_compile=True`` to keep its decode step eager)."""
    mask = torch.ones_like(prompts)

    def run(n):
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None, **generate_options)
        assert out.shape[1] == prompts.shape[1] + n
    return run


def _check_logits(ours, theirs, exact_model, cfg, device) -> str:
    """Both bf16 models against transformers in float32 holding the same weights (an oracle that
    shares no kernel with apt_hal): ours must be at least as close to it as transformers' own bf16
    model (within 25%). Comparing two bf16 models directly cannot tell a bug from rounding that
    compounds over 16+ layers. The error is the mean over 8 x 64 positions of each position's
    largest |logit error|: with random routers, bf16 rounding flips near-tied expert choices, so
    one short batch is noisy (on an H100, one 2 x 64 batch gave transformers' own bf16 model
    anywhere from 0.04 to 0.11 median error and ours 0.04 to 0.19, depending on the prompts)."""
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (8, 64), device=device)
    with torch.inference_mode():
        exact = exact_model(ids).logits.float()
        ours_err = (ours(ids).logits.float() - exact).abs().amax(-1).mean().item()
        theirs_err = (theirs(ids).logits.float() - exact).abs().amax(-1).mean().item()
    scale = exact.abs().amax().item()
    verdict = (f"mean per-position max |logit error| vs transformers float32: apt {ours_err:.3g}, "
               f"transformers bf16 {theirs_err:.3g} (logit scale {scale:.3g})")
    if not ours_err <= 1.25 * theirs_err + 1e-4 * scale:
        raise SystemExit(f"logits disagree: {verdict}; not timing models that compute different things")
    return "logits agree: " + verdict


def _mxfp4_copy(model):
    """A copy with its experts and every linear layer but lm_head and the routers in MXFP4 (as
    gpt-oss ships), and the weight-memory ratio."""
    quantized = copy.deepcopy(model)
    if model.config.n_experts:
        convert_experts(quantized, True)
    convert_model_to_mxfp4(quantized, exclude=("lm_head", "router"))
    fp4_bytes = bf16_bytes = 0
    for module in quantized.modules():
        if isinstance(module, MXFP4Linear):
            fp4_bytes += module.weight_packed.numel() + module.weight_scales.numel()
            bf16_bytes += 2 * module.in_features * module.out_features
    for name, buf in quantized.named_buffers():
        if name.endswith(("w_up", "w_down")):
            fp4_bytes += buf.numel() + quantized.get_buffer(name + "_scales").numel()
            bf16_bytes += 2 * 2 * buf.numel()  # two codes per byte, two bytes per bf16 value
    return quantized, fp4_bytes / bf16_bytes


def static_options(compile_decode: bool) -> dict:
    """transformers 5.x ``generate`` options of the static-cache baseline: on a GPU, ``generate``
    compiles the decode step by itself when the cache is static (CompileConfig's defaults);
    ``disable_compile`` keeps it eager (the CPU smoke test, where compiling would take minutes)."""
    return {"cache_implementation": "static", **({} if compile_decode else {"disable_compile": True})}


def static_label(args) -> str:
    return "HF static compiled" if args.compile else "HF static NOT compiled"


def bench_family(family: str, args, device, bandwidth: float) -> tuple:
    from transformers import AutoModelForCausalLM

    size = "tiny" if args.tiny else "1b"
    cfg = ModelConfig.preset(f"apt-{family}-{size}", dtype="float32" if args.tiny else "bfloat16")
    torch.manual_seed(0)
    ours = build_model(cfg, device=device).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, folder)
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=cfg.torch_dtype, attn_implementation="eager")
        static = AutoModelForCausalLM.from_pretrained(folder, dtype=cfg.torch_dtype).to(device).eval()
        exact = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    theirs = theirs.to(device).eval()
    notes = [f"apt-{family}-{size}: {_check_logits(ours, theirs, exact.to(device).eval(), cfg, device)}"]
    del exact
    variants = [("bf16" if not args.tiny else "fp32", ours)]
    if not args.no_mxfp4:
        quantized, ratio = _mxfp4_copy(ours)
        variants.append(("mxfp4", quantized))
        met = "yes" if ratio <= MEMORY_TARGET else "NO"
        notes.append(f"apt-{family}-{size}: MXFP4 weight memory {ratio:.4f}x of bf16 "
                     f"(target <= {MEMORY_TARGET}: {met})")
    rows = []
    for batch in args.batch:
        torch.manual_seed(2)
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device=device)
        baselines = {"eager": _throughput(_theirs(theirs, prompts), batch, args.prompt_len, args.decode_len,
                                          args.repeats),
                     "static": _throughput(_theirs(static, prompts, **static_options(args.compile)), batch,
                                           args.prompt_len, args.decode_len, args.repeats)}
        for weights, model in variants:
            measured = {"apt": _throughput(_ours(model, prompts), batch, args.prompt_len, args.decode_len,
                                           args.repeats), **baselines}
            if args.apt_compile:
                measured["apt compiled"] = _throughput(_ours(model, prompts, compile_decode=True), batch,
                                                       args.prompt_len, args.decode_len, args.repeats)
            floor = bandwidth / weight_bytes_per_step(model) if batch == 1 else None
            rows.append(Row(f"apt-{family}-{size}", weights, batch, {k: v[0] for k, v in measured.items()},
                            {k: v[1] for k, v in measured.items()}, floor))
    compiled = hasattr(static, "_compiled_call")  # where transformers keeps the torch.compile'd forward
    notes.append(f"apt-{family}-{size}: transformers static cache: decode step compiled by torch.compile: "
                 f"{'yes' if compiled else 'no'}")
    if compiled != args.compile:
        raise SystemExit(f"{notes[-1]}, expected {'yes' if args.compile else 'no'}: the static-cache column "
                         "would not be what its header says")
    del theirs, static, variants
    apt_hal.empty_cache()
    return rows, notes


def met(ok: bool) -> str:
    return "yes" if ok else "NO"


def print_table(rows: list[Row], static: str) -> str:
    """Print (and return) the table; ``static`` names the static-cache column."""
    head = ["model", "weights", "batch", "prefill tok/s apt", "prefill tok/s HF eager", f"prefill tok/s {static}",
            f"prefill x {static}", "decode tok/s apt", "decode tok/s HF eager", f"decode tok/s {static}",
            "decode x HF eager", f"decode x {static}", "floor tok/s", "% of floor",
            f"target: decode >= {FLOOR_TARGET:.0%} floor and > {static} (batch 1)", "met",
            f"target: prefill >= {PREFILL_TARGET:g}x {static}", "met"]
    compiled = any("apt compiled" in r.decode for r in rows)
    if compiled:
        head += ["decode tok/s apt compiled", "% of floor, apt compiled", f"apt compiled decode x {static}"]
    body = []
    for r in rows:
        p, d = r.prefill, r.decode
        cells = [r.model, r.weights, str(r.batch), f"{p['apt']:.0f}", f"{p['eager']:.0f}", f"{p['static']:.0f}",
                 f"{p['apt'] / p['static']:.2f}x", f"{d['apt']:.1f}", f"{d['eager']:.1f}", f"{d['static']:.1f}",
                 f"{d['apt'] / d['eager']:.2f}x", f"{d['apt'] / d['static']:.2f}x"]
        if r.floor is None:
            cells += ["", "", "(batch 1 only)", ""]
        else:
            share = d["apt"] / r.floor
            cells += [f"{r.floor:.1f}", f"{share:.0%}", f"{share:.0%} of floor, {d['apt'] / d['static']:.2f}x",
                      met(share >= FLOOR_TARGET and d["apt"] > d["static"])]
        cells += [f"{p['apt'] / p['static']:.2f}x", met(p["apt"] >= PREFILL_TARGET * p["static"])]
        if compiled:
            c = d["apt compiled"]
            cells += [f"{c:.1f}", "" if r.floor is None else f"{c / r.floor:.0%}", f"{c / d['static']:.2f}x"]
        body.append(cells)
    return harness.markdown_table(head, body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny presets in float32 on the CPU: a smoke test")
    parser.add_argument("--families", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 16; tiny: 1 4)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; tiny: 32)")
    parser.add_argument("--decode-len", type=int, default=None, help="decoded tokens timed (default 64; tiny: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point, median (default 3; tiny: 1)")
    parser.add_argument("--no-mxfp4", action="store_true", help="skip the MXFP4 rows")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="let transformers compile its static-cache decode step (default: on a GPU; "
                             "--tiny: off, and the column says NOT compiled)")
    parser.add_argument("--apt-compile", action="store_true",
                        help="also time apt_hal with GenerationConfig(compile=True) (torch.compile'd decode step)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    defaults = dict(batch=[1, 4], prompt_len=32, decode_len=8, repeats=1, compile=False) if args.tiny else \
        dict(batch=[1, 16], prompt_len=512, decode_len=64, repeats=3, compile=True)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device("cpu") if args.tiny else apt_hal.get_device()
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no accelerator found: the 1B benchmark needs one (use --tiny for a CPU smoke test)")
    import transformers

    bandwidth = copy_bandwidth(device, nbytes=(1 << 26) if args.tiny else (1 << 30))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else device}; torch {torch.__version__}; "
          f"triton {triton.__version__}; transformers {transformers.__version__}; "
          f"backend policy: {apt_hal.registry.current_policy().backend}; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written); prompt {args.prompt_len} tokens, "
          f"decode {args.decode_len} tokens, median of {args.repeats}", flush=True)
    rows, notes = [], []
    for family in args.families:
        r, n = bench_family(family, args, device, bandwidth)
        rows += r
        notes += n
        for line in n:
            print(line, flush=True)
    print()
    table = print_table(rows, static_label(args))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
