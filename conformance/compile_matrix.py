"""Compile-only verification: every Triton kernel of a backend compiled for GPUs that are not here.

A separate axis from the numeric statuses, and a lower one: a kernel that compiles for gfx950 has
not been shown to compute the right thing there. The conformance report gives, per backend, the
highest level reached (:func:`levels`): numerics on hardware, compiled for named targets, numerics
under Triton's interpreter, or not run.

How the matrix is made, with no GPU:

1. **Capture** (a subprocess with ``TRITON_INTERPRET=1``): the backend runs the selected
   conformance cases in Triton's interpreter while every kernel launch is recorded: the kernel,
   its Triton signature, its constexprs and launch options. Launches are deduplicated by
   (kernel, signature, constexprs, options). The tiles are those the launchers choose under the
   interpreter, and the report says so.
2. **Compile** (a subprocess without ``TRITON_INTERPRET``, so ``@triton.jit`` gives real JIT
   functions): each launch with ``INTERPRETER`` set to what the backend's launchers pass on that
   target's hardware (:func:`apt_hal.backends.triton_vendor.pure_triton`), through
   ``triton.compile(ASTSource(...), target=GPUTarget(...))``.

Each cell is COMPILED (with the binary's SHA-256, the Triton version, the matrix instructions
found and whether the target's key instruction is among them, and any inline assembly), or
FAILED_TO_COMPILE (the compiler's message), or UNSUPPORTED (why; e.g. an NVIDIA target asked of
the rocm backend). Failures listed in ``known_compile_failures.json`` (entries: backend, target,
kernel, optional constexprs, reason; empty today) stay FAILED_TO_COMPILE in every report but do
not set the exit code.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Optional

COMPILED, FAILED_TO_COMPILE, UNSUPPORTED = "COMPILED", "FAILED_TO_COMPILE", "UNSUPPORTED"
MEANING = {
    COMPILED: "the kernel compiled for the target (a binary exists; it was not run)",
    FAILED_TO_COMPILE: "Triton's compiler rejected the kernel for the target (its message is kept)",
    UNSUPPORTED: "the target is not one the backend builds for, or the compiler is not installed here",
}
KNOWN_COMPILE_FAILURES = pathlib.Path(__file__).with_name("known_compile_failures.json")

# name -> (Triton backend, architecture, warp size), as GPUTarget takes them.
TARGETS = {
    "gfx90a": ("hip", "gfx90a", 64), "gfx942": ("hip", "gfx942", 64), "gfx950": ("hip", "gfx950", 64),
    "sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "sm_100": ("cuda", 100, 32),
}
# The Triton backends and the Triton target family each builds for.
TRITON_BACKENDS = {"cuda-triton": "cuda", "rocm": "hip", "xpu": "xpu"}
XPU_UNSUPPORTED = ("Intel's Triton backend is not in this triton install (its wheel, triton-xpu, replaces the "
                   "triton package): no xpu target can be compiled here")

# What a target's matrix instruction looks like in its assembly, and the one each target should use.
_MATRIX_INSN = {"hip": re.compile(r"\bv_(?:mfma|wmma)\w*"),
                "cuda": re.compile(r"\b(?:tcgen05\.mma|wgmma\.mma_async|mma\.sync)\b")}
_KEY_INSN = {"gfx90a": "v_mfma", "gfx942": "v_mfma", "gfx950": "v_mfma", "sm_80": "mma.sync",
             "sm_90": "wgmma", "sm_100": "tcgen05"}
_INLINE_ASM = re.compile(r'tt\.elementwise_inline_asm[^"]*"([^"]*)"')


TILES_NOTE = ("the hardware tile tables (hw.py for NVIDIA, backends/rocm/arch.py per AMD architecture) at the "
              "shapes of the conformance cases, captured under the interpreter with APT_HAL_HARDWARE_TILES=1 "
              "(device counts are the interpreter's H100-like defaults); INTERPRETER set as on the target's "
              "hardware (False for NVIDIA, True, the pure-Triton path, for AMD)")


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--target: unknown target(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(TARGETS)}")
    return names


# ---- capture (runs in a TRITON_INTERPRET=1 subprocess) -----------------------------------------


def _jsonable(v):
    import triton.language as tl

    if isinstance(v, tl.dtype):
        return {"tl_dtype": v.name}
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    return {"repr": repr(v)}


def _record_launches(launches: dict) -> None:
    """Wrap the interpreter's launch so that each distinct launch is recorded in ``launches``."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import mangle_type

    interpret = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(params, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        signature, constexprs = {}, {}
        for name, p in params.items():
            value = bound.get(name, p.default)
            if "constexpr" in str(p.annotation):
                signature[name] = "constexpr"
                constexprs[name] = _jsonable(getattr(value, "value", value))
            else:
                signature[name] = mangle_type(value)
                if signature[name] == "constexpr":  # None
                    constexprs[name] = None
        options = {k: v for k, v in kwargs.items() if k not in params}
        launch = dict(module=self.fn.__module__, kernel=self.fn.__qualname__, signature=signature,
                      constexprs=constexprs, options=options)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return interpret(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def _capture_main(backend: str, selection: dict, out: str) -> None:
    launches: dict = {}
    _record_launches(launches)
    from apt_hal import registry
    from apt_hal.conformance import runner

    report = runner.run([backend], quick=selection["quick"], ops=selection["ops"], patterns=selection["patterns"])
    statuses = collections.Counter(c["status"] for c in report["cases"])
    pathlib.Path(out).write_text(json.dumps({"probe": registry.probe(backend).detail,
                                             "statuses": dict(statuses), "launches": list(launches.values())}))


def capture(backend: str, arch: Optional[str] = None, *, quick: bool = True, ops=None, patterns=None) -> dict:
    """Run ``backend``'s conformance cases under Triton's interpreter in a subprocess, with the
    hardware tile tables (of AMD architecture ``arch`` for rocm), and return ``{"probe",
    "statuses", "launches"}``: the distinct kernel launches they made."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launches.json")
        selection = json.dumps({"quick": quick, "ops": list(ops or []), "patterns": list(patterns or [])})
        env = {"TRITON_INTERPRET": "1", "APT_HAL_HARDWARE_TILES": "1"}
        if arch:
            env["APT_HAL_ROCM_ARCH"] = arch
        _child(["capture", backend, selection, out], env)
        return json.loads(pathlib.Path(out).read_text())


# ---- compile (runs in a subprocess without TRITON_INTERPRET) ------------------------------------


def _constexpr_value(v):
    import triton.language as tl

    if isinstance(v, dict) and "tl_dtype" in v:
        return tl.dtype(v["tl_dtype"])
    return v


def _key_instruction(target: str, asm: dict) -> dict:
    family = TARGETS[target][0]
    text = asm.get("amdgcn" if family == "hip" else "ptx", "")
    found = sorted(set(_MATRIX_INSN[family].findall(text)))
    has_dot = "tt.dot" in asm.get("ttir", "")
    key = _KEY_INSN[target]
    if "tt.dot_scaled" in asm.get("ttir", "") and target == "gfx950":
        key = "v_mfma_scale"
    if not has_dot:
        verdict = "no matrix instruction expected (no tl.dot)"
    elif any(f.startswith(key) for f in found):
        verdict = f"{key} present"
    else:
        verdict = f"{key} absent" + (f" (uses {', '.join(found)})" if found else " (no matrix instruction)")
    return {"expected": key if has_dot else None, "found": found, "verdict": verdict}


def _compiler_message(e: Exception) -> str:
    """Where the compile failed (the kernel's source line) and why (the innermost cause)."""
    where = (str(e).strip().splitlines() or [""])[0]
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    why = getattr(root, "error_message", None) or (str(root).strip().splitlines() or [repr(root)])[-1]
    return f"{type(root).__name__} {where} {why}"[:1500]


def compile_one(launch: dict, target: str) -> dict:
    """Compile one launch for one target in this process; the cell's fields."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    names = list(launch["signature"])
    constexprs = {(names.index(k),): _constexpr_value(v) for k, v in launch["constexprs"].items()}
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, dict(launch["signature"]), constexprs),
                                target=GPUTarget(*TARGETS[target]), options=dict(launch["options"]))
    except Exception as e:  # the compiler's message is the result
        return {"status": FAILED_TO_COMPILE, "message": _compiler_message(e),
                "seconds": round(time.perf_counter() - t0, 2)}
    binary_kind = "hsaco" if "hsaco" in kernel.asm else "cubin"
    binary = kernel.asm[binary_kind]
    return {"status": COMPILED, "binary": binary_kind, "bytes": len(binary),
            "sha256": hashlib.sha256(binary).hexdigest(), "instruction": _key_instruction(target, kernel.asm),
            "inline_asm": sorted(set(_INLINE_ASM.findall(kernel.asm.get("ttir", "")))),
            "seconds": round(time.perf_counter() - t0, 2)}


def _compile_main(jobs_file: str, out: str) -> None:
    jobs = json.loads(pathlib.Path(jobs_file).read_text())
    results = [compile_one(job["launch"], job["target"]) for job in jobs]
    pathlib.Path(out).write_text(json.dumps(results))


def _child(argv: list[str], env: dict) -> None:
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "apt_hal.conformance.compile_matrix", *argv],
                          env={**base, **env}, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"compile matrix: the {argv[0]} subprocess failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")


def _compile_all(jobs: list[dict], workers: int) -> list[dict]:
    """Compile ``jobs`` ({"launch", "target"}) in ``workers`` subprocesses; results in order."""
    if not jobs:
        return []
    chunks = [jobs[i::workers] for i in range(workers)]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, chunk in enumerate(c for c in chunks if c):
            src, out = os.path.join(tmp, f"jobs{i}.json"), os.path.join(tmp, f"out{i}.json")
            pathlib.Path(src).write_text(json.dumps(chunk))
            procs.append((i, out, subprocess.Popen(
                [sys.executable, "-m", "apt_hal.conformance.compile_matrix", "compile", src, out],
                env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        results: list = [None] * len(jobs)
        for i, out, proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"compile matrix: a compile subprocess failed (exit {proc.returncode}):\n"
                                   f"{err[-4000:]}")
            for j, r in enumerate(json.loads(pathlib.Path(out).read_text())):
                results[i + j * workers] = r
        return results


# ---- the matrix ---------------------------------------------------------------------------------


def unsupported_reason(backend: str, target: str) -> Optional[str]:
    family = TRITON_BACKENDS.get(backend)
    if family is None:
        return f"{backend} is not a Triton backend: it has no kernels to compile"
    if family == "xpu":
        return XPU_UNSUPPORTED
    if TARGETS[target][0] != family:
        return f"{backend} does not build for {target} (its targets are {family} ones)"
    return None


def load_known_failures(path: pathlib.Path = KNOWN_COMPILE_FAILURES) -> list[dict]:
    return json.loads(path.read_text())


def _known(known: list[dict], cell: dict) -> Optional[str]:
    for k in known:
        if (k["backend"], k["target"], k["kernel"]) == (cell["backend"], cell["target"], cell["kernel"]) \
                and all(cell["constexprs"].get(n) == v for n, v in k.get("constexprs", {}).items()):
            return k["reason"]
    return None


def build(backends: Iterable[str], targets: list[str], *, quick: bool = True, ops=None, patterns=None,
          workers: int = 1, known: Optional[list[dict]] = None) -> dict:
    """The compile section of a conformance report: a cell per (backend, target, distinct launch)."""
    import triton

    from apt_hal.backends import triton_vendor

    started = time.perf_counter()
    known = load_known_failures() if known is None else known
    cells, jobs, notes = [], [], {}
    for backend in backends:
        wanted = [t for t in targets if unsupported_reason(backend, t) is None]
        for t in targets:
            if t not in wanted:
                cells.append({"backend": backend, "target": t, "kernel": "*", "module": "", "signature": {},
                              "constexprs": {}, "options": {}, "status": UNSUPPORTED,
                              "message": unsupported_reason(backend, t)})
        if not wanted:
            continue
        # rocm's tile tables differ per architecture: one capture each.
        per_arch = TRITON_BACKENDS[backend] == "hip"
        captures = {t: capture(backend, t, quick=quick, ops=ops, patterns=patterns)
                    for t in (wanted if per_arch else wanted[:1])}
        notes[backend] = {t: {"interpreter_probe": c["probe"], "interpreter_statuses": c["statuses"]}
                          for t, c in captures.items()}
        seen = set()
        for t in wanted:
            for launch in captures[t if per_arch else wanted[0]]["launches"]:
                if "INTERPRETER" in launch["constexprs"]:
                    launch = {**launch, "constexprs": {**launch["constexprs"],
                                                       "INTERPRETER": triton_vendor.pure_triton(TARGETS[t][0])}}
                key = json.dumps([t, launch], sort_keys=True)
                if key in seen:
                    continue
                seen.add(key)
                cells.append({"backend": backend, "target": t, "kernel": launch["kernel"], **launch})
                jobs.append({"launch": launch, "target": t, "cell": len(cells) - 1})
    for job, result in zip(jobs, _compile_all([{k: j[k] for k in ("launch", "target")} for j in jobs], workers)):
        cells[job["cell"]].update(result)
    for cell in cells:
        if cell["status"] == FAILED_TO_COMPILE:
            cell["known"] = _known(known, cell)
    return {"triton": triton.__version__, "targets": targets, "backends": notes,
            "tiles": TILES_NOTE,
            "cells": cells, "seconds": round(time.perf_counter() - started, 1)}


def report(backends: list[str], targets: list[str], *, quick: bool = True, ops=None, patterns=None,
           workers: int = 1) -> dict:
    """A conformance report whose only results are the compile matrix: no numerics ran, so every
    backend says so, and no case is listed."""
    from apt_hal import registry
    from apt_hal.conformance import runner

    started = time.time()
    section = build(backends, targets, quick=quick, ops=ops, patterns=patterns, workers=workers)
    records = {name: {"run": 0, "status": "NOT_RUN", "detail": "compile-only run: numerics were not run",
                      "device_type": registry.get_backend(name).device_type, "device": None, "driver": None,
                      "claims": {}, "claim_warnings": []} for name in backends}
    return {"schema": runner.SCHEMA,
            "runs": [{"environment": runner.environment(),
                      "options": {"seed": 0, "quick": quick, "ops": sorted(ops or []), "cases": list(patterns or []),
                                  "backends": backends, "compile_only": True, "targets": targets}}],
            "backends": records, "cases": [], "compile": section,
            "timing": {"runs": [{"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                                 "seconds": round(time.time() - started, 2)}], "cases": {}}}


def main(args, backends: list[str], out: pathlib.Path) -> int:
    """``apt-hal conformance --compile-only``: build the compile matrix and write the reports."""
    from apt_hal.conformance import cli

    try:
        targets = parse_targets(args.target)
    except ValueError as e:
        print(f"apt-hal conformance: error: {e}", file=sys.stderr)
        return 2
    ops = [n.strip() for v in (args.op or []) for n in v.split(",") if n.strip()]
    rep = report(backends, targets, quick=True, ops=ops, patterns=args.case,
                 workers=args.compile_jobs)
    return cli._finish(rep, out, [])


def merge(sections: list[dict]) -> dict:
    """One compile section from those of several reports (one per CI job)."""
    versions = sorted({s["triton"] for s in sections})
    return {"triton": ", ".join(versions), "targets": list(dict.fromkeys(t for s in sections for t in s["targets"])),
            "backends": {k: v for s in sections for k, v in s["backends"].items()}, "tiles": sections[0]["tiles"],
            "cells": [c for s in sections for c in s["cells"]],
            "seconds": round(sum(s["seconds"] for s in sections), 1)}


def text_lines(section: dict) -> list[str]:
    """Per backend and target, the counts of each status (the terminal summary)."""
    out = ["", f"compile matrix (Triton {section['triton']}; compiled, never run; {section['seconds']} s):"]
    for backend, per_target in summary(section).items():
        for target, counts in per_target.items():
            out.append(f"  {backend:<14} {target:<8} " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for c in section["cells"]:
        if c["status"] == FAILED_TO_COMPILE:
            out.append(f"  FAILED_TO_COMPILE {c['backend']} {c['target']} {c['kernel']} {describe_launch(c)}: "
                       f"{cell_detail(c)[:300]}")
    return out


def summary(section: dict) -> dict:
    """Per backend: {target: Counter of statuses}."""
    out: dict = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    for c in section["cells"]:
        out[c["backend"]][c["target"]][c["status"]] += 1
    return out


def unexplained_failures(report: dict) -> list[dict]:
    return [c for c in report.get("compile", {}).get("cells", ())
            if c["status"] == FAILED_TO_COMPILE and not c.get("known")]


def levels(report: dict) -> dict[str, str]:
    """Per backend, the highest level of verification it reached, in words. Numerics under the
    interpreter and compiles are both below numerics on hardware, and a compile is never a pass."""
    from apt_hal import registry
    from apt_hal.conformance import status

    compiled = summary(report["compile"]) if "compile" in report else {}
    out = {}
    for name, b in report["backends"].items():
        results = collections.Counter(c["status"] for c in report["cases"] if c["backend"] == name)
        ran = {s for s in results if s not in (status.UNSUPPORTED, status.NOT_RUN)}
        numeric = "FAIL" if ran & {status.FAIL, status.ERROR, status.INFRA_ERROR, status.XPASS} else "PASS"
        declared = registry.backends()[name].device_type if name in registry.backends() else b["device_type"]
        on_hardware = b["status"] == "RAN" and ran and b["device_type"] == declared
        targets = sorted(t for t, c in compiled.get(name, {}).items() if c[COMPILED])
        parts = []
        if on_hardware and b.get("remote"):  # the executor is the server's, not this machine's
            parts.append(f"numerics on the remote executor ({b['detail']}): {numeric}")
        elif on_hardware:
            parts.append(f"numerics on hardware ({b.get('device') or b['device_type']}): {numeric}")
        if targets:
            failed = sum(c[FAILED_TO_COMPILE] for c in compiled[name].values())
            parts.append(f"compiled for {', '.join(targets)}" + (f" ({failed} FAILED_TO_COMPILE)" if failed else "")
                         + ("" if on_hardware else ", never run on that hardware"))
        if b["status"] == "RAN" and ran and not on_hardware:
            parts.append(f"numerics under Triton's interpreter on CPU: {numeric}")
        out[name] = "; ".join(parts) or "not run"
    return out


def markdown(section: dict) -> list[str]:
    """The compile matrix as Markdown lines (a section of conformance.md)."""
    lines = ["", f"## Compile matrix (Triton {section['triton']}; compiled, not run)", "",
             f"Tiles: {section['tiles']}. {section['seconds']} s.", "",
             *[f"- **{s}**: {meaning}" for s, meaning in MEANING.items()], "",
             "| backend | " + " | ".join(section["targets"]) + " |", "|---|" + "---|" * len(section["targets"])]
    for backend, per_target in summary(section).items():
        row = [", ".join(f"{n} {s}" for s, n in sorted(per_target[t].items())) for t in section["targets"]]
        lines.append(f"| {backend} | " + " | ".join(row) + " |")
    lines += ["", "| backend | target | kernel | status | detail |", "|---|---|---|---|---|"]
    for c in section["cells"]:
        lines.append(f"| {c['backend']} | {c['target']} | `{c['kernel']}` {describe_launch(c)} | {c['status']} | "
                     + _md(cell_detail(c)) + " |")
    return lines


def describe_launch(cell: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in {**cell["constexprs"], **cell["options"]}.items())


def cell_detail(cell: dict) -> str:
    if cell["status"] == COMPILED:
        asm = f"; inline asm: {cell['inline_asm']}" if cell["inline_asm"] else ""
        return f"{cell['binary']} sha256 {cell['sha256'][:16]}…, {cell['instruction']['verdict']}{asm}"
    if cell["status"] == FAILED_TO_COMPILE and cell.get("known"):
        return f"known: {cell['known']} — {cell['message']}"
    return cell["message"]


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:600]


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        _capture_main(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
    else:
        _compile_main(sys.argv[2], sys.argv[3])
