"""Golden data: the conformance inputs and the CPU reference's outputs, written once, checked anywhere.

For a vendor CI host that cannot run the CPU reference cheaply (or at all), and for comparing
hosts: ``apt-hal conformance --write-golden DIR`` writes, per value case of the selection::

    DIR/golden.json                            the index: seed, versions, and per case its id, op,
                                               dtype, features and folder
    DIR/<case id, '/' as '__'>/inputs.safetensors    the arguments (views and shared storages kept)
    DIR/<case id, '/' as '__'>/expected.safetensors  the reference's outputs, computed on the CPU

(the format of :mod:`apt_hal.conformance.repro`), and ``apt-hal conformance --golden DIR
--backend NAME`` checks a backend against them: the same placement, strict call, tolerance table,
stray-write check and known-failure list as a normal run, and the same reports, with the expected
outputs read instead of computed. Error cases are not stored: they need no reference.
"""

from __future__ import annotations

import json
import pathlib
import time
import warnings
from typing import Iterable, Optional

import torch

import apt_hal
from apt_hal.conformance import repro, runner, status, tolerances
from apt_hal.conformance.spec import Case, dtype_name, generator, op_specs, place

SCHEMA = "apt_hal.golden/1"
INDEX = "golden.json"


def write(folder: pathlib.Path, cases: Iterable[Case], seed: int = 0) -> list[dict]:
    """Write the inputs and CPU reference outputs of ``cases`` (value cases only); returns the index entries."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = op_specs()
    entries = []
    for case in cases:
        if case.is_error:
            continue
        spec = specs[case.op]
        inputs = case.make(generator(seed, case.id), case.dtype)
        ref_args = place(inputs, torch.device("cpu"))
        expected = runner._collect(spec, ref_args, spec.reference(**ref_args))
        rel = case.id.replace("/", "__")
        (folder / rel).mkdir(exist_ok=True)
        repro.save(folder / rel / "inputs.safetensors", inputs)
        repro.save(folder / rel / "expected.safetensors", expected)
        entries.append({"id": case.id, "op": case.op, "dtype": dtype_name(case.dtype), "features": list(case.features),
                        "folder": rel})
    index = {"schema": SCHEMA, "seed": seed, "environment": runner.environment(), "cases": entries}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return entries


def load_index(folder: pathlib.Path) -> dict:
    index = json.loads((folder / INDEX).read_text())
    if index.get("schema") != SCHEMA:
        raise ValueError(f"{folder / INDEX}: schema {index.get('schema')!r}, expected {SCHEMA!r}")
    return index


def check_case(case: Case, folder: pathlib.Path, backend: str, device: torch.device) -> runner.Outcome:
    """One stored case on one (activated, claiming) backend."""
    spec = op_specs()[case.op]
    inputs = repro.load(folder / "inputs.safetensors")
    expected = repro.load(folder / "expected.safetensors")
    args = place(inputs, device, case.host_args)
    try:
        with runner._checks("metadata"), apt_hal.use(backend, strict=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(invalid value|overflow|divide by zero) encountered", RuntimeWarning)
            got = runner._collect(spec, args, spec.call(**args))
    except Exception as e:
        return runner.Outcome(status.ERROR, f"{type(e).__name__}: {e}")
    results, messages = {}, []
    for name, exp in expected.items():
        g = got[name].cpu() if isinstance(got[name], torch.Tensor) else got[name]
        tol = tolerances.lookup(case.op, name, dtype_name(case.dtype), backend)
        verdict, metrics, message = tolerances.compare(g, exp, tol, case.reduction)
        results[name] = {**metrics, "status": verdict, "tolerance": "/".join(tol.key)}
        if message:
            messages.append(f"{name}: {message}")
    # Memory as the reference run left it: the inputs, with a mutating op's outputs (stored with
    # their whole storage) in place of the arguments they mutate.
    stray = runner._stray_writes(spec, args, {**inputs, **expected} if spec.mutates else inputs)
    if stray:
        messages.append(stray)
    verdicts = [r["status"] for r in results.values()] + ([status.FAIL] if stray else [])
    return runner.Outcome(status.worst(verdicts), "; ".join(messages), results)


def run(backends: Iterable[str], golden: pathlib.Path, cases: Optional[Iterable[Case]] = None,
        known_failures: Optional[list[dict]] = None, progress: Optional[runner.Progress] = None) -> dict:
    """Check ``backends`` against the golden data in ``golden`` (only ``cases``, when given);
    returns a report of the same schema as :func:`apt_hal.conformance.runner.run`."""
    started = time.time()
    backends = list(backends)
    index = load_index(golden)
    specs = op_specs()
    suite = {c.id: c for s in specs.values() for c in s.cases()}
    wanted = None if cases is None else {c.id for c in cases}
    entries = [e for e in index["cases"] if wanted is None or e["id"] in wanted]
    known = runner.load_known_failures() if known_failures is None else known_failures
    report = {"schema": runner.SCHEMA,
              "runs": [{"environment": runner.environment(),
                        "options": {"seed": index["seed"], "quick": all(e["id"] in suite and suite[e["id"]].quick
                                                                        for e in entries),
                                    "ops": sorted({e["op"] for e in entries}), "cases": [], "backends": backends,
                                    "golden": str(golden), "golden_environment": index["environment"]}}],
              "backends": {}, "cases": [], "timing": {"runs": [], "cases": {}}}
    total = len(backends) * len(entries)
    for name in backends:
        backend, device = runner._backend_record(name, specs)
        report["backends"][name] = backend
        for entry in entries:
            t0 = time.perf_counter()
            case = suite.get(entry["id"])
            if case is None:
                outcome = runner.Outcome(status.INFRA_ERROR, "the golden case is not in this version's suite")
            elif backend["status"] != "RAN" or runner.claim_gap(backend["claims"], case):
                outcome = runner._outcome(case, specs[case.op], name, backend, device, index["seed"], known)
            else:
                outcome = runner._apply_known_failure(check_case(case, golden / entry["folder"], name, device),
                                                      runner._known(known, name, case.id))
            report["cases"].append({
                "backend": name, "id": entry["id"], "op": entry["op"], "dtype": entry["dtype"],
                "case": case.name if case else entry["id"], "kind": "value", "features": entry["features"],
                "quick": bool(case and case.quick), "status": outcome.status, "message": outcome.message,
                "outputs": outcome.outputs, "repro": None, "rerun": None})
            report["timing"]["cases"][f"{name} {entry['id']}"] = round(time.perf_counter() - t0, 4)
            if progress:
                progress(len(report["cases"]), total, f"{name} {entry['id']}")
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
    report["timing"]["runs"] = [{"started": started_at, "seconds": round(time.time() - started, 2)}]
    return report
