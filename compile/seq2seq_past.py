"""The encoder + decoder-with-past export of a seq2seq model: optimum's classic seq2seq layout,
three graphs in one folder.

``encoder_model.onnx``::

    input_ids                          int64 [batch_size, encoder_sequence_length]
    attention_mask                     int64 [batch_size, encoder_sequence_length]  1 = real token
 -> last_hidden_state                  float [batch_size, encoder_sequence_length, d_model]

``decoder_model.onnx`` (the first decoder step)::

    input_ids                          int64 [batch_size, decoder_sequence_length]
    encoder_attention_mask             int64 [batch_size, encoder_sequence_length]
    encoder_hidden_states              float [batch_size, encoder_sequence_length, d_model]
 -> logits                             float [batch_size, decoder_sequence_length, vocab]
    present.{i}.decoder.key / .value   float [batch_size, kv_heads, decoder_sequence_length, head_dim]
    present.{i}.encoder.key / .value   float [batch_size, kv_heads, encoder_sequence_length, head_dim]

``decoder_with_past_model.onnx`` (every later step)::

    input_ids, encoder_attention_mask  as above
    past_key_values.{i}.decoder.key / .value  [batch_size, kv_heads, past_decoder_sequence_length, head_dim]
    past_key_values.{i}.encoder.key / .value  [batch_size, kv_heads, encoder_sequence_length, head_dim]
 -> logits
    present.{i}.decoder.key / .value   [batch_size, kv_heads, past_decoder_sequence_length
                                        + decoder_sequence_length, head_dim]

The cross-attention keys and values of the encoder output are computed once, by the first step,
and passed back unchanged to every later one (optimum names that length
``encoder_sequence_length_out``; here it is the encoder length itself). The encoder input may be
padded anywhere; decoder tokens are unpadded (generation decodes every row from one start token):
the decoder token at index ``t`` of a step sits at position ``past_decoder_sequence_length + t``.
The decoder reuses the decoder-only past/present machinery (:class:`apt_hal.models.layers.PastKV`:
key concatenation, cached-key positions, masks).
"""

from __future__ import annotations

import torch
from torch import nn

from apt_hal.compile import past, validate
from apt_hal.models.layers import PastKV
from apt_hal.models.seq2seq import EncoderOutput

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
DECODER_WITH_PAST_FILE = "decoder_with_past_model.onnx"
GRAPHS = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
# optimum's dimension names
BATCH, ENCODER_SEQ, DECODER_SEQ, PAST_DECODER = past.BATCH, "encoder_sequence_length", "decoder_sequence_length", \
    "past_decoder_sequence_length"
# Distinct sizes >= 2: torch.export specializes a dimension of size 1, and equal sizes would hide a mix-up.
EXAMPLE_BATCH, EXAMPLE_ENCODER, EXAMPLE_DECODER, EXAMPLE_PAST = 2, 7, 3, 5
CACHE_KINDS = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")  # per layer, optimum's order


def names(n_layers: int, graph: str) -> tuple[list[str], list[str]]:
    """The input and output names of ``graph`` (one of :data:`GRAPHS`)."""
    if graph == ENCODER_FILE:
        return ["input_ids", "attention_mask"], ["last_hidden_state"]
    with_past = graph == DECODER_WITH_PAST_FILE
    kinds = CACHE_KINDS[:2] if with_past else CACHE_KINDS
    presents = [f"present.{i}.{kind}" for i in range(n_layers) for kind in kinds]
    if with_past:
        pasts = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in CACHE_KINDS]
        return ["input_ids", "encoder_attention_mask", *pasts], ["logits", *presents]
    return ["input_ids", "encoder_attention_mask", "encoder_hidden_states"], ["logits", *presents]


def dynamic_axes(n_layers: int, graph: str) -> dict:
    """``export_onnx``'s ``dynamic`` argument for ``graph``."""
    if graph == ENCODER_FILE:
        tokens = {0: BATCH, 1: ENCODER_SEQ}
        return {"input_ids": tokens, "attention_mask": tokens}
    axes = {"input_ids": {0: BATCH, 1: DECODER_SEQ}, "encoder_attention_mask": {0: BATCH, 1: ENCODER_SEQ}}
    if graph == DECODER_WITH_PAST_FILE:
        cache = [{0: BATCH, 2: PAST_DECODER}] * 2 + [{0: BATCH, 2: ENCODER_SEQ}] * 2
        axes["past_key_values"] = cache * n_layers
    else:
        axes["encoder_hidden_states"] = {0: BATCH, 1: ENCODER_SEQ}
    return axes


def module_for(model: nn.Module, graph: str) -> nn.Module:
    """The module traced into ``graph``."""
    modules = {ENCODER_FILE: Seq2SeqEncoder, DECODER_FILE: Seq2SeqDecoder,
               DECODER_WITH_PAST_FILE: Seq2SeqDecoderWithPast}
    return modules[graph](model)


class Seq2SeqEncoder(nn.Module):
    """``forward(input_ids, attention_mask)`` -> ``last_hidden_state``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(input_ids, attention_mask).hidden


class Seq2SeqDecoder(nn.Module):
    """``decoder_model``: ``forward(input_ids, encoder_attention_mask, encoder_hidden_states)`` ->
    ``(logits, *presents)``, each layer's presents in :data:`CACHE_KINDS` order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.config.family != "seq2seq":
            raise ValueError(f"an encoder + decoder-with-past export is built for family 'seq2seq', "
                             f"not {model.config.family!r}")
        self.model = model

    def forward(self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> tuple:
        cfg = self.model.config
        empty = encoder_hidden_states.new_zeros(input_ids.shape[0], cfg.n_kv_heads, 0, cfg.head_dim)
        decoder_past = [(empty, empty)] * cfg.n_layers
        logits, cache = self._step(input_ids, encoder_attention_mask, encoder_hidden_states, decoder_past)
        return (logits, *[t for i in range(cfg.n_layers)
                          for t in (*cache.present[i], *(c.transpose(1, 2) for c in cache.cross[i]))])

    def _step(self, input_ids, encoder_attention_mask, encoder_hidden_states, decoder_past, cross=None) -> tuple:
        """The logits of the decoder over ``input_ids`` after ``decoder_past``, and the cache (its
        ``present`` and ``cross`` filled). Decoder tokens are unpadded: token ``t`` of the step sits
        at position ``past length + t``."""
        batch, seq = input_ids.shape
        done = decoder_past[0][0].shape[2]
        positions = (torch.arange(seq, device=input_ids.device) + done).expand(batch, seq)
        cache = PastKV(decoder_past, torch.ones(batch, done + seq, dtype=torch.bool, device=input_ids.device),
                       positions, cross=cross or {})
        memory = EncoderOutput(encoder_hidden_states, encoder_attention_mask.bool(), [])
        return self.model(decoder_input_ids=input_ids, encoder_output=memory, kv=cache).logits, cache


class Seq2SeqDecoderWithPast(Seq2SeqDecoder):
    """``decoder_with_past_model``: ``forward(input_ids, encoder_attention_mask, past_key_values)``
    -> ``(logits, *decoder presents)``; ``past_key_values`` is the flat tuple of the first step's
    presents (the decoder ones replaced by each later step's)."""

    def forward(self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor, past_key_values: tuple) -> tuple:
        n = self.model.config.n_layers
        if len(past_key_values) != len(CACHE_KINDS) * n:
            raise ValueError(f"past_key_values must hold {len(CACHE_KINDS)} tensors ({', '.join(CACHE_KINDS)}) "
                             f"for each of the {n} layers, got {len(past_key_values)}")
        layers = [past_key_values[4 * i:4 * i + 4] for i in range(n)]
        # The memory's cross-attention keys and values, token-major as the attention layers keep them.
        cross = {i: (k.transpose(1, 2), v.transpose(1, 2)) for i, (_, _, k, v) in enumerate(layers)}
        logits, cache = self._step(input_ids, encoder_attention_mask, None, [(k, v) for k, v, _, _ in layers], cross)
        return (logits, *[t for i in range(n) for t in cache.present[i]])


def padded_mask(batch: int, length: int, padded_rows: int) -> torch.Tensor:
    """``[batch, length]`` int64, 1 = real token; row ``r < padded_rows`` has ``1 + r`` padding
    tokens, on the left for even rows and the right for odd ones (always one real token)."""
    mask = torch.ones(batch, length, dtype=torch.int64)
    for row in range(min(padded_rows, batch)):
        pads = min(1 + row, length - 1)
        if row % 2:
            mask[row, length - pads:] = 0
        else:
            mask[row, :pads] = 0
    return mask


def graph_inputs(cfg, graph: str, dtype: torch.dtype, generator: torch.Generator, *, batch: int = EXAMPLE_BATCH,
                 seq: int = EXAMPLE_DECODER, length: int = EXAMPLE_ENCODER, past_length: int = EXAMPLE_PAST,
                 padded_rows: int = 0) -> tuple:
    """Random inputs of ``graph`` (the export's shapes by default): ``batch`` rows of ``length``
    encoder tokens (padded as :func:`padded_mask`); for the decoders ``seq`` decoder tokens and the
    encoder's hidden states (``decoder_model``) or a random past of ``past_length`` decoder tokens
    and the encoder's cross-attention keys and values (``decoder_with_past_model``)."""
    mask = padded_mask(batch, length, padded_rows)
    if graph == ENCODER_FILE:
        return torch.randint(0, cfg.vocab_size, (batch, length), generator=generator), mask
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)
    if graph == DECODER_FILE:
        return ids, mask, torch.randn(batch, length, cfg.d_model, generator=generator).to(dtype)
    layer = [(batch, cfg.n_kv_heads, size, cfg.head_dim) for size in (past_length, past_length, length, length)]
    cache = tuple(torch.randn(shape, generator=generator).to(dtype) for _ in range(cfg.n_layers) for shape in layer)
    return ids, mask, cache


def input_sets(cfg, graph: str, dtype: torch.dtype, generator: torch.Generator) -> list[validate.InputSet]:
    """The export's shapes, then shapes it never saw: a longer, padded encoder batch with a
    one-token decoder step after a longer past, and every dimension at size 1."""
    cases = [("export shape", {}),
             ("unseen, padded encoder", dict(batch=3, seq=1, length=11, past_length=20, padded_rows=2)),
             ("unseen, size 1", dict(batch=1, seq=1, length=1, past_length=1))]
    return [validate.InputSet(label, graph_inputs(cfg, graph, dtype, generator, **sizes)) for label, sizes in cases]
