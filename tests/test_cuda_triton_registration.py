"""registration.kernel_op: every cuda-triton op is one launcher, registered as an apt_hal
implementation wired to its traceable triton_op, both with the contract's schema."""

import pytest

from apt_hal import impl_schema, ops, registry
from apt_hal.backends.cuda_triton import impls  # noqa: F401  (registers the cuda-triton kernels)
from apt_hal.backends.cuda_triton.registration import NAMESPACE, kernel_op


def test_every_implementation_names_its_triton_op_with_the_contract_schema():
    checked = []
    for name, contract in registry.contracts().items():
        for entry in registry.implementations(name, "cuda-triton"):
            assert entry.traceable == f"{NAMESPACE}::{name}", entry.name
            traced = impl_schema.traceable_schema(entry.traceable)
            assert traced is not None, entry.traceable
            assert impl_schema.difference(impl_schema.parse(contract.schema), traced) is None, entry.traceable
            checked.append(name)
    assert sorted(checked) == sorted(["fp4_matmul", "moe_route", "moe_permute", "moe_experts", "moe_combine",
                                      "rotary", "rotary_", "paged_write", "paged_gather", "paged_copy_blocks"])


def test_a_launcher_without_a_keyword_only_launch_is_refused():
    def rotary(q, k, positions, cos_sin_cache, style="neox", launch=None):
        return q, k

    with pytest.raises(TypeError, match="launcher .*rotary of rotary needs a keyword-only 'launch'"):
        kernel_op(ops.rotary)(rotary)
    assert [e.name for e in registry.implementations("rotary", "cuda-triton")] == ["cuda-triton.triton"]


def test_every_kernel_reaches_its_helpers_by_name_as_torch_compile_needs():
    """torch.compile (Inductor) rebuilds a user Triton kernel's source from the globals its code
    names: JIT functions, constants and triton dtypes. A helper reached through a module attribute
    (``some_module.helper(...)``) is left undefined, and the compiled kernel fails to build on the
    GPU only ("NameError: nvidia_ptx is not defined", seen on an H100). Walk every kernel's calls as
    Inductor does and allow no module but triton and triton.language."""
    import dis
    import types

    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    jitted = (JITFunction, InterpretedFunction)  # the tests run kernels in the interpreter without a GPU
    from apt_hal.backends.cuda_triton import fp4_matmul, moe, paged, rotary

    allowed_modules = {triton, tl}
    seen, problems = set(), []

    def walk(fn) -> None:
        if fn in seen:
            return
        seen.add(fn)
        # Global loads only (co_names also holds attribute names, such as tl.math's "math").
        for name in {i.argval for i in dis.get_instructions(fn.fn) if i.opname == "LOAD_GLOBAL"}:
            value = fn.fn.__globals__.get(name)
            if isinstance(value, jitted):
                walk(value)
            elif isinstance(value, types.ModuleType) and value not in allowed_modules:
                problems.append(f"{fn.fn.__module__}.{fn.fn.__name__} reaches {name}.* through a module")

    kernels = [v for module in (fp4_matmul, moe, paged, rotary) for v in vars(module).values()
               if isinstance(v, jitted)]
    assert len(kernels) >= 8
    for kernel in kernels:
        walk(kernel)
    assert not problems, problems
