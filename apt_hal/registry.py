"""Backends, implementations and the policy that picks one implementation per op call.

Vocabulary
----------
* A **backend** is a small declaration (:class:`Backend`): a name, the torch device type its
  implementations take, a cheap ``probe()`` that imports nothing heavy, and the module that
  registers its implementations when the backend is activated. Several backends may share one
  device type (``cuda-triton`` and ``rocm`` both take torch's ``"cuda"`` tensors).
* An **implementation** is a function with exactly the signature of an op contract's reference,
  registered for ``(op, backend)`` with :func:`impl`, optionally with a per-call ``supports``
  predicate. Several implementations of one op on one backend are tried in registration order.
* The **policy** says which backend serves a call: :func:`use` sets it for the process or, as a
  context manager, for a block (a ``ContextVar``, so threads and asyncio tasks are isolated);
  ``APT_HAL_BACKEND`` and ``APT_HAL_STRICT`` seed it. ``"auto"`` serves each call with the best
  available backend for the device of its inputs (CUDA > HPU > NPU > XPU > CPU).
* When the chosen backend cannot serve a call (no implementation, ``supports`` declined, inputs
  on another device), the contract's reference runs on the inputs' device and a warning says so
  once per reason; under ``strict=True`` an :class:`~apt_hal.errors.OpNotImplementedError` is
  raised instead. Nothing falls back silently.

Out-of-tree backends are found through the entry-point group ``apt_hal.backends``: each entry
point names a :class:`Backend` (or a zero-argument callable returning one), importable without
the vendor stack.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import importlib.metadata
import inspect
import logging
import os
import threading
import traceback
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from apt_hal.errors import (
    BackendUnavailableError,
    OpNotImplementedError,
    PluginError,
    UnknownBackendError,
)

log = logging.getLogger("apt_hal")

ENTRY_POINT_GROUP = "apt_hal.backends"
REFERENCE = "reference"  # the pseudo-backend name of every contract's own reference


# --------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Probe:
    """A backend's answer to "can you run here?".

    ``detail`` is the reason when unavailable ("torch_npu is not installed") and a short
    description when available ("CUDA 12.8, 1 device: NVIDIA H100"). ``device_type`` overrides
    the declaration's (Triton's interpreter runs the cuda-triton kernels on CPU tensors);
    ``auto=False`` keeps ``"auto"`` from choosing the backend (it is then used only by name).
    """

    available: bool
    detail: str
    device_type: Optional[str] = None
    auto: bool = True


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend declaration. Plain data: creating one imports nothing of the vendor stack."""

    name: str
    device_type: str  # torch device type of the tensors its implementations take
    probe: Callable[[], Probe]
    implementations: str  # module imported by activate(); it registers with @apt_hal.impl
    packages: tuple[str, ...] = ()  # vendor packages it needs (pip names, for display)
    install_hint: str = ""
    auto_rank: Optional[int] = None  # order under "auto" (lower first); None: never automatic
    remote: bool = False  # an executor elsewhere: host tensors in and out
    description: str = ""
    # What conformance holds the backend to: op name -> {"dtypes": [...], "features": [...]}, "*"
    # meaning all. A case outside the claims is UNSUPPORTED; a claimed case that fails is FAIL.
    claims: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    name: str  # unique, "<backend>.<name>"
    fn: Callable[..., Any]
    supports: Optional[Callable[..., bool]] = None  # same signature as fn; False: not this call
    # A torch op ("namespace::name") computing the same as fn that torch.compile can trace into
    # (a torch.library.triton_op, say); used under torch.compile, never by torch.export.
    traceable: Optional[str] = None


# Auto order between device types, as the design card states it.
AUTO_DEVICE_ORDER = ("cuda", "hpu", "npu", "xpu", "cpu")

_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_origins: dict[str, str] = {}  # backend name -> "built-in" or the entry point that declared it
_plugin_errors: list[tuple[str, str]] = []  # (entry point, traceback)
_discovered = False
_probes: dict[str, Probe] = {}
_activated: dict[str, Optional[str]] = {}  # backend -> None when fine, else the traceback
_impls: dict[str, list[Implementation]] = {}  # op name -> implementations, registration order
_contracts: dict[str, Any] = {}  # op name -> apt_hal.contract.Op
_version = 0  # bumped on every registration; invalidates the resolution cache
_resolution_cache: dict[tuple, "_Resolution"] = {}
_warned: set[tuple] = set()


def _bump() -> None:
    global _version
    _version += 1
    _resolution_cache.clear()


def register_backend(backend: Backend, origin: str = "built-in") -> None:
    """Declare a backend. Two declarations of one name are an error, whoever makes them."""
    with _lock:
        if backend.name == REFERENCE:
            raise PluginError(f"the backend name {REFERENCE!r} is reserved for the contracts' references")
        if backend.name in _backends:
            raise PluginError(
                f"two backends claim the name {backend.name!r}: {_origins[backend.name]} and {origin}"
            )
        _backends[backend.name] = backend
        _origins[backend.name] = origin
        _bump()


def _discover() -> None:
    """Declare the built-in backends, then every plugin. Idempotent; plugin failures are kept."""
    global _discovered
    if _discovered:
        return
    with _lock:
        if _discovered:
            return
        _discovered = True
        from apt_hal.backends import BUILTIN_BACKENDS

        for b in BUILTIN_BACKENDS:
            register_backend(b)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            where = f"entry point {ep.name!r} ({ep.value})"
            try:
                obj = ep.load()
                decl = obj() if callable(obj) and not isinstance(obj, Backend) else obj
                if not isinstance(decl, Backend):
                    raise TypeError(f"{where} gave {type(decl).__name__}, expected apt_hal.Backend")
            except Exception:
                tb = traceback.format_exc()
                _plugin_errors.append((where, tb))
                log.error("apt_hal: backend plugin %s failed to load:\n%s", where, tb)
                warnings.warn(f"apt_hal: backend plugin {where} failed to load (see apt_hal.explain())",
                              RuntimeWarning, stacklevel=3)
                continue
            register_backend(decl, origin=where)  # a duplicate name raises, as documented


def backends() -> dict[str, Backend]:
    """Every declared backend by name (built-ins first, then plugins)."""
    _discover()
    return dict(_backends)


def plugin_errors() -> list[tuple[str, str]]:
    """Plugins that failed to load, with their tracebacks."""
    _discover()
    return list(_plugin_errors)


def get_backend(name: str) -> Backend:
    _discover()
    try:
        return _backends[name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown backend {name!r}; known: {', '.join(_backends)} (or 'auto')"
        ) from None


def probe(name: str, refresh: bool = False) -> Probe:
    """The backend's probe answer, memoised (probes are cheap but not free). Never raises."""
    b = get_backend(name)
    if refresh or name not in _probes:
        try:
            p = b.probe()
        except Exception as e:  # a probe that crashes is a reason, not a crash of the caller
            p = Probe(False, f"probe raised {type(e).__name__}: {e}")
        if p.available and _activated.get(name):
            p = Probe(False, "activation failed: " + _activated[name].strip().splitlines()[-1])
        _probes[name] = p
    return _probes[name]


def device_type_of(name: str) -> str:
    p = probe(name)
    return p.device_type or get_backend(name).device_type


def activation_error(name: str) -> Optional[str]:
    """The traceback of a backend whose probe said "available" but whose activation failed, or None."""
    get_backend(name)
    return _activated.get(name)


def activate(name: str) -> None:
    """Import the backend's implementation module (it registers its implementations).

    Idempotent. Raises :class:`BackendUnavailableError` with the probe's reason and the install
    hint when the backend cannot run here, or with the traceback when its import fails.
    """
    b = get_backend(name)
    if name in _activated:
        if _activated[name] is not None:
            raise BackendUnavailableError(f"backend {name!r} failed to activate:\n{_activated[name]}")
        return
    p = probe(name)
    if not p.available:
        hint = f" To use it: {b.install_hint}" if b.install_hint else ""
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {p.detail}.{hint}")
    with _lock:
        try:
            importlib.import_module(b.implementations)
        except Exception:
            _activated[name] = traceback.format_exc()
            _probes.pop(name, None)
            raise BackendUnavailableError(f"backend {name!r} failed to activate:\n{_activated[name]}") from None
        _activated[name] = None
        _bump()


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def _register_contract(op) -> None:
    _contracts[op.name] = op
    _impls.setdefault(op.name, [])


def contracts() -> dict[str, Any]:
    """Every op contract by name (importing apt_hal.ops defines them all)."""
    import apt_hal.ops  # noqa: F401  (defines the contracts)

    return dict(_contracts)


def impl(op, backend: str, name: Optional[str] = None, supports: Optional[Callable[..., bool]] = None,
         traceable: Optional[str] = None):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    ``op`` is an op contract (``apt_hal.ops.rotary``) or its name. The function's parameters must
    be named exactly as the contract's reference's. ``supports``, if given, takes the same
    arguments and returns False for calls this implementation does not handle (a dtype it lacks,
    a size it is not tuned for); the next implementation, or the reference, then serves the call.
    ``traceable`` names a torch op with the same schema and semantics that ``torch.compile`` can
    trace into (e.g. the ``torch.library.triton_op`` the implementation launches); without it the
    compiled graph calls the ``apt_hal`` op, which dispatches at run time.
    """

    def deco(fn):
        register_impl(op, backend, fn, name=name, supports=supports, traceable=traceable)
        return fn

    return deco


def register_impl(op, backend: str, fn: Callable, name: Optional[str] = None,
                  supports: Optional[Callable[..., bool]] = None, traceable: Optional[str] = None) -> Implementation:
    op_name = op if isinstance(op, str) else op.name
    contract = contracts().get(op_name)
    if contract is None:
        raise KeyError(f"unknown op {op_name!r}; known: {', '.join(contracts())}")
    if backend != REFERENCE:
        get_backend(backend)  # unknown names raise
    want = list(inspect.signature(contract.reference).parameters)
    got = list(inspect.signature(fn).parameters)
    if got != want:
        raise TypeError(f"{backend} implementation of {op_name} has parameters {got}; "
                        f"the contract's are {want}")
    full = f"{backend}.{name or fn.__name__}"
    with _lock:
        if any(i.name == full for i in _impls[op_name]):
            raise ValueError(f"an implementation named {full!r} of {op_name} is already registered")
        entry = Implementation(op_name, backend, full, fn, supports, traceable)
        _impls[op_name].append(entry)
        _bump()
    return entry


def unregister_impl(entry: Implementation) -> None:
    """Remove an implementation (tests register deliberately broken ones and take them away)."""
    with _lock:
        _impls[entry.op].remove(entry)
        _bump()


def implementations(op_name: str, backend: Optional[str] = None) -> list[Implementation]:
    return [i for i in _impls.get(op_name, ()) if backend is None or i.backend == backend]


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Policy:
    backend: str = "auto"
    strict: bool = False


_global_policy: Optional[Policy] = None
_scoped_policy: contextvars.ContextVar[Optional[Policy]] = contextvars.ContextVar("apt_hal_policy", default=None)


def _env_policy() -> Policy:
    name = os.environ.get("APT_HAL_BACKEND", "auto").strip() or "auto"
    strict = os.environ.get("APT_HAL_STRICT", "0").strip().lower() in ("1", "true", "yes")
    pol = Policy(name, strict)
    _check_policy(pol, source="APT_HAL_BACKEND")
    return pol


def _check_policy(pol: Policy, source: str) -> None:
    if pol.backend == "auto":
        _log_auto_probes()
        return
    try:
        activate(pol.backend)
    except UnknownBackendError as e:
        raise UnknownBackendError(f"{source}: {e}") from None


def _log_auto_probes() -> None:
    for name in backends():
        p = probe(name)
        log.info("apt_hal auto: %-13s %s: %s", name, "available" if p.available else "unavailable", p.detail)


def current_policy() -> Policy:
    pol = _scoped_policy.get()
    if pol is not None:
        return pol
    global _global_policy
    if _global_policy is None:
        _global_policy = _env_policy()
    return _global_policy


class use:
    """Choose the backend: ``apt_hal.use("npu")`` for the process, ``with apt_hal.use("npu"):`` for a block.

    ``"auto"`` serves each call with the best available backend for its inputs' device. A named
    backend is checked at once: if it cannot run here, :class:`BackendUnavailableError` says why
    and how to install it. ``strict=True`` turns every fallback to the reference into an error.
    """

    def __init__(self, backend: str = "auto", *, strict: bool = False):
        global _global_policy
        pol = Policy(backend, strict)
        _check_policy(pol, source="apt_hal.use")
        self.policy = pol
        self._previous_global = _global_policy
        self._token = None
        _global_policy = pol  # the plain call form takes effect now

    def __enter__(self):
        global _global_policy
        _global_policy = self._previous_global  # the with form scopes it instead
        self._token = _scoped_policy.set(self.policy)
        return self

    def __exit__(self, *exc):
        _scoped_policy.reset(self._token)
        return False

    def __repr__(self) -> str:
        return f"apt_hal.use({self.policy.backend!r}, strict={self.policy.strict})"


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Resolution:
    candidates: tuple[Implementation, ...]  # tried in order
    fallback_reason: Optional[str]  # why the reference would serve (None: a backend covers it)
    backend: str  # the backend that was meant to serve


def _auto_backends(device_type: str) -> list[str]:
    found = []
    for name, b in backends().items():
        p = probe(name)
        if p.available and p.auto and b.auto_rank is not None and device_type_of(name) == device_type:
            found.append((b.auto_rank, name))
    return [n for _, n in sorted(found)]


def _resolve(op_name: str, device_type: str, pol: Policy) -> _Resolution:
    if pol.backend == "auto":
        names = _auto_backends(device_type)
        cands: list[Implementation] = []
        for n in names:
            try:
                activate(n)
            except BackendUnavailableError as e:
                _warn_once(("activate", n), f"apt_hal auto: skipping backend {n!r}: {e}")
                continue
            cands += implementations(op_name, n)
        if cands:
            return _Resolution(tuple(cands), None, cands[0].backend)
        why = (f"no available backend implements {op_name} on {device_type}"
               if names else f"no available backend runs on {device_type}")
        return _Resolution((), why, names[0] if names else "auto")
    b = pol.backend
    bdev = device_type_of(b)
    if bdev != device_type:
        return _Resolution((), f"inputs are on {device_type} but backend {b!r} runs on {bdev}", b)
    cands = implementations(op_name, b)
    if not cands:
        return _Resolution((), f"backend {b!r} has no implementation of {op_name}", b)
    return _Resolution(tuple(cands), None, b)


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select(op, device_type: str, args: tuple) -> Callable[..., Any]:
    """The function that serves this call. Memoised per (op, device type, policy)."""
    pol = current_policy()
    key = (op.name, device_type, pol)
    res = _resolution_cache.get(key)
    if res is None:
        res = _resolution_cache[key] = _resolve(op.name, device_type, pol)
    for cand in res.candidates:
        if cand.supports is None or cand.supports(*args):
            return cand.fn
    reason = res.fallback_reason or (
        f"{', '.join(c.name for c in res.candidates)} declined this call (supports() returned False)")
    if pol.strict:
        raise OpNotImplementedError(f"apt_hal (strict): {op.name} cannot run on backend {res.backend!r}: {reason}")
    _warn_once((op.name, device_type, pol.backend, reason),
               f"apt_hal: {op.name} falls back to the reference implementation on {device_type}: {reason}")
    return op.reference


def compile_target(op_name: str, device_type: str) -> str:
    """The traceable op torch.compile should call for ``op_name`` on ``device_type``, or "" to keep
    the apt_hal op (which selects at run time). Only an unconditional first choice qualifies: a
    ``supports`` predicate cannot be evaluated once for every future call."""
    res = _resolve(op_name, device_type, current_policy())
    if res.candidates and res.candidates[0].supports is None and res.candidates[0].traceable:
        return res.candidates[0].traceable
    return ""


def clear_warnings() -> None:
    """Forget which fallback warnings were shown (tests use this)."""
    _warned.clear()


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Explanation:
    """What apt_hal knows and would do; ``str()`` gives the table ``apt-hal info`` prints."""

    policy: Policy
    backends: list[dict]
    ops: list[dict]  # per op: {"op": name, "<backend>": implementation or reason}
    plugin_errors: list[tuple[str, str]]

    def __str__(self) -> str:
        lines = [f"policy: backend={self.policy.backend} strict={self.policy.strict}", "", "backends:"]
        rows = [("backend", "device", "status", "detail")]
        for b in self.backends:
            rows.append((b["name"], b["device_type"], "available" if b["available"] else "unavailable", b["detail"]))
        lines += _table(rows)
        names = [b["name"] for b in self.backends if b["available"]]
        lines += ["", "ops (the implementation each available backend resolves to; "
                      "* = what the policy picks for inputs on that backend's device):"]
        rows = [("op", *names)]
        for o in self.ops:
            rows.append((o["op"], *[o[n] for n in names]))
        lines += _table(rows)
        for where, tb in self.plugin_errors:
            lines += ["", f"plugin {where} failed to load:", tb.rstrip()]
        return "\n".join(lines)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def explain() -> Explanation:
    """Every known backend with its availability and reason, and per op the implementation each
    backend resolves to (or why it would fall back to the reference). Activates nothing that is
    unavailable; activates available backends so their implementations are listed."""
    pol = current_policy()
    ops = contracts()
    brows = []
    for name, b in backends().items():
        p = probe(name)
        if p.available:
            try:
                activate(name)
            except BackendUnavailableError:
                p = probe(name)
        brows.append({"name": name, "device_type": device_type_of(name), "available": p.available,
                      "detail": p.detail, "packages": list(b.packages), "install_hint": b.install_hint,
                      "remote": b.remote, "auto": p.auto and b.auto_rank is not None})
    chosen: dict[str, str] = {}  # device type -> backend the policy picks
    for dev in AUTO_DEVICE_ORDER:
        if pol.backend == "auto":
            auto = _auto_backends(dev)
            if auto:
                chosen[dev] = auto[0]
        elif device_type_of(pol.backend) == dev:
            chosen[dev] = pol.backend
    orows = []
    for op_name in ops:
        row = {"op": op_name}
        for b in brows:
            if not b["available"]:
                row[b["name"]] = "-"
                continue
            cands = implementations(op_name, b["name"])
            cell = " | ".join(c.name.split(".", 1)[1] for c in cands) if cands else "reference (fallback)"
            if chosen.get(b["device_type"]) == b["name"]:
                cell += " *"
            row[b["name"]] = cell
        orows.append(row)
    return Explanation(pol, brows, orows, plugin_errors())


def _reset_for_tests(backends_too: bool = False) -> None:
    """Forget policy, probes and caches (tests only)."""
    global _global_policy
    _global_policy = None
    _probes.clear()
    _resolution_cache.clear()
    _warned.clear()
    _scoped_policy.set(None)


def iter_available(device_type: Optional[str] = None) -> Iterable[str]:
    for name in backends():
        if probe(name).available and (device_type is None or device_type_of(name) == device_type):
            yield name
