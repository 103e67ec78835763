"""Hugging Face checkpoints <-> APT models: Llama (apt-dense), Mixtral (apt-moe), gpt-oss (apt-oss).

A checkpoint is a folder with ``config.json`` and ``model.safetensors``, or shards listed by
``model.safetensors.index.json``. Loading is lazy: the model is allocated once, without random
initialization, and filled shard by shard through ``safetensors.safe_open`` (memory-mapped), one
tensor at a time, so besides the model the host holds at most one shard's pages. Every parameter
must be filled and every checkpoint tensor used, or loading fails naming them.

Layouts (transformers 5.x names; ours in brackets):

* attention: ``self_attn.{q,k,v}_proj`` are row blocks of [``attn.qkv_proj``]; ``o_proj``;
  gpt-oss adds biases and ``self_attn.sinks``. Rotary is the rotate-half ("neox") layout.
* Llama MLP: ``mlp.gate_proj`` / ``up_proj`` are the halves of [``ffn.gate_up_proj``]; ``down_proj``.
* Mixtral experts, two formats: the classic one, ``block_sparse_moe.gate`` (router) and
  ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down), which transformers
  4.x and 5.x (by default) save; and the fused one of transformers 5.x modules,
  ``mlp.gate`` and ``mlp.experts.gate_up_proj [E, 2F, d]`` / ``down_proj [E, d, F]``
  (``save_pretrained(save_original_format=False)``). [``ffn.router``, ``ffn.w_up`` = cat(w1, w3)
  per expert, ``ffn.w_down``]. Both load; saving writes the classic one.
* gpt-oss experts: ``mlp.router`` (with bias); ``mlp.experts.gate_up_proj [E, d, 2F]`` (gate and
  up interleaved) and ``down_proj [E, F, d]``, transposed to our ``[E, out, in]``, with
  ``*_bias``; or MXFP4, as OpenAI ships it: ``gate_up_proj_blocks [E, 2F, d/32, 16]`` uint8 (two
  E2M1 codes a byte, low nibble first: apt_hal.mxfp4's packing) and ``gate_up_proj_scales
  [E, 2F, d/32]`` (E8M0), likewise ``down_proj_*`` [``ffn.w_up``/``w_up_scales`` ``[E, 2F, d/2]``].
  An MXFP4 checkpoint loads into MXFP4 experts and saves back bit for bit, with the
  ``quantization_config`` transformers reads (``quant_method: mxfp4``).

``safetensors`` is imported lazily, inside the functions that read and write files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Optional, Union

import torch
from torch import nn

from apt_hal import mxfp4
from apt_hal import rope as rope_lib
from apt_hal.atomic import atomic_write, atomic_write_text
from apt_hal.models.config import DTYPES, ModelConfig

__all__ = ["config_from_hf", "config_to_hf", "load_pretrained", "save_pretrained"]

FAMILY_OF = {"llama": "dense", "mixtral": "moe", "gpt_oss": "oss"}
ARCHITECTURE = {"dense": ("llama", "LlamaForCausalLM"), "moe": ("mixtral", "MixtralForCausalLM"),
                "oss": ("gpt_oss", "GptOssForCausalLM")}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Derived buffers some older checkpoints carry; they hold no weights, so they are not loaded.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER_TYPE_TO_HF = {"full": "full_attention", "sliding": "sliding_attention"}
_LAYER_TYPE_FROM_HF = {v: k for k, v in _LAYER_TYPE_TO_HF.items()}
_ROPE_FIELDS_TO_HF = {  # per variant: the RopeConfig fields Hugging Face's rope_parameters carry
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"),
}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def config_from_hf(hf: dict, *, mxfp4_experts: bool = False) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` (model_type llama, mixtral or gpt_oss)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILY_OF:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILY_OF)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{model_type}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError(f"{model_type}: mlp_bias=True is not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rc = rope_lib.RopeConfig.from_hf(hf, head_dim=head_dim)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    fields = dict(
        family=FAMILY_OF[model_type], vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, ffn_dim=hf["intermediate_size"], max_position=rc.max_position, rope=rc,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        init_std=hf.get("initializer_range", 0.02), dtype=_dtype_name(dtype))
    if model_type != "llama":
        fields.update(n_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                      sliding_window=hf.get("sliding_window"), aux_loss_weight=hf.get("router_aux_loss_coef", 0.0))
    if model_type == "mixtral":
        fields.update(moe_scoring="softmax_topk", moe_renormalize=True, expert_activation="swiglu")
    if model_type == "gpt_oss":
        layer_types = hf.get("layer_types")
        fields.update(moe_scoring="topk_softmax", expert_activation="gpt_oss_swiglu",
                      swiglu_alpha=hf.get("swiglu_alpha", 1.702), swiglu_limit=hf.get("swiglu_limit", 7.0),
                      expert_bias=True, router_bias=True, attention_sinks=True, mxfp4_experts=mxfp4_experts,
                      layer_types=tuple(_LAYER_TYPE_FROM_HF[t] for t in layer_types) if layer_types else None)
    return ModelConfig(**fields)


def _inexpressible(cfg: ModelConfig) -> list[str]:
    """What of ``cfg`` its Hugging Face architecture cannot hold."""
    problems = []
    if cfg.rope_style != "neox":
        problems.append(f"rope_style {cfg.rope_style!r} (transformers' Llama, Mixtral and gpt-oss rotate "
                        "halves: 'neox')")
    if cfg.rope_config().variant not in _ROPE_FIELDS_TO_HF:
        problems.append(f"rope variant {cfg.rope_config().variant!r}")
    if cfg.qkv_bias != cfg.o_bias:
        problems.append("qkv_bias != o_bias (attention_bias covers both)")
    want = {
        "dense": dict(attention_sinks=False, sliding_window=None),
        "moe": dict(attention_sinks=False, qkv_bias=False, moe_scoring="softmax_topk", moe_renormalize=True,
                    expert_activation="swiglu", expert_bias=False, router_bias=False, mxfp4_experts=False),
        "oss": dict(attention_sinks=True, moe_scoring="topk_softmax", expert_activation="gpt_oss_swiglu",
                    expert_bias=True, router_bias=True),
    }[cfg.family]
    problems += [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.family == "moe" and cfg.layer_types is not None and len(set(cfg.layer_types)) > 1:
        problems.append("mixed layer_types (Mixtral's sliding_window applies to every layer)")
    return problems


def config_to_hf(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict of ``cfg`` (family dense, moe or oss)."""
    if cfg.family not in ARCHITECTURE:
        raise ValueError(f"family {cfg.family!r} has no Hugging Face format here; supported: "
                         f"{', '.join(ARCHITECTURE)} (Llama, Mixtral, gpt-oss)")
    model_type, architecture = ARCHITECTURE[cfg.family]
    problems = _inexpressible(cfg)
    if problems:
        raise ValueError(f"this {cfg.family} config cannot be saved as {architecture}: " + "; ".join(problems))
    rc = cfg.rope_config()
    rope = {"rope_type": rc.variant, "rope_theta": rc.base}
    rope.update({k: getattr(rc, k) for k in _ROPE_FIELDS_TO_HF[rc.variant] if getattr(rc, k) is not None})
    rope = {k: list(v) if isinstance(v, tuple) else v for k, v in rope.items()}
    if rc.rotary_dim != cfg.head_dim:
        rope["partial_rotary_factor"] = rc.rotary_dim / cfg.head_dim
    hf = dict(
        architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        attention_bias=cfg.qkv_bias, attention_dropout=0.0, initializer_range=cfg.init_std,
        rope_parameters=rope, dtype=cfg.dtype)
    if cfg.family == "dense":
        hf["mlp_bias"] = False
    else:
        hf.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, sliding_window=cfg.sliding_window,
                  router_aux_loss_coef=cfg.aux_loss_weight)
    if cfg.family == "oss":
        hf.update(swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
                  layer_types=[_LAYER_TYPE_TO_HF["sliding" if cfg.window(i) else "full"] for i in range(cfg.n_layers)])
        if cfg.mxfp4_experts:
            hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return hf


# --------------------------------------------------------------------------------------------
# Tensor names and layouts
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Checkpoint tensor ``hf`` is ``ours[index]`` (a block of rows, an expert) in ``layout``."""

    hf: str
    ours: str
    index: tuple = ()
    layout: str = "same"  # "same" | "transposed" (last two dims swapped) | "mxfp4_blocks"


def _to_ours(layout: str, t: torch.Tensor) -> torch.Tensor:
    if layout == "transposed":
        return t.transpose(-1, -2)
    if layout == "mxfp4_blocks":  # [..., K/32, 16] -> [..., K/2]
        return t.reshape(*t.shape[:-2], -1)
    return t


def _to_hf(layout: str, t: torch.Tensor) -> torch.Tensor:
    if layout == "transposed":
        t = t.transpose(-1, -2)
    elif layout == "mxfp4_blocks":
        t = t.reshape(*t.shape[:-1], -1, mxfp4.BLOCK // 2)
    return t.to("cpu", memory_format=torch.contiguous_format, copy=True)  # own storage: safetensors refuses shared


def _entries(cfg: ModelConfig, experts: str) -> list[_Entry]:
    """Every checkpoint tensor of ``cfg`` in the expert format ``experts`` (see _expert_format)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = [_Entry("model.embed_tokens.weight", "embed.weight"), _Entry("model.norm.weight", "norm.weight")]
    if not cfg.tie_embeddings:
        out.append(_Entry("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out += [_Entry(hf + "input_layernorm.weight", ours + "attn_norm.weight"),
                _Entry(hf + "post_attention_layernorm.weight", ours + "ffn_norm.weight")]
        for p in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            for name, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))):
                out.append(_Entry(f"{hf}self_attn.{name}_proj.{p}", f"{ours}attn.qkv_proj.{p}", (rows,)))
        for p in ("weight", "bias") if cfg.o_bias else ("weight",):
            out.append(_Entry(f"{hf}self_attn.o_proj.{p}", f"{ours}attn.o_proj.{p}"))
        if cfg.attention_sinks:
            out.append(_Entry(hf + "self_attn.sinks", ours + "attn.sinks"))
        out += _ffn_entries(cfg, hf, ours + "ffn.", experts)
    return out


def _ffn_entries(cfg: ModelConfig, hf: str, ours: str, experts: str) -> list[_Entry]:
    f = cfg.ffn_dim
    gate, up = slice(0, f), slice(f, 2 * f)
    if experts == "dense":
        return [_Entry(hf + "mlp.gate_proj.weight", ours + "gate_up_proj.weight", (gate,)),
                _Entry(hf + "mlp.up_proj.weight", ours + "gate_up_proj.weight", (up,)),
                _Entry(hf + "mlp.down_proj.weight", ours + "down_proj.weight")]
    if experts.startswith("mixtral"):
        m = hf + ("block_sparse_moe." if experts.endswith("block_sparse_moe") else "mlp.")
        out = [_Entry(m + "gate.weight", ours + "router.weight")]
        if experts.startswith("mixtral_fused"):
            return out + [_Entry(m + "experts.gate_up_proj", ours + "w_up"),
                          _Entry(m + "experts.down_proj", ours + "w_down")]
        for e in range(cfg.n_experts):
            out += [_Entry(f"{m}experts.{e}.w1.weight", ours + "w_up", (e, gate)),
                    _Entry(f"{m}experts.{e}.w3.weight", ours + "w_up", (e, up)),
                    _Entry(f"{m}experts.{e}.w2.weight", ours + "w_down", (e,))]
        return out
    m = hf + "mlp."
    out = [_Entry(m + "router.weight", ours + "router.weight"), _Entry(m + "router.bias", ours + "router.bias"),
           _Entry(m + "experts.gate_up_proj_bias", ours + "b_up"),
           _Entry(m + "experts.down_proj_bias", ours + "b_down")]
    for hf_name, name in (("gate_up_proj", "w_up"), ("down_proj", "w_down")):
        if experts == "gpt_oss_mxfp4":
            out += [_Entry(f"{m}experts.{hf_name}_blocks", ours + name, layout="mxfp4_blocks"),
                    _Entry(f"{m}experts.{hf_name}_scales", ours + name + "_scales")]
        else:
            out.append(_Entry(f"{m}experts.{hf_name}", ours + name, layout="transposed"))
    return out


def _expert_format(model_type: str, keys: list[str]) -> str:
    """dense | mixtral_{per_expert,fused}_{block_sparse_moe,mlp} | gpt_oss | gpt_oss_mxfp4."""
    if model_type == "llama":
        return "dense"
    if model_type == "mixtral":
        kind = "per_expert" if any(re.search(r"\.experts\.\d+\.w1\.weight$", k) for k in keys) else "fused"
        return f"mixtral_{kind}_{'block_sparse_moe' if any('.block_sparse_moe.' in k for k in keys) else 'mlp'}"
    return "gpt_oss_mxfp4" if any(k.endswith("gate_up_proj_blocks") for k in keys) else "gpt_oss"


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (a tied weight once, under its first name)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def _shards(path: pathlib.Path) -> dict[pathlib.Path, list[str]]:
    """Checkpoint file -> the tensor names it holds."""
    from safetensors import safe_open

    index = path / INDEX_FILE
    if index.exists():
        files: dict[pathlib.Path, list[str]] = {}
        for key, name in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(path / name, []).append(key)
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        raise FileNotFoundError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    with safe_open(single, framework="pt") as f:
        return {single: list(f.keys())}


def load_pretrained(path: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = None,
                    dtype: Union[str, torch.dtype, None] = None, mxfp4_experts: Optional[bool] = None) -> nn.Module:
    """Load a Hugging Face checkpoint folder (Llama, Mixtral or gpt-oss) into an APT model.

    ``dtype`` (default: the checkpoint's ``dtype``/``torch_dtype``, else float32) and ``device``
    (default: the CPU) place the model. gpt-oss experts keep the checkpoint's form (MXFP4 or
    not) unless ``mxfp4_experts`` asks for the other: they are then quantized or dequantized.
    """
    from safetensors import safe_open

    from apt_hal.models import build_model
    from apt_hal.models.layers import convert_experts

    path = pathlib.Path(path)
    hf = json.loads((path / "config.json").read_text())
    files = _shards(path)
    keys = [k for ks in files.values() for k in ks]
    experts = _expert_format(hf.get("model_type"), keys)
    cfg = config_from_hf(hf, mxfp4_experts=experts == "gpt_oss_mxfp4")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=_dtype_name(dtype))
    entries = {e.hf: e for e in _entries(cfg, experts)}
    unexpected = [k for k in keys if k not in entries and not k.endswith(DERIVED_SUFFIXES)]
    missing = sorted(set(entries) - set(keys))
    if unexpected or missing:
        raise ValueError(f"{path}: the checkpoint does not match its config.json ({hf.get('model_type')}): "
                         f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                         f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    model = build_model(cfg, device=device, initialize=False)
    targets = _targets(model)
    filled = dict.fromkeys(targets, 0)
    for file, file_keys in files.items():
        with safe_open(file, framework="pt") as f:  # memory-mapped; closed (unmapped) after its tensors
            for key in file_keys:
                entry = entries.get(key)
                if entry is None:
                    continue
                source = _to_ours(entry.layout, f.get_tensor(key))
                dest = targets[entry.ours].detach()[entry.index]
                if source.shape != dest.shape:
                    raise ValueError(f"{file.name}: {key} has shape {list(source.shape)} (in our layout), but the "
                                     f"config gives {entry.ours}{list(entry.index) or ''} shape {list(dest.shape)}")
                dest.copy_(source)
                filled[entry.ours] += dest.numel()
    unfilled = [name for name, t in targets.items() if filled[name] != t.numel()]
    if unfilled:
        raise ValueError(f"{path}: the checkpoint leaves parts of {unfilled[:5]} unset")
    if mxfp4_experts is not None and mxfp4_experts != cfg.mxfp4_experts:
        convert_experts(model, mxfp4_experts)
    return model


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def _bytes(size: Union[int, str]) -> int:
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must be a positive int (bytes) or a size like '5GB', got {size!r}")
    return int(float(match[1]) * 1000 ** ["B", "KB", "MB", "GB", "TB"].index(match[2]))


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike], *,
                    max_shard_size: Union[int, str] = "5GB") -> None:
    """Write ``model`` as a Hugging Face checkpoint folder: ``config.json`` and safetensors, split
    into shards of at most ``max_shard_size`` (decimal units, as transformers) with an index when
    more than one. Tensors keep the model's dtype; MXFP4 experts are written as gpt-oss's
    ``_blocks``/``_scales``. Memory beyond the model: one shard."""
    from safetensors.torch import save_file

    cfg = model.config
    hf = config_to_hf(cfg)
    experts = {"dense": "dense", "moe": "mixtral_per_expert_block_sparse_moe",
               "oss": "gpt_oss_mxfp4" if cfg.mxfp4_experts else "gpt_oss"}[cfg.family]
    targets = _targets(model)
    entries = _entries(cfg, experts)
    absent = [e.ours for e in entries if e.ours not in targets]
    if absent:
        raise ValueError(f"the model has no {absent[0]}: layers converted with convert_model_to_mxfp4 have no "
                         f"{hf['architectures'][0]} layout; save the model before converting it")
    limit = _bytes(max_shard_size)
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        t = targets[e.ours][e.index]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {e.hf: _to_hf(e.layout, targets[e.ours].detach()[e.index]) for e in shard}
        atomic_write(path / name,
                     lambda tmp, tensors=tensors: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
