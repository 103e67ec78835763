"""Fakes of the vendor libraries the rocm and xpu bindings call, for glue tests on CPU tensors:
AMD's ``aiter`` (``rope_cached_positions_2c_fwd_inplace``) and Intel's ``vllm_xpu_kernels``
(``torch.ops._C.rotary_embedding``). Each computes the rotation its callers in vLLM rely on, in
float32, enforces the constraints a binding could get wrong (raising ValueError naming them) and
records its arguments (``calls``)."""

from __future__ import annotations

import importlib.machinery
import types

import torch

from tests.fakes.torch_npu_fake import Call, require


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x [..., R] float32 rotated with cos/sin [..., R/2] (pairs (i, i+R/2) for NeoX, (2i, 2i+1) for GPT-J)."""
    if neox:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


class FakeAiter:
    def __init__(self):
        self.calls: list[Call] = []
        self.module = _module("aiter")
        self.module.rope_cached_positions_2c_fwd_inplace = self.rope_cached_positions_2c_fwd_inplace

    def rope_cached_positions_2c_fwd_inplace(self, x, y, cos, sin, positions, rotate_style, reuse_freqs_front_part,
                                             nope_first):
        self.calls.append(Call("rope_cached_positions_2c_fwd_inplace", (x, y, cos, sin, positions, rotate_style),
                               dict(reuse_freqs_front_part=reuse_freqs_front_part, nope_first=nope_first)))
        require(x.dim() == y.dim() == 4, "x and y are [S, B, H, D]")
        require(tuple(positions.shape) == tuple(x.shape[:2]) == tuple(y.shape[:2]), "positions are [S, B]")
        require(cos.dtype == sin.dtype == x.dtype, "cos and sin must have the dtype of x")
        require(reuse_freqs_front_part and cos.shape[-1] * 2 == x.shape[-1], "cos holds D/2 frequencies")
        require(not nope_first and rotate_style in (0, 1), "rotate_style 0 (NeoX) or 1 (GPT-J), rope first")
        rows = positions.long()
        c = cos.reshape(cos.shape[0], -1)[rows].unsqueeze(2).float()
        s = sin.reshape(sin.shape[0], -1)[rows].unsqueeze(2).float()
        for t in (x, y):
            t.copy_(_rotate(t.float(), c, s, rotate_style == 0))


class FakeVllmXpu:
    def __init__(self):
        self.calls: list[Call] = []
        self.modules = {"vllm_xpu_kernels": _module("vllm_xpu_kernels"),
                        "vllm_xpu_kernels._C": _module("vllm_xpu_kernels._C")}

    def rotary_embedding(self, positions, query, key, head_size, cos_sin_cache, is_neox):
        self.calls.append(Call("rotary_embedding", (positions, query, key, head_size, cos_sin_cache, is_neox), {}))
        require(positions.dim() == 1 and query.dim() == key.dim() == 2, "positions [T], query and key [T, H*D]")
        require(query.shape[0] == key.shape[0] == positions.shape[0], "one row per token")
        require(query.shape[1] % head_size == 0 and key.shape[1] % head_size == 0, "rows are whole heads")
        require(cos_sin_cache.dtype == query.dtype, "cos_sin_cache in the dtype of query")
        r = cos_sin_cache.shape[1]
        cs = cos_sin_cache[positions.long()].float().unsqueeze(1)
        for t in (query, key):
            heads = t.view(t.shape[0], -1, head_size)
            heads[..., :r] = _rotate(heads[..., :r].float(), cs[..., :r // 2], cs[..., r // 2:], is_neox).to(t.dtype)
