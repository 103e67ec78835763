"""ModelConfig: every APT model is this one dataclass; the families are configurations of it.

* ``dense`` (apt-dense): a Llama-style decoder: RMSNorm, grouped-query attention, rotary, SwiGLU.
* ``moe`` (apt-moe): the same with mixture-of-experts FFNs (Mixtral-style routing).
* ``oss`` (apt-oss): gpt-oss-style: MoE with MXFP4 experts, YaRN rotary, alternating sliding-window
  and full attention, attention sinks, attention biases.
* ``seq2seq`` (apt-seq2seq): an encoder (bidirectional self-attention) and a decoder (causal
  self-attention, cross-attention); rotary in self-attention only.

``n_layers`` is the depth of the (decoder) stack for every family; ``n_encoder_layers`` that of the
seq2seq encoder. ``rope`` holds :class:`apt_hal.rope.RopeConfig` fields (a dict, so configs are
JSON): ``max_position`` comes from the ModelConfig and ``rotary_dim`` defaults to ``head_dim``.
Every field is validated when the config is made; errors are ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Union

import torch

from apt_hal import rope as rope_lib

FAMILIES = ("dense", "moe", "oss", "seq2seq")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER_TYPES = ("full", "sliding")
SCORINGS = ("softmax_topk", "topk_softmax")  # apt_hal.contracts.moe_dispatch
ACTIVATIONS = ("swiglu", "gpt_oss_swiglu", "gelu")
ROPE_STYLES = ("neox", "gptj")
MXFP4_BLOCK = 32


@dataclasses.dataclass
class ModelConfig:
    family: str = "dense"
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: n_heads (no grouping)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    ffn_dim: int = 128  # the dense FFN's hidden width, or each expert's
    n_encoder_layers: int = 0  # seq2seq only
    # Mixture of experts (moe, oss; 0 experts = dense FFN)
    n_experts: int = 0
    top_k: int = 0
    moe_scoring: str = "softmax_topk"
    moe_renormalize: bool = False
    expert_activation: str = "swiglu"
    swiglu_alpha: float = 1.702  # gpt_oss_swiglu's sigmoid gain
    swiglu_limit: float = 7.0  # gpt_oss_swiglu's clamp
    capacity_factor: Optional[float] = None  # None: dropless
    expert_bias: bool = False
    router_bias: bool = False
    mxfp4_experts: bool = False
    aux_loss_weight: float = 0.0  # weight of the load-balance loss in out.loss
    z_loss_weight: float = 0.0  # weight of the router z-loss in out.loss
    # Attention
    max_position: int = 2048
    rope: dict = dataclasses.field(default_factory=lambda: {"variant": "default", "base": 10000.0})
    rope_style: str = "neox"
    sliding_window: Optional[int] = None  # a query sees the keys at positions p - window < k <= p
    layer_types: Optional[tuple] = None  # "full" / "sliding" per decoder layer; None: all one kind
    attention_sinks: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    # The rest
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    decoder_start_token_id: int = 0  # seq2seq: the decoder's first input
    init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        _choice("family", self.family, FAMILIES)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_position"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _positive_int("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            _fail(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                _fail(f"d_model ({self.d_model}) is not a multiple of n_heads ({self.n_heads}); set head_dim")
            self.head_dim = self.d_model // self.n_heads
        _positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            _fail(f"head_dim must be even (rotary rotates pairs), got {self.head_dim}")
        self._check_family()
        self._check_moe()
        self._check_attention()
        _choice("dtype", self.dtype, tuple(DTYPES))
        if not self.norm_eps > 0 or not self.init_std > 0:
            _fail(f"norm_eps and init_std must be > 0, got {self.norm_eps} and {self.init_std}")
        if not 0 <= self.decoder_start_token_id < self.vocab_size:
            _fail(f"decoder_start_token_id must be in [0, vocab_size={self.vocab_size}), "
                  f"got {self.decoder_start_token_id}")

    def _check_family(self):
        if self.family == "dense" and self.n_experts:
            _fail(f"family 'dense' has no experts, got n_experts={self.n_experts} (use family 'moe')")
        if self.family in ("moe", "oss") and not self.n_experts:
            _fail(f"family {self.family!r} needs n_experts >= 1")
        if self.family == "seq2seq":
            _positive_int("n_encoder_layers", self.n_encoder_layers)
        elif self.n_encoder_layers:
            _fail(f"n_encoder_layers is for family 'seq2seq', got {self.n_encoder_layers} for {self.family!r}")

    def _check_moe(self):
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            _fail(f"n_experts must be an int >= 0, got {self.n_experts!r}")
        if not self.n_experts:
            if self.mxfp4_experts:
                _fail("mxfp4_experts needs experts (n_experts >= 1); for linear layers use "
                      "apt_hal.nn.convert_model_to_mxfp4")
            return
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            _fail(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k!r}")
        _choice("moe_scoring", self.moe_scoring, SCORINGS)
        _choice("expert_activation", self.expert_activation, ACTIVATIONS)
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            _fail(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")
        if self.mxfp4_experts and (self.d_model % MXFP4_BLOCK or self.ffn_dim % MXFP4_BLOCK):
            _fail(f"mxfp4_experts needs d_model ({self.d_model}) and ffn_dim ({self.ffn_dim}) to be "
                  f"multiples of {MXFP4_BLOCK} (the MXFP4 block)")
        if self.aux_loss_weight < 0 or self.z_loss_weight < 0:
            _fail(f"aux_loss_weight and z_loss_weight must be >= 0, got {self.aux_loss_weight}, {self.z_loss_weight}")

    def _check_attention(self):
        _choice("rope_style", self.rope_style, ROPE_STYLES)
        if isinstance(self.rope, rope_lib.RopeConfig):
            self.rope = _rope_dict(self.rope, self.max_position)
        if not isinstance(self.rope, dict) or "variant" not in self.rope:
            _fail(f"rope must be a dict of apt_hal.rope.RopeConfig fields with a 'variant', got {self.rope!r}")
        if "max_position" in self.rope:
            _fail("rope must not set max_position: it is ModelConfig.max_position")
        try:
            rc = self.rope_config()
        except (TypeError, ValueError) as e:
            _fail(f"rope {self.rope!r} is not a valid RopeConfig: {e}")
        if rc.rotary_dim > self.head_dim:
            _fail(f"rope rotary_dim ({rc.rotary_dim}) must be <= head_dim ({self.head_dim})")
        if rc.variant == "llama4":
            _fail("rope variant 'llama4' needs NoPE layers and chunked attention, which these models do not have")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.n_layers:
                _fail(f"layer_types must name one type per decoder layer ({self.n_layers}), "
                      f"got {len(self.layer_types)}")
            for t in self.layer_types:
                _choice("layer_types entry", t, LAYER_TYPES)
            if "sliding" in self.layer_types and self.sliding_window is None:
                _fail("layer_types has 'sliding' layers but sliding_window is None")

    # ---- derived ---------------------------------------------------------------------------

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def rope_config(self) -> rope_lib.RopeConfig:
        """The :class:`apt_hal.rope.RopeConfig` of the self-attention layers."""
        fields = {"rotary_dim": self.head_dim, **self.rope, "max_position": self.max_position}
        return rope_lib.RopeConfig(**fields)

    def window(self, layer_idx: int) -> Optional[int]:
        """The sliding window of decoder layer ``layer_idx``, or None for full attention."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer_idx] == "sliding" else None

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """One of :data:`PRESETS` (``apt-{dense,moe,oss,seq2seq}-{tiny,1b}``), fields overridable."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["layer_types"] is not None:
            d["layer_types"] = list(d["layer_types"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _fail(message: str) -> None:
    raise ValueError(f"ModelConfig: {message}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(f"{name} must be a positive int, got {value!r}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        _fail(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _rope_dict(rc: rope_lib.RopeConfig, max_position: int) -> dict:
    """A RopeConfig as the ``rope`` field: the fields that differ from their defaults."""
    if rc.max_position != max_position:
        _fail(f"the RopeConfig's max_position ({rc.max_position}) differs from max_position ({max_position})")
    out = {"variant": rc.variant}
    for f in dataclasses.fields(rc):
        value = getattr(rc, f.name)
        if f.name in ("variant", "max_position") or (f.default is not dataclasses.MISSING and value == f.default):
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


_TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_position=512)
_MOE = dict(n_experts=4, top_k=2, moe_renormalize=True, aux_loss_weight=0.01, z_loss_weight=0.001)
# gpt-oss: top-k then softmax (renormalize changes nothing), clamped interleaved SwiGLU, biases, sinks.
_OSS = dict(moe_scoring="topk_softmax", moe_renormalize=False, expert_activation="gpt_oss_swiglu", expert_bias=True,
            router_bias=True, mxfp4_experts=True, attention_sinks=True, qkv_bias=True, o_bias=True,
            aux_loss_weight=0.01, z_loss_weight=0.0)

PRESETS: dict[str, dict] = {
    "apt-dense-tiny": {**_TINY, "family": "dense", "tie_embeddings": True},
    "apt-moe-tiny": {**_TINY, **_MOE, "family": "moe"},
    "apt-oss-tiny": {**_TINY, **_MOE, **_OSS, "family": "oss",
                     "rope": {"variant": "yarn", "base": 150000.0, "factor": 4.0,
                              "original_max_position_embeddings": 128, "truncate": False},
                     "sliding_window": 16, "layer_types": ("sliding", "full")},
    "apt-seq2seq-tiny": {**_TINY, "family": "seq2seq", "n_encoder_layers": 2, "tie_embeddings": True},
    # About 1.0-1.2 billion parameters each (tests/test_models.py counts them).
    "apt-dense-1b": dict(family="dense", vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                         ffn_dim=8192, max_position=4096, rope={"variant": "default", "base": 500000.0},
                         tie_embeddings=True, dtype="bfloat16"),
    "apt-moe-1b": dict(family="moe", vocab_size=32000, d_model=1024, n_layers=16, n_heads=16, n_kv_heads=4,
                       ffn_dim=2560, max_position=4096, rope={"variant": "default", "base": 1000000.0},
                       n_experts=8, top_k=2, moe_renormalize=True, aux_loss_weight=0.01, z_loss_weight=0.001,
                       dtype="bfloat16"),
    "apt-oss-1b": dict(_OSS, family="oss", vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4,
                       ffn_dim=1536, max_position=131072, n_experts=16, top_k=4,
                       rope={"variant": "yarn", "base": 150000.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "truncate": False},
                       sliding_window=128, layer_types=("sliding", "full") * 6, dtype="bfloat16"),
    "apt-seq2seq-1b": dict(family="seq2seq", vocab_size=32000, d_model=2048, n_layers=10, n_encoder_layers=10,
                           n_heads=32, n_kv_heads=8, ffn_dim=5632, max_position=4096, tie_embeddings=True,
                           dtype="bfloat16"),
}
