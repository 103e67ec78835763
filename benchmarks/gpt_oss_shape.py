"""A gpt-oss-20b-shaped model end to end: apt_hal against transformers, same checkpoint, same run.

The published gpt-oss-20b configuration (24 layers, 32 experts top-4, d_model 2880, 64 query / 8
key-value heads of 64, vocab 201088, alternating sliding-window (128) and full attention,
attention sinks, YaRN rotary (factor 32 over 4096 positions, base 150000), MXFP4 experts) with
random weights is built in apt_hal, saved in the real checkpoint layout with
apt_hal.models.hf.save_pretrained (experts as MXFP4 ``*_blocks`` / ``*_scales``) and loaded by
both apt_hal (the experts stay MXFP4 in memory) and transformers' GptOssForCausalLM (which
dequantizes them to bf16 where its MXFP4 kernels are not installed, as on Hopper without the
``kernels`` package). Both generate greedily from the same random prompts; the table gives decode
tokens/s at batch 1 and 16 (benchmarks/models.py's measure: decode tokens over the time of
1 + decode_len new tokens minus that of 1) and each library's peak GPU memory over loading and
generating. Logits of the two are compared before timing; a "logit drift" line then says which
library's bf16 logits move from its own float32 ones on a one-layer checkpoint of the same shape.

    python -m benchmarks.gpt_oss_shape          # GPU: the 20b shape, bf16 with MXFP4 experts
    python -m benchmarks.gpt_oss_shape --tiny   # CPU smoke test: 2 layers, d 64, float32

Target (issue 16): apt_hal holds the model in under 16 GB.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Optional

import torch
import triton

import apt_hal
from apt_hal.models import ModelConfig, build_model
from apt_hal.models.hf import load_pretrained, save_pretrained
from benchmarks import harness
from benchmarks import models as model_bench

MEMORY_TARGET_GB = 16.0
GPT_OSS_20B = dict(vocab_size=201088, d_model=2880, n_layers=24, n_heads=64, n_kv_heads=8, head_dim=64,
                   ffn_dim=2880, n_experts=32, top_k=4, max_position=131072, sliding_window=128,
                   layer_types=("sliding", "full") * 12, norm_eps=1e-5, swiglu_limit=7.0, aux_loss_weight=0.001,
                   rope={"variant": "yarn", "base": 150000.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False},
                   dtype="bfloat16")
TINY = dict(GPT_OSS_20B, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
            n_experts=4, top_k=2, max_position=512, sliding_window=16, layer_types=("sliding", "full"),
            rope=dict(GPT_OSS_20B["rope"], original_max_position_embeddings=128, factor=4.0), dtype="float32")


def config(tiny: bool, n_layers: Optional[int] = None) -> ModelConfig:
    """The gpt-oss-20b shape (or its tiny stand-in) on the apt-oss preset's gpt-oss features;
    ``n_layers`` keeps the first layers only (alternating as published)."""
    shape = dict(TINY if tiny else GPT_OSS_20B)
    if n_layers is not None:
        shape.update(n_layers=n_layers, layer_types=(("sliding", "full") * n_layers)[:n_layers])
    return ModelConfig.preset("apt-oss-1b", **shape)


def write_checkpoint(cfg: ModelConfig, folder: str, device) -> None:
    """Random weights in the real checkpoint layout (MXFP4 experts as ``_blocks`` / ``_scales``)."""
    torch.manual_seed(0)
    model = build_model(cfg, device=device).eval()
    with torch.no_grad():
        for layer in model.layers:  # sinks initialised near 0 barely act; make them matter
            layer.attn.sinks.normal_(std=1.0)
    save_pretrained(model, folder)
    del model
    apt_hal.empty_cache()


def load_transformers(folder: str, dtype: torch.dtype, device):
    """GptOssForCausalLM from ``folder`` on ``device``, and how its experts are held. transformers
    dequantizes MXFP4 experts to ``dtype`` unless its MXFP4 kernels are usable; where its default
    load refuses, dequantizing is asked for explicitly. Loading straight onto the GPU needs
    ``accelerate``; without it the model is loaded on the CPU and moved."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    def load(**options):
        if device.type != "cpu":
            try:
                return GptOssForCausalLM.from_pretrained(folder, dtype=dtype, device_map=str(device), **options)
            except ValueError as e:
                if "accelerate" not in str(e):
                    raise
        return GptOssForCausalLM.from_pretrained(folder, dtype=dtype, **options).to(device)

    try:
        model = load()
    except (ValueError, RuntimeError, ImportError, OSError):  # OSError: its kernels' hub download
        model = load(quantization_config=Mxfp4Config(dequantize=True))
    experts = model.model.layers[0].mlp.experts
    held = "MXFP4" if any(p.dtype == torch.uint8 for p in experts.state_dict().values()) else f"{dtype} (dequantized)"
    return model.eval(), held


def check_logits(ours, theirs, cfg: ModelConfig, device, strict: bool) -> str:
    """Both models' logits on one random batch; ``strict`` (float32) raises unless they agree to
    1e-3 of the logit scale. In bf16 the rounding of 24 layers differs between the libraries, so
    the agreement is reported (largest error relative to the logit scale, top-1 agreement)."""
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), device=device)
    with torch.inference_mode():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    scale = b.abs().amax().item()
    err = (a - b).abs().amax().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    verdict = f"max |apt - transformers| logit {err:.3g} (logit scale {scale:.3g}), top-1 agreement {top1:.0%}"
    if strict and not err <= 1e-3 * scale:
        raise SystemExit(f"logits disagree: {verdict}; not timing models that compute different things")
    return verdict


def drift_check(tiny: bool, device) -> str:
    """Which side moves when the two disagree: a one-layer checkpoint of the same shape, each
    library's logits in the model's dtype on ``device`` against its own float32 logits on the CPU,
    and the two float32 models against each other, on one random [2, 32] batch."""
    one = config(tiny, 1)
    torch.manual_seed(1)
    ids = torch.randint(0, one.vocab_size, (2, 32))
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        write_checkpoint(one, folder, device)
        apt_32 = load_pretrained(folder, device="cpu").float().eval()(ids).logits.double()
        apt_dev = load_pretrained(folder, device=device).eval()(ids.to(device)).logits.double().cpu()
        hf_32 = load_transformers(folder, torch.float32, torch.device("cpu"))[0](ids).logits.double()
        hf_dev = load_transformers(folder, one.torch_dtype, device)[0](ids.to(device)).logits.double().cpu()
    dtype = str(one.torch_dtype).replace("torch.", "")
    return (f"one layer, [2, 32] ids, logit scale {hf_32.abs().max().item():.3g}: apt_hal float32 vs transformers "
            f"float32 {(apt_32 - hf_32).abs().max().item():.3g}; {dtype} on {device.type} vs its own float32: apt_hal "
            f"{(apt_dev - apt_32).abs().max().item():.3g}, transformers {(hf_dev - hf_32).abs().max().item():.3g}")


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench(args, device) -> tuple[list, list[str]]:
    cfg = config(args.tiny, args.n_layers)
    notes, rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(cfg, folder, device)
        _reset_peak(device)
        ours = load_pretrained(folder, device=device).eval()
        held = "MXFP4" if ours.layers[0].ffn.w_up.dtype == torch.uint8 else str(ours.layers[0].ffn.w_up.dtype)
        prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt_len), device=device,
                                    generator=torch.Generator(device).manual_seed(2)) for b in args.batch}
        ours_tp = {b: model_bench._throughput(model_bench._ours(ours, p), b, args.prompt_len, args.decode_len,
                                              args.repeats) for b, p in prompts.items()}
        ours_peak = _peak_gb(device)
        ours_cpu = ours.to("cpu") if args.tiny else None  # kept for the logit check; on a GPU, reloaded there
        del ours
        _reset_peak(device)
        theirs, theirs_held = load_transformers(folder, cfg.torch_dtype, device)
        theirs_tp = {b: model_bench._throughput(model_bench._theirs(theirs, p), b, args.prompt_len, args.decode_len,
                                                args.repeats) for b, p in prompts.items()}
        theirs_peak = _peak_gb(device)
        if args.tiny:
            notes.append("logits: " + check_logits(ours_cpu, theirs, cfg, device, strict=True))
        else:
            del theirs
            apt_hal.empty_cache()
            # Each library's peak memory is measured with it alone on the card, so the logit
            # check loads both again after the timing (about 13 GB + 40 GB).
            theirs, _ = load_transformers(folder, cfg.torch_dtype, device)
            ours = load_pretrained(folder, device=device).eval()
            notes.append("logits: " + check_logits(ours, theirs, cfg, device, strict=False))
            del ours, theirs
            apt_hal.empty_cache()
    notes.append("logit drift: " + drift_check(args.tiny, device))
    notes.append(f"experts in memory: apt_hal {held}; transformers {theirs_held}")
    for b in args.batch:
        rows.append((b, ours_tp[b], theirs_tp[b]))
    return rows, notes + [f"peak GPU memory: apt_hal {ours_peak:.2f} GB, transformers {theirs_peak:.2f} GB "
                          f"(target apt_hal < {MEMORY_TARGET_GB:g} GB: "
                          f"{model_bench.met(ours_peak < MEMORY_TARGET_GB)})" if device.type == "cuda"
                          else "peak GPU memory: not measured (CPU)"]


def print_table(rows, label: str) -> str:
    head = ["model", "batch", "prefill tok/s apt", "prefill tok/s HF", "decode tok/s apt", "decode tok/s HF",
            "decode x HF"]
    body = [[label, str(b), f"{ours[0]:.0f}", f"{theirs[0]:.0f}", f"{ours[1]:.1f}", f"{theirs[1]:.1f}",
             f"{ours[1] / theirs[1]:.2f}x"] for b, ours, theirs in rows]
    return harness.markdown_table(head, body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny stand-in in float32 on the CPU: a smoke test")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; tiny: 16)")
    parser.add_argument("--decode-len", type=int, default=None, help="decoded tokens timed (default 64; tiny: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per point, median (default 3; tiny: 1)")
    parser.add_argument("--n-layers", type=int, default=None,
                        help="fewer layers than published (24), where a session's time limit needs it")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    for name, (full, tiny) in dict(prompt_len=(512, 16), decode_len=(64, 4), repeats=(3, 1)).items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    device = torch.device("cpu") if args.tiny else apt_hal.get_device()
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no accelerator found: the gpt-oss-20b shape needs one (use --tiny for a CPU smoke test)")
    import transformers

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else device}; torch {torch.__version__}; "
          f"triton {triton.__version__}; transformers {transformers.__version__}; prompt {args.prompt_len} tokens, "
          f"decode {args.decode_len} tokens, median of {args.repeats}", flush=True)
    rows, notes = bench(args, device)
    for line in notes:
        print(line, flush=True)
    print()
    label = "gpt-oss-20b shape" + (" (tiny)" if args.tiny else "")
    if args.n_layers is not None:
        label += f", {args.n_layers} layers"
    table = print_table(rows, label)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(notes) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
