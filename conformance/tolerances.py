"""Tolerances (``tolerances.json``, the one table) and the comparison of a result with the reference.

``lookup(op, output, dtype, backend)`` returns the most specific entry of the table; ``compare``
applies it. The rules (also stated at the top of the data file):

* ``exact``: the bytes must be equal, so a NaN must have the reference's payload and a zero its sign.
* ``rel_inf``: ``max_i(max(|got_i - ref_i| - q, 0)) / max_i |ref_i|`` over the elements finite in
  both, ``q`` the dtype's smallest subnormal (rounding there is absolute, not relative): the largest
  error relative to the largest reference magnitude, which a single wrong element cannot hide in
  and cancellation in one element cannot inflate. ``<= strict``: PASS, ``<= relaxed``:
  QUALITY_WARNING, else FAIL. ``per_sqrt_k`` multiplies both bands by ``sqrt(K)``, ``K`` the case's
  longest reduction.
* NaN and Inf, for every float metric: where the reference is NaN the result must be NaN, where it
  is +Inf or -Inf the result must be that same infinity, where it is finite the result must be
  finite. Any other NaN or Inf is a FAIL whatever the bands say: NaN never passes by accident.

Other tools (apt-compile's validation) use :func:`lookup` and :func:`compare` too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import pathlib

import torch

from apt_hal.conformance.status import FAIL, PASS, QUALITY_WARNING

TABLE = pathlib.Path(__file__).with_name("tolerances.json")
KEY = ("op", "output", "dtype", "backend")
METRICS = ("exact", "rel_inf")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    metric: str
    reason: str
    key: tuple[str, str, str, str]  # the entry's (op, output, dtype, backend)
    strict: float = 0.0
    relaxed: float = 0.0
    per_sqrt_k: bool = False

    def bands(self, reduction: int = 1) -> tuple[float, float]:
        scale = math.sqrt(reduction) if self.per_sqrt_k else 1.0
        return self.strict * scale, self.relaxed * scale


def _specificity(pattern: str) -> int:
    return 0 if pattern == "*" else 1 if any(c in pattern for c in "*?[") else 2


@functools.lru_cache(maxsize=None)
def table(path: pathlib.Path = TABLE) -> tuple[Tolerance, ...]:
    """The entries, checked: known metric, a reason, ordered bands, one entry per key."""
    entries = []
    for e in json.loads(path.read_text())["entries"]:
        key = tuple(e[k] for k in KEY)
        if e.get("metric") not in METRICS or not e.get("reason"):
            raise ValueError(f"{path.name}: entry {key} needs a metric in {METRICS} and a reason")
        tol = Tolerance(e["metric"], e["reason"], key, e.get("strict", 0.0), e.get("relaxed", 0.0),
                        e.get("per_sqrt_k", False))
        if tol.metric != "exact" and not 0 < tol.strict <= tol.relaxed:
            raise ValueError(f"{path.name}: entry {key} needs 0 < strict <= relaxed")
        if any(t.key == key for t in entries):
            raise ValueError(f"{path.name}: two entries for {key}")
        entries.append(tol)
    return tuple(entries)


def lookup(op: str, output: str, dtype: str, backend: str) -> Tolerance:
    """The most specific entry matching ``(op, output, dtype, backend)`` (backend first, then op,
    output, dtype; an exact name beats a pattern, which beats '*')."""
    wanted = (op, output, dtype, backend)
    matches = [t for t in table() if all(fnmatch.fnmatchcase(w, p) for w, p in zip(wanted, t.key))]
    return max(matches, key=lambda t: [_specificity(t.key[i]) for i in (3, 0, 1, 2)])


# ---- comparison -----------------------------------------------------------------------------


def _num(x: float):
    """A JSON-safe number with 6 significant digits (reports diff cleanly); non-finite as text."""
    return float(f"{x:.6g}") if math.isfinite(x) else str(x)


def _index(t: torch.Tensor, flat: int) -> list[int]:
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape)] if t.dim() else []


def _show(t: torch.Tensor, flat: int) -> str:
    v = t.reshape(-1)[flat]
    raw = v.reshape(1).view(torch.uint8).flip(0).numpy().tobytes().hex()  # big-endian hex of the bits
    shown = v.item() if not (v.is_floating_point() and v.element_size() == 1) else v.float().item()
    return f"{shown!r} (0x{raw})"


def compare(got: torch.Tensor, expected: torch.Tensor, tol: Tolerance, reduction: int = 1) -> tuple[str, dict, str]:
    """``(status, metrics, message)`` for one output; both tensors on the CPU."""
    if not isinstance(got, torch.Tensor):
        return FAIL, {}, f"expected a tensor, got {type(got).__name__}"
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return FAIL, {}, (f"expected shape {list(expected.shape)} {expected.dtype}, "
                          f"got {list(got.shape)} {got.dtype}")
    if tol.metric == "exact":
        return _compare_bytes(got, expected)
    return _compare_float(got, expected, *tol.bands(reduction))


def _compare_bytes(got: torch.Tensor, expected: torch.Tensor) -> tuple[str, dict, str]:
    def rows(t):
        return t.contiguous().reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size())

    differ = (rows(got) != rows(expected)).any(dim=1)
    n = int(differ.sum())
    metrics = {"metric": "exact", "mismatched": n, "numel": got.numel()}
    if not n:
        return PASS, metrics, ""
    i = int(differ.nonzero()[0])
    metrics["first_mismatch"] = _index(got, i)
    return FAIL, metrics, (f"{n} of {got.numel()} elements differ in their bytes; first at {_index(got, i)}: "
                           f"got {_show(got, i)}, expected {_show(expected, i)}")


def _compare_float(got: torch.Tensor, expected: torch.Tensor, strict: float, relaxed: float) -> tuple[str, dict, str]:
    o, r = got.to(torch.float64).reshape(-1), expected.to(torch.float64).reshape(-1)  # exact for every float dtype
    nonfinite_mismatch = (r.isnan() != o.isnan()) | (r.isinf() & (o != r)) | (r.isfinite() & ~o.isfinite())
    finite = r.isfinite() & o.isfinite()
    fi = torch.finfo(expected.dtype)
    quantum = fi.smallest_normal * fi.eps  # the smallest subnormal
    err = torch.where(finite, ((o - r).abs() - quantum).clamp_min(0), 0.0)
    scale = float(r[finite].abs().max()) if finite.any() else 0.0
    worst = int(err.argmax()) if err.numel() else 0
    worst_err = float(err[worst]) if err.numel() else 0.0
    rel = worst_err / scale if scale else (0.0 if worst_err == 0 else math.inf)
    n_bad = int(nonfinite_mismatch.sum())
    metrics = {"metric": "rel_inf", "value": _num(rel), "strict": _num(strict), "relaxed": _num(relaxed),
               "max_abs_error": _num(worst_err), "nonfinite_mismatches": n_bad, "numel": got.numel()}
    if n_bad:
        i = int(nonfinite_mismatch.nonzero()[0])
        return FAIL, metrics, (f"{n_bad} NaN/Inf mismatch(es); first at {_index(got, i)}: got {_show(got, i)}, "
                               f"expected {_show(expected, i)}")
    if rel <= strict:
        return PASS, metrics, ""
    metrics["worst"] = _index(got, worst)
    where = f"worst at {_index(got, worst)}: got {_show(got, worst)}, expected {_show(expected, worst)}"
    if rel <= relaxed:
        return QUALITY_WARNING, metrics, f"relative error {rel:.3g} above the strict band {strict:.3g} ({where})"
    return FAIL, metrics, f"relative error {rel:.3g} above the relaxed band {relaxed:.3g} ({where})"

