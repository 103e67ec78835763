"""MXFP4: the OCP Microscaling Formats v1.0 FP4 format, as apt_hal stores it.

Format
------
* A **block** is 32 consecutive elements along the last dimension (K) sharing one scale.
* An **element** is FP4 E2M1: sign bit, 2 exponent bits (bias 1), 1 mantissa bit. Codes 0..7
  are the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign (code 8 is -0). E2M1 has
  no Inf and no NaN.
* A **scale** is E8M0: an unsigned biased exponent, value 2^(s-127) for s in 0..254; s = 255
  (0xFF) is NaN. There is no zero and no Inf.
* **Packing**: two elements per uint8. Element ``2i`` is in the low nibble (bits 3..0) and
  element ``2i+1`` in the high nibble (bits 7..4) of byte ``i`` -- the order of PyTorch's
  ``float4_e2m1fn_x2``, ONNX's FLOAT4E2M1 and the gpt-oss checkpoints.
* A weight ``w`` of shape ``[..., K]`` is stored as ``packed`` uint8 ``[..., K/2]`` and
  ``scales`` uint8 ``[..., K/32]``. K must be a multiple of 32 (no implicit padding:
  :func:`quantize` raises; pad the weight yourself if you must, with zeros).

Quantization rule (bit-exact; the spec's, as torchao's default "FLOOR" mode)
--------------------------------------------------------------------------
For each block, computed in float32 (bf16 and fp16 inputs convert exactly):

1. ``amax`` = max |x| over the block.
2. If the block holds a NaN or an ±Inf: its scale is 0xFF (NaN) and its element codes are 0.
   (E2M1 cannot hold Inf; clamping it to ±6·2^e would be a silent wrong value. Pass
   ``nonfinite="raise"`` to get an error instead.)
3. If ``amax == 0``: the scale is the smallest, code 0 (2^-127), and every element is +0.
4. Otherwise ``shared_exp = floor(log2(amax)) - 2`` (2 is E2M1's largest exponent), clamped to
   [-127, 127]; the scale code is ``shared_exp + 127``. ``floor(log2(.))`` is read exactly off
   the float32 exponent (subnormal inputs included), never through ``log2`` in floating point.
5. Each element is ``x / 2^shared_exp`` rounded to the nearest E2M1 value, **ties to even**
   (to the code whose mantissa bit is 0), then **saturated** to ±6. Values in (6, 8)·2^shared_exp
   therefore clamp to ±6: the spec's rule, kept for bit compatibility. The sign of a value that
   rounds to zero is kept (-0 is code 8), as IEEE rounding does.

Dequantization: ``value = E2M1(code) * 2^(scale - 127)``; a 0xFF scale makes all 32 values NaN.
Every value is exact in float32 and bfloat16 except magnitudes >= 2^128 (scale codes 253-254 with
large elements, which quantizing a float32 never produces), which overflow to Inf. Dequantizing to
float16 rounds each value once: above 65504 to Inf, below 2^-14 into float16's subnormals, at or
below 2^-25 to 0.

Interoperability: :func:`to_torch_dtypes` / :func:`from_torch_dtypes` view the storage as
``torch.float4_e2m1fn_x2`` / ``torch.float8_e8m0fnu`` where the torch version has them; every
apt_hal function accepts either view.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Tuple

import torch

BLOCK = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF
# Magnitudes of the E2M1 codes 0..7; codes 8..15 are their negatives.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

HAS_TORCH_FP4 = hasattr(torch, "float4_e2m1fn_x2") and hasattr(torch, "float8_e8m0fnu")
DEQUANTIZE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def e2m1_table(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 16 values of the E2M1 codes, code order: a lookup table for decoding. Built once per
    (dtype, device) and shared -- read it, never write to it (a table built from a Python list on
    every call would also break CUDA-graph capture). While tracing (compile, export) it is built in
    the graph instead: a cached real tensor cannot mix with fake ones."""
    device = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return _e2m1_table.__wrapped__(dtype, device)
    return _e2m1_table(dtype, device)


@functools.lru_cache(maxsize=None)
def _e2m1_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.cat([mags, -mags]).to(dtype=dtype, device=device)


def as_uint8(t: torch.Tensor) -> torch.Tensor:
    """View packed elements or scales stored as torch's fp4/e8m0 dtypes as uint8 (no copy)."""
    if t.dtype == torch.uint8:
        return t
    if HAS_TORCH_FP4 and t.dtype in (torch.float4_e2m1fn_x2, torch.float8_e8m0fnu):
        return t.view(torch.uint8)
    raise TypeError(f"expected uint8, float4_e2m1fn_x2 or float8_e8m0fnu storage, got {t.dtype}")


def to_torch_dtypes(packed: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """View (packed, scales) as (``torch.float4_e2m1fn_x2``, ``torch.float8_e8m0fnu``)."""
    if not HAS_TORCH_FP4:
        raise RuntimeError(f"torch {torch.__version__} has no float4_e2m1fn_x2 / float8_e8m0fnu dtypes")
    return as_uint8(packed).view(torch.float4_e2m1fn_x2), as_uint8(scales).view(torch.float8_e8m0fnu)


def from_torch_dtypes(packed: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The uint8 views of torch-dtype storage (the inverse of :func:`to_torch_dtypes`)."""
    return as_uint8(packed), as_uint8(scales)


def _floor_log2(amax: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for positive finite float32 ``a``, exactly, subnormals included."""
    bits = amax.view(torch.int32)
    biased = (bits >> 23) & 0xFF
    normal = biased - 127
    # Subnormal: value = m * 2^-149 with m the 23-bit mantissa; floor(log2) = floor(log2(m)) - 149.
    mant = (bits & 0x7FFFFF).to(torch.float64)
    sub = torch.floor(torch.log2(mant.clamp_min(1))).to(torch.int32) - 149  # m < 2^23: exact in fp64
    return torch.where(biased == 0, sub, normal)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float64, exactly, for integer ``e`` in [-1022, 1023], built from its exponent bits.
    (torch.ldexp / torch.pow are not exact on every device: on CUDA they broke round-half-even ties.)"""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Codes 0..7 of |y| (float64, finite), round to nearest E2M1 magnitude, ties to even, saturate at 6."""
    a = y.abs()
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=a.dtype, device=a.device)
    # Code i+1 is chosen over code i above the midpoint, and at the midpoint when code i+1 is even.
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for i in range(7):
        take = (a > mids[i]) | ((a == mids[i]) & ((i + 1) % 2 == 0))
        code += take.to(torch.uint8)
    return code  # saturation: anything above 5 is code 7 (6.0)


def quantize(w: torch.Tensor, nonfinite: Literal["nan", "raise"] = "nan") -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., K]`` (float32, bfloat16 or float16; K a multiple of 32) to MXFP4.

    Returns ``(packed uint8 [..., K/2], scales uint8 [..., K/32])`` on ``w``'s device, by the
    rule in this module's docstring. ``nonfinite="raise"`` rejects NaN/Inf inputs instead of
    encoding their blocks as NaN.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"apt_hal.mxfp4.quantize: 'w' must be a tensor, got {type(w).__name__}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"apt_hal.mxfp4.quantize: 'w' must be float32, bfloat16 or float16, got {w.dtype}")
    if w.dim() == 0 or w.shape[-1] % BLOCK:
        raise ValueError(f"apt_hal.mxfp4.quantize: the last dimension of 'w' must be a multiple of {BLOCK}, "
                         f"got shape {tuple(w.shape)}; pad K with zeros to a multiple of {BLOCK}")
    if nonfinite not in ("nan", "raise"):
        raise ValueError(f"apt_hal.mxfp4.quantize: nonfinite must be 'nan' or 'raise', got {nonfinite!r}")
    lead, k = w.shape[:-1], w.shape[-1]
    x = w.detach().to(torch.float32).reshape(math.prod(lead), k // BLOCK, BLOCK)  # not -1: K may be 0
    finite = torch.isfinite(x)
    bad_block = ~finite.all(dim=-1)
    if nonfinite == "raise" and not x.is_meta and bad_block.any():
        raise ValueError(f"apt_hal.mxfp4.quantize: 'w' holds {int((~finite).sum())} NaN/Inf value(s)")
    x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    amax = x.abs().amax(dim=-1)
    zero_block = amax == 0
    shared = (_floor_log2(torch.where(zero_block, torch.ones_like(amax), amax)) - 2).clamp(-127, 127)
    shared = torch.where(zero_block, torch.full_like(shared, -127), shared)
    scale_code = (shared + E8M0_BIAS).to(torch.uint8)
    scale_code = torch.where(bad_block, torch.full_like(scale_code, E8M0_NAN), scale_code)

    # x / 2^shared is exact in float64 (shared >= -127, |x| < 2^128).
    y = x.to(torch.float64) * _pow2(-shared).unsqueeze(-1)
    codes = _round_e2m1(y) | (torch.signbit(y).to(torch.uint8) << 3)
    # NaN/Inf blocks and all-zero blocks (even of -0s) encode +0 elements, as the rules state.
    codes = torch.where((bad_block | zero_block).unsqueeze(-1), torch.zeros_like(codes), codes)
    codes = codes.reshape(*lead, k)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return packed, scale_code.reshape(*lead, k // BLOCK).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> E2M1 codes uint8 ``[..., K]`` (low nibble first)."""
    p = as_uint8(packed)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode MXFP4 ``(packed [..., K/2], scales [..., K/32])`` to ``dtype [..., K]`` exactly.

    A NaN scale (0xFF) makes its 32 values NaN. Computed in float32 (exact), then cast to
    ``dtype``, a floating dtype (float32, float64, bfloat16 or float16: an integer one has no NaN).
    """
    for name, t in (("packed", packed), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"apt_hal.mxfp4.dequantize: '{name}' must be a tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"apt_hal.mxfp4.dequantize: '{name}' must have at least 1 dimension, got a 0-dim tensor")
        fp4_storage = HAS_TORCH_FP4 and t.dtype in (torch.float4_e2m1fn_x2, torch.float8_e8m0fnu)
        if not (t.dtype == torch.uint8 or fp4_storage):
            raise TypeError(f"apt_hal.mxfp4.dequantize: '{name}' must be uint8 (or torch's float4_e2m1fn_x2 / "
                            f"float8_e8m0fnu storage), got {t.dtype}")
    if dtype not in DEQUANTIZE_DTYPES:
        raise TypeError(f"apt_hal.mxfp4.dequantize: 'dtype' must be one of "
                        f"{', '.join(str(d) for d in DEQUANTIZE_DTYPES)}, got {dtype!r}")
    if packed.device != scales.device:
        raise ValueError(f"apt_hal.mxfp4.dequantize: 'scales' is on {scales.device} but 'packed' is on {packed.device}")
    p, s = as_uint8(packed), as_uint8(scales)
    if p.shape[:-1] != s.shape[:-1] or p.shape[-1] * 2 != s.shape[-1] * BLOCK:
        raise ValueError(f"apt_hal.mxfp4.dequantize: 'packed' {tuple(p.shape)} and 'scales' {tuple(s.shape)} "
                         f"do not describe one [..., K] weight (need packed [..., K/2], scales [..., K/{BLOCK}])")
    vals = e2m1_table(torch.float32, p.device)[unpack_codes(p).long()]
    k = vals.shape[-1]
    vals = vals.reshape(*s.shape, BLOCK)
    scale = _pow2(s.to(torch.int32) - E8M0_BIAS).to(torch.float32)  # 2^-127 is a float32 subnormal: exact
    scale = torch.where(s == E8M0_NAN, torch.full_like(scale, float("nan")), scale)
    return (vals * scale.unsqueeze(-1)).reshape(*s.shape[:-1], k).to(dtype)
