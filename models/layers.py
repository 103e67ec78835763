"""The layers of every APT model, written only against the HAL.

Rotary goes through ``apt_hal.ops.rotary``, MoE FFNs through ``apt_hal.ops.moe_dispatch``, the KV
cache through ``apt_hal.ops.paged_write`` / ``paged_gather``; MXFP4 linear layers (``apt_hal.nn``)
go through ``apt_hal.ops.fp4_matmul``. The active backend serves each of them.

Tensors are token-major: activations ``[B, S, d]``, queries and keys ``[B, S, heads, head_dim]``
(the rotary contract's layout), transposed to ``[B, heads, S, head_dim]`` only for attention.

Attention masks are boolean with **True = attend**, shaped ``[B, 1, S, L]``. They are built from
positions, not indices: a query at position ``p`` sees a valid key at position ``k`` when
``k <= p`` (causal) and ``p - k < window`` (sliding window). So one rule serves a padded batch,
a training sequence and a decode step reading the paged cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from apt_hal import mxfp4, ops
from apt_hal import rope as rope_lib
from apt_hal.contract import tracing
from apt_hal.models.config import ModelConfig


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 and rounded once to the input's dtype
    (``F.rms_norm``: one fused kernel where the device has one)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


class RotaryTable:
    """The rotary op's cos/sin cache for one :class:`apt_hal.rope.RopeConfig`, built once per device.

    Deliberately not a module buffer: ``model.to(torch.bfloat16)`` would round it, and the rotary
    contract takes float32 (in bf16, thousands of positions collapse onto a few hundred values).
    ``dynamic`` and ``longrope`` use their frequencies for ``seq_len=None`` (see apt_hal.rope).
    """

    def __init__(self, config: rope_lib.RopeConfig):
        self.config = config
        self._tables: dict = {}

    def on(self, device: torch.device) -> torch.Tensor:
        table = self._tables.get(device)
        if table is None:
            # A normal tensor even when first needed inside generate's inference mode: an inference
            # tensor could not be used by training afterwards.
            with torch.inference_mode(False):
                table = rope_lib.cos_sin_cache(self.config, device=device)
            if not tracing():  # a table made while tracing is a fake tensor: never keep it
                self._tables[device] = table
        return table


# --------------------------------------------------------------------------------------------
# What the attention layers of one forward pass share
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class KVStep:
    """One forward pass's access to a paged KV cache (made by ``generate.PagedKVCache.step``);
    inference only (keys are rotated in place).

    ``pool`` ``[num_blocks, n_layers, block_size, 2, kv_heads, head_dim]`` is the store's device
    pool; layer ``i``'s cache is the paged pool ``pool[:, i]``, whose items are a token's keys and
    values side by side ``[2, kv_heads, head_dim]``, as the fused projection produces them.
    ``slot_mapping`` ``[B*S]``: where each new token goes (-1: a padding token, not written).
    ``block_table`` ``[B, M]``: each sequence's blocks (-1: unused). ``positions`` ``[B, S]``: the
    new tokens' positions. ``lengths`` ``[B]``: tokens cached per sequence after this step.
    ``fresh``: nothing was cached before this step (a prefill), so attention can use the new keys
    directly instead of reading them back. ``cross`` keeps a seq2seq decoder's cross-attention
    keys and values of the encoder output, computed at the first step and reused.
    """

    pool: torch.Tensor
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    fresh: bool
    cross: dict = dataclasses.field(default_factory=dict)

    def update(self, layer: int, kv: torch.Tensor) -> tuple:
        """Write this step's keys and values ``kv [B, S, 2*kv_heads, head_dim]`` (keys first) into
        the cache in one write; return the keys and values ``[B, L, kv_heads, head_dim]`` to attend
        to: these (``L = S``), or in one gather every cached token (``L = M*block_size``)."""
        b, s, _, dim = kv.shape
        cache = self.pool[:, layer]
        items = kv.reshape(b * s, 2, -1, dim)
        ops.paged_write(cache, items.to(cache.dtype), self.slot_mapping)
        if not self.fresh:
            items = ops.paged_gather(cache, self.block_table).flatten(1, 2).to(kv.dtype)  # [B, L, 2, Hk, D]
        items = items.view(b, -1, *items.shape[-3:])
        return items[:, :, 0], items[:, :, 1]

    def key_positions(self) -> tuple:
        """Positions and validity ``[B, M*block_size]`` of the cached keys: slot ``j`` holds position ``j``."""
        n = self.block_table.shape[1] * self.pool.shape[2]
        pos = torch.arange(n, device=self.pool.device).expand(self.block_table.shape[0], n)
        return pos, pos < self.lengths[:, None]


@dataclasses.dataclass
class PastKV:
    """One forward pass over keys and values passed in and returned whole: the past/present
    convention of exported graphs (optimum's layout), a drop-in for :class:`KVStep`.

    ``past`` holds each layer's ``(key, value)`` of the earlier tokens, ``[B, kv_heads, P,
    head_dim]`` (``P`` may be 0: a prefill). ``valid`` ``[B, P+S]``: True = real token, over the
    earlier and the new tokens (padding anywhere, left or right). ``positions`` ``[B, S]``: the new
    tokens' positions. After the pass, ``present[i]`` is layer ``i``'s ``(key, value)`` over all
    ``P+S`` tokens. Cached keys are at the position that ``valid`` gives them: the count of real
    tokens before each (see :func:`default_positions`).
    """

    past: list
    valid: torch.Tensor
    positions: torch.Tensor
    present: dict = dataclasses.field(default_factory=dict)
    cross: dict = dataclasses.field(default_factory=dict)
    fresh = False  # keys are always read back from the concatenated cache

    def update(self, layer: int, kv: torch.Tensor) -> tuple:
        """Append this step's keys and values ``kv [B, S, 2*kv_heads, head_dim]`` (keys first) to
        layer ``layer``'s past; return all of them ``[B, P+S, kv_heads, head_dim]``."""
        key_new, value_new = kv.transpose(1, 2).chunk(2, dim=1)  # [B, Hk, S, D] each
        past_key, past_value = self.past[layer]
        key, value = torch.cat([past_key, key_new], dim=2), torch.cat([past_value, value_new], dim=2)
        self.present[layer] = (key, value)
        return key.transpose(1, 2), value.transpose(1, 2)

    def key_positions(self) -> tuple:
        """Positions and validity ``[B, P+S]`` of the keys attended to: the count of real tokens
        before each key (padding keys, never attended to, may get -1)."""
        # Counted in float32, exact below 2^24 tokens: an exported graph then needs no integer
        # CumSum or Clip, which some runtimes lack (TensorRT's CumSum is float-only).
        return self.valid.float().cumsum(1).long() - 1, self.valid


def default_positions(valid: Optional[torch.Tensor], shape: tuple, device: torch.device) -> torch.Tensor:
    """Token positions: ``0..S-1``, or with a padding mask the count of real tokens before each,
    so a left-padded sequence gets the positions it would have unpadded (padding gets 0)."""
    if valid is None:
        return torch.arange(shape[1], device=device).expand(shape)
    # Counted in float32 (exact below 2^24 tokens) as PastKV.key_positions does: TensorRT's CumSum and
    # Clip are float-only.
    return (valid.float().cumsum(1) - 1).clamp(min=0).long()


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, causal: bool,
                   window: Optional[int]) -> torch.Tensor:
    """Boolean ``[B, 1, S, L]``, True = attend: valid keys, at or before the query (causal), within
    ``window`` positions of it (sliding window)."""
    allowed = k_valid[:, None, :].expand(-1, q_pos.shape[1], -1)
    if causal:
        back = q_pos[:, :, None] - k_pos[:, None, :]  # how far back each key is
        allowed = allowed & (back >= 0)
        if window is not None:
            allowed = allowed & (back < window)
    # A row with nothing to attend to (only padding queries have one) attends to every key: some
    # SDPA backends return NaN for an empty row, and that row's output is never used.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


class AttentionBatch:
    """Query positions, keys' positions and validity, the rotary table, the KV cache step and the
    encoder output (seq2seq) that every attention layer of one forward pass uses. Masks are built
    once per distinct window."""

    def __init__(self, shape: tuple, valid: Optional[torch.Tensor], rotary: torch.Tensor, *, causal: bool = True,
                 kv: Optional[KVStep] = None, memory: Optional[torch.Tensor] = None,
                 memory_valid: Optional[torch.Tensor] = None):
        device = rotary.device
        self.rotary, self.causal, self.kv = rotary, causal, kv
        self.positions = kv.positions if kv is not None else default_positions(valid, shape, device)
        if kv is not None and not kv.fresh:
            self.key_pos, self.key_valid = kv.key_positions()
        else:
            self.key_pos = self.positions
            self.key_valid = valid if valid is not None else torch.ones(shape, dtype=torch.bool, device=device)
        # Without padding or cache, the mask is the plain causal one: SDPA's is_causal needs none.
        self._plain_causal = causal and valid is None and (kv is None or kv.fresh)
        self._masks: dict = {}
        self.memory = memory
        self.memory_mask = None
        if memory_valid is not None:  # the memory itself may be absent: its keys and values cached in kv.cross
            mv = memory_valid[:, None, None, :]
            self.memory_mask = mv | ~mv.any(-1, keepdim=True)  # see attention_mask

    def mask(self, window: Optional[int]) -> Optional[torch.Tensor]:
        """The mask for a layer with this window; None means plain causal (``is_causal``)."""
        seq = self.positions.shape[1]
        # While tracing, seq is symbolic: the window test would specialise the graph to seq <= window.
        if self._plain_causal and (window is None or (not tracing() and window >= seq)):
            return None
        if window not in self._masks:
            self._masks[window] = attention_mask(self.positions, self.key_pos, self.key_valid, self.causal, window)
        return self._masks[window]


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention of ``q [B, S, H, D]`` over ``k, v [B, L, Hk, D]``; query head
    ``h`` uses key head ``h // (H/Hk)`` (grouped-query). ``mask [B, 1, S, L]`` (True = attend) or
    None for plain causal attention with ``S == L``. Returns ``[B, S, H, D]``."""
    b, s, heads, dim = q.shape
    kv_heads, length = k.shape[2], k.shape[1]
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if sinks is not None:
        return _attend_with_sinks(q.transpose(1, 2), k, v, mask, sinks).transpose(1, 2)
    if mask is None:  # flash kernels take grouped heads and the causal mask directly
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, enable_gqa=heads != kv_heads)
        return out.transpose(1, 2)
    # With a mask, fold each key head's G query heads into the query axis ([B, Hk, G*S, D], the
    # mask repeated per head): every SDPA kernel then serves grouped-query attention, and k, v
    # are never expanded to H heads. A decode step (S = 1) folds without a copy.
    groups = heads // kv_heads
    qf = q.view(b, s, kv_heads, groups, dim).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, groups * s, dim)
    mf = mask[:, :, None].expand(b, 1, groups, s, length).reshape(b, 1, groups * s, length)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf)
    return out.view(b, kv_heads, groups, s, dim).permute(0, 3, 1, 2, 4).reshape(b, s, heads, dim)


def _attend_with_sinks(q, k, v, mask, sinks):
    """Attention whose softmax denominator also holds one learned logit per head (gpt-oss's sinks):
    ``softmax([scores, sink])`` without the sink's column. SDPA has no such term, so this path is
    explicit matmuls and a softmax, in float32. q ``[B, H, S, D]``, k and v ``[B, Hk, L, D]``."""
    b, heads, s, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    qg = q.float().reshape(b, kv_heads, groups, s, dim)  # head h = j * groups + i uses key head j
    scores = qg @ k.float()[:, :, None].transpose(-1, -2) / math.sqrt(dim)  # [B, Hk, G, S, L]
    if mask is None:
        mask = torch.ones(s, length, dtype=torch.bool, device=q.device).tril(length - s)
    else:
        mask = mask[:, :, None]  # [B, 1, 1, S, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().reshape(1, kv_heads, groups, 1, 1).expand(b, -1, -1, s, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = probs @ v.float()[:, :, None]  # [B, Hk, G, S, D]
    return out.reshape(b, heads, s, dim).to(q.dtype)


class Attention(nn.Module):
    """Grouped-query attention: self-attention with rotary (fused q/k/v projection), or
    cross-attention over an encoder output (no rotary). Optional sliding window and sinks."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, window: Optional[int] = None, cross: bool = False):
        super().__init__()
        self.layer_idx, self.window, self.cross = layer_idx, window, cross
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_style = cfg.rope_style
        q_width, kv_width = cfg.n_heads * cfg.head_dim, 2 * cfg.n_kv_heads * cfg.head_dim
        if cross:
            self.q_proj = nn.Linear(cfg.d_model, q_width, bias=cfg.qkv_bias)
            self.kv_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.qkv_bias)
        else:
            self.qkv_proj = nn.Linear(cfg.d_model, q_width + kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_width, cfg.d_model, bias=cfg.o_bias)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        b, s, _ = x.shape
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        if self.cross:
            q = self.q_proj(x).view(b, s, heads, dim)
            k, v = self._memory_keys_values(batch)
            mask = batch.memory_mask
        else:
            qkv = self.qkv_proj(x).view(b, s, heads + 2 * kv_heads, dim)
            q, k, v = qkv.split((heads, kv_heads, kv_heads), dim=2)
            if batch.kv is None:
                q, k = ops.rotary(q, k, batch.positions, batch.rotary, self.rope_style)
            else:
                # Generation: rotate in place, so each token's keys and values stay side by side
                # in the projection's output and reach the cache in one write.
                ops.rotary_(q, k, batch.positions, batch.rotary, self.rope_style)
                k, v = batch.kv.update(self.layer_idx, qkv[:, :, heads:])
            mask = batch.mask(self.window)
        out = attend(q, k, v, mask, self.sinks)
        return self.o_proj(out.reshape(b, s, heads * dim))

    def _memory_keys_values(self, batch: AttentionBatch) -> tuple:
        cached = batch.kv.cross.get(self.layer_idx) if batch.kv is not None else None
        if cached is None:
            m = batch.memory
            if m is None:
                raise ValueError(f"cross-attention of decoder layer {self.layer_idx}: give the encoder output "
                                 "(encoder_output.hidden) or its cached keys and values (kv.cross)")
            kv = self.kv_proj(m).view(m.shape[0], m.shape[1], 2 * self.n_kv_heads, self.head_dim)
            cached = kv.split((self.n_kv_heads, self.n_kv_heads), dim=2)
            if batch.kv is not None:
                batch.kv.cross[self.layer_idx] = cached
        return cached


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------


class DenseFFN(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up as one projection ``[gate; up]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up), None


class MoEFFN(nn.Module):
    """Mixture of experts through ``apt_hal.ops.moe_dispatch``: a linear router, then each token's
    top-k experts only (the contract computes each expert on the rows routed to it).

    Expert weights are stacked in the contract's layout: ``w_up [E, U, d]`` (``U = 2F``: gate then
    up for ``swiglu``, interleaved for ``gpt_oss_swiglu``; ``F`` for ``gelu``) and
    ``w_down [E, d, F]``, as parameters, or, with ``mxfp4`` experts, as uint8 buffers of MXFP4 codes
    ``[E, U, d/2]`` with scales ``w_up_scales [E, U, d/32]`` (likewise ``w_down``): constants that
    gradients do not update. Returns the output and the layer's routing ``(router_logits [T, E],
    topk_ids [T, k])``: all its losses need, small enough to keep (the losses are computed only
    if read, see ``ModelOutput``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        experts, d, f = cfg.n_experts, cfg.d_model, cfg.ffn_dim
        up = f if cfg.expert_activation == "gelu" else 2 * f
        self.router = nn.Linear(d, experts, bias=cfg.router_bias)
        self.top_k, self.scoring, self.renormalize = cfg.top_k, cfg.moe_scoring, cfg.moe_renormalize
        self.activation, self.alpha, self.limit = cfg.expert_activation, cfg.swiglu_alpha, cfg.swiglu_limit
        self.capacity_factor = cfg.capacity_factor
        self.mxfp4 = cfg.mxfp4_experts
        for name, shape in (("w_up", (experts, up, d)), ("w_down", (experts, d, f))):
            if self.mxfp4:
                self.register_buffer(name, torch.zeros(*shape[:-1], shape[-1] // 2, dtype=torch.uint8))
                self.register_buffer(name + "_scales", torch.zeros(*shape[:-1], shape[-1] // mxfp4.BLOCK,
                                                                   dtype=torch.uint8))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self.b_up = nn.Parameter(torch.zeros(experts, up)) if cfg.expert_bias else None
        self.b_down = nn.Parameter(torch.zeros(experts, d)) if cfg.expert_bias else None

    def forward(self, x: torch.Tensor) -> tuple:
        out = ops.moe_dispatch(
            x, self.router(x), self.w_up, self.w_down, top_k=self.top_k, scoring=self.scoring,
            renormalize=self.renormalize, activation=self.activation,
            w_up_scales=self.w_up_scales if self.mxfp4 else None,
            w_down_scales=self.w_down_scales if self.mxfp4 else None,
            b_up=self.b_up, b_down=self.b_down, capacity_factor=self.capacity_factor,
            alpha=self.alpha, limit=self.limit)
        return out.output, (out.router_logits, out.topk_ids)

    def expert_weights(self, dtype: torch.dtype) -> tuple:
        """``(w_up, w_down)`` as ``dtype`` tensors (the exact MXFP4 values when quantized)."""
        if self.mxfp4:
            return (mxfp4.dequantize(self.w_up, self.w_up_scales, dtype),
                    mxfp4.dequantize(self.w_down, self.w_down_scales, dtype))
        return self.w_up.detach().to(dtype), self.w_down.detach().to(dtype)

    def set_expert_weights(self, w_up: torch.Tensor, w_down: torch.Tensor, mxfp4_experts: bool) -> None:
        """Store new expert weights, quantized to MXFP4 buffers or as parameters."""
        for name, w in (("w_up", w_up), ("w_down", w_down)):
            for old in (name, name + "_scales"):
                if hasattr(self, old):
                    delattr(self, old)
            if mxfp4_experts:
                packed, scales = mxfp4.quantize(w)
                self.register_buffer(name, packed)
                self.register_buffer(name + "_scales", scales)
            else:
                self.register_parameter(name, nn.Parameter(w.detach()))
        self.mxfp4 = mxfp4_experts


class Block(nn.Module):
    """Pre-norm transformer block: attention, cross-attention (seq2seq decoder), FFN; residuals."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, causal: bool = True, cross: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx, window=cfg.window(layer_idx) if causal else None)
        if cross:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.cross_attn = Attention(cfg, layer_idx, cross=True)
        else:
            self.cross_attn = None
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFFN(cfg) if cfg.n_experts else DenseFFN(cfg)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> tuple:
        """Returns the new hidden states and the MoE layer's routing (None for a dense FFN)."""
        x = x + self.attn(self.attn_norm(x), batch)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), batch)
        h, routed = self.ffn(self.ffn_norm(x))
        return x + h, routed


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, batch: AttentionBatch) -> tuple:
    """Run ``blocks`` in order; returns the hidden states and the routing of every MoE block."""
    routing = []
    for block in blocks:
        x, routed = block(x, batch)
        if routed is not None:
            routing.append(routed)
    return x, routing


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Random initialization: normal(0, init_std) for embeddings, projections and experts, the
    projections into the residual stream (``o_proj``, ``down_proj``, ``w_down``) scaled by
    ``1/sqrt(2 * layers)`` (GPT-2's rule, so the residual stream's variance does not grow with
    depth), zero biases and sinks, unit norms. Covers every parameter and buffer."""
    std = cfg.init_std
    residual_std = std / math.sqrt(2 * (cfg.n_layers + cfg.n_encoder_layers))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=residual_std if name.endswith(("o_proj", "down_proj")) else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention) and module.sinks is not None:
            nn.init.zeros_(module.sinks)
        elif isinstance(module, MoEFFN):
            device, dtype = module.router.weight.device, module.router.weight.dtype
            up_shape = (module.router.out_features, module.w_up.shape[1], cfg.d_model)
            w_up = torch.empty(up_shape, device=device, dtype=dtype).normal_(0, std)
            w_down = torch.empty(module.router.out_features, cfg.d_model, cfg.ffn_dim, device=device,
                                 dtype=dtype).normal_(0, residual_std)
            module.set_expert_weights(w_up, w_down, module.mxfp4)
            for bias in (module.b_up, module.b_down):
                if bias is not None:
                    nn.init.zeros_(bias)


def convert_experts(model: nn.Module, mxfp4_experts: bool) -> nn.Module:
    """Quantize every MoE layer's experts to MXFP4 (``True``) or dequantize them to the dtype of
    the model's embedding (``False``), in place, and update ``model.config``; returns ``model``.
    Quantizing rounds by apt_hal.mxfp4's rule; dequantizing is exact."""
    model.config = dataclasses.replace(model.config, mxfp4_experts=mxfp4_experts)  # validates (d, F % 32)
    for module in model.modules():
        if isinstance(module, MoEFFN) and module.mxfp4 != mxfp4_experts:
            module.set_expert_weights(*module.expert_weights(model.embed.weight.dtype), mxfp4_experts)
    return model
