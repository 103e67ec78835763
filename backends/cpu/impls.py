"""The cpu backend serves every op with its contract's reference."""

from apt_hal import ops, registry

for _op in ops.ALL_OPS:
    registry.register_impl(_op, "cpu", _op.reference, name="reference")
