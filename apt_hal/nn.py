"""MXFP4 weight-only linear layers.

:class:`MXFP4Linear` stands in for an ``nn.Linear``: its weight is stored as MXFP4 (4.25 bits per
weight, see :mod:`apt_hal.mxfp4`) and applied with :func:`apt_hal.ops.fp4_matmul`, so the active
backend's kernel serves it. :func:`convert_model_to_mxfp4` swaps a model's ``nn.Linear`` layers for it::

    from apt_hal.nn import convert_model_to_mxfp4
    model = convert_model_to_mxfp4(model)                   # every Linear but lm_head
    model = convert_model_to_mxfp4(model, include="mlp")    # only the Linears inside an "mlp" module

The quantized weights are constants (inference, or training the rest of the model): gradients
flow to the input and the bias only, as the fp4_matmul contract states.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from apt_hal import mxfp4, ops

__all__ = ["MXFP4Linear", "convert_model_to_mxfp4"]

_QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _incompatibility(in_features: int) -> Optional[str]:
    if in_features % mxfp4.BLOCK:
        return f"in_features={in_features} is not a multiple of {mxfp4.BLOCK} (the MXFP4 block size)"
    return None


def _why_not_convertible(linear: nn.Linear) -> Optional[str]:
    if type(linear) is not nn.Linear:
        return f"{type(linear).__qualname__} is a subclass of nn.Linear"
    if linear.weight.dtype not in _QUANTIZABLE_DTYPES:
        return f"weight dtype {linear.weight.dtype} is not float32, bfloat16 or float16"
    return _incompatibility(linear.in_features)


class MXFP4Linear(nn.Module):
    """``y = x @ W^T + bias`` with ``W`` stored as MXFP4.

    Buffers ``weight_packed`` uint8 ``[out_features, in_features/2]`` and ``weight_scales`` uint8
    ``[out_features, in_features/32]`` (the layout of :func:`apt_hal.mxfp4.quantize`); ``bias`` is
    an optional parameter. The output has the input's dtype, so the bias is cast to it: the layer
    has no compute dtype of its own. ``in_features`` must be a multiple of 32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        why = _incompatibility(in_features)
        if why:
            raise ValueError(f"MXFP4Linear: {why}; pad the weight with zeros or keep this layer in nn.Linear")
        self.in_features = in_features
        self.out_features = out_features
        # Zero codes under the smallest scale: a fresh layer computes exactly 0 (+ bias).
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, in_features // mxfp4.BLOCK,
                                                          dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "MXFP4Linear":
        """Quantize ``linear``'s weight (float32, bfloat16 or float16) by the MXFP4 rule; the bias is copied."""
        why = _incompatibility(linear.in_features)
        if why:
            raise ValueError(f"MXFP4Linear.from_linear: {why}")
        if linear.weight.dtype not in _QUANTIZABLE_DTYPES:
            raise TypeError(f"MXFP4Linear.from_linear: the weight must be float32, bfloat16 or float16, "
                            f"got {linear.weight.dtype}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        packed, scales = mxfp4.quantize(w.detach())
        layer.weight_packed.copy_(packed)
        layer.weight_scales.copy_(scales)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ops.fp4_matmul(x, self.weight_packed, self.weight_scales, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=mxfp4")


def _patterns(value: Union[None, str, Iterable[str]], name: str) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)  # one pattern, not an iterable of one-letter patterns
    patterns = tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"convert_model_to_mxfp4: '{name}' must be a string or strings, got {value!r}")
    return patterns


def _matches(qualified_name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a glob pattern matches a run of consecutive dotted components of the name, so that
    a pattern can name the layer or a module containing it, in full or by its trailing part:
    ``"lm_head"`` matches ``model.lm_head`` and ``"layers.0"`` matches ``model.layers.0.mlp.up``,
    while ``"lm_head"`` does not match ``lm_head_norm``."""
    parts = qualified_name.split(".")
    runs = [".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(run, p) for p in patterns for run in runs)


def convert_model_to_mxfp4(model: nn.Module, *, include: Union[None, str, Iterable[str]] = None,
                           exclude: Union[None, str, Iterable[str]] = ("lm_head",),
                           min_features: int = 0) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by :class:`MXFP4Linear`, in place; returns ``model``.

    A layer is converted when its qualified name matches a pattern of ``include`` (``None``: every
    layer) and none of ``exclude``, and both its ``in_features`` and ``out_features`` are at least
    ``min_features``. Patterns are globs (:mod:`fnmatch`) matched against every run of consecutive
    dotted components of the qualified name, so one names the layer or a module that contains it:
    ``"lm_head"``, ``"mlp"``, ``"layers.0"``, ``"*.self_attn.*_proj"``.

    Selected layers that cannot be converted stay as they are and are reported in one
    ``UserWarning`` naming each layer and the reason: ``in_features`` not a multiple of 32, a weight
    dtype MXFP4 cannot quantize, or a subclass of ``nn.Linear`` (its forward or its users, such as
    ``nn.MultiheadAttention`` reading ``out_proj.weight``, may need the dense weight). A Linear
    shared by several parents becomes one shared MXFP4Linear. The model itself is never replaced,
    only modules inside it.
    """
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    converted: dict[int, MXFP4Linear] = {}  # id(Linear) -> its replacement, so sharing survives
    skipped: list[str] = []
    # remove_duplicate=False: a Linear held in several places is listed under each of its names.
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not isinstance(module, nn.Linear):
            continue
        if include_p is not None and not _matches(name, include_p):
            continue
        if exclude_p and _matches(name, exclude_p):
            continue
        if min(module.in_features, module.out_features) < min_features:
            continue
        why = _why_not_convertible(module)
        if why:
            skipped.append(f"{name}: {why}")
            continue
        if id(module) not in converted:
            converted[id(module)] = MXFP4Linear.from_linear(module)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, converted[id(module)])
    if skipped:
        warnings.warn("convert_model_to_mxfp4 left these layers in nn.Linear:\n  " + "\n  ".join(skipped),
                      UserWarning, stacklevel=2)
    return model
