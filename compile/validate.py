"""Run an exported graph and compare it with eager PyTorch, output by output.

Runtimes: ONNX Runtime's CPU provider (``onnxruntime``; its optimizer may fuse int4
DequantizeLinear + MatMul into MatMulNBits with int8 activations, so
``session.qdq_matmulnbits_accuracy_level=0`` is always set), or ``onnx.reference`` (the ONNX
reference evaluator in numpy) for graphs ONNX Runtime cannot execute: FP4 DequantizeLinear with
E8M0 scales has no ONNX Runtime kernel.

Tolerances and the comparison are the conformance suite's (:mod:`apt_hal.conformance.tolerances`,
one table keyed by (op, output, dtype, backend), the backend here being the runtime): ``exact``
compares bytes; ``rel_inf`` is ``max |got - ref| / max |ref|`` over the finite elements against a
strict band (PASS) and a relaxed one (QUALITY_WARNING; beyond it FAIL), and NaN or Inf must be
where the reference has them. Whole models are keyed as op ``"model"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils import _pytree

from apt_hal.conformance import tolerances as conformance
from apt_hal.conformance.status import FAIL

RUNTIMES = ("onnxruntime", "onnx.reference")
Tolerance = conformance.Tolerance

def tolerance(op: str, output: str, dtype: torch.dtype, runtime: str = "onnxruntime") -> Tolerance:
    """The conformance table's tolerance for ``output`` of ``op`` ("model" for a whole model) in
    ``dtype`` on ``runtime``."""
    return conformance.lookup(op, output, str(dtype).replace("torch.", ""), runtime)


# ---------------------------------------------------------------------------------------------
# Running a graph
# ---------------------------------------------------------------------------------------------


def graph_runner(path, runtime: str = "onnxruntime") -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """A function running the ONNX graph at ``path`` on CPU tensors (in the graph's input order);
    the session is made once."""
    if runtime == "onnxruntime":
        return _onnxruntime_runner(str(path))
    if runtime == "onnx.reference":
        return _reference_runner(str(path))
    raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


def run_graph(path, inputs: Sequence[torch.Tensor], runtime: str = "onnxruntime") -> list[torch.Tensor]:
    """Run the ONNX graph at ``path`` once (see :func:`graph_runner`)."""
    return graph_runner(path, runtime)(inputs)


def _onnxruntime_runner(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # DLPack carries bfloat16, which numpy cannot; numpy carries bool, which ORT's DLPack cannot.
        feeds = {n: ort.OrtValue.ortvalue_from_numpy(t.numpy()) if t.dtype == torch.bool
                 else ort.OrtValue.from_dlpack(t.contiguous()) for n, t in zip(names, inputs)}
        outs = session.run_with_ort_values(None, feeds)
        return [torch.from_numpy(o.numpy()) if o.data_type() == "tensor(bool)" else torch.from_dlpack(o).clone()
                for o in outs]

    return run


def _reference_runner(path: str):
    import ml_dtypes
    import onnx
    from onnx.reference import ReferenceEvaluator

    def to_numpy(t: torch.Tensor) -> np.ndarray:
        if t.dtype == torch.bfloat16:
            return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def to_torch(a) -> torch.Tensor:
        a = np.asarray(a)
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    model = onnx.load(path)
    evaluator = ReferenceEvaluator(model)
    names = [i.name for i in model.graph.input]
    return lambda inputs: [to_torch(o) for o in evaluator.run(None, dict(zip(names, map(to_numpy, inputs))))]


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    inputs: str  # which input set ("export shape", "unseen", ...) and its shapes
    output: str
    dtype: str
    shape: tuple
    status: str  # PASS, QUALITY_WARNING or FAIL
    max_abs: float
    rel: Optional[float]  # rel_inf; None for exact comparisons
    tolerance: str  # the band, as shown
    reason: str  # why that band
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status != FAIL


def check(label: str, name: str, got: torch.Tensor, ref: torch.Tensor, tol: Tolerance, reduction: int = 1) -> Row:
    """Compare one output by the conformance rule (``reduction``: the K of a per-sqrt(K) band)."""
    status, metrics, note = conformance.compare(got, ref, tol, reduction)
    max_abs = math.nan
    if got.shape == ref.shape:
        diff = (got.double() - ref.double()).abs()
        diff = diff[torch.isfinite(diff)]  # NaN and Inf placement is the rule's own check
        max_abs = float(diff.max()) if diff.numel() else 0.0
    if tol.metric == "exact":
        band, rel = "exact (bytes)", None
    else:
        strict, relaxed = tol.bands(reduction)
        band, rel = f"rel <= {strict:.2g} (warn <= {relaxed:.2g})", float(metrics["value"])
    return Row(label, name, str(ref.dtype).replace("torch.", ""), tuple(ref.shape), status, max_abs, rel, band,
               tol.reason, note)


@dataclasses.dataclass
class InputSet:
    label: str  # "seen" (the export example), "unseen", ...
    args: tuple


@dataclasses.dataclass
class Validation:
    runtime: str
    rows: list[Row]
    error: Optional[str] = None  # the runtime could not run the graph

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.rows) and all(r.passed for r in self.rows)

    def table(self) -> str:
        return format_table(self.rows, self.runtime, self.error)


def validate(path, eager: Callable, input_sets: Sequence[InputSet], output_names: Sequence[str], *,
             op: str = "model", runtime: str = "onnxruntime", reduction: int = 1) -> Validation:
    """Run the graph at ``path`` and ``eager`` on every input set and compare each output under
    :func:`tolerance` (``reduction``: the longest reduction, for bands that grow with sqrt(K))."""
    rows: list[Row] = []
    try:
        run = graph_runner(path, runtime)
    except Exception as e:  # a graph the runtime rejects is a failed validation, reported as such
        return Validation(runtime, rows, f"{runtime} could not load the graph: {_first_line(e)}")
    for s in input_sets:
        inputs = graph_inputs(s.args)
        with torch.no_grad():
            expected = [t.detach() for t in _pytree.tree_leaves(eager(*s.args)) if isinstance(t, torch.Tensor)]
        try:
            got = run(inputs)
        except Exception as e:
            return Validation(runtime, rows, f"{runtime} could not run the graph on the {s.label} inputs: "
                                             f"{_first_line(e)}")
        if len(got) != len(expected):
            return Validation(runtime, rows, f"the graph returned {len(got)} outputs, eager {len(expected)}")
        shown = inputs if len(inputs) <= 6 else inputs[:4] + [...]  # a KV cache's many tensors: elided
        shapes = ", ".join("..." if a is ... else "x".join(map(str, a.shape)) for a in shown)
        for name, g, e in zip(output_names, got, expected):
            rows.append(check(f"{s.label} [{shapes}]", name, g, e, tolerance(op, name, e.dtype, runtime), reduction))
    return Validation(runtime, rows)


def graph_inputs(args: tuple) -> list[torch.Tensor]:
    """The graph's inputs for ``forward(*args)``: its tensors in order, tuple arguments (a KV cache)
    flattened."""
    return [a for a in _pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def format_table(rows: Sequence[Row], runtime: str, error: Optional[str] = None) -> str:
    header = ("inputs", "output", "dtype", "shape", "max abs err", "rel err", "tolerance", "result")
    body = []
    for r in rows:
        result = r.status + (f" ({r.note})" if r.note and r.status != "PASS" else "")
        body.append((r.inputs, r.output, r.dtype, "x".join(map(str, r.shape)) or "scalar", f"{r.max_abs:.3g}",
                     "-" if r.rel is None else f"{r.rel:.3g}", r.tolerance, result))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [f"validation on {runtime}:", line(header), line("-" * w for w in widths), *map(line, body)]
    if error:
        out.append(f"ERROR: {error}")
    return "\n".join(out)
