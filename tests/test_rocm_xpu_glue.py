"""GLUE tests of the vendor-library bindings of rocm (aiter) and xpu (vllm-xpu-kernels), on CPU
tensors against fakes that compute and record (tests/fakes/rocm_xpu_fakes.py). They prove the
argument mapping, not the numerics of the vendors' kernels: nothing here ran on AMD or Intel
hardware."""

import importlib
import sys

import pytest
import torch

from apt_hal import ops
from apt_hal.backends._probe import import_binding
from tests.fakes.rocm_xpu_fakes import FakeAiter, FakeVllmXpu


@pytest.fixture
def aiter_rotary(monkeypatch):
    fake = FakeAiter()
    monkeypatch.setitem(sys.modules, "aiter", fake.module)
    monkeypatch.delitem(sys.modules, "apt_hal.backends.rocm.aiter_rotary", raising=False)
    fake.binding = importlib.import_module("apt_hal.backends.rocm.aiter_rotary")
    yield fake
    sys.modules.pop("apt_hal.backends.rocm.aiter_rotary", None)


@pytest.fixture
def vllm_xpu_rotary(monkeypatch):
    fake = FakeVllmXpu()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.ops._C, "rotary_embedding", fake.rotary_embedding, raising=False)
    monkeypatch.delitem(sys.modules, "apt_hal.backends.xpu.vllm_xpu_rotary", raising=False)
    fake.binding = importlib.import_module("apt_hal.backends.xpu.vllm_xpu_rotary")
    yield fake
    sys.modules.pop("apt_hal.backends.xpu.vllm_xpu_rotary", None)


def _inputs(rotary_dim=8, hq=4, hk=2):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, hq, 8), torch.randn(2, 3, hk, 8)
    positions = torch.randint(0, 16, (2, 3))
    return q, k, positions, torch.randn(16, rotary_dim)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_aiter_rotary_maps_the_contract(aiter_rotary, style, rotary_dim):
    q, k, positions, cache = _inputs(rotary_dim)
    got = aiter_rotary.binding.rotary(q, k, positions, cache, style)
    for g, want in zip(got, ops.rotary.reference(q, k, positions, cache, style)):
        torch.testing.assert_close(g, want)
    (call,) = aiter_rotary.calls
    x, y, cos, sin, pos, rotate_style = call.args
    assert tuple(x.shape) == (1, 6, 4, rotary_dim) and tuple(y.shape) == (1, 6, 2, rotary_dim)
    assert tuple(cos.shape) == (16, 1, 1, rotary_dim // 2) and tuple(pos.shape) == (1, 6)
    assert rotate_style == {"neox": 0, "gptj": 1}[style]
    assert call.kwargs == {"reuse_freqs_front_part": True, "nope_first": False}


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_vllm_xpu_rotary_maps_the_contract(vllm_xpu_rotary, style, rotary_dim):
    q, k, positions, cache = _inputs(rotary_dim)
    q_in, k_in = q.clone(), k.clone()
    vllm_xpu_rotary.binding.rotary_(q_in, k_in, positions, cache, style)
    for g, want in zip((q_in, k_in), ops.rotary.reference(q, k, positions, cache, style)):
        torch.testing.assert_close(g, want)
    (call,) = vllm_xpu_rotary.calls
    pos, query, key, head_size, cos_sin_cache, is_neox = call.args
    assert tuple(pos.shape) == (6,) and tuple(query.shape) == (6, 32) and tuple(key.shape) == (6, 16)
    assert head_size == 8 and is_neox == (style == "neox") and cos_sin_cache.shape == (16, rotary_dim)


def test_the_bindings_decline_cpu_and_strided_inputs(aiter_rotary, vllm_xpu_rotary):
    q, k, positions, cache = _inputs()
    assert not aiter_rotary.binding.supports(q, k, positions, cache)  # CPU, not an AMD GPU
    assert not vllm_xpu_rotary.binding.supports(q, k, positions, cache)


def test_a_missing_or_broken_vendor_library_is_a_reason_not_an_import_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "apt_hal.backends.rocm.aiter_rotary", raising=False)
    monkeypatch.setitem(sys.modules, "aiter", None)  # not installed
    assert import_binding("apt_hal.backends.rocm.aiter_rotary", "amd-aiter") == (
        None, "amd-aiter is not installed (aiter not found)")
    wrong = FakeAiter().module  # the unrelated PyPI package named aiter has no such function
    del wrong.rope_cached_positions_2c_fwd_inplace
    monkeypatch.setitem(sys.modules, "aiter", wrong)
    module, why = import_binding("apt_hal.backends.rocm.aiter_rotary", "amd-aiter")
    assert module is None and why.startswith("amd-aiter does not load here: ImportError: cannot import name")
    monkeypatch.delitem(sys.modules, "vllm_xpu_kernels", raising=False)
    module, why = import_binding("apt_hal.backends.xpu.vllm_xpu_rotary", "vllm-xpu-kernels")
    assert module is None and why == "vllm-xpu-kernels is not installed (vllm_xpu_kernels not found)"
    sys.modules.pop("apt_hal.backends.rocm.aiter_rotary", None)


def test_bind_registers_the_binding_when_its_library_loads(aiter_rotary):
    from apt_hal import registry
    from apt_hal.backends import _vendor_rotary

    def unbind():
        for op in ("rotary", "rotary_"):
            for entry in [i for i in registry.implementations(op, "rocm") if i.name == "rocm.aiter"]:
                registry.unregister_impl(entry)

    registry.activate("rocm")  # binds the fake when this is the first activation in the process
    unbind()
    assert _vendor_rotary.bind("rocm", "apt_hal.backends.rocm.aiter_rotary", "amd-aiter") == ""
    try:
        for op in ("rotary", "rotary_"):
            (entry,) = [i for i in registry.implementations(op, "rocm") if i.name == "rocm.aiter"]
            assert entry.supports is aiter_rotary.binding.supports
    finally:
        unbind()  # the fake leaves with this test
