"""The ``apt-compile`` command: export an APT model to ONNX or TensorRT, validated against eager."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apt_hal import __version__
from apt_hal.cli_errors import UsageError, run_command

EPILOG = """examples:
  apt-compile --target onnx --model apt-moe-tiny --output out/moe --dynamic-batch --dynamic-seq
  apt-compile --target tensorrt --model apt-oss-tiny --output out/oss-trt --dynamic-batch --dynamic-seq
  apt-compile --target onnx --model path/to/hf_checkpoint --output out/hf --opset 21
  apt-compile --list-lowerings

--model takes a preset (apt-{dense,moe,oss,seq2seq}-{tiny,1b}; random weights, seed 0), a
ModelConfig .json file, an 'apt-hal train' checkpoint folder, or a Hugging Face checkpoint folder.
A decoder-only model (dense, moe, oss) exports the past/present graph that generation runs:
input_ids, attention_mask, position_ids, past_key_values.{i}.key/value -> logits, present.{i}.key/value
(optimum's names and layout; dynamic batch, sequence and past length; empty past = prefill), with
apt_model.json, config.json and genai_config.json beside it: 'apt-hal generate --onnx DIR' runs it.
A seq2seq model exports optimum's three graphs instead: encoder_model.onnx, decoder_model.onnx (the
first decoder step) and decoder_with_past_model.onnx (docs/export.md), with apt_model.json.
With --no-kv-cache the graph takes input_ids [batch, seq] (and decoder_input_ids for seq2seq) and
returns logits.

Validation (on by default) runs the graph on ONNX Runtime's CPU provider on several input sets,
including dynamic sizes the export never saw and size 1, and compares each output with eager
PyTorch; a graph ONNX Runtime cannot run (FP4 DequantizeLinear) runs on onnx.reference, and its
MXFP4-decoded twin model.decode.onnx on ONNX Runtime. --target tensorrt feeds every masked
Attention node an additive float mask (TensorRT takes no BOOL mask; --target onnx keeps BOOL) and
validates the graph as written; it also writes trt_readiness.md (every node against TensorRT
10.15's operator list) and build_trt.sh (trtexec and polygraphy), and builds an engine when the
tensorrt package and a CUDA GPU are present.

exit codes:
  0  exported (and validated within tolerance; TensorRT build skipped unless --require-trt)
  2  bad arguments, or the model cannot be loaded
  3  export failed (torch.export, ONNX translation or the ONNX checker)
  4  exported, but out of tolerance (or the runtime could not run the graph)
  5  --require-trt and no TensorRT engine was built and checked
"""


def build_parser() -> argparse.ArgumentParser:
    from apt_hal.compile import lowering

    p = argparse.ArgumentParser(
        prog="apt-compile", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export an APT model to ONNX (portable, ONNX Runtime) or TensorRT, every apt_hal op "
                    "lowered by one table per target, and validate the graph against eager PyTorch.")
    p.add_argument("--version", action="version", version=f"apt-compile {__version__}")
    p.add_argument("--target", choices=tuple(lowering.PROFILES), help="what the graph must run on")
    p.add_argument("--model", metavar="CONFIG_OR_CHECKPOINT", help="preset, config .json or checkpoint folder")
    p.add_argument("--output", metavar="DIR", type=Path, help="folder for the graph, reports and scripts")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (" + "; ".join(
        f"{n}: {t.min_opset}-{t.max_opset}, default {t.default_opset}" for n, t in lowering.PROFILES.items()) + ")")
    p.add_argument("--dynamic-batch", action="store_true", help="batch size chosen at run time")
    p.add_argument("--dynamic-seq", action="store_true", help="sequence length chosen at run time")
    p.add_argument("--no-validate", action="store_true", help="skip running and comparing the graph")
    p.add_argument("--require-trt", action="store_true",
                   help="fail (exit 5) unless a TensorRT engine is built and checked here")
    p.add_argument("--fp4", choices=lowering.FP4_MODES,
                   help="MXFP4 weights decoded in the graph (decode, the default) or as FP4 DequantizeLinear with "
                        "E8M0 block-32 scales (qdq; tensorrt at opset 24; TensorRT documents only NVFP4)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="cast weights and computation before export (a bfloat16 checkpoint to a float32 or float16 "
                        "graph that ONNX Runtime's CPU provider runs); default: the model's own")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="export the full-sequence logits graph instead of the past/present (KV cache) graph of a "
                        "decoder-only model or the encoder + decoder-with-past graphs of a seq2seq model")
    p.add_argument("--list-lowerings", action="store_true", help="print the lowering table of every target and exit")
    return p


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_lowerings() -> None:
    from apt_hal.compile import lowering

    for name, table in lowering.LOWERINGS.items():
        p = lowering.PROFILES[name]
        print(f"{name}: {p.description}; opsets {p.min_opset}-{p.max_opset}, default {p.default_opset}")
        width = max(map(len, table))
        for op, low in table.items():
            print(f"  {op.ljust(width)}  {low.how}")
        print()
    print("rotary_ (in place), paged_write and paged_copy_blocks are exported through functional twins.")


def print_summary(result, model: str) -> None:
    from apt_hal.compile import lowering

    print("\n== apt-compile summary ==")
    e = result.exported
    if e is not None:
        t = e.target
        several = len(result.graphs) > 1
        print(f"model     {model}")
        print(f"target    {t.profile.name} ({t.profile.description}); opset {t.opset}, IR version "
              f"{e.model.ir_version}, MXFP4 as {t.fp4}")
        for g in result.graphs:
            name = f"{g.exported.path.name}: " if several else ""
            print("dynamic   " + name + ("; ".join(f"{n} {d}" for n, d in g.exported.dims.items())
                                         or "none (static shapes)"))
        print("files")
        for f in result.files:
            print(f"  {str(f):<48} {_size(f.stat().st_size) if f.exists() else '(missing)'}")
        table = lowering.LOWERINGS[t.profile.name]
        print("lowered")
        for g in result.graphs:
            for op, count in sorted(g.exported.apt_hal_ops.items()):
                print(f"  {g.exported.path.name + ': ' if several else ''}{op} x{count}: {table[op].how}")
        for v in result.validations:
            print()
            print(v.table())
        if any(g.readiness for g in result.graphs):
            print()
        for g in result.graphs:
            name = f"{g.exported.path.name}: " if several else ""
            if g.readiness is not None:
                print(f"{name}TensorRT {g.readiness.tensorrt_version} readiness: {g.readiness.verdict} "
                      f"({g.readiness_file})")
            if g.tensorrt:
                print(name + g.tensorrt)
    print(f"\nresult: {result.verdict} (exit {result.exit_code})")


def main(argv=None) -> int:
    return run_command("apt-compile", _compile_command, argv)


def _compile_command(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_lowerings:
        print_lowerings()
        return 0
    missing = [f"--{n}" for n in ("target", "model", "output") if getattr(args, n) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    from apt_hal.compile.api import EXIT_USAGE, compile_model

    result = compile_model(args.model, args.output, target=args.target, opset=args.opset, fp4=args.fp4,
                           dynamic_batch=args.dynamic_batch, dynamic_seq=args.dynamic_seq,
                           validate_graph=not args.no_validate, require_trt=args.require_trt,
                           kv_cache=False if args.no_kv_cache else None, dtype=args.dtype,
                           log=lambda msg: print(msg, flush=True))
    if result.exit_code == EXIT_USAGE:
        raise UsageError(result.verdict)
    print_summary(result, args.model)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
