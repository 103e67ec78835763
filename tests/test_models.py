"""The APT models (apt_hal.models): configs, forward and loss, masks, gradients through the HAL ops,
the KV cache, MXFP4, and the seed project's defects, each with a test that would catch it.

Tiny configurations (d_model 64, 2 layers) in float32 on the CPU; every comparison states its
tolerance. Hugging Face checkpoints and generation have their own files.
"""

import ast
import dataclasses
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from apt_hal import mxfp4
from apt_hal.models import PRESETS, ModelConfig, build_model, convert_experts, parameter_count
from apt_hal.models.generate import PagedKVCache
from apt_hal.models.layers import MoEFFN
from apt_hal.nn import MXFP4Linear, convert_model_to_mxfp4

MODELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "models"
FAMILIES = ["dense", "moe", "oss", "seq2seq"]
FP32 = dict(rtol=1e-5, atol=1e-5)


def tiny(family: str, **overrides) -> ModelConfig:
    return ModelConfig.preset(f"apt-{family}-tiny", **overrides)


def model_of(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


def logits_of(model, ids, **kwargs):
    if model.config.family == "seq2seq":
        # The decoder is the causal part; the encoder sees a fixed input.
        enc = torch.arange(1, 6).expand(ids.shape[0], 5)
        return model(enc, decoder_input_ids=ids, **kwargs).logits
    return model(ids, **kwargs).logits


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json(name, tmp_path):
    cfg = ModelConfig.preset(name)
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_1b_presets_have_about_a_billion_parameters(family):
    model = build_model(ModelConfig.preset(f"apt-{family}-1b"), device="meta")  # shapes only
    assert 0.9e9 <= parameter_count(model) <= 1.2e9


@pytest.mark.parametrize("fields, message", [
    (dict(family="llama"), "family"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=60, n_heads=8), "head_dim"),
    (dict(family="dense", n_experts=4, top_k=2), "n_experts"),
    (dict(family="moe", n_experts=4, top_k=5), "top_k"),
    (dict(family="moe", n_experts=4, top_k=2, expert_activation="relu"), "expert_activation"),
    (dict(family="moe", n_experts=4, top_k=2, mxfp4_experts=True, ffn_dim=48), "mxfp4_experts"),
    (dict(mxfp4_experts=True), "mxfp4_experts needs experts"),
    (dict(layer_types=("full",)), "layer_types"),
    (dict(layer_types=("sliding", "full")), "sliding_window"),
    (dict(rope={"variant": "spiral"}), "rope"),
    (dict(rope={"variant": "default", "rotary_dim": 32}), "rotary_dim"),
    (dict(dtype="float64"), "dtype"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(family="seq2seq"), "n_encoder_layers"),
])
def test_invalid_configs_are_rejected_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_an_unknown_json_field_is_rejected(tmp_path):
    (tmp_path / "c.json").write_text('{"family": "dense", "n_layerz": 3}')
    with pytest.raises(ValueError, match="n_layerz"):
        ModelConfig.from_json(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------
# Forward, loss and inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dense", "moe", "oss"])
def test_loss_is_shifted_cross_entropy_plus_weighted_moe_losses(family):
    model = model_of(tiny(family))
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 9))
    labels = ids.clone()
    labels[0, 3] = -100  # ignored
    router_logits = []
    hooks = [m.router.register_forward_hook(lambda _module, _inputs, out: router_logits.append(out.detach()))
             for m in model.modules() if isinstance(m, MoEFFN)]
    out = model(ids, labels=labels)
    for h in hooks:
        h.remove()
    expected_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, expected_lm, **FP32)
    cfg = model.config
    if family == "dense":
        assert out.aux_loss is None and out.z_loss is None
        torch.testing.assert_close(out.loss, expected_lm, **FP32)
        return
    # The Switch load-balance loss and the z-loss, computed here from each layer's router logits.
    balance, z = [], []
    for logits in router_logits:
        logits = logits.reshape(-1, cfg.n_experts).float()
        scores = torch.softmax(logits, -1) if cfg.moe_scoring == "softmax_topk" else logits
        chosen = scores.topk(cfg.top_k, dim=-1).indices
        frac = torch.bincount(chosen.reshape(-1), minlength=cfg.n_experts).float() / chosen.numel()
        balance.append(cfg.n_experts * (frac * torch.softmax(logits, -1).mean(0)).sum())
        z.append(torch.logsumexp(logits, -1).square().mean())
    assert len(balance) == cfg.n_layers
    torch.testing.assert_close(out.aux_loss, torch.stack(balance).mean(), **FP32)
    torch.testing.assert_close(out.z_loss, torch.stack(z).mean(), **FP32)
    weighted = cfg.aux_loss_weight * out.aux_loss + cfg.z_loss_weight * out.z_loss
    torch.testing.assert_close(out.loss, expected_lm + weighted, **FP32)


def test_generation_computes_no_moe_loss_and_a_forward_with_labels_does(monkeypatch):
    # The losses are read lazily: a decode step that never reads them launches none of their kernels.
    from apt_hal.models import GenerationConfig, decoder, generate

    calls = []

    def recorded(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    for name in ("load_balance_loss", "router_z_loss"):
        monkeypatch.setattr(decoder, name, recorded(name, getattr(decoder, name)))
    model = model_of(tiny("moe"))
    generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=3, greedy=True))
    assert calls == []
    out = model(torch.randint(0, 512, (1, 5)), labels=torch.randint(0, 512, (1, 5)))
    assert calls.count("load_balance_loss") == calls.count("router_z_loss") == model.config.n_layers
    # What the output keeps for its losses: each layer's router logits and choices, no activations.
    cfg = model.config
    assert [(tuple(a.shape), tuple(b.shape)) for a, b in out.routing] == [((5, cfg.n_experts), (5, cfg.top_k))] * 2


def test_seq2seq_loss_predicts_labels_from_labels_shifted_right():
    model = model_of(tiny("seq2seq"))
    src, labels = torch.randint(0, 512, (2, 6)), torch.randint(0, 512, (2, 5))
    out = model(src, labels=labels)
    start = torch.full((2, 1), model.config.decoder_start_token_id)
    same = model(src, decoder_input_ids=torch.cat([start, labels[:, :-1]], 1))
    torch.testing.assert_close(out.logits, same.logits, **FP32)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 512), labels.reshape(-1)), **FP32)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.randint(0, 512, (2, 4)).float()), "input_ids must be an int64 or int32"),
    (lambda m: m(torch.tensor([[1, 2, 512]])), r"holds 512, outside \[0, vocab_size=512\)"),
    (lambda m: m(torch.tensor([[1, -1]])), "holds -1"),
    (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), "empty"),
    (lambda m: m(torch.ones(1, 513, dtype=torch.long)), "max_position=512"),
    (lambda m: m(torch.ones(2, 4, dtype=torch.long), labels=torch.ones(2, 3, dtype=torch.long)),
     "labels must be shaped"),
    (lambda m: m(torch.ones(2, 4, dtype=torch.long), labels=torch.full((2, 4), 600)), "labels holds 600"),
    (lambda m: m(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5)), "attention_mask must be"),
])
def test_inputs_are_validated_before_use(call, message):
    with pytest.raises(ValueError, match=message):
        call(model_of(tiny("dense")))


# ---------------------------------------------------------------------------------------------
# Masks: causal, sliding window, padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_a_future_token_never_changes_earlier_logits(family):
    model = model_of(tiny(family))
    torch.manual_seed(2)
    ids = torch.randint(0, 512, (2, 12))
    base = logits_of(model, ids)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 7) % 512
        after = logits_of(model, changed)
        torch.testing.assert_close(after[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (after[:, t:] - base[:, t:]).abs().amax() > 1e-3  # the change does reach later logits


def test_sliding_window_limits_how_far_back_a_token_is_seen():
    # Two layers of window 4: position p sees tokens p-3..p, which saw p-6..p: the receptive field.
    model = model_of(tiny("oss", layer_types=None, sliding_window=4))
    ids = torch.randint(0, 512, (1, 12))
    changed = ids.clone()
    changed[0, 2] += 1
    diff = (logits_of(model, changed) - logits_of(model, ids)).abs().amax(-1)[0]
    assert (diff[:2] < 1e-6).all() and (diff[9:] < 1e-6).all()
    assert (diff[2:9] > 1e-4).all()


@pytest.mark.parametrize("family", ["dense", "oss", "seq2seq"])
def test_padding_changes_no_real_token_logit(family):
    # Left- and right-padded rows give the logits of the same tokens run alone.
    model = model_of(tiny(family))
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 4))
    alone_a, alone_b = logits_of(model, a), logits_of(model, b)
    pad = torch.zeros(1, 3, dtype=torch.long)
    for b_padded, real in ((torch.cat([b, pad], 1), slice(0, 4)), (torch.cat([pad, b], 1), slice(3, 7))):
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, :] = False
        mask[1, real] = True
        kwargs = {"decoder_attention_mask" if family == "seq2seq" else "attention_mask": mask}
        both = logits_of(model, torch.cat([a, b_padded]), **kwargs)
        torch.testing.assert_close(both[0], alone_a[0], **FP32)
        torch.testing.assert_close(both[1, real], alone_b[0], **FP32)


def test_seq2seq_encoder_padding_changes_nothing():
    model = model_of(tiny("seq2seq"))
    src, dec = torch.randint(1, 512, (1, 5)), torch.randint(0, 512, (1, 4))
    alone = model(src, decoder_input_ids=dec).logits
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.arange(8) < 5
    torch.testing.assert_close(model(padded, decoder_input_ids=dec, attention_mask=mask[None]).logits, alone, **FP32)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_gets_a_finite_gradient(family):
    # The seed project computed its loss under torch.no_grad; here every trainable tensor learns.
    model = model_of(tiny(family))
    ids = torch.randint(0, 512, (2, 10))
    out = model(ids, labels=ids) if family != "seq2seq" else model(ids, labels=ids[:, :6])
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if not name.endswith(("w_up", "w_down", "b_up", "b_down")):  # an expert may get no token
            assert p.grad.abs().amax() > 0, name


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_matches_a_finite_difference(family):
    # Along the gradient's own direction g/|g|, the central difference of the loss equals |g|.
    # float32 with eps 1e-3: rounding error ~3e-4 absolute. A larger step can flip a token's
    # top-k experts, where the loss is not differentiable.
    model = model_of(tiny(family, init_std=0.1))
    ids = torch.randint(0, 512, (2, 8))
    labels = ids if family != "seq2seq" else ids[:, :5]
    model(ids, labels=labels).loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum(p.grad.square().sum() for p in params))
    eps = 1e-3

    def loss_at(step):
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=step / norm.item())
            loss = model(ids, labels=labels).loss.item()
            for p in params:
                p.sub_(p.grad, alpha=step / norm.item())
        return loss

    slope = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert slope == pytest.approx(norm.item(), rel=0.02)


def test_mxfp4_linear_layers_train_like_their_dequantized_weights():
    # convert_model_to_mxfp4 routes every linear layer through fp4_matmul; forward and the
    # gradients of everything else equal those of nn.Linear layers holding the exact MXFP4 values.
    model = convert_model_to_mxfp4(model_of(tiny("dense", tie_embeddings=False)))
    reference = model_of(tiny("dense", tie_embeddings=False))
    converted = [n for n, m in model.named_modules() if isinstance(m, MXFP4Linear)]
    assert len(converted) == 8  # qkv, o, gate_up, down in 2 layers; lm_head excluded
    state = model.state_dict()
    for name in converted:
        w = mxfp4.dequantize(state[name + ".weight_packed"], state[name + ".weight_scales"])
        reference.get_submodule(name).weight.data.copy_(w)
    for name, p in reference.named_parameters():
        if name in state:
            p.data.copy_(state[name])
    ids = torch.randint(0, 512, (2, 10))
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, **FP32)
    out.loss.backward()
    ref.loss.backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_optimizer_steps_fit_a_repeated_batch(family):
    torch.manual_seed(3)
    model = model_of(tiny(family))
    ids = torch.randint(0, 512, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# MoE: the seed's defects
# ---------------------------------------------------------------------------------------------


def _moe_layer(**overrides):
    torch.manual_seed(4)
    cfg = tiny("moe", **overrides)
    return build_model(cfg).layers[0].ffn, cfg


@pytest.mark.parametrize("overrides", [{}, dict(moe_renormalize=False),
                                       dict(moe_scoring="topk_softmax", expert_activation="gpt_oss_swiglu",
                                            expert_bias=True, router_bias=True)])
def test_each_token_mixes_its_top_k_experts_with_their_own_gate_weights(overrides):
    # An independent per-token computation: route, then sum weight_j * expert_j(x) over the chosen j.
    ffn, cfg = _moe_layer(**overrides)
    if ffn.b_up is not None:
        torch.nn.init.normal_(ffn.b_up, std=0.1)
        torch.nn.init.normal_(ffn.b_down, std=0.1)
    x = torch.randn(1, 7, cfg.d_model)
    out, _ = ffn(x)
    f = cfg.ffn_dim
    for t in range(7):
        logits = ffn.router(x[0, t])
        if cfg.moe_scoring == "softmax_topk":
            probs = torch.softmax(logits, -1)
            weights, experts = probs.topk(cfg.top_k)
            if cfg.moe_renormalize:
                weights = weights / weights.sum()
        else:
            top, experts = logits.topk(cfg.top_k)
            weights = torch.softmax(top, -1)
        expected = torch.zeros(cfg.d_model)
        for w, e in zip(weights, experts):
            h = ffn.w_up[e] @ x[0, t] + (ffn.b_up[e] if ffn.b_up is not None else 0)
            if cfg.expert_activation == "swiglu":
                act = F.silu(h[:f]) * h[f:]
            else:
                gate, up = h[0::2].clamp(max=7.0), h[1::2].clamp(-7.0, 7.0)
                act = (up + 1) * gate * torch.sigmoid(1.702 * gate)
            expected += w * (ffn.w_down[e] @ act + (ffn.b_down[e] if ffn.b_down is not None else 0))
        torch.testing.assert_close(out[0, t], expected, **FP32)


def test_only_the_selected_experts_are_computed():
    # Experts no token selects hold NaN weights: computing them at all would poison the output.
    ffn, cfg = _moe_layer(router_bias=True)
    x = torch.randn(5, cfg.d_model)
    with torch.no_grad():
        ffn.router.weight.zero_()
        ffn.router.bias.copy_(torch.tensor([5.0, 4.0, -5.0, -5.0]))  # every token picks experts 0 and 1
        ffn.w_up[2:] = float("nan")
        ffn.w_down[2:] = float("nan")
    out, _ = ffn(x)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# MXFP4 experts
# ---------------------------------------------------------------------------------------------


def test_mxfp4_experts_compute_with_their_exact_values():
    model = model_of(tiny("oss"))
    assert model.config.mxfp4_experts and model.layers[0].ffn.w_up.dtype == torch.uint8
    ids = torch.randint(0, 512, (2, 9))
    quantized = model(ids).logits
    convert_experts(model, False)  # dequantizing is exact
    assert model.layers[0].ffn.w_up.dtype == torch.float32 and not model.config.mxfp4_experts
    torch.testing.assert_close(model(ids).logits, quantized, **FP32)
    convert_experts(model, True)  # and quantizing exact MXFP4 values gives them back
    torch.testing.assert_close(model(ids).logits, quantized, rtol=0, atol=0)


def test_mxfp4_weight_memory_is_at_most_028_of_bf16():
    model = build_model(tiny("oss", dtype="bfloat16"))
    ffn = model.layers[0].ffn
    quantized = sum(t.numel() for t in (ffn.w_up, ffn.w_up_scales, ffn.w_down, ffn.w_down_scales))
    bf16 = 2 * (ffn.w_up.numel() * 2 + ffn.w_down.numel() * 2)
    assert quantized / bf16 <= 0.28


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_kv_cache_gives_the_logits_of_a_full_forward(family):
    # Prefill a ragged batch, then decode token by token through the paged cache (blocks of 8):
    # each step's logits equal a full forward pass over the whole sequence. 26 tokens cross
    # apt-oss-tiny's sliding window of 16.
    cfg = tiny(family)
    model = model_of(cfg)
    seqs = [torch.randint(0, 512, (26,)), torch.randint(0, 512, (21,))]
    prompt_lens = [9, 4]
    enc = model.encode(torch.randint(1, 512, (2, 6))) if family == "seq2seq" else None

    def forward(ids, enc, **kw):
        if family == "seq2seq":
            return model(decoder_input_ids=ids, encoder_output=enc, **kw).logits
        return model(ids, **kw).logits

    with torch.no_grad():
        full = [forward(s[None], enc and _row(enc, b))[0] for b, s in enumerate(seqs)]
        cache = PagedKVCache(cfg, [len(s) for s in seqs], device=torch.device("cpu"), dtype=torch.float32,
                             block_size=8)
        width = max(prompt_lens)
        ids = torch.stack([torch.cat([s[:n], s.new_zeros(width - n)]) for s, n in zip(seqs, prompt_lens)])
        valid = torch.arange(width) < torch.tensor(prompt_lens)[:, None]
        mask = {"decoder_attention_mask" if family == "seq2seq" else "attention_mask": valid}
        logits = forward(ids, enc, kv=cache.step(torch.arange(width).expand(2, width), valid), **mask)
        for b, n in enumerate(prompt_lens):
            torch.testing.assert_close(logits[b, :n], full[b][:n], **FP32)
        for t in range(17):  # row 0 reaches position 25, row 1 position 20: each sequence's end
            pos = torch.tensor(prompt_lens)[:, None] + t
            logits = forward(torch.stack([seqs[b][pos[b, 0]] for b in range(2)])[:, None], enc, kv=cache.step(pos))
            for b in range(2):
                torch.testing.assert_close(logits[b, 0], full[b][pos[b, 0]], **FP32)
        cache.close()


def _row(enc, b):
    return dataclasses.replace(enc, hidden=enc.hidden[b:b + 1], valid=enc.valid[b:b + 1])


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


def test_build_is_seeded_and_ties_embeddings():
    a, b = model_of(tiny("dense")), model_of(tiny("dense"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert a.lm_head.weight is a.embed.weight
    assert model_of(tiny("oss")).lm_head.weight is not model_of(tiny("oss")).embed.weight


def test_a_bf16_model_runs_in_bf16():
    model = build_model(tiny("oss", dtype="bfloat16"))
    assert model.embed.weight.dtype == torch.bfloat16 and model.layers[0].ffn.w_up.dtype == torch.uint8
    logits = model(torch.randint(0, 512, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# models/ is written only against the HAL
# ---------------------------------------------------------------------------------------------

VENDOR = {"torch_npu", "habana_frameworks", "intel_extension_for_pytorch", "triton", "cupy", "numpy"}
# Only the tokenizer and checkpoint modules may use these, and only inside functions (lazily).
LAZY_ALLOWED = {"tokenizers": {"tokenizer.py"}, "safetensors": {"checkpoint.py", "hf.py"}}


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node, [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node, [node.module.split(".")[0]]


def test_models_import_only_torch_apt_hal_and_the_standard_library():
    files = sorted(MODELS_DIR.rglob("*.py"))
    assert len(files) >= 7
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(n) for n in tree.body}
        for node, names in _imports(tree):
            for name in names:
                if name in LAZY_ALLOWED:
                    assert path.name in LAZY_ALLOWED[name], f"{path.name} imports {name}"
                    assert id(node) not in top_level, f"{path.name} imports {name} at module level (must be lazy)"
                    continue
                assert name not in VENDOR, f"{path.name} imports {name}"
                assert name in ("torch", "apt_hal") or name in sys.stdlib_module_names, f"{path.name} imports {name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name) \
                    and node.value.id == "torch":
                raise AssertionError(f"{path.name}:{node.lineno} uses torch.cuda; use apt_hal.device")


def _disables_gradients(node) -> bool:
    """A call of torch.no_grad(), inference_mode() (not inference_mode(False)) or set_grad_enabled."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Attribute, ast.Name)):
        return False
    name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
    if name == "inference_mode":
        return not (node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value is False)
    return name in ("no_grad", "set_grad_enabled")


def test_gradients_are_disabled_nowhere_in_the_model_code():
    # Only generation (generate.py) runs without gradients; models/train.py and the other
    # training modules have their own test.
    for name in ("__init__.py", "config.py", "layers.py", "decoder.py", "seq2seq.py", "hf.py"):
        tree = ast.parse((MODELS_DIR / name).read_text())
        bad = [n.lineno for n in ast.walk(tree) if _disables_gradients(n)
               or (isinstance(n, ast.Attribute) and n.attr == "no_grad")]
        assert not bad, f"{name} disables gradients at line(s) {bad}"
