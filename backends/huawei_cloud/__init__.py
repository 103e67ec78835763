"""huawei-cloud: a remote executor. Ops are forwarded to an ``apt-hal serve`` server (see
docs/huawei-cloud.md); tensors travel from the caller's device through the host and back."""

import os

from apt_hal.registry import Backend, Probe

ENDPOINT_VAR = "APT_HAL_HUAWEI_CLOUD_ENDPOINT"
KEY_VAR = "APT_HAL_HUAWEI_CLOUD_KEY"

# What the server said when the backend was activated ("loopback server, cpu executor"); the
# probe, which never touches the network, reports it from then on.
connected_server = ""


def probe() -> Probe:
    endpoint = os.environ.get(ENDPOINT_VAR)
    if not endpoint:
        return Probe(False, f"{ENDPOINT_VAR} is not set")
    if not os.environ.get(KEY_VAR):
        return Probe(False, f"{KEY_VAR} is not set (endpoint {endpoint})")
    return Probe(True, f"endpoint {endpoint}" + (f": {connected_server}" if connected_server else ""))


BACKEND = Backend(
    name="huawei-cloud",
    device_type="cpu",
    probe=probe,
    implementations="apt_hal.backends.huawei_cloud.impls",
    packages=("httpx",),
    install_hint=f"pip install 'apt-hal[remote]', start 'apt-hal serve' on the executor machine, and set "
                 f"{ENDPOINT_VAR} and {KEY_VAR} to its address and token",
    remote=True,
    description="remote executor over HTTP ('apt-hal serve' on an Ascend or any other machine)",
    # The server runs every op (its own backend's implementation or the reference), so the client
    # holds itself to the whole suite.
    claims={"*": {"dtypes": ["*"], "features": ["*"]}},
)
