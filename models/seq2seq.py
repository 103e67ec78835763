"""apt-seq2seq: an encoder-decoder model built from the same blocks as the decoder-only family.

The encoder's self-attention is bidirectional, the decoder's causal; both apply rotary. Decoder
blocks add cross-attention over the encoder output (no rotary: encoder and decoder positions are
unrelated). Embedding shared by encoder and decoder.

Loss convention (as T5 and BART): ``decoder_input_ids`` are the labels shifted right behind
``decoder_start_token_id``, so ``logits[t]`` predicts ``labels[t]`` without a further shift.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import nn

from apt_hal.models.config import ModelConfig
from apt_hal.models.decoder import (
    IGNORE_INDEX,
    ModelOutput,
    check_length,
    check_padding_mask,
    check_tokens,
    lm_output,
    select_positions,
)
from apt_hal.models.layers import AttentionBatch, Block, KVStep, PastKV, RMSNorm, RotaryTable, run_blocks


@dataclasses.dataclass
class EncoderOutput:
    # [B, L, d], after the encoder's final norm; None for a decoder step whose every cross-attention
    # layer finds its keys and values already in ``kv.cross`` (an exported decoder-with-past graph)
    hidden: Optional[torch.Tensor]
    valid: torch.Tensor  # [B, L] bool, True = real token
    routing: list  # each encoder MoE layer's (router_logits, topk_ids), for the losses


def shift_right(labels: torch.Tensor, start_token: int) -> torch.Tensor:
    """Decoder inputs for ``labels``: the start token, then ``labels[:, :-1]``. Ignored labels (-100)
    become the start token: they only sit where no target is learned or after the sequence ends."""
    shifted = torch.full_like(labels, start_token)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, start_token)


class Seq2SeqLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = nn.ModuleList(Block(config, i, causal=False) for i in range(config.n_encoder_layers))
        self.encoder_norm = RMSNorm(config.d_model, config.norm_eps)
        self.decoder = nn.ModuleList(Block(config, i, cross=True) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = RotaryTable(config.rope_config())

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Run the encoder over ``input_ids [B, L]`` (``attention_mask``: True = real token)."""
        check_tokens("input_ids", input_ids, self.config.vocab_size)
        check_length("input_ids", input_ids, self.config)
        valid = check_padding_mask("attention_mask", attention_mask, input_ids)
        x = self.embed(input_ids)
        batch = AttentionBatch(tuple(input_ids.shape), valid, self.rotary.on(x.device), causal=False)
        x, routing = run_blocks(self.encoder, x, batch)
        if valid is None:
            valid = torch.ones(input_ids.shape, dtype=torch.bool, device=x.device)
        return EncoderOutput(self.encoder_norm(x), valid, routing)

    def forward(self, input_ids: Optional[torch.Tensor] = None, decoder_input_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None, *,
                encoder_output: Optional[EncoderOutput] = None, kv: Union[KVStep, PastKV, None] = None,
                logits_at: Optional[torch.Tensor] = None) -> ModelOutput:
        """Decoder logits ``[B, T, vocab]`` for ``decoder_input_ids`` (default: ``labels`` shifted
        right) given the encoder input ``input_ids`` (or an ``encoder_output`` from :meth:`encode`);
        with ``labels`` ``[B, T]`` the cross-entropy (labels -100 ignored) and weighted MoE losses
        of encoder and decoder. ``kv`` and ``logits_at``: as in DecoderLM (generation)."""
        cfg = self.config
        if encoder_output is None:
            if input_ids is None:
                raise ValueError("give input_ids (the encoder's input) or encoder_output")
            encoder_output = self.encode(input_ids, attention_mask)
        if labels is not None:
            check_tokens("labels", labels, cfg.vocab_size, labels=True)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids, or labels to shift right into them")
            decoder_input_ids = shift_right(labels, cfg.decoder_start_token_id)
        check_tokens("decoder_input_ids", decoder_input_ids, cfg.vocab_size)
        if kv is None:
            check_length("decoder_input_ids", decoder_input_ids, cfg)
        if labels is not None and (labels.shape != decoder_input_ids.shape or logits_at is not None):
            raise ValueError(f"labels must be shaped like decoder_input_ids {tuple(decoder_input_ids.shape)} "
                             f"(and logits computed everywhere), got {tuple(labels.shape)}")
        valid = check_padding_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
        if encoder_output.valid.shape[0] != decoder_input_ids.shape[0]:
            raise ValueError(f"the encoder output has batch {encoder_output.valid.shape[0]}, "
                             f"decoder_input_ids has {decoder_input_ids.shape[0]}")
        x = self.embed(decoder_input_ids)
        batch = AttentionBatch(tuple(decoder_input_ids.shape), valid, self.rotary.on(x.device), kv=kv,
                               memory=encoder_output.hidden, memory_valid=encoder_output.valid)
        x, routing = run_blocks(self.decoder, x, batch)
        logits = self.lm_head(self.norm(select_positions(x, logits_at)))
        return lm_output(logits, labels, encoder_output.routing + routing, cfg, shift=False)
