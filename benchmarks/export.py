"""apt-compile on the CPU: export time, graph size, and per-token decode latency on ONNX Runtime with
the past/present (KV cache) graph against re-running the full-sequence graph on the whole prefix.

    python benchmarks/export.py --model apt-dense-tiny --prompt 32 --new-tokens 64

Prints one table. Both graphs come from the same model in the same run; latencies are medians over
the decode steps (batch 1, ONNX Runtime's CPU provider, default threads). optimum-cli's export is
compared when ``optimum.exporters.onnx`` imports with the installed transformers; otherwise its row
says why not.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import torch


def _node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _export(model, folder: Path, kv_cache: bool) -> tuple[Path, float]:
    from apt_hal.compile import api

    start = time.perf_counter()
    result = api.compile_model(model, folder, kv_cache=kv_cache, dynamic_batch=True, dynamic_seq=True,
                               validate_graph=False, log=lambda *a: None)
    if result.exit_code != api.EXIT_OK:
        raise SystemExit(f"export failed: {result.verdict}")
    return folder / api.MODEL_FILE, time.perf_counter() - start


def _decode_with_past(folder: Path, prompt: list[int], new_tokens: int) -> list[float]:
    from apt_hal.compile import past
    from apt_hal.compile.ort_generate import OrtCausalLM

    lm = OrtCausalLM(folder)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    logits, cache = lm.forward(ids, mask, past.empty_past(lm.config, 1, lm.dtype))
    times = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        start = time.perf_counter()
        logits, cache = lm.forward(token, mask, cache)
        times.append(time.perf_counter() - start)
    return times


def _decode_full_forward(path: Path, prompt: list[int], new_tokens: int) -> list[float]:
    from apt_hal.compile import validate

    run = validate.graph_runner(path)
    ids = torch.tensor([prompt])
    times = []
    (logits,) = run([ids])
    for _ in range(new_tokens):
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        start = time.perf_counter()
        (logits,) = run([ids])
        times.append(time.perf_counter() - start)
    return times


def _optimum_why_not() -> str:
    try:
        importlib.import_module("optimum.exporters.onnx")
    except Exception as e:  # not installed, or not importable with this transformers
        return f"not run: optimum.exporters.onnx does not import here ({type(e).__name__}: {str(e)[:80]})"
    return "not run: installed, but this script does not drive optimum-cli yet"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="apt-dense-tiny", help="preset, config .json or checkpoint (apt-compile --model)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default %(default)s)")
    args = p.parse_args(argv)
    from apt_hal.compile import api

    model, what = api.load_model(args.model)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with_past, past_export = _export(model, Path(tmp) / "past", kv_cache=True)
        full, full_export = _export(model, Path(tmp) / "full", kv_cache=False)
        past_times = _decode_with_past(with_past.parent, prompt.tolist(), args.new_tokens)
        full_times = _decode_full_forward(full, prompt.tolist(), args.new_tokens)
        rows.append(("apt-compile, past/present graph", _node_count(with_past), past_export,
                     statistics.median(past_times)))
        rows.append(("apt-compile, full forward re-run each token", _node_count(full), full_export,
                     statistics.median(full_times)))
    print(f"model {what}; prompt {args.prompt} tokens, {args.new_tokens} decode steps, batch 1, "
          f"onnxruntime {importlib.import_module('onnxruntime').__version__} CPU, torch {torch.__version__}")
    header = ("graph", "nodes", "export s", "decode ms/token")
    table = [header] + [(name, str(nodes), f"{export:.1f}", f"{1e3 * t:.2f}") for name, nodes, export, t in rows]
    table.append(("optimum-cli export onnx", "-", "-", _optimum_why_not()))
    widths = [max(len(r[i]) for r in table[:-1]) for i in range(4)]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
