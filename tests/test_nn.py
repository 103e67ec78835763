"""apt_hal.nn: MXFP4Linear and convert_model_to_mxfp4."""

import copy
import io

import pytest
import torch
from torch import nn

from apt_hal import mxfp4, ops
from apt_hal.nn import MXFP4Linear, convert_model_to_mxfp4


def gen(seed):
    return torch.Generator().manual_seed(seed)


def linear(k, n, bias=True, seed=0, dtype=torch.float32):
    layer = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=gen(seed)))
        if bias:
            layer.bias.copy_(torch.randn(n, generator=gen(seed + 1)))
    return layer


def fake_quantized(layer):
    """The same Linear with its weight replaced by its exact MXFP4 values."""
    out = copy.deepcopy(layer)
    with torch.no_grad():
        out.weight.copy_(mxfp4.dequantize(*mxfp4.quantize(layer.weight), layer.weight.dtype))
    return out


# ---- MXFP4Linear -----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_stores_the_mxfp4_weight_and_computes_fp4_matmul(bias):
    lin = linear(64, 24, bias=bias)
    layer = MXFP4Linear.from_linear(lin)
    assert (layer.in_features, layer.out_features) == (64, 24)
    assert layer.weight_packed.dtype == layer.weight_scales.dtype == torch.uint8
    assert layer.weight_packed.shape == (24, 32) and layer.weight_scales.shape == (24, 2)
    packed, scales = mxfp4.quantize(lin.weight.detach())
    assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.weight_scales, scales)
    x = torch.randn(2, 5, 64, generator=gen(2))
    y = layer(x)
    assert torch.equal(y, ops.fp4_matmul(x, packed, scales, lin.bias))
    torch.testing.assert_close(y, fake_quantized(lin)(x), rtol=1e-5, atol=1e-5)
    if bias:
        assert torch.equal(layer.bias, lin.bias) and layer.bias.data_ptr() != lin.bias.data_ptr()
    else:
        assert layer.bias is None
    assert layer.training and not MXFP4Linear.from_linear(lin.eval()).training  # the mode carries over


def test_fresh_layer_computes_zero_plus_bias():
    layer = MXFP4Linear(32, 4)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(4.0))
    assert layer(torch.randn(3, 32)).tolist() == [[0.0, 1.0, 2.0, 3.0]] * 3


def test_in_features_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match=r"in_features=40 is not a multiple of 32"):
        MXFP4Linear.from_linear(nn.Linear(40, 8))
    with pytest.raises(ValueError, match=r"in_features=33 is not a multiple of 32"):
        MXFP4Linear(33, 8)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        MXFP4Linear.from_linear(nn.Linear(32, 8, dtype=torch.float64))


def test_extra_repr():
    assert repr(MXFP4Linear(64, 16, bias=False)) == \
        "MXFP4Linear(in_features=64, out_features=16, bias=False, weight=mxfp4)"


def test_state_dict_round_trips():
    layer = MXFP4Linear.from_linear(linear(96, 10, seed=3))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert set(state) == {"weight_packed", "weight_scales", "bias"}
    fresh = MXFP4Linear(96, 10)
    fresh.load_state_dict(state)
    x = torch.randn(4, 96, generator=gen(4))
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="size mismatch for weight_packed"):
        MXFP4Linear(64, 10).load_state_dict(state)


def test_dtypes_devices_and_gradients():
    layer = MXFP4Linear.from_linear(linear(64, 12, seed=5)).to(torch.bfloat16)
    assert layer.weight_packed.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16  # codes stay codes
    x = torch.randn(3, 64, generator=gen(6)).to(torch.bfloat16).requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    w = mxfp4.dequantize(layer.weight_packed, layer.weight_scales)
    torch.testing.assert_close(x.grad.float(), w.sum(0).expand(3, 64), rtol=2.0 ** -8, atol=1e-5)
    assert layer.bias.grad.tolist() == [3.0] * 12
    # A float32 bias serves any input dtype: it is cast to the input's.
    layer32 = MXFP4Linear.from_linear(linear(64, 12, seed=5))
    torch.testing.assert_close(layer32(x.detach()), layer(x.detach()), rtol=0, atol=0)


# ---- convert_model_to_mxfp4 ------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.up = linear(64, 128, seed=seed)
        self.down = linear(128, 64, seed=seed + 2)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(10), Block(20)])
        self.odd = linear(64, 40, seed=30)  # K=64; its successor has K=40
        self.proj = linear(40, 64, seed=32)
        self.small = linear(64, 8, seed=34)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)  # out_proj: a Linear subclass
        self.lm_head = linear(64, 50, seed=36)

    def forward(self, x):
        for block in self.layers:
            x = x + block(x)
        x = x + self.proj(self.odd(x)) + self.small(x).sum(-1, keepdim=True)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.lm_head(x)


def test_convert_replaces_eligible_layers_in_place_and_reports_the_rest():
    model = Model()
    reference = fake_quantized_model(model, ["layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down", "odd"])
    with pytest.warns(UserWarning) as record:
        out = convert_model_to_mxfp4(model, min_features=16)
    assert out is model
    assert [type(m).__name__ for m in (*model.layers[0].children(), *model.layers[1].children())] == ["MXFP4Linear"] * 4
    assert isinstance(model.odd, MXFP4Linear)
    assert type(model.proj) is nn.Linear  # K=40: reported
    assert type(model.small) is nn.Linear  # out_features 8 < min_features: the caller's choice, not reported
    assert type(model.lm_head) is nn.Linear  # excluded by default, not reported
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear  # reported
    (warning,) = record
    message = str(warning.message)
    assert "proj: in_features=40 is not a multiple of 32" in message
    assert "attn.out_proj: NonDynamicallyQuantizableLinear is a subclass of nn.Linear" in message
    assert "small" not in message and "lm_head" not in message
    x = torch.randn(2, 3, 64, generator=gen(40))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def fake_quantized_model(model, names):
    ref = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = ref.get_submodule(parent_name)
        setattr(parent, child, fake_quantized(getattr(parent, child)))
    return ref


def test_include_and_exclude_patterns():
    model = convert_model_to_mxfp4(Model(), include="*.up", exclude=None)
    assert [isinstance(b.up, MXFP4Linear) for b in model.layers] == [True, True]
    assert not any(isinstance(m, MXFP4Linear) for n, m in model.named_modules() if not n.endswith(".up"))

    model = convert_model_to_mxfp4(Model(), include=["layers.1.*", "lm_head"], exclude=None)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, MXFP4Linear))
    assert converted == ["layers.1.down", "layers.1.up", "lm_head"]

    nested = nn.Sequential(Model())
    with pytest.warns(UserWarning):
        convert_model_to_mxfp4(nested, exclude=["lm_head", "layers.0"])  # a pattern matches dotted suffixes too
    assert type(nested[0].lm_head) is nn.Linear and type(nested[0].layers[0].up) is nn.Linear
    assert isinstance(nested[0].layers[1].up, MXFP4Linear)

    lookalike = convert_model_to_mxfp4(nn.ModuleDict({"lm_head_norm": linear(32, 32)}))
    assert isinstance(lookalike["lm_head_norm"], MXFP4Linear)  # "lm_head" names whole components only

    with pytest.raises(TypeError, match="'include' must be a string or strings"):
        convert_model_to_mxfp4(Model(), include=[3])


def test_a_shared_linear_stays_shared():
    shared = linear(32, 32, seed=50)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    convert_model_to_mxfp4(model)
    assert isinstance(model[0], MXFP4Linear) and model[0] is model[2]


def test_memory_is_at_most_0_28_of_bf16():
    model = nn.Sequential(linear(32, 16, seed=60), linear(64, 96, seed=61), linear(1024, 32, seed=62))
    bf16_bytes = sum(m.weight.numel() * 2 for m in model)
    convert_model_to_mxfp4(model)
    fp4_bytes = sum(m.weight_packed.nbytes + m.weight_scales.nbytes for m in model)
    # 4 bits per element + 8 bits per 32 elements = 4.25 bits against 16: exactly 17/64 = 0.2656.
    assert fp4_bytes / bf16_bytes == 17 / 64 <= 0.28


def test_a_small_transformers_llama_converts_and_matches_its_fake_quantized_twin():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(70)
    model = LlamaForCausalLM(config).eval()
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    reference = fake_quantized_model(model, linears)
    convert_model_to_mxfp4(model)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, MXFP4Linear)) == sorted(linears)
    assert len(linears) == 2 * 7
    ids = torch.randint(0, 96, (2, 9), generator=gen(71))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
