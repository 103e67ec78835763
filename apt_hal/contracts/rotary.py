"""rotary: apply rotary position embedding (RoPE) to queries and keys.

Every scaling variant (default, linear, dynamic NTK, YaRN, Llama 3.1, LongRoPE, Llama 4) only
changes the cos/sin cache and the attention factor; :mod:`apt_hal.rope` builds both. This op only
*applies* a cache, so one kernel serves every variant. Two scalings are outside this op: Llama 4's
NoPE-layer query temperature (:func:`apt_hal.rope.llama4_nope_temperature`) and DeepSeek's extra
softmax scale ``m(s, mscale_all_dim)^2``; the model applies them.

Arguments
---------
q : ``[B, S, Hq, D]`` float32, bfloat16 or float16 (token-major, as a projection's ``.view``
    produces; the flash-attention and vLLM convention). The last dimension must be contiguous;
    the others may be strided.
k : ``[B, S, Hk, D]``, same dtype, ``B``, ``S`` and ``D`` as ``q`` (``Hk`` may differ: GQA).
positions : ``[B, S]`` int32 or int64, each in ``[0, P)``, any strides.
cos_sin_cache : ``[P, R]`` float32, contiguous, ``R`` even, ``0 < R <= D``. Row ``p`` is
    ``[cos(p*f_0) .. cos(p*f_{R/2-1}), sin(p*f_0) .. sin(p*f_{R/2-1})]``, already multiplied by
    the variant's attention factor (YaRN, LongRoPE). ``R < D`` is partial rotary: dimensions
    ``R..D-1`` pass through unchanged.
style : ``"neox"`` (rotate-half: pairs ``(i, i + R/2)``; Llama, Mistral, Qwen, gpt-oss) or
    ``"gptj"`` (interleaved: pairs ``(2i, 2i+1)``; GPT-J, Llama 4, ChatGLM).

For a pair ``(a, b)`` with frequency index ``i`` at position ``p``:
``a' = a*cos - b*sin``, ``b' = b*cos + a*sin`` with ``cos = cache[p, i]``, ``sin = cache[p, R/2 + i]``,
computed in float32 and rounded once to the input dtype.

Result: ``(q_out, k_out)``, new tensors shaped and typed like ``q`` and ``k``. ``rotary_`` does
the same in place and returns nothing. Empty inputs (``B*S == 0``) give empty results.
``rotary_`` writes ``q`` and ``k``, so neither may have elements sharing memory (a stride-0,
``expand``-ed dimension) and they may not be one tensor; it checks every argument before it
writes either.

Errors (:class:`~apt_hal.errors.ContractError`): shapes, dtypes or devices that disagree, a
non-contiguous last dimension, ``R`` odd or larger than ``D``, an unknown ``style``, for
``rotary_`` a self-overlapping ``q`` or ``k``, and (value check) a position outside ``[0, P)``.
The reference always runs the value check; backends under ``apt_hal.set_checks("values")``. At
``"none"`` and ``"metadata"`` a backend reads no row outside the cache: a position outside
``[0, P)`` rotates by the identity (``cos = 1``, ``sin = 0``), leaving its token unchanged.

Gradient: with respect to ``q`` and ``k`` (a rotation by ``-angle``); the cache is a constant.
"""

from __future__ import annotations

from typing import Tuple

import torch

from apt_hal import checks
from apt_hal.contract import contract, tracing, value_checks_enabled

_OP = "rotary"
STYLES = ("neox", "gptj")


def _check(q, k, positions, cos_sin_cache, style):
    # Written for speed as well as clarity: this runs on every eager call.
    checks.tensor(_OP, "q", q, dtypes=checks.FLOAT_DTYPES, ndim=4)
    checks.tensor(_OP, "k", k, dtypes=(q.dtype,), ndim=4)
    b, s, _, d = q.shape
    kb, ks, _, kd = k.shape
    if kb != b or ks != s or kd != d:
        checks.fail(_OP, f"argument 'k' must have shape [B, S, Hk, D] = [{b}, {s}, Hk, {d}] to match 'q', "
                         f"got {list(k.shape)}")
    checks.tensor(_OP, "positions", positions, dtypes=checks.INDEX_DTYPES, ndim=2)
    if positions.shape != (b, s):
        checks.fail(_OP, f"argument 'positions' must have shape [B, S] = {[b, s]}, got {list(positions.shape)}")
    checks.tensor(_OP, "cos_sin_cache", cos_sin_cache, dtypes=(torch.float32,), ndim=2)
    r = cos_sin_cache.shape[1]
    if r % 2 or r == 0 or r > d:
        checks.fail(_OP, f"argument 'cos_sin_cache' must have an even width R with 0 < R <= head_dim={d}, got {r}")
    if style not in STYLES:
        checks.choice(_OP, "style", style, STYLES)
    if not q.is_contiguous() and q.stride(-1) != 1 and q.numel():
        checks.fail(_OP, "argument 'q' must be contiguous in its last dimension (head_dim)")
    if not k.is_contiguous() and k.stride(-1) != 1 and k.numel():
        checks.fail(_OP, "argument 'k' must be contiguous in its last dimension (head_dim)")
    if not cos_sin_cache.is_contiguous():
        checks.fail(_OP, "argument 'cos_sin_cache' must be contiguous")
    checks.same_device(_OP, ("q", "k", "positions", "cos_sin_cache"), (q, k, positions, cos_sin_cache))


def _check_values(q, k, positions, cos_sin_cache, style):
    checks.index_range(_OP, "positions", positions, 0, cos_sin_cache.shape[0])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """x float32 [B, S, H, D]; cos, sin float32 [B, S, 1, R/2]."""
    half = cos.shape[-1]
    r = 2 * half
    rot, rest = x[..., :r], x[..., r:]
    if style == "neox":
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


def _reference(q, k, positions, cos_sin_cache, style):
    if value_checks_enabled():
        _check_values(q, k, positions, cos_sin_cache, style)
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions.long()].unsqueeze(2)  # [B, S, 1, R]
    cos, sin = cs[..., :half], cs[..., half:]
    q_out = _rotate(q.float(), cos, sin, style).to(q.dtype)
    k_out = _rotate(k.float(), cos, sin, style).to(k.dtype)
    return q_out, k_out


def _fake(q, k, positions, cos_sin_cache, style):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@contract(fake=_fake, check=_check, check_values=_check_values, differentiable=("q", "k"))
def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
           style: str = "neox") -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, out of place; the module docstring of apt_hal.contracts.rotary is the spec."""
    return _reference(q, k, positions, cos_sin_cache, style)


def _fake_inplace(q, k, positions, cos_sin_cache, style):
    return None


def _check_inplace(q, k, positions, cos_sin_cache, style):
    _check(q, k, positions, cos_sin_cache, style)
    checks.writable("rotary_", "q", q)
    checks.writable("rotary_", "k", k)
    # Fake and meta tensors (tracing) have no data pointer: there only identity tells.
    if q is k or (q.numel() and not q.is_meta and not tracing() and q.data_ptr() == k.data_ptr()):
        checks.fail("rotary_", "arguments 'q' and 'k' are one tensor; rotating it in place twice is not this op")


@contract(fake=_fake_inplace, check=_check_inplace, check_values=_check_values, mutates_args=("q", "k"))
def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            style: str = "neox") -> None:
    """Rotary embedding in place on ``q`` and ``k``; same semantics as :func:`rotary`."""
    q_out, k_out = _reference(q, k, positions, cos_sin_cache, style)
    q.copy_(q_out)
    k.copy_(k_out)
