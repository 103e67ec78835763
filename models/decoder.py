"""The causal language model of the dense, moe and oss families, and what seq2seq shares with it:
the output type, the loss and the input checks."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from apt_hal.contract import value_checks_enabled
from apt_hal.contracts.moe_dispatch import load_balance_loss, router_z_loss
from apt_hal.models.config import ModelConfig
from apt_hal.models.layers import AttentionBatch, Block, KVStep, PastKV, RMSNorm, RotaryTable, run_blocks

IGNORE_INDEX = -100  # label value the loss skips


@dataclasses.dataclass
class ModelOutput:
    """``loss = lm_loss + aux_loss_weight * aux_loss + z_loss_weight * z_loss`` (given labels).

    ``aux_loss`` (Switch load-balance loss) and ``z_loss`` (router z-loss) are unweighted means over
    the MoE layers, None for a model without experts; computed when read (a generation step never
    reads them).
    """

    logits: torch.Tensor  # [B, S, vocab], or [B, 1, vocab] at the positions asked for
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    # Each MoE layer's (router_logits, topk_ids): what the losses need, not the layers' outputs,
    # so that keeping a ModelOutput keeps no activations alive.
    routing: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        return torch.stack([load_balance_loss(*r) for r in self.routing]).mean() if self.routing else None

    @property
    def z_loss(self) -> Optional[torch.Tensor]:
        return torch.stack([router_z_loss(logits) for logits, _ in self.routing]).mean() if self.routing else None


def check_tokens(name: str, ids, vocab_size: int, *, labels: bool = False) -> None:
    """``ids`` is an integer tensor ``[batch, seq]``, non-empty, with values in ``[0, vocab_size)``
    (labels may also be -100). Values are read only outside tracing (it costs a device sync)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        got = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an int64 or int32 tensor [batch, seq], got {got}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): give at least one token")
    if not value_checks_enabled():
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if labels:
        bad &= ids != IGNORE_INDEX
    if bad.any():
        value = ids[bad][0].item()
        allowed = f"[0, vocab_size={vocab_size})" + (f" or {IGNORE_INDEX}" if labels else "")
        raise ValueError(f"{name} holds {value}, outside {allowed}")


def check_padding_mask(name: str, mask, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """A ``[batch, seq]`` mask, True (or 1) = real token, as bool; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor shaped like the token ids {tuple(ids.shape)} "
                         f"(True = real token), got {got}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise ValueError(f"{name} must be bool (True = real token) or 0/1 integers, got {mask.dtype}")
    return mask.bool()


def check_length(name: str, ids: torch.Tensor, cfg: ModelConfig) -> None:
    if ids.shape[1] > cfg.max_position:
        raise ValueError(f"{name} has {ids.shape[1]} tokens, more than the model's max_position={cfg.max_position}")


def lm_output(logits: torch.Tensor, labels: Optional[torch.Tensor], routing: list, cfg: ModelConfig,
              *, shift: bool) -> ModelOutput:
    """The output, with the cross-entropy loss when labels are given (labels[t+1] is the target of
    logits[t] when ``shift``, as in a causal LM; labels[t] otherwise), mean over non-ignored labels."""
    out = ModelOutput(logits, routing=routing)
    if labels is None:
        return out
    scores, targets = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
    out.lm_loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]).float(), targets.reshape(-1).long(),
                                  ignore_index=IGNORE_INDEX)
    out.loss = out.lm_loss
    if routing:
        out.loss = out.loss + cfg.aux_loss_weight * out.aux_loss + cfg.z_loss_weight * out.z_loss
    return out


def select_positions(x: torch.Tensor, logits_at: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [B, S, d]`` at one sequence index per row (``logits_at [B]``) as ``[B, 1, d]``, or all of ``x``."""
    if logits_at is None:
        return x
    return x[torch.arange(x.shape[0], device=x.device), logits_at.to(x.device)].unsqueeze(1)


class DecoderLM(nn.Module):
    """A decoder-only causal LM (apt-dense, apt-moe, apt-oss): embedding, blocks, norm, LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = RotaryTable(config.rope_config())

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, *, kv: Union[KVStep, PastKV, None] = None,
                logits_at: Optional[torch.Tensor] = None) -> ModelOutput:
        """Logits ``[B, S, vocab]``; with ``labels`` ``[B, S]`` also the shifted cross-entropy (labels
        -100 ignored) and the weighted MoE losses.

        ``attention_mask`` ``[B, S]``: True (1) = real token, False (0) = padding, which no token
        attends to; positions count real tokens only, so left padding changes no logit.
        ``kv`` (generation): the paged KV cache step, or a :class:`PastKV` (keys and values passed in
        and returned whole, the exported past/present graph's form; its mask covers the padding, so
        ``attention_mask`` stays None); ``logits_at`` ``[B]``: compute logits only at
        that index of each row (shape ``[B, 1, vocab]``).
        """
        cfg = self.config
        check_tokens("input_ids", input_ids, cfg.vocab_size)
        valid = check_padding_mask("attention_mask", attention_mask, input_ids)
        if kv is None:
            check_length("input_ids", input_ids, cfg)
        if labels is not None:
            check_tokens("labels", labels, cfg.vocab_size, labels=True)
            if labels.shape != input_ids.shape or logits_at is not None:
                raise ValueError(f"labels must be shaped like input_ids {tuple(input_ids.shape)} (and logits "
                                 f"computed everywhere), got {tuple(labels.shape)}")
        x = self.embed(input_ids)
        batch = AttentionBatch(tuple(input_ids.shape), valid, self.rotary.on(x.device), kv=kv)
        x, routing = run_blocks(self.layers, x, batch)
        logits = self.lm_head(self.norm(select_positions(x, logits_at)))
        return lm_output(logits, labels, routing, cfg, shift=True)
