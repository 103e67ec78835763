"""register_impl holds every implementation, and the torch op it names as traceable, to the contract's schema."""

import textwrap
from typing import Tuple

import pytest
import torch

from apt_hal import ops, registry
from apt_hal.errors import BackendUnavailableError

Tensor = torch.Tensor

_LIB = torch.library.Library("apt_hal_schema_test", "DEF")
_LIB.define("rotary(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, str style='neox') -> (Tensor, Tensor)")
_LIB.define("rotary_gptj(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, str style='gptj') "
            "-> (Tensor, Tensor)")
_LIB.define("rotary_one(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, str style='neox') -> Tensor")


@pytest.fixture
def schema_backend():
    registry.register_backend(registry.Backend(name="schema-test", device_type="cpu", implementations="builtins",
                                               probe=lambda: registry.Probe(True, "test double")), origin="tests")
    yield "schema-test"
    registry.unregister_backend("schema-test")


def _register(fn, **kw):
    return registry.register_impl(ops.rotary, "schema-test", fn, **kw)


def test_unannotated_and_annotated_implementations_with_the_contracts_schema_register(schema_backend):
    def plain(q, k, positions, cos_sin_cache, style="neox"):
        return q, k

    def typed(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor,
              style: str = "neox") -> Tuple[Tensor, Tensor]:
        return q, k

    _register(plain)
    _register(typed, traceable="apt_hal_schema_test::rotary")
    assert [i.name for i in registry.implementations("rotary", schema_backend)] == ["schema-test.plain",
                                                                                   "schema-test.typed"]


def test_a_wrong_parameter_name_is_rejected(schema_backend):
    def rotary_cache(q, k, positions, cache, style="neox"):
        return q, k

    with pytest.raises(TypeError, match=r"schema-test.rotary_cache of rotary has parameters .*'cache'.* "
                                        r"the contract's are .*'cos_sin_cache'"):
        _register(rotary_cache)


def test_a_wrong_parameter_type_is_rejected_naming_both_schemas(schema_backend):
    def int_positions(q, k, positions: int, cos_sin_cache, style="neox"):
        return q, k

    with pytest.raises(TypeError) as e:
        _register(int_positions)
    message = str(e.value)
    assert "parameter 3 is `int positions` where the contract has `Tensor positions`" in message
    assert "Implementation: (Tensor q, Tensor k, SymInt positions," in message
    assert f"contract: {ops.rotary.schema}" in message
    assert not registry.implementations("rotary", schema_backend)


def test_an_implementation_may_leave_out_the_contracts_defaults(schema_backend):
    def no_defaults(q, k, positions, cos_sin_cache, style):  # the op always passes every argument
        return q, k

    _register(no_defaults)
    assert [i.fn for i in registry.implementations("rotary", schema_backend)] == [no_defaults]


@pytest.mark.parametrize("signature, why", [
    ('style="gptj"', "parameter 5 is `str style='gptj'` where the contract has `str style='neox'`"),
    ('style: bool = False', "parameter 5 is `bool style=False` where the contract has `str style='neox'`"),
])
def test_a_wrong_default_or_type_of_a_defaulted_parameter_is_rejected(schema_backend, signature, why):
    namespace = {}
    exec(f"def wrong(q, k, positions, cos_sin_cache, {signature}):\n    return q, k", namespace)
    with pytest.raises(TypeError, match="does not match the contract") as e:
        _register(namespace["wrong"])
    assert why in str(e.value)


def test_a_wrong_return_annotation_is_rejected(schema_backend):
    def one_output(q, k, positions, cos_sin_cache, style="neox") -> Tensor:
        return q

    with pytest.raises(TypeError, match=r"it returns \(Tensor\) where the contract returns \(Tensor, Tensor\)"):
        _register(one_output)


def test_an_annotation_that_is_no_schema_type_is_rejected(schema_backend):
    def odd(q, k, positions: "list[object]", cos_sin_cache, style="neox"):
        return q, k

    with pytest.raises(TypeError, match="odd has no valid torch schema"):
        _register(odd)


@pytest.mark.parametrize("op, why", [
    ("rotary_gptj", "parameter 5 is `str style='gptj'` where the contract has `str style='neox'`"),
    ("rotary_one", r"it returns \(Tensor\) where the contract returns \(Tensor, Tensor\)"),
])
def test_a_traceable_op_with_another_schema_is_rejected(schema_backend, op, why):
    def rotary_ok(q, k, positions, cos_sin_cache, style="neox"):
        return q, k

    with pytest.raises(TypeError, match=f"the traceable op apt_hal_schema_test::{op} of implementation "
                                        f"schema-test.rotary_ok does not match the contract of rotary: {why}"):
        _register(rotary_ok, traceable=f"apt_hal_schema_test::{op}")
    assert not registry.implementations("rotary", schema_backend)


def test_a_traceable_op_must_exist_and_be_named_with_its_namespace(schema_backend):
    def rotary_ok(q, k, positions, cos_sin_cache, style="neox"):
        return q, k

    with pytest.raises(ValueError, match="traceable must name a torch op as 'namespace::name', got 'rotary'"):
        _register(rotary_ok, traceable="rotary")
    _register(rotary_ok, traceable="apt_hal_schema_test::missing")  # may be defined before activation
    with pytest.raises(BackendUnavailableError, match="traceable='apt_hal_schema_test::missing', which is not a "
                                                      "defined torch op"):
        registry.activate(schema_backend)


def test_once_activated_a_backends_traceable_op_must_exist_at_registration(schema_backend):
    def rotary_ok(q, k, positions, cos_sin_cache, style="neox"):
        return q, k

    registry.activate(schema_backend)
    with pytest.raises(TypeError, match="traceable='apt_hal_schema_test::missing', which is not a defined torch op"):
        _register(rotary_ok, traceable="apt_hal_schema_test::missing")


_BACKEND_MODULE = '''
import torch
from apt_hal import ops
from apt_hal.registry import impl

@impl(ops.rotary, backend="{backend}", name="late", traceable="{namespace}::rotary")
def rotary_late(q, k, positions, cos_sin_cache, style="neox"):
    return q, k

LIB = torch.library.Library("{namespace}", "DEF")  # defined after the registration that names it
LIB.define("rotary(Tensor q, Tensor k, Tensor positions, Tensor cos_sin_cache, str style={default!r}) "
           "-> (Tensor, Tensor)")
'''


@pytest.mark.parametrize("default, works", [("neox", True), ("gptj", False)])
def test_a_traceable_op_defined_later_in_the_backends_module_is_checked_at_activation(tmp_path, monkeypatch,
                                                                                        default, works):
    name = f"late_{default}"
    (tmp_path / f"apt_hal_schema_{name}.py").write_text(textwrap.dedent(
        _BACKEND_MODULE.format(backend=name, namespace=f"apt_hal_schema_{name}", default=default)))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register_backend(registry.Backend(name=name, device_type="cpu", implementations=f"apt_hal_schema_{name}",
                                               probe=lambda: registry.Probe(True, "test double")), origin="tests")
    try:
        if works:
            registry.activate(name)
            assert [i.name for i in registry.implementations("rotary", name)] == [f"{name}.late"]
        else:
            with pytest.raises(BackendUnavailableError, match=f"backend '{name}' failed to activate") as e:
                registry.activate(name)
            assert "parameter 5 is `str style='gptj'` where the contract has `str style='neox'`" in str(e.value)
    finally:
        registry.unregister_backend(name)


def test_the_built_in_implementations_have_their_contracts_schemas():
    registry.activate("cuda-triton")  # Triton's interpreter (tests/conftest.py) when there is no GPU
    registry.activate("cpu")
    assert registry.activation_error("cuda-triton") is None
    traceable = [i.traceable for i in registry.implementations("rotary") if i.traceable]
    assert traceable == ["apt_hal_triton::rotary"]
