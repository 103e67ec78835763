"""rotary / rotary_ through Intel's ``vllm-xpu-kernels``: ``torch.ops._C.rotary_embedding``,
the SYCL kernel vLLM's XPU platform calls (its schema, read from the wheel's ``_C.abi3.so``:
``rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size,
Tensor cos_sin_cache, bool is_neox)``).

Argument mapping (docs/xpu.md has the table): ``positions`` flattened to ``[T]`` (``T = B*S``);
``query``/``key`` the contract's ``[B, S, H, D]`` as ``[T, H*D]`` views, rotated in place;
``head_size`` D; ``cos_sin_cache`` unchanged in layout (``[P, R]``, cos then sin halves, the
kernel rotates the first R dimensions of each head: partial rotary) but in q's dtype, as vLLM
passes it; ``is_neox`` True for NeoX, False for GPT-J. Importing this module loads the library
(``vllm_xpu_kernels._C`` registers the op): the xpu backend does it inside a probe.
"""

from __future__ import annotations

import torch
import vllm_xpu_kernels._C  # noqa: F401  (registers torch.ops._C.*)


def supports(q, k, positions, cos_sin_cache, style="neox"):
    """The kernel takes [T, H*D] views of contiguous q and k on an Intel GPU."""
    return q.device.type == "xpu" and q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype


def rotary_(q, k, positions, cos_sin_cache, style="neox"):
    tokens = positions.numel()
    torch.ops._C.rotary_embedding(positions.reshape(tokens), q.view(tokens, -1), k.view(tokens, -1), q.shape[3],
                                  cos_sin_cache.to(q.dtype), style == "neox")


def rotary(q, k, positions, cos_sin_cache, style="neox"):
    q_out, k_out = q.clone(), k.clone()
    rotary_(q_out, k_out, positions, cos_sin_cache, style)
    return q_out, k_out
