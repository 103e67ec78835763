"""A fake "npu" device for glue tests: torch's PrivateUse1 backend renamed "npu", in Python.

Each npu tensor is a wrapper (``NpuTensor``) around a CPU tensor; one boxed fallback for the
whole PrivateUse1 key runs every aten op on the wrapped CPU tensors and wraps the results, so
``tensor.to("npu")``, ``.cpu()``, indexing, matmul and in-place ops all work. Wrappers always
report contiguous strides and no storage offset, so a view op whose CPU result has other strides
or an offset (a slice of the last dimension, ``x[1:]``) returns a contiguous copy instead of a
view: writes through such a view are lost. The code under test writes only through whole
tensors and indexing (``x[idx] = v``, ``copy_``), which alias correctly.

Out-of-place ops built on ``out=`` variants that resize a zero-size output (``arange``,
``logsumexp``) need kernels of their own: a wrapper's size cannot change. ``arange`` has one.

A process can register one PrivateUse1 backend, once: call :func:`install` in a subprocess.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend


class _DeviceModule:
    """What ``torch.npu`` answers."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def get_device_name(device=None) -> str:
        return "fake npu (CPU)"

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass


class NpuTensor(torch.Tensor):
    """An npu tensor: the metadata of an npu tensor, the data of ``self.cpu_data``."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results stay what the fallback made

    @staticmethod
    def __new__(cls, cpu_data: torch.Tensor):
        t = torch._C._acc.create_empty_tensor(cpu_data.shape, cpu_data.dtype)
        t.__class__ = cls
        t.cpu_data = cpu_data
        return t


def _unwrap(x):
    if isinstance(x, NpuTensor):
        return x.cpu_data
    if isinstance(x, torch.device) and x.type == "npu":
        return torch.device("cpu")
    return x


def _scalars_as_tensors(op, args: tuple) -> tuple:
    """The boxed call turns wrapped Python numbers (``x % 3``) back into numbers; an overload that
    takes a Tensor there needs them as 0-dim tensors again, typed as torch types Python numbers."""
    def fix(value, argument):
        if isinstance(value, (bool, int, float)) and isinstance(argument.type, torch.TensorType):
            dtype = (torch.bool if isinstance(value, bool) else torch.int64 if isinstance(value, int)
                     else torch.get_default_dtype())
            return torch.tensor(value, dtype=dtype)
        return value
    return tuple(fix(v, a) for v, a in zip(args, op._schema.arguments)) + args[len(op._schema.arguments):]


def _returns_view(op) -> bool:
    returns = op._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def _as_reported(t):
    """A CPU view laid out as its wrapper reports (contiguous, offset 0): itself or a copy."""
    if not isinstance(t, torch.Tensor) or (t.is_contiguous() and t.storage_offset() == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _fallback(op, *args, **kwargs):
    if op is torch.ops.aten._copy_from.default:  # copies between devices: (src, dst, non_blocking)
        src, dst = args[0], args[1]
        (dst.cpu_data if isinstance(dst, NpuTensor) else dst).copy_(_unwrap(src))
        return dst
    cpu_args, cpu_kwargs = tree_map(_unwrap, (_scalars_as_tensors(op, args), kwargs))
    out = op(*cpu_args, **cpu_kwargs)
    if _returns_view(op):
        out = tree_map(_as_reported, out)
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "npu":
        return out  # e.g. _to_copy to the CPU
    same = {id(c): a for a, c in zip(args, cpu_args) if isinstance(a, NpuTensor)}  # in-place ops return self
    return tree_map(lambda o: same.get(id(o), NpuTensor(o)) if isinstance(o, torch.Tensor) else o, out)


def _on_cpu_then_wrapped(factory):
    def kernel(*args, **kwargs):
        return NpuTensor(factory(*args, **{**kwargs, "device": torch.device("cpu")}))
    return kernel


# Factories whose composite kernels fill a zero-size out= tensor (arange): a wrapper's size cannot
# change after creation, so they get kernels of their own.
_FACTORIES = ("arange", "arange.start", "arange.start_step")
_libraries = []


def install() -> None:
    """Register the fake device as torch's "npu" (once per process)."""
    if _libraries:
        return
    _setup_privateuseone_for_python_backend("npu", backend_module=_DeviceModule())
    fallback, aten = torch.library.Library("_", "IMPL"), torch.library.Library("aten", "IMPL")
    fallback.fallback(_fallback, dispatch_key="PrivateUse1")
    for name in _FACTORIES:
        base, _, overload = name.partition(".")
        aten_op = getattr(getattr(torch.ops.aten, base), overload or "default")
        aten.impl(name, _on_cpu_then_wrapped(aten_op), "PrivateUse1")
    _libraries.extend((fallback, aten))
