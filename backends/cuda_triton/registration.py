"""One launcher, both registrations: each cuda-triton op is written once, as a launcher, and
:func:`kernel_op` makes of it

- the ``apt_hal_triton::<op>`` ``torch.library.triton_op`` that torch.compile traces into (its
  kernels launched through ``torch.library.wrap_triton``, so Inductor sees them; for an op that
  writes into its arguments, only when called directly: ``apt_hal.contract.Op`` keeps those
  opaque under torch.compile), and
- the cuda-triton implementation of the op (its kernels launched directly: no dispatcher hop),
  registered with ``traceable="apt_hal_triton::<op>"``.

A launcher takes the contract's parameters (names, order and defaults; an unannotated one takes
the contract's type) and, keyword-only, ``launch``: what turns a ``@triton.jit`` kernel into the
object launched as ``launch(kernel)[grid](...)``. Any other keyword-only parameter is an option
for direct callers (tuning sweeps, tests) that both registrations leave at its default. The
registry checks both schemas against the contract when :func:`kernel_op` registers them. The
launcher stays reachable as the implementation's ``__wrapped__`` (tests launch stand-in kernels).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from apt_hal import impl_schema
from apt_hal.registry import register_impl

NAMESPACE = "apt_hal_triton"


def direct(kernel):
    """The eager ``launch``: the kernel itself (``torch.library.wrap_triton`` is the traced one)."""
    return kernel


def kernel_op(op) -> Callable[[Callable], Callable]:
    """Decorator (or ``kernel_op(op)(launcher)``): register ``launcher`` for the op contract ``op``
    as described in the module docstring; returns the registered eager implementation."""

    def register(launcher: Callable) -> Callable:
        signature = inspect.signature(launcher, eval_str=True)
        launch = signature.parameters.get("launch")
        if launch is None or launch.kind != inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"the cuda-triton launcher {launcher.__qualname__} of {op.name} needs a keyword-only "
                            "'launch' parameter (the function that turns a kernel into what is launched)")
        contract_parameters = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(launcher)
        def eager(*args, **kwargs):
            return launcher(*args, **kwargs, launch=direct)

        @functools.wraps(launcher)
        def traced(*args, **kwargs):
            return launcher(*args, **kwargs, launch=torch.library.wrap_triton)

        eager.__signature__ = signature.replace(parameters=contract_parameters)  # type: ignore[attr-defined]
        # triton_op infers its schema from the signature, so the contract's types fill the gaps.
        traced.__signature__ = impl_schema.typed_signature(eager, op.reference)  # type: ignore[attr-defined]
        qualname = f"{NAMESPACE}::{op.name}"
        torch.library.triton_op(qualname, traced, mutates_args=op.mutates_args)
        register_impl(op, "cuda-triton", eager, name="triton", traceable=qualname)
        return eager

    return register
