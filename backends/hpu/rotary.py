"""rotary / rotary_ on Gaudi: ``habana_frameworks.torch.hpex.kernels.apply_rotary_pos_emb``.

Argument mapping (docs/hpu.md has the table), as vllm-gaudi calls it:
``apply_rotary_pos_emb(x, cos, sin, None, 0, mode)`` with ``x`` the rotated part of q or k as
float32 ``[B*S, H, R]`` (the contract computes in float32), ``cos``/``sin`` float32
``[B*S, 1, R]`` from :func:`apt_hal.backends._vendor_rotary.cos_sin`, no position ids (the tables
are already per token), offset 0, and ``RotaryPosEmbeddingMode.BLOCKWISE`` for "neox",
``PAIRWISE`` for "gptj". Partial rotary: the first ``R`` dimensions go to the kernel; the rest
are appended unchanged.
"""

from __future__ import annotations

from habana_frameworks.torch.hpex.kernels import RotaryPosEmbeddingMode, apply_rotary_pos_emb

from apt_hal.backends._vendor_rotary import cos_sin, join, rotated_part

HPU_MODES = {"neox": RotaryPosEmbeddingMode.BLOCKWISE, "gptj": RotaryPosEmbeddingMode.PAIRWISE}


def rotary(q, k, positions, cos_sin_cache, style):
    r = cos_sin_cache.shape[1]
    tokens = positions.numel()
    cos, sin = (t.view(tokens, 1, r) for t in cos_sin(positions, cos_sin_cache, style))
    mode = HPU_MODES[style]
    q_rot = apply_rotary_pos_emb(rotated_part(q, r).view(tokens, q.shape[2], r), cos, sin, None, 0, mode)
    k_rot = apply_rotary_pos_emb(rotated_part(k, r).view(tokens, k.shape[2], r), cos, sin, None, 0, mode)
    return join(q_rot, q), join(k_rot, k)


def rotary_(q, k, positions, cos_sin_cache, style):
    q_out, k_out = rotary(q, k, positions, cos_sin_cache, style)
    q.copy_(q_out)
    k.copy_(k_out)
