"""Argument checks shared by the contracts. Each failure names the op, the argument and what was
expected, and raises :class:`~apt_hal.errors.ContractError`.

Metadata checks (shape, dtype, device, layout) read no tensor data and run on every call.
Value checks (NaN, index ranges) read data, so they run in the references and, for backends,
only under ``APT_HAL_CHECKS=values`` (see :func:`apt_hal.set_checks`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from apt_hal.errors import ContractError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def fail(op: str, message: str) -> None:
    raise ContractError(f"apt_hal.{op}: {message}")


def _dtypes(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(op: str, name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None,
           ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    """``t`` is a tensor of one of ``dtypes`` with ``ndim`` (or at least ``min_ndim``) dimensions."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, f"argument '{name}' must have dtype {_dtypes(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        fail(op, f"argument '{name}' must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        fail(op, f"argument '{name}' must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")


def size(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """``t.shape[dim] == expected``; ``what`` says where the expectation comes from."""
    if t.shape[dim] != expected:
        fail(op, f"argument '{name}' must have size {expected} in dimension {dim} ({what}), got shape {tuple(t.shape)}")


def same_device(op: str, names: Sequence[str], tensors: Sequence) -> None:
    first = first_name = None
    for n, t in zip(names, tensors):
        if t is None:
            continue
        if first is None:
            first, first_name = t, n
        # is_cpu first: reading .device builds an object and costs several times more.
        elif t.is_cpu != first.is_cpu or (not t.is_cpu and t.device != first.device):
            fail(op, f"argument '{n}' is on {t.device} but '{first_name}' is on {first.device}; "
                     "all tensors must share one device")


def inner_contiguous(op: str, name: str, t: torch.Tensor, from_dim: int = -1) -> None:
    """Dimensions ``from_dim..`` are densely packed (the outer ones may be strided views)."""
    if t.is_contiguous():  # the common case, and much cheaper than reading the strides
        return
    shape, strides = t.shape, t.stride()
    first = from_dim if from_dim >= 0 else from_dim + t.dim()
    expected = 1
    for d in range(t.dim() - 1, first - 1, -1):
        if shape[d] != 1 and strides[d] != expected:
            fail(op, f"argument '{name}' must be contiguous in its last {t.dim() - first} dimension(s), "
                     f"got strides {strides} for shape {tuple(shape)}; call .contiguous()")
        expected *= shape[d]


def integer(op: str, name: str, value) -> None:
    """``value`` is a Python (or symbolic) int; a float or bool would silently change the result's dtype."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        fail(op, f"argument '{name}' must be an int, got {type(value).__name__} {value!r}")


def writable(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` (a mutated argument) has no two elements sharing memory, such as a stride-0
    (``expand``-ed) dimension: writes to it would race or overwrite one another."""
    # 1 means "overlaps for sure"; 2 ("too hard to tell", some strided views) is let through.
    if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
        fail(op, f"argument '{name}' is written in place, so its elements must not share memory; got strides "
                 f"{t.stride()} for shape {tuple(t.shape)} (an expanded tensor?); pass a .clone()")


def holds_values(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether value checks can read these tensors: meta tensors have a shape but no data."""
    return not any(t is not None and t.is_meta for t in tensors)


def choice(op: str, name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        fail(op, f"argument '{name}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def no_nan(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and holds_values(t) and torch.isnan(t).any():
        fail(op, f"argument '{name}' contains NaN ({int(torch.isnan(t).sum())} of {t.numel()} values), "
                 "which this contract does not accept")


def index_range(op: str, name: str, t: torch.Tensor, low: int, high: int, negative_ok: bool = False) -> None:
    """Every value of ``t`` is in ``[low, high)``, or negative when ``negative_ok`` (a skip marker)."""
    if not t.numel() or not holds_values(t):
        return
    # Compare against inclusive bounds clamped to the dtype: a bound outside it would wrap.
    info = torch.iinfo(t.dtype)
    bad = t > min(high - 1, info.max)
    if not negative_ok:
        bad |= t < max(low, info.min)
    if bad.any():
        v = t[bad][0].item()
        extra = " or negative" if negative_ok else ""
        fail(op, f"argument '{name}' must hold values in [{low}, {high}){extra}, found {v} "
                 f"({int(bad.sum())} value(s) out of range)")


def permutation(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` holds every value of ``[0, len(t))`` once."""
    n = t.shape[0]
    index_range(op, name, t, 0, n)
    if n and holds_values(t):
        repeated = torch.bincount(t.long(), minlength=n) != 1
        if repeated.any():
            fail(op, f"argument '{name}' must be a permutation of [0, {n}), but {int(repeated.sum())} value(s) "
                     f"occur zero or several times (the first such value: {int(repeated.nonzero()[0])})")
