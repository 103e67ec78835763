"""``apt-hal serve`` and the huawei-cloud backend on loopback: conformance, auth, limits, fuzz, load
and faults. Servers are real ``apt-hal serve`` processes on 127.0.0.1 with a temporary token file;
every wait has a deadline."""

import json
import os
import pathlib
import random
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import torch
import trustme

from apt_hal import cli, mxfp4, ops
from apt_hal.backends.huawei_cloud import wire
from apt_hal.backends.huawei_cloud.client import Client, RemoteError

START_TIMEOUT = 120  # seconds for a server process to import torch and listen, on a loaded machine


def start_server(token_file: pathlib.Path, *extra: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(["apt-hal", "serve", "--backend", "cpu", "--port", str(port), "--token-file",
                             str(token_file), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if "listening on http://127.0.0.1:" not in line and "listening on https://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"apt-hal serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, int(line.rsplit(":", 1)[1])


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("remote") / "token"
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert, client_cert = ca.issue_cert("127.0.0.1"), ca.issue_cert("client.apt-hal.test")
    files = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
             "client": folder / "client.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def servers(token_file, certificates):
    """The main server; a small one (one request in flight, 2 s request timeout); one on mutual TLS.
    The latter two start beside the first."""
    main, small, tls = {}, {}, {}
    starters = [
        threading.Thread(target=lambda: small.update(zip(("proc", "port"), start_server(
            token_file, "--max-inflight", "1", "--request-timeout", "2", "--max-request-mib", "1")))),
        threading.Thread(target=lambda: tls.update(zip(("proc", "port"), start_server(
            token_file, "--tls-cert", certificates["cert"], "--tls-key", certificates["key"],
            "--tls-client-ca", certificates["ca"])))),
    ]
    for s in starters:
        s.start()
    try:
        main.update(zip(("proc", "port"), start_server(token_file)))
    finally:
        for s in starters:
            s.join(START_TIMEOUT + 10)
    yield main, small, tls
    for s in (main, small, tls):
        if "proc" in s:
            stop_server(s["proc"])


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def token(token_file) -> str:
    return token_file.read_text().strip()


def endpoint(server) -> str:
    return f"http://127.0.0.1:{server['port']}"


def headers(token: str, **overrides) -> dict:
    h = {"authorization": f"Bearer {token}", wire.REQUEST_ID: uuid.uuid4().hex, wire.REQUEST_TIME: f"{time.time()}"}
    h.update(overrides)
    return {k: v for k, v in h.items() if v is not None}


def rotary_args(seed: int, tokens: int = 3):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, tokens, 2, 8, generator=g), torch.randn(1, tokens, 1, 8, generator=g)
    return q, k, torch.arange(tokens).reshape(1, tokens), torch.randn(tokens, 8, generator=g), "neox"


def rss_kib(proc: subprocess.Popen) -> int:
    for line in pathlib.Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---- the backend end to end ---------------------------------------------------------------------


def test_conformance_quick_passes_against_a_loopback_server(server, token, tmp_path):
    env = dict(os.environ, APT_HAL_HUAWEI_CLOUD_ENDPOINT=endpoint(server), APT_HAL_HUAWEI_CLOUD_KEY=token)
    run = subprocess.run(["apt-hal", "conformance", "--backend", "huawei-cloud", "--quick", "--require",
                          "huawei-cloud", "--report", str(tmp_path), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "conformance.json").read_text())
    backend = report["backends"]["huawei-cloud"]
    assert backend["status"] == "RAN" and backend["detail"].endswith("loopback server, cpu executor")
    statuses = {c["status"] for c in report["cases"]}
    assert statuses == {"PASS"} and len(report["cases"]) > 100


# Runs in its own process: activating a backend lasts for the process (the registry does not
# re-check it), and other tests expect huawei-cloud to be unavailable without its variables.
BACKEND_SCRIPT = """
import torch, apt_hal
from apt_hal import mxfp4, ops, registry
q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
pos, cache = torch.arange(4).reshape(1, 4), torch.randn(4, 8)
fused = torch.randn(1, 4, 3, 2, 8)  # q and k as strided views of one buffer, as a fused QKV projection gives
expected = fused.clone()
ops.rotary_.reference(expected[:, :, 0], expected[:, :, 1, :1], pos, cache, "neox")
w_packed, w_scales = mxfp4.quantize(torch.randn(64, 64))
x = torch.randn(2, 64)
with apt_hal.use("huawei-cloud", strict=True):
    ops.rotary_(fused[:, :, 0], fused[:, :, 1, :1], pos, cache, "neox")
    y = ops.fp4_matmul(x, w_packed, w_scales)
    try:
        ops.rotary(q, k, pos + 100, cache, "neox")  # a value check: only the server's reference finds it
    except apt_hal.ContractError as e:
        print("ContractError:", e)
assert torch.equal(fused, expected), "the views were not written exactly"
assert torch.equal(y, ops.fp4_matmul.reference(x, w_packed, w_scales))
print("detail:", registry.probe("huawei-cloud").detail)
print("implementations:", [i.name for i in registry.implementations("rotary_", "huawei-cloud")])
"""


def test_backend_forwards_ops_in_place_effects_and_contract_errors(server, token):
    env = dict(os.environ, APT_HAL_HUAWEI_CLOUD_ENDPOINT=endpoint(server), APT_HAL_HUAWEI_CLOUD_KEY=token)
    run = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("ContractError: apt_hal.rotary: argument 'positions'")
    assert lines[1] == f"detail: endpoint {endpoint(server)}: loopback server, cpu executor"
    assert lines[2] == "implementations: ['huawei-cloud.remote']"


def test_a_server_that_is_down_makes_the_backend_unavailable_with_the_reason():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    env = dict(os.environ, APT_HAL_HUAWEI_CLOUD_ENDPOINT=f"http://127.0.0.1:{port}", APT_HAL_HUAWEI_CLOUD_KEY="k" * 32)
    run = subprocess.run([sys.executable, "-c", "import apt_hal; apt_hal.use('huawei-cloud')"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "BackendUnavailableError" in run.stderr and f"http://127.0.0.1:{port}" in run.stderr
    assert "ConnectError" in run.stderr


def test_serve_refuses_a_public_address_without_tls_and_a_short_token(tmp_path, capsys):
    short = tmp_path / "short"
    short.write_text("abc")
    assert cli.main(["serve", "--host", "0.0.0.0", "--token-file", str(short)]) == 2
    assert "refusing to listen on 0.0.0.0 without TLS" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "0", "--token-file", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


# ---- auth and limits ----------------------------------------------------------------------------


def test_auth_refuses_missing_wrong_replayed_and_stale_credentials(server, token):
    with httpx.Client(base_url=endpoint(server), timeout=10) as http:
        ok = headers(token)
        assert http.get("/v1/health", headers=ok).status_code == 200
        replayed = http.get("/v1/health", headers=ok)
        refusals = {
            "missing": http.get("/v1/health", headers=headers(token, authorization=None)),
            "wrong": http.get("/v1/health", headers=headers(token, authorization=f"Bearer {'0' * 64}")),
            "wrong scheme": http.get("/v1/health", headers=headers(token, authorization=token)),
            "no request id": http.get("/v1/health", headers=headers(token, **{wire.REQUEST_ID: None})),
            "stale": http.get("/v1/health", headers=headers(token, **{wire.REQUEST_TIME: f"{time.time() - 3600}"})),
            "replayed": replayed,
        }
        for why, reply in refusals.items():
            assert reply.status_code == 401, why
        assert replayed.json()["error"] == "replayed"
        assert refusals["stale"].json()["error"] == "stale"
        assert "missing credential" in refusals["missing"].json()["message"]


def test_tokens_are_compared_in_constant_time(monkeypatch):
    from apt_hal.backends.huawei_cloud import server as server_module

    calls = []
    monkeypatch.setattr(server_module.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or a == b)
    srv = server_module.Server(server_module.Settings(token="t" * 32))
    request = type("R", (), {"headers": {"authorization": "Bearer wrong"}})()
    with pytest.raises(server_module.Refusal):
        srv._authorize(request)
    assert calls == [(b"Bearer wrong", b"Bearer " + b"t" * 32)]


def test_resident_store_evicts_the_least_recently_used_and_says_gone():
    from apt_hal.backends.huawei_cloud.server import Refusal, ResidentStore

    store = ResidentStore(limit=300)
    for key in "abc":
        store.put(key, torch.full((1,), ord(key)), 100)
    store["a"]  # used: "b" is now the oldest
    store.put("d", torch.zeros(1), 100)
    assert store.stats() == {"weights": 3, "bytes": 300, "limit": 300, "evictions": 1}
    with pytest.raises(Refusal, match="upload it again") as gone:
        store["b"]
    assert gone.value.status == 410
    assert store["a"].item() == ord("a")
    with pytest.raises(Refusal) as too_large:
        store.put("e", torch.zeros(1), 301)
    assert too_large.value.status == 413


def test_busy_server_answers_429_and_a_body_too_slow_gets_408(servers, token):
    small = servers[1]
    slow = socket.create_connection(("127.0.0.1", small["port"]), timeout=10)
    try:
        h = headers(token)
        slow.sendall((f"POST /v1/call HTTP/1.1\r\nHost: x\r\nAuthorization: {h['authorization']}\r\n"
                      f"{wire.REQUEST_ID}: {h[wire.REQUEST_ID]}\r\n{wire.REQUEST_TIME}: {h[wire.REQUEST_TIME]}\r\n"
                      "Content-Length: 1000\r\n\r\n0123").encode())  # admitted, then stalls: the only slot is taken
        time.sleep(0.5)
        with httpx.Client(base_url=endpoint(small), timeout=10) as http:
            busy = http.post("/v1/call", content=b"x" * 16, headers=headers(token))
        assert busy.status_code == 429 and busy.json()["error"] == "busy"
        t0 = time.monotonic()
        reply = slow.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and time.monotonic() - t0 < 5
    finally:
        slow.close()


def test_mutual_tls_serves_a_client_with_a_certificate_and_refuses_others(servers, token, certificates):
    url = f"https://127.0.0.1:{servers[2]['port']}"
    client = Client(url, token, ca=certificates["ca"], cert=certificates["client"])
    got, _ = client.call("rotary", rotary_args(5))
    assert all(torch.equal(a, b) for a, b in zip(got, ops.rotary.reference(*rotary_args(5))))
    client.close()
    for refused in (Client(url, token, ca=certificates["ca"], retries=0),  # no client certificate
                    Client(url, token, cert=certificates["client"], retries=0)):  # server not trusted
        with pytest.raises(RemoteError, match=f"huawei-cloud server {url}"):
            refused.health()
        refused.close()
    with httpx.Client(base_url=f"http://127.0.0.1:{servers[2]['port']}", timeout=10) as plain:
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS port
            plain.get("/v1/health", headers=headers(token))


# ---- fuzz ---------------------------------------------------------------------------------------


def _fuzz_bodies(rng: random.Random, token: str):
    """(body, headers) pairs, each malformed in one way."""
    valid = wire.encode({"op": "rotary", "args": [{"tensor": "a0"}, {"tensor": "a1"}, {"tensor": "a2"},
                                                 {"tensor": "a3"}, "neox"]},
                        dict(zip(("a0", "a1", "a2", "a3"), rotary_args(0)[:4])))
    hlen = struct.unpack_from("<Q", valid)[0]
    header = json.loads(valid[8:8 + hlen])

    def frame_with(mutate) -> bytes:
        h = json.loads(json.dumps(header))
        mutate(h)
        raw = json.dumps(h).encode()
        return struct.pack("<Q", len(raw)) + raw + valid[8 + hlen:]

    def set_entry(field, value):
        return lambda h: h["a0"].__setitem__(field, value)

    def set_message(**fields):
        def mutate(h):
            m = json.loads(h["__metadata__"]["apt_hal"])
            m.update(fields)
            h["__metadata__"]["apt_hal"] = json.dumps(m)
        return mutate

    makers = [
        lambda: valid[:rng.randrange(len(valid))],  # truncated frame
        lambda: struct.pack("<Q", rng.choice([1 << 62, hlen + 10 ** 6, len(valid)])) + valid[8:],  # wrong lengths
        lambda: frame_with(set_entry("shape", [1 << 40, 1 << 40])),  # huge declared size
        lambda: frame_with(set_entry("dtype", rng.choice(["F128", "", "PYOBJ", 7]))),  # bad dtype
        lambda: frame_with(set_entry("shape", [-rng.randrange(1, 100), 3])),  # negative dims
        lambda: frame_with(set_entry("data_offsets", [0, rng.randrange(1 << 30)])),
        lambda: frame_with(set_message(op=rng.choice(["__import__", "eval", "", 3]))),  # unknown ops
        lambda: frame_with(set_message(args=[{"tensor": "a0"}] * 20)),  # too many arguments
        lambda: frame_with(set_message(args=[{"resident": "0" * 64}, 1, 2, 3, "neox"])),  # weight not resident
        lambda: frame_with(set_message(args=[1, 2, 3, 4, "neox"])),  # wrong argument types
        lambda: rng.randbytes(rng.randrange(256)),  # random bytes
        lambda: bytes(valid[:8]) + rng.randbytes(64),  # a length, then garbage
    ]
    while True:
        if rng.random() < 0.08:  # a valid frame with a wrong or missing token
            yield valid, headers(token, authorization=rng.choice([None, "Bearer " + secrets.token_hex(32), "Basic x"]))
        else:
            yield rng.choice(makers)(), headers(token)


def test_fuzz_ten_thousand_malformed_requests_all_refused_with_4xx(server, token):
    requests_total, threads = 10000, 4
    statuses, failures = {}, []
    lock = threading.Lock()
    rss_before = rss_kib(server["proc"])

    def worker(seed: int):
        rng = random.Random(seed)
        bodies = _fuzz_bodies(rng, token)
        with httpx.Client(base_url=endpoint(server), timeout=10) as http:
            for _ in range(requests_total // threads):
                body, h = next(bodies)
                try:
                    reply = http.post("/v1/call", content=body, headers=h)
                except httpx.HTTPError as e:  # a hang (timeout) or a dropped connection
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    assert not any(t.is_alive() for t in pool) and not failures, failures[:5]
    assert sum(statuses.values()) == requests_total
    assert all(400 <= s < 500 for s in statuses), statuses
    assert server["proc"].poll() is None  # no crash
    grown_mib = (rss_kib(server["proc"]) - rss_before) / 1024
    assert grown_mib < 200, f"server memory grew {grown_mib:.0f} MiB"
    with httpx.Client(base_url=endpoint(server), timeout=10) as http:
        assert http.get("/v1/health", headers=headers(token)).status_code == 200
    print(f"\nfuzz: {requests_total} requests, statuses {dict(sorted(statuses.items()))}, "
          f"server RSS grew {grown_mib:.1f} MiB")


def test_malformed_http_is_refused_or_closed_without_harming_the_server(server, token):
    raw = [b"GARBAGE\r\n\r\n", b"POST /v1/call HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
           b"POST /v1/call HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
           b"\x00" * 64 + b"\r\n\r\n"]
    for payload in raw * 25:
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall(payload)
            reply = s.recv(256)
        assert reply == b"" or reply.split(b" ")[1].startswith(b"4"), reply
    with httpx.Client(base_url=endpoint(server), timeout=10) as http:
        assert http.get("/v1/health", headers=headers(token)).status_code == 200


# ---- load ---------------------------------------------------------------------------------------


def test_load_thousand_requests_from_32_concurrent_clients(server, token):
    client = Client(endpoint(server), token)
    results, latencies, errors = {}, [], []
    lock = threading.Lock()

    def worker(first: int):
        for i in range(first, 1000, 32):
            args = rotary_args(i)
            t0 = time.perf_counter()
            try:
                got, _ = client.call("rotary", args)
            except Exception as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                results[i] = got

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    client.close()
    assert not errors and len(results) == 1000, errors[:5]
    wrong = [i for i, got in results.items() if not all(torch.equal(a, b) for a, b in
                                                        zip(got, ops.rotary.reference(*rotary_args(i))))]
    assert not wrong
    latencies.sort()
    print(f"\nload: 1000 requests, 32 clients, 0 lost, 0 wrong; latency p50 {1000 * latencies[500]:.1f} ms, "
          f"p99 {1000 * latencies[990]:.1f} ms")


# ---- faults -------------------------------------------------------------------------------------


def test_kill_mid_call_raises_and_restart_reconnects_and_reuploads(token_file, token):
    proc, port = start_server(token_file)
    try:
        client = Client(f"http://127.0.0.1:{port}", token, retries=2)
        w_packed, w_scales = mxfp4.quantize(torch.randn(64, 64))
        x = torch.randn(3, 64)
        expected = ops.fp4_matmul.reference(x, w_packed, w_scales)
        resident = frozenset({1, 2})
        assert torch.equal(client.call("fp4_matmul", (x, w_packed, w_scales, None), resident)[0], expected)

        q, k = torch.randn(1, 2048, 32, 64), torch.randn(1, 2048, 32, 64)  # long enough to be killed mid-call
        positions, cache = torch.arange(2048).reshape(1, 2048), torch.randn(2048, 64)
        q0, k0, outcome = q.clone(), k.clone(), {}

        def in_place_call():
            try:
                outcome["result"] = client.call("rotary_", (q, k, positions, cache, "neox"), frozenset({3}))
            except RemoteError as e:
                outcome["error"] = str(e)

        watcher = Client(f"http://127.0.0.1:{port}", token)
        caller = threading.Thread(target=in_place_call)
        caller.start()
        deadline = time.monotonic() + 60
        while watcher.metrics()["inflight"] < 1 and time.monotonic() < deadline:  # the call is admitted
            time.sleep(0.005)
        proc.kill()  # SIGKILL, mid-call
        proc.wait(timeout=30)
        caller.join(60)
        assert not caller.is_alive()
        assert "result" not in outcome, "a call to a killed server returned"
        assert f"huawei-cloud server http://127.0.0.1:{port}" in outcome["error"]
        assert torch.equal(q, q0) and torch.equal(k, k0)  # the caller's tensors were not touched

        proc, _ = start_server(token_file, port=port)
        got, _ = client.call("fp4_matmul", (x, w_packed, w_scales, None), resident)
        assert torch.equal(got, expected)
        metrics = watcher.metrics()
        assert metrics["statuses"].get("410") == 1  # the weights were gone...
        assert metrics["requests"]["weights"] == 2  # ...and both were uploaded again
        assert metrics["resident"]["weights"] == 2
    finally:
        stop_server(proc)
