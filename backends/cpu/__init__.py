"""cpu: the contracts' references (or faster code that matches them) on torch's CPU tensors."""

import torch

from apt_hal.registry import Backend, Probe


def probe() -> Probe:
    return Probe(True, f"torch {torch.__version__}, {torch.get_num_threads()} threads")


BACKEND = Backend(
    name="cpu",
    device_type="cpu",
    probe=probe,
    implementations="apt_hal.backends.cpu.impls",
    auto_rank=50,
    description="CPU reference implementations",
    claims={"*": {"dtypes": ["*"], "features": ["*"]}},  # the references: every op, dtype and feature
)
