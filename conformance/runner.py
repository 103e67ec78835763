"""Run conformance cases on backends and build the report (a plain, JSON-ready dict).

For each backend: activate it (unavailable: every case NOT_RUN with the probe's reason; available
but its code fails to import: INFRA_ERROR, never green). For each case: UNSUPPORTED when outside
the backend's claims; otherwise generate the inputs on the CPU, run ``op.reference`` on CPU copies
(the oracle), place identical copies on the backend's device and call the public op under
``apt_hal.use(backend, strict=True)`` -- so a fallback to the reference raises (ERROR) instead of
passing -- then compare every output with the tolerance table, check that nothing else in memory
changed, and apply the known-failure list. Failing cases get a reproduction bundle. Calls run at
the contracts' default check level ("metadata"); error cases that only a value check can find
(NaN logits, out-of-range indices) run at level "values" (:func:`apt_hal.set_checks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import time
import warnings
from typing import Callable, Iterable, Mapping, Optional

import torch

import apt_hal
from apt_hal import registry
from apt_hal.conformance import reports, repro, status, tolerances
from apt_hal.conformance.spec import Case, OpSpec, dtype_name, generator, op_specs, place, storage_elements
from apt_hal.errors import BackendUnavailableError

SCHEMA = "apt_hal.conformance/1"
KNOWN_FAILURES = pathlib.Path(__file__).with_name("known_failures.json")
# Reports also record the versions of every declared backend's Backend.packages.
PACKAGES = ("apt-hal", "torch", "numpy", "safetensors")

Progress = Callable[[int, int, str], None]


def select_cases(ops: Optional[Iterable[str]] = None, patterns: Optional[Iterable[str]] = None,
                 quick: bool = False) -> list[Case]:
    """The cases of ``ops`` (default all); ``patterns`` (case ids or globs) pick cases whether quick
    or not; otherwise ``quick`` keeps the quick suite."""
    specs = op_specs()
    unknown = set(ops or ()) - set(specs)
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(sorted(unknown))}; known: {', '.join(specs)}")
    cases = [c for name, s in specs.items() if not ops or name in ops for c in s.cases()]
    if patterns:
        patterns = list(patterns)
        return [c for c in cases if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    return [c for c in cases if c.quick or not quick]


def load_known_failures(path: pathlib.Path = KNOWN_FAILURES) -> list[dict]:
    entries = json.loads(path.read_text())["entries"]
    for e in entries:
        if not (e.get("backend") and e.get("case") and e.get("reason")):
            raise ValueError(f"{path.name}: every entry needs a backend, a case and a reason, got {e}")
    return entries


# ---- environment ----------------------------------------------------------------------------


def environment() -> dict:
    """The host: Python, OS and the versions of the packages that matter (no timestamps)."""
    versions = {}
    backend_packages = [dist for b in registry.backends().values() for dist in b.packages]
    for dist in dict.fromkeys(PACKAGES + tuple(backend_packages)):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "torch_cuda": torch.version.cuda, "torch_hip": torch.version.hip,
            "variables": {k: os.environ[k] for k in ("TRITON_INTERPRET", "APT_HAL_CHECKS") if k in os.environ}}


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    """The device's name and driver, as far as torch can tell without vendor tools."""
    if device.type == "cpu":
        return {"device": _cpu_name(), "driver": None}
    info = {"device": device.type, "driver": None}
    try:
        info["device"] = torch.get_device_module(device.type).get_device_name(device)
        if device.type == "cuda":
            runtime = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA runtime {torch.version.cuda}"
            get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)  # CUDA builds only
            v = get_driver() if get_driver and not torch.version.hip else None
            info["driver"] = runtime + (f", driver API {v // 1000}.{v % 1000 // 10}" if v else "")
    except Exception as e:  # a report must still be written: say what could not be read
        info["driver"] = f"unknown ({type(e).__name__}: {e})"
    return info


# ---- claims ---------------------------------------------------------------------------------


def claim_gap(claims: Mapping, case: Case) -> Optional[str]:
    """Why ``case`` is outside ``claims`` (None when it is claimed)."""
    claim = claims.get(case.op, claims.get("*"))
    if claim is None:
        return f"does not claim {case.op}"
    dtypes = claim.get("dtypes", ())
    if "*" not in dtypes and dtype_name(case.dtype) not in dtypes:
        return f"does not claim {case.op} in {dtype_name(case.dtype)}"
    features = claim.get("features", ())
    missing = [f for f in case.features if f not in features and "*" not in features]
    if missing:
        return f"does not claim feature(s) {', '.join(missing)} of {case.op}"
    return None


def claim_warnings(claims: Mapping, specs: Mapping[str, OpSpec]) -> list[str]:
    """Names in ``claims`` this suite does not know (a typo would silently drop coverage)."""
    out = []
    for op, claim in claims.items():
        if op != "*" and op not in specs:
            out.append(f"claims unknown op {op!r}")
            continue
        vocab = {f for s in specs.values() for f in s.features} if op == "*" else set(specs[op].features)
        out += [f"claims unknown feature {f!r} of {op}" for f in claim.get("features", ())
                if f != "*" and f not in vocab]
        out += [f"claims unknown dtype {d!r} for {op}" for d in claim.get("dtypes", ())
                if d != "*" and not isinstance(getattr(torch, d, None), torch.dtype)]
    return out


# ---- one case -------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    status: str
    message: str = ""
    outputs: dict = dataclasses.field(default_factory=dict)  # output name -> metrics
    tensors: dict = dataclasses.field(default_factory=dict)  # for a repro bundle: inputs, expected, actual


@contextlib.contextmanager
def _checks(level: str):
    """The contracts' check level for the block (:func:`apt_hal.set_checks`): every case runs at
    a stated level, whatever the caller's ``APT_HAL_CHECKS``."""
    previous = apt_hal.set_checks(level)
    try:
        yield
    finally:
        apt_hal.set_checks(previous)


def _expect_error(case: Case, spec: OpSpec, backend: str, args: dict) -> Outcome:
    want = f"{case.error.__name__} naming {case.raises}"
    try:
        with _checks("values" if case.value_check else "metadata"), apt_hal.use(backend, strict=True):
            spec.call(**args)
    except case.error as e:
        if case.raises in str(e):
            return Outcome(status.PASS)
        return Outcome(status.FAIL, f"raised {type(e).__name__} without naming {case.raises}: {e}")
    except Exception as e:
        return Outcome(status.FAIL, f"raised {type(e).__name__} instead of {want}: {e}")
    return Outcome(status.FAIL, f"accepted invalid input; expected {want}")


def _collect(spec: OpSpec, args: dict, returned) -> dict:
    if spec.mutates:
        return {n: args[n] for n in spec.outputs}
    values = returned if isinstance(returned, tuple) else (returned,)
    if len(values) != len(spec.outputs):
        raise ValueError(f"returned {len(values)} value(s), the contract returns {len(spec.outputs)}")
    return dict(zip(spec.outputs, values))


def _bytes_by_element(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(t.numel(), t.element_size())


def _stray_writes(spec: OpSpec, args: dict, ref_args: dict) -> Optional[str]:
    """Memory the call changed that it must not: an input the contract does not mutate, or, for a
    mutating op, the memory around its outputs (compared with the reference run's, same layout)."""
    storages: dict[tuple, list[str]] = {}
    for name, a in args.items():
        if isinstance(a, torch.Tensor):
            storages.setdefault((a.untyped_storage().data_ptr(), str(a.device)), []).append(name)
    for names in storages.values():
        mutated = [n for n in names if spec.mutates and n in spec.outputs]
        got = storage_elements(args[names[0]]).cpu()
        expected = storage_elements(ref_args[names[0]])
        outside = torch.ones(got.numel(), dtype=torch.bool)
        for n in mutated:
            a = args[n]
            outside.as_strided(a.shape, a.stride(), a.storage_offset()).fill_(False)
        changed = (_bytes_by_element(got) != _bytes_by_element(expected)).any(dim=1) & outside
        if changed.any():
            what = (f"the memory around {', '.join(map(repr, mutated))}" if mutated
                    else f"its input {', '.join(map(repr, names))}, which the contract does not mutate")
            return f"changed {int(changed.sum())} element(s) of {what}"
    return None


def run_case(case: Case, spec: OpSpec, backend: str, device: torch.device, seed: int) -> Outcome:
    """One case on one (activated, claiming) backend."""
    try:
        inputs = case.make(generator(seed, case.id), case.dtype)
    except Exception as e:
        return Outcome(status.INFRA_ERROR, f"the case's input generator failed: {type(e).__name__}: {e}")
    args = place(inputs, device, case.host_args)
    if case.is_error:
        return _expect_error(case, spec, backend, args)
    ref_args = place(inputs, torch.device("cpu"))
    try:
        expected = _collect(spec, ref_args, spec.reference(**ref_args))
    except Exception as e:
        return Outcome(status.INFRA_ERROR, f"the reference rejected the case's inputs: {type(e).__name__}: {e}")
    tensors = {"inputs": inputs, "expected": expected}
    try:
        with _checks("metadata"), apt_hal.use(backend, strict=True), warnings.catch_warnings():
            # Edge cases feed NaN and Inf on purpose: numpy (Triton's interpreter) would warn for each.
            warnings.filterwarnings("ignore", "(invalid value|overflow|divide by zero) encountered", RuntimeWarning)
            got = _collect(spec, args, spec.call(**args))
    except Exception as e:
        return Outcome(status.ERROR, f"{type(e).__name__}: {e}", tensors=tensors)
    results, messages, actual = {}, [], {}
    for name, exp in expected.items():
        g = got[name]
        if isinstance(g, torch.Tensor) and not spec.mutates and g.device.type != device.type:
            results[name] = {"status": status.FAIL}
            messages.append(f"{name}: on {g.device}, expected {device.type}")
            continue
        actual[name] = g = g.cpu() if isinstance(g, torch.Tensor) else g
        tol = tolerances.lookup(case.op, name, dtype_name(case.dtype), backend)
        verdict, metrics, message = tolerances.compare(g, exp, tol, case.reduction)
        results[name] = {**metrics, "status": verdict, "tolerance": "/".join(tol.key)}
        if message:
            messages.append(f"{name}: {message}")
    stray = _stray_writes(spec, args, ref_args)
    if stray:
        messages.append(stray)
    tensors["actual"] = actual
    verdicts = [r["status"] for r in results.values()] + ([status.FAIL] if stray else [])
    return Outcome(status.worst(verdicts), "; ".join(messages), results, tensors)


def _known(entries: list[dict], backend: str, case_id: str) -> Optional[dict]:
    """The known-failure entry for this case, if any applies here (its ``env`` matches)."""
    return next((e for e in entries if e["backend"] == backend and fnmatch.fnmatchcase(case_id, e["case"])
                 and all(os.environ.get(k) == v for k, v in e.get("env", {}).items())), None)


def _apply_known_failure(outcome: Outcome, entry: Optional[dict]) -> Outcome:
    if entry is None or outcome.status not in (status.PASS, status.QUALITY_WARNING, status.FAIL, status.ERROR):
        return outcome
    if outcome.status == status.PASS:
        return dataclasses.replace(outcome, status=status.XPASS,
                                   message=f"listed as a known failure ({entry['reason']}) but passes")
    note = f"known failure: {entry['reason']}; {outcome.status}: {outcome.message}"
    return dataclasses.replace(outcome, status=status.XFAIL, message=note)


# ---- a whole run ----------------------------------------------------------------------------


def _activate(name: str) -> tuple[str, str]:
    """("RAN" | "NOT_RUN" | "INFRA_ERROR", detail)."""
    try:
        registry.activate(name)
    except BackendUnavailableError as e:
        if registry.activation_error(name) is not None:
            return "INFRA_ERROR", str(e)  # it said it could run here, then failed to load
        return "NOT_RUN", registry.probe(name).detail
    return "RAN", registry.probe(name).detail


def rerun_command(backend: str, case_id: str, seed: int) -> str:
    prefix = "TRITON_INTERPRET=1 " if os.environ.get("TRITON_INTERPRET") == "1" else ""
    return (f"{prefix}apt-hal conformance --backend {shlex.quote(backend)} --case {shlex.quote(case_id)} "
            f"--seed {seed} --report conformance-rerun")


def _backend_record(name: str, specs: Mapping[str, OpSpec]) -> tuple[dict, Optional[torch.device]]:
    decl = registry.get_backend(name)
    state, detail = _activate(name)
    # torch knows a vendor's device type ("npu") only once the backend is activated.
    device = torch.device(registry.device_type_of(name)) if state == "RAN" else None
    record = {"run": 0, "status": state, "detail": detail, "device_type": registry.device_type_of(name),
              "remote": decl.remote,
              **(device_info(device) if device else {"device": None, "driver": None}),
              "claims": decl.claims, "claim_warnings": claim_warnings(decl.claims, specs)}
    return record, device


def _outcome(case: Case, spec: OpSpec, name: str, backend: dict, device, seed: int, known: list[dict]) -> Outcome:
    if backend["status"] == "NOT_RUN":
        return Outcome(status.NOT_RUN, backend["detail"])
    if backend["status"] == "INFRA_ERROR":
        return Outcome(status.INFRA_ERROR, reports.last_line(backend["detail"]))
    gap = claim_gap(backend["claims"], case)
    if gap:
        return Outcome(status.UNSUPPORTED, f"{name} {gap}")
    try:
        outcome = run_case(case, spec, name, device, seed)
    except Exception as e:  # one broken case (placing inputs, an odd output) must not end the run
        return Outcome(status.INFRA_ERROR, f"the harness failed on this case: {type(e).__name__}: {e}")
    return _apply_known_failure(outcome, _known(known, name, case.id))


def run(backends: Iterable[str], *, seed: int = 0, quick: bool = False, ops: Optional[Iterable[str]] = None,
        patterns: Optional[Iterable[str]] = None, known_failures: Optional[list[dict]] = None,
        report_dir: Optional[pathlib.Path] = None, progress: Optional[Progress] = None) -> dict:
    """Run the selected cases on ``backends`` and return the report. With ``report_dir``, failing
    cases get a reproduction bundle under ``report_dir/repro``."""
    started = time.time()
    backends = list(backends)
    for name in backends:
        registry.get_backend(name)  # unknown names raise before anything runs
    specs = op_specs()
    cases = select_cases(ops, patterns, quick)
    known = load_known_failures() if known_failures is None else known_failures
    report = {"schema": SCHEMA,
              "runs": [{"environment": environment(),
                        "options": {"seed": seed, "quick": quick, "ops": sorted(ops or []),
                                    "cases": list(patterns or []), "backends": backends}}],
              "backends": {}, "cases": [],
              "timing": {"runs": [], "cases": {}}}
    total, done = len(backends) * len(cases), 0
    for name in backends:
        backend, device = _backend_record(name, specs)
        report["backends"][name] = backend
        for case in cases:
            t0 = time.perf_counter()
            outcome = _outcome(case, specs[case.op], name, backend, device, seed, known)
            record = {"backend": name, "id": case.id, "op": case.op, "dtype": dtype_name(case.dtype),
                      "case": case.name, "kind": "error" if case.is_error else "value",
                      "features": list(case.features), "quick": case.quick, "status": outcome.status,
                      "message": outcome.message, "outputs": outcome.outputs, "repro": None, "rerun": None}
            if outcome.status in (status.FAIL, status.ERROR):
                record["rerun"] = rerun_command(name, case.id, seed)
                if report_dir is not None and outcome.tensors:
                    record["repro"] = repro.write_bundle(pathlib.Path(report_dir), record, outcome.tensors, seed)
            report["cases"].append(record)
            report["timing"]["cases"][f"{name} {case.id}"] = round(time.perf_counter() - t0, 4)
            done += 1
            if progress:
                progress(done, total, f"{name} {case.id}")
    report["timing"]["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                                     "seconds": round(time.time() - started, 2)})
    return report
