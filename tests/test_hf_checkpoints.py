"""Hugging Face checkpoints (apt_hal.models.hf): Llama, Mixtral and gpt-oss load into the APT
models and save back. Tiny random transformers models are built and saved here (nothing is
downloaded); logits, gradients and greedy generations are compared with transformers' own.

Tolerances: float32 logits within rtol = atol = 1e-4 (observed: below 2e-6 at logits of
magnitude ~3); gradients within rtol 1e-4, atol 1e-6 (observed: below 7e-7 of each tensor's
largest gradient). bfloat16, per position the largest logit error against transformers'
float32 logits: its median is under 0.03 (two bf16 steps at magnitude 3) and at most 1.25x that
of transformers' own bf16 run; every position of the dense model is within 0.06. An MoE position
can be far off in either implementation: a router near-tie within one bf16 step picks other
experts (observed in both, at different positions).
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Mxfp4Config,
)

from apt_hal import rope
from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate
from apt_hal.models.hf import config_from_hf, config_to_hf, load_pretrained, save_pretrained
from apt_hal.nn import convert_model_to_mxfp4

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.1)
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 64, "rope_theta": 150000.0}
CASES = {
    "llama-tied": (LlamaForCausalLM, LlamaConfig(**COMMON, tie_word_embeddings=True), {}),
    "llama-bias-llama3-rope": (LlamaForCausalLM, LlamaConfig(
        **COMMON, attention_bias=True, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_theta": 10000.0}), {}),
    "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2), {}),
    "mixtral-fused-sharded-sliding": (MixtralForCausalLM, MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
        dict(save_original_format=False, max_shard_size="60KB")),
    "gpt-oss": (GptOssForCausalLM, GptOssConfig(
        **COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.0,
        max_position_embeddings=256, rope_parameters=GPT_OSS_ROPE), {}),
}


def configured(model):
    """``model`` computing the function its config describes. transformers up to 5.17 (the GPU
    image's) hard-code gpt-oss's swiglu alpha 1.702 and limit 7.0 on the experts module and ignore
    ``config.swiglu_limit``; later versions read the config. Setting the module's attributes from
    the config makes either version compute the configured function (real checkpoints: 1.702, 7.0)."""
    if isinstance(model, GptOssForCausalLM):
        for layer in model.model.layers:
            layer.mlp.experts.alpha = getattr(model.config, "swiglu_alpha", 1.702)
            layer.mlp.experts.limit = model.config.swiglu_limit
    return model


def hf_checkpoint(name, tmp_path, seed=0):
    """A random transformers model of CASES[name], saved to tmp_path; returns (model, folder)."""
    cls, config, save_kwargs = CASES[name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    if cls is GptOssForCausalLM:
        for layer in model.model.layers:  # transformers initializes sinks near 0, where they barely act
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    folder = tmp_path / name
    model.save_pretrained(folder, **save_kwargs)
    return configured(model), folder


def token_ids(seed=1, shape=(2, 24)):
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, shape)


def tensors_of(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers_in_float32(name, tmp_path):
    hf, folder = hf_checkpoint(name, tmp_path)
    ours = load_pretrained(folder)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-tied", "mixtral", "gpt-oss"])
def test_logits_match_transformers_in_bfloat16(name, tmp_path):
    hf, folder = hf_checkpoint(name, tmp_path)
    ids = token_ids()
    with torch.no_grad():
        reference = hf(ids).logits
        theirs = configured(type(hf).from_pretrained(folder, dtype=torch.bfloat16)).eval()(ids).logits.float()
        ours_model = load_pretrained(folder, dtype=torch.bfloat16)
        assert ours_model.embed.weight.dtype == torch.bfloat16
        ours = ours_model(ids).logits.float()
    # Per position, the largest logit error against the float32 reference.
    our_error, their_error = (ours - reference).abs().amax(-1), (theirs - reference).abs().amax(-1)
    assert our_error.median() <= 1.25 * their_error.median(), (our_error.median(), their_error.median())
    assert our_error.median() < 0.03
    if name.startswith("llama"):  # no routing to flip: every position is close
        assert our_error.max() < 0.06


@pytest.mark.parametrize("name", ["llama-tied", "llama-bias-llama3-rope", "mixtral", "gpt-oss"])
def test_saving_writes_back_transformers_own_files(name, tmp_path):
    _, folder = hf_checkpoint(name, tmp_path)
    save_pretrained(load_pretrained(folder), tmp_path / "back")
    original, back = tensors_of(folder), tensors_of(tmp_path / "back")
    assert back.keys() == original.keys()
    for key, t in original.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    hf_back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config_from_hf(hf_back) == config_from_hf(json.loads((folder / "config.json").read_text()))


def test_the_fused_mixtral_format_saves_in_the_classic_one_and_loads_equal(tmp_path):
    _, folder = hf_checkpoint("mixtral-fused-sharded-sliding", tmp_path)
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    ours = load_pretrained(folder)
    save_pretrained(ours, tmp_path / "classic", max_shard_size="50KB")
    keys = tensors_of(tmp_path / "classic").keys()
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    index = json.loads((tmp_path / "classic" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(keys)
    again = load_pretrained(tmp_path / "classic")
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert MixtralForCausalLM.from_pretrained(tmp_path / "classic").config.sliding_window == 5


def test_gpt_oss_mxfp4_experts_save_as_blocks_and_scales_that_transformers_reads(tmp_path):
    # Quantize the experts, save in OpenAI's layout; transformers' own decoder of that layout
    # (it dequantizes on the CPU) gives our logits, and loading it back gives the same bits.
    hf, folder = hf_checkpoint("gpt-oss", tmp_path)
    ours = load_pretrained(folder, mxfp4_experts=True)
    assert ours.layers[0].ffn.w_up.dtype == torch.uint8
    save_pretrained(ours, tmp_path / "mxfp4")
    files = tensors_of(tmp_path / "mxfp4")
    prefix = "model.layers.0.mlp.experts.gate_up_proj"
    blocks, scales = files[prefix + "_blocks"], files[prefix + "_scales"]
    assert blocks.dtype == scales.dtype == torch.uint8
    assert tuple(blocks.shape) == (4, 128, 2, 16) and tuple(scales.shape) == (4, 128, 2)  # [E, 2F, d/32, 16]
    assert "model.layers.0.mlp.experts.gate_up_proj" not in files
    theirs = configured(GptOssForCausalLM.from_pretrained(tmp_path / "mxfp4",
                                                          quantization_config=Mxfp4Config(dequantize=True)))
    # transformers 5.17 dequantizes the experts to bfloat16 (exact: every MXFP4 value is a bf16
    # value) and then computes them in bf16; in float32 it computes the function ours does.
    theirs = theirs.float()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, rtol=1e-4, atol=1e-4)
    again = load_pretrained(tmp_path / "mxfp4")
    assert again.config.mxfp4_experts
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    dense = load_pretrained(tmp_path / "mxfp4", mxfp4_experts=False)  # exact dequantization
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-tied", "mixtral", "gpt-oss"])
def test_gradients_match_transformers(name, tmp_path):
    # Gradients flow through apt_hal.ops.rotary and moe_dispatch (the vjp of their references).
    # transformers' gradients, written as a checkpoint, load through the same name mapping.
    hf, folder = hf_checkpoint(name, tmp_path)
    ours = load_pretrained(folder)
    ids = token_ids(shape=(2, 16))
    hf_out, our_out = hf(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(our_out.lm_loss, hf_out.loss, rtol=1e-5, atol=1e-5)
    hf_out.loss.backward()
    our_out.lm_loss.backward()
    grads = {n: p.grad.contiguous() for n, p in hf.named_parameters() if "lm_head" not in n or name != "llama-tied"}
    save_file(grads, str(tmp_path / "grads.safetensors"))
    (tmp_path / "g").mkdir()
    (tmp_path / "grads.safetensors").rename(tmp_path / "g" / "model.safetensors")
    (tmp_path / "g" / "config.json").write_text((folder / "config.json").read_text())
    expected = dict(load_pretrained(tmp_path / "g").named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expected[n].detach(), rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["llama-bias-llama3-rope", "gpt-oss"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    hf, folder = hf_checkpoint(name, tmp_path)
    ours = load_pretrained(folder)
    prompt = token_ids(shape=(1, 7))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None)[0, 7:].tolist()
    assert generate(ours, prompt.tolist(), GenerationConfig(max_new_tokens=12, greedy=True)) == [theirs]


@pytest.mark.parametrize("preset", ["apt-dense-tiny", "apt-moe-tiny", "apt-oss-tiny"])
def test_configs_round_trip_through_hugging_face_json(preset):
    cfg = ModelConfig.preset(preset, z_loss_weight=0.0)  # transformers has no router z-loss
    back = config_from_hf(config_to_hf(cfg), mxfp4_experts=cfg.mxfp4_experts)
    assert dataclasses.replace(back, rope=cfg.rope) == cfg
    assert torch.equal(rope.cos_sin_cache(back.rope_config()), rope.cos_sin_cache(cfg.rope_config()))


@pytest.mark.parametrize("family, preset, change, message", [
    ("seq2seq", "apt-seq2seq-tiny", {}, "no Hugging Face format"),
    ("moe", "apt-moe-tiny", dict(mxfp4_experts=True), "mxfp4_experts=True"),
    ("dense", "apt-dense-tiny", dict(attention_sinks=True), "attention_sinks"),
    ("dense", "apt-dense-tiny", dict(rope_style="gptj"), "rope_style"),
])
def test_configs_transformers_cannot_hold_are_refused(family, preset, change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        save_pretrained(build_model(ModelConfig.preset(preset, **change)), tmp_path)


def test_saving_a_model_with_mxfp4_linear_layers_is_refused(tmp_path):
    model = convert_model_to_mxfp4(build_model(ModelConfig.preset("apt-dense-tiny")))
    with pytest.raises(ValueError, match="convert_model_to_mxfp4"):
        save_pretrained(model, tmp_path)


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    _, folder = hf_checkpoint("llama-tied", tmp_path)
    tensors = tensors_of(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.1.mlp.extra.weight'\].*"
                                         r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_pretrained(folder)


def test_loading_holds_about_one_shard_besides_the_model(tmp_path):
    # A 117 MB float32 model in 20 MB shards, loaded in a fresh process: its resident memory grows
    # by the model plus about one shard's mapped pages (measured: 136 MB). Reading every shard
    # first and then copying into the model grows by twice the model (measured: 233 MB).
    torch.manual_seed(0)
    cfg = ModelConfig(family="dense", vocab_size=4096, d_model=512, n_layers=6, n_heads=8, ffn_dim=2048)
    model = build_model(cfg)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_pretrained(model, tmp_path, max_shard_size="20MB")
    assert len(list(tmp_path.glob("*.safetensors"))) >= 5
    del model
    # VmRSS now and VmHWM (this process's peak; unlike ru_maxrss, not inherited from the parent).
    code = ("from apt_hal.models.hf import load_pretrained\n"
            "def kb(field): return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1])\n"
            "before = kb('VmRSS:')\n"
            f"load_pretrained({str(tmp_path)!r})\n"
            "print(1024 * (kb('VmHWM:') - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < 1.5 * model_bytes, f"grew {growth / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
