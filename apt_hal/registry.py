"""Backends, implementations and the policy that picks one implementation per op call.

Vocabulary
----------
* A **backend** is a small declaration (:class:`Backend`): a name, the torch device type its
  implementations take, a cheap ``probe()`` that imports nothing heavy, and the module that
  registers its implementations when the backend is activated. Several backends may share one
  device type (``cuda-triton`` and ``rocm`` both take torch's ``"cuda"`` tensors). A probe runs in
  a daemon thread with a time limit (``APT_HAL_PROBE_TIMEOUT`` seconds, default
  :data:`DEFAULT_PROBE_TIMEOUT_S`); one that overruns makes its backend unavailable.
* An **implementation** is a function with the schema of an op contract's reference, registered
  for ``(op, backend)`` with :func:`impl`, optionally with a per-call ``supports`` predicate.
  Several implementations of one op on one backend are tried in registration order.
* The **policy** says which backend serves a call: :class:`use` sets it for the process or, as a
  context manager, for a block only (a ``ContextVar``, so threads and asyncio tasks are isolated);
  ``APT_HAL_BACKEND`` and ``APT_HAL_STRICT`` seed it. ``"auto"`` serves each call with the
  available backend of lowest ``auto_rank`` among those running on the inputs' device; the
  built-in declarations rank CUDA > HPU > NPU > XPU > CPU, and the best available backend overall
  gives :func:`apt_hal.device_type`.
* When the chosen backend cannot serve a call (no implementation, ``supports`` declined, inputs
  on another device), the contract's reference runs on the inputs' device and a warning says so
  once per reason; under ``strict=True`` an :class:`~apt_hal.errors.OpNotImplementedError` is
  raised instead. Nothing falls back silently.

Out-of-tree backends are found through the entry-point group ``apt_hal.backends``: each entry
point names a :class:`Backend` (or a zero-argument callable returning one), importable without
the vendor stack. A plugin that fails to load, or claims a name already declared, is reported by
:func:`plugin_errors` and :func:`apt_hal.explain` and otherwise ignored.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import logging
import math
import os
import threading
import traceback
import warnings
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

from apt_hal import impl_schema
from apt_hal.errors import (
    BackendUnavailableError,
    OpNotImplementedError,
    PluginError,
    UnknownBackendError,
)

log = logging.getLogger("apt_hal")

ENTRY_POINT_GROUP = "apt_hal.backends"
REFERENCE = "reference"  # the pseudo-backend name of every contract's own reference
# Generous: a CUDA probe initialises the driver, which takes seconds on a multi-GPU host.
DEFAULT_PROBE_TIMEOUT_S = 10.0


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
    packages: tuple[str, ...] = ()  # pip distributions it uses; conformance reports record their versions
    install_hint: str = ""
    # Order under "auto", lower first, across device types too: the best available backend decides
    # apt_hal.device_type(). None: never chosen automatically.
    auto_rank: Optional[int] = None
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


_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_origins: dict[str, str] = {}  # backend name -> "built-in" or the entry point that declared it
_plugin_errors: list[tuple[str, str]] = []  # (entry point, traceback or reason)
_discovered = False
_probes: dict[str, Probe] = {}
_probe_lock = threading.Lock()
_overrun_probes: dict[str, tuple[threading.Thread, float]] = {}  # name -> (probe thread, its time limit)
_activated: dict[str, Optional[str]] = {}  # backend -> None when fine, else the traceback
_impls: dict[str, list[Implementation]] = {}  # op name -> implementations, registration order
_contracts: dict[str, Any] = {}  # op name -> apt_hal.contract.Op
_resolution_cache: dict[tuple, "_Resolution"] = {}
_warned: set[tuple] = set()


def _forget_resolutions() -> None:
    """Registrations changed: the memoised choice per (op, device type, policy) may be stale."""
    _resolution_cache.clear()


def register_backend(backend: Backend, origin: str = "built-in") -> None:
    """Declare a backend. Two declarations of one name are an error, whoever makes them."""
    _discover()  # so that a name taken by a built-in or a plugin is known to be taken
    with _lock:
        if backend.name == REFERENCE:
            raise PluginError(f"the backend name {REFERENCE!r} is reserved for the contracts' references")
        if backend.name in _backends:
            first = _origins[backend.name]
            raise PluginError(f"two backends claim the name {backend.name!r}: {first} and {origin}; "
                              f"the first, from {first}, is kept")
        _backends[backend.name] = backend
        _origins[backend.name] = origin
        _forget_resolutions()


def unregister_backend(name: str) -> None:
    """Remove a declaration and its implementations (tests declare stand-in backends)."""
    with _lock:
        del _backends[name], _origins[name]
        _activated.pop(name, None)
        _probes.pop(name, None)
        for entries in _impls.values():
            entries[:] = [i for i in entries if i.backend != name]
        _forget_resolutions()


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
            _load_plugin(ep)


def _load_plugin(ep) -> None:
    where = f"entry point {ep.name!r} ({ep.value})"
    try:
        obj = ep.load()
        decl = obj() if callable(obj) and not isinstance(obj, Backend) else obj
        if not isinstance(decl, Backend):
            raise TypeError(f"{where} gave {type(decl).__name__}, expected apt_hal.Backend")
        register_backend(decl, origin=where)
    except PluginError as e:  # a name clash: the registry's own stack says nothing more
        problem = f"PluginError: {e}\n"
    except Exception:
        problem = traceback.format_exc()
    else:
        return
    _plugin_errors.append((where, problem))
    log.error("apt_hal: backend plugin %s failed to load:\n%s", where, problem)
    warnings.warn(f"apt_hal: backend plugin {where} failed to load: {problem.strip().splitlines()[-1]} "
                  "(see apt_hal.explain())", RuntimeWarning, stacklevel=5)


def backends() -> dict[str, Backend]:
    """Every declared backend by name (built-ins first, then plugins)."""
    _discover()
    return dict(_backends)


def plugin_errors() -> list[tuple[str, str]]:
    """Plugins that failed to load or clashed with a declared name: (entry point, traceback or reason)."""
    _discover()
    return list(_plugin_errors)


def unknown_backend_error(name: str, also: Sequence[str] = ()) -> UnknownBackendError:
    """The error for a name no backend declares: the closest known names, then all of them.

    ``also`` lists the other values the caller accepts there (``"auto"`` for a policy).
    """
    _discover()
    known = list(_backends) + list(also)
    close = [k for k in known if k.startswith(name) and name] if name else []
    close += [k for k in difflib.get_close_matches(name, known, n=3, cutoff=0.6) if k not in close]
    suggestion = ""
    if close:
        quoted = [repr(k) for k in close[:3]]
        suggestion = " did you mean " + (quoted[0] if len(quoted) == 1
                                         else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
    others = f" (or {', '.join(repr(a) for a in also)})" if also else ""
    return UnknownBackendError(f"unknown backend {name!r};{suggestion} known: {', '.join(_backends)}{others}")


def get_backend(name: str) -> Backend:
    _discover()
    try:
        return _backends[name]
    except KeyError:
        raise unknown_backend_error(name) from None


def probe_timeout() -> float:
    """Seconds a probe may take: ``APT_HAL_PROBE_TIMEOUT`` or :data:`DEFAULT_PROBE_TIMEOUT_S`."""
    raw = os.environ.get("APT_HAL_PROBE_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_PROBE_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"APT_HAL_PROBE_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return seconds


def _timed_out(seconds: float) -> Probe:
    return Probe(False, f"probe timed out after {seconds:g} s")


def _run_probe(b: Backend) -> Probe:
    """Call ``b.probe()`` in a daemon thread, waiting at most :func:`probe_timeout` seconds.

    A probe that overran is never waited for again while it still runs; its backend stays
    unavailable until it returns and the backend is probed again.
    """
    overrun = _overrun_probes.get(b.name)
    if overrun is not None:
        thread, seconds = overrun
        if thread.is_alive():
            return _timed_out(seconds)
        del _overrun_probes[b.name]
    seconds = probe_timeout()
    answer: list[Probe] = []

    def run() -> None:
        try:
            p = b.probe()
            if not isinstance(p, Probe):
                p = Probe(False, f"probe returned {type(p).__name__}, expected apt_hal.Probe")
        except Exception as e:  # a probe that crashes is a reason, not a crash of the caller
            p = Probe(False, f"probe raised {type(e).__name__}: {e}")
        answer.append(p)

    thread = threading.Thread(target=run, name=f"apt_hal probe {b.name}", daemon=True)
    thread.start()
    thread.join(seconds)
    if not answer:
        _overrun_probes[b.name] = (thread, seconds)
        log.warning("apt_hal: the probe of backend %r did not return within %g s", b.name, seconds)
        return _timed_out(seconds)
    return answer[0]


def probe(name: str, refresh: bool = False) -> Probe:
    """The backend's probe answer, memoised (probes are cheap but not free). Never raises for a
    declared backend; a probe that does not return in time answers "probe timed out after N s"."""
    b = get_backend(name)
    if not refresh and name in _probes:
        return _probes[name]
    with _probe_lock:
        if refresh or name not in _probes:
            p = _run_probe(b)
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
    hint when the backend cannot run here, or with the traceback when its import fails (an
    implementation whose ``traceable`` op is missing or has another schema fails it too).
    """
    b = get_backend(name)
    if name not in _activated:
        p = probe(name)
        if not p.available:
            hint = f" To use it: {b.install_hint}" if b.install_hint else ""
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {p.detail}.{hint}")
        with _lock:
            if name not in _activated:  # another thread may have finished while this one waited
                _import_implementations(b)
    if _activated[name] is not None:
        raise BackendUnavailableError(f"backend {name!r} failed to activate:\n{_activated[name]}")


def _import_implementations(b: Backend) -> None:
    """Import ``b``'s implementation module, check its traceable ops, and record the outcome."""
    name = b.name
    try:
        importlib.import_module(b.implementations)
        for entry in [i for entries in _impls.values() for i in entries if i.backend == name]:
            if entry.traceable:
                _check_traceable(entry, deferred=False)
    except Exception:
        _activated[name] = traceback.format_exc()
        _probes.pop(name, None)
        return
    _activated[name] = None
    _forget_resolutions()


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
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``; see :func:`register_impl`."""

    def deco(fn):
        register_impl(op, backend, fn, name=name, supports=supports, traceable=traceable)
        return fn

    return deco


def register_impl(op, backend: str, fn: Callable, name: Optional[str] = None,
                  supports: Optional[Callable[..., bool]] = None, traceable: Optional[str] = None) -> Implementation:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (an op contract or its name).

    ``fn`` must have the contract's schema: its parameters named, ordered and defaulted as the
    reference's, and every annotation it has (parameters, return) the same torch-schema type as
    the reference's; an unannotated parameter is compared by name and default only. A mismatch is
    a TypeError naming both schemas. ``supports``, if given, takes the same arguments and returns
    False for calls this implementation does not handle (a dtype it lacks, a size it is not tuned
    for); the next implementation, or the reference, then serves the call. ``traceable`` names a
    torch op (``"namespace::name"``) with the same schema and semantics that ``torch.compile`` can
    trace into (e.g. the ``torch.library.triton_op`` the implementation launches); without it the
    compiled graph calls the ``apt_hal`` op, which dispatches at run time. Its schema is checked
    now, or, if the op is not defined yet and the backend not yet activated, at its activation.
    """
    op_name = op if isinstance(op, str) else op.name
    contract = contracts().get(op_name)
    if contract is None:
        raise KeyError(f"unknown op {op_name!r}; known: {', '.join(contracts())}")
    if backend != REFERENCE:
        get_backend(backend)  # unknown names raise
    full = f"{backend}.{name or fn.__name__}"
    _check_signature(contract, full, fn)
    with _lock:
        if any(i.name == full for i in _impls[op_name]):
            raise ValueError(f"an implementation named {full!r} of {op_name} is already registered")
        entry = Implementation(op_name, backend, full, fn, supports, traceable)
        if traceable:
            _check_traceable(entry, deferred=backend not in _activated)
        _impls[op_name].append(entry)
        _forget_resolutions()
    return entry


def _check_signature(contract, full: str, fn: Callable) -> None:
    want = list(inspect.signature(contract.reference).parameters)
    got = list(inspect.signature(fn).parameters)
    if got != want:
        raise TypeError(f"implementation {full} of {contract.name} has parameters {got}; "
                        f"the contract's are {want}")
    schema = impl_schema.implementation_schema(fn, contract.reference, contract.mutates_args)
    why = impl_schema.difference(impl_schema.parse(contract.schema), impl_schema.parse(schema))
    if why:
        raise TypeError(f"implementation {full} of {contract.name} does not match the contract: {why}. "
                        f"Implementation: {schema}; contract: {contract.schema} "
                        "(unannotated parameters take the contract's types)")


def _check_traceable(entry: Implementation, deferred: bool) -> None:
    """``entry.traceable`` must be a torch op with the contract's schema. Until its backend is
    activated, an op not defined yet (its module defines it further down) is checked at activation."""
    schema = impl_schema.traceable_schema(entry.traceable)
    if schema is None:
        if deferred:
            return
        raise TypeError(f"implementation {entry.name} of {entry.op} names traceable={entry.traceable!r}, "
                        "which is not a defined torch op")
    contract = _contracts[entry.op]
    why = impl_schema.difference(impl_schema.parse(contract.schema), schema)
    if why:
        raise TypeError(f"the traceable op {entry.traceable} of implementation {entry.name} does not match "
                        f"the contract of {entry.op}: {why}. Traceable op: {schema}; "
                        f"contract: {entry.op}{contract.schema}")


def unregister_impl(entry: Implementation) -> None:
    """Remove an implementation (tests register deliberately broken ones and take them away)."""
    with _lock:
        _impls[entry.op].remove(entry)
        _forget_resolutions()


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
# Per thread: how to apply the newest use(...) that was neither entered nor applied yet.
_unentered = threading.local()
_n_unentered = 0  # such use(...) objects in all threads; 0 spares current_policy() a lookup


def _env_policy() -> Policy:
    name = os.environ.get("APT_HAL_BACKEND", "auto").strip() or "auto"
    strict = os.environ.get("APT_HAL_STRICT", "0").strip().lower() in ("1", "true", "yes")
    pol = Policy(name, strict)
    _check_policy(pol, source="APT_HAL_BACKEND")
    return pol


def _check_policy(pol: Policy, source: str) -> None:
    """A policy's backend must be "auto" or one that can run here (activating it now)."""
    if pol.backend == "auto":
        _log_auto_probes()
        return
    if pol.backend not in backends():
        error = unknown_backend_error(pol.backend, also=("auto",))
        raise UnknownBackendError(f"{source}: {error}" if source else str(error)) from None
    try:
        activate(pol.backend)
    except BackendUnavailableError as e:
        if not source:
            raise
        raise BackendUnavailableError(f"{source}: {e}") from None


def _log_auto_probes() -> None:
    for name in backends():
        p = probe(name)
        log.info("apt_hal auto: %-13s %s: %s", name, "available" if p.available else "unavailable", p.detail)


def current_policy() -> Policy:
    pol = _scoped_policy.get()
    if pol is not None:
        return pol
    if _n_unentered:
        _apply_unentered_use()
    if _global_policy is None:
        _set_global_policy(_env_policy(), only_if_unset=True)
    return _global_policy


def _set_global_policy(pol: Policy, only_if_unset: bool = False) -> None:
    global _global_policy
    with _lock:
        if not (only_if_unset and _global_policy is not None):
            _global_policy = pol


def _apply_unentered_use() -> None:
    """This thread's newest use(...) was not entered by now, so it was a plain call: apply it."""
    apply = getattr(_unentered, "apply", None)
    if apply is not None:
        _unentered.apply = None
        apply()


def _apply_use(pol: Policy) -> None:
    global _n_unentered
    with _lock:
        _n_unentered -= 1
    _set_global_policy(pol)


class use:
    """Choose the backend: ``apt_hal.use("npu")`` for the process, ``with apt_hal.use("npu"):`` for a block.

    ``"auto"`` serves each call with the best available backend for its inputs' device. A named
    backend is checked at once: if it is unknown or cannot run here, a
    :class:`~apt_hal.errors.BackendError` says why (and how to install it). ``strict=True`` turns
    every fallback to the reference into an error.

    The ``with`` form never touches the process-wide policy, not even for an instant, so blocks in
    concurrent threads cannot change it: it sets a ``ContextVar`` on entry and resets it on exit.
    Whether a call is a plain statement is unknown when ``use(...)`` runs, so the process-wide
    policy changes when the result is known not to be entered: when it is dropped (at once, for a
    plain statement), or when this thread next reads the policy (an op call,
    ``apt_hal.device_type()``, ``apt_hal.explain()``) or calls ``use(...)``, whichever comes first.
    A ``use`` object entered after that still scopes its block, and leaves the process-wide policy
    as it was applied.
    """

    def __init__(self, backend: str = "auto", *, strict: bool = False):
        global _n_unentered
        pol = Policy(backend, strict)
        _check_policy(pol, source="")
        self.policy = pol
        self._token = None
        _apply_unentered_use()  # an earlier use() of this thread takes effect before this one
        self._apply = weakref.finalize(self, _apply_use, pol)
        self._apply.atexit = False
        with _lock:
            _n_unentered += 1
        _unentered.apply = self._apply

    def __enter__(self):
        global _n_unentered
        if self._apply.detach() is not None:  # not applied: it never will be
            with _lock:
                _n_unentered -= 1
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


def auto_backends(device_type: Optional[str] = None) -> list[str]:
    """The available backends "auto" may choose, best (lowest ``auto_rank``) first; only those on
    ``device_type`` if given. Ties keep declaration order (built-ins, then plugins)."""
    found = []
    for name, b in backends().items():
        p = probe(name)
        if p.available and p.auto and b.auto_rank is not None:
            if device_type is None or device_type_of(name) == device_type:
                found.append((b.auto_rank, name))
    return [n for _, n in sorted(found, key=lambda rank_name: rank_name[0])]


def _resolve(op_name: str, device_type: str, pol: Policy) -> _Resolution:
    if pol.backend == "auto":
        names = auto_backends(device_type)
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
    if bdev != device_type and not get_backend(b).remote:  # a remote executor takes host copies of any device's tensors
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


def after_failed_call(op, device_type: str, error: BaseException) -> Callable[..., Any]:
    """What serves a call whose implementation raised :class:`BackendCallError`: the reference,
    with a warning once per reason, or under ``strict=True`` the error itself."""
    pol = current_policy()
    if pol.strict:
        raise error
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    _warn_once((op.name, device_type, pol.backend, "failed", reason),
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


def _reset_for_tests() -> None:
    """Forget policy, probes and caches (tests only)."""
    global _global_policy
    _apply_unentered_use()
    _global_policy = None
    _probes.clear()
    _resolution_cache.clear()
    _warned.clear()
    _scoped_policy.set(None)
