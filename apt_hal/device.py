"""One device API for every backend, built on ``torch.accelerator`` where torch has it.

Models and tools call these instead of ``torch.cuda.*`` / ``torch.npu.*``; the device type comes
from the active backend (or, under ``"auto"``, the available backend of best ``auto_rank``: with
the built-in backends, CUDA > HPU > NPU > XPU > CPU).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from apt_hal import registry

DeviceLike = Union[str, torch.device, None]


def device_type() -> str:
    """The torch device type the current policy computes on."""
    pol = registry.current_policy()
    if pol.backend != "auto":
        return registry.device_type_of(pol.backend)
    best = registry.auto_backends()
    return registry.device_type_of(best[0]) if best else "cpu"


def _module(dev_type: str):
    return None if dev_type == "cpu" else torch.get_device_module(dev_type)


def _resolve(device: DeviceLike) -> torch.device:
    if device is None:
        return get_device()
    return torch.device(device)


def get_device(index: Optional[int] = None) -> torch.device:
    """The device tensors should live on: e.g. ``cuda:0``, ``npu:0`` or ``cpu``."""
    dev = device_type()
    if dev == "cpu":
        return torch.device("cpu")
    if index is None:
        index = _module(dev).current_device()
    return torch.device(dev, index)


def device_count(dev_type: Optional[str] = None) -> int:
    """How many devices of the active type (1 for CPU)."""
    dev = dev_type or device_type()
    if dev == "cpu":
        return 1
    return _module(dev).device_count()


def synchronize(device: DeviceLike = None) -> None:
    """Wait for all work queued on ``device`` (a no-op on CPU)."""
    d = _resolve(device)
    if d.type == "cpu":
        return
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "synchronize") and _is_current_accelerator(d.type):
        accel.synchronize(d)
    else:
        _module(d.type).synchronize(d)


def _memory_function(dev_type: str, name: str):
    """``torch.accelerator.<name>`` for the current accelerator where torch has it, else the
    device module's own (``torch.cuda.<name>``, ``torch.npu.<name>``, ...)."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, name) and _is_current_accelerator(dev_type):
        return getattr(accel, name)
    return getattr(_module(dev_type), name)


def memory_allocated(device: DeviceLike = None) -> int:
    """Bytes held by live tensors on ``device``. CPU tensors are not tracked by torch: returns 0."""
    d = _resolve(device)
    return 0 if d.type == "cpu" else _memory_function(d.type, "memory_allocated")(d)


def max_memory_allocated(device: DeviceLike = None) -> int:
    """Peak of :func:`memory_allocated` since start or the last reset (0 on CPU)."""
    d = _resolve(device)
    return 0 if d.type == "cpu" else _memory_function(d.type, "max_memory_allocated")(d)


def empty_cache() -> None:
    """Return cached, unused device memory to the driver (a no-op on CPU)."""
    dev = device_type()
    if dev != "cpu":
        _memory_function(dev, "empty_cache")()


def supports_bf16(device: DeviceLike = None) -> bool:
    """Whether bf16 autocast is worth using on ``device`` (CPU: yes, emulated but supported)."""
    d = _resolve(device)
    if d.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def manual_seed(seed: int) -> None:
    """Seed torch's generators on the CPU and every device of the active type."""
    torch.manual_seed(seed)


def get_rng_state(dev_type: Optional[str] = None) -> list:
    """The random-generator states of every device of ``dev_type`` (default: the active type);
    empty for the CPU, whose state is ``torch.get_rng_state()``."""
    dev = dev_type or device_type()
    return [] if dev == "cpu" else list(_module(dev).get_rng_state_all())


def set_rng_state(states: list, dev_type: Optional[str] = None) -> None:
    """Restore what :func:`get_rng_state` returned."""
    dev = dev_type or device_type()
    if dev != "cpu" and states:
        _module(dev).set_rng_state_all(states)


def _is_current_accelerator(dev_type: str) -> bool:
    try:
        cur = torch.accelerator.current_accelerator()
    except Exception:
        return False
    return cur is not None and cur.type == dev_type
