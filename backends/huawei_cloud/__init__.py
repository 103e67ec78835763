"""huawei-cloud: a remote executor (RPC) in front of Ascend servers; host tensors in and out."""

import os

from apt_hal.registry import Backend, Probe

ENDPOINT_VAR = "APT_HAL_HUAWEI_CLOUD_ENDPOINT"
KEY_VAR = "APT_HAL_HUAWEI_CLOUD_KEY"


def probe() -> Probe:
    endpoint = os.environ.get(ENDPOINT_VAR)
    if not endpoint:
        return Probe(False, f"{ENDPOINT_VAR} is not set")
    if not os.environ.get(KEY_VAR):
        return Probe(False, f"{KEY_VAR} is not set (endpoint {endpoint})")
    return Probe(True, f"endpoint {endpoint}")


BACKEND = Backend(
    name="huawei-cloud",
    device_type="cpu",
    probe=probe,
    implementations="apt_hal.backends.huawei_cloud.impls",
    install_hint=f"set {ENDPOINT_VAR} and {KEY_VAR} to an apt_hal server's address and key",
    remote=True,
    description="remote Ascend executor over RPC",
)
