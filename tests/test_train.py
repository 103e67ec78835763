"""Training: the model's own loss (with MoE aux losses), gradients on the whole training path,
bf16 autocast where supported, clipping, warmup + cosine, evaluation, and exact resume: 2k steps
equal k steps + resume + k steps bit for bit on the CPU in fp32."""

import ast
import dataclasses
import io
import math
import pathlib
import random
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from apt_hal import device as hal_device
from apt_hal.models import ModelConfig, build_model
from apt_hal.models import checkpoint as ckpt
from apt_hal.models.tokenizer import Tokenizer
from apt_hal.models.train import TokenWindows, TrainConfig, encode_text, evaluate, lr_multiplier, split_tokens, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = (ROOT / "examples" / "tiny.txt").read_text(encoding="utf-8")
SMALL = dict(batch_size=4, seq_len=32, warmup=2, eval_every=3, eval_batches=2, log_every=1, precision="fp32")




@pytest.fixture(scope="module")
def tokens():
    tok = Tokenizer.train([TEXT], vocab_size=300)
    return split_tokens(encode_text(tok, TEXT), 0.1, 32), tok.vocab_size


def _model(preset: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig.preset(preset, vocab_size=vocab_size))


def _train(model, tokens, out, resume_from=None, **cfg):
    (train_tokens, eval_tokens), _ = tokens
    return train(model, train_tokens, eval_tokens, TrainConfig(**{**SMALL, **cfg}), out, resume_from=resume_from,
                 stream=io.StringIO())


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["apt-dense-tiny", "apt-moe-tiny", "apt-oss-tiny"])
def test_k_steps_then_resume_for_k_more_equals_2k_steps_bit_for_bit(tokens, tmp_path, preset):
    k = 4
    vocab = tokens[1]

    def leg(out, steps, resume):
        random.seed(0)
        model = _model(preset, vocab)
        found = ckpt.latest_checkpoint(out) if resume else None
        result = _train(model, tokens, out, resume_from=found, steps=steps, schedule_steps=2 * k, save_every=k)
        return model, result, (torch.rand(3), random.random())  # what the random generators give next

    straight, straight_result, straight_rng = leg(tmp_path / "a", 2 * k, resume=False)
    _, first_result, _ = leg(tmp_path / "b", k, resume=False)
    random.seed(123)  # a resumed process starts with other random states; the checkpoint's must win
    torch.manual_seed(123)
    resumed, second_result, resumed_rng = leg(tmp_path / "b", 2 * k, resume=True)

    assert first_result.step == k and second_result.step == 2 * k
    assert first_result.losses + second_result.losses == straight_result.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    a_state, b_state = (ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path / d)) for d in "ab")
    for pa, pb in zip(a_state["optimizer"]["state"].values(), b_state["optimizer"]["state"].values()):
        assert all(torch.equal(pa[key], pb[key]) for key in pa), "the AdamW moments differ after resuming"
    assert a_state["scheduler"] == b_state["scheduler"] and a_state["data"] == b_state["data"]
    assert torch.equal(straight_rng[0], resumed_rng[0]) and straight_rng[1] == resumed_rng[1]
    assert [e for _, e in straight_result.evals if _ > k] == [e for _, e in second_result.evals]


def test_resume_refuses_other_data_and_a_fresh_run_refuses_a_used_folder(tokens, tmp_path):
    vocab = tokens[1]
    _train(_model("apt-dense-tiny", vocab), tokens, tmp_path, steps=2, save_every=2)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _train(_model("apt-dense-tiny", vocab), tokens, tmp_path, steps=4)
    (train_tokens, eval_tokens), _ = tokens
    with pytest.raises(ValueError, match="trained on other data"):
        train(_model("apt-dense-tiny", vocab), train_tokens[1:], eval_tokens, TrainConfig(**{**SMALL, "steps": 4}),
              tmp_path, resume_from=ckpt.latest_checkpoint(tmp_path), stream=io.StringIO())


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_reports_perplexity(tokens, tmp_path):
    (train_tokens, eval_tokens), vocab = tokens
    model = _model("apt-dense-tiny", vocab)
    before = evaluate(model, eval_tokens, 32, 4, 2)
    assert abs(before.loss - math.log(vocab)) < 0.5, "a fresh model is close to uniform"
    result = _train(model, tokens, tmp_path, steps=40, eval_every=20, save_every=40, lr=3e-3)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 1.0
    (step, after), = [e for e in result.evals if e[0] == 40]
    assert after.loss < before.loss - 0.5
    assert after.perplexity == pytest.approx(math.exp(after.loss), rel=1e-12)
    assert evaluate(model, eval_tokens, 32, 4, 2) == after, "evaluation changes nothing and is deterministic"
    assert result.tokens_per_second > 0 and result.checkpoint == tmp_path / "step-00000040"


def test_the_moe_model_trains_on_its_loss_with_aux_losses(tokens, tmp_path):
    """The step optimises out.loss = lm_loss + weighted aux losses, not the bare cross-entropy."""
    (train_tokens, _), vocab = tokens
    model = _model("apt-moe-tiny", vocab)
    first_batch = TokenWindows(train_tokens, 32, 4, seed=0).next_batch()
    with torch.no_grad():
        out = model(first_batch, labels=first_batch)
    assert out.aux_loss is not None and float(out.loss) != float(out.lm_loss)
    stream = io.StringIO()
    result = train(model, train_tokens, tokens[0][1], TrainConfig(**{**SMALL, "steps": 2}), tmp_path, stream=stream)
    assert result.losses[0] == float(out.loss)
    assert " aux " in stream.getvalue() and " z " in stream.getvalue(), "the MoE losses are logged"


def test_training_forwards_have_grad_and_autocast_as_asked_and_every_parameter_learns(tokens, tmp_path, monkeypatch):
    vocab = tokens[1]
    model = _model("apt-moe-tiny", vocab)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(
        (m.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    _train(model, tokens, tmp_path / "auto", steps=3, precision="auto")  # the CPU supports bf16: autocast
    training = [s for s in seen if s[0]]
    assert len(training) == 3 and all(grad and autocast and dtype == torch.bfloat16
                                      for _, grad, autocast, dtype in training)
    assert any(not s[0] and not s[1] for s in seen), "evaluation runs without grad"
    for name, p in model.named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} did not learn: no gradient reached it"

    seen.clear()
    monkeypatch.setattr(hal_device, "supports_bf16", lambda device=None: False)
    _train(model, tokens, tmp_path / "no-bf16", steps=2, precision="auto")
    assert [s[2] for s in seen if s[0]] == [False, False], "no autocast where the device lacks bf16"


def test_gradients_reaching_the_optimizer_are_clipped(tokens, tmp_path):
    vocab = tokens[1]
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        _train(_model("apt-dense-tiny", vocab), tokens, tmp_path / "free", steps=3, grad_clip=1e6)
        unclipped, norms[:] = list(norms), []
        _train(_model("apt-dense-tiny", vocab), tokens, tmp_path / "clipped", steps=3, grad_clip=0.05)
    finally:
        handle.remove()
    assert min(unclipped) > 0.05, "the control run must have larger gradients than the clip"
    assert len(norms) == 3 and max(norms) <= 0.05 * (1 + 1e-5)


def test_a_non_finite_loss_stops_training_with_a_clear_error(tokens, tmp_path):
    vocab = tokens[1]
    model = _model("apt-dense-tiny", vocab)
    calls = []

    def poison_third_loss(module, args, kwargs, out):
        calls.append(1)
        if module.training and len(calls) >= 3:
            out.loss = out.loss * float("nan")
        return out

    model.register_forward_hook(poison_third_loss, with_kwargs=True)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        _train(model, tokens, tmp_path, steps=10, eval_every=100, save_every=100)
    assert ckpt.latest_checkpoint(tmp_path) is None, "nothing non-finite was saved"


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_the_schedule_warms_up_linearly_then_follows_a_cosine_to_its_floor():
    warmup, total, floor = 10, 110, 0.1
    values = [lr_multiplier(s, warmup, total, floor) for s in range(130)]
    assert values[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert values[warmup] == 1.0 and values[60] == pytest.approx(floor + (1 - floor) / 2)
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:])), "the cosine never rises"
    assert values[total:] == [pytest.approx(floor)] * (130 - total)


def test_windows_take_every_start_once_per_epoch_in_a_seeded_order_and_resume_exactly():
    tokens = torch.arange(20)
    windows = TokenWindows(tokens, seq_len=5, batch_size=4, seed=3)
    epoch = torch.cat([windows.next_batch() for _ in range(4)])  # 16 windows = one epoch
    assert sorted(epoch[:, 0].tolist()) == list(range(16))
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 5)) for w in epoch), "a window is consecutive tokens"
    state = windows.state_dict()
    ahead = [windows.next_batch() for _ in range(5)]
    again = TokenWindows(tokens, seq_len=5, batch_size=4, seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [again.next_batch() for _ in range(5)]))
    next_epoch = torch.cat(ahead[:4])[:, 0].tolist()
    assert next_epoch != epoch[:, 0].tolist(), "each epoch is reshuffled"
    other_seed = TokenWindows(tokens, seq_len=5, batch_size=4, seed=4)
    assert not torch.equal(other_seed.next_batch(), epoch[:4])
    with pytest.raises(ValueError, match="other data or windows"):
        TokenWindows(tokens, seq_len=6, batch_size=4, seed=3).load_state_dict(state)


def test_text_becomes_bos_paragraph_eos_and_splits_with_a_held_out_tail():
    tok = Tokenizer.train([TEXT], vocab_size=300)
    ids = encode_text(tok, "First one.\n\n\n  Second\nline.  \n\n")
    paragraphs = [tok.encode(p, bos=True, eos=True) for p in ("First one.", "Second\nline.")]
    assert ids.tolist() == paragraphs[0] + paragraphs[1]
    train_part, held_out = split_tokens(torch.arange(100), 0.1, seq_len=8)
    assert train_part.tolist() == list(range(90)) and held_out.tolist() == list(range(90, 100))
    with pytest.raises(ValueError, match="too few for training and held-out windows"):
        split_tokens(torch.arange(30), 0.1, seq_len=16)
    with pytest.raises(ValueError, match="empty"):
        encode_text(tok, "\n \n")


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be >= 1"), ("seq_len", 1, "seq_len must be >= 2"), ("lr", 0.0, "lr must be > 0"),
    ("precision", "fp8", "precision must be one of"), ("schedule_steps", 5, r"schedule_steps \(5\) must be >= steps"),
    ("eval_fraction", 1.0, "eval_fraction must be in"), ("grad_clip", 0.0, "grad_clip > 0"),
])
def test_the_train_config_names_a_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"steps": 10, field: value})
    assert dataclasses.replace(TrainConfig(steps=10), steps=20).steps == 20


def test_training_modules_import_only_torch_apt_hal_and_the_standard_library_at_top_level():
    """tokenizers and safetensors are imported lazily, inside the tokenizer and checkpoint functions
    that need them (the rule for models/ allows them there only)."""
    for name in ("train", "checkpoint", "tokenizer", "cli", "chat"):
        tree = ast.parse((ROOT / "models" / f"{name}.py").read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    top = module.split(".")[0]
                    assert top in {"torch", "apt_hal"} | sys.stdlib_module_names, f"models/{name}.py imports {module}"
