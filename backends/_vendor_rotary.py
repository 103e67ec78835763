"""Rotary helpers shared by the vendor bindings (npu, hpu) whose kernels compute
``x * cos + rotate(x) * sin`` with full-width cos/sin tables.

Both vendors' kernels take ``cos`` and ``sin`` as wide as the rotated part of the head (``R``),
laid out to match their rotation mode: NeoX "rotate half" repeats the ``R/2`` frequencies as
``[f_0 .. f_{R/2-1}, f_0 .. f_{R/2-1}]``; GPT-J "pairwise" repeats each one twice in place,
``[f_0, f_0, f_1, f_1, ..]``. The contract's cache row holds ``[cos(f_i).., sin(f_i)..]``.
"""

from __future__ import annotations

import torch


def cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at every position, float32 ``[B*S, R]``, in the layout of ``style``."""
    half = cos_sin_cache.shape[1] // 2
    rows = cos_sin_cache[positions.reshape(-1).long()]
    cos, sin = rows[:, :half], rows[:, half:]
    if style == "neox":
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


def rotated_part(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """A fresh contiguous float32 copy of ``x[..., :rotary_dim]``: the kernels compute in the
    contract's float32 and some update their input in place."""
    return x[..., :rotary_dim].to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def join(rotated: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The output head: the rotated part rounded once to ``x``'s dtype, then the pass-through
    dimensions of partial rotary unchanged."""
    rotated = rotated.reshape(*x.shape[:-1], rotated.shape[-1]).to(x.dtype)
    if rotated.shape[-1] == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., rotated.shape[-1]:]], dim=-1)


def bind(backend: str, module: str, package: str) -> str:
    """Register the rotary binding ``module`` (its ``rotary``, ``rotary_`` and ``supports``; rocm's
    aiter and xpu's vllm-xpu-kernels, whose kernels take the contract's cache as it is) for
    ``backend`` when its vendor library (pip name ``package``) loads; otherwise log and return why."""
    from apt_hal import registry
    from apt_hal.backends._probe import import_binding

    binding, why = import_binding(module, package)
    if binding is None:
        registry.log.info("apt_hal %s: %s rotary not bound: %s", backend, package, why)
        return why
    name = module.rsplit(".", 1)[1].removesuffix("_rotary")
    registry.register_impl("rotary", backend, binding.rotary, name=name, supports=binding.supports)
    registry.register_impl("rotary_", backend, binding.rotary_, name=name, supports=binding.supports)
    return ""
