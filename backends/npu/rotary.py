"""rotary / rotary_ on Ascend: npu_apply_rotary_pos_emb (q and k in one call) where the chip takes
the mode and width, else npu_rotary_mul once for q and once for k.

Argument mapping (docs/npu.md has the table): the style picks ``rotary_mode`` ("neox" -> "half",
"gptj" -> "interleave"); ``q[..., :R]`` and ``k[..., :R]`` are copied to float32 (the contract
computes in float32, and npu_apply_rotary_pos_emb updates its inputs in place) and reshaped to
BSND with the batch folded into the sequence, ``[1, B*S, H, R]``, because npu_rotary_mul's
interleave mode accepts cos/sin only as ``1S1D``; cos/sin are ``[1, B*S, 1, R]`` float32 from
:func:`apt_hal.backends._vendor_rotary.cos_sin`. Partial rotary (``R < D``): only the first ``R``
dimensions go to the kernel; the rest are appended unchanged.
"""

from __future__ import annotations

import torch
import torch_npu

from apt_hal.backends._vendor_rotary import cos_sin, join, rotated_part

NPU_MODES = {"neox": "half", "gptj": "interleave"}


def supports(chip, q, k, positions, cos_sin_cache, style) -> bool:
    r = cos_sin_cache.shape[1]
    mode = NPU_MODES.get(style)
    return mode is not None and (chip.fused_rotary(mode, r) or chip.rotary_mul(mode, r))


def rotary(chip, q, k, positions, cos_sin_cache, style):
    if q.numel() == 0 or k.numel() == 0:  # the kernels reject empty tensors
        return q.clone(memory_format=torch.contiguous_format), k.clone(memory_format=torch.contiguous_format)
    r = cos_sin_cache.shape[1]
    mode = NPU_MODES[style]
    tokens = positions.numel()
    cos, sin = (t.view(1, tokens, 1, r) for t in cos_sin(positions, cos_sin_cache, style))
    q_rot = rotated_part(q, r).view(1, tokens, q.shape[2], r)
    k_rot = rotated_part(k, r).view(1, tokens, k.shape[2], r)
    if chip.fused_rotary(mode, r):
        q_rot, k_rot = torch_npu.npu_apply_rotary_pos_emb(q_rot, k_rot, cos, sin, layout="BSND", rotary_mode=mode)
    else:
        q_rot = torch_npu.npu_rotary_mul(q_rot, cos, sin, rotary_mode=mode)
        k_rot = torch_npu.npu_rotary_mul(k_rot, cos, sin, rotary_mode=mode)
    return join(q_rot, q), join(k_rot, k)


def rotary_(chip, q, k, positions, cos_sin_cache, style):
    q_out, k_out = rotary(chip, q, k, positions, cos_sin_cache, style)
    q.copy_(q_out)
    k.copy_(k_out)
