"""huawei-cloud implementations: every op is forwarded to the server named by the environment.

Activation connects and checks the server's health, so a server that is down makes the backend
unavailable with the reason. One forwarding implementation per op is built from the contract's
signature: arguments go to the host and over the wire, results come back to the caller's device,
and the new values of an in-place op's mutated arguments are copied into the caller's tensors,
so the caller sees exactly the effect of a local call. A failed call raises
:class:`~apt_hal.backends.huawei_cloud.client.RemoteError` naming the endpoint, never a partial
result: the caller's tensors are written only once the whole reply has arrived.
"""

from __future__ import annotations

import inspect
import urllib.parse

import torch

import apt_hal.backends.huawei_cloud as backend
from apt_hal import ops, registry
from apt_hal.backends.huawei_cloud.client import Client, RemoteError
from apt_hal.backends.huawei_cloud.serve import is_loopback

# Weights and caches a model passes unchanged call after call: they travel once and stay resident.
RESIDENT_ARGS = frozenset({"w_packed", "w_scales", "w_up", "w_down", "w_up_scales", "w_down_scales",
                           "cos_sin_cache"})

CLIENT = Client.from_env()
_health = CLIENT.health()
_host = urllib.parse.urlsplit(CLIENT.endpoint).hostname or ""
backend.connected_server = (f"{'loopback' if is_loopback(_host) else 'remote'} server, "
                            f"{_health.get('backend')} executor")


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


def forwarder(op):
    """The implementation of ``op`` that runs it on the server."""
    signature = inspect.signature(op.reference, eval_str=True)  # types, not strings: the schema check reads them
    names = list(signature.parameters)
    resident = frozenset(i for i, n in enumerate(names) if n in RESIDENT_ARGS)

    def remote(*args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and not a.is_cpu), torch.device("cpu"))
        result, new_values = CLIENT.call(op.name, args, resident)
        if set(new_values) != set(op.mutates_args):
            raise RemoteError(f"huawei-cloud server {CLIENT.endpoint}: {op.name} returned new values for "
                              f"{sorted(new_values)}, expected {sorted(op.mutates_args)}")
        for name, value in new_values.items():
            target = args[names.index(name)]
            if value.shape != target.shape or value.dtype != target.dtype:
                raise RemoteError(f"huawei-cloud server {CLIENT.endpoint}: {op.name} returned {name} as "
                                  f"{list(value.shape)} {value.dtype}, expected {list(target.shape)} {target.dtype}")
        for name, value in new_values.items():  # only after every check: never a partial update
            args[names.index(name)].copy_(value)
        return _to_device(result, device)

    remote.__signature__ = signature
    remote.__doc__ = f"{op.name} on the huawei-cloud server."
    return remote


for _op in ops.ALL_OPS:
    registry.register_impl(_op, "huawei-cloud", forwarder(_op), name="remote")
registry.probe("huawei-cloud", refresh=True)  # the probe's detail now names the server
