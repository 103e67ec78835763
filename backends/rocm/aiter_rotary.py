"""rotary / rotary_ through AMD's aiter (PyPI ``amd-aiter``; the PyPI name ``aiter`` is an
unrelated asyncio package): ``aiter.rope_cached_positions_2c_fwd_inplace``, the HIP kernel
vLLM's ROCm path calls.

Argument mapping (docs/rocm.md has the table), as vLLM calls it:
``rope_cached_positions_2c_fwd_inplace(q, k, cos, sin, positions, rotate_style,
reuse_freqs_front_part=True, nope_first=False)`` with ``q``/``k`` the rotated part of the heads,
``[1, T, H, R]`` views of the contract's ``[B, S, H, D]`` (``T = B*S``, the first ``R`` of ``D``);
``cos``/``sin`` the two halves of the contract's ``cos_sin_cache`` ``[P, R]`` as ``[P, 1, 1, R/2]``
in q's dtype (aiter requires it; the contract rounds once from float32, so bf16 results may
differ in the last bit); ``positions`` ``[1, T]``; ``rotate_style`` 0 for NeoX, 1 for GPT-J;
``reuse_freqs_front_part=True`` because the cache holds R/2 frequencies.
Importing this module imports aiter: the rocm backend does it inside a probe.
"""

from __future__ import annotations

from aiter import rope_cached_positions_2c_fwd_inplace

ROTATE_STYLE = {"neox": 0, "gptj": 1}


def supports(q, k, positions, cos_sin_cache, style="neox"):
    """aiter's kernel takes views of whole heads of contiguous q and k on an AMD GPU."""
    return q.is_cuda and q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype


def rotary_(q, k, positions, cos_sin_cache, style="neox"):
    r = cos_sin_cache.shape[1]
    tokens = positions.numel()
    cos, sin = (half.to(q.dtype).reshape(-1, 1, 1, r // 2) for half in cos_sin_cache.chunk(2, dim=1))
    rope_cached_positions_2c_fwd_inplace(
        q.view(1, tokens, q.shape[2], q.shape[3])[..., :r], k.view(1, tokens, k.shape[2], k.shape[3])[..., :r],
        cos, sin, positions.reshape(1, tokens), ROTATE_STYLE[style],
        reuse_freqs_front_part=True, nope_first=False)


def rotary(q, k, positions, cos_sin_cache, style="neox"):
    q_out, k_out = q.clone(), k.clone()
    rotary_(q_out, k_out, positions, cos_sin_cache, style)
    return q_out, k_out
