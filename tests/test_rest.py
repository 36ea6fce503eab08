"""HTTP/REST (Open Inference Protocol v2) beside gRPC: the same data plane, over a real socket.

Plain HTTP with urllib (the JSON and binary forms built by hand), tritonclient's HTTP client in
its own venv, TLS, mutual TLS and bearer tokens, and the error statuses.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import STATIC_T, TOL, ragged, reference
from tests.test_security import pki  # noqa: F401 - the certificate fixture

HERE = Path(__file__).resolve().parent
TRITON_PYTHON = os.environ.get("TRITON_PYTHON") or str(HERE.parent / ".venv-triton" / "bin" / "python")


def _start(repo, **kw):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(port=0, http_port=0, model_repository=repo, device="cpu", metrics_port=-1, log_level="WARNING", **kw)
    )
    srv.start()
    return srv


@pytest.fixture(scope="module")
def rest(repo):
    srv = _start(repo, instances=2, model_control_mode="explicit")
    yield srv
    srv.stop(1)


def _call(port, method, path, body=None, headers=None, context=None, scheme="http"):
    """(status, headers (names in lower case), body bytes) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers=headers or {})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def _json(port, method, path, body=None, **kw):
    status, _, raw = _call(port, method, path, body, **kw)
    return status, json.loads(raw) if raw else None


def _infer_body(x, lengths, outputs=None, binary=False):
    body = {
        "id": "req-7",
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()},
            {"name": "lengths", "shape": list(lengths.shape), "datatype": "INT64", "data": lengths.tolist()},
        ],
    }
    if outputs:
        body["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
    return body


def _arrays(reply: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in reply["outputs"]}


def test_health_and_metadata(rest):
    port = rest.http_port
    assert _json(port, "GET", "/v2/health/live") == (200, {"live": True})
    assert _json(port, "GET", "/v2/health/ready") == (200, {"ready": True})
    status, server = _json(port, "GET", "/v2")
    assert status == 200 and server["name"] == "lstm-serve" and "binary_tensor_data" in server["extensions"]
    status, meta = _json(port, "GET", "/v2/models/bi")
    assert status == 200 and meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, -1, 6]},
        {"name": "lengths", "datatype": "INT64", "shape": [-1]},
    ]
    assert _json(port, "GET", "/v2/models/bi/versions/1")[1] == meta
    assert _json(port, "GET", "/v2/models/bi/ready") == (200, {"name": "bi", "ready": True})
    status, config = _json(port, "GET", f"/v2/models/bi_static_t{STATIC_T}/config")
    assert status == 200 and config["input"][0]["dims"] == [-1, STATIC_T, 6]
    assert config["parameters"]["static_length"]["string_value"] == str(STATIC_T)


def test_json_infer_parity(rest, encoders):
    x, lengths = ragged(np.random.default_rng(31), 5, 13, 6)
    want = reference(encoders["bi"], x, lengths)
    status, reply = _json(rest.http_port, "POST", "/v2/models/bi/infer", _infer_body(x, lengths))
    assert status == 200, reply
    assert reply["model_name"] == "bi" and reply["model_version"] == "1" and reply["id"] == "req-7"
    got = _arrays(reply)
    assert set(got) == {"y", "h_n", "c_n"}
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= TOL, name
    # flat data (row-major), one output asked for, version in the path, lengths left out (full)
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
            "outputs": [{"name": "h_n"}]}  # fmt: skip
    status, reply = _json(rest.http_port, "POST", "/v2/models/bi/versions/1/infer", body)
    assert status == 200 and [o["name"] for o in reply["outputs"]] == ["h_n"]
    full = reference(encoders["bi"], x, np.full(len(x), x.shape[1], np.int64))
    assert np.abs(_arrays(reply)["h_n"] - full["h_n"]).max() <= TOL


def test_json_non_finite_outputs():
    """Non-finite output values leave the fast float32 formatting for json.dumps' NaN/Infinity,
    which Python's json and rapidjson (tritonclient) read. (ONNX Runtime's CPU LSTM was seen to
    turn a NaN input into finite outputs, so this is built from a response directly.)"""
    from server.dataplane import InferResponse
    from server.rest_codec import response_body

    outputs = {"y": np.array([[1.5, np.nan], [np.inf, -2.25]], np.float32),
               "h_n": np.array([0.1, 1e-30, -3.4e38], np.float32)}  # fmt: skip
    body, header_len = response_body(InferResponse("m", "1", outputs=outputs), {}, False)
    assert header_len == -1
    out = {o["name"]: np.asarray(o["data"], np.float32) for o in json.loads(body)["outputs"]}
    assert b"NaN" in body and b"Infinity" in body and np.isnan(out["y"][1]) and out["y"][2] == np.inf
    assert np.array_equal(out["h_n"], np.array([0.1, 1e-30, -3.4e38], np.float32))  # exact float32


def test_binary_extension(rest, encoders):
    """Triton's binary tensor extension, built by hand: JSON header + raw bytes, both ways."""
    x, lengths = ragged(np.random.default_rng(32), 3, 9, 6)
    want = reference(encoders["bi"], x, lengths)
    header = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
            {"name": "lengths", "shape": [3], "datatype": "INT64", "parameters": {"binary_data_size": lengths.nbytes}},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "h_n"}],
    }
    head = json.dumps(header).encode()
    body = head + x.tobytes() + lengths.tobytes()
    conn = http.client.HTTPConnection("127.0.0.1", rest.http_port, timeout=30)
    conn.request("POST", "/v2/models/bi/infer", body, {"Inference-Header-Content-Length": str(len(head))})
    resp = conn.getresponse()
    raw = resp.read()
    assert resp.status == 200, raw
    n = int(resp.getheader("Inference-Header-Content-Length"))
    reply = json.loads(raw[:n])
    y_meta, h_meta = reply["outputs"]
    assert y_meta["parameters"]["binary_data_size"] == len(raw) - n and "data" not in y_meta
    y = np.frombuffer(raw[n:], np.float32).reshape(y_meta["shape"])
    assert np.abs(y - want["y"]).max() <= TOL
    assert np.abs(np.asarray(h_meta["data"], np.float32).reshape(h_meta["shape"]) - want["h_n"]).max() <= TOL
    # the same connection serves the next requests (HTTP/1.1 keep-alive), GETs without a body too
    for path in ("/v2/health/ready", "/v2/models/bi", "/v2/health/live", "/v2/models/nope"):
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (200, 404) and not resp.will_close, path
    conn.request("POST", "/v2/models/bi/infer", body, {"Inference-Header-Content-Length": str(len(head))})
    assert conn.getresponse().status == 200
    conn.close()


X6 = {"name": "x", "shape": [1, 1, 6], "datatype": "FP32", "data": [0.0] * 6}  # a valid input
BAD = [
    # (method, path, body, headers, status, fragment of the error)
    ("GET", "/v2/models/nope", None, {}, 404, "Request for unknown model: 'nope' is not found"),
    ("GET", "/v2/models/bi/versions/9", None, {}, 404, "Request for unknown model: 'bi' version '9' is not found"),
    ("GET", "/v2/models/bi/versions/%D9%A1", None, {}, 404, "is not found"),  # an Arabic-Indic 1 is not 1
    ("GET", "/v2/models/nope/ready", None, {}, 404, "Request for unknown model: 'nope' is not found"),
    ("POST", "/v2/models/bi/infer", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/v2/models/bi/infer", {"inputs": []}, {}, 400, "'inputs' must be a non-empty list"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 2, 6], "datatype": "FP32",
                                                 "data": [1.0]}]}, {}, 400, "holds 12 elements, 'data' has 1"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 1, 5], "datatype": "FP32",
                                                 "data": [0.0] * 5}]}, {}, 400, "input 'x': dim 2 must be 6"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP99",
                                                 "data": [0.0] * 6}]}, {}, 400, "datatype 'FP99' unknown"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                                 "data": ["a"] * 6}]}, {}, 400,
     "must be a (nested) list of FP32 values, got strings"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                                 "data": [0.0] * 6}], "outputs": [{"name": "zz"}]}, {}, 400,
     "requested output(s) ['zz'] unknown"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                                 "parameters": {"binary_data_size": 24}}]},
     {"Inference-Header-Content-Length": "999"}, 400, "Inference-Header-Content-Length 999 must be in"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                                 "data": [0.0] * 6}], "extra": 1}, {}, 400, "unknown request field"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [1, 1, 6], "datatype": "FP32",
                                                 "data": [0.0] * 6}], "parameters": {"sequence_id": 2**70}}, {}, 400,
     "request parameter 'sequence_id': integers must fit in 64 bits, got 1180591620717411303424"),
    ("POST", "/v2/models/bi/infer", {"inputs": [X6,
                                                {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [1.9]}]},
     {}, 400, "input 'lengths': 'data' must be a (nested) list of INT64 values, got non-integer numbers"),
    ("POST", "/v2/models/bi/infer", {"inputs": [{"name": "x", "shape": [2**64, 0], "datatype": "FP32", "data": []}]},
     {}, 400, "must be in 0..2^63-1"),
    ("POST", "/v2/models/bi/infer", {"inputs": [X6], "outputs": [{"name": "y", "parameters": [1]}]}, {}, 400,
     "'parameters' must be an object"),
    ("POST", "/v2/models/bi/infer", {"inputs": [X6],
                                     "parameters": {"binary_data_output": "false"}}, {}, 400, "must be true or false"),
    ("POST", "/v2/models/bi/infer", b'{"id": "\\ud800", "inputs": [' + json.dumps(X6).encode() + b"]}", {}, 400,
     "request not valid"),
    ("POST", "/v2/models/bi/infer", b"[" * 100000 + b"]" * 100000, {}, 400, "not valid JSON"),
    ("POST", "/v2/models/bi/infer", {"inputs": [X6]},
     {"Inference-Timeout-Ms": "nan"}, 400, "Inference-Timeout-Ms 'nan' must be a positive number"),
    ("POST", "/v2/repository/models/nope/load", b"", {}, 404, "nope"),
    ("POST", "/v2/repository/index", b"[]", {}, 400, "must be a JSON object"),
    ("GET", "/v2/models/bi/infer", None, {}, 405, "GET not allowed here; use POST"),
    ("POST", "/v2/models/bi", {}, {}, 405, "POST not allowed here; use GET"),
    ("GET", "/v1/models/bi", None, {}, 404, "the API is under /v2"),
    ("GET", "/v2/models/bi/bogus", None, {}, 404, "no such endpoint under model 'bi'"),
    ("POST", "/v2/models/bi/infer", b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding 'br'"),
    ("POST", "/v2/models/bi/infer", b"{}", {"Content-Encoding": "gzip"}, 400, "not valid gzip data"),
    ("POST", "/v2/models/bi/infer", gzip.compress(b"{}")[:-4], {"Content-Encoding": "gzip"}, 400, "truncated gzip"),
]  # fmt: skip


def test_compressed_bodies_are_inflated_within_the_limit(rest):
    """Content-Encoding gzip or deflate, as Triton takes them: the same answer as the plain body; a body
    that would inflate past the JSON limit is refused (400) before more than the limit is held."""
    body = json.dumps({"inputs": [X6]}).encode()
    plain = _json(rest.http_port, "POST", "/v2/models/bi/infer", body)
    assert plain[0] == 200
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        got = _json(rest.http_port, "POST", "/v2/models/bi/infer", packed, headers={"Content-Encoding": encoding})
        assert got == plain, encoding
    limit = 32 << 20  # RestApp's JSON body limit
    bomb = gzip.compress(b"[" + b" " * (limit + 1024) + b"]")  # ~33 KB that inflates past the limit
    status, reply = _json(rest.http_port, "POST", "/v2/models/bi/infer", bomb, headers={"Content-Encoding": "gzip"})
    assert status == 400 and "inflates (gzip) to a size that exceeds the maximum allowed value" in reply["error"], reply
    assert _json(rest.http_port, "GET", "/v2/health/ready")[0] == 200


@pytest.mark.parametrize("method,path,body,headers,status,fragment", BAD, ids=[f"{b[4]}-{b[5][:28]}" for b in BAD])
def test_errors(rest, method, path, body, headers, status, fragment):
    got, _, raw = _call(rest.http_port, method, path, body, {"Content-Type": "application/json", **headers})
    assert got == status, raw
    assert fragment in json.loads(raw)["error"], raw
    assert _json(rest.http_port, "GET", "/v2/health/ready")[0] == 200  # still serving


def _raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on one connection; everything the server answers until it closes (or 3 s)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<timeout>")
    return b"".join(chunks)


def _exchange_then(port: int, data: bytes, then: bytes = b"") -> tuple[bytes, bytes]:
    """Send `data` on one connection and read its answer; then send `then` on the same connection
    and read everything until the server closes it (or 3 s pass: b"<open>" is appended)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(data)
        first = b""
        while b"\r\n\r\n" not in first:
            chunk = sock.recv(65536)
            if not chunk:
                return first, b"<closed>"
            first += chunk
        head, _, rest = first.partition(b"\r\n\r\n")
        length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")),
                          b"0"))  # fmt: skip
        while len(rest) < length:
            rest += sock.recv(65536)
        first = head + b"\r\n\r\n" + rest
        if then:
            sock.sendall(then)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            chunks.append(b"<open>")
        except ConnectionResetError:
            chunks.append(b"<reset>")
    return first, b"".join(chunks)


@pytest.mark.slow
def test_unread_body_does_not_become_the_next_request(rest):
    """An error answered before the body is read: the HTTP parser (uvicorn's) still knows the
    body's length and skips it, so the body is never parsed as a request of its own, and the
    connection serves the next request. (The hand-written server closed the connection instead.)"""
    smuggled = b"GET /v2/models/stats HTTP/1.1\r\nHost: x\r\n\r\n"
    follow = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for head in (b"POST /v2/health/live HTTP/1.1", b"POST /v2/nowhere HTTP/1.1", b"GET /v2/health/live HTTP/1.1"):
        request = head + b"\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
        first, then = _exchange_then(rest.http_port, request, follow)
        assert first.count(b"HTTP/1.1 ") == 1 and b"model_stats" not in first, first
        assert then.startswith(b"HTTP/1.1 200") and then.count(b"HTTP/1.1 ") == 1, then  # the follow-up, only
        assert b'{"live":true}' in then and b"model_stats" not in then, then
    # unknown methods are the app's 405, as JSON
    first, _ = _exchange_then(rest.http_port, b"PATCH /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405") and b'{"error":' in first, first


# Framing two parsers could read differently: refused by the HTTP parser (uvicorn + httptools) with
# its own plain-text 400 and the connection closed, so nothing that follows is read as a request.
# (The hand-written server answered these with a JSON 400 of its own.)
AMBIGUOUS = [
    b"Content-Length: 2\r\nContent-Length: 40",  # repeated
    b"Content-Length: +2",  # signed
    b"Content-Length : 2",  # space before the colon
    b"bogus\r\nContent-Length: 2",  # a line without a colon
    b"Transfer-Encoding : chunked",
    b"Content-Length: 2\r\nTransfer-Encoding: chunked",  # both
]


@pytest.mark.parametrize("headers", AMBIGUOUS, ids=[h.decode().replace("\r\n", " | ") for h in AMBIGUOUS])
def test_ambiguous_framing_refused_by_the_parser(rest, headers):
    smuggled = b"GET /v2/models/stats HTTP/1.1\r\nHost: x\r\n\r\n"
    request = b"POST /v2/models/bi/infer HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n\r\n{}" + smuggled
    reply = _raw_exchange(rest.http_port, request)
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1 ") == 1, reply
    assert b"connection: close" in reply.lower() and b"<timeout>" not in reply, reply
    assert _json(rest.http_port, "GET", "/v2/health/ready")[0] == 200  # still serving


def test_chunked_upload_needs_a_length(rest):
    """A well-formed chunked body is framed by the parser; the app takes only bodies with a
    Content-Length (admission checks the size before reading): 411, connection closed."""
    request = (b"POST /v2/models/bi/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\n{}\r\n0\r\n\r\n")  # fmt: skip
    reply = _raw_exchange(rest.http_port, request)
    assert reply.startswith(b"HTTP/1.1 411") and b"chunked uploads are not accepted" in reply, reply
    assert reply.count(b"HTTP/1.1 ") == 1 and b"<timeout>" not in reply, reply


@pytest.mark.slow
def test_rest_headers_405_401(repo):
    srv = _start(repo, auth_tokens="t0k")
    try:
        status, headers, _ = _call(srv.http_port, "DELETE", "/v2/health/live")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, headers, _ = _call(srv.http_port, "GET", "/v2/models/bi")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_repository_over_rest(repo):
    srv = _start(repo, model_control_mode="explicit")
    port = srv.http_port
    try:
        assert _json(port, "POST", "/v2/repository/models/uni/unload", b"") == (200, {})
        assert _json(port, "GET", "/v2/models/uni/ready")[0] == 503
        status, index = _json(port, "POST", "/v2/repository/index", {"ready": True})
        assert status == 200 and "uni" not in {m["name"] for m in index} and "bi" in {m["name"] for m in index}
        assert _json(port, "POST", "/v2/repository/models/uni/load", b"") == (200, {})
        assert _json(port, "GET", "/v2/models/uni/ready") == (200, {"name": "uni", "ready": True})
        body = {"inputs": [X6]}
        assert _json(port, "POST", "/v2/models/bi/infer", body)[0] == 200
        status, stats = _json(port, "GET", "/v2/models/stats")
        assert status == 200 and "bi" in {m["name"] for m in stats["model_stats"]}
        status, stats = _json(port, "GET", "/v2/models/bi/versions/1/stats")
        assert status == 200 and stats["model_stats"][0]["inference_stats"]["success"]["count"] == 1
        assert isinstance(stats["model_stats"][0]["inference_stats"]["success"]["ns"], int)  # a number, not "0"
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_drain_waits_for_rest_replies_being_written(repo):
    """A reply still being serialized/written when the drain starts is finished, not cut short."""
    import threading

    srv = _start(repo)
    port = srv.http_port
    x = np.zeros((1, 120_000, 6), np.float32)
    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    result = {}

    def call():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request(
            "POST", "/v2/models/bi/infer", head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}
        )
        resp = conn.getresponse()
        result["status"], result["body"] = resp.status, resp.read()  # JSON outputs: ~2M floats to print
        conn.close()

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 30
    while srv.admission.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert srv.admission.in_flight == 1, "the request never started"
    srv.stop(30)
    t.join(60)
    assert result["status"] == 200
    outputs = json.loads(result["body"])["outputs"]
    assert [o["name"] for o in outputs] == ["y", "h_n", "c_n"] and len(outputs[0]["data"]) == 120_000 * 16


@pytest.mark.slow
def test_oversize_body_refused_before_reading(repo):
    srv = _start(repo, max_message_mb=1)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
        conn.putrequest("POST", "/v2/models/bi/infer")
        conn.putheader("Content-Length", str(2 << 20))
        conn.endheaders()  # no body sent: the server must answer from the header alone
        resp = conn.getresponse()
        assert (
            resp.status == 413
            and "exceeds the maximum allowed value of 1048576 bytes" in json.loads(resp.read())["error"]
        )
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
        conn.putrequest("POST", "/v2/models/bi/infer")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 411 and "Content-Length header required" in json.loads(resp.read())["error"]
        conn.close()
    finally:
        srv.stop(1)


def test_same_statistics_as_grpc(rest):
    """A REST inference is counted by the data plane like a gRPC one (ModelStatistics over gRPC)."""
    from server.client import LSTMClient
    from server.proto import grpc_service_pb2 as pb

    x = np.ones((2, 4, 6), np.float32)
    with LSTMClient(f"127.0.0.1:{rest.port}") as c:
        before = c.stub.ModelStatistics(pb.ModelStatisticsRequest(name="bi")).model_stats[0].inference_count
        body = {"inputs": [{"name": "x", "shape": [2, 4, 6], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
        assert _json(rest.http_port, "POST", "/v2/models/bi/infer", body)[0] == 200
        after = c.stub.ModelStatistics(pb.ModelStatisticsRequest(name="bi")).model_stats[0].inference_count
    assert after == before + 2  # two sequences


def test_tritonclient_http(rest, encoders, tmp_path):
    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    x, lengths = ragged(np.random.default_rng(33), 4, 10, 6)
    np.savez(tmp_path / "in.npz", x=x, lengths=lengths)
    res = subprocess.run(
        [TRITON_PYTHON, str(HERE / "tritonclient_http_check.py"), f"127.0.0.1:{rest.http_port}", "bi",
         str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["server"]["name"] == "lstm-serve" and report["id"] == "r1"
    assert report["metadata"]["inputs"][0]["shape"] == [-1, -1, 6]
    assert report["config"]["input"][1] == {
        "name": "lengths", "data_type": "TYPE_INT64", "format": "FORMAT_NONE", "dims": [-1], "optional": True,
        "is_shape_tensor": False, "allow_ragged_batch": False, "is_non_linear_format_io": False,
    }  # fmt: skip
    assert report["config"]["max_batch_size"] == 0  # defaults are written, as Triton does
    assert report["stats"]["model_stats"][0]["inference_count"] >= 8  # 4 sequences, twice
    assert {m["name"] for m in report["index"]} >= {"bi", "uni"}
    assert "dim 2 must be 6" in report["error"], report["error"]
    want = reference(encoders["bi"], x, lengths)
    got = np.load(tmp_path / "out.npz")
    for form in ("bin", "json"):
        for name in ("y", "h_n", "c_n"):
            assert np.abs(got[f"{form}_{name}"] - want[name]).max() <= TOL, (form, name)
    for name in ("y", "h_n", "c_n"):  # JSON numbers carry float32 exactly
        assert np.array_equal(got[f"bin_{name}"], got[f"json_{name}"]), name


@pytest.mark.slow
def test_rest_tls_and_tokens(repo, pki):  # noqa: F811
    srv = _start(repo, tls_cert=str(pki["server_path"]), tls_key=str(pki["server_key_path"]),
                 tls_client_ca=str(pki["ca_path"]), auth_tokens="rest-token")  # fmt: skip
    try:
        ctx = ssl.create_default_context(cafile=str(pki["ca_path"]))
        ctx.load_cert_chain(str(pki["client_path"]), str(pki["client_key_path"]))
        port = srv.http_port
        assert _json(port, "GET", "/v2/health/ready", context=ctx, scheme="https") == (200, {"ready": True})
        status, body = _json(port, "GET", "/v2/models/bi", context=ctx, scheme="https")
        assert status == 401 and "missing 'Authorization: Bearer <token>'" in body["error"]
        bad = {"Authorization": "Bearer nope"}
        assert _json(port, "GET", "/v2/models/bi", headers=bad, context=ctx, scheme="https")[0] == 401
        good = {"Authorization": "Bearer rest-token"}
        assert _json(port, "GET", "/v2/models/bi", headers=good, context=ctx, scheme="https")[0] == 200
        anonymous = ssl.create_default_context(cafile=str(pki["ca_path"]))  # no client certificate
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _call(port, "GET", "/v2/health/ready", context=anonymous, scheme="https")
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            _call(port, "GET", "/v2/health/ready")  # plaintext to the TLS port
        assert _json(port, "GET", "/v2/health/live", context=ctx, scheme="https")[0] == 200  # still serving
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_drain_refuses_rest_inference(repo):
    srv = _start(repo)
    port = srv.http_port
    x = np.ones((1, 3, 6), np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 3, 6], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    assert _json(port, "POST", "/v2/models/bi/infer", body)[0] == 200
    srv.refuse_new_calls()
    try:
        assert _json(port, "GET", "/v2/health/ready") == (503, {"ready": False})
        status, reply = _json(port, "POST", "/v2/models/bi/infer", body)
        assert status == 503 and "shutting down" in reply["error"]
    finally:
        srv.stop(1)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _call(port, "GET", "/v2/health/live")  # the port is closed after stop


FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_dims = st.one_of(st.integers(-2, 7), st.sampled_from([0, 10**6, 2**31, 2**62]), _json_values)


@st.composite
def _bodies(draw):
    """Near-valid infer bodies (right keys, wrong values) and arbitrary JSON."""
    if draw(st.integers(0, 4)) == 0:
        return draw(_json_values)
    tensors = []
    for _ in range(draw(st.integers(0, 3))):
        t = {
            "name": draw(st.sampled_from(["x", "lengths", "h0", "", "zz"]) | _json_values),
            "shape": draw(st.lists(_dims, max_size=4) | _json_values),
            "datatype": draw(st.sampled_from(["FP32", "INT64", "FP64", "BOOL", "BYTES", "fp32"]) | _json_values),
        }
        if draw(st.booleans()):
            t["data"] = draw(st.lists(st.floats(allow_nan=True, width=32) | _json_values, max_size=40))
        else:
            t["parameters"] = {"binary_data_size": draw(st.integers(-4, 64) | _json_values)}
        tensors.append(t)
    body = {"inputs": tensors}
    if draw(st.booleans()):
        body["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "h_n", "q"])}), max_size=2)
        )
    if draw(st.booleans()):
        body["parameters"] = draw(st.dictionaries(st.sampled_from(["sequence_id", "binary_data_output", "k"]),
                                                  _json_values, max_size=2))  # fmt: skip
    return body


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies(), model=st.sampled_from(["bi", "uni", "suni", "nope"]), tail=st.binary(max_size=64))
@pytest.mark.slow
def test_fuzzed_rest_bodies_get_a_clear_status(rest, body, model, tail):
    head = json.dumps(body).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))} if tail else {}
    status, _, raw = _call(rest.http_port, "POST", f"/v2/models/{model}/infer", head + tail, headers)
    assert status in (200, 400, 404, 413, 429, 503), (status, raw)
    reply = json.loads(raw)
    assert status == 200 or (isinstance(reply.get("error"), str) and reply["error"]), reply


def test_stateful_sequence_over_rest(rest, stateful_encoders):
    """sequence_id/start/end as request parameters: chunks sent over REST equal the whole run."""
    enc = stateful_encoders["suni"]
    rng = np.random.default_rng(41)
    signal_ = rng.standard_normal((23, 5)).astype(np.float32)
    want = reference(enc, signal_[None], np.array([23]))
    ys = []
    for a, b, start, end in [(0, 9, True, False), (9, 17, False, False), (17, 23, False, True)]:
        chunk = signal_[None, a:b]
        body = {
            "inputs": [{"name": "x", "shape": list(chunk.shape), "datatype": "FP32", "data": chunk.tolist()}],
            "parameters": {"sequence_id": 4242, "sequence_start": start, "sequence_end": end},
        }
        status, reply = _json(rest.http_port, "POST", "/v2/models/suni/infer", body)
        assert status == 200, reply
        ys.append(_arrays(reply)["y"][0])
    got = _arrays(reply)
    assert np.abs(np.concatenate(ys) - want["y"][0]).max() <= TOL
    assert np.abs(got["h_n"] - want["h_n"]).max() <= TOL and np.abs(got["c_n"] - want["c_n"]).max() <= TOL
    body["parameters"] = {"sequence_id": 4242}  # ended: the id is gone
    status, reply = _json(rest.http_port, "POST", "/v2/models/suni/infer", body)
    assert status in (400, 404) and "4242" in reply["error"], reply


def test_header_syntax_cannot_smuggle(rest):
    """Header lines parsers disagree on: the parser refuses them (400, connection closed) or, for
    obsolete line folding, reads the folded line as part of the previous header's value; either
    way one answer, and the bytes after the headers are never a second request."""
    smuggled = b"GET /v2/models/stats HTTP/1.1\r\nHost: x\r\n\r\n"
    n = len(smuggled)
    for bad in (b"Content-Length : %d" % n, b"bogus\r\nContent-Length: %d" % n, b"Transfer-Encoding : chunked",
                b"X-A: 1\r\n folded\r\nContent-Length: %d" % n):  # fmt: skip
        reply = _raw_exchange(
            rest.http_port,
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + bad + b"\r\n\r\n" + smuggled,
        )
        assert reply.count(b"HTTP/1.1 ") == 1 and b"model_stats" not in reply, reply


def _recv_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_truncated_and_stalled_bodies(repo):
    """A body is admitted (size checked, request slot taken) before it is read: stalled uploads
    hold slots (then 429 for inference), never health; a stall is answered 408 and the slot freed.
    A body cut short by the peer is never run. (The hand-written server read bodies before taking a
    slot, so stalled uploads held memory instead, and answered a half-closed upload 400.)"""
    import socket

    srv = _start(repo, grpc_workers=1, max_queue=1)  # 2 request slots
    srv.rest.app.body_idle_s = 1.0
    port = srv.http_port
    try:
        body = json.dumps({"inputs": [X6]}).encode()
        before = _json(port, "GET", "/v2/models/bi/stats")[1]["model_stats"][0]["inference_stats"]
        # the peer half-closes after fewer bytes than announced: never run, no answer, closed
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /v2/models/bi/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + body)
            sock.shutdown(socket.SHUT_WR)
            assert _recv_all(sock) == b""
        after = _json(port, "GET", "/v2/models/bi/stats")[1]["model_stats"][0]["inference_stats"]
        assert after == before
        # two stalled uploads take both slots: inference 429, health still answers
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        for sock in stalled:
            sock.sendall(b"POST /v2/models/bi/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)
        assert _json(port, "GET", "/v2/health/ready") == (200, {"ready": True})
        status, reply = _json(port, "POST", "/v2/models/bi/infer", {"inputs": [X6]})
        assert status == 429 and "2 HTTP requests in progress" in reply["error"], reply
        for sock in stalled:  # after the stall timeout: 408, connection closed, slot free again
            reply = _recv_all(sock)
            assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower(), reply
            assert b"1 of 100 bytes received" in reply, reply
            sock.close()
        assert _json(port, "POST", "/v2/models/bi/infer", {"inputs": [X6]})[0] == 200
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_expect_100_refused_early(repo):
    srv = _start(repo, auth_tokens="t0k")
    try:
        reply = _raw_exchange(
            srv.http_port,
            b"POST /v2/models/bi/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 401") and b"100 Continue" not in reply, reply
        headers = {"Authorization": "bearer t0k"}  # the scheme is case-insensitive
        assert _json(srv.http_port, "GET", "/v2/models/bi", headers=headers)[0] == 200
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_rest_odds_and_ends(repo):
    """Review findings: unsigned 64-bit sequence ids, bodyless repository POSTs, load overrides,
    zero statistics for models that never ran, rank limit (gRPC too), non-string ids."""
    srv = _start(repo)
    port = srv.http_port
    try:
        x = np.ones((1, 2, 5), np.float32).tolist()
        body = {"inputs": [{"name": "x", "shape": [1, 2, 5], "datatype": "FP32", "data": x}],
                "parameters": {"sequence_id": 2**64 - 1, "sequence_start": True, "sequence_end": True}}  # fmt: skip
        assert _json(port, "POST", "/v2/models/suni/infer", body)[0] == 200
        status, _, raw = _call(port, "POST", "/v2/repository/index")  # no body, no Content-Length
        assert status == 200 and {"bi", "uni"} <= {m["name"] for m in json.loads(raw)}
        # a config override is read (see test_dropin), but this server's control mode refuses loads
        status, reply = _json(port, "POST", "/v2/repository/models/bi/load", {"parameters": {"config": "{}"}})
        assert status == 503 and "explicit model load / unload is not allowed" in reply["error"]
        status, stats = _json(port, "GET", "/v2/models/uni/stats")
        assert status == 200 and stats["model_stats"][0]["name"] == "uni"
        assert stats["model_stats"][0]["inference_count"] == 0
        status, reply = _json(port, "POST", "/v2/models/bi/infer", {"id": 7, "inputs": [X6]})
        assert status == 400 and "'id' must be a string" in reply["error"]
        deep = {"inputs": [{"name": "x", "shape": [1] * 70, "datatype": "FP32", "data": [1.0]}]}
        status, reply = _json(port, "POST", "/v2/models/bi/infer", deep)
        assert status == 400 and "70 dimensions; at most 16" in reply["error"]
        from server.client import LSTMClient

        with LSTMClient(f"127.0.0.1:{srv.port}") as client:
            request = client.request("bi", np.ones((1, 1, 6), np.float32))
            request.inputs[0].ClearField("shape")
            request.inputs[0].shape.extend([1] * 70)
            with pytest.raises(grpc.RpcError) as err:
                client.stub.ModelInfer(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 16" in err.value.details()
    finally:
        srv.stop(1)


def test_sequence_idle_must_be_finite():
    from server.config import Settings

    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="sequence_idle_s"):
            Settings(sequence_idle_s=bad)


def test_uvicorn_internals(rest):
    """What `server/rest_http.py` relies on inside uvicorn, beyond its public API: the methods
    `_HttpProtocol` overrides or calls, the state of a live connection it reads, and its
    `flow.resume_reading` replacement in place. A uvicorn release that renames any of them fails
    here, naming it (the behaviour built on them: tests/test_memory.py's head and pipelining tests)."""
    import socket

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from server.rest_http import _HttpProtocol

    methods = ("connection_made", "data_received", "on_message_begin", "on_url", "on_header", "on_headers_complete",
               "on_body", "on_message_complete", "on_response_complete", "pause_writing", "resume_writing",
               "connection_lost", "timeout_keep_alive_handler", "_unset_keepalive_if_required", "send_400_response",
               "_should_upgrade", "handle_websocket_upgrade", "_unsupported_upgrade_warning")  # fmt: skip
    missing = [f"HttpToolsProtocol.{m}" for m in methods if not callable(getattr(HttpToolsProtocol, m, None))]
    missing += [f"uvicorn.Server.{m}" for m in ("capture_signals", "serve") if not hasattr(uvicorn.Server, m)]
    assert issubclass(_HttpProtocol, HttpToolsProtocol)
    server = rest.rest._server
    for name in ("server_state", "servers", "started", "should_exit", "config"):
        if not hasattr(server, name):
            missing.append(f"uvicorn.Server().{name}")
    with socket.create_connection(("127.0.0.1", rest.http_port), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # a head still arriving: the connection stays
        deadline = time.monotonic() + 10
        while not server.server_state.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # the bytes parsed: on_message_begin has run
        protocol = next(iter(server.server_state.connections))
        assert isinstance(protocol, _HttpProtocol)
        for name in ("flow", "pipeline", "parser", "transport", "loop", "timeout_keep_alive", "timeout_keep_alive_task",
                     "url", "logger", "client"):  # fmt: skip
            if not hasattr(protocol, name):
                missing.append(f"HttpToolsProtocol().{name}")
        for name in ("pause_reading", "resume_reading"):
            if not callable(getattr(getattr(protocol, "flow", None), name, None)):
                missing.append(f"HttpToolsProtocol().flow.{name}")
        assert not missing, f"uvicorn {uvicorn.__version__} lacks what server/rest_http.py uses: {missing}"
        # the replacement is in place on this connection's flow control (the one its cycles share)
        assert protocol.flow.resume_reading.__name__ == "resume_unless_backlogged"
        sock.sendall(b"\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
