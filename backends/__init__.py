"""The built-in backends. Each is one package here: ``__init__.py`` declares it as ``BACKEND``
(plain data and a cheap probe, no vendor import) and ``impls.py`` registers its implementations
when activated. Every subpackage that declares a ``BACKEND`` is a built-in backend.

To add a backend: copy ``cpu/`` as a template, write its probe, and list the package in
pyproject.toml's ``packages`` (tests/test_packaging.py checks that list against these folders).
Out-of-tree backends need no change here: they declare an entry point in the group
``apt_hal.backends``.
"""

import importlib
import pkgutil


def _declared():
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            decl = getattr(importlib.import_module(f"{__name__}.{info.name}"), "BACKEND", None)
            if decl is not None:
                found.append(decl)
    # The ranks, not this order, decide what "auto" chooses; listing by rank (those "auto" never
    # picks last) keeps `apt-hal info` and the reports in that order too.
    return tuple(sorted(found, key=lambda b: (b.auto_rank is None, b.auto_rank or 0, b.name)))


BUILTIN_BACKENDS = _declared()
