"""Open Inference Protocol v2 over HTTP/REST (KServe's "v2" protocol), beside the gRPC endpoint.

Off unless `--http-port` is given (Triton listens on 8000). The same data plane answers: a JSON
request (or one in Triton's binary-tensor extension) becomes a ModelInferRequest for
DataPlane.infer, so validation, batching, stateful sequences, statistics, metrics and error
messages are the gRPC path's, and so are TLS, mutual TLS and bearer tokens (health stays open).

    GET  /v2/health/live | /v2/health/ready           200, or 503 when not ready/draining
    GET  /v2                                          server metadata
    GET  /v2/models/{m}[/versions/{v}]                model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready          200, or 400/404/503
    GET  /v2/models/{m}[/versions/{v}]/config         Triton's model configuration (JSON)
    POST /v2/models/{m}[/versions/{v}]/infer          inference

Errors are `{"error": "<message>"}` with the HTTP status of the gRPC code (INVALID_ARGUMENT 400,
UNAUTHENTICATED 401, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED
504, INTERNAL 500), plus 405, 411, 413 and 415 for HTTP-level mistakes.

Binary extension (what tritonclient.http sends by default): the request body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw little-endian tensor bytes of every
input that has `"parameters": {"binary_data_size": N}`, in input order. Outputs requested with
`"parameters": {"binary_data": true}` (or the request parameter `binary_data_output: true`) come
back the same way: JSON header, then their bytes, with the header's length in
`Inference-Header-Content-Length`.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import grpc
import numpy as np
from google.protobuf import json_format

from server.codec import DATATYPES, decode_outputs
from server.errors import InvalidArgument, NotFound, ServingError, Unavailable
from server.proto import grpc_service_pb2 as pb

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _param(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidArgument(f"parameter value {value}: integers must fit in 64 bits")
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise InvalidArgument(f"parameter value {value!r}: expected a bool, integer, number or string")


def _param_value(p: pb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _json_params(target, params, where: str) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where} 'parameters' must be an object, got {type(params).__name__}")
    for key, value in params.items():
        try:
            target[key].CopyFrom(_param(value))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where} parameter '{key}': {exc.message}") from None


def build_request(
    header: dict, binary: memoryview, model: str, version: str
) -> tuple[pb.ModelInferRequest, set[str], bool]:
    """JSON header (+ binary section) -> (ModelInferRequest, outputs wanted binary, all binary)."""
    if not isinstance(header, dict):
        raise InvalidArgument("request body must be a JSON object with 'inputs'")
    unknown = sorted(set(header) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise InvalidArgument(f"unknown request field(s) {unknown}; expected id, parameters, inputs, outputs")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(header.get("id", "")))
    params = header.get("parameters") or {}
    binary_all = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    _json_params(
        request.parameters,
        {k: v for k, v in params.items() if k != "binary_data_output"} if isinstance(params, dict) else params,
        "request",
    )
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"inputs[{i}]: 'name' must be a non-empty string")
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidArgument(f"input '{name}': datatype {datatype!r} unknown; expected one of {sorted(DATATYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"input '{name}': 'shape' must be a list of integers, got {shape!r}")
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input '{name}': shape {shape} has a negative dimension")
        dtype = DATATYPES[datatype][0]
        count = int(np.prod(shape, dtype=object)) if shape else 1
        tparams = tensor.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise InvalidArgument(f"input '{name}': 'parameters' must be an object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"input '{name}': binary_data_size must be an integer >= 0, got {size!r}")
            if "data" in tensor:
                raise InvalidArgument(f"input '{name}': give either 'data' or binary_data_size, not both")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{name}': binary_data_size {size} runs past the {len(binary)} binary bytes sent"
                )
            if size != count * dtype.itemsize:
                raise InvalidArgument(
                    f"input '{name}': binary_data_size {size} != {count} elements x {dtype.itemsize} bytes "
                    f"({datatype}, shape {shape})"
                )
            raw = bytes(binary[offset : offset + size])
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidArgument(f"input '{name}': 'data' missing (or binary_data_size for binary data)")
            try:
                array = np.asarray(tensor["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise InvalidArgument(
                    f"input '{name}': 'data' is not a (nested) list of {datatype} values: {exc}"
                ) from None
            if array.size != count:
                raise InvalidArgument(f"input '{name}': shape {shape} holds {count} elements, 'data' has {array.size}")
            raw = array.astype(dtype.newbyteorder("<"), copy=False).tobytes()
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        _json_params(request.inputs[-1].parameters, {k: v for k, v in tparams.items() if k != "binary_data_size"}, name)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} binary byte(s) after the last binary input")
    binary_outputs = set()
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgument(f"outputs[{i}] must be an object with a string 'name'")
        oparams = dict(out.get("parameters") or {})
        if oparams.pop("binary_data", False):
            binary_outputs.add(out["name"])
        if "classification" in oparams:
            raise InvalidArgument(f"output '{out['name']}': the classification extension is not supported")
        request.outputs.add(name=out["name"])
        _json_params(request.outputs[-1].parameters, oparams, out["name"])
    return request, binary_outputs, binary_all


def response_body(response: pb.ModelInferResponse, binary_outputs: set[str], binary_all: bool) -> tuple[bytes, int]:
    """ModelInferResponse -> (body, JSON header length or -1 when the body is plain JSON)."""
    arrays = decode_outputs(response)
    head = {"model_name": response.model_name, "model_version": response.model_version, "outputs": []}
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = {k: _param_value(v) for k, v in response.parameters.items()}
    blobs, fast = [], {}
    for i, tensor in enumerate(response.outputs):
        array = arrays[tensor.name]
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": [int(d) for d in tensor.shape]}
        if binary_all or tensor.name in binary_outputs:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype in (np.float32, np.float16) and array.size and np.isfinite(array).all():
            # "%.9g" round-trips every float32 exactly, 2.8x faster and 40 % shorter than
            # json.dumps' 17-digit repr of the float64 it would see (measured: 25,600 values)
            token = f"\x00data{i}\x00"
            fast[json.dumps(token)] = "[" + ",".join(["%.9g"] * array.size) % tuple(array.reshape(-1).tolist()) + "]"
            entry["data"] = token
        else:
            entry["data"] = array.reshape(-1).tolist()  # json.dumps: NaN/Infinity as Python writes them
        head["outputs"].append(entry)
    out = json.dumps(head, separators=(",", ":"))
    for token, data in fast.items():
        out = out.replace(token, data, 1)
    text = out.encode()
    if not blobs:
        return text, -1
    return b"".join([text, *blobs]), len(text)


_INT64_KEYS = {"dims", "max_sequence_idle_microseconds", "max_queue_delay_microseconds", "versions"}


def _numbers(obj):
    """Protobuf JSON writes 64-bit integers as strings; the REST API (like Triton's) wants numbers."""
    if isinstance(obj, dict):
        return {
            k: ([int(x) for x in v] if isinstance(v, list) else int(v)) if k in _INT64_KEYS else _numbers(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_numbers(x) for x in obj]
    return obj


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    timeout = 120  # seconds a connection may sit idle (or mid-request) before it is closed
    # headers and body go out as two writes: with Nagle on, a small body waits for the client's
    # delayed ACK (40 ms per call on Linux, measured here: 23 health calls/s)
    disable_nagle_algorithm = True
    server_version = "lstm-serve"
    sys_version = ""

    # set per server class by RestServer
    frontend: RestServer

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # in this thread, not in the accept loop

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt: str, *args) -> None:  # route to logging, quietly
        log.debug("%s - %s", self.address_string(), fmt % args)

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", header_len: int = -1):
        self.send_response(status)
        if body or status != 200:
            self.send_header("Content-Type", content_type)
        if header_len >= 0:
            self.send_header(HEADER_LENGTH, str(header_len))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _authorized(self) -> bool:
        tokens = self.frontend.tokens
        if not tokens or self.path.startswith("/v2/health/"):
            return True
        value = self.headers.get("Authorization", "")
        if not value.startswith("Bearer "):
            self._error(401, "missing 'Authorization: Bearer <token>' header")
            return False
        presented = value[len("Bearer ") :].encode()
        if not any([hmac.compare_digest(presented, t) for t in tokens]):
            self._error(401, "invalid bearer token")
            return False
        return True

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "Content-Length header required")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, f"Content-Length {length!r} is not an integer") from None
        if n < 0:
            raise HttpError(400, f"Content-Length {n} is negative")
        if n > self.frontend.max_body:
            raise HttpError(413, f"request body of {n} bytes exceeds the limit of {self.frontend.max_body} bytes")
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        if encoding != "identity":
            raise HttpError(415, f"Content-Encoding {encoding!r} not supported; send the body uncompressed")
        return self.rfile.read(n)

    def _route(self, method: str) -> None:
        try:
            if not self._authorized():
                return
            path = self.path.split("?", 1)[0].rstrip("/")
            parts = [unquote(p) for p in path.split("/")[1:]]
            if parts[:1] != ["v2"]:
                raise HttpError(404, f"no such endpoint {path!r}; the API is under /v2")
            self._dispatch(method, parts[1:])
        except HttpError as exc:
            if exc.status == 413:
                self.close_connection = True  # the unread body would be taken for the next request
            self._error(exc.status, exc.message)
        except ServingError as exc:
            self._error(HTTP_OF.get(exc.code, 500), exc.message)
        except Exception as exc:  # noqa: BLE001
            log.exception("unexpected error on %s %s", method, self.path)
            self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _dispatch(self, method: str, parts: list[str]) -> None:
        plane, ready = self.frontend.plane, self.frontend.is_ready
        if parts in (["health", "live"], ["health", "ready"]):
            self._need(method, "GET")
            ok = parts[1] == "live" or ready()
            return self._json(200 if ok else 503, {parts[1]: ok})
        if not parts:
            self._need(method, "GET")
            from server.servicer import EXTENSIONS, SERVER_NAME, SERVER_VERSION

            return self._json(200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})
        if parts[0] != "models" or len(parts) < 2:
            raise HttpError(404, f"no such endpoint /v2/{'/'.join(parts)}")
        model, rest, version = parts[1], parts[2:], ""
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise HttpError(404, "a version number must follow /versions/")
            version, rest = rest[1], rest[2:]
        if not rest:
            self._need(method, "GET")
            meta, _ = plane.model_metadata(model, version)
            tensors = lambda ts: [  # noqa: E731
                {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]} for t in ts
            ]
            return self._json(
                200,
                {
                    "name": meta.name,
                    "versions": list(meta.versions),
                    "platform": meta.platform,
                    "inputs": tensors(meta.inputs),
                    "outputs": tensors(meta.outputs),
                },
            )
        if rest == ["ready"]:
            self._need(method, "GET")
            try:
                plane.repository.get(model, version)
            except NotFound as exc:
                return self._error(404, exc.message)
            except Unavailable as exc:
                return self._error(503, exc.message)
            return self._json(200 if ready() else 503, {"name": model, "ready": ready()})
        if rest == ["config"]:
            self._need(method, "GET")
            config = plane.model_config(model, version).config
            return self._json(200, _numbers(json_format.MessageToDict(config, preserving_proto_field_name=True)))
        if rest == ["infer"]:
            self._need(method, "POST")
            return self._infer(model, version)
        raise HttpError(404, f"no such endpoint under model '{model}': {'/'.join(rest)}")

    def _need(self, method: str, allowed: str) -> None:
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            raise HttpError(405, f"{method} not allowed here; use {allowed}")

    def _infer(self, model: str, version: str) -> None:
        body = self._body()
        header_len = self.headers.get(HEADER_LENGTH)
        if header_len is not None:
            try:
                n = int(header_len)
            except ValueError:
                raise HttpError(400, f"{HEADER_LENGTH} {header_len!r} is not an integer") from None
            if not 0 < n <= len(body):
                raise HttpError(400, f"{HEADER_LENGTH} {n} must be in 1..{len(body)} (the body length)")
            head_bytes, binary = body[:n], memoryview(body)[n:]
        else:
            head_bytes, binary = body, memoryview(b"")
        try:
            header = json.loads(head_bytes)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None
        request, binary_outputs, binary_all = build_request(header, binary, model, version)
        timeout = self.headers.get("Inference-Timeout-Ms")  # optional, like a gRPC deadline
        deadline = None
        if timeout is not None:
            try:
                deadline = time.monotonic() + float(timeout) / 1000
            except ValueError:
                raise HttpError(400, f"Inference-Timeout-Ms {timeout!r} is not a number") from None
        with self.frontend.admission.call():
            response = self.frontend.plane.infer(request, deadline)
        payload, json_len = response_body(response, binary_outputs, binary_all)
        if json_len < 0:
            self._send(200, payload)
        else:
            self._send(200, payload, "application/octet-stream", json_len)

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:
        # failed TLS handshakes, peers that vanish mid-request: the client's problem, not ours
        log.debug("HTTP connection from %s ended with an error", client_address, exc_info=True)


class RestServer:
    """The HTTP/REST frontend: its own listening socket and threads, the shared data plane."""

    def __init__(self, plane, is_ready, admission, tokens: list[str], max_body: int) -> None:
        self.plane, self.is_ready, self.admission = plane, is_ready, admission
        self.tokens = [t.encode() for t in tokens]
        self.max_body = max_body
        self._httpd: _Server | None = None
        self.port: int | None = None

    def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        handler = type("Handler", (_Handler,), {"frontend": self})
        httpd = _Server((host, port), handler)
        if tls is not None:
            httpd.socket = tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._httpd, self.port = httpd, httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def tls_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """Server-side TLS for the REST port, from the same files as the gRPC port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
