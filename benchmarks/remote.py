"""Benchmark the huawei-cloud backend on loopback against the local call and a raw TCP copy, in one run.

    python -m benchmarks.remote                      # HTTP (the shipped transport) and gRPC side by side
    python -m benchmarks.remote --transports http    # HTTP only (gRPC needs 'pip install grpcio')

Each transport's server runs in its own process (``apt-hal serve --backend cpu`` for HTTP; the same
request handler behind a generic gRPC bytes service for gRPC) and executes the ops with the cpu
backend. Measured:

* per-call overhead of ``fp4_matmul`` with ``x`` [1, 4096] float32 and resident MXFP4 weights
  [4096, 4096]: the client's wall time minus the server's time in the op (Server-Timing / trailing
  metadata), p50 and p99; the local call's time beside it;
* the same overhead for a tiny ``rotary`` call, where the op itself costs almost nothing;
* large tensors: ``rotary`` on q and k of 64 MiB together (64 MiB up, 64 MiB back): bytes moved per
  second of transport time (wall minus op), against a raw loopback TCP echo of the same bytes
  measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import apt_hal
from apt_hal import mxfp4, ops, rope
from apt_hal.backends.huawei_cloud import wire

MIB = 1 << 20


# ---- inputs -------------------------------------------------------------------------------------


def fp4_inputs():
    g = torch.Generator().manual_seed(0)
    w_packed, w_scales = mxfp4.quantize(torch.randn(4096, 4096, generator=g))
    return torch.randn(1, 4096, generator=g), w_packed, w_scales


def rotary_inputs(tokens: int, heads: int = 32, head_dim: int = 64):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, tokens, heads, head_dim, generator=g)
    k = torch.randn(1, tokens, heads, head_dim, generator=g)
    positions = torch.arange(tokens).reshape(1, tokens)
    cache = rope.cos_sin_cache(rope.RopeConfig(variant="default", rotary_dim=head_dim, max_position=tokens))
    return q, k, positions, cache


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- transports ---------------------------------------------------------------------------------


class HttpTransport:
    """The shipped client against ``apt-hal serve``."""

    name = "HTTP (Starlette/uvicorn + httpx)"

    def __init__(self, token_file: pathlib.Path):
        from apt_hal.backends.huawei_cloud.client import Client

        self.proc, port = start(["apt-hal", "serve", "--backend", "cpu", "--port", "0",
                                 "--token-file", str(token_file)])
        self.client = Client(f"http://127.0.0.1:{port}", token_file.read_text().strip())

    def call(self, op, args: tuple, resident: frozenset[int]) -> tuple[object, float]:
        result, _ = self.client.call(op.name, args, resident)
        return result, self.client.last_server_ms()

    def close(self):
        self.client.close()
        stop(self.proc)


class GrpcTransport:
    """The same frames and the same request handler behind a generic gRPC bytes service."""

    name = "gRPC (grpcio, generic bytes service)"

    def __init__(self, token_file: pathlib.Path):
        import grpc

        self.proc, port = start([sys.executable, "-m", "benchmarks.remote", "--grpc-serve", str(token_file)])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
        self.rpc = {m: self.channel.unary_unary(f"/apt_hal.Remote/{m}") for m in ("Call", "Upload")}
        self.metadata = (("authorization", f"Bearer {token_file.read_text().strip()}"),)
        self.uploaded: set[str] = set()
        self.keys: dict[int, str] = {}  # id -> content key: the benchmark's weights live for the whole run

    def call(self, op, args: tuple, resident: frozenset[int]) -> tuple[object, float]:
        tensors, packed = {}, []
        for i, a in enumerate(args):
            if i in resident:
                if id(a) not in self.keys:
                    self.keys[id(a)] = wire.content_key(a)
                key = self.keys[id(a)]
                if key not in self.uploaded:
                    self.rpc["Upload"](wire.encode({"key": key}, {"w": a}), metadata=self.metadata)
                    self.uploaded.add(key)
                packed.append({"resident": key})
            else:
                packed.append(wire.pack_value(a, tensors, "a"))
        reply, call = self.rpc["Call"].with_call(wire.encode({"op": op.name, "args": packed}, tensors),
                                                  metadata=self.metadata)
        message, out = wire.decode(bytearray(reply), wire.Limits(max_bytes=1 << 40, max_elements=1 << 40))
        return wire.unpack_value(message["result"], out), float(dict(call.trailing_metadata())["op-ms"])

    def close(self):
        self.channel.close()
        stop(self.proc)


GRPC_OPTIONS = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]


def grpc_serve(token_file: str) -> None:
    """The gRPC server process of the comparison (``--grpc-serve``)."""
    import concurrent.futures

    import grpc

    from apt_hal.backends.huawei_cloud.server import Refusal, Server, Settings

    core = Server(Settings(backend="cpu", token=pathlib.Path(token_file).read_text().strip()))

    def method(work):
        def handle(request: bytes, context):
            given = dict(context.invocation_metadata()).get("authorization", "")
            if not core.token_matches(given):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong credential")
            try:
                body, _, seconds = core.perform(work, bytearray(request))
            except Refusal as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.status} {e}")
            context.set_trailing_metadata((("op-ms", f"{1000 * seconds:.3f}"),))
            return body

        return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "apt_hal.Remote", {"Call": method(core.execute), "Upload": method(core.upload)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"grpc server listening on http://127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def start(command: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"{' '.join(command)} did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


# ---- the raw TCP ceiling ------------------------------------------------------------------------


def tcp_echo_seconds(nbytes: int, repeats: int) -> list[float]:
    """Times to send ``nbytes`` over loopback TCP and receive them back (the echo thread is the peer)."""
    listener = socket.create_server(("127.0.0.1", 0))
    payload = bytearray(os.urandom(1 << 16) * (nbytes >> 16))
    received = bytearray(len(payload))

    def recv_exactly(sock, buf):
        view, got = memoryview(buf), 0
        while got < len(buf):
            got += sock.recv_into(view[got:])

    def echo():
        conn, _ = listener.accept()
        buf = bytearray(len(payload))
        for _ in range(repeats):
            recv_exactly(conn, buf)
            conn.sendall(buf)
        conn.close()

    peer = threading.Thread(target=echo)
    peer.start()
    sock = socket.create_connection(listener.getsockname())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        recv_exactly(sock, received)
        sender.join()
        times.append(time.perf_counter() - t0)
    sock.close()
    peer.join()
    listener.close()
    assert received == payload
    return times


# ---- measurements -------------------------------------------------------------------------------


def overhead(transport, op, args, resident, calls: int, expected) -> dict:
    result, _ = transport.call(op, args, resident)  # uploads the resident weights, warms the connection
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    walls, extra = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        _, server_ms = transport.call(op, args, resident)
        wall = 1000 * (time.perf_counter() - t0)
        walls.append(wall)
        extra.append(wall - server_ms)
    return {"p50": percentile(walls, 0.5), "p99": percentile(walls, 0.99),
            "over_p50": percentile(extra, 0.5), "over_p99": percentile(extra, 0.99)}


def local_ms(op, args, calls: int) -> dict:
    walls = []
    with apt_hal.use("cpu"):
        op(*args)
        for _ in range(calls):
            t0 = time.perf_counter()
            op(*args)
            walls.append(1000 * (time.perf_counter() - t0))
    return {"p50": percentile(walls, 0.5), "p99": percentile(walls, 0.99)}


def throughput(transport, args, repeats: int, expected) -> dict:
    moved = sum(t.numel() * t.element_size() for t in args[:2]) * 2  # q and k up, q_out and k_out back
    result, _ = transport.call(ops.rotary, args, frozenset({3}))
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    transport_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, server_ms = transport.call(ops.rotary, args, frozenset({3}))
        transport_s.append(time.perf_counter() - t0 - server_ms / 1000)
    return {"mib_s": moved / MIB / statistics.median(transport_s), "moved_mib": moved / MIB}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", nargs="+", choices=("http", "grpc"), default=["http", "grpc"])
    ap.add_argument("--calls", type=int, default=50, help="timed fp4_matmul calls per transport (default: 50)")
    ap.add_argument("--repeats", type=int, default=5, help="timed 64 MiB rotary calls (default: 5)")
    ap.add_argument("--grpc-serve", metavar="TOKEN_FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.grpc_serve:
        grpc_serve(args.grpc_serve)
        return 0
    torch.set_num_threads(1)  # the server process gets the other core of a 2-core machine
    fp4 = fp4_inputs()
    tiny = rotary_inputs(4, heads=2)
    big = rotary_inputs(4096)
    expected_fp4, expected_tiny, expected_big = (ops.fp4_matmul.reference(*fp4), ops.rotary.reference(*tiny),
                                                 ops.rotary.reference(*big))
    local_fp4, local_tiny = local_ms(ops.fp4_matmul, fp4, args.calls), local_ms(ops.rotary, tiny, 10 * args.calls)
    tcp = tcp_echo_seconds(64 * MIB, args.repeats)
    tcp_mib_s = 128 / statistics.median(tcp)
    print(f"local fp4_matmul [1,4096]x[4096,4096]^T: p50 {local_fp4['p50']:.2f} ms, p99 {local_fp4['p99']:.2f} ms; "
          f"local tiny rotary: p50 {local_tiny['p50']:.3f} ms")
    print(f"raw loopback TCP echo of 64 MiB (128 MiB moved): {tcp_mib_s:.0f} MiB/s (median of {args.repeats})\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        token_file = pathlib.Path(tmp, "token")
        token_file.write_text(secrets.token_hex(32))
        for name in args.transports:
            transport = (HttpTransport if name == "http" else GrpcTransport)(token_file)
            try:
                f = overhead(transport, ops.fp4_matmul, fp4, frozenset({1, 2}), args.calls, expected_fp4)
                t = overhead(transport, ops.rotary, tiny, frozenset({3}), 10 * args.calls, expected_tiny)
                b = throughput(transport, big, args.repeats, expected_big)
            finally:
                transport.close()
            rows.append(f"| {transport.name} | {f['p50']:.2f} / {f['p99']:.2f} | {f['over_p50']:.2f} / "
                        f"{f['over_p99']:.2f} | {t['over_p50']:.2f} / {t['over_p99']:.2f} | {b['mib_s']:.0f} "
                        f"({100 * b['mib_s'] / tcp_mib_s:.0f}% of TCP) |")
    print("| transport | fp4_matmul remote p50 / p99 (ms) | its overhead p50 / p99 (ms) | tiny rotary overhead "
          "p50 / p99 (ms) | 64 MiB rotary transport MiB/s |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"| local call | {local_fp4['p50']:.2f} / {local_fp4['p99']:.2f} | - | - | raw TCP echo {tcp_mib_s:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
