"""Generation on ONNX Runtime with an exported past/present graph (:mod:`apt_hal.compile.past`).

    from apt_hal.compile.ort_generate import OrtCausalLM
    lm = OrtCausalLM("out/dense")                  # the folder apt-compile wrote
    new_tokens = lm.generate([[1, 17, 42]], GenerationConfig(max_new_tokens=64, greedy=True))

The same choices as :func:`apt_hal.models.generate` (greedy, temperature, top-k, top-p,
repetition penalty, stop tokens, seed), on the same torch code: only the model runs elsewhere.
A batch of prompts is left-padded; the prefill passes an empty past and each decode step passes
the presents of the step before, one token per sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import onnx
import torch

from apt_hal.compile import past, validate

MODEL_CONFIG_FILE = "apt_model.json"  # the ModelConfig, beside the graph


class OrtCausalLM:
    """A past/present graph (``model.onnx``) and its ModelConfig, loaded from an apt-compile folder."""

    def __init__(self, folder, graph: str = "model.onnx"):
        from apt_hal.models import ModelConfig

        folder = Path(folder)
        config_file, graph_file = folder / MODEL_CONFIG_FILE, folder / graph
        for f in (config_file, graph_file):
            if not f.is_file():
                raise FileNotFoundError(f"{folder} is not a past/present export of apt-compile: no {f.name} "
                                        "(export with apt-compile --target onnx, without --no-kv-cache)")
        self.folder, self.config = folder, ModelConfig.from_json(config_file)
        self.run = validate.graph_runner(graph_file, "onnxruntime")
        inputs = onnx.load(str(graph_file), load_external_data=False).graph.input
        if [i.name for i in inputs] != past.input_names(self.config.n_layers):
            raise ValueError(f"{graph_file} does not take the past/present inputs of a {self.config.n_layers}-layer "
                             f"model ({', '.join(past.input_names(self.config.n_layers)[:4])}, ...)")
        self.dtype = _TORCH_DTYPES[inputs[3].type.tensor_type.elem_type]

    def tokenizer(self):
        """The tokenizer apt-compile copied from the checkpoint (none for a preset)."""
        from apt_hal.models.tokenizer import TOKENIZER_FILE, Tokenizer

        if not (self.folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{self.folder} has no {TOKENIZER_FILE}: export a checkpoint with a tokenizer "
                                    "(apt-hal train's, or a Hugging Face folder with tokenizer.json) "
                                    "to generate from text")
        return Tokenizer.load(self.folder)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values: tuple) -> tuple:
        """``(logits [B, S, vocab], presents)`` for new tokens after ``past_key_values``."""
        positions = past.positions_from_mask(attention_mask, input_ids.shape[1])
        logits, *presents = self.run([input_ids, attention_mask, positions, *past_key_values])
        return logits, tuple(presents)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], config=None) -> list[list[int]]:
        """New tokens for each prompt, as :func:`apt_hal.models.generate` chooses them."""
        from apt_hal.models.generate import GenerationConfig, _check_prompts, choose_tokens, record_tokens

        config = config or GenerationConfig()
        prompts = _check_prompts(prompts, self.config, config)
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        batch, width = len(prompts), max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.int64)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
        seen = torch.zeros(batch, self.config.vocab_size, dtype=torch.bool)
        seen[mask.bool().nonzero(as_tuple=True)[0], ids[mask.bool()]] = True
        logits, cache = self.forward(ids, mask, past.empty_past(self.config, batch, self.dtype))
        new: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for _ in range(config.max_new_tokens):
            tokens = choose_tokens(logits[:, -1], seen, config, generator)
            if record_tokens(tokens, new, done, config):
                break
            seen[torch.arange(batch), tokens] = True
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
            logits, cache = self.forward(tokens[:, None], mask, cache)
        return new


_TORCH_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
                 onnx.TensorProto.BFLOAT16: torch.bfloat16}
