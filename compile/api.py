"""``apt-compile`` as a Python function: load a model, export it, validate it, prepare TensorRT.

    from apt_hal.compile import compile_model
    result = compile_model("apt-moe-tiny", "out/moe", target="onnx", dynamic_batch=True, dynamic_seq=True)
    print(result.validations[0].table()); result.exit_code   # 0: exported and within tolerance

Stages, each logged: **load** the model (a preset name, a ModelConfig JSON file, an ``apt-hal
train`` checkpoint folder or a Hugging Face checkpoint folder); **export** (see
:mod:`apt_hal.compile.export`); **validate** on several input sets, unseen shapes included, against
eager PyTorch (:mod:`apt_hal.compile.validate`); for ``--target tensorrt`` the **TensorRT** readiness
report, the build script, and a real build where TensorRT and a GPU exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch.utils import _pytree

from apt_hal.atomic import atomic_write_text
from apt_hal.cli_errors import check_writable_folder
from apt_hal.compile import lowering, past, seq2seq_past, tensorrt, validate
from apt_hal.compile.export import DimRange, Exported, ExportError, export_onnx, external_data_path

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or a model that cannot be loaded
EXIT_EXPORT_FAILED = 3
EXIT_OUT_OF_TOLERANCE = 4  # exported, but validation failed (an output out of tolerance, or the runtime failed)
EXIT_TRT_REQUIRED = 5  # --require-trt, and no TensorRT engine was built and checked

MODEL_FILE = "model.onnx"
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
SEED = 0


@dataclasses.dataclass
class GraphResult:
    """One graph written: what :func:`export_onnx` returned, and for ``--target tensorrt`` its
    readiness report (and the file it is written to) and "TensorRT build: ..." line."""

    exported: Exported
    readiness: Optional[tensorrt.Readiness] = None
    readiness_file: str = ""
    tensorrt: str = ""


@dataclasses.dataclass
class CompileResult:
    exit_code: int
    verdict: str  # one line
    files: list[Path] = dataclasses.field(default_factory=list)
    graphs: list[GraphResult] = dataclasses.field(default_factory=list)  # seq2seq: encoder, decoder, with past
    validations: list[validate.Validation] = dataclasses.field(default_factory=list)

    # The first graph's (the only one, but for a seq2seq model's encoder + decoders).
    @property
    def exported(self) -> Optional[Exported]:
        return self.graphs[0].exported if self.graphs else None

    @property
    def readiness(self) -> Optional[tensorrt.Readiness]:
        return self.graphs[0].readiness if self.graphs else None

    @property
    def tensorrt(self) -> str:
        return self.graphs[0].tensorrt if self.graphs else ""


@dataclasses.dataclass
class GraphPlan:
    """One graph to export: ``module(*args)`` traced into ``file`` with :func:`export_onnx`'s
    ``dynamic``, ``input_names`` and ``output_names`` (``export``), then validated on
    ``input_sets(exported)``; ``empty_ok``: the dimensions a TensorRT profile lets reach 0."""

    file: str
    module: torch.nn.Module
    args: tuple
    export: dict
    input_sets: Callable[[Exported], list[validate.InputSet]]
    empty_ok: frozenset = frozenset()


class LogitsOf(torch.nn.Module):
    """A model whose forward returns only ``.logits``: the exported graph's one output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if decoder_input_ids is None:
            return self.model(input_ids).logits
        return self.model(input_ids, decoder_input_ids=decoder_input_ids).logits


def load_model(spec: str) -> tuple[torch.nn.Module, str]:
    """``(model in eval mode on the CPU, description)`` from a preset name, a ModelConfig JSON file,
    an ``apt-hal train`` checkpoint (or run) folder, or a Hugging Face checkpoint folder. Random
    weights (presets, configs) are seeded, so an export is reproducible. A file that cannot give a
    model raises ValueError (or OSError) naming it and what is wrong."""
    from apt_hal.models import PRESETS, ModelConfig, build_model

    path = Path(spec)
    if spec in PRESETS or (path.suffix == ".json" and path.is_file()):
        cfg = ModelConfig.preset(spec) if spec in PRESETS else _config_file(path)
        _check_fits_in_memory(cfg, spec)
        torch.manual_seed(SEED)
        return build_model(cfg).eval(), f"{spec} ({cfg.family}, random weights, seed {SEED})"
    if path.is_dir():
        from apt_hal.models import checkpoint

        if (path / checkpoint.MANIFEST).exists() or checkpoint.latest_checkpoint(path) is not None:
            model, _, folder = checkpoint.load_trained_model(path, device="cpu")
            return model.eval(), f"apt-hal checkpoint {folder}"
        if (path / "config.json").exists():
            return _hugging_face_model(path).eval(), f"Hugging Face checkpoint {path}"
    raise ValueError(f"--model {spec!r} is not a preset ({', '.join(PRESETS)}), a ModelConfig .json file, an apt-hal "
                     "checkpoint folder or a Hugging Face checkpoint folder (with config.json)")


def _config_file(path: Path):
    from apt_hal.models import ModelConfig

    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"{path}: not a JSON file: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: a ModelConfig file holds a JSON object of fields, not a {type(fields).__name__}")
    try:
        return ModelConfig.from_dict(fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def _check_fits_in_memory(cfg, spec: str) -> None:
    """Refuse a config whose weights this machine cannot hold, before allocating them."""
    from apt_hal.models import build_model

    try:
        shapes = build_model(cfg, device="meta")
    except RuntimeError as e:  # a tensor size beyond what torch can address
        raise ValueError(f"{spec}: the model's tensors are too large to exist ({e})") from None
    needed = sum(t.numel() * t.element_size() for t in [*shapes.parameters(), *shapes.buffers()])
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise ValueError(f"{spec}: the model's weights need {needed / 2 ** 30:,.1f} GiB, more than this machine's "
                         f"{memory / 2 ** 30:,.1f} GiB of memory")


def _hugging_face_model(path: Path) -> torch.nn.Module:
    from safetensors import SafetensorError, safe_open

    from apt_hal.models.hf import load_pretrained

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt"):  # reads the header only
                pass
        except SafetensorError as e:
            raise ValueError(f"{weights}: not a valid safetensors file: {e}") from None
    try:
        return load_pretrained(path)
    except KeyError as e:
        raise ValueError(f"{path}: config.json (or the weights index) has no {e.args[0]!r} entry") from None


def _example_inputs(model: torch.nn.Module, batch: int, seq: int, generator: torch.Generator) -> tuple:
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    if cfg.family == "seq2seq":
        return ids, torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    return (ids,)


def _dynamic(model: torch.nn.Module, dynamic_batch: bool, dynamic_seq: bool) -> dict[str, dict[int, str]]:
    names = ["input_ids", "decoder_input_ids"] if model.config.family == "seq2seq" else ["input_ids"]
    out = {}
    for n in names:
        axes = {}
        if dynamic_batch:
            axes[0] = "batch"
        if dynamic_seq:
            axes[1] = "seq" if n == "input_ids" else "decoder_seq"
        if axes:
            out[n] = axes
    return out


def unseen_size(d: DimRange) -> int:
    """A size of ``d`` that the export never saw, inside the range torch.export proved."""
    high = d.high if d.high is not None else d.example + 3
    for size in (d.example + 3, d.example - 1, d.example + 1, d.low):
        if d.low <= size <= high and size != d.example:
            return size
    return d.example  # the range is one size: nothing unseen exists


def input_sets(model: torch.nn.Module, exported: Exported, generator: torch.Generator) -> list[validate.InputSet]:
    """Fresh token ids at the export's shape, at an unseen size of every dynamic dimension, and at
    size 1 of every dynamic dimension (below torch.export's guaranteed range: batch 1 and one-token
    steps are what a server runs most)."""
    cfg = model.config
    example_shape = {"batch": EXAMPLE_BATCH, "seq": min(EXAMPLE_SEQ, cfg.max_position)}
    example_shape["decoder_seq"] = example_shape["seq"]

    def make(sizes: dict[str, int]) -> tuple:
        shape = lambda s: (sizes.get("batch", example_shape["batch"]), sizes.get(s, example_shape[s]))  # noqa: E731
        ids = torch.randint(0, cfg.vocab_size, shape("seq"), generator=generator)
        if cfg.family == "seq2seq":
            return ids, torch.randint(0, cfg.vocab_size, shape("decoder_seq"), generator=generator)
        return (ids,)

    sets = [validate.InputSet("export shape", make({}))]
    if exported.dims:
        sets.append(validate.InputSet("unseen", make({n: unseen_size(d) for n, d in exported.dims.items()})))
        sets.append(validate.InputSet("unseen, size 1", make({n: 1 for n in exported.dims})))
    else:
        sets.append(validate.InputSet("export shape, new values", make({})))
    return sets


def trt_profiles(exported: Exported, args: tuple, value_ranges: dict, empty_ok=()) -> list[tensorrt.InputProfile]:
    """One optimization profile: each dynamic dimension from 1 (0 for those in ``empty_ok``: an
    empty past) to its proved maximum (at most 64x the example), optimized for the example; a
    dimension that is a sum of others (``past + seq``) spans the sums. ``value_ranges``: the
    inclusive value bounds of integer inputs, by name."""
    def bounds(name: str) -> tuple[int, int, int]:
        d = exported.dims[name]
        return (0 if name in empty_ok else 1), d.example, min(d.high or 64 * d.example, 64 * d.example)

    profiles = []
    for name, a in zip(exported.input_names, validate.graph_inputs(args)):
        axes = exported.dynamic.get(name, {})
        shape = [list(bounds(part) for part in axes[i].split(" + ")) if i in axes else None
                 for i in range(a.dim())]
        low, opt, high = (tuple(sum(b[k] for b in parts) if parts else s for parts, s in zip(shape, a.shape))
                          for k in range(3))
        profiles.append(tensorrt.InputProfile(name, low, opt, high, value_ranges.get(name)))
    return profiles


def graph_plans(module: torch.nn.Module, kv_cache: bool, dynamic_batch: bool, dynamic_seq: bool,
                generator: torch.Generator) -> list[GraphPlan]:
    """What :func:`compile_model` exports: the past/present graph (decoder-only) or the encoder +
    decoder + decoder-with-past graphs (seq2seq), or without ``kv_cache`` the full-sequence graph."""
    cfg, dtype = module.config, module.embed.weight.dtype
    if kv_cache and cfg.family == "seq2seq":
        return [_seq2seq_plan(module, graph, generator) for graph in seq2seq_past.GRAPHS]
    if kv_cache:
        args = past.example_inputs(cfg, past.EXAMPLE_BATCH, past.EXAMPLE_SEQ, past.EXAMPLE_PAST, dtype, generator)
        export = dict(dynamic=past.dynamic_axes(cfg.n_layers), input_names=past.input_names(cfg.n_layers),
                      output_names=past.output_names(cfg.n_layers))
        return [GraphPlan(MODEL_FILE, past.CausalLMWithPast(module), args, export,
                          lambda _: past.input_sets(cfg, dtype, generator), frozenset({past.PAST}))]
    args = _example_inputs(module, EXAMPLE_BATCH, min(EXAMPLE_SEQ, cfg.max_position), generator)
    export = dict(dynamic=_dynamic(module, dynamic_batch, dynamic_seq),
                  input_names=["input_ids", "decoder_input_ids"][:len(args)], output_names=["logits"])
    return [GraphPlan(MODEL_FILE, LogitsOf(module), args, export, lambda e: input_sets(module, e, generator))]


def _seq2seq_plan(module: torch.nn.Module, graph: str, generator: torch.Generator) -> GraphPlan:
    cfg, dtype = module.config, module.embed.weight.dtype
    input_names, output_names = seq2seq_past.names(cfg.n_layers, graph)
    export = dict(dynamic=seq2seq_past.dynamic_axes(cfg.n_layers, graph), input_names=input_names,
                  output_names=output_names)
    return GraphPlan(graph, seq2seq_past.module_for(module, graph),
                     seq2seq_past.graph_inputs(cfg, graph, dtype, generator), export,
                     lambda _: seq2seq_past.input_sets(cfg, graph, dtype, generator))


def compile_model(model: Union[str, torch.nn.Module], output: Union[str, Path], *, target: str = "onnx",
                  opset: Optional[int] = None, fp4: Optional[str] = None, dynamic_batch: bool = False,
                  dynamic_seq: bool = False, validate_graph: bool = True, require_trt: bool = False,
                  kv_cache: Optional[bool] = None, dtype: Optional[str] = None, log=print) -> CompileResult:
    """Everything ``apt-compile`` does; the CLI only parses arguments and prints the result.
    ``model`` is a spec for :func:`load_model` or an APT model (``.config``, output ``.logits``).

    ``kv_cache`` (default True): export the past/present graph of :mod:`apt_hal.compile.past`
    (decoder-only) or the encoder + decoder + decoder-with-past graphs of
    :mod:`apt_hal.compile.seq2seq_past` (seq2seq), dynamic in batch, sequence and past length
    whatever ``dynamic_batch``/``dynamic_seq`` say, and write beside them what runners need to
    generate from the folder (:func:`write_runner_files`). False: the full-sequence ``logits`` graph.
    ``dtype`` ("float32", "float16", "bfloat16"): cast the weights, and so the computation, first
    (a module passed in is cast in place)."""
    output = Path(output)
    if require_trt and target != "tensorrt":
        return CompileResult(EXIT_USAGE, "--require-trt needs --target tensorrt")
    try:
        fp4 = lowering.resolve_target(target, opset, fp4).fp4
        check_writable_folder(output, "--output")
        cast = _dtype(dtype)
        log("load: " + (model if isinstance(model, str) else type(model).__name__))
        module, what = load_model(model) if isinstance(model, str) else (model.eval(), type(model).__name__)
    except (ValueError, OSError) as e:
        return CompileResult(EXIT_USAGE, f"cannot start: {e}")
    log(f"  {what}")
    if cast is not None:
        module = module.to(cast)
        log(f"  weights and computation cast to {dtype}")
    with_past = kv_cache is not False
    plans = graph_plans(module, with_past, dynamic_batch, dynamic_seq, torch.Generator().manual_seed(SEED))
    result = CompileResult(EXIT_OK, "")
    for plan in plans:
        if not _compile_graph(result, plan, output, target, opset, fp4, validate_graph, len(plans) > 1, log):
            return result
    if with_past:
        result.files += write_runner_files(output, module, model if isinstance(model, str) else None)
    _write_report(result, output)
    _set_verdict(result, require_trt)
    return result


def decoded_twin(path: Path) -> Path:
    """Where the MXFP4-decoded twin of the graph at ``path`` goes: what ONNX Runtime runs when the
    graph holds FP4 DequantizeLinear."""
    return path.with_name(path.stem + ".decode.onnx")


def _compile_graph(result: CompileResult, plan: GraphPlan, output: Path, target: str, opset: Optional[int], fp4: str,
                   validate_graph: bool, several: bool, log) -> bool:
    """Export, validate and (tensorrt) prepare one graph into ``result``; False when the export failed."""
    cfg = plan.module.model.config
    log(f"export: {plan.file}, target {target}")
    try:
        exported = export_onnx(plan.module, plan.args, output / plan.file, target=target, opset=opset, fp4=fp4,
                               log=log, **plan.export)
        graph = GraphResult(exported)
        result.graphs.append(graph)
        result.files.append(exported.path)
        if external_data_path(exported.path).exists():
            result.files.append(external_data_path(exported.path))
        for name, d in exported.dims.items():
            narrowed = "seq" in name and d.high is not None and d.high < cfg.max_position
            log(f"  dynamic {name}: {d}" + (f"; torch.export proved only up to {d.high}: the model branches on the "
                                             "length" if narrowed else ""))
        reference = exported.path  # the graph ONNX Runtime runs: this one, or its MXFP4-decoded twin
        if any(n.op_type == "DequantizeLinear" for n in exported.model.graph.node):
            twin = decoded_twin(exported.path)
            log(f"export: {twin.name}, MXFP4 decoded in the graph (ONNX Runtime has no FP4 DequantizeLinear)")
            reference = export_onnx(plan.module, plan.args, twin, target=target, opset=opset, fp4="decode",
                                    log=lambda *a: None, **plan.export).path
            result.files.append(reference)
            if external_data_path(reference).exists():
                result.files.append(external_data_path(reference))
    except (ExportError, ValueError) as e:
        result.exit_code = EXIT_EXPORT_FAILED
        result.verdict = f"export failed{f' ({plan.file})' if several else ''}: {e}"
        return False

    sets = plan.input_sets(exported)
    if validate_graph:
        runs = [("onnxruntime", exported.path)] if reference == exported.path else \
            [("onnx.reference", exported.path), ("onnxruntime", reference)]
        for runtime, path in runs:
            log(f"validate: {path.name} on {runtime}, {len(sets)} input sets")
            v = validate.validate(path, plan.module, sets, exported.output_names, op="model", runtime=runtime)
            v.runtime = f"{runtime}, {path.name}"
            result.validations.append(v)
    else:
        log("validate: skipped (--no-validate)")
    if target == "tensorrt":
        with torch.no_grad():
            output_scale = float(_pytree.tree_leaves(plan.module(*plan.args))[0].float().abs().max())
        ids = (0, cfg.vocab_size - 1)
        value_ranges = {"input_ids": ids, "decoder_input_ids": ids, "attention_mask": (1, 1),
                        "encoder_attention_mask": (1, 1), "position_ids": (0, cfg.max_position - 1)}
        _tensorrt_stage(result, graph, reference, plan, sets, value_ranges, output_scale, several, log)
    return True


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is not None and name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return None if name is None else DTYPES[name]


def write_runner_files(output: Path, module: torch.nn.Module, spec: Optional[str]) -> list[Path]:
    """What generating from the folder needs beside the graph: the ModelConfig
    (``apt_model.json``, for ``apt-hal generate --onnx``), the tokenizer of an apt-hal checkpoint,
    Hugging Face's ``config.json`` (optimum's ORTModelForCausalLM) where the config has a Hugging
    Face form, and onnxruntime-genai's ``genai_config.json``."""
    from apt_hal.compile import ort_generate, runner_configs

    cfg = dataclasses.replace(module.config, dtype=str(module.embed.weight.dtype).replace("torch.", ""))
    cfg.to_json(output / ort_generate.MODEL_CONFIG_FILE)
    written = [output / ort_generate.MODEL_CONFIG_FILE]
    tokenizer = _checkpoint_tokenizer(spec)
    if tokenizer is not None:
        for name, content in tokenizer.to_files().items():
            (output / name).write_bytes(content)
            written.append(output / name)
    written += runner_configs.write(output, cfg, tokenizer)
    return written


def _checkpoint_tokenizer(spec: Optional[str]):
    """The tokenizer of the checkpoint ``spec`` names (apt-hal or Hugging Face), or None (a preset,
    a config file, a checkpoint without one)."""
    if spec is None or not Path(spec).is_dir():
        return None
    from apt_hal.models import checkpoint
    from apt_hal.models.tokenizer import TOKENIZER_FILE, Tokenizer

    try:
        folder = checkpoint.resolve_checkpoint(spec)
    except OSError:  # not an apt-hal checkpoint: a Hugging Face folder
        folder = Path(spec)
    return Tokenizer.load(folder) if (folder / TOKENIZER_FILE).is_file() else None


def _set_verdict(result: CompileResult, require_trt: bool) -> None:
    failed = [v for v in result.validations if not v.passed]
    if failed:
        result.exit_code = EXIT_OUT_OF_TOLERANCE
        result.verdict = "exported, but validation FAILED: " + "; ".join(
            v.error or f"{sum(not r.passed for r in v.rows)} output(s) out of tolerance on {v.runtime}" for v in failed)
    elif require_trt and any(not g.tensorrt.startswith("TensorRT build: OK") for g in result.graphs):
        missing = next(g for g in result.graphs if not g.tensorrt.startswith("TensorRT build: OK"))
        result.exit_code, result.verdict = EXIT_TRT_REQUIRED, f"--require-trt: {missing.tensorrt}"
    else:
        checked = "validated within tolerance" if result.validations else "not validated (--no-validate)"
        result.verdict = f"exported and {checked}"


def _tensorrt_stage(result: CompileResult, graph: GraphResult, reference: Path, plan: GraphPlan, sets,
                    value_ranges: dict, output_scale: float, several: bool, log) -> None:
    """The readiness report, the build script and (TensorRT and a GPU present) the engine of one
    graph; with several graphs each gets its own report and script, named after it."""
    exported = graph.exported
    output = exported.path.parent
    tag = f".{exported.path.stem}" if several else ""
    readiness = tensorrt.readiness(exported.model)
    report_file, script = output / f"trt_readiness{tag}.md", output / f"build_trt{tag}.sh"
    graph.readiness, graph.readiness_file = readiness, report_file.name
    atomic_write_text(report_file, readiness.markdown())
    log(f"tensorrt: {exported.path.name} readiness against TensorRT {readiness.tensorrt_version}'s operator list: "
        f"{readiness.verdict}")
    profiles = trt_profiles(exported, plan.args, value_ranges, plan.empty_ok)
    # polygraphy checks |got - ref| <= atol elementwise: the model's relaxed rel_inf band times the
    # largest first output (the logits) of the export example is that band in absolute terms.
    _, relaxed = validate.tolerance("model", exported.output_names[0], torch.float32).bands()
    atomic_write_text(script, tensorrt.build_script(exported.path.name, profiles, rtol=0.0, atol=relaxed * output_scale,
                                                    reference_file=None if reference == exported.path
                                                    else reference.name))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    result.files += [report_file, script]

    available, why = tensorrt.availability()
    if not available:
        graph.tensorrt = f"TensorRT build: SKIPPED ({why}; run {script.name} on a machine with TensorRT)"
        log("tensorrt: " + graph.tensorrt)
        return
    engine_graph = exported.path if reference == exported.path or tensorrt.supports_fp4() else reference
    log(f"tensorrt: {why}; building {engine_graph.name}")
    try:
        v = tensorrt.build_and_compare(engine_graph, reference, profiles, sets, exported.output_names,
                                       lambda name, dtype: validate.tolerance("model", name, dtype), log)
    except Exception as e:  # a parser or builder error: reported, never an engine claimed
        graph.tensorrt = f"TensorRT build: FAILED ({e})"
        log("tensorrt: " + graph.tensorrt)
        return
    result.validations.append(v)
    engine = engine_graph.with_suffix(".engine")
    result.files.append(engine)
    graph.tensorrt = f"TensorRT build: OK ({engine.name}, {'matches' if v.passed else 'DIFFERS FROM'} ONNX Runtime)"
    log("tensorrt: " + graph.tensorrt)


def _write_report(result: CompileResult, output: Path) -> None:
    """``compile_report.json``: what was written and every check's numbers, for CI and diffing.
    Each graph's inputs, outputs, dynamic dimensions, lowered ops and TensorRT results sit at the
    top level for one graph, under ``graphs`` (by file name) for several (seq2seq)."""
    e = result.exported
    report = {"target": e.target.profile.name, "opset": e.target.opset, "ir_version": e.model.ir_version,
              "fp4": e.target.fp4}
    graphs = {g.exported.path.name: _graph_report(g) for g in result.graphs}
    report.update(graphs.popitem()[1] if len(graphs) == 1 else {"graphs": graphs})
    report["validations"] = [{"runtime": v.runtime, "passed": v.passed, "error": v.error,
                              "rows": [dataclasses.asdict(r) for r in v.rows]} for v in result.validations]
    path = output / "compile_report.json"
    result.files.append(path)
    report["files"] = {str(f.name): f.stat().st_size if f.exists() else None for f in result.files if f != path}
    atomic_write_text(path, json.dumps(report, indent=1, default=str) + "\n")


def _graph_report(graph: GraphResult) -> dict:
    e = graph.exported
    return {
        "inputs": e.input_names, "outputs": e.output_names,
        "dynamic": {n: dataclasses.asdict(d) for n, d in e.dims.items()},
        "apt_hal_ops": {n: {"nodes": c, "lowering": lowering.LOWERINGS[e.target.profile.name][n].how}
                        for n, c in sorted(e.apt_hal_ops.items())},
        "tensorrt": graph.tensorrt or None,
        "readiness": graph.readiness.to_dict() if graph.readiness else None,
    }
