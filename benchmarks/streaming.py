"""Decode with the weights streamed through a device budget (apt_hal.models.streaming): one table.

    python benchmarks/streaming.py            # GPU: apt-dense-1b, apt-moe-1b, apt-dense-4b (1b, 64 layers)
    python benchmarks/streaming.py --models apt-moe-1b   # one model per call (a comma list picks several)
    python benchmarks/streaming.py --tiny     # CPU smoke run: tiny presets with 8 layers

For each model, first without a budget (the whole model on the device: the baseline row "none"),
then at each budget (100%, 50%, 25%, 10% of the weight bytes, never less than the weights outside
the layers plus one layer) and each ``--prefetch-depth`` (0: one device slot rotates, the fewest
bytes; 1, the default: two, so the next layer's copy overlaps the running one), greedy decode from
random prompts at batch 1 and 16.
Columns: decode tokens/s (batch * steps / (time(1 + steps new tokens) - time(1 new token)),
median of --repeats after a warm-up); weight bytes streamed to the device per decode step and
the hit rate (layer runs that needed no transfer), both from the store's own counters
(``stats()["moved"]``); the achieved host-to-device rate while decoding (bytes streamed / decode
time) as a fraction of the pinned host-to-device rate measured in the same run; the step time
over its floor, (bytes streamed per step) / (pinned rate), which no step can beat; and, per decode
step, the bytes copied from the device back to the host or disk (``d2h MB/step``: 0, since layers
are frozen and go back to their kept copies) and the layers put back that way (``dropped/step``).

``--profile`` (GPU) adds, for each streamed batch-1 row, where the time goes, from a
torch.profiler trace of one generation of 1 + steps tokens, per forward pass (the prompt's and
the steps' decode passes, each streaming the same layers): the time the copy engine moves
host-to-device bytes (the union of its transfer intervals) and the rate while it does, the time
kernels run, the time both run at once, the time neither runs (the trace's setup included), and
the host's time blocked in stream, event or device synchronisation calls.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import apt_hal
from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate
from apt_hal.models.streaming import moved_in, stream_weights, written_back
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


def _counters(stream) -> tuple:
    """(layer blocks moved to the device, copied back from it, put back at a kept copy, layer runs) so
    far; zeros without a stream (the whole model on the device)."""
    if stream is None:
        return 0, 0, 0, 0
    stats = stream.store.stats()
    return (moved_in(stats), written_back(stats),
            sum(stats["dropped"].values()), stream.accesses)


def _decode(model, stream, batch: int, prompt_len: int, steps: int, repeats: int, vocab: int) -> tuple:
    """(tokens/s, seconds per step, and per decode step: layer blocks moved in, blocks copied back from
    the device, blocks put back at their kept copies, layer runs)."""
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()

    def timed(new_tokens):
        """Median seconds of a generate call, and the counters' growth per call."""
        config = GenerationConfig(max_new_tokens=new_tokens, greedy=True)
        generate(model, prompts, config)  # warm-up
        before, times = _counters(stream), []
        for _ in range(repeats):
            apt_hal.synchronize()
            start = time.perf_counter()
            generate(model, prompts, config)
            apt_hal.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times), [(a - b) / repeats for a, b in zip(_counters(stream), before)]

    long, long_counts = timed(1 + steps)
    short, short_counts = timed(1)
    step_s = (long - short) / steps
    return (batch / step_s, step_s, *((a - b) / steps for a, b in zip(long_counts, short_counts)))


def covered(spans) -> float:
    """The length of the union of ``(start, end)`` intervals (a profiler trace's busy time)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _profile(model, batch: int, prompt_len: int, steps: int, vocab: int, streamed_per_pass: float) -> str:
    """One line: where the time of a traced generation of 1 + steps tokens goes, per forward pass."""
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        generate(model, prompts, GenerationConfig(max_new_tokens=1 + steps, greedy=True))
        apt_hal.synchronize()
    events = prof.events()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [(e.time_range.start, e.time_range.end) for e in gpu if "HtoD" in e.name]
    kernels = [(e.time_range.start, e.time_range.end) for e in gpu if "Memcpy" not in e.name and "Memset" not in e.name]
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    wall = max(e.time_range.end for e in cpu) - min(e.time_range.start for e in cpu)
    waits = sum(e.time_range.elapsed_us() for e in cpu if "Synchronize" in e.name)
    copy_us, kernel_us, either = covered(copies), covered(kernels), covered(copies + kernels)
    passes = 1 + steps
    ms = 1e3 * passes
    rate = streamed_per_pass * passes / copy_us / 1e3 if copy_us else float("nan")
    both = copy_us + kernel_us - either
    return (f"  profile, per forward pass ({passes}): wall {wall / ms:.2f} ms; h2d copies {copy_us / ms:.2f} ms "
            f"({rate:.1f} GB/s while copying); kernels {kernel_us / ms:.2f} ms; both {both / ms:.2f} ms; "
            f"neither {(wall - either) / ms:.2f} ms; host blocked in synchronize {waits / ms:.2f} ms")


def _depth(text: str) -> int:
    """argparse type of --prefetch-depth: an int >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}")
    return int(text)


def _models(args) -> dict:
    """{row label: ModelConfig} of the models ``--models`` names (every one by default)."""
    if args.tiny:
        table = {name: (name, ModelConfig.preset(name, n_layers=8, dtype="bfloat16"))
                 for name in ("apt-dense-tiny", "apt-moe-tiny")}
    else:
        table = {name: (name, ModelConfig.preset(name)) for name in ("apt-dense-1b", "apt-moe-1b")}
        table["apt-dense-4b"] = ("apt-dense-4b (1b, 64 layers)", ModelConfig.preset("apt-dense-1b", n_layers=64))
    names = list(table) if args.models is None else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise SystemExit(f"streaming.py: argument --models must be a comma list of {', '.join(table)}, "
                         f"got {args.models!r}")
    return dict(table[n] for n in names)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny presets")
    parser.add_argument("--models", help="comma list of the table's models to run (default: all)")
    parser.add_argument("--mxfp4", action="store_true", help="MXFP4 weights (experts and linear layers but lm_head)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefetch-depth", type=_depth, nargs="+", default=[1], metavar="D",
                        help="streamed layers fetched ahead (stream_weights' prefetch_depth); several give a row "
                             "each, e.g. 0 1 (default 1)")
    parser.add_argument("--profile", action="store_true",
                        help="also trace each streamed batch-1 row: copy, kernel, idle and host-wait time per step")
    args = parser.parse_args(argv)
    device = apt_hal.get_device()
    models = _models(args)
    if args.tiny:
        args.steps, args.prompt_len, args.repeats = min(args.steps, 8), min(args.prompt_len, 16), 1

    print(f"device: {device}; greedy decode, prompt {args.prompt_len} tokens, {args.steps} steps, "
          f"median of {args.repeats}; weights {'MXFP4' if args.mxfp4 else 'bf16'}")
    header = (f"{'model':30} {'budget':>7} {'depth':>5} {'dev layers':>10} {'batch':>5} {'tok/s':>9} {'MB/step':>9} "
              f"{'hit rate':>8} {'h2d/pinned':>10} {'step/floor':>10} {'d2h MB/step':>11} {'dropped/step':>12}")
    rate = None
    for name, cfg in models.items():
        base = build_model(cfg).eval()  # on the CPU: streaming places it
        if args.mxfp4:
            convert_model_to_mxfp4(base)
        runs = [(None, None)] + [(b, d) for b in BUDGETS for d in (args.prefetch_depth if b < 100 else [1])]
        for budget, depth in runs:  # budget None: the whole model on the device (the baseline)
            model = copy.deepcopy(base)
            if budget is None:
                stream = None
                model.to(device)
            else:
                try:
                    stream = stream_weights(model, f"{budget}%", device=device, prefetch_depth=depth)
                except ValueError:  # below the weights outside the layers plus one layer
                    if depth == args.prefetch_depth[0]:
                        print(f"{name:30} {budget:6}%  below the resident weights plus one layer: skipped")
                    continue
            if rate is None:
                layer_bytes = sum(t.numel() * t.element_size() for t in [*model.layers[0].parameters(),
                                                                         *model.layers[0].buffers()])
                rate = _pinned_rate(device, 8 * layer_bytes, args.repeats)
                print(f"pinned host-to-device rate: {rate / 1e9:.2f} GB/s")
                print(header)
            for batch in (1, 16):
                tok_s, step_s, moved, copied_back, dropped, runs = _decode(
                    model, stream, batch, args.prompt_len, args.steps, args.repeats, cfg.vocab_size)
                layer_bytes = stream.layer_bytes if stream else 0
                streamed = moved * layer_bytes
                h2d = streamed / step_s / rate if streamed else float("nan")
                floor = streamed / rate
                hit_rate = 1 - moved / runs if runs else 1.0  # every layer resident: no hooks, no runs counted
                label = f"{budget:6}%" if budget else "   none"
                print(f"{name:30} {label} {stream.window - 1 if stream and stream.moves_weights else '-':>5} "
                      f"{stream.capacity if stream else len(model.layers):10} {batch:5} "
                      f"{tok_s:9.1f} {streamed / 1e6:9.1f} {hit_rate:8.2f} {h2d:10.2f} "
                      f"{step_s / floor if floor else float('nan'):10.2f} {copied_back * layer_bytes / 1e6:11.1f} "
                      f"{dropped:12.1f}")
                if args.profile and batch == 1 and streamed:
                    print(_profile(model, batch, args.prompt_len, args.steps, cfg.vocab_size, streamed))
            if stream is not None:
                stream.close()
            del model, stream


if __name__ == "__main__":
    main()
