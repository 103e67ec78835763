"""A fake ``habana_frameworks`` for glue tests: the Gaudi ops the hpu bindings call, computed on
CPU tensors with the formulas vllm-gaudi's callers and reference tests rely on, and recorded with
their arguments (``Fake.calls``).

``torch.device("hpu")`` is torch's own in-tree type, so no fake device is possible (see
tests/fakes/__init__.py); the bindings are called directly on CPU tensors.
"""

from __future__ import annotations

import enum
import importlib.machinery
import types

import torch
import torch.nn.functional as F

from tests.fakes.torch_npu_fake import Call, require


class RotaryPosEmbeddingMode(enum.Enum):
    BLOCKWISE = 0  # rotate half (NeoX)
    PAIRWISE = 1  # interleaved pairs (GPT-J)


class Fake:
    """The fake modules (``.modules``, for sys.modules) and the fake ``torch.ops.hpu`` op."""

    def __init__(self):
        self.calls: list[Call] = []
        kernels = self._module("habana_frameworks.torch.hpex.kernels")
        kernels.RotaryPosEmbeddingMode = RotaryPosEmbeddingMode
        kernels.apply_rotary_pos_emb = self._recording(apply_rotary_pos_emb)
        self.modules = {name: self._module(name) for name in
                        ("habana_frameworks", "habana_frameworks.torch", "habana_frameworks.torch.core",
                         "habana_frameworks.torch.hpex")}
        self.modules[kernels.__name__] = kernels
        self.mixture_of_experts = self._recording(mixture_of_experts)

    @staticmethod
    def _module(name):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        mod.__path__ = []
        return mod

    def _recording(self, fn):
        def op(*args, **kwargs):
            self.calls.append(Call(fn.__name__, args, kwargs))
            return fn(*args, **kwargs)
        return op


def apply_rotary_pos_emb(p, cos, sin, position_ids, offset, mode):
    require(position_ids is None and offset == 0, "per-token tables: no position ids, offset 0")
    require(isinstance(mode, RotaryPosEmbeddingMode), f"mode must be a RotaryPosEmbeddingMode, got {mode!r}")
    require(p.dim() == 3 and tuple(cos.shape) == tuple(sin.shape) == (p.shape[0], 1, p.shape[2]),
             f"p [T, H, R] with cos/sin [T, 1, R], got {tuple(p.shape)} and {tuple(cos.shape)}")
    if mode is RotaryPosEmbeddingMode.BLOCKWISE:
        x1, x2 = torch.chunk(p, 2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        rotated = torch.stack((-p[..., 1::2], p[..., ::2]), dim=-1).flatten(-2)
    return p * cos + rotated * sin


def mixture_of_experts(*, hidden_states, expert_routing_table, router_weights, w12, w3, permuted_weights,
                       activation, experts_min, experts_max):
    require(hidden_states.dtype == torch.bfloat16 and router_weights.dtype == torch.bfloat16, "bf16 tokens/weights")
    require(expert_routing_table.dtype == torch.int64, "expert_routing_table int64")
    require(permuted_weights and activation == "silu", "modelled: [out, in] weights, silu")
    require(len(w12) == len(w3) == experts_max - experts_min + 1, "one w12/w3 per expert, experts_max inclusive")
    out = torch.zeros(hidden_states.shape, dtype=torch.float32)
    for t in range(hidden_states.shape[0]):
        for slot, e in enumerate(expert_routing_table[t].tolist()):
            gate, up = (hidden_states[t].float() @ w12[e - experts_min].float().t()).chunk(2, dim=-1)
            out[t] += router_weights[t, slot].float() * ((F.silu(gate) * up) @ w3[e - experts_min].float().t())
    return out.to(hidden_states.dtype)
