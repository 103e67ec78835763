"""apt_hal: write a transformer once against four op contracts, run it on any backend.

    import apt_hal
    apt_hal.use("auto")                 # or "cuda-triton", "npu", ...; also a `with` block
    y = apt_hal.ops.fp4_matmul(x, w_packed, w_scales)
    print(apt_hal.explain())            # which implementation serves each op, and why

See README.md for the guide and each module of apt_hal.contracts for an op's spec.
"""

from apt_hal import graphs, mxfp4, nn, ops, rope
from apt_hal.contract import set_checks
from apt_hal.device import (
    device_count,
    device_type,
    empty_cache,
    get_device,
    max_memory_allocated,
    memory_allocated,
    synchronize,
)
from apt_hal.errors import (
    AptHalError,
    BackendCallError,
    BackendError,
    BackendUnavailableError,
    ContractError,
    CorruptBlockError,
    OpNotImplementedError,
    PagedStoreFullError,
    PluginError,
    UnknownBackendError,
)
from apt_hal.explanation import explain

# apt_hal.backends is the package of built-in backends; the registry's listing is registry.backends().
from apt_hal.registry import Backend, Probe, impl, register_impl, use

__version__ = "0.1.0"

__all__ = [
    "AptHalError", "Backend", "BackendCallError", "BackendError", "BackendUnavailableError", "ContractError",
    "CorruptBlockError",
    "OpNotImplementedError", "PagedStoreFullError", "PluginError", "Probe", "UnknownBackendError", "device_count",
    "device_type", "empty_cache", "explain", "get_device", "impl", "max_memory_allocated",
    "graphs", "memory_allocated", "mxfp4", "nn", "ops", "register_impl", "rope", "set_checks", "synchronize", "use",
]
