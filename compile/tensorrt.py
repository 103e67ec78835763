"""TensorRT: a readiness report, a build script, and (where TensorRT and a GPU exist) a real build.

TensorRT cannot be installed on the machines this project is developed on (its wheels fetch their
libraries from NVIDIA's index at install time), so three things are produced for every
``--target tensorrt`` export:

* :func:`readiness`: every node of the graph checked against the operator list of the targeted
  TensorRT version (``tensorrt_10.15_operators.json``, transcribed from onnx-tensorrt's
  ``docs/operators.md``; its ``source`` field names the revision). A node's data types are the
  element types on its inputs and outputs whose ONNX type parameter admits floating-point values
  (indices, shapes, axes and masks are structural and not listed in that table), except for
  Q/DQ nodes, where the table lists the quantized input's type.
* :func:`build_script`: ``trtexec`` and ``polygraphy`` commands that build a strongly typed engine
  with optimization profiles from the dynamic dimensions and compare it with ONNX Runtime.
* :func:`build_and_compare` (only with the ``tensorrt`` package and a CUDA GPU): the same with
  TensorRT's Python API: every parser error printed with its node, an engine serialized, run, and
  compared with ONNX Runtime output by output. Nothing here claims an engine it did not build.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
from pathlib import Path
from typing import Callable, Optional, Sequence

import onnx
import torch

SUPPORT_FILE = Path(__file__).with_name("tensorrt_10.15_operators.json")
FP4_MIN_COMPUTE_CAPABILITY = (10, 0)  # Blackwell: TensorRT's FP4 kernels

_LABELS = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.INT4: "INT4", onnx.TensorProto.FLOAT4E2M1: "FP4", onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.FLOAT8E5M2: "FP8", onnx.TensorProto.FLOAT8E8M0: "FP8",
}
_FLOAT_TYPES = {"tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"}
_QDQ = ("DequantizeLinear", "QuantizeLinear")


def load_support(path: Path = SUPPORT_FILE) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# Readiness
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpCheck:
    op_type: str
    count: int
    status: str  # "ok", "check" (supported; restrictions to verify), "unsupported"
    types: list[str]  # data types the graph uses on this op
    supported_types: list[str]
    notes: list[str]


@dataclasses.dataclass
class Readiness:
    tensorrt_version: str
    source: str
    opset: int
    opset_range: tuple[int, int]
    ops: list[OpCheck]

    @property
    def ready(self) -> bool:
        lo, hi = self.opset_range
        return lo <= self.opset <= hi and all(o.status != "unsupported" for o in self.ops)

    @property
    def verdict(self) -> str:
        if not self.ready:
            return "NOT READY"
        checks = sum(o.status == "check" for o in self.ops)
        return f"READY ({checks} operator(s) with restrictions to verify)" if checks else "READY"

    def markdown(self) -> str:
        lo, hi = self.opset_range
        lines = [f"# TensorRT {self.tensorrt_version} readiness: {self.verdict}", "",
                 f"Operator list: {self.source}", "",
                 f"* opset {self.opset}: {'within' if lo <= self.opset <= hi else 'OUTSIDE'} TensorRT "
                 f"{self.tensorrt_version}'s range {lo}-{hi}",
                 f"* {sum(o.count for o in self.ops)} nodes, {len(self.ops)} operator types; data types: the "
                 "element types a node carries through its floating-point type parameters (for Q/DQ nodes, the "
                 "quantized input's), checked against the list's 'Supported Types'", "",
                 "| operator | nodes | status | types used | TensorRT types | notes |", "|---|---|---|---|---|---|"]
        for o in self.ops:
            notes = "<br>".join(n.replace("|", "/") for n in o.notes)
            lines.append(f"| {o.op_type} | {o.count} | {o.status} | {', '.join(o.types) or '-'} | "
                         f"{', '.join(o.supported_types) or '-'} | {notes} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version, "source": self.source, "opset": self.opset,
                "verdict": self.verdict, "ready": self.ready, "ops": [dataclasses.asdict(o) for o in self.ops]}


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph inside it (the branches of If, the bodies of Loop and Scan), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(sub)


def _nodes(model: onnx.ModelProto):
    return [node for g in _graphs(model.graph) for node in g.node]


def _element_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element type and rank of every value whose type is known or inferred, by name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types, ranks = {}, {}
    for g in _graphs(inferred.graph):
        for v in [*g.input, *g.output, *g.value_info]:
            types[v.name] = v.type.tensor_type.elem_type
            if v.type.tensor_type.HasField("shape"):
                ranks[v.name] = len(v.type.tensor_type.shape.dim)
        types.update({i.name: i.data_type for i in g.initializer})
        ranks.update({i.name: len(i.dims) for i in g.initializer})
    return types, ranks


def _constants(model: onnx.ModelProto) -> dict:
    """Values known when TensorRT builds: initializers stored in the graph (an external one's bytes
    are in the side file; the checks need only small constants, which stay inline) and Constant
    nodes' outputs (None where the value is not a tensor attribute), by name."""
    values = {i.name: onnx.numpy_helper.to_array(i) for g in _graphs(model.graph) for i in g.initializer
              if i.data_type not in (onnx.TensorProto.FLOAT4E2M1, onnx.TensorProto.FLOAT8E8M0)
              and i.data_location != onnx.TensorProto.EXTERNAL}
    for node in _nodes(model):
        if node.op_type == "Constant":
            value = _attr(node, "value")
            values[node.output[0]] = None if value is None else onnx.numpy_helper.to_array(value)
    return values


def _attr(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _input_is_constant(i: int) -> Callable:
    return lambda node, constants, types: len(node.input) <= i or not node.input[i] or node.input[i] in constants


def _topk_ok(node, constants, types) -> bool:
    k = constants.get(node.input[1])
    return _attr(node, "sorted", 1) == 1 and k is not None and int(k.reshape(-1)[0]) < 3840


# Restrictions of the operator list that the graph alone can confirm; the others stay "check".
_RESTRICTIONS = {
    **{op: _input_is_constant(1) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                           "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
                                           "Squeeze", "Unsqueeze", "CumSum")},
    "TopK": _topk_ok,
    "RotaryEmbedding": lambda node, constants, types: types.get(node.input[3]) == onnx.TensorProto.INT64,
    "DequantizeLinear": lambda node, constants, types: len(node.input) < 3 or not node.input[2],
    "ScatterND": lambda node, constants, types: _attr(node, "reduction", b"none") in (b"none", "none"),
}


# What TensorRT documents for block-quantized Q/DQ: FP4 is NVFP4 (FP8 E4M3 block scales, blocks of 16:
# the DynamicQuantize operator and "Quantization Schemes" pages of the TensorRT documentation; in ONNX
# the FP8 scales are themselves dequantized, so the FP4 node's scales are float); INT4 weights take
# blocks of 64 or 128; E8M0 scales appear only in MXFP8 (blocks of 32). No MXFP4 (E2M1 with E8M0
# block-32 scales) is documented. The blocked axis is one of the last two.
_FLOAT_SCALES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_BLOCKS = {onnx.TensorProto.FLOAT4E2M1: ({16}, _FLOAT_SCALES), onnx.TensorProto.INT4: ({64, 128}, _FLOAT_SCALES),
           onnx.TensorProto.FLOAT8E4M3FN: ({32}, {onnx.TensorProto.FLOAT8E8M0})}


def _qdq_problems(node, types: dict, ranks: dict) -> list[str]:
    """What in one Q/DQ node's attributes and input types TensorRT's documentation rules out."""
    quantized = node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]
    elem, scale = types.get(quantized), types.get(node.input[1])
    block = _attr(node, "block_size", 0)
    if not block:
        return []
    if elem == onnx.TensorProto.FLOAT4E2M1 and scale == onnx.TensorProto.FLOAT8E8M0:
        return [f"node {node.name or '?'}: MXFP4 (FP4 with E8M0 scales, block {block}) is not a TensorRT FP4 layout: "
                "TensorRT documents FP4 as NVFP4 (FP8 E4M3 scales, block 16); export with --fp4 decode"]
    sizes, scale_types = _BLOCKS.get(elem, (set(), set()))
    problems = []
    if block not in sizes:
        problems.append(f"node {node.name or '?'}: block_size {block} for {_LABELS.get(elem, elem)}; TensorRT takes "
                        + (" or ".join(map(str, sorted(sizes))) if sizes else "no blocked quantization of this type"))
    if scale is not None and scale_types and scale not in scale_types:
        problems.append(f"node {node.name or '?'}: {_LABELS.get(scale, scale)} scales for {_LABELS.get(elem, elem)} "
                        f"blocks; TensorRT takes {', '.join(sorted(_LABELS[t] for t in scale_types))}")
    rank, axis = ranks.get(node.input[0]), _attr(node, "axis", 1)
    if axis not in (-1, -2) and rank and axis not in (rank - 1, rank - 2):
        problems.append(f"node {node.name or '?'}: blocked axis {axis}; TensorRT takes one of the last two")
    return problems


def _data_names(node, schema) -> list[str]:
    """The node's inputs and outputs whose ONNX type parameter admits floating-point values: the
    ones TensorRT's 'Supported Types' describe (indices, shapes, axes and masks are structural).
    For Q/DQ nodes, the quantized input."""
    if node.op_type in _QDQ:
        return [node.input[0]]
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def data(names, formal) -> list[str]:  # a variadic last parameter covers every further position
        return [n for i, n in enumerate(names) if n and formal and
                allowed.get(formal[min(i, len(formal) - 1)].type_str, set()) & _FLOAT_TYPES]

    return data(node.input, schema.inputs) + data(node.output, schema.outputs)


def readiness(model: onnx.ModelProto, support: Optional[dict] = None) -> Readiness:
    """Check every node of ``model`` against the TensorRT operator list ``support``."""
    support = support or load_support()
    table = support["operators"]
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    types, ranks = _element_types(model)
    initializers = {i.name for g in _graphs(model.graph) for i in g.initializer}
    constants = _constants(model)
    by_op: dict[str, list] = {}
    for node in _nodes(model):
        by_op.setdefault(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}",
                         []).append(node)

    checks = []
    for op_type, nodes in sorted(by_op.items()):
        entry = table.get(op_type)
        if entry is None or not entry["supported"]:
            why = "not in TensorRT's operator list" if entry is None else "listed as unsupported"
            checks.append(OpCheck(op_type, len(nodes), "unsupported", [], [],
                                  [f"{why}: needs a decomposition or a plugin"]))
            continue
        used, notes = set(), []
        schema = onnx.defs.get_schema(op_type, opset)
        for node in nodes:
            used |= {_LABELS.get(types[n], f"type {types[n]}") for n in _data_names(node, schema) if n in types}
            if any(n in initializers and types.get(n) == onnx.TensorProto.UINT8 for n in node.input):
                notes.append(f"node {node.name or '?'} reads a UINT8 constant; TensorRT lists UINT8 for network "
                             "inputs and outputs only")
        bad = sorted(used - set(entry["types"]))
        if op_type in _QDQ:
            bad += sorted({p for node in nodes for p in _qdq_problems(node, types, ranks)})
        if op_type == "DequantizeLinear" and "FP4" in used:
            notes.append("FP4 DequantizeLinear: TensorRT >= 10.8 on a Blackwell GPU (compute capability >= 10.0); "
                         "on older GPUs build the decode graph")
        if entry["restrictions"]:
            verify = _RESTRICTIONS.get(op_type)
            verified = verify is not None and all(verify(n, constants, types) for n in nodes)
            notes.append(("restriction verified: " if verified else "restriction: ") + entry["restrictions"])
        unverified = [n for n in notes if not n.startswith("restriction verified")]
        status = "unsupported" if bad else ("check" if unverified else "ok")
        if bad:
            kinds = [b for b in bad if b in _LABELS.values() or b.startswith("type ")]
            notes[:0] = ([f"data type(s) {', '.join(kinds)} not supported"] if kinds else []) + \
                [b for b in bad if b not in kinds]
        checks.append(OpCheck(op_type, len(nodes), status, sorted(used), entry["types"], list(dict.fromkeys(notes))))
    return Readiness(support["tensorrt_version"], support["source"], opset,
                     (support["opset_min"], support["opset_max"]), checks)


# ---------------------------------------------------------------------------------------------
# Optimization profiles and the build script
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InputProfile:
    """Shapes of one graph input for a TensorRT optimization profile (static inputs: all equal)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    value_range: Optional[tuple[int, int]] = None  # integer inputs (token ids): inclusive bounds


def build_script(model_file: str, profiles: Sequence[InputProfile], *, reference_file: Optional[str] = None,
                 rtol: float, atol: float) -> str:
    """A bash script that builds ``model_file`` with ``trtexec`` and compares it with ONNX Runtime
    with ``polygraphy`` (elementwise ``|got - ref| <= atol + rtol * |ref|``). ``reference_file`` is
    the graph ONNX Runtime runs when it cannot run ``model_file`` itself (FP4 DequantizeLinear):
    same inputs and outputs, same values."""
    def shapes(kind: str, sep: str, wrap: Callable[[str], str]) -> str:
        return " ".join(f"{p.name}:{wrap(sep.join(map(str, getattr(p, kind))))}" for p in profiles)

    trt_shapes = " ".join(f"--{k}Shapes={shapes(k, 'x', str).replace(' ', ',')}" for k in ("min", "opt", "max"))
    poly_profile = " ".join(f"--trt-{k}-shapes {shapes(k, ',', lambda s: f'[{s}]')}" for k in ("min", "opt", "max"))
    poly_inputs = f"--input-shapes {shapes('opt', ',', lambda s: f'[{s}]')}"
    ranges = " ".join(f"{p.name}:[{p.value_range[0]},{p.value_range[1]}]" for p in profiles if p.value_range)
    val_range = f" --val-range {ranges}" if ranges else ""
    tol = f"--rtol {rtol:.3g} --atol {atol:.3g}"
    m = shlex.quote(model_file)
    lines = [
        "#!/usr/bin/env bash",
        f"# Build {model_file} with TensorRT and compare it with ONNX Runtime. Written by apt-compile on a",
        "# machine without TensorRT: run it where TensorRT >= 10.15 (trtexec), polygraphy, onnxruntime and an",
        "# NVIDIA GPU are installed. Edit the shapes to the range you serve.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "",
        "# 1. Parse and build a strongly typed engine; a parser error names its node.",
        f"trtexec --onnx={m} --stronglyTyped {trt_shapes} --saveEngine={shlex.quote(Path(model_file).stem)}.engine",
        "",
        "# 2. Run the engine and compare every output with ONNX Runtime on the same random inputs.",
    ]
    if reference_file is None:
        lines.append(f"polygraphy run {m} --trt --strongly-typed {poly_profile} --onnxrt {poly_inputs}{val_range} "
                     f"{tol}")
    else:
        r = shlex.quote(reference_file)
        lines += [f"#    ONNX Runtime cannot run FP4 DequantizeLinear: it runs {reference_file} (the same",
                  "#    function, FP4 decoded exactly in the graph); TensorRT is checked against its saved outputs.",
                  f"polygraphy run {r} --onnxrt {poly_inputs}{val_range} --save-inputs inputs.json "
                  "--save-outputs reference.json",
                  f"polygraphy run {m} --trt --strongly-typed {poly_profile} --load-inputs inputs.json "
                  f"--load-outputs reference.json {tol}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Building for real
# ---------------------------------------------------------------------------------------------


def availability() -> tuple[bool, str]:
    """Whether an engine can be built here, and why not."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt package is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available"
    try:
        import tensorrt as trt
    except Exception as e:  # installed but broken (missing CUDA libraries): a reason, not a crash
        return False, f"the tensorrt package failed to import: {type(e).__name__}: {e}"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def supports_fp4() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= FP4_MIN_COMPUTE_CAPABILITY


class TensorRTError(RuntimeError):
    """TensorRT could not parse the graph or build an engine."""


def build_engine(model_path: Path, engine_path: Path, profiles: Sequence[InputProfile], log=print) -> None:
    """Parse ``model_path`` into a strongly typed network, build with one optimization profile,
    serialize to ``engine_path``. Raises :class:`TensorRTError` listing every parser error."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"  node {e.node()} ({e.node_name() or '?'}, {e.node_operator() or '?'}): {e.desc()}")
        raise TensorRTError(f"TensorRT's ONNX parser rejected {model_path.name}:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    log(f"  building the engine ({network.num_layers} layers)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT could not build an engine from {model_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))


def run_engine(engine_path: Path, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run a serialized engine on CUDA copies of ``inputs`` (in the engine's input order)."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    in_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    out_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    keep = []
    for name, t in zip(in_names, inputs):
        t = t.contiguous().cuda()
        keep.append(t)
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
              trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool,
              trt.uint8: torch.uint8}
    outs = []
    for name in out_names:
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtypes[engine.get_tensor_dtype(name)],
                          device="cuda")
        context.set_tensor_address(name, out.data_ptr())
        outs.append(out)
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise TensorRTError(f"TensorRT failed to run {engine_path.name}")
    stream.synchronize()
    return [o.cpu() for o in outs]


def build_and_compare(model_path: Path, reference_path: Path, profiles: Sequence[InputProfile], input_sets,
                      output_names: Sequence[str], tolerance: Callable, log=print):
    """Build ``model_path`` into ``<name>.engine`` next to it, run it on every input set and compare
    each output with ONNX Runtime running ``reference_path`` (the same graph, or its FP4-decoded
    twin). Returns a :class:`~apt_hal.compile.validate.Validation`."""
    from apt_hal.compile import validate

    engine_path = model_path.with_suffix(".engine")
    build_engine(model_path, engine_path, profiles, log)
    log(f"  engine written: {engine_path} ({engine_path.stat().st_size} bytes)")
    rows, reference = [], validate.graph_runner(reference_path, "onnxruntime")
    for s in input_sets:
        tensors = validate.graph_inputs(s.args)
        got, ref = run_engine(engine_path, tensors), reference(tensors)
        shapes = ", ".join("x".join(map(str, t.shape)) for t in tensors)
        rows += [validate.check(f"{s.label} [{shapes}]", name, g, r, tolerance(name, r.dtype))
                 for name, g, r in zip(output_names, got, ref)]
    return validate.Validation("TensorRT vs onnxruntime", rows)
