"""The configuration files other runners read beside a past/present graph.

* ``config.json``: the model's Hugging Face config (Llama, Mixtral or gpt-oss), with
  ``use_cache``, which ``optimum.onnxruntime.ORTModelForCausalLM`` reads with the graph's
  optimum-style input and output names. Written when the config has a Hugging Face form.
* ``genai_config.json``: onnxruntime-genai's description of the decoder graph (names, heads,
  context length, token ids) and its default search options; decoder-only models only (genai has
  no model type for apt-seq2seq's encoder + decoder-with-past folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from apt_hal.compile import past

GENAI_CONFIG_FILE = "genai_config.json"
HF_CONFIG_FILE = "config.json"
_GENAI_TYPES = {"dense": "llama", "moe": "mixtral", "oss": "gpt_oss"}  # onnxruntime-genai's model types


def _token_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {**ids, "pad_token_id": tokenizer.pad_id}


def genai_config(cfg, tokenizer=None, graph: str = "model.onnx") -> dict:
    names = past.input_names(1) + past.output_names(1)
    decoder = {
        "filename": graph, "head_size": cfg.head_dim, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "num_hidden_layers": cfg.n_layers,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "inputs": {"input_ids": names[0], "attention_mask": names[1], "position_ids": names[2],
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model = {"type": _GENAI_TYPES[cfg.family], "vocab_size": cfg.vocab_size, "context_length": cfg.max_position,
             "decoder": decoder, **_token_ids(tokenizer)}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # no tokenizer (a preset): token 0; edit to taste
        model.setdefault(name, 0)
    search = {"do_sample": False, "max_length": cfg.max_position, "min_length": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"model": model, "search": search}


def hf_config(cfg, tokenizer=None) -> Optional[dict]:
    """``config.json`` for optimum, or None when the config has no Hugging Face form."""
    from apt_hal.models.hf import config_to_hf

    try:
        hf = config_to_hf(cfg)
    except ValueError:
        return None
    # Without a tokenizer (a preset) no token ends a sequence; saying so keeps transformers from
    # filling in its class defaults (Llama's and Mixtral's eos_token_id 2), where optimum's
    # generate would stop while apt_hal's does not.
    ids = _token_ids(tokenizer) or dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))
    return {**hf, "use_cache": True, **ids}


def write(output: Path, cfg, tokenizer=None) -> list[Path]:
    """Write both files into ``output``; returns the paths written."""
    written = []
    genai = genai_config(cfg, tokenizer) if cfg.family in _GENAI_TYPES else None
    files = ((HF_CONFIG_FILE, hf_config(cfg, tokenizer)), (GENAI_CONFIG_FILE, genai))
    for name, content in files:
        if content is not None:
            (output / name).write_text(json.dumps(content, indent=1) + "\n")
            written.append(output / name)
    return written
