"""The past/present graph of a decoder-only model: one graph for prefill and decode, with a KV cache.

Inputs and outputs follow optimum's names and layout, so tools that run optimum's exports run it:

    input_ids                 int64 [batch_size, sequence_length]
    attention_mask            int64 [batch_size, past_sequence_length + sequence_length]  1 = real token
    position_ids              int64 [batch_size, sequence_length]
    past_key_values.{i}.key   float [batch_size, kv_heads, past_sequence_length, head_dim]  (and .value)
 -> logits                    float [batch_size, sequence_length, vocab]
    present.{i}.key           float [batch_size, kv_heads, past_sequence_length + sequence_length, head_dim]

A prefill passes an empty past (``past_sequence_length`` 0); each decode step passes the previous
step's presents as the past. Padding may sit anywhere (left or right) and in any step: a padded
token is masked out of every attention, and a cached key sits at the position that the mask gives
it (the count of real tokens before it), so ``position_ids`` should be that count too
(:func:`positions_from_mask`); every row then gets the logits it gets alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from apt_hal.compile import validate
from apt_hal.models.layers import PastKV

FAMILIES = ("dense", "moe", "oss")  # decoder-only: the families with a past/present graph
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"  # optimum's dimension names
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def dynamic_axes(n_layers: int) -> dict:
    """``export_onnx``'s ``dynamic`` argument for :class:`CausalLMWithPast`."""
    tokens = {0: BATCH, 1: SEQ}
    return {"input_ids": tokens, "position_ids": tokens, "attention_mask": {0: BATCH, 1: "total_sequence_length"},
            "past_key_values": [{0: BATCH, 2: PAST}] * (2 * n_layers)}


class CausalLMWithPast(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, past_key_values)`` -> ``(logits,
    *presents)``: a decoder-only APT model over an explicit KV cache. ``past_key_values`` is the
    flat tuple ``(key_0, value_0, key_1, value_1, ...)``, presents likewise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.config.family not in FAMILIES:
            raise ValueError(f"a past/present graph is built for the decoder-only families ({', '.join(FAMILIES)}), "
                             f"not {model.config.family!r}")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: tuple) -> tuple:
        n = self.model.config.n_layers
        if len(past_key_values) != 2 * n:
            raise ValueError(f"past_key_values must hold a key and a value for each of the {n} layers, got "
                             f"{len(past_key_values)} tensors")
        past = list(zip(past_key_values[0::2], past_key_values[1::2]))
        cache = PastKV(past, attention_mask.bool(), position_ids)
        logits = self.model(input_ids, kv=cache).logits
        return (logits, *[t for i in range(n) for t in cache.present[i]])


def positions_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``position_ids [B, new_tokens]`` of the last ``new_tokens`` columns of ``attention_mask``:
    the count of real tokens before each (0 for padding before any real token)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, -new_tokens:].contiguous()


def empty_past(config, batch: int, dtype: torch.dtype, length: int = 0,
               generator: Optional[torch.Generator] = None) -> tuple:
    """A past of ``length`` tokens per layer: empty (a prefill), or random values (for tests)."""
    shape = (batch, config.n_kv_heads, length, config.head_dim)
    return tuple(torch.randn(shape, generator=generator).to(dtype) for _ in range(2 * config.n_layers))


def example_inputs(config, batch: int, seq: int, past: int, dtype: torch.dtype, generator: torch.Generator,
                   padded_rows: int = 0) -> tuple:
    """Random token ids after a random past of ``past`` tokens; the first ``padded_rows`` rows
    have their first real token a little later (left padding, in the past when there is one)."""
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    for row in range(min(padded_rows, batch)):
        mask[row, :1 + row % max(past + seq - 1, 1)] = 0
    return ids, mask, positions_from_mask(mask, seq), empty_past(config, batch, dtype, past, generator)


def input_sets(config, dtype: torch.dtype, generator: torch.Generator) -> list[validate.InputSet]:
    """The export's shape, then shapes it never saw: a prefill (empty past, left padding), a
    one-token decode step over a past longer than a small sliding window, batch 1."""
    cases = [("export shape", EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, 0),
             ("unseen prefill, left padded", 3, 7, 0, 2),
             ("unseen decode", 3, 1, 20, 1),
             ("unseen, size 1", 1, 1, 1, 0)]
    return [validate.InputSet(label, example_inputs(config, b, s, p, dtype, generator, padded))
            for label, b, s, p, padded in cases]
