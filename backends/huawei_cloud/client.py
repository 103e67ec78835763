"""The huawei-cloud client: calls an ``apt-hal serve`` server over HTTP (httpx, pooled connections).

Every call is idempotent on the server (it keeps no state but immutable resident weights, and an
in-place op returns the new values instead of mutating anything the next call sees), so a call
whose connection failed is retried with backoff under a fresh request id; a call that timed out is
not (it may still be running). A server that says "busy" (429) is retried too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import threading
import time
import uuid
import weakref
from typing import Any, Iterable, Optional, Sequence

import httpx
import torch

from apt_hal.backends.huawei_cloud import ENDPOINT_VAR, KEY_VAR, wire
from apt_hal.backends.huawei_cloud.wire import FRAME_TYPE, REQUEST_ID, REQUEST_TIME
from apt_hal.errors import BackendCallError, ContractError

CA_VAR = "APT_HAL_HUAWEI_CLOUD_CA"  # CA bundle that signed the server's certificate
CERT_VAR = "APT_HAL_HUAWEI_CLOUD_CLIENT_CERT"  # client certificate and key (PEM, one file) for mTLS

# The errors an op raises for a bad argument, by the name the server reports.
_ARGUMENT_ERRORS = {"ContractError": ContractError, "TypeError": TypeError, "ValueError": ValueError}
_RETRIED_STATUSES = (429, 503)
NO_DELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
CHUNK = 1 << 20  # request bodies go out in pieces of this size: httpcore re-slices what it sends
# Replies come from the server this client authenticated to: only the format is checked.
_TRUSTED = wire.Limits(max_bytes=1 << 62, max_elements=1 << 62, max_dims=64, max_tensors=1 << 16)


class RemoteError(BackendCallError, ConnectionError):
    """The huawei-cloud server could not be reached or could not run the call."""


class Client:
    def __init__(self, endpoint: str, key: str, *, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.05, ca: Optional[str] = None, cert: Optional[str] = None):
        """``ca``: the CA file that signed the server's certificate (default: the system's);
        ``cert``: a PEM file with this client's certificate and key, for a server that requires one."""
        self.endpoint = endpoint.rstrip("/")
        self.retries, self.backoff = retries, backoff
        # No Nagle: a request's headers and body are separate writes, and waiting for the peer's
        # delayed ACK between them costs 40 ms a call.
        tls = ssl.create_default_context(cafile=ca)
        if cert:
            tls.load_cert_chain(cert)
        transport = httpx.HTTPTransport(verify=tls, socket_options=[NO_DELAY],
                                        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self._http = httpx.Client(base_url=self.endpoint, headers={"authorization": f"Bearer {key}"},
                                  timeout=httpx.Timeout(timeout, connect=5.0), transport=transport)
        self._lock = threading.Lock()
        self._keys: dict[int, tuple[weakref.ref, int, str]] = {}  # id(tensor) -> (tensor, _version, key)
        self._uploaded: set[str] = set()
        self._last = threading.local()

    @classmethod
    def from_env(cls) -> "Client":
        endpoint, key = os.environ.get(ENDPOINT_VAR), os.environ.get(KEY_VAR)
        if not endpoint or not key:
            raise RemoteError(f"set {ENDPOINT_VAR} and {KEY_VAR}")
        return cls(endpoint, key, ca=os.environ.get(CA_VAR) or None, cert=os.environ.get(CERT_VAR) or None)

    def close(self) -> None:
        self._http.close()

    # ---- requests ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Sequence[memoryview] = ()) -> Reply:
        """The server's reply, read in full, after retrying what is safe to retry. ``body`` is sent
        as given (pieces of a frame), never joined into one copy."""
        failure = ""
        size = sum(len(piece) for piece in body)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request_id = uuid.uuid4().hex
            headers = {REQUEST_ID: request_id, REQUEST_TIME: f"{time.time():.3f}"}
            if method == "POST":
                headers["content-length"] = str(size)
            try:
                reply = self._send(method, path, body, headers)
            except httpx.TimeoutException as e:
                raise RemoteError(f"huawei-cloud server {self.endpoint}: {path} timed out ({type(e).__name__})") from e
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            if reply.status in _RETRIED_STATUSES:
                failure = f"HTTP {reply.status}: {reply.reason()}"
                continue
            if reply.headers.get(REQUEST_ID) != request_id:
                raise RemoteError(f"huawei-cloud server {self.endpoint}: the reply to {path} answers another request")
            self._last.server_ms = _server_ms(reply.headers)
            return reply
        raise RemoteError(f"huawei-cloud server {self.endpoint}: {path} failed after {self.retries + 1} attempts "
                          f"({failure})")

    def _send(self, method: str, path: str, body: Sequence[memoryview], headers: dict) -> Reply:
        chunks = [piece[i:i + CHUNK] for piece in body for i in range(0, len(piece), CHUNK)]
        request = self._http.build_request(method, path, content=chunks if method == "POST" else None,
                                           headers=headers)
        reply = self._http.send(request, stream=True)
        try:
            declared = reply.headers.get("content-length")
            data = bytearray(int(declared)) if declared and declared.isdigit() else bytearray()
            filled = 0
            for chunk in reply.iter_raw():  # straight into one writable buffer: tensors view it
                if declared:
                    data[filled:filled + len(chunk)] = chunk
                else:
                    data += chunk
                filled += len(chunk)
            if declared and filled != len(data):
                raise httpx.RemoteProtocolError(f"the reply ended after {filled} of {declared} bytes")
        finally:
            reply.close()
        return Reply(reply.status_code, reply.headers, data)

    def _json(self, method: str, path: str, body: Sequence[memoryview] = ()) -> dict:
        reply = self._request(method, path, body)
        if reply.status != 200:
            raise RemoteError(f"huawei-cloud server {self.endpoint}: {path} answered HTTP {reply.status}: "
                              f"{reply.reason()}")
        return json.loads(reply.body)

    def last_server_ms(self) -> float:
        """Milliseconds the server spent on this thread's last request itself (its Server-Timing)."""
        return getattr(self._last, "server_ms", 0.0)

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
        self._json("POST", "/v1/weights", wire.encode_parts({"key": key}, {"w": t}))
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
        body = wire.encode_parts({"op": op, "args": packed}, tensors)
        self._ensure_uploaded(weights)
        reply = self._request("POST", "/v1/call", body)
        if reply.status == 410 and weights:  # evicted, or the server restarted: upload again, once
            with self._lock:
                self._uploaded.difference_update(k for k, _ in weights)
            self._ensure_uploaded(weights)
            reply = self._request("POST", "/v1/call", body)
        if reply.status != 200:
            kind = reply.error_kind()
            if reply.status == 422 and kind in _ARGUMENT_ERRORS:
                raise _ARGUMENT_ERRORS[kind](reply.reason())
            raise RemoteError(f"huawei-cloud server {self.endpoint}: {op} answered HTTP {reply.status}: "
                              f"{reply.reason()}")
        if reply.headers.get("content-type") != FRAME_TYPE:
            raise RemoteError(f"huawei-cloud server {self.endpoint}: {op} replied with "
                              f"{reply.headers.get('content-type')}")
        message, out = wire.decode(reply.body, _TRUSTED)
        mutated = message.get("mutated", {})
        return wire.unpack_value(message["result"], out), {n: wire.unpack_value(v, out) for n, v in mutated.items()}


@dataclasses.dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytearray

    def _field(self, name: str) -> str:
        try:
            return str(json.loads(self.body).get(name))
        except (ValueError, AttributeError):
            return self.body[:200].decode(errors="replace")

    def reason(self) -> str:
        return self._field("message")

    def error_kind(self) -> str:
        return self._field("error")


def _server_ms(headers: httpx.Headers) -> float:
    timing = headers.get("server-timing", "")
    try:
        return float(timing.partition("dur=")[2])
    except ValueError:
        return 0.0
