"""The asyncio frontends under the attacks that hung or bloated the thread-per-call server: half-open
gRPC calls and idle streams, stalled REST uploads, idle connections, and a drain under load; plus
start-up errors answered before any model loads. Real servers (`python -m server` subprocesses, so
their memory is their own), real clients, loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scale.replicas import free_port, start_replica
from server.client import LSTMClient
from server.proto import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "frontend-test-token"
X = np.random.default_rng(0).standard_normal((2, 9, 6)).astype(np.float32)


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key}")


def _rss_mib(pid: int) -> float:
    return _status(pid, "VmRSS") / 1024


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _health_ok(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def _infer_ok(target: str, token: str | None) -> None:
    with LSTMClient(target, token=token, timeout=5) as c:
        assert c.infer_batch("bi", X)["h_n"].shape == (4, 2, 8)


class _Attacker:
    """Opens gRPC calls that never send their request (half-open unary calls) and streams that never
    send anything, from an asyncio client in a thread of its own; holds them until `close`."""

    def __init__(self, target: str, channels: int = 12) -> None:
        self.target, self.n_channels = target, channels
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.calls: list = []
        self.channels: list = []

    def _run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self, half_open: int, streams: int, infer: int = 0) -> None:
        async def go():
            # a connection each (grpcio would share one): the server takes --max-streams-per-connection
            # (128) calls per connection, so 1,300 calls need 11 connections
            options = [("grpc.use_local_subchannel_pool", 1)]
            self.channels = [grpc.aio.insecure_channel(self.target, options=options) for _ in range(self.n_channels)]
            for i in range(half_open):  # a unary method called as client-streaming: headers, never a message
                method = self.channels[i % self.n_channels].stream_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                self.calls.append(("half-open", method()))
            for i in range(streams):
                method = self.channels[i % self.n_channels].stream_stream(
                    "/inference.GRPCInferenceService/ModelStreamInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelStreamInferResponse.FromString,
                )
                self.calls.append(("stream", method()))
            for i in range(infer):  # half-open ModelInfer calls
                method = self.channels[i % self.n_channels].stream_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                self.calls.append(("infer", method()))
            await asyncio.sleep(1.0)  # every call's headers are on the wire

        self._run(go())

    def codes(self, kind: str, timeout: float = 5) -> list:
        """The status of each call of `kind` that has ended (waits up to `timeout` for all to end)."""

        async def go():
            calls = [c for k, c in self.calls if k == kind]
            deadline = self.loop.time() + timeout
            while self.loop.time() < deadline and not all(c.done() for c in calls):
                await asyncio.sleep(0.05)
            return [await c.code() if c.done() else None for c in calls]

        return self._run(go(), timeout + 30)

    def close(self) -> None:
        async def go():
            for _, call in self.calls:
                call.cancel()
            for ch in self.channels:
                await ch.close()

        try:
            self._run(go())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.mark.parametrize("tokens", [False, True], ids=["open", "tokens"])
@pytest.mark.slow
def test_half_open_calls_and_idle_streams(repo, tokens, capsys):
    """1,000 half-open health calls, 200 idle ModelStreamInfer streams and 100 half-open ModelInfer
    calls, from clients without a token: health and an (authenticated) ModelInfer still answer
    within 1 s. With tokens on, the streams and ModelInfer calls are refused UNAUTHENTICATED at once
    (the server does not wait for a request message); health is open, so the half-open health calls
    are held, each costing a coroutine, not a thread."""
    args = ["--auth-tokens", TOKEN] if tokens else []
    replica = start_replica(repo, args)
    target = replica.address
    attacker = _Attacker(target)
    try:
        _infer_ok(target, TOKEN if tokens else None)
        rss = {"before": _rss_mib(replica.proc.pid)}
        threads = {"before": _status(replica.proc.pid, "Threads")}
        attacker.open(half_open=1000, streams=200, infer=100)
        rss["during"] = _rss_mib(replica.proc.pid)
        threads["during"] = _status(replica.proc.pid, "Threads")
        for _ in range(3):
            assert _timed(lambda: _health_ok(target)) < 1.0
            assert _timed(lambda: _infer_ok(target, TOKEN if tokens else None)) < 1.0
        for kind, n in (("stream", 200), ("infer", 100)):
            if tokens:
                codes = attacker.codes(kind)
                assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}, (kind, set(codes))
            else:
                assert attacker.codes(kind, timeout=0.5) == [None] * n  # held open, server still fine
        assert attacker.codes("half-open", timeout=0.5) == [None] * 1000  # health is open: held
    finally:
        attacker.close()
    time.sleep(1.0)
    rss["after"] = _rss_mib(replica.proc.pid)
    _health_ok(target)
    replica.stop()
    assert replica.proc.returncode == 0, "".join(replica.log)
    with capsys.disabled():
        print(f"\n  half-open/idle gRPC ({'tokens' if tokens else 'open'}): server RSS MiB {json.dumps(rss)}, "
              f"threads {json.dumps(threads)}")  # fmt: skip
    assert rss["during"] - rss["before"] < 256  # ~1,300 held calls: coroutines and HTTP/2 streams
    assert threads["during"] - threads["before"] <= 4, threads  # a held call costs no thread


def _http_get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_stalled_uploads_hold_little_memory(repo, capsys):
    """4 uploads announcing 200 MiB that stop one byte short: the server holds their bytes in
    temporary files, not memory (< 64 MiB more RSS), and keeps answering health and inference."""
    http_port = free_port()
    replica = start_replica(repo, ["--http-port", str(http_port)])
    size = 200 << 20
    socks = []
    try:
        assert _http_get(http_port, "/v2/health/ready")[0] == 200
        rss = {"before": _rss_mib(replica.proc.pid)}
        chunk = bytes(1 << 20)
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=30)
            socks.append(sock)
            sock.sendall(b"POST /v2/models/bi/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: 100\r\n"
                         b"Content-Length: %d\r\n\r\n" % size)  # fmt: skip
            for _ in range(size // len(chunk) - 1):
                sock.sendall(chunk)
            sock.sendall(chunk[:-1])  # one byte short: never complete
        time.sleep(1.5)  # the server has read what was sent
        rss["during"] = _rss_mib(replica.proc.pid)
        assert _timed(lambda: _http_get(http_port, "/v2/health/ready")) < 1.0
        assert _timed(lambda: _infer_ok(replica.address, None)) < 1.0
    finally:
        for sock in socks:
            sock.close()
    time.sleep(1.0)
    rss["after"] = _rss_mib(replica.proc.pid)
    assert _http_get(http_port, "/v2/health/live")[0] == 200
    replica.stop()
    with capsys.disabled():
        print("\n  4 x 200 MiB stalled uploads: server RSS MiB " + json.dumps(rss))
    assert rss["during"] - rss["before"] < 64, rss


@pytest.mark.slow
def test_idle_connections_do_not_stop_health(repo, capsys):
    """1,000 idle REST connections and 100 that trickle half a request line: health, readiness
    and inference still answer within 1 s (no connection cap refuses them: an idle connection costs
    a file descriptor and a small object on the event loop)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:  # this process holds 1,100 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096 if hard == resource.RLIM_INFINITY else min(hard, 4096), hard))
    http_port = free_port()
    replica = start_replica(repo, ["--http-port", str(http_port)])
    socks = []
    try:
        rss = {"before": _rss_mib(replica.proc.pid)}
        for i in range(1100):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            if i >= 1000:
                sock.sendall(b"GET /v2/health/re")  # headers never finished
            socks.append(sock)
        time.sleep(0.5)
        rss["during"] = _rss_mib(replica.proc.pid)
        for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/bi"):
            t = time.perf_counter()
            status, _ = _http_get(http_port, path)
            assert status == 200 and time.perf_counter() - t < 1.0, (path, status)
        assert _timed(lambda: _health_ok(replica.address)) < 1.0
        body = {"inputs": [{"name": "x", "shape": [2, 9, 6], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        t = time.perf_counter()
        conn.request("POST", "/v2/models/bi/infer", json.dumps(body))
        assert conn.getresponse().status == 200 and time.perf_counter() - t < 1.0
        conn.close()
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.5)
    rss["after"] = _rss_mib(replica.proc.pid)
    assert _http_get(http_port, "/v2/health/ready")[0] == 200
    replica.stop()
    with capsys.disabled():
        print("\n  1,100 idle REST connections: server RSS MiB " + json.dumps(rss))


@pytest.mark.slow
def test_drain_under_load_cancels_nothing(repo):
    """SIGTERM under 12 gRPC and 4 REST clients: every gRPC call ends OK or UNAVAILABLE (none
    CANCELLED), every REST request gets 200 or 503 (after the drain began, with `Connection:
    close`) or is refused at connect once the port is closed; no REST connection is reset or closed
    under a request it sent."""
    http_port = free_port()
    replica = start_replica(repo, ["--http-port", str(http_port), "--drain-delay-s", "0.5", "--grace-s", "5"])
    target = replica.address
    x = np.random.default_rng(1).standard_normal((8, 200, 6)).astype(np.float32)  # a few ms per call
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def note(kind: str, outcome: str) -> None:
        with lock:
            outcomes.append((kind, outcome))

    def grpc_client() -> None:
        with LSTMClient(target, timeout=20) as c:
            while not stop.is_set():
                try:
                    c.infer_batch("bi", x, outputs=["h_n"])
                    note("grpc", "OK")
                except grpc.RpcError as exc:
                    note("grpc", exc.code().name if exc.code() != grpc.StatusCode.UNAVAILABLE else "UNAVAILABLE")
                    time.sleep(0.05)

    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "h_n", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    rest_body = head + x.tobytes()

    def rest_client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=20)
        while not stop.is_set():
            try:
                conn.request(
                    "POST", "/v2/models/bi/infer", rest_body, {"Inference-Header-Content-Length": str(len(head))}
                )
            except ConnectionRefusedError:
                note("rest", "REFUSED")  # the port is closed: never accepted
                conn.close()
                time.sleep(0.05)
                continue
            except OSError as exc:
                note("rest", f"SEND {type(exc).__name__}")
                conn.close()
                continue
            try:
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:  # reset or closed under a request
                note("rest", f"RECV {type(exc).__name__}")
                conn.close()
                continue
            if resp.status == 200:
                note("rest", "OK")
            elif resp.status == 503:
                note("rest", "UNAVAILABLE" if resp.will_close else "503 kept open")
                time.sleep(0.05)
            else:
                note("rest", f"HTTP {resp.status}")
        conn.close()

    threads = [threading.Thread(target=grpc_client) for _ in range(12)]
    threads += [threading.Thread(target=rest_client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    replica.proc.send_signal(signal.SIGTERM)
    code = replica.proc.wait(timeout=30)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert code == 0, "".join(replica.log)
    seen = {kind: sorted({o for k, o in outcomes if k == kind}) for kind in ("grpc", "rest")}
    assert set(seen["grpc"]) <= {"OK", "UNAVAILABLE"}, seen
    assert set(seen["rest"]) <= {"OK", "UNAVAILABLE", "REFUSED"}, seen
    assert "OK" in seen["grpc"] and "OK" in seen["rest"] and "UNAVAILABLE" in seen["grpc"], seen


def _server(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "server", "--log-level", "INFO", "--metrics-port", "-1", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.slow
def test_startup_errors_before_models_load(repo, tmp_path):
    """A busy port, a missing token or TLS file, a missing repository: exit 2 with one line naming
    it, before any model is loaded (the files are checked and the ports bound first)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (["--port", str(port)], rf"^error: port {port} busy \(gRPC --port on 127\.0\.0\.1\)$"),
            (["--port", "0", "--http-port", str(port)], rf"^error: port {port} busy \(HTTP/REST --http-port on"),
            (["--port", "0", "--auth-tokens-file", "/nope"], r"^error: --auth-tokens-file /nope: .*No such file"),
            (["--port", "0", "--tls-cert", "/no.pem", "--tls-key", "/no.key"], r"^error: --tls-cert /no.pem: No such"),
        ]  # fmt: skip
        for args, pattern in cases:
            res = _server("--model-repository", str(repo), *args)
            lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
            assert res.returncode == 2 and len(lines) == 1 and re.match(pattern, lines[0]), (args, res.stderr)
            assert "loaded model" not in res.stderr + res.stdout, (args, res.stderr)
    res = _server("--model-repository", str(tmp_path / "none"), "--port", "0")
    assert res.returncode == 2 and "--model-repository" in res.stderr and "not a folder" in res.stderr, res.stderr


def test_every_domain_error_maps_to_a_grpc_and_an_http_status():
    """One mapping for both frontends: every `server.errors` class to its gRPC status and the
    HTTP status of that code; anything else INTERNAL / 500 without its text."""
    import inspect

    from server import errors
    from server.handlers import HTTP_STATUS, error_status
    from server.status import GRPC_STATUS

    assert set(HTTP_STATUS) == set(errors.Code) == set(GRPC_STATUS)
    assert set(GRPC_STATUS.values()) == set(grpc.StatusCode)
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.ServingError)]
    assert len(classes) >= 8, classes
    for cls in classes:
        code, http_status, message = error_status(cls("what went wrong"))
        assert (
            code == GRPC_STATUS[cls.code] and http_status == HTTP_STATUS[cls.code] and message == "what went wrong"
        ), cls
        server_side = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.UNIMPLEMENTED)  # fmt: skip
        assert (http_status >= 500) == (code in server_side), cls
    code, http_status, message = error_status(KeyError("/secret/path"))
    assert (code, http_status) == (grpc.StatusCode.INTERNAL, 500) and "secret" not in message
