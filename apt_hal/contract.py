"""Turn an annotated reference function into an apt_hal op.

:func:`contract` is applied to a contract's reference (a readable pure-PyTorch function whose
annotations are torch-schema types). It

* defines ``torch.ops.apt_hal.<name>`` with the schema inferred from those annotations, and
  registers one kernel under ``CompositeExplicitAutograd`` that checks the arguments and calls
  the implementation the registry selects: apt_hal's own dispatcher, valid for every dispatch key
  (CPU, CUDA, XPU, HPU, PrivateUse1) and for several implementations sharing one device;
* registers the fake (meta) function, so ``torch.compile(fullgraph=True)`` and ``torch.export``
  keep the op as one node;
* registers autograd for the ``differentiable`` arguments: the gradient is the vector-Jacobian
  product of the reference itself, recomputed in the backward pass. Backends accelerate forward;
  the spec defines the gradient;
* returns an :class:`Op` whose call is the public entry point. In eager mode, with plain tensors,
  no grad to record and no dispatch mode active, the call skips the torch dispatcher and calls
  the selected implementation directly (the dispatcher costs several microseconds per call).
"""

from __future__ import annotations

import contextvars
import inspect
import os
from typing import Any, Callable, Optional, Sequence

import torch

from apt_hal import registry
from apt_hal.errors import BackendCallError, ContractError

LIBRARY = torch.library.Library("apt_hal", "DEF")

_MISSING = object()
_in_reference_vjp: contextvars.ContextVar[bool] = contextvars.ContextVar("apt_hal_in_vjp", default=False)


def tracing() -> bool:
    """Whether tensors are symbolic now (torch.compile, torch.export, fake or functional tensors):
    code must then avoid data-dependent Python control flow such as ``.tolist()``."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


# True while apt_hal.graphs captures a device graph: nothing may read tensor values then.
capturing_graph: contextvars.ContextVar = contextvars.ContextVar("apt_hal_capturing_graph", default=False)


def value_checks_enabled() -> bool:
    """Whether checks that read tensor *values* (NaN, index ranges) may run now.

    They never run while tracing, while a device graph is captured (a replay reads no values on
    the host; the eager first call of the same step checked them), or inside the reference's
    recomputation for a gradient (the forward pass checked those values already); references run
    them otherwise.
    """
    return not (tracing() or capturing_graph.get() or _in_reference_vjp.get())


CHECK_LEVELS = ("none", "metadata", "values")


def _level_from_env() -> str:
    level = os.environ.get("APT_HAL_CHECKS", "metadata").strip() or "metadata"
    if level not in CHECK_LEVELS:
        raise ValueError(f"APT_HAL_CHECKS must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")
    return level


_check_level = _level_from_env()  # read once: os.environ costs more than a whole fast-path call


def set_checks(level: str) -> str:
    """How much every op call checks before a backend runs it; returns the previous level.

    ``"metadata"`` (default, also ``APT_HAL_CHECKS``): shape, dtype, device and layout, reading no
    tensor data. ``"values"``: also NaN and index ranges (on an accelerator this costs a device
    synchronisation per call). ``"none"``: no checks, for hot loops whose arguments were validated
    once (a decode loop); a bad argument then fails inside the backend, or silently. References
    check values whatever the level.
    """
    global _check_level
    if level not in CHECK_LEVELS:
        raise ValueError(f"apt_hal.set_checks: level must be one of {', '.join(CHECK_LEVELS)}, got {level!r}")
    previous, _check_level = _check_level, level
    return previous


class Op:
    """An op contract: ``op(*args)`` dispatches, ``op.reference`` is the oracle."""

    def __init__(self, reference: Callable, *, fake: Callable, check: Callable,
                 check_values: Optional[Callable] = None, mutates_args: Sequence[str] = (),
                 differentiable: Sequence[str] = (), device_args: Optional[Sequence[str]] = None):
        self.name = reference.__name__
        self.reference = reference
        self.check = check
        self.check_values = check_values
        self.fake = fake
        self.mutates_args = tuple(mutates_args)
        self.__doc__ = reference.__doc__
        self.__wrapped__ = reference

        sig = inspect.signature(reference)
        self._names = list(sig.parameters)
        self._index = {n: i for i, n in enumerate(self._names)}
        self._defaults = [p.default if p.default is not inspect.Parameter.empty else _MISSING
                          for p in sig.parameters.values()]
        self._n = len(self._names)
        self.__signature__ = sig
        tensor_params = [i for i, p in enumerate(sig.parameters.values()) if "Tensor" in str(p.annotation)]
        self._tensor_idx = tuple(tensor_params)
        self._device_idx = tuple(self._index[n] for n in device_args) if device_args else tensor_params[:1]
        self._diff_idx = tuple(self._index[n] for n in differentiable)

        self.schema = torch.library.infer_schema(reference, mutates_args=tuple(mutates_args))
        LIBRARY.define(self.name + self.schema)
        self.qualname = f"apt_hal::{self.name}"
        self.overload = getattr(torch.ops.apt_hal, self.name).default
        LIBRARY.impl(self.name, self._kernel, "CompositeExplicitAutograd")

        def _fake(*args, **kwargs):
            if kwargs or len(args) != self._n:
                args = self._bind(args, kwargs)
            check(*args)
            return fake(*args)

        torch.library.register_fake(self.qualname, _fake, lib=LIBRARY)
        if self._diff_idx:
            torch.library.register_autograd(self.qualname, self._backward, setup_context=self._setup_context,
                                            lib=LIBRARY)
        registry._register_contract(self)

    # ---- calling ------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != self._n:
            args = self._bind(args, kwargs)
        if torch.compiler.is_compiling():
            return self._traced_call(args)
        if not self._plain_eager(args):
            return self.overload(*args)
        return self._run(args)

    def _traced_call(self, args: tuple):
        # torch.export keeps the apt_hal op (portable, and what compile/ lowers). torch.compile may
        # trace into the backend's own traceable op (a triton_op) so Inductor sees the kernel; the
        # choice is fixed when the graph is traced, so choose the backend before compiling.
        # An op that writes into its arguments stays the apt_hal op, which torch functionalizes as
        # a custom op: the models write through views with gaps (the KV cache's pool[:, layer], q
        # and k sliced from one projection), and torch's functionalization of a Triton kernel's
        # writes copies such a view wrongly in inference mode (pytorch/pytorch#192227). On an
        # H100, a compiled decode step that traced into paged_write and rotary_ chose other tokens
        # than eager; with them opaque it generates eager's tokens (tests/test_generate.py).
        if not self.mutates_args and not self._needs_grad(args):
            target = _compile_target(self.name, self._device_type(args))
            if target:
                namespace, name = target.split("::")
                return getattr(getattr(torch.ops, namespace), name)(*args)
        return self.overload(*args)

    def _needs_grad(self, args: tuple) -> bool:
        if not self._diff_idx or not torch.is_grad_enabled():
            return False
        return any(args[i] is not None and args[i].requires_grad for i in self._diff_idx)

    def _run(self, args: tuple):
        if _check_level != "none":
            self.check(*args)
        device_type = self._device_type(args)
        if device_type == "meta":
            return self._meta_call(args)
        if _check_level == "values" and self.check_values is not None and value_checks_enabled():
            self.check_values(*args)
        try:
            return registry.select(self, device_type, args)(*args)
        except BackendCallError as e:
            return registry.after_failed_call(self, device_type, e)(*args)

    def _meta_call(self, args: tuple):
        # Meta tensors have shapes but no data: the result is the op's shape function, as for
        # torch's own ops; no backend runs and no value is checked.
        for i in self._tensor_idx:
            a = args[i]
            if isinstance(a, torch.Tensor) and not a.is_meta:
                raise ContractError(f"apt_hal.{self.name}: argument '{self._names[i]}' is on {a.device} but other "
                                    "arguments are on meta; all tensors must be on meta or none")
        return self.fake(*args)

    def _kernel(self, *args, **kwargs):
        # The dispatcher may drop trailing arguments that equal their defaults.
        if kwargs or len(args) != self._n:
            args = self._bind(args, kwargs)
        return self._run(args)

    def _plain_eager(self, args: tuple) -> bool:
        """Plain tensors, no dispatch or function mode, no gradient to record: skip the dispatcher."""
        if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
            return False
        grad = self._diff_idx and torch.is_grad_enabled()
        for i in self._tensor_idx:
            a = args[i]
            if a is None:
                continue
            if type(a) is not torch.Tensor:
                # Fake, functional and other tensor subclasses take the dispatcher; a non-tensor
                # stays here, where the contract's check names the argument.
                return not isinstance(a, torch.Tensor)
            if grad and a.requires_grad and i in self._diff_idx:
                return False  # autograd must record the op
        return True

    def _device_type(self, args: tuple) -> str:
        for i in self._device_idx:
            a = args[i]
            if a is not None and not a.is_cpu:
                return a.device.type
        return "cpu"

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        if len(args) > self._n:
            raise TypeError(f"{self.name}() takes {self._n} arguments, got {len(args)}")
        out = list(args) + [_MISSING] * (self._n - len(args))
        for k, v in kwargs.items():
            i = self._index.get(k)
            if i is None:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {k!r}")
            if i < len(args):
                raise TypeError(f"{self.name}() got multiple values for argument {k!r}")
            out[i] = v
        for i, v in enumerate(out):
            if v is _MISSING:
                if self._defaults[i] is _MISSING:
                    raise TypeError(f"{self.name}() missing required argument {self._names[i]!r}")
                out[i] = self._defaults[i]
        return tuple(out)

    # ---- autograd: the vjp of the reference -------------------------------------------------

    def _setup_context(self, ctx, inputs, output):
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*[inputs[i] for i in ctx.tensor_pos])
        outs = output if isinstance(output, tuple) else (output,)
        ctx.float_outputs = [o.is_floating_point() for o in outs]

    def _backward(self, ctx, *grads):
        args = list(ctx.args)
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            args[i] = t
        # Integer tensors (MXFP4 codes in a differentiable slot) have no gradient.
        diff = [i for i in self._diff_idx if isinstance(args[i], torch.Tensor) and args[i].is_floating_point()]

        def f(*diff_vals):
            a = list(args)
            for i, v in zip(diff, diff_vals):
                a[i] = v
            out = self.reference(*a)
            outs = out if isinstance(out, tuple) else (out,)
            return tuple(o for o in outs if o.is_floating_point())

        token = _in_reference_vjp.set(True)
        try:
            outs, vjp_fn = torch.func.vjp(f, *[args[i] for i in diff])
            float_grads = [g for g, is_float in zip(grads, ctx.float_outputs) if is_float]
            in_grads = vjp_fn(tuple(torch.zeros_like(o) if g is None else g for g, o in zip(float_grads, outs)))
        finally:
            _in_reference_vjp.reset(token)
        result: list[Any] = [None] * self._n
        for i, g in zip(diff, in_grads):
            result[i] = g
        return tuple(result)

    def __repr__(self) -> str:
        return f"<apt_hal op {self.name}{self.schema}>"


@torch._dynamo.assume_constant_result
def _compile_target(op_name: str, device_type: str) -> str:
    # Runs as plain Python when the graph is traced, so is_exporting() reads the real flag (torch
    # 2.11's Dynamo folds a traced is_exporting() to True even under torch.compile).
    if torch.compiler.is_exporting():
        return ""
    return registry.compile_target(op_name, device_type)


def contract(*, fake: Callable, check: Callable, check_values: Optional[Callable] = None,
             mutates_args: Sequence[str] = (), differentiable: Sequence[str] = (),
             device_args: Optional[Sequence[str]] = None) -> Callable[[Callable], Op]:
    """Decorator for a contract's reference function; see the module docstring."""

    def deco(reference: Callable) -> Op:
        return Op(reference, fake=fake, check=check, check_values=check_values, mutates_args=mutates_args,
                  differentiable=differentiable, device_args=device_args)

    return deco
