"""torch.export -> functionalize the mutating apt_hal ops -> torch.onnx.export(dynamo=True) with the
lowering table -> explicit opset and IR version -> additive attention masks and FP4 typing
(tensorrt) -> the full ONNX checker.

``torch.export`` keeps every apt_hal op as one node. Three ops mutate their arguments
(``rotary_``, ``paged_write``, ``paged_copy_blocks``); functionalization would wrap them in
``auto_functionalized`` nodes that the ONNX exporter cannot translate, so before it runs, each is
replaced by a functional twin (``rotary`` for ``rotary_``; ``apt_hal_compile::paged_write`` and
``apt_hal_compile::paged_copy_blocks``, defined here) followed by ``copy_`` into the mutated
argument. The result computes the same; the ONNX graph then returns new values where eager
mutated (a mutated *buffer* is state that a stateless ONNX graph drops: return it from
``forward`` if the caller needs it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import operator
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import onnx
import onnx_ir
import onnxscript.optimizer
import torch
from torch.utils import _pytree
from torch.utils._sympy.numbers import int_oo

from apt_hal import ops
from apt_hal.compile import lowering

_LIB = torch.library.Library("apt_hal_compile", "DEF")


def _twin(name: str, schema: str, mutated: str, reference):
    """A functional twin of a mutating op: same arguments, returns the new ``mutated`` tensor."""
    i = list(inspect.signature(reference).parameters).index(mutated)

    def kernel(*args):
        args = list(args)
        args[i] = args[i].clone()
        reference(*args)
        return args[i]

    _LIB.define(name + schema)
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"apt_hal_compile::{name}", lambda *args: torch.empty_like(args[i]), lib=_LIB)
    return getattr(torch.ops.apt_hal_compile, name).default


_PAGED_WRITE = _twin("paged_write", "(Tensor cache, Tensor values, Tensor slot_mapping) -> Tensor", "cache",
                     ops.paged_write.reference)
_PAGED_COPY = _twin("paged_copy_blocks", "(Tensor src, Tensor src_ids, Tensor dst, Tensor dst_ids) -> Tensor", "dst",
                    ops.paged_copy_blocks.reference)

# The overload each op name is exported as (the lowering table is keyed by op name).
OP_TARGETS = {
    "fp4_matmul": ops.fp4_matmul.overload,
    "rotary": ops.rotary.overload,
    "moe_route": ops.moe_route.overload,
    "moe_permute": ops.moe_permute.overload,
    "moe_experts": ops.moe_experts.overload,
    "moe_combine": ops.moe_combine.overload,
    "paged_write": _PAGED_WRITE,
    "paged_gather": ops.paged_gather.overload,
    "paged_copy_blocks": _PAGED_COPY,
}
_OP_NAME = {overload: name for name, overload in OP_TARGETS.items()}


def functionalize(ep: torch.export.ExportedProgram) -> None:
    """Replace each mutating apt_hal op in ``ep``'s (not yet functional) graph by its functional
    twin followed by ``copy_`` into the mutated argument, in place."""
    g = ep.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is ops.rotary_.overload:
            with g.inserting_before(node):
                pair = g.call_function(ops.rotary.overload, node.args, node.kwargs)
                for i in range(2):
                    g.call_function(torch.ops.aten.copy_.default,
                                    (node.args[i], g.call_function(operator.getitem, (pair, i))))
        elif node.target in (ops.paged_write.overload, ops.paged_copy_blocks.overload):
            twin, mutated = ((_PAGED_WRITE, 0) if node.target is ops.paged_write.overload else (_PAGED_COPY, 2))
            with g.inserting_before(node):
                new = g.call_function(twin, node.args, node.kwargs)
                g.call_function(torch.ops.aten.copy_.default, (node.args[mutated], new))
        else:
            continue
        g.erase_node(node)
    ep.graph_module.recompile()


def apt_hal_ops_in(ep: torch.export.ExportedProgram) -> dict[str, int]:
    """How many nodes of each apt_hal op the exported graph holds (by the lowering table's names)."""
    counts: dict[str, int] = {}
    for node in ep.graph.nodes:
        name = _OP_NAME.get(node.target) if node.op == "call_function" else None
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


@dataclasses.dataclass(frozen=True)
class DimRange:
    """A dynamic dimension as exported: the example's size and the range torch.export proved valid
    (``high`` None: unbounded). torch.export may narrow what was asked for (a model that branches
    on a length), and it assumes sizes >= 2; validation runs size 1 as an unseen shape."""

    example: int
    low: int
    high: Optional[int]

    def __str__(self) -> str:
        return f"{self.low}..{'inf' if self.high is None else self.high} (example {self.example})"


@dataclasses.dataclass
class Exported:
    """What :func:`export_onnx` wrote."""

    path: Path
    target: lowering.Target
    model: onnx.ModelProto  # as written (initializers included)
    apt_hal_ops: dict[str, int]  # op name -> nodes lowered
    input_names: list[str]
    output_names: list[str]
    dims: dict[str, DimRange]  # dynamic dimension name -> its range
    dynamic: dict[str, dict[int, str]]  # graph input -> {axis: dynamic dimension name, or "a + b" of two}


class ExportError(RuntimeError):
    """The model could not be exported (tracing, translation, or the ONNX checker failed)."""


def export_onnx(module: torch.nn.Module, args: tuple, path: str | Path, *, target: str = "onnx",
                opset: Optional[int] = None, fp4: Optional[str] = None,
                dynamic: Optional[dict[str, dict[int, str]]] = None, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None, log=print) -> Exported:
    """Export ``module(*args)`` to ONNX at ``path`` for ``target`` (see :data:`lowering.PROFILES`).

    ``dynamic`` names the dynamic dimensions per ``forward`` argument, ``{"input_ids": {0: "batch",
    1: "seq"}}``; one name used in several places is one dimension. An argument that is a tuple of
    tensors (a KV cache) takes a list of such dicts, one per element; a dimension torch.export
    finds equal to an expression of others (``past + seq``) is named by that expression. ``fp4`` overrides the target's
    choice for MXFP4 weights ("decode" or "qdq"). Raises :class:`ExportError` naming the failing stage.
    """
    t = lowering.resolve_target(target, opset, fp4)
    path = Path(path)
    module = module.eval()
    params = list(inspect.signature(module.forward).parameters)[:len(args)]
    dynamic = dict(dynamic or {})
    if set(dynamic) - set(params):
        raise ValueError(f"dynamic names {sorted(set(dynamic) - set(params))}, which are not arguments of "
                         f"{type(module).__name__}.forward ({', '.join(params)})")
    shapes = {p: _dynamic_shape(dynamic.get(p)) for p in params} if dynamic else None
    log(f"  [1/4] torch.export of {type(module).__name__}; dynamic: "
        + (", ".join(sorted({n for _, axes in _flat_inputs(params, args, dynamic) for n in axes.values()}))
           or "nothing"))
    try:
        with torch.no_grad(), _quiet():
            # One eager call first (on copies: a forward may write its inputs): state a module builds
            # lazily on its first call (a rotary table) would otherwise be built during tracing, and
            # hold fake tensors from then on.
            module(*_pytree.tree_map_only(torch.Tensor, torch.clone, tuple(args)))
            ep = torch.export.export(module, tuple(args), dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise ExportError(f"torch.export failed: {_first_lines(e)}") from e
    functionalize(ep)
    used = apt_hal_ops_in(ep)
    dims, symbols = _dim_ranges(ep, params, args, dynamic)
    log(f"  [2/4] ONNX translation: target {t.profile.name}, opset {t.opset}, MXFP4 as {t.fp4}; apt_hal ops: "
        + (", ".join(f"{n} x{c}" for n, c in sorted(used.items())) or "none"))
    try:
        with _quiet():
            program = torch.onnx.export(ep, dynamo=True, opset_version=t.opset, optimize=False,
                                        custom_translation_table=lowering.translation_table(t, OP_TARGETS),
                                        input_names=input_names, output_names=output_names, verbose=False)
            onnxscript.optimizer.optimize_ir(program.model, should_fold=_keep_packed_weights)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {_first_lines(e)}") from e
    model = program.model_proto
    model.ir_version = t.profile.ir_version(t.opset)
    masks = lowering.additive_attention_masks(model) if t.profile.name == "tensorrt" else 0
    log(f"  [3/4] IR version {model.ir_version}"
        + (f"; {masks} Attention node(s) given an additive float mask for their BOOL one" if masks else "")
        + ("; MXFP4 weights typed FLOAT4E2M1 / FLOAT8E8M0" if t.fp4 == "qdq" else ""))
    if t.fp4 == "qdq" and lowering.retype_fp4_weights(model):
        del model.graph.value_info[:]  # shapes of the retyped weights changed; the checker infers them again
    _rename_dims(model, symbols)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(model, path)
    log(f"  [4/4] onnx.checker, full check: {path}")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"the ONNX checker rejected the graph: {_first_lines(e)}") from e
    graph_dynamic = {}
    for value in model.graph.input:
        named = {i: d.dim_param for i, d in enumerate(value.type.tensor_type.shape.dim)
                 if d.dim_param and all(part in dims for part in d.dim_param.split(" + "))}
        if named:
            graph_dynamic[value.name] = named
    return Exported(path, t, model, used, [i.name for i in model.graph.input], [o.name for o in model.graph.output],
                    dims, graph_dynamic)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's own progress lines, its log warnings (torchvision absent) and the
    deprecation warnings torch raises inside itself; errors still propagate."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        onnx_logger.setLevel(level)


def _dynamic_shape(axes):
    """torch.export's dynamic_shapes entry for one argument's ``dynamic`` entry (see export_onnx)."""
    if axes is None:
        return None
    if isinstance(axes, (list, tuple)):
        return tuple(_dynamic_shape(a) for a in axes)
    return {axis: torch.export.Dim.DYNAMIC(min=1) for axis in axes}


def _flat_inputs(params, args, dynamic) -> list[tuple]:
    """``(example, {axis: name})`` of each graph input in order: a tuple argument gives one input
    per element."""
    flat = []
    for p, a in zip(params, args):
        axes = dynamic.get(p)
        if isinstance(a, (list, tuple)):
            flat += [(t, (axes[i] if axes else None) or {}) for i, t in enumerate(a)]
        else:
            flat.append((a, axes or {}))
    return flat


def _dim_ranges(ep, params, args, dynamic) -> tuple[dict[str, DimRange], dict[str, str]]:
    """Each named dynamic dimension's range as torch.export proved it, and the symbol (``s72``)
    the exporter names it by in the ONNX graph. A dimension found equal to an expression of others
    is left out: the graph names it by that expression."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    flat = _flat_inputs(params, args, dynamic)  # non-tensor arguments are listed in user_inputs too
    dims, symbols = {}, {}
    for (example, axes), user_input in zip(flat, ep.graph_signature.user_inputs):
        for axis, name in axes.items():
            size = placeholders[user_input].meta["val"].shape[axis]
            if isinstance(size, int):  # specialized: the model fixes this size
                rng = DimRange(example.shape[axis], size, size)
            elif size.node.expr.is_Symbol:
                vr = ep.range_constraints[size.node.expr]
                rng = DimRange(example.shape[axis], int(vr.lower), None if vr.upper is int_oo else int(vr.upper))
                symbols.setdefault(str(size.node.expr), name)
            else:
                continue
            dims.setdefault(name, rng)
    return dims, symbols


def _rename_dims(model: onnx.ModelProto, symbols: dict[str, str]) -> None:
    """Give the graph's symbolic dimensions the caller's names (``s72`` -> ``batch``)."""
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b")
    g = model.graph
    for value in [*g.input, *g.output, *g.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: symbols[m.group(1)], d.dim_param)


def _keep_packed_weights(node) -> Optional[bool]:
    """The optimizer's folding rule: never fold a node reading uint8 data (MXFP4 codes and scales),
    so the weights stay packed in the file and their decode stays in the graph; else the default."""
    if any(v is not None and v.dtype == onnx_ir.DataType.UINT8 for v in node.inputs):
        return False
    return None


EXTERNAL_DATA_BYTES = 2 ** 31 - 2 ** 26  # past protobuf's 2 GiB limit (with a margin) weights go to a side file


def external_data_path(path: Path) -> Path:
    """Where the weights of the graph at ``path`` go when it is too large for one file."""
    return path.with_name(path.name + ".data")


def _save(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    external_data_path(path).unlink(missing_ok=True)  # a stale side file from an earlier, larger export
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=external_data_path(path).name)


def _first_lines(e: BaseException) -> str:
    """The first line of each exception in the chain, outermost first: the exporter's own message
    is long, its causes name the node and the root error."""
    lines = []
    while e is not None:
        lines.append(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        e = e.__cause__
    return "\n  caused by ".join(lines)
