"""Check that an implementation, or the torch op it names as ``traceable``, has its contract's schema.

The contract's schema is the torch schema inferred from its reference's annotations (``Op.schema``).
An implementation's schema is inferred the same way from its own signature: parameter names,
kinds, defaults and, where annotated, types. An unannotated parameter (or return) takes the
contract's type, so it is compared by name and default only. A parameter without a default takes
the contract's: the op always passes every argument, so an implementation need not repeat the
defaults, but one it does declare must be the contract's. A traceable op's schema is the one
torch registered for it (``torch.ops.<namespace>.<name>.default._schema``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

_NO_DEFAULT = object()


def _arguments(schema: torch._C.FunctionSchema) -> list[tuple]:
    return [(a.name, str(a.type), a.default_value if a.has_default_value() else _NO_DEFAULT, a.kwarg_only,
             bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]


def _returns(schema: torch._C.FunctionSchema) -> list[str]:
    return [str(r.type) for r in schema.returns]


def _describe(arg: Optional[tuple]) -> str:
    if arg is None:
        return "nothing"
    name, typ, default, kwarg_only, written = arg
    text = f"{'*, ' if kwarg_only else ''}{typ}{'(mutated)' if written else ''} {name}"
    return text if default is _NO_DEFAULT else f"{text}={default!r}"


def parse(schema: str) -> torch._C.FunctionSchema:
    """A schema as :func:`torch.library.infer_schema` writes it, ``"(Tensor x) -> Tensor"``."""
    return torch._C.parse_schema("apt_hal_schema_check::op" + schema)


def difference(expected: torch._C.FunctionSchema, got: torch._C.FunctionSchema) -> Optional[str]:
    """The first difference between two schemas (names, types, defaults, mutation, returns), or None."""
    want, have = _arguments(expected), _arguments(got)
    for i in range(max(len(want), len(have))):
        w = want[i] if i < len(want) else None
        h = have[i] if i < len(have) else None
        if w != h:
            return f"parameter {i + 1} is `{_describe(h)}` where the contract has `{_describe(w)}`"
    if _returns(expected) != _returns(got):
        return f"it returns ({', '.join(_returns(got))}) where the contract returns ({', '.join(_returns(expected))})"
    return None


def typed_signature(fn: Callable, reference: Callable) -> inspect.Signature:
    """``fn``'s signature with its unannotated parameters and return typed as ``reference``'s, and
    the reference's defaults where ``fn`` declares none.

    Raises TypeError when an annotation of either cannot be read.
    """
    try:
        sig = inspect.signature(fn, eval_str=True)
        ref = inspect.signature(reference, eval_str=True)
    except Exception as e:  # an annotation naming something its module does not define
        raise TypeError(f"cannot read the annotations of {fn.__qualname__}: {type(e).__name__}: {e}") from None
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=r.annotation if p.annotation is empty else p.annotation,
                        default=r.default if p.default is empty else p.default)
              for p, r in zip(sig.parameters.values(), ref.parameters.values())]
    returns = ref.return_annotation if sig.return_annotation is inspect.Signature.empty else sig.return_annotation
    return sig.replace(parameters=params, return_annotation=returns)


def implementation_schema(fn: Callable, reference: Callable, mutates_args: tuple[str, ...]) -> str:
    """``fn``'s inferred schema, its unannotated parameters and return typed as ``reference``'s.

    Raises TypeError when ``fn``'s annotations cannot be read or are not torch-schema types.
    """
    signature = typed_signature(fn, reference)

    def prototype(*args: Any, **kwargs: Any) -> None:
        """Stands for ``fn`` with the types filled in: infer_schema reads only its signature."""

    prototype.__signature__ = signature  # type: ignore[attr-defined]
    try:
        return torch.library.infer_schema(prototype, mutates_args=mutates_args)
    except ValueError as e:
        raise TypeError(f"{fn.__qualname__} has no valid torch schema: {e}") from None


def traceable_schema(qualname: str) -> Optional[torch._C.FunctionSchema]:
    """The schema of the torch op ``"namespace::name"`` (its default overload), None if undefined."""
    namespace, sep, name = qualname.partition("::")
    if not (sep and namespace and name):
        raise ValueError(f"traceable must name a torch op as 'namespace::name', got {qualname!r}")
    try:
        return getattr(getattr(torch.ops, namespace), name).default._schema
    except (AttributeError, RuntimeError):
        return None
