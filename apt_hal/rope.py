"""RoPE scaling variants: the cos/sin cache and attention factor the ``rotary`` op applies.

The ``rotary`` contract (:mod:`apt_hal.contracts.rotary`) only *applies* a cache; this module
builds it for every published variant, with Hugging Face transformers' formulas
(``transformers.modeling_rope_utils``, 5.x) written op for op in float32, so the inverse
frequencies match transformers bit for bit and the cache within one float32 ulp (``cos``/``sin``
are vectorised differently for differently shaped tensors).

Notation: ``R`` = ``rotary_dim`` (the rotated part of a head, even), ``i`` in ``[0, R/2)`` the
frequency index, ``b`` = ``base`` (rope_theta), ``s`` = ``factor``, ``L`` =
``original_max_position_embeddings`` (the pretraining context length; ``None`` means
``max_position``, as transformers defaults it to ``max_position_embeddings``).

Variants (each function returns ``(inv_freq float32 [R/2], attention_factor)``)
-------------------------------------------------------------------------------
default (:func:`default_inv_freq`; Llama 1/2, Mistral, Mixtral, Qwen 2, GPT-NeoX, Llama 4 Maverick)
    ``f_i = b^(-2i/R)``; attention factor 1.
linear (:func:`linear_inv_freq`; position interpolation, e.g. some Llama 2 fine-tunes)
    ``f_i = b^(-2i/R) / s`` (equivalent to dividing positions by ``s``).
dynamic (:func:`dynamic_ntk_inv_freq`; dynamic NTK scaling, e.g. Qwen 1, some Llama 2 deployments)
    For a sequence of length ``n``: ``b' = b * (s*max(n, L)/L - (s-1))^(R/(R-2))``,
    ``f_i = b'^(-2i/R)``; at ``n <= L`` this is the default. The frequencies depend on the length:
    transformers recomputes them when a sequence grows past the longest seen so far and resets
    them when one is shorter than ``L``; ``seq_len`` here is that length (a fresh module at
    ``n``, or a generation that has grown to ``n``). ``seq_len = s*L`` gives vLLM's static choice.
yarn (:func:`yarn_inv_freq`; gpt-oss, Qwen 2.5/3 long context, DeepSeek V2/V3)
    Correction dims ``cd(r) = R*ln(L/(2*pi*r)) / (2*ln b)``; ``low = cd(beta_fast)``,
    ``high = cd(beta_slow)``, floored and ceiled when ``truncate`` (default; gpt-oss sets
    ``truncate=False``), then clamped to ``[0, R-1]``. Ramp ``g_i = clamp((i-low)/(high-low), 0, 1)``;
    ``f_i = b^(-2i/R)/s * g_i + b^(-2i/R) * (1-g_i)``: high frequencies keep their value, low ones
    are interpolated. Attention factor (multiplies cos and sin): ``attention_factor`` if given,
    else ``m(s, mscale)/m(s, mscale_all_dim)`` when both are set (DeepSeek), else ``m(s, 1)``, with
    ``m(s, a) = 0.1*a*ln(s) + 1`` for ``s > 1``, 1 otherwise. (DeepSeek also multiplies its softmax
    scale by ``m(s, mscale_all_dim)^2``; that belongs to the attention, not to this cache.)
llama3 (:func:`llama3_inv_freq`; Llama 3.1, 3.2, 3.3: s=8 (32 for 3.2 1B/3B), low=1, high=4, L=8192)
    Wavelength ``w_i = 2*pi/f_i`` of the default frequencies: ``w < L/high_freq_factor`` unchanged,
    ``w > L/low_freq_factor`` divided by ``s``, between them a blend
    ``(1-t)*f/s + t*f`` with ``t = (L/w - low_freq_factor)/(high_freq_factor - low_freq_factor)``.
    Attention factor 1.
longrope (:func:`longrope_inv_freq`; Phi-3 (mini/small/medium 128k), Phi-3.5, Phi-4-mini)
    ``f_i = 1/(e_i * b^(2i/R))`` with ``e = long_factor`` when the sequence length ``n > L``, else
    ``short_factor`` (transformers switches the *whole* sequence, so the cache depends on ``n``;
    ``seq_len=None`` is transformers' initial, short state). Attention factor
    ``attention_factor`` if given, else ``sqrt(1 + ln(s)/ln(L))`` for ``s > 1``, 1 otherwise.
llama4 (:func:`llama4_inv_freq`; Llama 4 Scout, Maverick: iRoPE)
    RoPE layers use the llama3 formula when ``factor`` is set (Scout: s=16, low=high=1, L=8192),
    else the default; attention factor 1; pairs are interleaved (``style="gptj"``). Every
    ``no_rope_layer_interval``-th layer (0-based 3, 7, 11, ...) is a NoPE layer with global
    attention (:func:`llama4_layer_uses_rope`); RoPE layers attend within chunks of
    ``attention_chunk_size``. With ``attn_temperature_tuning``, NoPE layers multiply q by
    :func:`llama4_nope_temperature` ``= 1 + attn_scale*ln(floor((p+1)/floor_scale) + 1)``.

The cache (:func:`cos_sin_cache`) is ``[max_position, R]`` float32, row ``p`` =
``[cos(p*f) | sin(p*f)] * attention_factor``, the ``rotary`` contract's layout. Positions and
angles are float32 (as transformers: ``p.float() * f``), never bf16 (in bf16, 4096 positions
collapse to a few hundred distinct values), and the table is built on the CPU and then copied,
so every backend and device receives the same bits.

Configs come from :meth:`RopeConfig.from_hf` (a Hugging Face ``config.json`` dict) or are
written directly; fields left ``None`` fall back as transformers does, with ``max_position``
in the role of ``max_position_embeddings``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

VARIANTS = ("default", "linear", "dynamic", "yarn", "llama3", "longrope", "llama4")

# float32 holds every integer up to 2**24 exactly; past it, positions (and so angles) collide.
MAX_EXACT_POSITION = 2 ** 24

InvFreq = Tuple[torch.Tensor, float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Everything that determines a RoPE cos/sin cache; field names follow transformers'."""

    variant: str
    rotary_dim: int
    max_position: int  # rows of the cache: positions 0 .. max_position-1
    base: float = 10000.0
    factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    attention_factor: Optional[float] = None  # overrides the variant's own (yarn, longrope)
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True
    # llama3 (and llama4 when scaled)
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    # longrope
    short_factor: Optional[Tuple[float, ...]] = None
    long_factor: Optional[Tuple[float, ...]] = None
    # llama4 iRoPE
    no_rope_layer_interval: int = 4
    no_rope_layers: Tuple[int, ...] = ()  # transformers' per-layer flags (1 = RoPE); () = by interval
    attention_chunk_size: Optional[int] = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1

    def __post_init__(self):
        for name in ("short_factor", "long_factor", "no_rope_layers"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))  # lists from JSON; tuples keep the config hashable
        if self.variant not in VARIANTS:
            _fail(f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {self.variant!r}")
        for name in _REAL_FIELDS:
            _real(name, getattr(self, name))
        _positive_int("rotary_dim", self.rotary_dim)
        if self.rotary_dim % 2:
            _fail(f"rotary_dim must be even (dimensions rotate in pairs), got {self.rotary_dim}")
        _positive_int("max_position", self.max_position)
        if self.max_position > MAX_EXACT_POSITION:
            _fail(f"max_position must be at most 2**24 = {MAX_EXACT_POSITION} (float32 positions are exact "
                  f"only up to there), got {self.max_position}")
        if not self.base > 1:
            _fail(f"base (rope_theta) must be > 1, got {self.base}")
        for name in ("factor", "attention_factor", "low_freq_factor", "high_freq_factor", "floor_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                _fail(f"{name} must be > 0, got {value}")
        if self.original_max_position_embeddings is not None:
            _positive_int("original_max_position_embeddings", self.original_max_position_embeddings)
        if not 0 < self.beta_slow <= self.beta_fast:
            _fail(f"yarn needs 0 < beta_slow <= beta_fast, got beta_slow={self.beta_slow}, beta_fast={self.beta_fast}")
        _positive_int("no_rope_layer_interval", self.no_rope_layer_interval)
        if self.attention_chunk_size is not None:
            _positive_int("attention_chunk_size", self.attention_chunk_size)
        self._check_variant_fields()

    def _check_variant_fields(self):
        v = self.variant
        if v in ("linear", "dynamic", "llama3") and self.factor is None:
            _fail(f"variant {v!r} requires factor")
        if v == "dynamic" and self.rotary_dim < 4:
            _fail(f"variant 'dynamic' requires rotary_dim >= 4 (its exponent is R/(R-2)), got {self.rotary_dim}")
        if v == "llama3" or (v == "llama4" and self.factor is not None):
            if self.low_freq_factor is None or self.high_freq_factor is None:
                _fail(f"variant {v!r} with factor requires low_freq_factor and high_freq_factor")
            if self.high_freq_factor < self.low_freq_factor:
                _fail(f"high_freq_factor must be >= low_freq_factor, "
                      f"got {self.high_freq_factor} < {self.low_freq_factor}")
        if v == "longrope":
            for name in ("short_factor", "long_factor"):
                values = getattr(self, name)
                if values is None:
                    _fail(f"variant 'longrope' requires {name}")
                if len(values) != self.rotary_dim // 2:
                    _fail(f"{name} must have rotary_dim/2 = {self.rotary_dim // 2} values, got {len(values)}")
                if not all(x > 0 for x in values):
                    _fail(f"{name} values must all be > 0, got {values}")

    @property
    def original_length(self) -> int:
        """``L``: the pretraining context length the scaling variants refer to."""
        return self.original_max_position_embeddings or self.max_position

    @property
    def scale(self) -> float:
        """``s``: the configured factor, else ``max_position / L`` (transformers' rule for yarn, longrope)."""
        return self.factor if self.factor is not None else self.max_position / self.original_length

    def uses_rope(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (0-based) applies RoPE; only Llama 4 has NoPE layers."""
        if self.variant != "llama4":
            return True
        if self.no_rope_layers:
            if not 0 <= layer_idx < len(self.no_rope_layers):
                raise ValueError(f"RopeConfig.uses_rope: layer_idx must be in [0, {len(self.no_rope_layers)}) "
                                 f"(the length of no_rope_layers), got {layer_idx}")
            return bool(self.no_rope_layers[layer_idx])
        return llama4_layer_uses_rope(layer_idx, self.no_rope_layer_interval)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], head_dim: Optional[int] = None,
                max_position: Optional[int] = None) -> "RopeConfig":
        """Build from a Hugging Face config dict (``config.json``, or ``PretrainedConfig.to_dict()``).

        Reads ``rope_scaling`` or ``rope_parameters`` (the former wins, as in transformers),
        ``rope_theta``, ``partial_rotary_factor``, the head size (``head_dim`` argument, else
        ``qk_rope_head_dim`` (DeepSeek), ``head_dim``, or ``hidden_size // num_attention_heads``),
        ``max_position_embeddings`` and ``original_max_position_embeddings``; for Llama 4
        (``model_type`` ``llama4``/``llama4_text``, or a ``text_config`` holding one) its iRoPE fields.
        ``max_position`` (the cache length) defaults to ``max_position_embeddings``; overriding it
        (a smaller cache, or a longer one for dynamic NTK) changes no frequency, because the
        lengths the formulas use (``factor``, ``L``) are resolved here from the HF config.
        """
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        config = config.get("text_config") or config  # multimodal wrappers (Llama 4) nest the LM's config
        params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        if params and all(isinstance(v, Mapping) or v is None for v in params.values()):
            raise ValueError(f"RopeConfig.from_hf: rope parameters nested per layer type ({sorted(params)}) are not "
                             "supported; pass a config whose rope parameters are one flat dict")
        rope_type = params.get("rope_type", params.get("type", "default"))
        is_llama4 = config.get("model_type") in ("llama4", "llama4_text")
        if is_llama4 and rope_type not in ("default", "llama3"):
            raise ValueError(f"RopeConfig.from_hf: Llama 4 uses rope_type 'default' or 'llama3', got {rope_type!r}")
        if not is_llama4 and rope_type not in VARIANTS:
            raise ValueError(f"RopeConfig.from_hf: unsupported rope_type {rope_type!r}; supported: "
                             f"{', '.join(v for v in VARIANTS if v != 'llama4')}")
        variant = "llama4" if is_llama4 else rope_type

        head_dim = head_dim or config.get("qk_rope_head_dim") or config.get("head_dim")
        if not head_dim:
            if not config.get("hidden_size") or not config.get("num_attention_heads"):
                raise ValueError("RopeConfig.from_hf: the config gives no head size (head_dim, or hidden_size and "
                                 "num_attention_heads); pass head_dim=")
            head_dim = config["hidden_size"] // config["num_attention_heads"]
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0
        max_pos_emb = config.get("max_position_embeddings")
        if max_pos_emb is None and max_position is None:
            raise ValueError("RopeConfig.from_hf: the config has no max_position_embeddings; pass max_position=")
        max_pos_emb = max_pos_emb or max_position

        # transformers: dynamic NTK scales against max_position_embeddings; llama3/yarn/longrope
        # against original_max_position_embeddings, a top-level one (Phi-3) winning over rope_scaling's.
        if rope_type == "dynamic":
            original = max_pos_emb
        else:
            original = (config.get("original_max_position_embeddings")
                        or params.get("original_max_position_embeddings") or max_pos_emb)
        factor = params.get("factor")
        if factor is None and rope_type in ("yarn", "longrope"):
            factor = max_pos_emb / original  # DeepSeek, Phi-3: the ratio of the two lengths

        fields = dict(
            variant=variant, rotary_dim=int(head_dim * partial), max_position=max_position or max_pos_emb,
            base=float(params.get("rope_theta", config.get("rope_theta", 10000.0))),
            factor=factor, original_max_position_embeddings=original,
            attention_factor=params.get("attention_factor"),
            beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
            mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            low_freq_factor=params.get("low_freq_factor"), high_freq_factor=params.get("high_freq_factor"),
            short_factor=params.get("short_factor"), long_factor=params.get("long_factor"),
        )
        if is_llama4:
            for name in ("no_rope_layer_interval", "attention_chunk_size", "floor_scale", "attn_scale"):
                if name in config:  # attention_chunk_size may be None: no chunking
                    fields[name] = config[name]
            fields["no_rope_layers"] = tuple(int(x) for x in config.get("no_rope_layers") or ())
            fields["attn_temperature_tuning"] = bool(config.get("attn_temperature_tuning", True))
        return cls(**fields)


def _fail(message: str) -> None:
    raise ValueError(f"RopeConfig: {message}")


_REAL_FIELDS = ("base", "factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "low_freq_factor", "high_freq_factor", "floor_scale", "attn_scale")


def _real(name: str, value) -> None:
    """``value`` is None or a finite real number (comparing a string with a number would raise a
    TypeError naming no field; NaN would pass every range check)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        _fail(f"{name} must be a finite number, got {value!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(f"{name} must be a positive int, got {value!r}")


def _required(cfg: RopeConfig, name: str):
    value = getattr(cfg, name)
    if value is None:
        _fail(f"this formula needs {name}, which the config (variant {cfg.variant!r}) leaves unset")
    return value


# ---- inverse frequencies: each mirrors transformers' float32 arithmetic, op for op ----------------

def _exponents(rotary_dim: int) -> torch.Tensor:
    """``2i/R`` for ``i`` in ``[0, R/2)``, float32."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim


def _base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** _exponents(rotary_dim))


def default_inv_freq(cfg: RopeConfig) -> InvFreq:
    """``f_i = base^(-2i/R)``; attention factor 1."""
    return _base_inv_freq(cfg.rotary_dim, cfg.base), 1.0


def linear_inv_freq(cfg: RopeConfig) -> InvFreq:
    """Default frequencies divided by ``factor``; attention factor 1."""
    return _base_inv_freq(cfg.rotary_dim, cfg.base) / _required(cfg, "factor"), 1.0


def dynamic_ntk_inv_freq(cfg: RopeConfig, seq_len: Optional[int] = None) -> InvFreq:
    """Dynamic NTK: the base grows with ``seq_len`` beyond ``L`` (``None`` = ``L``: the default)."""
    factor, original = _required(cfg, "factor"), cfg.original_length
    seq_len = max(_seq_len(seq_len) or original, original)
    base = cfg.base * ((factor * seq_len / original) - (factor - 1)) ** (cfg.rotary_dim / (cfg.rotary_dim - 2))
    return _base_inv_freq(cfg.rotary_dim, base), 1.0


def yarn_inv_freq(cfg: RopeConfig) -> InvFreq:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, blend on a linear ramp."""
    dim, base, factor = cfg.rotary_dim, cfg.base, cfg.scale
    attention_factor = cfg.attention_factor
    if attention_factor is None:
        if cfg.mscale and cfg.mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, cfg.mscale) / _yarn_mscale(factor, cfg.mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times into the original context.
        return (dim * math.log(cfg.original_length / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** _exponents(dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency: 1 for high frequencies
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def llama3_inv_freq(cfg: RopeConfig) -> InvFreq:
    """Llama 3.1: divide long wavelengths by ``factor``, keep short ones, blend in between."""
    factor = _required(cfg, "factor")
    low, high = _required(cfg, "low_freq_factor"), _required(cfg, "high_freq_factor")
    context = cfg.original_length
    inv_freq = _base_inv_freq(cfg.rotary_dim, cfg.base)
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)  # only used strictly inside the band; none when high == low
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, blended)
    return torch.where(wavelen < context / high, inv_freq, scaled), 1.0


def longrope_inv_freq(cfg: RopeConfig, seq_len: Optional[int] = None) -> InvFreq:
    """LongRoPE: per-frequency rescale factors, long ones once ``seq_len > L`` (``None``: short)."""
    original = cfg.original_length
    seq_len = _seq_len(seq_len)
    ext = _required(cfg, "long_factor") if seq_len and seq_len > original else _required(cfg, "short_factor")
    inv_freq = 1.0 / (torch.tensor(ext, dtype=torch.float32) * cfg.base ** _exponents(cfg.rotary_dim))
    attention_factor = cfg.attention_factor
    if attention_factor is None:
        factor = cfg.scale
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, attention_factor


def llama4_inv_freq(cfg: RopeConfig) -> InvFreq:
    """Llama 4 RoPE layers: llama3 scaling when ``factor`` is set (Scout), else the default (Maverick)."""
    return llama3_inv_freq(cfg) if cfg.factor is not None else default_inv_freq(cfg)


def llama4_layer_uses_rope(layer_idx: int, interval: int = 4) -> bool:
    """Whether Llama 4 layer ``layer_idx`` (0-based) applies RoPE: every ``interval``-th is NoPE
    (layers 3, 7, 11, ... for 4), as transformers' default ``no_rope_layers``."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise ValueError(f"llama4_layer_uses_rope: layer_idx must be an int >= 0, got {layer_idx!r}")
    _positive_int("no_rope_layer_interval", interval)
    return (layer_idx + 1) % interval != 0


def llama4_nope_temperature(positions: torch.Tensor, floor_scale: float = 8192,
                            attn_scale: float = 0.1) -> torch.Tensor:
    """Llama 4's attention temperature for NoPE layers, float32 shaped like ``positions``:
    ``1 + attn_scale * ln(floor((p + 1) / floor_scale) + 1)``; q is multiplied by it."""
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex():
        raise ValueError("llama4_nope_temperature: positions must be an integer tensor, got "
                         f"{positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}")
    if not floor_scale > 0:
        raise ValueError(f"llama4_nope_temperature: floor_scale must be > 0, got {floor_scale}")
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


_INV_FREQ: dict[str, Callable[[RopeConfig], InvFreq]] = {
    "default": default_inv_freq, "linear": linear_inv_freq, "yarn": yarn_inv_freq,
    "llama3": llama3_inv_freq, "llama4": llama4_inv_freq,
}
_INV_FREQ_BY_LENGTH: dict[str, Callable[[RopeConfig, Optional[int]], InvFreq]] = {
    "dynamic": dynamic_ntk_inv_freq, "longrope": longrope_inv_freq,
}


def _seq_len(seq_len: Optional[int]) -> Optional[int]:
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0):
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
    return seq_len


def inv_freq_and_attention_factor(cfg: RopeConfig, seq_len: Optional[int] = None) -> InvFreq:
    """``(inv_freq float32 [R/2], attention_factor)`` of ``cfg``'s variant; ``seq_len`` (the
    sequence length, max position + 1) matters only for ``dynamic`` and ``longrope``."""
    _seq_len(seq_len)
    if cfg.variant in _INV_FREQ_BY_LENGTH:
        return _INV_FREQ_BY_LENGTH[cfg.variant](cfg, seq_len)
    return _INV_FREQ[cfg.variant](cfg)


def cos_sin_cache(cfg: RopeConfig, seq_len: Optional[int] = None,
                  device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The ``rotary`` op's cache: float32 ``[max_position, R]``, row ``p`` =
    ``[cos(p*f) | sin(p*f)] * attention_factor``.

    ``seq_len`` selects the frequencies of ``dynamic`` and ``longrope`` (see the module
    docstring); it must not exceed ``max_position``, the rows the cache holds. Built in float32
    on the CPU, then moved to ``device``.
    """
    if _seq_len(seq_len) is not None and seq_len > cfg.max_position:
        raise ValueError(f"cos_sin_cache: seq_len={seq_len} exceeds the cache length max_position={cfg.max_position}; "
                         "build the RopeConfig with a larger max_position")
    inv_freq, attention_factor = inv_freq_and_attention_factor(cfg, seq_len)
    positions = torch.arange(cfg.max_position).float()  # int64 -> float32: exact below 2**24
    angles = positions[:, None] * inv_freq[None, :]  # one float32 rounding, as transformers' p.float() * f
    cache = torch.cat([angles.cos(), angles.sin()], dim=1) * attention_factor
    return cache.to(device) if device is not None else cache
