"""What a conformance case is, and the helpers that build and place its inputs.

A :class:`Case` is data plus a small generator: ``make(generator, dtype) -> arguments``. It is a
*value* case (the backend's outputs are compared with the reference's) or an *error* case (the
call must raise, naming the argument at fault). Its ``features`` are the parts of the contract it
exercises beyond the basics; a backend's ``claims`` say which features, dtypes and ops it holds
itself to.

Inputs are generated on the CPU from a seed derived from the run's seed and the case id (so
``--case ID`` alone regenerates them), then :func:`place` copies them to the backend's device with
their exact layout -- shape, strides, storage offset, and which arguments share a storage -- so
every backend sees the same bytes in the same arrangement.

Each op's module (``cases_fp4``, ``cases_moe``, ``cases_rotary``, ``cases_paged``) defines its
:class:`OpSpec` objects: the op, how to call it and its reference, the names of its outputs, its
feature vocabulary and its cases.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, Mapping, Optional

import torch

from apt_hal.errors import ContractError

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the names claims, tolerances and reports use."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    dtype: torch.dtype  # the dtype of the op's main input: a row of the report's matrix
    name: str
    make: Callable[[torch.Generator, torch.dtype], dict]
    features: tuple[str, ...] = ()
    quick: bool = False  # part of the quick suite (--quick, CI)
    reduction: int = 1  # length of the longest reduction (K), for tolerances marked per_sqrt_k
    raises: Optional[str] = None  # error case: the error's message must contain this (the argument)
    error: type = ContractError  # error case: the exception type the contract specifies
    value_check: bool = False  # error case: found by a value check, run at check level "values"
    host_args: tuple[str, ...] = ()  # arguments kept on the host (cross-device copies)

    @property
    def id(self) -> str:
        return f"{self.op}/{dtype_name(self.dtype)}/{self.name}"

    @property
    def is_error(self) -> bool:
        return self.raises is not None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    call: Callable  # the public entry point: dispatches to the active backend
    reference: Callable  # the oracle, run on the CPU
    outputs: tuple[str, ...]  # names of the results, or of the mutated arguments when ``mutates``
    cases: Callable[[], list[Case]]
    mutates: bool = False
    features: tuple[str, ...] = ()


def op_specs() -> dict[str, OpSpec]:
    """Every op the suite covers, by name: the ops of ``apt_hal.ops.ALL_OPS`` and mxfp4_quantize."""
    from apt_hal.conformance import cases_fp4, cases_moe, cases_paged, cases_rotary

    specs = [*cases_fp4.SPECS, *cases_moe.SPECS, *cases_rotary.SPECS, *cases_paged.SPECS]
    return {s.name: s for s in specs}


def all_cases() -> list[Case]:
    return [c for s in op_specs().values() for c in s.cases()]


def variants(op: str, dtypes, name: str, make, quick_dtypes=(), **kw) -> list[Case]:
    """One case per dtype; those in ``quick_dtypes`` ("*": all) are in the quick suite."""
    return [Case(op, dt, name, make, quick="*" in quick_dtypes or dt in quick_dtypes, **kw) for dt in dtypes]


def strided_variants(base: Case, layouts) -> list[Case]:
    """Copies of ``base`` in which one tensor argument is :func:`spread`: one case per ``(argument,
    dims)`` of ``layouts`` (``dims``: how many leading dimensions are strided, None for all), each
    in the quick suite. Every backend is held to them: an operand's strides are part of its
    layout, which the contract's checks allow or reject, never an optional feature."""
    def variant(arg: str, dims: Optional[int]) -> Case:
        def make(g, dtype):
            args = base.make(g, dtype)
            return {**args, arg: spread(args[arg], dims)}

        where = "" if dims is None else f"_dims0-{dims - 1}" if dims > 1 else "_dim0"
        return dataclasses.replace(base, name=f"{base.name}_strided_{arg}{where}", make=make, quick=True)

    return [variant(arg, dims) for arg, dims in layouts]


# ---- inputs ---------------------------------------------------------------------------------


def seed_for(seed: int, case_id: str) -> int:
    """A per-case seed that depends only on the run's seed and the case id (stable everywhere)."""
    return zlib.crc32(f"{seed}:{case_id}".encode())


def generator(seed: int, case_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, case_id))


def randn(g: torch.Generator, shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def randint(g: torch.Generator, low: int, high: int, shape, dtype=torch.int64) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=g).to(dtype)


def random_bytes(g: torch.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    """Uniformly random bytes viewed as ``dtype``: for floats this includes NaNs with payloads,
    infinities, -0 and subnormals, which byte-moving ops must carry unchanged."""
    n = math.prod(shape) * dtype.itemsize
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)


EDGES = ("zeros", "subnormal", "largest", "nonfinite")


def edge_values(g: torch.Generator, shape, dtype: torch.dtype, kind: str, headroom: float = 4.0) -> torch.Tensor:
    """Values at the edges the float specs define, all of one magnitude so that a relative error
    over the whole tensor measures each of them:

    * ``zeros``: +0 and -0;
    * ``subnormal``: magnitudes in [1/4, 1) of the dtype's smallest normal;
    * ``largest``: magnitudes in [1/2, 1] of ``max / headroom`` (headroom leaves room for the op's
      arithmetic not to overflow);
    * ``nonfinite``: normal values with one NaN, one +Inf and one -Inf, in different eighths of the
      tensor (so, for the shapes the cases use, in different rows, heads and blocks, and some
      rows stay finite).
    """
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    u = torch.rand(shape, generator=g)
    fi = torch.finfo(dtype)
    if kind == "zeros":
        return (sign * 0.0).to(dtype)
    if kind == "subnormal":
        return (sign * (0.25 + 0.75 * u) * fi.tiny).to(dtype)
    if kind == "largest":
        return (sign * (0.5 + 0.5 * u) * (fi.max / headroom)).to(dtype)
    if kind == "nonfinite":
        x = torch.randn(shape, generator=g).reshape(-1)
        n = x.numel()
        x[n // 8], x[3 * n // 8 + 2], x[5 * n // 8 + 3] = float("nan"), float("inf"), float("-inf")
        return x.reshape(shape).to(dtype)
    raise ValueError(f"unknown edge kind {kind!r}; known: {', '.join(EDGES)}")


# Fills the gaps of spread tensors: as an index it is far out of range, as a float a large finite
# value, so a kernel that reads a gap (ignores a stride) gives a visibly wrong result.
GAP_BYTE = 0x5A


def spread(t: torch.Tensor, dims: Optional[int] = None) -> torch.Tensor:
    """``t``'s values in a new layout whose first ``dims`` dimensions (all when None) take every
    other element of a twice larger storage, as a column of a table or a slice does: a 1-D tensor
    gets stride 2, a 2-D one strides ``(4 * cols, 2)``."""
    dims = t.dim() if dims is None else dims
    shape = [2 * n if i < dims else n for i, n in enumerate(t.shape)]
    n_bytes = math.prod(shape) * t.element_size()
    big = torch.full((n_bytes,), GAP_BYTE, dtype=torch.uint8).view(t.dtype).reshape(shape)
    view = big[tuple(slice(None, None, 2) if i < dims else slice(None) for i in range(t.dim()))]
    view.copy_(t)
    return view


# ---- placing inputs on a device ---------------------------------------------------------------


def storage_elements(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``t`` as a 1-D tensor of ``t``'s dtype (an alias, no copy)."""
    return t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)


def place(args: Mapping[str, object], device: torch.device, host_args=()) -> dict:
    """Fresh copies of ``args`` on ``device`` (``host_args`` on the CPU) with identical layouts:
    each storage is copied whole, once, and every tensor is rebuilt on its copy with its own
    shape, strides and offset, so views stay views and arguments that share memory still do."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, a in args.items():
        if not isinstance(a, torch.Tensor):
            out[name] = a
            continue
        dev = torch.device("cpu") if name in host_args else device
        key = (a.untyped_storage().data_ptr(), a.untyped_storage().nbytes(), a.dtype, str(dev))
        if key not in copies:
            raw = storage_elements(a).view(torch.uint8)  # bytes: every dtype copies, NaN payloads too
            copies[key] = raw.to(dev, copy=True).view(a.dtype)
        out[name] = copies[key].as_strided(a.shape, a.stride(), a.storage_offset())
    return out
