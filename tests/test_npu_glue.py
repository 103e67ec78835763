"""GLUE tests of the npu bindings, on CPU tensors, against a fake torch_npu (tests/fakes).

The fake computes each vendor op with the formula torch-npu documents and records its
arguments. These tests prove that the bindings pass the layouts, dtypes, modes and shapes the
vendor ops document and map the results back to the contracts' layout; they are not conformance
results and nothing here ran on Ascend hardware. tests/test_npu_device.py runs the same bindings
through apt_hal's dispatch on a fake "npu" device.
"""

import importlib
import sys

import pytest
import torch

from apt_hal import mxfp4, ops
from apt_hal.backends.npu import chips, signatures
from tests.fakes import torch_npu_fake

BINDINGS = ("rotary", "moe", "fp4", "paged")


class Npu:
    """The fake torch_npu, the chip adaptor and the binding modules imported against the fake."""

    def __init__(self, fake, chip):
        self.fake, self.chip = fake, chip
        for name in BINDINGS:
            setattr(self, name, importlib.import_module(f"apt_hal.backends.npu.{name}"))

    def calls(self, name=None):
        return [c for c in self.fake.calls if name is None or c.name == name]


@pytest.fixture
def npu_for(monkeypatch):
    """npu_for(device_name) -> Npu, with the fake installed as sys.modules['torch_npu']."""
    def install(device_name="Ascend910B3"):
        monkeypatch.setitem(sys.modules, "torch_npu", torch_npu_fake.make(device_name))
        for name in BINDINGS:
            monkeypatch.delitem(sys.modules, f"apt_hal.backends.npu.{name}", raising=False)
        return Npu(sys.modules["torch_npu"], chips.for_device_name(device_name))
    yield install
    for name in BINDINGS:  # bound to this test's fake: the next test imports them afresh
        sys.modules.pop(f"apt_hal.backends.npu.{name}", None)


@pytest.fixture
def npu(npu_for):
    return npu_for("Ascend910B3")


def assert_calls_match_signatures(npu):
    """Every recorded call uses the positional count and keywords that signatures.CALLS lists
    (the table the opt-in drift test checks against a torch-npu wheel)."""
    assert npu.fake.calls
    for call in npu.fake.calls:
        positional, keywords = signatures.CALLS[call.name]
        assert len(call.args) == positional, call.name
        assert set(call.kwargs) <= set(keywords), (call.name, set(call.kwargs) - set(keywords))


# ---- chips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, family", [("Ascend910B3", "A2"), ("Ascend910_9391", "A3"), ("Ascend950PR", "A5"),
                                          ("Ascend310P3", "310P"), ("SomethingNew", "A2")])
def test_device_names_pick_their_adaptor(name, family):
    chip = chips.for_device_name(name)
    assert chip.family == family and chip.device_name == name


# ---- rotary -----------------------------------------------------------------------------------


def _rotary_inputs(head_dim, rotary_dim, dtype, b=2, s=3, hq=4, hk=2, positions=16):
    g = torch.Generator().manual_seed(head_dim * 1000 + rotary_dim)
    q = torch.randn(b, s, hq, head_dim, generator=g).to(dtype)
    k = torch.randn(b, s, hk, head_dim, generator=g).to(dtype)
    pos = torch.randint(0, positions, (b, s), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    ang = torch.arange(positions).float()[:, None] * inv[None, :]
    return q, k, pos, torch.cat([ang.cos(), ang.sin()], dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (128, 128), (192, 192), (128, 64), (192, 64)])
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rotary_mode_layout_dtype_and_result_on_a2(npu, style, head_dim, rotary_dim, dtype):
    q, k, pos, cache = _rotary_inputs(head_dim, rotary_dim, dtype)
    assert npu.rotary.supports(npu.chip, q, k, pos, cache, style)
    q_out, k_out = npu.rotary.rotary(npu.chip, q, k, pos, cache, style)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, style)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0)
    mode = "half" if style == "neox" else "interleave"
    fused = style == "neox" and rotary_dim in (64, 128)  # A2's npu_apply_rotary_pos_emb
    name = "npu_apply_rotary_pos_emb" if fused else "npu_rotary_mul"
    calls = npu.calls()
    assert [c.name for c in calls] == [name] * (1 if fused else 2)
    if fused:
        (call,) = calls
        xs, (cos, sin) = call.args[:2], call.args[2:4]
        assert call.kwargs["layout"] == "BSND"
    else:
        xs, (cos, sin) = [c.args[0] for c in calls], calls[0].args[1:3]
    tokens = q.shape[0] * q.shape[1]
    for x, heads in zip(xs, (4, 2)):
        assert tuple(x.shape) == (1, tokens, heads, rotary_dim) and x.dtype == torch.float32  # BSND, B folded
    assert tuple(cos.shape) == tuple(sin.shape) == (1, tokens, 1, rotary_dim) and cos.dtype == torch.float32
    assert all(c.kwargs["rotary_mode"] == mode for c in calls)
    assert_calls_match_signatures(npu)


def test_rotary_in_place_writes_the_reference_result(npu):
    q, k, pos, cache = _rotary_inputs(128, 64, torch.bfloat16)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, "gptj")
    npu.rotary.rotary_(npu.chip, q, k, pos, cache, "gptj")
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def test_rotary_fused_input_copies_leave_the_callers_tensors_alone(npu):
    # npu_apply_rotary_pos_emb updates its inputs in place: the out-of-place op must hand it copies.
    q, k, pos, cache = _rotary_inputs(128, 128, torch.float32)
    q0, k0 = q.clone(), k.clone()
    npu.rotary.rotary(npu.chip, q, k, pos, cache, "neox")
    assert npu.calls()[0].name == "npu_apply_rotary_pos_emb"
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_rotary_strided_inputs(npu):
    q, k, pos, cache = _rotary_inputs(64, 64, torch.float16)
    q_strided = torch.cat([q, q], dim=2)[:, :, ::2]
    out, _ = npu.rotary.rotary(npu.chip, q_strided, k, pos, cache, "neox")
    torch.testing.assert_close(out, ops.rotary.reference(q_strided, k, pos, cache, "neox")[0], rtol=0, atol=0)


def test_rotary_on_a5_fuses_gptj_and_on_310p_declines_it(npu_for):
    a5 = npu_for("Ascend950PR")
    q, k, pos, cache = _rotary_inputs(192, 192, torch.bfloat16)
    q_out, _ = a5.rotary.rotary(a5.chip, q, k, pos, cache, "gptj")
    assert [c.name for c in a5.calls()] == ["npu_apply_rotary_pos_emb"]
    assert a5.calls()[0].kwargs["rotary_mode"] == "interleave"
    torch.testing.assert_close(q_out, ops.rotary.reference(q, k, pos, cache, "gptj")[0], rtol=0, atol=0)
    p310 = npu_for("Ascend310P3")
    q, k, pos, cache = _rotary_inputs(128, 128, torch.float16)
    assert p310.rotary.supports(p310.chip, q, k, pos, cache, "neox")
    assert not p310.rotary.supports(p310.chip, q, k, pos, cache, "gptj")
    p310.rotary.rotary(p310.chip, q, k, pos, cache, "neox")
    assert [c.name for c in p310.calls()] == ["npu_rotary_mul"] * 2


# ---- moe --------------------------------------------------------------------------------------


def _logits(t=9, e=6, dtype=torch.bfloat16, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("device_name, kernel", [("Ascend910B3", "npu_moe_gating_top_k_softmax"),
                                                 ("Ascend950PR", "npu_moe_gating_top_k")])
@pytest.mark.parametrize("scoring, renormalize", [("softmax_topk", False), ("softmax_topk", True),
                                                  ("topk_softmax", False)])
def test_route_renormalisation_and_scoring(npu_for, device_name, kernel, scoring, renormalize):
    npu = npu_for(device_name)
    logits = _logits()
    w, ids = npu.moe.route(npu.chip, logits, 3, scoring, renormalize)
    w_ref, ids_ref = ops.moe_route.reference(logits, 3, scoring, renormalize)
    assert torch.equal(ids, ids_ref) and ids.dtype == torch.int32
    torch.testing.assert_close(w, w_ref)
    assert w.dtype == torch.float32
    (call,) = npu.calls()
    assert call.name == kernel and call.args[0].dtype == torch.float32  # logits upcast: float32 weights
    assert call.kwargs.get("k", call.args[1] if len(call.args) > 1 else None) == 3
    if renormalize or scoring == "topk_softmax":
        torch.testing.assert_close(w.sum(-1), torch.ones(9))
    else:
        assert (w.sum(-1) < 0.999).all()
    assert_calls_match_signatures(npu)


@pytest.mark.parametrize("capacity", [-1, 0, 2, 5])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_permute_matches_the_contract_order_with_capacity(npu, capacity, dtype):
    _, ids = ops.moe_route.reference(_logits(t=11, e=5), 3, "softmax_topk", False)
    ids = ids.to(dtype)
    order, offsets = npu.moe.permute(npu.chip, ids, 5, capacity)
    order_ref, offsets_ref = ops.moe_permute.reference(ids, 5, capacity)
    assert torch.equal(order, order_ref) and order.dtype == torch.int32
    assert torch.equal(offsets, offsets_ref) and offsets.dtype == torch.int64
    (call,) = npu.calls()
    placeholder, expert_idx = call.args
    assert tuple(expert_idx.shape) == (33, 1) and expert_idx.dtype == torch.int32  # one row per assignment
    assert torch.equal(expert_idx[:11, 0], ids[:, 0].int())  # first choices of every token first
    assert placeholder.shape[0] == 33
    assert call.kwargs["expert_num"] == 5 and call.kwargs["row_idx_type"] == 1
    assert call.kwargs["drop_pad_mode"] == 0 and call.kwargs["expert_tokens_num_type"] == 1
    assert_calls_match_signatures(npu)


def _experts_inputs(dtype, activation, bias, capacity, t=7, e=4, k=2, d=32, f=16):
    g = torch.Generator().manual_seed(3)
    _, ids = ops.moe_route.reference(torch.randn(t, e, generator=g), k, "softmax_topk", False)
    order, offsets = ops.moe_permute.reference(ids, e, capacity)
    u = f if activation == "gelu" else 2 * f
    x = torch.randn(t, d, generator=g).to(dtype)
    w_up = (torch.randn(e, u, d, generator=g) / d ** 0.5).to(dtype)
    w_down = (torch.randn(e, d, f, generator=g) / f ** 0.5).to(dtype)
    b_up = torch.randn(e, u, generator=g).to(dtype) if bias else None
    b_down = torch.randn(e, d, generator=g).to(dtype) if bias else None
    return (x, order, offsets, w_up, w_down, None, None, b_up, b_down, k, activation, 1.702, 7.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gpt_oss_swiglu"])
@pytest.mark.parametrize("bias, capacity", [(False, -1), (True, -1), (False, 3)])
def test_experts_grouped_matmul_layout_and_result(npu, dtype, activation, bias, capacity):
    args = _experts_inputs(dtype, activation, bias, capacity)
    x, order, offsets, w_up, w_down = args[:5]
    assert npu.moe.supports_experts(npu.chip, *args)
    y = npu.moe.experts(npu.chip, *args)
    y_ref = ops.moe_experts.reference(*args)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}  # h rounds to bf16 between the matmuls
    torch.testing.assert_close(y, y_ref, **tol)
    if capacity >= 0:
        assert int(offsets[-1]) < order.numel() and (y[int(offsets[-1]):] == 0).all()
    up, down = npu.calls("npu_grouped_matmul")
    for call, w in ((up, w_up), (down, w_down)):
        (rows,), (weight,) = call.args
        assert weight.shape == (w.shape[0], w.shape[2], w.shape[1])  # [E, in, out]
        assert weight.data_ptr() == w.data_ptr()  # a view: no per-call copy of the weights
        assert rows.dtype == dtype and rows.shape[0] == order.numel()
        assert torch.equal(call.kwargs["group_list"], offsets[1:] - offsets[:-1])
        assert call.kwargs["group_list_type"] == 1 and call.kwargs["group_type"] == 0
    assert_calls_match_signatures(npu)


def test_experts_decline_mxfp4_weights(npu):
    args = list(_experts_inputs(torch.float32, "swiglu", False, -1, f=32))
    up_q, up_s = mxfp4.quantize(args[3])
    down_q, down_s = mxfp4.quantize(args[4])
    args[3:7] = [up_q, down_q, up_s, down_s]
    assert not npu.moe.supports_experts(npu.chip, *args)


@pytest.mark.parametrize("capacity", [-1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_indexing_and_dropped_rows(npu, capacity, dtype):
    t, e, k, d = 6, 4, 3, 8
    g = torch.Generator().manual_seed(5)
    weights, ids = ops.moe_route.reference(torch.randn(t, e, generator=g), k, "softmax_topk", True)
    order, offsets = ops.moe_permute.reference(ids, e, capacity)
    y = torch.randn(t * k, d, generator=g).to(dtype)
    y[int(offsets[-1]):] = float("nan")  # dropped rows must contribute exactly nothing
    out = npu.moe.combine(npu.chip, y, order, offsets, weights)
    torch.testing.assert_close(out, ops.moe_combine.reference(y, order, offsets, weights))
    (call,) = npu.calls()
    rows, scales, src_to_dst = call.args[0], call.args[4], call.args[5]
    assert rows.dtype == scales.dtype == torch.float32 and src_to_dst.dtype == torch.int32
    assert call.kwargs["k"] == k
    row_of = torch.empty(t * k, dtype=torch.long)
    row_of[order.long()] = torch.arange(t * k)
    assert int(src_to_dst[1 + 2 * t]) == int(row_of[1 * k + 2])  # token 1's third choice at 1 + 2*T
    assert_calls_match_signatures(npu)


# ---- fp4_matmul -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp4_matmul_on_a5_passes_transposed_views_and_matches(npu_for, dtype, bias):
    npu = npu_for("Ascend950PR")
    g = torch.Generator().manual_seed(7)
    w_packed, w_scales = mxfp4.quantize(torch.randn(48, 64, generator=g))
    x = torch.randn(2, 3, 64, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype) if bias else None
    assert npu.fp4.supports(npu.chip, x, w_packed, w_scales, b)
    y = npu.fp4.fp4_matmul(npu.chip, x, w_packed, w_scales, b)
    torch.testing.assert_close(y, ops.fp4_matmul.reference(x, w_packed, w_scales, b))
    (call,) = npu.calls()
    x2, weight, scales = call.args
    assert tuple(x2.shape) == (6, 64) and tuple(weight.shape) == (32, 48) and tuple(scales.shape) == (2, 48)
    assert weight.data_ptr() == w_packed.data_ptr() and scales.dtype == torch.float8_e8m0fnu
    assert call.kwargs["weight_dtype"] == torch_npu_fake.FLOAT4_E2M1FN_X2 and call.kwargs["antiquant_group_size"] == 32
    assert_calls_match_signatures(npu)


def test_fp4_matmul_declines_where_the_chip_or_dtype_cannot(npu_for):
    w_packed, w_scales = mxfp4.quantize(torch.randn(8, 32))
    a2, a5 = npu_for("Ascend910B3"), npu_for("Ascend950PR")
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert not a2.fp4.supports(a2.chip, x, w_packed, w_scales, None)
    assert "Ascend 950" in a2.chip.mxfp4_reason
    assert not a5.fp4.supports(a5.chip, x.float(), w_packed, w_scales, None)  # the op takes bf16/fp16 x only
    assert not a5.fp4.supports(a5.chip, x[:0], w_packed, w_scales, None)


# ---- paged_tensor -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_paged_write_and_gather_use_the_kernels_for_their_layout(npu, dtype):
    g = torch.Generator().manual_seed(9)
    cache = torch.randint(-50, 50, (6, 4, 2, 8), generator=g).to(dtype)
    values = torch.randint(-50, 50, (5, 2, 8), generator=g).to(dtype)
    slots = torch.tensor([3, -1, 17, 8, 22])
    expected = cache.clone()
    ops.paged_write.reference(expected, values, slots)
    assert npu.paged.supports_write(npu.chip, cache, values, slots)
    npu.paged.write(npu.chip, cache, values, slots)
    assert torch.equal(cache, expected)
    (call,) = npu.calls()
    assert call.kwargs["cache_mode"] == "Norm" and call.args[2] is cache and call.args[3] is cache
    assert torch.equal(call.args[4], torch.tensor([3, 17, 8, 22]))  # padding dropped before the kernel
    table = torch.tensor([[2, 0, -1], [5, 1, 3]])
    out = npu.paged.gather(npu.chip, cache, table)
    assert torch.equal(out, ops.paged_gather.reference(cache, table))
    call = npu.calls("npu_gather_pa_kv_cache")[0]
    assert call.args[2].dtype == torch.int32 and (call.args[2] >= 0).all()
    assert torch.equal(call.args[3], torch.tensor([12, 12], dtype=torch.int32))  # M * block_size each
    assert_calls_match_signatures(npu)


def test_paged_other_layouts_are_left_to_torch_indexing(npu):
    pool = torch.zeros(8, 4, 2, 8)[::2]  # a strided first dimension
    values, slots = torch.zeros(1, 2, 8), torch.tensor([0])
    assert not npu.paged.supports_write(npu.chip, pool, values, slots)
    assert not npu.paged.supports_gather(npu.chip, pool, torch.tensor([0]))
    flat_items = torch.zeros(4, 4, 16)  # items [16]: not the kernels' [heads, head_dim]
    assert not npu.paged.supports_write(npu.chip, flat_items, torch.zeros(1, 16), slots)
