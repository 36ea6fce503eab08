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

import contextlib
import json
import logging
import math
import re
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import grpc
import numpy as np

from server.codec import DATATYPES, MAX_RANK, decode_outputs
from server.errors import InvalidArgument, NotFound, ServingError, Unavailable
from server.proto import grpc_service_pb2 as pb
from server.security import bearer_matches
from server.servicer import EXTENSIONS, SERVER_NAME, SERVER_VERSION, repository_index, statistics_response

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
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _param(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return pb.InferParameter(int64_param=value)
        if 2**63 <= value < 2**64:  # e.g. an unsigned 64-bit sequence_id, as gRPC's uint64_param
            return pb.InferParameter(uint64_param=value)
        raise InvalidArgument(f"parameter value {value}: integers must fit in 64 bits")
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


_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # numpy kind of the target -> JSON kinds accepted


def build_request(
    header: dict, binary: memoryview, model: str, version: str
) -> tuple[pb.ModelInferRequest, dict[str, bool], bool]:
    """JSON header (+ binary section) -> (ModelInferRequest, per-output binary choice, default)."""
    if not isinstance(header, dict):
        raise InvalidArgument("request body must be a JSON object with 'inputs'")
    unknown = sorted(set(header) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise InvalidArgument(f"unknown request field(s) {unknown}; expected id, parameters, inputs, outputs")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {request_id!r}")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    params = header.get("parameters") or {}
    binary_all = params.get("binary_data_output", False) if isinstance(params, dict) else False
    if not isinstance(binary_all, bool):
        raise InvalidArgument(f"request parameter 'binary_data_output' must be true or false, got {binary_all!r}")
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
        if len(shape) > MAX_RANK:
            raise InvalidArgument(f"input '{name}': {len(shape)} dimensions; at most {MAX_RANK} are accepted")
        if any(not 0 <= d < 2**63 for d in shape):
            raise InvalidArgument(f"input '{name}': every dimension of shape {shape} must be in 0..2^63-1")
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
                parsed = np.asarray(tensor["data"])
                # e.g. 1.9 for INT64 is refused, not truncated
                if parsed.size and parsed.dtype.kind not in _KINDS[dtype.kind]:
                    raise TypeError(f"got {parsed.dtype.kind!r}-kind values")
                with np.errstate(over="ignore", invalid="ignore"):  # FP32 overflow: inf, refused later
                    array = parsed.astype(dtype)
                if dtype.kind in "iu" and parsed.size and not np.array_equal(array, parsed):
                    raise OverflowError(f"values out of the {datatype} range")
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
    binary_outputs: dict[str, bool] = {}
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgument(f"outputs[{i}] must be an object with a string 'name'")
        oparams = out.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise InvalidArgument(f"output '{out['name']}': 'parameters' must be an object")
        oparams = dict(oparams)
        if "binary_data" in oparams:  # an explicit choice wins over binary_data_output
            choice = oparams.pop("binary_data")
            if not isinstance(choice, bool):
                raise InvalidArgument(f"output '{out['name']}': binary_data must be true or false, got {choice!r}")
            binary_outputs[out["name"]] = choice
        if "classification" in oparams:
            raise InvalidArgument(f"output '{out['name']}': the classification extension is not supported")
        request.outputs.add(name=out["name"])
        _json_params(request.outputs[-1].parameters, oparams, out["name"])
    return request, binary_outputs, binary_all


def response_body(
    response: pb.ModelInferResponse, binary_outputs: dict[str, bool], binary_all: bool
) -> tuple[bytes, int]:
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
        if binary_outputs.get(tensor.name, binary_all):
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


def _to_json(msg) -> dict:
    """A protobuf message as Triton's REST API writes it: every field, default values included,
    64-bit integers as numbers (protobuf's JSON would make them strings), enums by name."""
    out = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {
                k: _to_json(v) if value_field.message_type else _scalar(value_field, v) for k, v in value.items()
            }
        elif field.is_repeated:
            out[field.name] = [_to_json(v) if field.message_type else _scalar(field, v) for v in value]
        elif field.message_type is not None:
            if msg.HasField(field.name):
                out[field.name] = _to_json(value)
        elif field.containing_oneof is None or msg.HasField(field.name):
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field, value):
    return field.enum_type.values_by_number[value].name if field.enum_type is not None else value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    timeout = 60  # seconds a connection may sit idle (or stall mid-request) before it is closed
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

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, ...) as JSON too; the
        connection is closed, since what follows on it cannot be trusted."""
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def handle_expect_100(self) -> bool:
        """Say "100 Continue" only to a request whose body will be read: a refusal (framing,
        size, token) is answered at once and the connection closed, the body never sent."""
        self._consumed, self._length = False, 0
        try:
            self._length = self._framing()
            if self._length > self.frontend.max_body:
                raise HttpError(
                    413, f"request body of {self._length} bytes exceeds the limit of {self.frontend.max_body}"
                )
        except HttpError as exc:
            self.close_connection = True
            self._error(exc.status, exc.message, exc.headers)
            return False
        if not self._authorized():
            self.close_connection = True
            return False
        return super().handle_expect_100()

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", header_len: int = -1,
              headers: dict[str, str] | None = None) -> None:  # fmt: skip
        if not getattr(self, "_consumed", True) and getattr(self, "_length", 0) > 0:
            # a body left unread (an error before reading it, or one sent with a GET) would be
            # parsed as the next request on this connection: close it instead
            self.close_connection = True
        self.send_response(status)
        if self.close_connection:
            self.send_header("Connection", "close")
        if body or status != 200:
            self.send_header("Content-Type", content_type)
        if header_len >= 0:
            self.send_header(HEADER_LENGTH, str(header_len))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), headers=headers)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        tokens = self.frontend.tokens
        if not tokens or self.path.startswith("/v2/health/"):
            return True
        match = bearer_matches(self.headers.get("Authorization", ""), tokens)
        if not match:
            message = "invalid bearer token" if match is False else "missing 'Authorization: Bearer <token>' header"
            self._error(401, message, {"WWW-Authenticate": "Bearer"})
            return False
        return True

    def _framing(self) -> int:
        """The body's length from the headers, refusing any framing two parsers could read
        differently (request smuggling): Transfer-Encoding, repeated or non-digit Content-Length."""
        names_ok = all(_TOKEN.fullmatch(k) for k in self.headers.keys())
        values_ok = not any("\r" in v or "\n" in v for v in self.headers.values())
        if self.headers.defects or not names_ok or not values_ok:
            # "Content-Length : 5", a line without a colon (Python then drops the headers after it),
            # obsolete line folding: parsers disagree on these, so they are refused (RFC 9112)
            self.close_connection = True
            raise HttpError(400, "malformed header line(s); send 'Name: value' lines only")
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get_all("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(400, "Transfer-Encoding is not supported; send the body with a Content-Length")
        if len(lengths) > 1:
            self.close_connection = True
            raise HttpError(400, f"{len(lengths)} Content-Length headers; send one")
        if not lengths:
            return 0  # no body
        if not lengths[0].isascii() or not lengths[0].strip().isdigit():
            self.close_connection = True
            raise HttpError(400, f"Content-Length {lengths[0]!r} must be a non-negative integer")
        return int(lengths[0])

    def _body(self, limit: int, what: str = "request body", required: bool = True) -> bytes:
        n = self._length
        if n == 0 and not self.headers.get("Content-Length"):
            if not required:
                return b""
            raise HttpError(411, "Content-Length header required")
        if n > limit:
            hint = (
                "; send the tensors in binary (Inference-Header-Content-Length)"
                if limit < self.frontend.max_body
                else ""
            )
            raise HttpError(413, f"{what} of {n} bytes exceeds the limit of {limit} bytes{hint}")
        encoding = self.headers.get("Content-Encoding", "identity").lower()
        if encoding != "identity":
            raise HttpError(415, f"Content-Encoding {encoding!r} not supported; send the body uncompressed")
        body = self.rfile.read(n)
        self._consumed = True
        if len(body) != n:  # the peer closed early: never run a truncated request
            self.close_connection = True
            raise HttpError(400, f"request body ended after {len(body)} of {n} bytes (Content-Length)")
        return body

    def _route(self, method: str) -> None:
        self._consumed = False
        self._length = 0
        try:
            self._length = self._framing()
            if not self._authorized():
                return
            path = self.path.split("?", 1)[0].rstrip("/")
            parts = [unquote(p) for p in path.split("/")[1:]]
            if parts[:1] != ["v2"]:
                raise HttpError(404, f"no such endpoint {path!r}; the API is under /v2")
            self._dispatch(method, parts[1:])
        except (TimeoutError, ConnectionError, ssl.SSLError) as exc:
            # a stalled upload (read timeout) or a peer gone mid-request: its problem, not ours
            self.close_connection = True
            log.debug("HTTP %s %s from %s: %s", method, self.path, self.address_string(), exc)
            if isinstance(exc, TimeoutError):
                with contextlib.suppress(OSError):
                    self._error(408, f"request not received within {self.timeout} s")
        except HttpError as exc:
            self._error(exc.status, exc.message, exc.headers)
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
            return self._json(200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})
        if parts[0] == "repository":
            return self._repository(method, parts[1:])
        if parts == ["models", "stats"]:
            self._need(method, "GET")
            return self._json(200, _to_json(statistics_response(plane)))
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
            return self._json(200, _to_json(plane.model_config(model, version).config))
        if rest == ["stats"]:
            self._need(method, "GET")
            return self._json(200, _to_json(statistics_response(plane, model, version)))
        if rest == ["infer"]:
            self._need(method, "POST")
            return self._infer(model, version)
        raise HttpError(404, f"no such endpoint under model '{model}': {'/'.join(rest)}")

    def _repository(self, method: str, parts: list[str]) -> None:
        """Triton's model repository extension: index, load, unload (bodies: optional JSON)."""
        self._need(method, "POST")
        raw = self._body(self.frontend.max_json, required=False)  # Triton's curl examples send none
        try:
            options = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise HttpError(400, "request body must be a JSON object")
        plane = self.frontend.plane
        if parts == ["index"]:
            ready_only = options.get("ready", False)
            if not isinstance(ready_only, bool):
                raise HttpError(400, f"'ready' must be true or false, got {ready_only!r}")
            return self._json(200, _to_json(repository_index(plane, ready_only))["models"])
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            if options.get("parameters"):
                raise HttpError(400, "load/unload parameters (config override, files) are not supported")
            with self.frontend.slot(), self.frontend.admission.call():
                getattr(plane.repository, parts[2])(parts[1])
            return self._json(200, {})
        raise HttpError(404, f"no such endpoint /v2/repository/{'/'.join(parts)}")

    def _need(self, method: str, allowed: str) -> None:
        if method != allowed and not (allowed == "GET" and method == "HEAD"):
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise HttpError(405, f"{method} not allowed here; use {allowed}", {"Allow": allow})

    def _infer(self, model: str, version: str) -> None:
        frontend = self.frontend
        if len(self.headers.get_all(HEADER_LENGTH) or []) > 1:
            raise HttpError(400, f"more than one {HEADER_LENGTH} header")
        header_len = self.headers.get(HEADER_LENGTH)
        body = self._body(frontend.max_body if header_len is not None else frontend.max_json)
        if header_len is not None:
            if not header_len.isascii() or not header_len.strip().isdigit():
                raise HttpError(400, f"{HEADER_LENGTH} {header_len!r} must be a non-negative integer")
            n = int(header_len)
            if not 0 < n <= len(body):
                raise HttpError(400, f"{HEADER_LENGTH} {n} must be in 1..{len(body)} (the body length)")
            if n > frontend.max_json:
                raise HttpError(413, f"JSON header of {n} bytes exceeds the limit of {frontend.max_json} bytes")
            head_bytes, binary = body[:n], memoryview(body)[n:]
        else:
            head_bytes, binary = body, memoryview(b"")
        with frontend.slot():  # taken once the body is in: a slow upload holds no slot
            self._infer_body(model, version, head_bytes, binary)

    def _infer_body(self, model: str, version: str, head_bytes: bytes, binary: memoryview) -> None:
        frontend = self.frontend
        try:
            header = json.loads(head_bytes)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None
        try:
            request, binary_outputs, binary_all = build_request(header, binary, model, version)
        except (ValueError, UnicodeError, RecursionError) as exc:  # protobuf refusing a value
            raise HttpError(400, f"request not valid: {exc}") from None
        timeout = self.headers.get("Inference-Timeout-Ms")  # optional, like a gRPC deadline
        deadline = None
        if timeout is not None:
            try:
                ms = float(timeout)
            except ValueError:
                ms = math.nan
            if not math.isfinite(ms) or ms <= 0:
                raise HttpError(400, f"Inference-Timeout-Ms {timeout!r} must be a positive number of milliseconds")
            deadline = time.monotonic() + ms / 1000
        # Triton's `timeout` request parameter (µs; tritonclient sends it)
        timeout_us = _param_value(request.parameters["timeout"]) if "timeout" in request.parameters else None
        if isinstance(timeout_us, int) and not isinstance(timeout_us, bool) and timeout_us > 0:
            at = time.monotonic() + timeout_us / 1e6
            deadline = at if deadline is None else min(deadline, at)
        # admitted until the reply is written: a drain waits for it, so no reply is cut short
        with frontend.admission.call():
            response = frontend.plane.infer(request, deadline)
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
    max_connections = 2048  # open connections (one thread each) at most; RestServer sets it

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._open = 0
        self._open_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
        if full:  # refuse before a thread is spent on it
            if not isinstance(request, ssl.SSLSocket):
                body = json.dumps({"error": f"{self.max_connections} connections open: the limit; retry"}).encode()
                with contextlib.suppress(OSError):
                    request.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: application/json"
                        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1

    def handle_error(self, request, client_address) -> None:
        # failed TLS handshakes, peers that vanish mid-request: the client's problem, not ours
        log.debug("HTTP connection from %s ended with an error", client_address, exc_info=True)


class RestServer:
    """The HTTP/REST frontend: its own listening socket and threads, the shared data plane.

    `max_body` bounds a request body (binary tensors included); `max_json` the JSON part, which
    costs far more memory once parsed (a JSON float becomes a ~32-byte Python object: a 16 MB
    body was seen to raise the server's peak RSS by ~430 MB); `max_concurrent` requests are
    handled at once, more get 429 (the gRPC port's `maximum_concurrent_rpcs` counterpart)."""

    def __init__(self, plane, is_ready, admission, tokens: list[str], max_body: int, max_json: int = 32 << 20,
                 max_concurrent: int = 1056) -> None:  # fmt: skip
        self.plane, self.is_ready, self.admission = plane, is_ready, admission
        self.tokens = [t.encode() for t in tokens]
        self.max_body = max_body
        self.max_json = min(max_json, max_body)
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.max_concurrent = max_concurrent
        self._httpd: _Server | None = None
        self.port: int | None = None

    @contextlib.contextmanager
    def slot(self):
        if not self._slots.acquire(blocking=False):
            raise HttpError(429, f"{self.max_concurrent} HTTP requests in progress: the limit; retry later")
        try:
            yield
        finally:
            self._slots.release()

    def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        handler = type("Handler", (_Handler,), {"frontend": self})
        httpd = _Server((host, port), handler)
        httpd.max_connections = max(64, 2 * self.max_concurrent)
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
