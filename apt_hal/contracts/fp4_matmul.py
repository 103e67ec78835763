"""fp4_matmul: ``y = x @ dequantize(w)^T + bias`` with MXFP4 weights.

Arguments
---------
x : ``[..., K]`` float32, bfloat16 or float16; any leading shape (``M`` rows in all), any
    strides (implementations may copy a non-contiguous ``x``). ``K`` is a multiple of 32.
w_packed : ``[N, K/2]`` uint8 (or ``torch.float4_e2m1fn_x2``), contiguous: E2M1 codes, element
    ``2i`` of a row in the low nibble of byte ``i`` (see :mod:`apt_hal.mxfp4`).
w_scales : ``[N, K/32]`` uint8 (or ``torch.float8_e8m0fnu``), contiguous: one E8M0 scale per 32
    consecutive elements of a row along K; 0xFF is NaN.
bias : ``[N]`` in ``x``'s dtype, any stride (a column of a table, ``t[::2]``), or None.

Result
------
``[..., N]`` in ``x``'s dtype. Semantics: the exact MXFP4 values of ``w`` (see
:func:`apt_hal.mxfp4.dequantize`) multiplied by ``x`` with (at least) float32 accumulation,
``bias`` added, then one rounding to ``x``'s dtype. NaN and Inf in ``x``
propagate as in IEEE arithmetic; a NaN scale makes every output that uses its block NaN.
``M == 0`` gives an empty ``[..., N]`` result.

Errors (:class:`~apt_hal.errors.ContractError`): K not a multiple of 32, ``w_packed`` / ``w_scales``
shapes that do not match ``K`` and each other, wrong dtypes, tensors on different devices,
non-contiguous weights.

Gradient: with respect to ``x`` (and ``bias``): ``dx = dy @ dequantize(w)``; the packed weights
are constants (train in high precision, quantize with :func:`apt_hal.mxfp4.quantize`).

Backends may repack weights once at load time (``prepare_weights``, documented by the backend);
the contract's input is always this plain layout.
"""

from __future__ import annotations

from typing import Optional

import torch

from apt_hal import checks, mxfp4
from apt_hal.contract import contract

_OP = "fp4_matmul"
_W_DTYPES = (torch.uint8,) + ((torch.float4_e2m1fn_x2,) if mxfp4.HAS_TORCH_FP4 else ())
_S_DTYPES = (torch.uint8,) + ((torch.float8_e8m0fnu,) if mxfp4.HAS_TORCH_FP4 else ())


def _check(x, w_packed, w_scales, bias):
    # Written for speed as well as clarity: this runs on every eager call.
    checks.tensor(_OP, "x", x, dtypes=checks.FLOAT_DTYPES, min_ndim=1)
    checks.tensor(_OP, "w_packed", w_packed, dtypes=_W_DTYPES, ndim=2)
    checks.tensor(_OP, "w_scales", w_scales, dtypes=_S_DTYPES, ndim=2)
    k = x.shape[-1]
    n, half = w_packed.shape
    if k % mxfp4.BLOCK:
        checks.fail(_OP, f"the last dimension of 'x' (K={k}) must be a multiple of {mxfp4.BLOCK}")
    if half * 2 != k:
        checks.fail(_OP, f"argument 'w_packed' must have shape [N, K/2] = [N, {k // 2}] for K={k} from 'x', "
                         f"got {list(w_packed.shape)}")
    if w_scales.shape != (n, k // mxfp4.BLOCK):
        checks.fail(_OP, f"argument 'w_scales' must have shape [N, K/32] = {[n, k // mxfp4.BLOCK]}, "
                         f"got {list(w_scales.shape)}")
    if not w_packed.is_contiguous():
        checks.fail(_OP, "argument 'w_packed' must be contiguous")
    if not w_scales.is_contiguous():
        checks.fail(_OP, "argument 'w_scales' must be contiguous")
    if bias is not None:
        checks.tensor(_OP, "bias", bias, dtypes=(x.dtype,), ndim=1)
        if bias.shape[0] != n:
            checks.fail(_OP, f"argument 'bias' must have shape [N] = [{n}], got {list(bias.shape)}")
    checks.same_device(_OP, ("x", "w_packed", "w_scales", "bias"), (x, w_packed, w_scales, bias))


def _fake(x, w_packed, w_scales, bias):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


@contract(fake=_fake, check=_check, differentiable=("x", "bias"))
def fp4_matmul(x: torch.Tensor, w_packed: torch.Tensor, w_scales: torch.Tensor,
               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MXFP4-weight linear layer; the module docstring of apt_hal.contracts.fp4_matmul is the spec."""
    # float32, not float64: the reference is also every device's fallback, and some have no float64.
    w = mxfp4.dequantize(w_packed, w_scales, torch.float32)
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
