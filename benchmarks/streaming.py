"""Decode with the weights streamed through a device budget (apt_hal.models.streaming): one table.

    python benchmarks/streaming.py            # GPU: apt-dense-1b, apt-moe-1b, apt-dense-4b (1b, 64 layers)
    python benchmarks/streaming.py --tiny     # CPU smoke run: tiny presets with 8 layers

For each model and each budget (100%, 50%, 25%, 10% of the weight bytes, never less than the
weights outside the layers plus one layer), greedy decode from random prompts at batch 1 and 16.
Columns: decode tokens/s (batch * steps / (time(1 + steps new tokens) - time(1 new token)),
median of --repeats after a warm-up); weight bytes streamed to the device per decode step and
the hit rate (layer runs that needed no transfer), both from the store's own counters
(``stats()["moved"]``); the achieved host-to-device rate while decoding (bytes streamed / decode
time) as a fraction of the pinned host-to-device rate measured in the same run; and the step time
over its floor, (bytes streamed per step) / (pinned rate), which no step can beat.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import apt_hal
from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate
from apt_hal.models.streaming import stream_weights
from apt_hal.nn import convert_model_to_mxfp4

BUDGETS = (100, 50, 25, 10)


def _pinned_rate(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes/s of a pinned host-to-device copy of ``nbytes`` (a host copy without an accelerator)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type != "cpu")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        apt_hal.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        apt_hal.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def _moved_in(stream) -> int:
    return sum(n for route, n in stream.store.stats()["moved"].items() if route.endswith("->device"))


def _decode(model, stream, batch: int, prompt_len: int, steps: int, repeats: int, vocab: int) -> tuple:
    """(tokens/s, layer blocks moved in per decode step, layer runs per decode step, seconds per step)."""
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()

    def timed(new_tokens):
        """Median seconds of a generate call, and the blocks moved in and layer runs per call."""
        config = GenerationConfig(max_new_tokens=new_tokens, greedy=True)
        generate(model, prompts, config)  # warm-up
        moved, runs, times = _moved_in(stream), stream.accesses, []
        for _ in range(repeats):
            apt_hal.synchronize()
            start = time.perf_counter()
            generate(model, prompts, config)
            apt_hal.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times), (_moved_in(stream) - moved) / repeats, (stream.accesses - runs) / repeats

    long, long_moved, long_runs = timed(1 + steps)
    short, short_moved, short_runs = timed(1)
    step_s = (long - short) / steps
    return batch / step_s, (long_moved - short_moved) / steps, (long_runs - short_runs) / steps, step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny presets")
    parser.add_argument("--mxfp4", action="store_true", help="MXFP4 weights (experts and linear layers but lm_head)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = apt_hal.get_device()
    if args.tiny:
        models = {name: ModelConfig.preset(name, n_layers=8, dtype="bfloat16") for name in ("apt-dense-tiny",
                                                                                             "apt-moe-tiny")}
        args.steps, args.prompt_len, args.repeats = min(args.steps, 8), min(args.prompt_len, 16), 1
    else:
        models = {name: ModelConfig.preset(name) for name in ("apt-dense-1b", "apt-moe-1b")}
        models["apt-dense-4b (1b, 64 layers)"] = ModelConfig.preset("apt-dense-1b", n_layers=64)

    print(f"device: {device}; greedy decode, prompt {args.prompt_len} tokens, {args.steps} steps, "
          f"median of {args.repeats}; weights {'MXFP4' if args.mxfp4 else 'bf16'}")
    header = (f"{'model':30} {'budget':>7} {'dev layers':>10} {'batch':>5} {'tok/s':>9} {'MB/step':>9} "
              f"{'hit rate':>8} {'h2d/pinned':>10} {'step/floor':>10}")
    rate = None
    for name, cfg in models.items():
        base = build_model(cfg).eval()  # on the CPU: streaming places it
        if args.mxfp4:
            convert_model_to_mxfp4(base)
        for budget in BUDGETS:
            model = copy.deepcopy(base)
            try:
                stream = stream_weights(model, f"{budget}%", device=device)
            except ValueError:  # below the weights outside the layers plus one layer
                print(f"{name:30} {budget:6}%  below the resident weights plus one layer: skipped")
                continue
            if rate is None:
                rate = _pinned_rate(device, 8 * stream.layer_bytes, args.repeats)
                print(f"pinned host-to-device rate: {rate / 1e9:.2f} GB/s")
                print(header)
            for batch in (1, 16):
                tok_s, moved, runs, step_s = _decode(model, stream, batch, args.prompt_len, args.steps,
                                                     args.repeats, cfg.vocab_size)
                streamed = moved * stream.layer_bytes
                h2d = streamed / step_s / rate if streamed else float("nan")
                floor = streamed / rate
                print(f"{name:30} {budget:6}% {stream.capacity:10} {batch:5} {tok_s:9.1f} {streamed / 1e6:9.1f} "
                      f"{1 - moved / runs:8.2f} {h2d:10.2f} {step_s / floor if floor else float('nan'):10.2f}")
            stream.close()
            del model, stream


if __name__ == "__main__":
    main()
