"""``apt-hal generate``: continue a prompt with a checkpoint of ``apt-hal train``.

Also the pieces ``apt-hal chat`` (:mod:`apt_hal.models.chat`) shares with it: the sampling
options and loading. The prompt is encoded as ``bos`` + its tokens (the way training saw each
paragraph); generation ends at ``eos`` (the end of a paragraph) or after ``--max-new-tokens``, and
the output is cut after the first ``--stop`` text. (A stop text ends the output, not the
generation: GenerationConfig drops the stop token it ends on, which would lose the text before
the stop inside that token.)
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional, Sequence

from apt_hal.cli_errors import EXIT_CODES_EPILOG, parse_device

HELP = "continue a prompt with a checkpoint of apt-hal train"
EPILOG = """examples:
  apt-hal generate --checkpoint runs/tiny --prompt "The river" --seed 1
  apt-hal generate --checkpoint runs/tiny/step-00000300 --prompt "The river" --greedy
  apt-hal generate --checkpoint runs/tiny --prompt "At night" --temperature 0.7 --top-p 0.9 --stop "."
  apt-hal generate --onnx out/tiny-onnx --prompt "The river" --greedy   (apt-compile --model runs/tiny ...)

--checkpoint takes a run folder (its latest complete checkpoint is used) or one step-N folder;
its manifest is verified before anything is loaded.

""" + EXIT_CODES_EPILOG


def add_sampling_arguments(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """The options of GenerationConfig, and where to run."""
    p.add_argument("--checkpoint", required=checkpoint_required, metavar="DIR",
                   help="a run folder of apt-hal train (its latest checkpoint), or a step-N folder")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64, help="default %(default)s")
    g.add_argument("--temperature", type=float, default=1.0, help="divides the logits (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="default %(default)s: off")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--seed", type=int, help="seed the sampling for a repeatable output")
    g = p.add_argument_group("device")
    g.add_argument("--device", help="torch device, e.g. cpu or cuda:1 (default: apt_hal.get_device())")
    g.add_argument("--backend",
                   help="apt_hal backend policy, e.g. cpu or cuda-triton (default: APT_HAL_BACKEND or auto)")
    g.add_argument("--gpu-memory", metavar="BUDGET",
                   help="device memory for the weights, e.g. 2GiB, 800MB or 25%% of the weights; the layers that "
                        "do not fit stream from pinned host memory (apt_hal.models.streaming)")


def load(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--checkpoint``, on ``--device`` under ``--backend``."""
    import torch

    import apt_hal
    from apt_hal.models.checkpoint import load_trained_model

    if args.backend:
        apt_hal.use(args.backend)
    device = parse_device(args.device) if args.device else apt_hal.get_device()
    if not args.gpu_memory:
        return load_trained_model(args.checkpoint, device)[:2]
    from apt_hal.models.streaming import stream_weights

    model, tokenizer, _ = load_trained_model(args.checkpoint, torch.device("cpu"))  # streamed to the device
    stream_weights(model, args.gpu_memory, device=device)
    return model, tokenizer


def generation_config(args: argparse.Namespace, tokenizer, seed: Optional[int] = None):
    """The GenerationConfig of the sampling options (``seed`` overrides ``--seed``); it stops at ``eos``."""
    from apt_hal.models import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            stop_tokens=(tokenizer.eos_id,), seed=args.seed if seed is None else seed,
                            greedy=args.greedy)


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first stop string (which is kept), or all of it."""
    ends = [text.index(s) + len(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sampling_arguments(p, checkpoint_required=False)
    p.add_argument("--onnx", metavar="DIR", help="instead of --checkpoint: generate on ONNX Runtime's CPU provider "
                                                 "with the KV-cache graphs apt-compile wrote to DIR (decoder-only "
                                                 "or seq2seq)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--stop", nargs="+", default=[], metavar="TEXT", help="end the output after the first TEXT")


def run(args: argparse.Namespace) -> int:
    from apt_hal.models import generate

    if not args.prompt.strip():
        print("apt-hal generate: error: --prompt is empty; give the text to continue", file=sys.stderr)
        return 2
    if (args.checkpoint is None) == (args.onnx is None):
        print("apt-hal generate: error: give one of --checkpoint and --onnx", file=sys.stderr)
        return 2
    try:
        if args.onnx:
            from apt_hal.compile import ort_generate

            runner = ort_generate.load(args.onnx)
            tokenizer, generate_tokens = runner.tokenizer(), runner.generate
        else:
            model, tokenizer = load(args)
            generate_tokens = functools.partial(generate, model)
        config = generation_config(args, tokenizer)
        new_tokens = generate_tokens([tokenizer.encode(args.prompt, bos=True)], config)[0]
    except (ValueError, OSError) as e:  # OSError covers CheckpointError
        print(f"apt-hal generate: error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + _cut_at_stops(tokenizer.decode(new_tokens), args.stop))
    return 0
