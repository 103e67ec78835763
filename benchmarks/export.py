"""apt-compile on the CPU: export time, graph size, and per-token decode latency on ONNX Runtime with
the past/present (KV cache) graph against re-running the full-sequence graph on the whole prefix.

    python benchmarks/export.py --model apt-dense-tiny --prompt 32 --new-tokens 64

Prints one table. Both graphs come from the same model in the same run; latencies are medians over
the decode steps (batch 1, ONNX Runtime's CPU provider, default threads). A third row exports the
same weights with ``optimum-cli export onnx`` (task text-generation-with-past), from the virtual
environment whose python ``APT_HAL_OPTIMUM_PYTHON`` names (docs/optimum-ci.txt makes one), through a
Hugging Face checkpoint of the model; its graph has the same inputs and outputs and is timed by the
same loop. Its export time includes starting optimum-cli and the check against PyTorch that
optimum-cli always runs. Without that variable, or for a model with no Hugging Face form, the row
says why it did not run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

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


def _decode_with_past(folder: Path, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    """Per-step decode times and the greedy tokens chosen."""
    from apt_hal.compile import past
    from apt_hal.compile.ort_generate import OrtCausalLM

    lm = OrtCausalLM(folder)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    logits, cache = lm.forward(ids, mask, past.empty_past(lm.config, 1, lm.dtype))
    times, tokens = [], []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        start = time.perf_counter()
        logits, cache = lm.forward(token, mask, cache)
        times.append(time.perf_counter() - start)
    return times, tokens


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


def _optimum_cli() -> tuple[Optional[Path], str]:
    """``optimum-cli`` beside the python ``APT_HAL_OPTIMUM_PYTHON`` names, or None and why not."""
    python = os.environ.get("APT_HAL_OPTIMUM_PYTHON")
    if not python:
        return None, "not run: APT_HAL_OPTIMUM_PYTHON is not set (docs/optimum-ci.txt makes its venv)"
    cli = Path(python).parent / "optimum-cli"
    return (cli, "") if cli.is_file() else (None, f"not run: no {cli}")


def _export_with_optimum_cli(cli: Path, model, folder: Path) -> tuple[Path, float]:
    """``optimum-cli export onnx`` of ``model`` (saved as a Hugging Face checkpoint first), with
    apt_model.json beside its graph so :class:`OrtCausalLM` runs it as it runs apt-compile's."""
    from apt_hal.compile.ort_generate import MODEL_CONFIG_FILE
    from apt_hal.models.hf import save_pretrained

    save_pretrained(model, folder / "hf")
    start = time.perf_counter()
    run = subprocess.run([str(cli), "export", "onnx", "--model", str(folder / "hf"), "--task",
                          "text-generation-with-past", str(folder / "onnx")], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"optimum-cli export onnx failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    shutil.copy(folder / "past" / MODEL_CONFIG_FILE, folder / "onnx" / MODEL_CONFIG_FILE)
    return folder / "onnx" / "model.onnx", seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="apt-dense-tiny", help="preset, config .json or checkpoint (apt-compile --model)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default %(default)s)")
    args = p.parse_args(argv)
    from apt_hal.compile import api

    model, what = api.load_model(args.model)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    rows, notes = [], []
    cli, why_not = _optimum_cli()
    with tempfile.TemporaryDirectory() as tmp:
        with_past, past_export = _export(model, Path(tmp) / "past", kv_cache=True)
        full, full_export = _export(model, Path(tmp) / "full", kv_cache=False)
        past_times, past_tokens = _decode_with_past(with_past.parent, prompt.tolist(), args.new_tokens)
        full_times = _decode_full_forward(full, prompt.tolist(), args.new_tokens)
        rows.append(("apt-compile, past/present graph", _node_count(with_past), past_export,
                     statistics.median(past_times)))
        rows.append(("apt-compile, full forward re-run each token", _node_count(full), full_export,
                     statistics.median(full_times)))
        if cli is not None:
            try:
                theirs, cli_export = _export_with_optimum_cli(cli, model, Path(tmp))
            except ValueError as e:  # save_pretrained: the config has no Hugging Face form
                why_not = f"not run: {e}"
        if not why_not:
            cli_times, cli_tokens = _decode_with_past(theirs.parent, prompt.tolist(), args.new_tokens)
            rows.append(("optimum-cli export onnx", _node_count(theirs), cli_export, statistics.median(cli_times)))
            same = "the same" if cli_tokens == past_tokens else "NOT the same"
            notes.append(f"optimum-cli's graph chose {same} {args.new_tokens} greedy tokens as the past/present graph")
    print(f"model {what}; prompt {args.prompt} tokens, {args.new_tokens} decode steps, batch 1, "
          f"onnxruntime {importlib.import_module('onnxruntime').__version__} CPU, torch {torch.__version__}")
    header = ("graph", "nodes", "export s", "decode ms/token")
    table = [header] + [(name, str(nodes), f"{export:.1f}", f"{1e3 * t:.2f}") for name, nodes, export, t in rows]
    if why_not:
        table.append(("optimum-cli export onnx", "-", "-", why_not))
    widths = [max(len(r[i]) for r in table[:3]) for i in range(4)]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
