"""GLUE tests of the hpu bindings, on CPU tensors, against a fake habana_frameworks (tests/fakes).

The fake computes each Gaudi op with the formula its callers rely on and records its arguments.
These tests prove the argument mapping and the layout of the results; they are not conformance
results, and nothing here ran on Gaudi hardware. (No fake "hpu" device is possible: torch parses
"hpu" as its in-tree device type.)
"""

import importlib
import sys

import pytest
import torch

import apt_hal
from apt_hal import mxfp4, ops, registry
from apt_hal.conformance import runner, status
from tests.fakes import habana_fake

BINDINGS = ("rotary", "moe", "paged", "impls")


@pytest.fixture
def hpu(monkeypatch):
    fake = habana_fake.Fake()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.ops.hpu, "mixture_of_experts", fake.mixture_of_experts, raising=False)
    for name in BINDINGS:
        monkeypatch.delitem(sys.modules, f"apt_hal.backends.hpu.{name}", raising=False)
    fake.rotary = importlib.import_module("apt_hal.backends.hpu.rotary")
    fake.moe = importlib.import_module("apt_hal.backends.hpu.moe")
    fake.paged = importlib.import_module("apt_hal.backends.hpu.paged")
    yield fake
    for name in BINDINGS:
        sys.modules.pop(f"apt_hal.backends.hpu.{name}", None)


@pytest.fixture
def hpu_activated(hpu, monkeypatch):
    """The hpu backend activated against the fake (its probe shown one device file); its
    registrations are removed afterwards so no other test sees an "available" hpu."""
    import apt_hal.backends.hpu as declaration

    monkeypatch.setattr(declaration, "device_files",
                        lambda pattern: ["/dev/accel/accel0"] if "accel" in pattern else [])
    registry._reset_for_tests()
    registry.activate("hpu")
    yield hpu
    for op_name in registry.contracts():
        for entry in registry.implementations(op_name, "hpu"):
            registry.unregister_impl(entry)
    registry._activated.pop("hpu", None)
    registry._reset_for_tests()


def _rotary_inputs(head_dim, rotary_dim, dtype, b=2, s=3, hq=4, hk=2, positions=16):
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    q = torch.randn(b, s, hq, head_dim, generator=g).to(dtype)
    k = torch.randn(b, s, hk, head_dim, generator=g).to(dtype)
    pos = torch.randint(0, positions, (b, s), generator=g)
    ang = torch.arange(positions).float()[:, None] * torch.rand(rotary_dim // 2, generator=g)[None, :]
    return q, k, pos, torch.cat([ang.cos(), ang.sin()], dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (128, 128), (192, 192), (128, 64)])
@pytest.mark.parametrize("style, mode", [("neox", "BLOCKWISE"), ("gptj", "PAIRWISE")])
def test_rotary_mode_layout_and_result(hpu, style, mode, head_dim, rotary_dim, dtype):
    q, k, pos, cache = _rotary_inputs(head_dim, rotary_dim, dtype)
    q_out, k_out = hpu.rotary.rotary(q, k, pos, cache, style)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, style)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0)
    assert [c.name for c in hpu.calls] == ["apply_rotary_pos_emb"] * 2
    for call, heads in zip(hpu.calls, (4, 2)):
        x, cos, sin, position_ids, offset, got_mode = call.args
        assert tuple(x.shape) == (6, heads, rotary_dim) and x.dtype == torch.float32
        assert tuple(cos.shape) == tuple(sin.shape) == (6, 1, rotary_dim) and cos.dtype == torch.float32
        assert got_mode.name == mode and position_ids is None and offset == 0


def test_rotary_in_place(hpu):
    q, k, pos, cache = _rotary_inputs(128, 64, torch.bfloat16)
    q_ref, k_ref = ops.rotary.reference(q, k, pos, cache, "gptj")
    hpu.rotary.rotary_(q, k, pos, cache, "gptj")
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


def _experts_args(capacity, quantized=False, t=6, e=3, k=2, d=32, f=32):
    g = torch.Generator().manual_seed(11)
    _, ids = ops.moe_route.reference(torch.randn(t, e, generator=g), k, "softmax_topk", False)
    order, offsets = ops.moe_permute.reference(ids, e, capacity)
    x = torch.randn(t, d, generator=g).bfloat16()
    w_up = (torch.randn(e, 2 * f, d, generator=g) / d ** 0.5).bfloat16()
    w_down = (torch.randn(e, d, f, generator=g) / f ** 0.5).bfloat16()
    scales = (None, None)
    if quantized:
        (w_up, up_s), (w_down, down_s) = mxfp4.quantize(w_up), mxfp4.quantize(w_down)
        scales = (up_s, down_s)
    return [x, order, offsets, w_up, w_down, *scales, None, None, k, "swiglu", 1.702, 7.0]


@pytest.mark.parametrize("capacity, quantized", [(-1, False), (3, False), (-1, True)])
def test_mixture_of_experts_one_row_per_assignment(hpu, capacity, quantized):
    args = _experts_args(capacity, quantized)
    x, order, offsets = args[:3]
    assert hpu.moe.supports(*args)
    y = hpu.moe.experts(*args)
    torch.testing.assert_close(y, ops.moe_experts.reference(*args), rtol=2e-2, atol=2e-2)  # a bf16 kernel
    assert y.dtype == torch.bfloat16 and (y[int(offsets[-1]):] == 0).all()
    (call,) = hpu.calls
    kw = call.kwargs
    s = order.numel()
    assert tuple(kw["expert_routing_table"].shape) == (s, 1) and kw["expert_routing_table"].dtype == torch.int64
    assert torch.equal(kw["router_weights"], torch.ones(s, 1, dtype=torch.bfloat16))
    assert len(kw["w12"]) == len(kw["w3"]) == 3 and tuple(kw["w12"][0].shape) == (64, 32)
    assert tuple(kw["w3"][0].shape) == (32, 32) and kw["w12"][0].dtype == torch.bfloat16
    assert (kw["experts_min"], kw["experts_max"], kw["activation"], kw["permuted_weights"]) == (0, 2, "silu", True)
    kept = int(offsets[-1])
    owners = torch.repeat_interleave(torch.arange(3), offsets[1:] - offsets[:-1])
    assert torch.equal(kw["expert_routing_table"][:kept, 0], owners)


def test_mixture_of_experts_declines_what_the_kernel_lacks(hpu):
    args = _experts_args(-1)
    for index, value in ((10, "gelu"), (10, "gpt_oss_swiglu"), (7, torch.zeros(3, 64, dtype=torch.bfloat16))):
        changed = list(args)
        changed[index] = value
        assert not hpu.moe.supports(*changed)
    as_float = list(args)
    as_float[0] = args[0].float()
    assert not hpu.moe.supports(*as_float)


def test_paged_index_copy_and_index_select(hpu):
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(6, 4, 2, 8, generator=g)
    values, slots = torch.randn(4, 2, 8, generator=g), torch.tensor([5, -1, 0, 23])
    expected = cache.clone()
    ops.paged_write.reference(expected, values, slots)
    assert hpu.paged.supports_write(cache, values, slots)
    hpu.paged.write(cache, values, slots)
    assert torch.equal(cache, expected)
    table = torch.tensor([[4, -1], [0, 2]])
    assert torch.equal(hpu.paged.gather(cache, table), ops.paged_gather.reference(cache, table))
    dst, dst_ref = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    src_ids, dst_ids = torch.tensor([5, 1]), torch.tensor([2, 0])
    hpu.paged.copy_blocks(cache, src_ids, dst, dst_ids)
    ops.paged_copy_blocks.reference(cache, src_ids, dst_ref, dst_ids)
    assert torch.equal(dst, dst_ref)
    strided = torch.zeros(12, 4, 2, 8)[::2]
    assert not hpu.paged.supports_write(strided, values, slots)
    assert torch.equal(hpu.paged.gather(strided, table), ops.paged_gather.reference(strided, table))


@pytest.mark.usefixtures("hpu_activated")
def test_explain_shows_the_native_hpu_bindings():
    rows = {line.split()[0]: line for line in str(apt_hal.explain()).splitlines() if line.startswith("  ")
            and line.split()}
    assert "habana-frameworks installed, 1 device file(s)" in rows["hpu"]
    for op, name in [("rotary", "hpex.apply_rotary_pos_emb *"), ("rotary_", "hpex.apply_rotary_pos_emb *"),
                     ("moe_experts", "hpu.mixture_of_experts *"), ("paged_write", "index_copy_ | torch_indexing *"),
                     ("paged_gather", "index_select *"), ("paged_copy_blocks", "index_select+index_copy_ *"),
                     ("fp4_matmul", "reference (no MXFP4 matmul in the Gaudi software stack) *"),
                     ("moe_route", "reference (fallback) *")]:
        assert name in rows[op], rows[op]


def test_conformance_keeps_hpu_and_npu_not_run_with_the_probe_reason():
    report = runner.run(["hpu", "npu"], patterns=["rotary/float32/*"], known_failures=[])
    assert report["backends"]["hpu"]["status"] == report["backends"]["npu"]["status"] == "NOT_RUN"
    assert report["cases"]
    for case in report["cases"]:
        assert case["status"] == status.NOT_RUN
        assert case["message"] == registry.probe(case["backend"]).detail
    assert "not installed" in registry.probe("hpu").detail and "not installed" in registry.probe("npu").detail
