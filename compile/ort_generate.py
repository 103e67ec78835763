"""Generation on ONNX Runtime from an apt-compile folder: the past/present graph of a decoder-only
model (:mod:`apt_hal.compile.past`) or the encoder + decoder-with-past graphs of a seq2seq model
(:mod:`apt_hal.compile.seq2seq_past`).

    from apt_hal.compile import ort_generate
    lm = ort_generate.load("out/dense")           # the folder apt-compile wrote: OrtCausalLM or OrtSeq2SeqLM
    new_tokens = lm.generate([[1, 17, 42]], GenerationConfig(max_new_tokens=64, greedy=True))

The same choices as :func:`apt_hal.models.generate` (greedy, temperature, top-k, top-p,
repetition penalty, stop tokens, seed), on the same torch code: only the model runs elsewhere.
Decoder-only: a batch of prompts is left-padded; the prefill passes an empty past and each decode
step passes the presents of the step before, one token per sequence. Seq2seq: the prompts are the
encoder's input (right-padded); ``decoder_model`` runs the decoder start token, then
``decoder_with_past_model`` one token per step, the cross-attention keys and values of the first
step passed back unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Union

import onnx
import torch

from apt_hal.compile import past, seq2seq_past, validate

MODEL_CONFIG_FILE = "apt_model.json"  # the ModelConfig, beside the graph


def load(folder) -> Union["OrtCausalLM", "OrtSeq2SeqLM"]:
    """The runner of an apt-compile folder: seq2seq when it holds ``encoder_model.onnx``."""
    folder = Path(folder)
    return OrtSeq2SeqLM(folder) if (folder / seq2seq_past.ENCODER_FILE).is_file() else OrtCausalLM(folder)


class _OrtFolder:
    """An apt-compile folder: its ModelConfig and one ONNX Runtime session per graph, each graph
    checked to take ``expected_inputs(n_layers)``."""

    def __init__(self, folder, graphs: dict[str, Callable[[int], list[str]]]):
        from apt_hal.models import ModelConfig

        folder = Path(folder)
        for f in [MODEL_CONFIG_FILE, *graphs]:
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{folder} is not a KV-cache export of apt-compile: no {f} "
                                        "(export with apt-compile --target onnx, without --no-kv-cache)")
        self.folder, self.config = folder, ModelConfig.from_json(folder / MODEL_CONFIG_FILE)
        self.runs, self.graph_inputs = {}, {}
        for graph, expected_inputs in graphs.items():
            inputs = onnx.load(str(folder / graph), load_external_data=False).graph.input
            expected = expected_inputs(self.config.n_layers)
            if [i.name for i in inputs] != expected:
                raise ValueError(f"{folder / graph} does not take the inputs of a {self.config.n_layers}-layer "
                                 f"{self.config.family} model ({', '.join(expected[:4])}, ...)")
            self.runs[graph], self.graph_inputs[graph] = validate.graph_runner(folder / graph, "onnxruntime"), inputs

    def tokenizer(self):
        """The tokenizer apt-compile copied from the checkpoint (none for a preset)."""
        from apt_hal.models.tokenizer import TOKENIZER_FILE, Tokenizer

        if not (self.folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{self.folder} has no {TOKENIZER_FILE}: export a checkpoint with a tokenizer "
                                    "(apt-hal train's, or a Hugging Face folder with tokenizer.json) "
                                    "to generate from text")
        return Tokenizer.load(self.folder)


class OrtCausalLM(_OrtFolder):
    """A past/present graph (``model.onnx``) and its ModelConfig, loaded from an apt-compile folder."""

    def __init__(self, folder, graph: str = "model.onnx"):
        super().__init__(folder, {graph: past.input_names})
        self.run = self.runs[graph]
        self.dtype = _TORCH_DTYPES[self.graph_inputs[graph][3].type.tensor_type.elem_type]  # past_key_values.0.key

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values: tuple) -> tuple:
        """``(logits [B, S, vocab], presents)`` for new tokens after ``past_key_values``."""
        positions = past.positions_from_mask(attention_mask, input_ids.shape[1])
        logits, *presents = self.run([input_ids, attention_mask, positions, *past_key_values])
        return logits, tuple(presents)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], config=None) -> list[list[int]]:
        """New tokens for each prompt, as :func:`apt_hal.models.generate` chooses them."""
        from apt_hal.models.generate import GenerationConfig, _check_prompts

        config = config or GenerationConfig()
        prompts = _check_prompts(prompts, self.config, config)
        batch, width = len(prompts), max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.int64)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
        seen = torch.zeros(batch, self.config.vocab_size, dtype=torch.bool)
        seen[mask.bool().nonzero(as_tuple=True)[0], ids[mask.bool()]] = True
        logits, cache = self.forward(ids, mask, past.empty_past(self.config, batch, self.dtype))

        def step(tokens: torch.Tensor) -> torch.Tensor:
            nonlocal mask, cache
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
            logits, cache = self.forward(tokens[:, None], mask, cache)
            return logits

        return decode_tokens(logits, seen, config, step)


class OrtSeq2SeqLM(_OrtFolder):
    """The encoder, decoder and decoder-with-past graphs of a seq2seq model and its ModelConfig,
    loaded from an apt-compile folder."""

    def __init__(self, folder):
        s2s = seq2seq_past
        super().__init__(folder, {graph: lambda n, graph=graph: s2s.names(n, graph)[0] for graph in s2s.GRAPHS})

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], config=None) -> list[list[int]]:
        """New tokens for each prompt (the encoder's input), as :func:`apt_hal.models.generate`
        chooses them."""
        from apt_hal.models.generate import GenerationConfig, _check_prompts

        s2s, n = seq2seq_past, self.config.n_layers
        config = config or GenerationConfig()
        prompts = _check_prompts(prompts, self.config, config)
        batch, width = len(prompts), max(map(len, prompts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], dtype=torch.int64)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.int64)
        (hidden,) = self.runs[s2s.ENCODER_FILE]([ids, mask])
        start = self.config.decoder_start_token_id
        logits, *cache = self.runs[s2s.DECODER_FILE]([torch.full((batch, 1), start), mask, hidden])
        seen = torch.zeros(batch, self.config.vocab_size, dtype=torch.bool)
        seen[:, start] = True

        def step(tokens: torch.Tensor) -> torch.Tensor:
            logits, *presents = self.runs[s2s.DECODER_WITH_PAST_FILE]([tokens[:, None], mask, *cache])
            for i in range(n):  # the decoder's keys and values grow; the encoder's stay
                cache[4 * i:4 * i + 2] = presents[2 * i:2 * i + 2]
            return logits

        return decode_tokens(logits, seen, config, step)


def decode_tokens(logits: torch.Tensor, seen: torch.Tensor, config, step: Callable) -> list[list[int]]:
    """Choose a token per row from the last position of ``logits``, then ``step(tokens)`` for the
    next logits, until every row stops or has ``config.max_new_tokens``; ``seen`` (bool ``[B,
    vocab]``, for the repetition penalty) is updated in place."""
    from apt_hal.models.generate import choose_tokens, record_tokens

    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    batch = logits.shape[0]
    new: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(config.max_new_tokens):
        tokens = choose_tokens(logits[:, -1], seen, config, generator)
        if record_tokens(tokens, new, done, config):
            break
        seen[torch.arange(batch), tokens] = True
        logits = step(tokens)
    return new


_TORCH_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
                 onnx.TensorProto.BFLOAT16: torch.bfloat16}
