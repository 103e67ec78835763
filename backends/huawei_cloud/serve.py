"""``apt-hal serve``: run the huawei-cloud server (:mod:`.server`) on this machine's backend."""

from __future__ import annotations

import argparse
import ipaddress
import pathlib
import socket
import sys

HELP = "serve apt_hal ops over the network to clients using the huawei-cloud backend"
EPILOG = """security: every request needs the token (Authorization: Bearer, compared in constant time) and a
fresh request id; the server listens on loopback unless told otherwise, and refuses any other
address without --tls-cert/--tls-key (add --tls-client-ca to require client certificates).

exit codes:
  0  the server stopped cleanly (Ctrl-C or SIGTERM)
  2  usage error: a bad argument, an unreadable token file or certificate, a public address
     without TLS, a port already in use, or a missing optional package (pip install 'apt-hal[remote]')

examples:
  python -c 'import secrets; print(secrets.token_hex(32))' > token && chmod 600 token
  apt-hal serve --backend cpu --port 8470 --token-file token
  APT_HAL_HUAWEI_CLOUD_ENDPOINT=http://127.0.0.1:8470 APT_HAL_HUAWEI_CLOUD_KEY=$(cat token) \\
      apt-hal conformance --backend huawei-cloud --quick --require huawei-cloud
  apt-hal serve --backend npu --host 0.0.0.0 --port 8470 --token-file token \\
      --tls-cert server.pem --tls-key server.key --tls-client-ca clients.pem
"""

MIB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="cpu", help="the backend that executes the ops (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8470, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--token-file", required=True, type=pathlib.Path,
                   help="file holding the token clients must send (at least 16 characters)")
    p.add_argument("--tls-cert", type=pathlib.Path, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=pathlib.Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=pathlib.Path, help="require client certificates signed by this CA")
    p.add_argument("--max-request-mib", type=int, default=1024, help="largest request body (default: %(default)s)")
    p.add_argument("--max-elements", type=int, default=1 << 28, help="largest tensor (default: %(default)s)")
    p.add_argument("--max-dims", type=int, default=8, help="most dimensions of a tensor (default: %(default)s)")
    p.add_argument("--resident-mib", type=int, default=4096,
                   help="memory for resident weights, least recently used evicted first (default: %(default)s)")
    p.add_argument("--max-inflight", type=int, default=64,
                   help="requests admitted at once; more are refused with 429 (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="threads executing ops (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds a request may take to arrive or to run (default: %(default)s)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets that say so, and with Nagle a
    # reply's headers and body (two writes) wait 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted server takes its port back
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"apt-hal serve: error: {message}", file=sys.stderr)
        return 2

    tls = bool(args.tls_cert or args.tls_key)
    if tls and not (args.tls_cert and args.tls_key):
        return fail("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not tls:
        return fail("--tls-client-ca needs --tls-cert and --tls-key")
    if not is_loopback(args.host) and not tls:
        return fail(f"refusing to listen on {args.host} without TLS: give --tls-cert and --tls-key "
                    "(plain HTTP is allowed on loopback only)")
    try:
        token = args.token_file.read_text().strip()
    except OSError as e:
        return fail(f"cannot read --token-file: {e}")

    import ssl

    import uvicorn

    from apt_hal.backends.huawei_cloud.server import Server, Settings
    from apt_hal.backends.huawei_cloud.wire import Limits
    from apt_hal.errors import AptHalError

    limits = Limits(max_bytes=args.max_request_mib * MIB, max_elements=args.max_elements, max_dims=args.max_dims)
    settings = Settings(backend=args.backend, token=token, limits=limits, resident_bytes=args.resident_mib * MIB,
                        max_inflight=args.max_inflight, workers=args.workers, request_timeout=args.request_timeout)
    try:
        server = Server(settings)
        sock = _listen(args.host, args.port)
    except (AptHalError, ValueError, OSError) as e:
        return fail(str(e))
    config = uvicorn.Config(
        server.app(), log_level="warning", access_log=False, lifespan="off",
        limit_concurrency=4 * args.max_inflight, timeout_keep_alive=30,
        ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key, ssl_ca_certs=args.tls_client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if args.tls_client_ca else ssl.CERT_NONE)
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    print(f"apt-hal serve: {args.backend} executor ({server.device}) listening on "
          f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
