"""The huawei-cloud client: calls an ``apt-hal serve`` server over HTTP (httpx, pooled connections).

Every call is idempotent on the server (it keeps no state but immutable resident weights, and an
in-place op returns the new values instead of mutating anything the next call sees), so a call
whose connection failed is retried with backoff under a fresh request id; a call that timed out is
not (it may still be running). A server that says "busy" (429) is retried too.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from typing import Any, Iterable, Optional

import httpx
import torch

from apt_hal.backends.huawei_cloud import ENDPOINT_VAR, KEY_VAR, wire
from apt_hal.backends.huawei_cloud.wire import FRAME_TYPE, REQUEST_ID, REQUEST_TIME
from apt_hal.errors import AptHalError, ContractError

CA_VAR = "APT_HAL_HUAWEI_CLOUD_CA"  # CA bundle that signed the server's certificate
CERT_VAR = "APT_HAL_HUAWEI_CLOUD_CLIENT_CERT"  # client certificate and key (PEM, one file) for mTLS

# The errors an op raises for a bad argument, by the name the server reports.
_ARGUMENT_ERRORS = {"ContractError": ContractError, "TypeError": TypeError, "ValueError": ValueError}
_RETRIED_STATUSES = (429, 503)


class RemoteError(AptHalError, ConnectionError):
    """The huawei-cloud server could not be reached or could not run the call."""


class Client:
    def __init__(self, endpoint: str, key: str, *, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.05, verify: Any = True, cert: Optional[str] = None):
        self.endpoint = endpoint.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self._http = httpx.Client(
            base_url=self.endpoint, headers={"authorization": f"Bearer {key}"}, verify=verify, cert=cert,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self._lock = threading.Lock()
        self._keys: dict[int, tuple[weakref.ref, int, str]] = {}  # id(tensor) -> (tensor, _version, key)
        self._uploaded: set[str] = set()

    @classmethod
    def from_env(cls) -> "Client":
        endpoint, key = os.environ.get(ENDPOINT_VAR), os.environ.get(KEY_VAR)
        if not endpoint or not key:
            raise RemoteError(f"set {ENDPOINT_VAR} and {KEY_VAR}")
        return cls(endpoint, key, verify=os.environ.get(CA_VAR) or True, cert=os.environ.get(CERT_VAR) or None)

    def close(self) -> None:
        self._http.close()

    # ---- requests ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Optional[bytes] = None) -> httpx.Response:
        """The server's reply (read in full), after retrying what is safe to retry."""
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request_id = uuid.uuid4().hex
            headers = {REQUEST_ID: request_id, REQUEST_TIME: f"{time.time():.3f}"}
            try:
                reply = self._http.request(method, path, content=body, headers=headers)
            except httpx.TimeoutException as e:
                raise RemoteError(f"huawei-cloud server {self.endpoint}: {path} timed out ({type(e).__name__})") from e
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            if reply.status_code in _RETRIED_STATUSES:
                failure = f"HTTP {reply.status_code}: {_reason(reply)}"
                continue
            if reply.headers.get(REQUEST_ID) != request_id:
                raise RemoteError(f"huawei-cloud server {self.endpoint}: the reply to {path} answers another request")
            return reply
        raise RemoteError(f"huawei-cloud server {self.endpoint}: {path} failed after {self.retries + 1} attempts "
                          f"({failure})")

    def _json(self, method: str, path: str, body: Optional[bytes] = None) -> dict:
        reply = self._request(method, path, body)
        if reply.status_code != 200:
            raise RemoteError(f"huawei-cloud server {self.endpoint}: {path} answered HTTP {reply.status_code}: "
                              f"{_reason(reply)}")
        return reply.json()

    def health(self) -> dict:
        return self._json("GET", "/v1/health")

    def metrics(self) -> dict:
        return self._json("GET", "/v1/metrics")

    # ---- resident weights -------------------------------------------------------------------

    def key_of(self, t: torch.Tensor) -> str:
        """The content key of ``t``, hashed once per tensor and version (in-place writes bump it)."""
        with self._lock:
            known = self._keys.get(id(t))
            if known and known[0]() is t and known[1] == t._version:
                return known[2]
        key = wire.content_key(t)
        ident = id(t)
        forget = lambda _: self._keys.pop(ident, None)  # noqa: E731
        with self._lock:
            self._keys[ident] = (weakref.ref(t, forget), t._version, key)
        return key

    def upload(self, key: str, t: torch.Tensor) -> None:
        self._json("POST", "/v1/weights", wire.encode({"key": key}, {"w": t}))
        with self._lock:
            self._uploaded.add(key)

    def _ensure_uploaded(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for key, t in weights:
            if key not in self._uploaded:
                self.upload(key, t)

    # ---- calls ------------------------------------------------------------------------------

    def call(self, op: str, args: tuple, resident: frozenset[int] = frozenset()) -> tuple[Any, dict]:
        """Run ``op(*args)`` on the server: (result, {mutated argument name: new value}), on the host.
        Arguments at the ``resident`` positions travel once, as resident weights."""
        tensors: dict[str, torch.Tensor] = {}
        weights, packed = [], []
        for i, a in enumerate(args):
            if i in resident and isinstance(a, torch.Tensor):
                key = self.key_of(a)
                weights.append((key, a))
                packed.append({"resident": key})
            else:
                packed.append(wire.pack_value(a, tensors, "a"))
        body = wire.encode({"op": op, "args": packed}, tensors)
        self._ensure_uploaded(weights)
        reply = self._request("POST", "/v1/call", body)
        if reply.status_code == 410 and weights:  # evicted, or the server restarted: upload again, once
            with self._lock:
                self._uploaded.difference_update(k for k, _ in weights)
            self._ensure_uploaded(weights)
            reply = self._request("POST", "/v1/call", body)
        if reply.status_code != 200:
            kind = _error_kind(reply)
            if reply.status_code == 422 and kind in _ARGUMENT_ERRORS:
                raise _ARGUMENT_ERRORS[kind](_reason(reply))
            raise RemoteError(f"huawei-cloud server {self.endpoint}: {op} answered HTTP {reply.status_code}: "
                              f"{_reason(reply)}")
        if reply.headers.get("content-type") != FRAME_TYPE:
            raise RemoteError(f"huawei-cloud server {self.endpoint}: {op} replied with {reply.headers.get('content-type')}")
        message, out = wire.decode(bytearray(reply.content), wire.Limits(max_bytes=1 << 62, max_elements=1 << 62,
                                                                         max_dims=64, max_tensors=1 << 16))
        mutated = message.get("mutated", {})
        return wire.unpack_value(message["result"], out), {n: wire.unpack_value(v, out) for n, v in mutated.items()}


def _error_kind(reply: httpx.Response) -> str:
    try:
        return str(reply.json().get("error"))
    except ValueError:
        return ""


def _reason(reply: httpx.Response) -> str:
    try:
        return str(reply.json().get("message"))
    except ValueError:
        return reply.text[:200]
