"""apt_hal.rope against Hugging Face transformers' RoPE code (the formulas the model families ship with).

Tolerances: inverse frequencies and attention factors must be *exactly* equal to transformers'
(the same float32 operations in the same order); cos/sin caches within one float32 ulp (cos and
sin are vectorised differently for differently shaped tensors, and Llama 4 uses torch.polar).
Everything runs on tiny configs built locally: nothing is downloaded.
"""

import math

import pytest
import torch
import transformers
from transformers import GPTNeoXConfig, GptOssConfig, Llama4TextConfig, LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama4 import modeling_llama4
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from apt_hal import rope
from apt_hal.rope import RopeConfig


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    # Tiny configs trip harmless warnings (vocabulary size, Phi-3's implicit factor).
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama(rope_parameters, head_dim=128, max_position_embeddings=131072, **kw):
    return LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                       intermediate_size=32, num_hidden_layers=1, vocab_size=16,
                       max_position_embeddings=max_position_embeddings, rope_parameters=rope_parameters, **kw)


def _phi3(head_dim, max_position_embeddings=131072, original=4096, seed=0, partial_rotary_factor=1.0, **rope_extra):
    # Phi-3 keeps original_max_position_embeddings at the top level and gives no factor.
    rotary_dim = int(head_dim * partial_rotary_factor)
    gen = torch.Generator().manual_seed(seed)
    short = (1 + torch.rand(rotary_dim // 2, generator=gen)).tolist()
    long = (1 + 30 * torch.rand(rotary_dim // 2, generator=gen)).tolist()
    return Phi3Config(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                      partial_rotary_factor=partial_rotary_factor,
                      intermediate_size=32, num_hidden_layers=1, vocab_size=16, pad_token_id=0, eos_token_id=0,
                      max_position_embeddings=max_position_embeddings, original_max_position_embeddings=original,
                      rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long, **rope_extra})


def _gpt_oss(max_position_embeddings=131072):
    return GptOssConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                        intermediate_size=32, num_hidden_layers=1, vocab_size=16, num_local_experts=2,
                        max_position_embeddings=max_position_embeddings,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                         "original_max_position_embeddings": 4096})


def _llama4(rope_parameters=None, num_hidden_layers=8, **kw):
    return Llama4TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                            intermediate_size=32, intermediate_size_mlp=32, num_hidden_layers=num_hidden_layers,
                            vocab_size=16, rope_parameters=rope_parameters, **kw)


def assert_within_ulps(actual, expected, ulps):
    """float32 tensors equal within ``ulps`` units in the last place of ``expected``; no NaN passes."""
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    ulp = torch.nextafter(expected.abs(), torch.tensor(math.inf)) - expected.abs()
    excess = (actual - expected).abs() - ulps * ulp
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} values differ by more than {ulps} ulp(s)"


# ---- inverse frequencies and attention factors vs transformers' ROPE_INIT_FUNCTIONS --------------

# (id, transformers config, sequence lengths to evaluate at)
HF_CASES = [
    ("linear", lambda: _llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), [None]),
    ("dynamic", lambda: _llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                               max_position_embeddings=4096), [None, 1, 2048, 4096, 4097, 6000, 8192, 20000]),
    ("dynamic-partial", lambda: _llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0,
                                        "partial_rotary_factor": 0.25}, max_position_embeddings=2048),
     [None, 3000]),
    ("yarn-gpt-oss", _gpt_oss, [None]),
    ("yarn-qwen", lambda: _llama({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                  "original_max_position_embeddings": 32768}), [None]),
    ("yarn-deepseek-mscale", lambda: _llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                             "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                                             "original_max_position_embeddings": 4096}, head_dim=64,
                                            max_position_embeddings=163840), [None]),
    ("yarn-implicit-factor", lambda: _llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                                             "original_max_position_embeddings": 4096}, head_dim=64,
                                            max_position_embeddings=65536), [None]),
    ("yarn-attention-factor", lambda: _llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                              "attention_factor": 0.75, "original_max_position_embeddings": 2048},
                                             head_dim=32), [None]),
    ("llama3.1-8b", lambda: _llama(LLAMA31), [None]),
    ("llama3.2-1b", lambda: _llama({**LLAMA31, "factor": 32.0}, head_dim=64), [None]),
    ("longrope-phi3", lambda: _phi3(96), [None, 4096, 4097, 131072]),
    ("longrope-phi4-partial", lambda: _phi3(128, seed=1, partial_rotary_factor=0.75), [None, 4097]),
    ("longrope-attention-factor", lambda: _phi3(32, attention_factor=1.5, factor=4.0), [None, 5000]),
]


@pytest.mark.parametrize("name,make,seq_lens", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_inv_freq_and_attention_factor_equal_transformers(name, make, seq_lens):
    hf = make()
    cfg = RopeConfig.from_hf(hf.to_dict())
    assert cfg.variant == hf.rope_parameters["rope_type"]
    for n in seq_lens:
        want, want_factor = ROPE_INIT_FUNCTIONS[cfg.variant](hf, seq_len=n)
        got, got_factor = rope.inv_freq_and_attention_factor(cfg, n)
        assert got.dtype == torch.float32 and got.shape == (cfg.rotary_dim // 2,)
        assert torch.equal(got, want), f"seq_len={n}"
        assert got_factor == want_factor, f"seq_len={n}"


def test_default_inv_freq_equals_transformers_llama_and_partial_gpt_neox():
    hf = _llama({"rope_type": "default", "rope_theta": 500000.0})
    want, want_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    got, got_factor = rope.default_inv_freq(RopeConfig.from_hf(hf.to_dict()))
    assert torch.equal(got, want) and got_factor == want_factor == 1.0

    neox = GPTNeoXConfig(hidden_size=256, num_attention_heads=4, intermediate_size=32, num_hidden_layers=1,
                         vocab_size=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.25})
    cfg = RopeConfig.from_hf(neox.to_dict())
    assert cfg.rotary_dim == 16
    want, _ = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(neox)
    assert torch.equal(rope.default_inv_freq(cfg)[0], want)


def test_variant_functions_agree_with_the_dispatcher():
    cfg = RopeConfig.from_hf(_llama(LLAMA31).to_dict())
    got, factor = rope.llama3_inv_freq(cfg)
    assert torch.equal(got, rope.inv_freq_and_attention_factor(cfg)[0]) and factor == 1.0
    # Llama 3.1 leaves high frequencies alone and divides the lowest ones by the factor, exactly.
    default, _ = rope.default_inv_freq(cfg)
    assert got[0] == default[0] and got[-1] == default[-1] / 8.0


def test_llama4_inv_freq_equals_transformers_with_and_without_scaling():
    scout = _llama4({**LLAMA31, "factor": 16.0, "high_freq_factor": 1.0})  # Scout: low == high, a step
    maverick = _llama4({"rope_type": "default", "rope_theta": 500000.0})
    for hf in (scout, maverick):
        cfg = RopeConfig.from_hf(hf.to_dict())
        assert cfg.variant == "llama4"
        emb = modeling_llama4.Llama4TextRotaryEmbedding(hf)
        got, factor = rope.llama4_inv_freq(cfg)
        assert torch.equal(got, emb.inv_freq) and factor == emb.attention_scaling == 1.0
        assert torch.isfinite(got).all()
    assert not torch.equal(rope.llama4_inv_freq(RopeConfig.from_hf(scout.to_dict()))[0],
                           rope.llama4_inv_freq(RopeConfig.from_hf(maverick.to_dict()))[0])


# ---- hand-computed cases --------------------------------------------------------------------------

def test_default_and_linear_by_hand():
    cfg = RopeConfig(variant="default", rotary_dim=4, base=100.0, max_position=4)
    inv_freq, factor = rope.default_inv_freq(cfg)  # 100^(-0/4) = 1, 100^(-2/4) = 1/10
    assert torch.equal(inv_freq, torch.tensor([1.0, 0.1])) and factor == 1.0
    linear = RopeConfig(variant="linear", rotary_dim=4, base=100.0, max_position=4, factor=4.0)
    assert torch.equal(rope.linear_inv_freq(linear)[0], torch.tensor([0.25, 0.025]))

    cache = rope.cos_sin_cache(cfg)
    assert cache.shape == (4, 4) and cache.dtype == torch.float32
    assert torch.equal(cache[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    angles = [3.0, 0.3]  # position 3
    want = torch.tensor([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
    torch.testing.assert_close(cache[3], want, rtol=2e-7, atol=2e-7)
    # Linear scaling by 4 at position 3 is default RoPE at position 3/4.
    want = torch.tensor([math.cos(0.75), math.cos(0.075), math.sin(0.75), math.sin(0.075)])
    torch.testing.assert_close(rope.cos_sin_cache(linear)[3], want, rtol=2e-7, atol=2e-7)


def test_yarn_attention_factor_by_hand():
    cfg = RopeConfig(variant="yarn", rotary_dim=8, max_position=64, factor=32.0, original_max_position_embeddings=4)
    assert rope.yarn_inv_freq(cfg)[1] == pytest.approx(0.1 * math.log(32) + 1, rel=1e-15)
    # Every cache entry carries the factor: cos^2 + sin^2 = factor^2.
    cache = rope.cos_sin_cache(cfg)
    torch.testing.assert_close(cache[:, :4] ** 2 + cache[:, 4:] ** 2,
                               torch.full((64, 4), (0.1 * math.log(32) + 1) ** 2), rtol=1e-6, atol=0)


# ---- caches vs transformers' rotary embedding modules -------------------------------------------

def _hf_cos_sin(module, positions, rotary_dim):
    """cos and sin [P, R/2] from a transformers rotary embedding module."""
    cos, sin = module(torch.zeros(1), positions[None])
    cos, sin = cos[0], sin[0]
    if cos.shape[-1] == rotary_dim:  # Llama-style modules duplicate the halves: cat(freqs, freqs)
        assert torch.equal(cos[:, : rotary_dim // 2], cos[:, rotary_dim // 2:])
        cos, sin = cos[:, : rotary_dim // 2], sin[:, : rotary_dim // 2]
    return cos, sin


CACHE_CASES = [
    ("default", lambda: _llama({"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=1024),
     LlamaRotaryEmbedding, [None]),
    ("llama3.1", lambda: _llama(LLAMA31, max_position_embeddings=2048), LlamaRotaryEmbedding, [None]),
    ("yarn-gpt-oss", lambda: _gpt_oss(max_position_embeddings=2048), GptOssRotaryEmbedding, [None]),
    ("dynamic", lambda: _llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, head_dim=32,
                               max_position_embeddings=512), LlamaRotaryEmbedding, [None, 300, 512, 1500]),
    ("longrope", lambda: _phi3(32, max_position_embeddings=2048, original=512), Phi3RotaryEmbedding,
     [None, 400, 512, 513, 2048]),
]


@pytest.mark.parametrize("name,make,module_cls,seq_lens", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_cos_sin_cache_equals_transformers_rotary_embedding(name, make, module_cls, seq_lens):
    hf = make()
    cfg = RopeConfig.from_hf(hf.to_dict(), max_position=2048)
    half = cfg.rotary_dim // 2
    for n in seq_lens:
        # transformers' dynamic/longrope modules pick their frequencies from max(position_ids) + 1;
        # seq_len=None is their initial state, that of sequences no longer than the original length.
        length = n or (cfg.original_length if cfg.variant in ("dynamic", "longrope") else cfg.max_position)
        module = module_cls(hf)
        want_cos, want_sin = _hf_cos_sin(module, torch.arange(length), cfg.rotary_dim)
        cache = rope.cos_sin_cache(cfg, seq_len=n)
        assert cache.shape == (cfg.max_position, cfg.rotary_dim) and cache.dtype == torch.float32
        assert_within_ulps(cache[:length, :half], want_cos, ulps=1)
        assert_within_ulps(cache[:length, half:], want_sin, ulps=1)
        assert module.attention_scaling == rope.inv_freq_and_attention_factor(cfg, n)[1]


def test_llama4_cache_equals_transformers_polar_freqs_cis():
    hf = _llama4({**LLAMA31, "factor": 16.0, "high_freq_factor": 1.0}, max_position_embeddings=1024)
    cfg = RopeConfig.from_hf(hf.to_dict())
    freqs_cis = modeling_llama4.Llama4TextRotaryEmbedding(hf)(torch.zeros(1), torch.arange(1024)[None])[0]
    cache = rope.cos_sin_cache(cfg)
    assert_within_ulps(cache[:, :16], freqs_cis.real.contiguous(), ulps=1)
    assert_within_ulps(cache[:, 16:], freqs_cis.imag.contiguous(), ulps=1)


def test_dynamic_cache_is_the_default_one_up_to_the_original_length_and_grows_after():
    cfg = RopeConfig(variant="dynamic", rotary_dim=16, max_position=256, factor=2.0,
                     original_max_position_embeddings=64)
    default = rope.cos_sin_cache(RopeConfig(variant="default", rotary_dim=16, max_position=256))
    assert torch.equal(rope.cos_sin_cache(cfg), default)
    assert torch.equal(rope.cos_sin_cache(cfg, seq_len=64), default)
    longer = rope.cos_sin_cache(cfg, seq_len=128)
    assert not torch.equal(longer, default)
    # A larger base lowers every frequency but the first: angles at position 1 shrink.
    assert longer[1, 0] == default[1, 0] and (longer[1, 1:8] > default[1, 1:8]).all()


def test_cache_is_built_in_float32_not_bf16():
    # The lowest frequency of Llama 3: in fp32, 4096 positions give 4096 distinct angles (sin ~ angle
    # there); built from bf16 positions they collapse to a few hundred.
    cfg = RopeConfig(variant="default", rotary_dim=128, base=500000.0, max_position=4096)
    cache = rope.cos_sin_cache(cfg)
    lowest_sin = cache[:, -1]
    assert lowest_sin.unique().numel() == 4096
    inv_freq = rope.default_inv_freq(cfg)[0]
    bf16_angles = torch.arange(4096).to(torch.bfloat16).float() * inv_freq[-1]
    assert bf16_angles.unique().numel() < 1000


def test_cache_device_argument():
    cfg = RopeConfig(variant="default", rotary_dim=8, max_position=16)
    cache = rope.cos_sin_cache(cfg, device="meta")
    assert cache.device.type == "meta" and cache.shape == (16, 8) and cache.dtype == torch.float32


# ---- Llama 4: NoPE layers and their temperature ---------------------------------------------------

def test_llama4_layer_pattern_equals_transformers():
    for interval in (4, 3):
        hf = _llama4(num_hidden_layers=12, no_rope_layer_interval=interval)
        cfg = RopeConfig.from_hf(hf.to_dict())
        ours = [rope.llama4_layer_uses_rope(i, interval) for i in range(12)]
        assert ours == [bool(x) for x in hf.no_rope_layers] == [cfg.uses_rope(i) for i in range(12)]
        assert [modeling_llama4.Llama4TextAttention(hf, i).use_rope for i in range(12)] == ours
    assert [i for i in range(12) if not rope.llama4_layer_uses_rope(i)] == [3, 7, 11]
    # An explicit per-layer list in the checkpoint wins over the interval.
    explicit = RopeConfig.from_hf(_llama4(num_hidden_layers=4, no_rope_layers=[0, 1, 1, 1]).to_dict())
    assert [explicit.uses_rope(i) for i in range(4)] == [False, True, True, True]
    assert RopeConfig(variant="default", rotary_dim=8, max_position=8).uses_rope(3)


def test_llama4_nope_temperature_equals_transformers_attention(monkeypatch):
    torch.manual_seed(0)
    hf = _llama4(num_hidden_layers=4, floor_scale=4, attn_scale=0.25)
    hf._attn_implementation = "eager"
    attention = modeling_llama4.Llama4TextAttention(hf, layer_idx=3)  # a NoPE layer
    assert not attention.use_rope
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured["query"] = query  # [B, H, S, D], after the temperature
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    monkeypatch.setattr(modeling_llama4, "eager_attention_forward", capture)
    seq = 40
    hidden = torch.randn(1, seq, 64)
    attention(hidden, position_embeddings=None, attention_mask=None)
    q = attention.q_proj(hidden).view(1, seq, -1, 32)
    temperature = rope.llama4_nope_temperature(torch.arange(seq), floor_scale=4, attn_scale=0.25)
    assert temperature.dtype == torch.float32
    torch.testing.assert_close(captured["query"].transpose(1, 2), q * temperature[None, :, None, None],
                               rtol=0, atol=0)
    # By hand: floor((p+1)/4) steps at p = 3, 7, ...
    want = [1 + 0.25 * math.log(math.floor((p + 1) / 4) + 1) for p in range(seq)]
    torch.testing.assert_close(temperature, torch.tensor(want), rtol=1e-6, atol=0)
    assert rope.llama4_nope_temperature(torch.tensor([0, 8190]))[0] == 1.0  # defaults: floor_scale 8192
    assert rope.llama4_nope_temperature(torch.tensor([8191])).item() == pytest.approx(1 + 0.1 * math.log(2))


# ---- from_hf on config.json dicts as checkpoints ship them ----------------------------------------

def test_from_hf_reads_checkpoint_configs():
    gpt_oss = {"model_type": "gpt_oss", "head_dim": 64, "hidden_size": 2880, "num_attention_heads": 64,
               "max_position_embeddings": 131072, "rope_theta": 150000,
               "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False}}
    assert RopeConfig.from_hf(gpt_oss) == RopeConfig(
        variant="yarn", rotary_dim=64, max_position=131072, base=150000.0, factor=32.0,
        original_max_position_embeddings=4096, truncate=False)

    deepseek = {"hidden_size": 7168, "num_attention_heads": 128, "qk_rope_head_dim": 64,
                "max_position_embeddings": 163840, "rope_theta": 10000,
                "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                 "original_max_position_embeddings": 4096, "type": "yarn"}}
    cfg = RopeConfig.from_hf(deepseek)
    assert (cfg.rotary_dim, cfg.factor, cfg.mscale, cfg.mscale_all_dim) == (64, 40, 1.0, 1.0)
    assert rope.yarn_inv_freq(cfg)[1] == 1.0  # mscale == mscale_all_dim: DeepSeek moves it into the softmax

    llama4 = {"model_type": "llama4", "text_config": {
        "model_type": "llama4_text", "head_dim": 128, "hidden_size": 5120, "num_attention_heads": 40,
        "max_position_embeddings": 10485760, "rope_theta": 500000.0, "attention_chunk_size": 8192,
        "attn_temperature_tuning": 4, "floor_scale": 8192, "attn_scale": 0.1, "no_rope_layers": [],
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}}}
    cfg = RopeConfig.from_hf(llama4, max_position=4096)  # a 10M-row cache would take 5 GB
    assert (cfg.variant, cfg.max_position, cfg.factor, cfg.attn_temperature_tuning) == ("llama4", 4096, 16.0, True)
    assert [cfg.uses_rope(i) for i in range(8)] == [True, True, True, False] * 2

    # Shrinking the cache changes no frequency: the implicit yarn factor comes from the HF config.
    implicit = {"head_dim": 32, "max_position_embeddings": 65536,
                "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 4096}}
    full, small = RopeConfig.from_hf(implicit), RopeConfig.from_hf(implicit, max_position=128)
    assert small.factor == full.factor == 16.0
    assert torch.equal(rope.cos_sin_cache(small), rope.cos_sin_cache(full)[:128])
    assert RopeConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 32},
                              head_dim=8).rotary_dim == 8


# ---- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,message", [
    (dict(variant="ntk"), "variant must be one of"),
    (dict(rotary_dim=7), "rotary_dim must be even"),
    (dict(rotary_dim=0), "rotary_dim must be a positive int"),
    (dict(max_position=0), "max_position must be a positive int"),
    (dict(max_position=2 ** 24 + 1), "max_position must be at most 2\\*\\*24"),
    (dict(base=1.0), "base \\(rope_theta\\) must be > 1"),
    (dict(variant="linear"), "variant 'linear' requires factor"),
    (dict(variant="linear", factor=0.0), "factor must be > 0"),
    (dict(variant="yarn", factor=-2.0), "factor must be > 0"),
    (dict(variant="dynamic", factor=2.0, rotary_dim=2), "requires rotary_dim >= 4"),
    (dict(variant="llama3", factor=8.0), "requires low_freq_factor and high_freq_factor"),
    (dict(variant="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "high_freq_factor must be >="),
    (dict(variant="longrope", long_factor=(1.0,) * 4), "requires short_factor"),
    (dict(variant="longrope", short_factor=(1.0,) * 4, long_factor=(1.0,) * 3),
     "long_factor must have rotary_dim/2 = 4"),
    (dict(variant="longrope", short_factor=(1.0, 0.0, 1.0, 1.0), long_factor=(1.0,) * 4), "short_factor values"),
    (dict(variant="yarn", factor=4.0, beta_fast=1.0, beta_slow=32.0), "beta_slow <= beta_fast"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings must be a positive int"),
    (dict(variant="llama4", no_rope_layer_interval=0), "no_rope_layer_interval must be a positive int"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        RopeConfig(**{"variant": "default", "rotary_dim": 8, "max_position": 64, **fields})


def test_function_errors():
    cfg = RopeConfig(variant="dynamic", rotary_dim=8, max_position=64, factor=2.0)
    with pytest.raises(ValueError, match="seq_len=65 exceeds the cache length max_position=64"):
        rope.cos_sin_cache(cfg, seq_len=65)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        rope.inv_freq_and_attention_factor(cfg, 0)
    with pytest.raises(ValueError, match="needs low_freq_factor"):
        rope.llama3_inv_freq(RopeConfig(variant="linear", rotary_dim=8, max_position=64, factor=2.0))
    with pytest.raises(ValueError, match="positions must be an integer tensor"):
        rope.llama4_nope_temperature(torch.arange(4.0))
    with pytest.raises(ValueError, match="layer_idx must be an int >= 0"):
        rope.llama4_layer_uses_rope(-1)
    with pytest.raises(ValueError, match="unsupported rope_type 'proportional'"):
        RopeConfig.from_hf({"head_dim": 8, "max_position_embeddings": 8, "rope_scaling": {"rope_type": "proportional"}})
    with pytest.raises(ValueError, match="nested per layer type"):
        RopeConfig.from_hf({"head_dim": 8, "max_position_embeddings": 8,
                            "rope_parameters": {"full_attention": {"rope_type": "default"}}})
    with pytest.raises(ValueError, match="no head size"):
        RopeConfig.from_hf({"max_position_embeddings": 8})


def test_config_is_hashable_and_lists_become_tuples():
    cfg = RopeConfig(variant="longrope", rotary_dim=4, max_position=8, factor=2.0,
                     short_factor=[1.0, 1.0], long_factor=[2.0, 3.0])
    assert cfg.short_factor == (1.0, 1.0) and hash(cfg) == hash(RopeConfig(**vars(cfg)))


@pytest.mark.parametrize("field,value", [("base", "big"), ("factor", "x"), ("attention_factor", math.nan),
                                         ("beta_fast", math.inf), ("low_freq_factor", True), ("mscale", [1.0])])
def test_number_fields_must_be_finite_numbers(field, value):
    # Before: a string raised "'>' not supported between instances of 'str' and 'int'", naming no field.
    with pytest.raises(ValueError, match=rf"RopeConfig: {field} must be a finite number, got"):
        RopeConfig(variant="default", rotary_dim=8, max_position=16, **{field: value})
