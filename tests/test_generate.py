"""Generation (apt_hal.models.generate): greedy decoding through the paged KV cache equals argmax
over full forward passes; batches of different prompt lengths equal one-by-one runs; sampling
draws from the distribution it should (temperature, top-k, top-p, repetition penalty checked
against transformers' own logits processors); stop tokens; seeds; clear errors."""

import dataclasses

import pytest
import torch

from apt_hal.models import GenerationConfig, ModelConfig, build_model, generate
from apt_hal.models.generate import _KEPT_SESSIONS as KEPT_SESSIONS
from apt_hal.models.generate import KEPT_CAPACITY_STEP, PagedKVCache, release_decode_session, sampling_probs
from apt_hal.nn import MXFP4Linear, convert_model_to_mxfp4

FAMILIES = ["dense", "moe", "oss", "seq2seq"]


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig.preset(f"apt-{family}-tiny", **overrides))


def next_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """The last logits of a full forward pass, no cache."""
    with torch.no_grad():
        if model.config.family == "seq2seq":
            dec = [model.config.decoder_start_token_id] + generated
            return model(torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])).logits[0, -1]
        return model(torch.tensor([prompt + generated])).logits[0, -1]


def greedy_by_hand(model, prompt, n, penalty=1.0):
    out = []
    for _ in range(n):
        logits = next_logits(model, prompt, out)
        if penalty != 1.0:
            seen = set(out) if model.config.family == "seq2seq" else set(prompt + out)
            for t in seen:
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        out.append(int(logits.argmax()))
    return out


PROMPTS = [[5, 17, 300, 2, 9, 41, 8], [100], [7, 7, 200, 31]]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_through_the_kv_cache_equals_argmax_of_full_forwards(family):
    # A ragged batch; 12 new tokens after a 7-token prompt cross apt-oss-tiny's window of 16.
    model = tiny_model(family, init_std=0.1)
    got = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, greedy=True))
    assert got == [greedy_by_hand(model, p, 12) for p in PROMPTS]


def test_a_model_with_mxfp4_linear_layers_generates_through_the_cache_like_full_forwards():
    model = convert_model_to_mxfp4(tiny_model("oss", init_std=0.1))  # MXFP4 experts and linear layers
    assert sum(isinstance(m, MXFP4Linear) for m in model.modules()) == 6  # qkv, o, router; 2 layers
    got = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, greedy=True))
    assert got == [greedy_by_hand(model, p, 10) for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_different_lengths_equals_one_by_one(family):
    model = tiny_model(family, init_std=0.1)
    config = GenerationConfig(max_new_tokens=6, greedy=True)
    assert generate(model, PROMPTS, config) == [generate(model, [p], config)[0] for p in PROMPTS]


def test_greedy_with_repetition_penalty_equals_the_rule_by_hand():
    model = tiny_model("dense", init_std=0.1)
    got = generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=8, greedy=True, repetition_penalty=1.8))
    assert got == [greedy_by_hand(model, p, 8, penalty=1.8) for p in PROMPTS[:2]]
    assert got != generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=8, greedy=True))


def _empirical(model, prompt, config, n):
    """Frequencies of the first new token over n independent draws (a batch of n copies)."""
    tokens = generate(model, [prompt] * n, config)
    counts = torch.bincount(torch.tensor([t[0] for t in tokens]), minlength=model.config.vocab_size)
    return counts.float() / n


def _peaked_small_vocab_model():
    # 16 tokens and larger weights: a distribution far from uniform, measurable with a few thousand draws.
    return tiny_model("dense", vocab_size=16, init_std=0.3)


@pytest.mark.parametrize("temperature, other", [(0.5, 2.0), (2.0, 0.5)])
def test_temperature_samples_from_softmax_of_logits_over_temperature(temperature, other):
    # The seed project took the argmax whatever the temperature. Total variation between the
    # empirical distribution of 4000 draws and softmax(logits/T) is under 0.05 (its expected value
    # is about 0.02 here), while the other temperature's distribution and the argmax are far away.
    model = _peaked_small_vocab_model()
    prompt = [3, 1, 4]
    logits = next_logits(model, prompt, [])
    freq = _empirical(model, prompt, GenerationConfig(max_new_tokens=1, temperature=temperature, seed=0), 4000)
    assert 0.5 * (freq - torch.softmax(logits / temperature, -1)).abs().sum() < 0.05
    assert 0.5 * (freq - torch.softmax(logits / other, -1)).abs().sum() > 0.15
    assert freq.max() < 0.85


def test_top_k_and_top_p_restrict_the_support():
    model = _peaked_small_vocab_model()
    prompt = [3, 1, 4]
    logits = next_logits(model, prompt, [])
    top4 = set(logits.topk(4).indices.tolist())
    freq = _empirical(model, prompt, GenerationConfig(max_new_tokens=1, top_k=4, seed=1), 2000)
    assert set(freq.nonzero().flatten().tolist()) == top4  # all of the top 4 are drawn, nothing else
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]  # mass of the tokens more likely than each
    nucleus = set(order[before < 0.7].tolist())
    freq = _empirical(model, prompt, GenerationConfig(max_new_tokens=1, top_p=0.7, seed=2), 2000)
    assert set(freq.nonzero().flatten().tolist()) == nucleus and len(nucleus) > 1


def test_sampling_probs_equal_transformers_logits_processors():
    # transformers' processors are an independent oracle for the penalty, temperature, top-k and top-p rules.
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(5)
    logits = torch.randn(6, 50) * 3
    history = torch.randint(0, 50, (6, 12))
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, history, True)
    for penalty, temperature, k, p in [(1.3, 0.7, 0, 1.0), (1.0, 1.5, 5, 1.0), (1.0, 1.0, 0, 0.8),
                                       (2.0, 0.9, 10, 0.6)]:
        config = GenerationConfig(repetition_penalty=penalty, temperature=temperature, top_k=k, top_p=p)
        scores = logits.clone()
        for proc in [RepetitionPenaltyLogitsProcessor(penalty) if penalty != 1.0 else None,
                     TemperatureLogitsWarper(temperature), TopKLogitsWarper(k) if k else None,
                     TopPLogitsWarper(p) if p < 1 else None]:
            if proc is not None:
                scores = proc(history, scores)
        torch.testing.assert_close(sampling_probs(logits, seen, config), torch.softmax(scores, -1),
                                   rtol=1e-5, atol=1e-7)


def test_stop_tokens_end_a_sequence_without_being_returned():
    model = tiny_model("dense", init_std=0.1)
    free = generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=10, greedy=True))
    stop = free[0][4]
    first = free[0].index(stop)
    got = generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=10, greedy=True, stop_tokens=[stop]))
    assert got[0] == free[0][:first]
    assert got[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])


def test_seeds_make_sampling_reproducible():
    model = tiny_model("moe", init_std=0.1)
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11)
    first = generate(model, PROMPTS, config)
    assert generate(model, PROMPTS, config) == first
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, seed=12)) != first
    assert all(len(t) == 8 for t in first)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cuda_triton_kernels_generate_what_the_references_do(family, dev):
    # Every HAL op the model calls (rotary_, paged_write/gather, moe steps with MXFP4 experts) runs
    # on the cuda-triton backend, strictly: a missing kernel fails instead of falling back. On a
    # CPU-only machine the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET).
    import copy

    import apt_hal

    model = tiny_model(family, init_std=0.1)
    config = GenerationConfig(max_new_tokens=3, greedy=True)
    expected = generate(model, PROMPTS[:2], config)
    with apt_hal.use("cuda-triton", strict=True):
        assert generate(copy.deepcopy(model).to(dev), PROMPTS[:2], config) == expected


@pytest.mark.slow  # a torch.compile of each model: about 15 s apiece on a 2-core CPU
@pytest.mark.parametrize("family", ["moe", "seq2seq"])
def test_a_compiled_decode_step_generates_the_same_tokens(family):
    model = tiny_model(family, init_std=0.1)
    eager = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, greedy=True))
    compiled = GenerationConfig(max_new_tokens=6, greedy=True, compile=True)
    assert generate(model, PROMPTS, compiled) == eager
    assert generate(model, PROMPTS, compiled) == eager  # the cached compilation, new cache tensors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile traces into the Triton kernels only on a GPU")
@pytest.mark.parametrize("family", ["dense", "moe"])
def test_a_compiled_decode_step_on_the_gpu_generates_what_the_references_do(family):
    """Failed on an H100 while the compiled step traced into the kernels of the in-place ops (the
    prompt [100] turned from 171 to 153 at its fourth token); passes with them opaque
    (apt_hal.contract.Op._traced_call), H100, 2026-12-07."""
    import copy

    import apt_hal

    model = tiny_model(family, init_std=0.1)
    config = GenerationConfig(max_new_tokens=6, greedy=True)
    expected = generate(model, PROMPTS, config)
    with apt_hal.use("cuda-triton", strict=True):
        got = generate(copy.deepcopy(model).to("cuda"), PROMPTS, dataclasses.replace(config, compile=True))
    assert got == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_can_train_after_generating(family):
    # Generation runs in inference mode; nothing it leaves behind may be an inference tensor.
    model = tiny_model(family)
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=2))
    ids = torch.randint(0, 512, (2, 6))
    model(ids, labels=ids).loss.backward()
    assert model.embed.weight.grad is not None


@pytest.mark.parametrize("prompts, config, message", [
    ([], GenerationConfig(), "non-empty list"),
    ([[1, 2], []], GenerationConfig(), "prompt 1 is empty"),
    ([[1, 512]], GenerationConfig(), r"prompt 0 holds token id 512, outside \[0, vocab_size=512\)"),
    ([[1] * 500], GenerationConfig(max_new_tokens=20), "prompt 0 is too long: 500 tokens and max_new_tokens=20"),
    ([[1]], GenerationConfig(stop_tokens=[600]), "stop token 600"),
    ("hello", GenerationConfig(), "non-empty list"),
])
def test_bad_prompts_get_a_clear_error(prompts, config, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model("dense"), prompts, config)


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop_tokens=["eos"]), "stop_tokens"),
])
def test_bad_generation_configs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**fields)


# ---- the decode session a model keeps between calls ---------------------------------------------


def test_a_second_call_reuses_the_kept_cache_and_generates_what_a_fresh_model_does():
    model = tiny_model("dense", init_std=0.1)
    config = GenerationConfig(max_new_tokens=6, greedy=True)
    first = generate(model, PROMPTS, config)
    session = KEPT_SESSIONS[model]
    assert session.step.fn is None and not session.in_use  # the kept step does not hold the model
    # Another prompt set of the same batch size and capacity step: the same cache, reset.
    other = [[9, 9, 9], [4, 5], [300]]
    assert generate(model, other, config) == generate(tiny_model("dense", init_std=0.1), other, config)
    assert KEPT_SESSIONS[model] is session
    assert generate(model, PROMPTS, config) == first
    # A batch of another size, or sequences longer than the kept capacity: a new session replaces it.
    generate(model, PROMPTS[:2], config)
    assert KEPT_SESSIONS[model] is not session
    session = KEPT_SESSIONS[model]
    assert session.capacity == KEPT_CAPACITY_STEP
    longer = dataclasses.replace(config, max_new_tokens=2 * KEPT_CAPACITY_STEP)  # 7 + 128 tokens
    assert generate(model, PROMPTS[:2], longer) == generate(tiny_model("dense", init_std=0.1), PROMPTS[:2], longer)
    assert KEPT_SESSIONS[model] is not session
    session = KEPT_SESSIONS[model]
    assert session.capacity == 3 * KEPT_CAPACITY_STEP
    generate(model, PROMPTS[:2], dataclasses.replace(config, max_new_tokens=KEPT_CAPACITY_STEP))  # 2/3 of it: kept
    assert KEPT_SESSIONS[model] is session
    generate(model, PROMPTS[:2], config)  # would attend over 3x the 64 tokens it needs
    assert KEPT_SESSIONS[model] is not session
    assert release_decode_session(model) and model not in KEPT_SESSIONS
    assert not release_decode_session(model)


def test_a_replaced_weight_starts_a_new_session_and_in_place_changes_are_seen():
    model, reference = tiny_model("dense", init_std=0.1), tiny_model("dense", seed=1, init_std=0.1)
    config = GenerationConfig(max_new_tokens=6, greedy=True)
    generate(model, PROMPTS, config)
    session = KEPT_SESSIONS[model]
    with torch.no_grad():  # in place (an optimiser step, load_state_dict): same tensors, same session
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q)
    assert generate(model, PROMPTS, config) == generate(reference, PROMPTS, config)
    assert KEPT_SESSIONS[model] is session
    model.train(not model.training)
    generate(model, PROMPTS, config)
    assert KEPT_SESSIONS[model] is not session  # a step captured in one mode is not replayed in the other
    model.train(not model.training)
    generate(model, PROMPTS, config)
    session = KEPT_SESSIONS[model]
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # a new tensor
    fresh = tiny_model("dense", seed=1, init_std=0.1)
    fresh.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert generate(model, PROMPTS, config) == generate(fresh, PROMPTS, config)
    assert KEPT_SESSIONS[model] is not session


def test_a_seq2seq_model_keeps_no_session_and_a_session_in_use_is_not_shared(monkeypatch):
    seq2seq = tiny_model("seq2seq", init_std=0.1)
    generate(seq2seq, PROMPTS, GenerationConfig(max_new_tokens=3, greedy=True))
    assert seq2seq not in KEPT_SESSIONS  # its step also reads the call's encoder output
    model = tiny_model("dense", init_std=0.1)
    config = GenerationConfig(max_new_tokens=4, greedy=True)
    expected = generate(model, PROMPTS, config)
    kept = KEPT_SESSIONS[model]
    kept.in_use = True  # as while another thread's call runs
    closed = []
    monkeypatch.setattr(PagedKVCache, "close", lambda self: closed.append(self))
    assert generate(model, PROMPTS, config) == expected
    assert KEPT_SESSIONS[model] is kept and closed and closed[-1] is not kept.cache
