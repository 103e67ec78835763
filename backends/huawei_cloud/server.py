"""The huawei-cloud server: executes apt_hal ops for remote clients (``apt-hal serve``).

An ASGI application (Starlette, served by uvicorn). Routes, each requiring the bearer token:

* ``POST /v1/call``: a frame (:mod:`.wire`) naming an op and its arguments; the reply is a frame
  with the result and, for in-place ops, the new values of the mutated arguments.
* ``POST /v1/weights``: a frame with one tensor ``w`` and its content key; the server keeps it
  (least recently used first out past the memory limit) so calls can name it instead of sending it.
* ``GET /v1/health`` and ``GET /v1/metrics``: JSON.

Ops run through the public entry points (``apt_hal.ops``) under ``apt_hal.use(backend)``, in a
bounded thread pool, so arguments are checked exactly as a local call checks them. Every refusal
is JSON ``{"error": kind, "message": ...}`` with a 4xx status: 401 credential, 400 malformed,
408 body too slow, 410 resident weight gone, 411/413 size, 422 the op's own
ContractError/TypeError/ValueError, 429 busy; 504 an op past the request timeout; 500 a bug.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import inspect
import json
import threading
import time
from typing import Any, Callable, Optional

import torch
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

import apt_hal
from apt_hal import ops, registry
from apt_hal.backends.huawei_cloud import wire
from apt_hal.backends.huawei_cloud.wire import FRAME_TYPE, REQUEST_ID, REQUEST_TIME

# The ops a client may name; moe_dispatch is their composition, run on the client.
OPS = {op.name: op for op in ops.ALL_OPS}
PARAMETERS = {op.name: list(inspect.signature(op.reference).parameters) for op in ops.ALL_OPS}
# Errors an op raises for a bad argument: the client raises the same class with the same text.
ARGUMENT_ERRORS = (apt_hal.ContractError, TypeError, ValueError)


class Refusal(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str = "cpu"
    token: str = ""
    limits: wire.Limits = wire.Limits()
    resident_bytes: int = 4 << 30
    max_inflight: int = 64
    workers: int = 4
    request_timeout: float = 120.0
    replay_window: float = 300.0


class ResidentStore:
    """Weights by content key, least recently used evicted past ``limit`` bytes."""

    def __init__(self, limit: int):
        self.limit, self.used, self.evictions = limit, 0, 0
        self._weights: collections.OrderedDict[str, tuple[torch.Tensor, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, weight: torch.Tensor, nbytes: int) -> None:
        if nbytes > self.limit:
            raise Refusal(413, "too_large", f"a weight of {nbytes} bytes exceeds the resident limit {self.limit}")
        with self._lock:
            if key in self._weights:
                self._weights.move_to_end(key)
                return
            while self.used + nbytes > self.limit:
                _, (_, freed) = self._weights.popitem(last=False)
                self.used -= freed
                self.evictions += 1
            self._weights[key] = (weight, nbytes)
            self.used += nbytes

    def __getitem__(self, key: str) -> torch.Tensor:
        with self._lock:
            entry = self._weights.get(key)
            if entry is None:
                raise Refusal(410, "gone", f"resident weight {key[:16]}... is not on this server (evicted or "
                                           "restarted): upload it again")
            self._weights.move_to_end(key)
            return entry[0]

    def stats(self) -> dict:
        with self._lock:
            return {"weights": len(self._weights), "bytes": self.used, "limit": self.limit,
                    "evictions": self.evictions}


def _quantile_ms(ordered: list, q: float) -> float:
    """The q-quantile of ascending latencies in seconds, in milliseconds to 3 decimals."""
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


class Metrics:
    """Counters and recent latencies; read by ``GET /v1/metrics``."""

    def __init__(self, window: int = 10000):
        self.started = time.time()
        self.requests: collections.Counter = collections.Counter()
        self.statuses: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.bytes_in = self.bytes_out = 0
        self._latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))

    def record(self, route: str, status: int, error: Optional[str], bytes_in: int, bytes_out: int, seconds: float):
        self.requests[route] += 1
        self.statuses[str(status)] += 1
        if error:
            self.errors[error] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self._latency[route].append(seconds)

    def snapshot(self) -> dict:
        latency = {}
        for route, values in self._latency.items():
            ordered = sorted(values)
            latency[route] = {"n": len(ordered), "p50": _quantile_ms(ordered, 0.5),
                              "p90": _quantile_ms(ordered, 0.9), "p99": _quantile_ms(ordered, 0.99),
                              "max": round(1000 * ordered[-1], 3)}
        return {"uptime_s": round(time.time() - self.started, 1), "requests": dict(self.requests),
                "statuses": dict(self.statuses), "errors": dict(self.errors), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "latency_ms": latency}


class ReplayGuard:
    """Refuses a request id seen within the window, and requests stamped outside it."""

    def __init__(self, window: float):
        self.window = window
        self._seen: dict[str, float] = {}
        self._next_prune = 0.0

    def check(self, request_id: Optional[str], stamp: Optional[str]) -> None:
        now = time.time()
        if not request_id or len(request_id) > 64 or not stamp:
            raise Refusal(401, "unauthorized", f"every request needs {REQUEST_ID} (at most 64 characters) "
                                               f"and {REQUEST_TIME}")
        try:
            sent = float(stamp)
        except ValueError:
            raise Refusal(401, "unauthorized", f"{REQUEST_TIME} must be Unix seconds") from None
        if not abs(now - sent) <= self.window:
            raise Refusal(401, "stale", f"request time {stamp:.20} is more than {self.window:.0f} s from the "
                                        "server's clock")
        if now >= self._next_prune:
            self._seen = {k: t for k, t in self._seen.items() if t > now - self.window}
            self._next_prune = now + self.window / 10
        if request_id in self._seen:
            raise Refusal(401, "replayed", f"request id {request_id} was already used")
        self._seen[request_id] = now


class Server:
    def __init__(self, settings: Settings):
        if len(settings.token) < 16:
            raise ValueError("apt-hal serve: the token must have at least 16 characters")
        self.settings = settings
        self.limits = settings.limits
        self.device = torch.device(registry.device_type_of(settings.backend))
        apt_hal.use(settings.backend)  # the whole process serves one backend; worker threads inherit it
        self.store = ResidentStore(settings.resident_bytes)
        self.metrics = Metrics()
        self.replays = ReplayGuard(settings.replay_window)
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="apt-hal-op")
        self.busy = 0
        self._expected = f"Bearer {settings.token}".encode()

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/call", self._endpoint("call", self.execute), methods=["POST"]),
            Route("/v1/weights", self._endpoint("weights", self.upload), methods=["POST"]),
            Route("/v1/health", self._endpoint("health", None), methods=["GET"]),
            Route("/v1/metrics", self._endpoint("metrics", None), methods=["GET"]),
        ])

    # ---- the request pipeline ---------------------------------------------------------------

    def _endpoint(self, route: str, work: Optional[Callable[[bytearray], tuple[bytes, str]]]):
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            request_id = request.headers.get(REQUEST_ID, "")
            received, error, op_seconds = 0, None, 0.0
            try:
                self._authorize(request)
                if work is None:
                    body, media = json.dumps(self._status(route)).encode(), "application/json"
                else:
                    body, media, received, op_seconds = await self._admitted(request, work)
                status = 200
            except Refusal as e:
                status, error = e.status, e.kind
                body, media = json.dumps({"error": e.kind, "message": str(e)}).encode(), "application/json"
            self.metrics.record(route, status, error, received, len(body), time.perf_counter() - t0)
            # Server-Timing: the time spent in the work itself, so a client can tell its overhead.
            headers = {REQUEST_ID: request_id[:64], "server-timing": f"op;dur={1000 * op_seconds:.3f}"}
            return Response(body, status, media_type=media, headers=headers)

        return endpoint

    def _authorize(self, request: Request) -> None:
        given = request.headers.get("authorization")
        if given is None:
            raise Refusal(401, "unauthorized", "missing credential: send 'Authorization: Bearer <token>'")
        if not self.token_matches(given):
            raise Refusal(401, "unauthorized", "wrong credential")
        self.replays.check(request.headers.get(REQUEST_ID), request.headers.get(REQUEST_TIME))

    def token_matches(self, authorization: str) -> bool:
        return hmac.compare_digest(authorization.encode(), self._expected)  # constant time

    async def _admitted(self, request: Request, work) -> tuple[bytes, str, int, float]:
        if self.busy >= self.settings.max_inflight:
            raise Refusal(429, "busy", f"{self.busy} requests in flight (limit {self.settings.max_inflight}); retry")
        self.busy += 1
        loop = asyncio.get_running_loop()
        released_by_worker = False
        try:
            frame = await self._read_body(request)
            future = loop.run_in_executor(self.pool, self.perform, work, frame)
            future.add_done_callback(lambda _: self._release())
            released_by_worker = True
            try:
                body, media, seconds = await asyncio.wait_for(asyncio.shield(future), self.settings.request_timeout)
            except asyncio.TimeoutError:
                raise Refusal(504, "timeout", f"the op ran past the request timeout "
                                              f"({self.settings.request_timeout:.0f} s)") from None
            return body, media, len(frame), seconds
        finally:
            if not released_by_worker:
                self._release()

    def _release(self) -> None:
        self.busy -= 1

    async def _read_body(self, request: Request) -> bytearray:
        declared = request.headers.get("content-length")
        if declared is None:
            raise Refusal(411, "malformed", "send the body with a Content-Length")
        if not declared.isdigit() or len(declared) > 19:
            raise Refusal(400, "malformed", f"Content-Length {declared[:20]!r} is not a size")
        size = int(declared)
        if size > self.limits.max_bytes:
            raise Refusal(413, "too_large", f"a body of {size} bytes exceeds the limit {self.limits.max_bytes}")
        frame = bytearray(size)
        filled = 0

        async def fill():
            nonlocal filled
            async for chunk in request.stream():
                if filled + len(chunk) > size:
                    raise Refusal(400, "malformed", f"the body is longer than its Content-Length {size}")
                frame[filled:filled + len(chunk)] = chunk
                filled += len(chunk)

        try:
            await asyncio.wait_for(fill(), self.settings.request_timeout)
        except asyncio.TimeoutError:
            raise Refusal(408, "timeout", "the body did not arrive within the request timeout") from None
        except ClientDisconnect:
            raise Refusal(400, "malformed", "the client went away mid-body") from None
        if filled != size:
            raise Refusal(400, "malformed", f"the body ended after {filled} of {size} bytes")
        return frame

    def perform(self, work, frame: bytearray) -> tuple[bytes, str, float]:
        """Runs in a worker thread: ``work`` and its duration, every failure turned into a Refusal."""
        t0 = time.perf_counter()
        try:
            body, media = work(frame)
            return body, media, time.perf_counter() - t0
        except Refusal:
            raise
        except wire.FrameError as e:
            raise Refusal(e.status, "malformed" if e.status == 400 else "too_large", str(e)) from None
        except RecursionError:
            raise Refusal(400, "malformed", "the message nests too deeply") from None
        except ARGUMENT_ERRORS as e:
            kind = next(c.__name__ for c in ARGUMENT_ERRORS if isinstance(e, c))
            raise Refusal(422, kind, str(e)) from None
        except Exception as e:  # the op or the server failed; the client gets the reason, the server lives on
            raise Refusal(500, "executor_error", f"{type(e).__name__}: {e}") from None

    # ---- the work -----------------------------------------------------------------------------

    def execute(self, frame: bytearray) -> tuple[bytes, str]:
        message, tensors = wire.decode(frame, self.limits)
        op = OPS.get(message.get("op")) if isinstance(message.get("op"), str) else None
        if op is None:
            raise Refusal(400, "malformed", f"unknown op {str(message.get('op'))[:40]!r}; known: {', '.join(OPS)}")
        packed = message.get("args")
        names = PARAMETERS[op.name]
        if not isinstance(packed, list) or len(packed) > len(names):
            raise Refusal(400, "malformed", f"'args' must be a list of at most {len(names)} values for {op.name}")
        args = [self._on_device(wire.unpack_value(a, tensors, self.store)) for a in packed]
        result = op(*args)
        out: dict[str, torch.Tensor] = {}
        reply = {"id": message.get("id"), "result": wire.pack_value(result, out, "r"),
                 "mutated": {name: wire.pack_value(args[names.index(name)], out, "m") for name in op.mutates_args}}
        return wire.encode(reply, out), FRAME_TYPE

    def upload(self, frame: bytearray) -> tuple[bytes, str]:
        message, tensors = wire.decode(frame, self.limits)
        key = message.get("key")
        if set(tensors) != {"w"} or not isinstance(key, str):
            raise Refusal(400, "malformed", "an upload is one tensor 'w' and its content 'key'")
        if wire.content_key(tensors["w"]) != key:
            raise Refusal(400, "malformed", "the weight's content does not match its key")
        self.store.put(key, self._on_device(tensors["w"]), len(frame))
        return json.dumps({"key": key, "bytes": len(frame)}).encode(), "application/json"

    def _on_device(self, value: Any) -> Any:
        return value.to(self.device) if isinstance(value, torch.Tensor) and value.device != self.device else value

    def _status(self, route: str) -> dict:
        if route == "health":
            return {"status": "ok", "backend": self.settings.backend, "device": str(self.device),
                    "apt_hal": apt_hal.__version__, "limits": dataclasses.asdict(self.limits)}
        return {**self.metrics.snapshot(), "inflight": self.busy, "resident": self.store.stats()}
