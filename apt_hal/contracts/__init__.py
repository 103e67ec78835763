"""The op contracts: one module each, its docstring the spec, its reference the oracle."""
