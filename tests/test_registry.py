"""The registry: backend declarations, policy (use / env / auto / strict), fallback, plugins, explain."""

import logging
import threading

import pytest
import torch

import apt_hal
from apt_hal import ops, registry
from apt_hal.errors import BackendUnavailableError, OpNotImplementedError, UnknownBackendError

SEVEN = {"cpu", "cuda-triton", "rocm", "xpu", "hpu", "npu", "huawei-cloud"}


def _rotary_args():
    torch.manual_seed(0)
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    pos = torch.tensor([[0, 2, 1]])
    cache = torch.randn(4, 8)
    return q, k, pos, cache, "neox"


@pytest.fixture
def test_backend():
    """A backend named 'test' on CPU tensors with no implementations; removed afterwards."""
    decl = registry.Backend(name="test", device_type="cpu", probe=lambda: registry.Probe(True, "test double"),
                            implementations="builtins")
    registry.register_backend(decl, origin="tests/test_registry.py")
    yield "test"
    registry.unregister_backend("test")


def test_all_seven_backends_are_declared_with_a_reason():
    found = registry.backends()
    assert SEVEN <= set(found)
    for name in SEVEN:
        p = registry.probe(name)
        assert isinstance(p.available, bool) and p.detail, name
    assert registry.probe("cpu").available


def test_explain_lists_every_backend_and_every_op():
    text = str(apt_hal.explain())
    for name in SEVEN:
        assert name in text
    for op in ops.ALL_OPS:
        assert op.name in text
    assert "reference *" in text  # the cpu backend serves CPU tensors under auto


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(UnknownBackendError, match="known: .*cpu"):
        apt_hal.use("tpu")


def test_choosing_an_unavailable_backend_raises_with_reason_and_install_hint():
    if registry.probe("npu").available:
        pytest.skip("this machine has an Ascend NPU")
    with pytest.raises(BackendUnavailableError,
                       match=r"'npu' is unavailable: torch_npu is not installed.*pip install torch-npu"):
        apt_hal.use("npu")


def test_use_globally_and_as_a_scope():
    assert registry.current_policy() == registry.Policy("auto", False)
    apt_hal.use("cpu")
    assert registry.current_policy().backend == "cpu"
    with apt_hal.use("auto", strict=True):
        assert registry.current_policy() == registry.Policy("auto", True)
    assert registry.current_policy().backend == "cpu"  # the scope restored the global choice


def test_a_scope_does_not_leak_into_other_threads():
    seen = {}
    with apt_hal.use("cpu", strict=True):
        t = threading.Thread(target=lambda: seen.setdefault("policy", registry.current_policy()))
        t.start()
        t.join()
        assert registry.current_policy().strict
    assert seen["policy"] == registry.Policy("auto", False)


def test_environment_variable_sets_the_policy(monkeypatch):
    monkeypatch.setenv("APT_HAL_BACKEND", "cpu")
    monkeypatch.setenv("APT_HAL_STRICT", "1")
    registry._reset_for_tests()
    assert registry.current_policy() == registry.Policy("cpu", True)


def test_environment_variable_naming_an_unavailable_backend_fails_at_first_call(monkeypatch):
    if registry.probe("npu").available:
        pytest.skip("this machine has an Ascend NPU")
    monkeypatch.setenv("APT_HAL_BACKEND", "npu")
    registry._reset_for_tests()
    import apt_hal as fresh  # importing never fails; the first op call does, with the reason

    with pytest.raises(BackendUnavailableError, match="torch_npu is not installed"):
        fresh.ops.rotary(*_rotary_args())


def test_auto_logs_every_probe(caplog):
    with caplog.at_level(logging.INFO, logger="apt_hal"):
        apt_hal.use("auto")
    logged = caplog.text
    for name in SEVEN:
        assert name in logged


@pytest.mark.usefixtures("test_backend")
def test_missing_implementation_falls_back_with_one_warning():
    args = _rotary_args()
    expected = ops.rotary.reference(*args)
    apt_hal.use("test")
    with pytest.warns(RuntimeWarning, match="rotary falls back to the reference.*'test' has no implementation"):
        out = ops.rotary(*args)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        ops.rotary(*args)


@pytest.mark.usefixtures("test_backend")
def test_strict_turns_fallback_into_an_error():
    with apt_hal.use("test", strict=True):
        with pytest.raises(OpNotImplementedError, match="rotary cannot run on backend 'test'"):
            ops.rotary(*_rotary_args())


@pytest.mark.usefixtures("test_backend")
def test_registered_implementation_is_used_and_supports_can_decline():
    calls = []

    def rotary_test(q, k, positions, cos_sin_cache, style="neox"):
        calls.append(style)
        return ops.rotary.reference(q, k, positions, cos_sin_cache, style)

    registry.register_impl(ops.rotary, "test", rotary_test,
                                               supports=lambda q, k, positions, cos_sin_cache, style: style == "neox")
    args = list(_rotary_args())
    with apt_hal.use("test", strict=True):
        ops.rotary(*args)
        assert calls == ["neox"]
        args[-1] = "gptj"
        with pytest.raises(OpNotImplementedError, match="declined this call"):
            ops.rotary(*args)
    row = next(r for r in apt_hal.explain().ops if r["op"] == "rotary")
    assert row["test"] == "rotary_test"


@pytest.mark.usefixtures("test_backend")
def test_the_dispatcher_path_uses_the_same_selection():
    calls = []

    def rotary_test(q, k, positions, cos_sin_cache, style="neox"):
        calls.append(1)
        return ops.rotary.reference(q, k, positions, cos_sin_cache, style)

    registry.register_impl(ops.rotary, "test", rotary_test)
    with apt_hal.use("test", strict=True):
        torch.ops.apt_hal.rotary(*_rotary_args())  # what traced graphs call
    assert calls == [1]


def test_inputs_on_another_device_fall_back_visibly():
    decl = registry.Backend(name="meta-test", device_type="meta", probe=lambda: registry.Probe(True, "test"),
                            implementations="builtins")
    registry.register_backend(decl, origin="test")
    try:
        with apt_hal.use("meta-test"):
            with pytest.warns(RuntimeWarning, match="inputs are on cpu but backend 'meta-test' runs on meta"):
                ops.rotary(*_rotary_args())
    finally:
        registry.unregister_backend("meta-test")


@pytest.mark.usefixtures("test_backend")
def test_implementation_registration_errors():
    def wrong(q, k, positions, cache, style="neox"):  # 'cache' is not the contract's name
        return q, k

    with pytest.raises(TypeError, match="parameters .* the contract's are"):
        registry.register_impl(ops.rotary, "test", wrong)

    def rotary_ok(q, k, positions, cos_sin_cache, style="neox"):
        return q, k

    registry.register_impl(ops.rotary, "test", rotary_ok)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_impl(ops.rotary, "test", rotary_ok)
    with pytest.raises(KeyError, match="unknown op"):
        registry.register_impl("not_an_op", "test", rotary_ok)
    with pytest.raises(UnknownBackendError):
        registry.register_impl(ops.rotary, "nope", rotary_ok)


# --- torch.compile may trace into a backend's own op; torch.export keeps the apt_hal op --------

_TRACE_LIB = torch.library.Library("apt_hal_test", "DEF")
_TRACE_LIB.define("rotary(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, str style='neox') "
                  "-> (Tensor, Tensor)")
_TRACE_LIB.impl("rotary", lambda *a: ops.rotary.reference(*a), "CompositeExplicitAutograd")
torch.library.register_fake("apt_hal_test::rotary", lambda q, k, *rest: (torch.empty_like(q), torch.empty_like(k)),
                            lib=_TRACE_LIB)


@pytest.mark.usefixtures("test_backend")
def test_compile_traces_the_backends_traceable_op_and_export_keeps_apt_hal():
    def rotary_test(q, k, positions, cos_sin_cache, style="neox"):
        return ops.rotary.reference(q, k, positions, cos_sin_cache, style)

    registry.register_impl(ops.rotary, "test", rotary_test, traceable="apt_hal_test::rotary")
    graphs = []

    def capture(gm, _example_inputs):
        graphs.append(gm)
        return gm.forward

    class M(torch.nn.Module):
        def forward(self, q, k, positions, cos_sin_cache):
            return ops.rotary(q, k, positions, cos_sin_cache)

    args = _rotary_args()[:4]
    with apt_hal.use("test", strict=True):
        torch._dynamo.reset()
        out = torch.compile(M(), backend=capture, fullgraph=True)(*args)
        exported = torch.export.export(M(), args)
    called = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("apt_hal_test.rotary" in c for c in called), called
    assert "apt_hal.rotary.default" in {str(n.target) for n in exported.graph.nodes}
    for o, e in zip(out, ops.rotary.reference(*args)):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


_TRACE_LIB.define("rotary_(Tensor(a0!) q, Tensor(a1!) k, Tensor positions, Tensor cos_sin_cache, "
                  "str style='neox') -> ()")
_TRACE_LIB.impl("rotary_", lambda *a: ops.rotary_.reference(*a), "CompositeExplicitAutograd")
torch.library.register_fake("apt_hal_test::rotary_", lambda *a: None, lib=_TRACE_LIB)


@pytest.mark.usefixtures("test_backend")
def test_compile_keeps_the_apt_hal_op_for_an_op_that_writes_its_arguments():
    """An in-place op is not traced into even where the backend offers a traceable op: torch's
    functionalization of a traced kernel's writes mishandles views with gaps in inference mode,
    which is how the models call the in-place ops (contract.Op._traced_call)."""
    def rotary_in_place(q, k, positions, cos_sin_cache, style="neox"):
        ops.rotary_.reference(q, k, positions, cos_sin_cache, style)

    registry.register_impl(ops.rotary_, "test", rotary_in_place, traceable="apt_hal_test::rotary_")
    graphs = []

    def capture(gm, _example_inputs):
        graphs.append(gm)
        return gm.forward

    def rotate(q, k, positions, cos_sin_cache):
        ops.rotary_(q, k, positions, cos_sin_cache)
        return q, k

    q, k, positions, cos_sin_cache = _rotary_args()[:4]
    expected = [t.clone() for t in (q, k)]
    ops.rotary_.reference(*expected, positions, cos_sin_cache)
    with apt_hal.use("test", strict=True), torch.inference_mode():
        torch._dynamo.reset()
        fused = torch.cat([q, k], dim=2)  # q and k as views with gaps, as a model slices them
        got = torch.compile(rotate, backend=capture, fullgraph=True)(fused[:, :, :q.shape[2]],
                                                                      fused[:, :, q.shape[2]:], positions,
                                                                      cos_sin_cache)
    called = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "apt_hal.rotary_.default" in called and not any("apt_hal_test" in c for c in called), called
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.usefixtures("test_backend")
def test_check_levels():
    seen = []

    def rotary_test(q, k, positions, cos_sin_cache, style="neox"):
        seen.append(positions.max().item())
        return q, k

    registry.register_impl(ops.rotary, "test", rotary_test)
    q, k, pos, cache, style = _rotary_args()
    with apt_hal.use("test", strict=True):
        far = pos + 100  # outside the cache: a value error only 'values' checks see
        ops.rotary(q, k, far, cache, style)
        assert seen == [102]
        previous = apt_hal.set_checks("values")
        try:
            with pytest.raises(apt_hal.ContractError, match="'positions' must hold values in"):
                ops.rotary(q, k, far, cache, style)
            apt_hal.set_checks("none")  # no checks at all: even a wrong dtype reaches the backend
            ops.rotary(q, k, pos.float(), cache, style)
            assert len(seen) == 2
        finally:
            apt_hal.set_checks(previous)
        with pytest.raises(apt_hal.ContractError, match="'positions' must have dtype int32 or int64"):
            ops.rotary(q, k, pos.float(), cache, style)
    with pytest.raises(ValueError, match="level must be one of none, metadata, values"):
        apt_hal.set_checks("some")
