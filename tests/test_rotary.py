"""The rotary op contract through apt_hal.ops (the dispatching entry point): values, layouts, errors,
gradients, torch.compile and torch.export.

Tolerances: hand-computed cases and the unrotated tail of partial rotary are exact; float32
results within rtol=atol=1e-6 of transformers' formulas (the same products, summed in another
order in GPT-J's); bf16/fp16 within one ulp of the dtype of the float64 result (the contract
rounds once from float32).
"""

import math

import pytest
import torch
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb as llama4_apply_rotary_emb

import apt_hal
from apt_hal import ContractError, ops, rope
from apt_hal.rope import RopeConfig

FP32 = dict(rtol=1e-6, atol=1e-6)
B, S, HQ, HK, D = 2, 5, 4, 2, 16


def _inputs(seed=0, dtype=torch.float32, b=B, s=S, hq=HQ, hk=HK, d=D, max_position=64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, s, hk, d, generator=gen).to(dtype)
    positions = torch.randint(0, max_position, (b, s), generator=gen)
    return q, k, positions


def _cache(rotary_dim=D, max_position=64, variant="default", **kw):
    return rope.cos_sin_cache(RopeConfig(variant=variant, rotary_dim=rotary_dim, max_position=max_position, **kw))


def _cos_sin(cache, positions):
    half = cache.shape[1] // 2
    rows = cache[positions]
    return rows[..., :half], rows[..., half:]


def _rotate_float64(x, positions, cache, style):
    """The contract's formula in float64, written independently: pairs (a, b) -> (a cos - b sin, b cos + a sin)."""
    cos, sin = (t.unsqueeze(2) for t in _cos_sin(cache.double(), positions))
    half = cos.shape[-1]
    first = torch.arange(half) if style == "neox" else 2 * torch.arange(half)
    second = first + half if style == "neox" else first + 1
    x = x.double()
    out = x.clone()
    a, b = x[..., first], x[..., second]
    out[..., first], out[..., second] = a * cos - b * sin, b * cos + a * sin
    return out


# ---- hand-computed ----------------------------------------------------------------------------

# Row p = [cos f0, cos f1, sin f0, sin f1]: position 0 is the identity; position 1 turns pair 0 by
# 90 degrees and pair 1 by 180 degrees.
HAND_CACHE = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 1.0, 0.0]])
HAND_Q = torch.tensor([1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("style,rotated", [
    ("neox", [-3.0, -2.0, 1.0, -4.0]),  # pairs (0, 2) and (1, 3)
    ("gptj", [-2.0, 1.0, -3.0, -4.0]),  # pairs (0, 1) and (2, 3)
])
def test_hand_computed(style, rotated):
    q = HAND_Q.expand(1, 2, 1, 4).contiguous()  # the same vector at positions 0 and 1
    k = -q
    q_out, k_out = ops.rotary(q, k, torch.tensor([[0, 1]]), HAND_CACHE, style)
    assert torch.equal(q_out[0, 0, 0], HAND_Q)
    assert torch.equal(q_out[0, 1, 0], torch.tensor(rotated))
    assert torch.equal(k_out, -q_out)


def test_hand_computed_with_real_angles():
    cache = _cache(rotary_dim=4, max_position=4, base=100.0)  # frequencies 1 and 0.1
    q = HAND_Q.view(1, 1, 1, 4)
    q_out, _ = ops.rotary(q, q.clone(), torch.tensor([[2]]), cache, "neox")
    c0, s0, c1, s1 = math.cos(2.0), math.sin(2.0), math.cos(0.2), math.sin(0.2)
    want = torch.tensor([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1])
    torch.testing.assert_close(q_out.flatten(), want, **FP32)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_entry_points_agree(style):
    # ops.rotary (eager fast path), the torch dispatcher's op and the contract's reference.
    q, k, positions = _inputs(seed=11, dtype=torch.bfloat16)
    cache = _cache(rotary_dim=8)
    want = ops.rotary.reference(q, k, positions, cache, style)
    for got in (ops.rotary(q, k, positions, cache, style), torch.ops.apt_hal.rotary(q, k, positions, cache, style)):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- equivalence with transformers' formulas ----------------------------------------------------

@pytest.mark.parametrize("variant,kw", [
    ("default", {}), ("yarn", dict(factor=8.0, original_max_position_embeddings=16)),
])
def test_neox_equals_transformers_apply_rotary_pos_emb(variant, kw):
    q, k, positions = _inputs()
    cache = _cache(variant=variant, **kw)
    cos, sin = _cos_sin(cache, positions)
    # transformers: [B, H, S, D] with cos/sin duplicated over both halves.
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    want_q, want_k = llama_apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=1)
    q_out, k_out = ops.rotary(q, k, positions, cache, "neox")
    torch.testing.assert_close(q_out, want_q.transpose(1, 2), **FP32)
    torch.testing.assert_close(k_out, want_k.transpose(1, 2), **FP32)


def test_gptj_equals_llama4_complex_rotation():
    q, k, positions = _inputs(seed=1)
    cache = _cache()
    cos, sin = _cos_sin(cache, positions)
    want_q, want_k = llama4_apply_rotary_emb(q, k, torch.complex(cos, sin))  # Llama 4: [B, S, H, D]
    q_out, k_out = ops.rotary(q, k, positions, cache, "gptj")
    torch.testing.assert_close(q_out, want_q, **FP32)
    torch.testing.assert_close(k_out, want_k, **FP32)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_partial_rotary_equals_gptj_and_neox_partial_and_keeps_the_tail(style):
    rotary_dim = 6
    q, k, positions = _inputs(seed=2)
    cache = _cache(rotary_dim=rotary_dim)
    cos, sin = _cos_sin(cache, positions)
    q_out, k_out = ops.rotary(q, k, positions, cache, style)
    for x, out in ((q, q_out), (k, k_out)):
        assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])
        rot = x[..., :rotary_dim]
        if style == "gptj":  # GPT-J rotates the first rotary_dim dims of each head, interleaved
            want = gptj_apply_rotary_pos_emb(rot, sin, cos)
        else:  # GPT-NeoX, Phi: rotate-half on the first rotary_dim dims
            c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
            want = llama_apply_rotary_pos_emb(rot, rot, c, s, unsqueeze_dim=2)[0]
        torch.testing.assert_close(out[..., :rotary_dim], want, **FP32)


# ---- properties ----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("variant,kw", [
    ("default", {}), ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)),
])
def test_scores_depend_only_on_relative_position(style, variant, kw):
    q, k, positions = _inputs(seed=3, max_position=64)
    cache = _cache(max_position=128, variant=variant, **kw)
    shift = 37
    scores = []
    for p in (positions, positions + shift):
        q_out, k_out = ops.rotary(q, k, p, cache, style)
        k_out = k_out.repeat_interleave(HQ // HK, dim=2)  # GQA: query head h reads key head h // 2
        scores.append(torch.einsum("bihd,bjhd->bhij", q_out, k_out))
    # Angles up to 100 rad in float32 carry ~1e-5 absolute error; a layout mistake changes scores by O(1).
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_dtypes_round_once_from_the_exact_rotation(dtype, style):
    q, k, positions = _inputs(seed=4, dtype=dtype)
    cache = _cache(variant="yarn", factor=4.0, original_max_position_embeddings=16)  # attention factor != 1
    q_out, k_out = ops.rotary(q, k, positions, cache, style)
    assert q_out.dtype == k_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    eps = torch.finfo(dtype).eps
    for x, out in ((q, q_out), (k, k_out)):
        torch.testing.assert_close(out.double(), _rotate_float64(x, positions, cache, style), rtol=eps, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_in_place_equals_out_of_place(dtype, style):
    q, k, positions = _inputs(seed=5, dtype=dtype, hk=1)
    cache = _cache(rotary_dim=12)
    q_out, k_out = ops.rotary(q, k, positions, cache, style)
    assert ops.rotary_(q, k, positions, cache, style) is None
    assert torch.equal(q, q_out) and torch.equal(k, k_out)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_strided_views_of_a_fused_projection(style):
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(B, S, (HQ + 2 * HK) * D, generator=gen)
    q = qkv[..., : HQ * D].view(B, S, HQ, D)
    k = qkv[..., HQ * D: (HQ + HK) * D].view(B, S, HK, D)
    assert not q.is_contiguous() and q.stride(-1) == 1
    _, _, positions = _inputs(seed=6)
    cache = _cache()
    want_q, want_k = ops.rotary(q.contiguous(), k.contiguous(), positions, cache, style)
    q_out, k_out = ops.rotary(q, k, positions, cache, style)
    assert torch.equal(q_out, want_q) and torch.equal(k_out, want_k)

    # A head-major buffer seen token-major ([B, H, S, D] transposed) works too.
    q_hm = q.contiguous().transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(ops.rotary(q_hm, k, positions, cache, style)[0], want_q)

    # In place on the views rotates q and k inside the fused buffer and leaves v alone.
    v_before = qkv[..., (HQ + HK) * D:].clone()
    ops.rotary_(q, k, positions, cache, style)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[..., (HQ + HK) * D:], v_before)


@pytest.mark.parametrize("shape", [(B, 0), (0, S)])
def test_empty_inputs(shape):
    b, s = shape
    q, k, positions = _inputs(b=b, s=s)
    q_out, k_out = ops.rotary(q, k, positions, _cache(), "neox")
    assert q_out.shape == (b, s, HQ, D) and k_out.shape == (b, s, HK, D)
    ops.rotary_(q, k, positions, _cache(), "gptj")


# ---- errors -----------------------------------------------------------------------------------------

def _names(argument, got_shape):
    """The message names the argument and the shape it got (as [..] or (..))."""
    return rf"argument '{argument}'.*[\[(]{got_shape}[\])]"


def _error_cases():
    q, k, positions = _inputs()
    cache = _cache()
    wide = torch.randn(B, S, HQ, 2 * D)
    too_large = positions.clone()
    too_large[1, 2] = 64
    return [
        ("q ndim", (q[0], k, positions, cache, "neox"), "argument 'q' must have 4 dimensions"),
        ("k dtype", (q, k.half(), positions, cache, "neox"), "argument 'k' must have dtype float32"),
        ("q dtype", (q.double(), k.double(), positions, cache, "neox"), "argument 'q' must have dtype"),
        ("batch", (q, k[:1], positions, cache, "neox"), _names("k", "1, 5, 2, 16")),
        ("seq", (q, k[:, :3], positions, cache, "neox"), _names("k", "2, 3, 2, 16")),
        ("head_dim", (q, k[..., :8], positions, cache, "neox"), _names("k", "2, 5, 2, 8")),
        ("positions shape", (q, k, positions[:, :3], cache, "neox"), _names("positions", "2, 3")),
        ("positions dtype", (q, k, positions.float(), cache, "neox"), "argument 'positions' must have dtype int32"),
        ("cache dtype", (q, k, positions, cache.half(), "neox"), "argument 'cos_sin_cache' must have dtype float32"),
        ("odd R", (q, k, positions, cache[:, :3].contiguous(), "neox"), "'cos_sin_cache' must have an even width"),
        ("R > D", (q, k, positions, _cache(rotary_dim=2 * D), "neox"), "0 < R <= head_dim=16, got 32"),
        ("style", (q, k, positions, cache, "interleaved"), "argument 'style' must be one of 'neox', 'gptj'"),
        ("position too large", (q, k, too_large, cache, "neox"),
         "argument 'positions' must hold values in \\[0, 64\\), found 64"),
        ("negative position", (q, k, -positions - 1, cache, "neox"), "argument 'positions' must hold values"),
        ("strided head_dim", (wide[..., ::2], k, positions, cache, "neox"),
         "argument 'q' must be contiguous in its last dimension"),
        ("device", (q, k, positions, cache.to("meta"), "neox"),
         "argument 'cos_sin_cache' is on meta but 'q' is on cpu"),
    ]


@pytest.mark.parametrize("args,message", [c[1:] for c in _error_cases()], ids=[c[0] for c in _error_cases()])
def test_errors_name_the_argument(args, message):
    with pytest.raises(ContractError, match=message):
        ops.rotary(*args)
    before = [a.clone() for a in args[:2]]
    with pytest.raises(ContractError, match=message):
        ops.rotary_(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[:2], before))  # nothing was written


# ---- gradient ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_gradient_is_the_inverse_rotation(style):
    # out = a * R(angle) x per pair, so d(sum(out * g))/dx = a * R(-angle) g: the op itself with
    # the sine half negated. Partial rotary (R=10 < D): the tail's gradient is g unchanged.
    q, k, positions = _inputs(seed=7)
    cache = _cache(rotary_dim=10, variant="yarn", factor=4.0, original_max_position_embeddings=16)
    q.requires_grad_(True)
    k.requires_grad_(True)
    gen = torch.Generator().manual_seed(8)
    g_q, g_k = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
    q_out, k_out = ops.rotary(q, k, positions, cache, style)
    ((q_out * g_q).sum() + (k_out * g_k).sum()).backward()
    transposed = torch.cat([cache[:, :5], -cache[:, 5:]], dim=1)
    want_q, want_k = ops.rotary(g_q, g_k, positions, transposed, style)
    torch.testing.assert_close(q.grad, want_q, **FP32)
    torch.testing.assert_close(k.grad, want_k, **FP32)
    assert torch.equal(q.grad[..., 10:], g_q[..., 10:])


# ---- torch.compile and torch.export -------------------------------------------------------------

def test_torch_compile_fullgraph():
    q, k, positions = _inputs(seed=9)
    cache = _cache()

    def attention_inputs(q, k, positions, cache):
        q_out, k_out = ops.rotary(q, k, positions, cache, "gptj")
        return q_out * 2, k_out

    compiled = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")
    want = attention_inputs(q, k, positions, cache)
    got = compiled(q, k, positions, cache)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_torch_export_keeps_the_op():
    class Rotary(torch.nn.Module):
        def forward(self, q, k, positions, cache):
            return ops.rotary(q, k, positions, cache, "neox")

    q, k, positions = _inputs(seed=10)
    cache = _cache()
    exported = torch.export.export(Rotary(), (q, k, positions, cache))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert torch.ops.apt_hal.rotary.default in targets
    got = exported.module()(q, k, positions, cache)
    for g, w in zip(got, ops.rotary(q, k, positions, cache, "neox")):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---- in place: validate every argument before writing (issue 10) ------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "cuda-triton"])
@pytest.mark.parametrize("overlapping", ["k", "q"])
def test_in_place_rejects_an_expanded_argument_before_writing_either(backend, overlapping):
    # Before: rotary_ rotated q, then failed on a stride-0 k, leaving q half-done.
    q, k, positions = _inputs()
    args = {"q": q, "k": k}
    args[overlapping] = args[overlapping][:, :, :1].expand_as(args[overlapping])
    before = {name: t.clone() for name, t in args.items()}
    with apt_hal.use(backend), pytest.raises(ContractError, match=rf"rotary_: argument '{overlapping}' is written "
                                                                   "in place, so its elements must not share memory"):
        ops.rotary_(args["q"], args["k"], positions, _cache())
    assert all(torch.equal(args[n], before[n]) for n in args)


def test_in_place_rejects_q_and_k_being_one_tensor():
    q, _, positions = _inputs(hk=HQ)
    with pytest.raises(ContractError, match="arguments 'q' and 'k' are one tensor"):
        ops.rotary_(q, q, positions, _cache())


def test_out_of_place_accepts_an_expanded_k():
    q, k, positions = _inputs()
    expanded = k[:, :, :1].expand_as(k)
    q_out, k_out = ops.rotary(q, expanded, positions, _cache())
    torch.testing.assert_close(k_out, ops.rotary(q, expanded.contiguous(), positions, _cache())[1], rtol=0, atol=0)


def test_meta_inputs_give_meta_results():
    q, k, positions = (t.to("meta") for t in _inputs())
    previous = apt_hal.set_checks("values")
    try:
        q_out, k_out = ops.rotary(q, k, positions, _cache().to("meta"))
        ops.rotary_(q, k, positions, _cache().to("meta"))
    finally:
        apt_hal.set_checks(previous)
    assert q_out.is_meta and q_out.shape == q.shape and k_out.shape == k.shape
