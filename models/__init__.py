"""apt_hal.models: transformer models written only against the HAL (torch, apt_hal, stdlib).

    from apt_hal.models import ModelConfig, build_model, GenerationConfig, generate
    cfg = ModelConfig.preset("apt-dense-tiny")          # apt-{dense,moe,oss,seq2seq}-{tiny,1b}
    model = build_model(cfg)
    out = model(input_ids, labels=input_ids)           # out.logits, out.loss, out.lm_loss, out.aux_loss
    new_tokens = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8, temperature=0.8))

Hugging Face checkpoints (Llama, Mixtral, gpt-oss): ``apt_hal.models.hf.load_pretrained`` /
``save_pretrained``.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from apt_hal.models.config import PRESETS, ModelConfig
from apt_hal.models.decoder import DecoderLM, ModelOutput
from apt_hal.models.generate import GenerationConfig, generate, release_decode_session
from apt_hal.models.layers import convert_experts, init_weights
from apt_hal.models.seq2seq import EncoderOutput, Seq2SeqLM

__all__ = ["PRESETS", "DecoderLM", "EncoderOutput", "GenerationConfig", "ModelConfig", "ModelOutput", "Seq2SeqLM",
           "build_model", "convert_experts", "generate", "parameter_count", "release_decode_session"]


def build_model(config: ModelConfig, *, device: Union[str, torch.device, None] = None,
                initialize: bool = True) -> nn.Module:
    """A randomly initialized model for ``config``, parameters in ``config.dtype`` on ``device``
    (default: the CPU). ``initialize=False`` leaves the weights uninitialized (a loader fills
    them); ``device="meta"`` gives shapes only."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"build_model takes a ModelConfig, got {type(config).__name__}")
    cls = Seq2SeqLM if config.family == "seq2seq" else DecoderLM
    with torch.device("meta"):  # allocate once, on the target device
        model = cls(config).to(config.torch_dtype)  # floating tensors only: MXFP4 codes stay uint8
    device = torch.device(device if device is not None else "cpu")
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.embed.weight
    if initialize:
        init_weights(model, config)
    return model


def parameter_count(model: nn.Module) -> int:
    """Parameters and MXFP4 expert codes counted as weights (two per byte), shared ones once."""
    total = sum(p.numel() for p in model.parameters())
    return total + sum(2 * b.numel() for name, b in model.named_buffers() if name.endswith(("w_up", "w_down")))
