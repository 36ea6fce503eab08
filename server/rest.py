"""Open Inference Protocol v2 over HTTP/REST (KServe's "v2" protocol), a peer of the gRPC frontend.

An ASGI app served by uvicorn (httptools parser) on the server's event loop. HTTP itself (framing,
keep-alive, pipelining, `Expect: 100-continue`, idle connections) is uvicorn's; this module maps
OIP v2 JSON and Triton's binary tensor extension to the data plane's numpy requests, and answers
what `server.handlers` answers. TLS, mutual TLS and bearer tokens as on the gRPC port (health open).

    GET  /v2/health/live | /v2/health/ready           200, or 503 when not ready/draining
    GET  /v2                                          server metadata
    GET  /v2/models/{m}[/versions/{v}]                model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready          200, or 404/503
    GET  /v2/models/{m}[/versions/{v}]/config         Triton's model configuration (JSON)
    GET  /v2/models/{m}[/versions/{v}]/stats, /v2/models/stats
    POST /v2/models/{m}[/versions/{v}]/infer          inference
    POST /v2/repository/index, /v2/repository/models/{m}/load|unload

Errors are `{"error": "<message>"}` with the HTTP status of the error's gRPC code
(`handlers.HTTP_STATUS`), plus 401, 405, 408, 411, 413 and 415 for HTTP-level mistakes; requests
the HTTP parser itself refuses get uvicorn's plain-text 400 and the connection is closed.

Admission before the body: a request's Content-Length is checked against the limit and a request
slot taken before a byte of its body is read (health checks take none); while the body arrives,
up to SPOOL_BYTES of it are held in memory, a larger body goes to an unlinked temporary file, so a
slow or stalled upload holds disk, not memory (and at most `max_spooled` bytes of disk in all).

Binary extension (what tritonclient.http sends by default): the request body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw little-endian tensor bytes of every
input that has `"parameters": {"binary_data_size": N}`, in input order. Outputs requested with
`"parameters": {"binary_data": true}` (or the request parameter `binary_data_output: true`) come
back the same way: JSON header, then their bytes, with the header's length in
`Inference-Header-Content-Length`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import socket
import tempfile
import time
from urllib.parse import unquote

import httptools
import numpy as np
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server import classification, describe, handlers
from server.codec import DATATYPES, MAX_RANK, Limits, check_bytes_count, check_shape
from server.dataplane import InferRequest, InferResponse
from server.dtypes import OBJECT, TRITON_TO_OIP, deserialize_bytes, oip_of, serialize_bytes, to_bytes_array
from server.errors import InvalidArgument, NotFound, StartupError, Unavailable, Unimplemented, clip
from server.gate import Gate, check_structure, refuse_shared_memory
from server.gate import client as gate_client
from server.gate import deadline as gate_deadline
from server.handlers import error_status
from server.memory import JSON_RESPONSE_FACTOR, call_cost
from server.security import bearer_matches, restricted_refusal
from server.shm import PARAMETERS as SHM_PARAMETERS
from server.shm import REGION as SHM_REGION
from server.shm import ShmCall, cuda_shared_memory, owner_of

log = logging.getLogger(__name__)
HEADER_LENGTH = "Inference-Header-Content-Length"
SPOOL_BYTES = 256 << 10  # bodies larger than this wait for their last byte in a temporary file
IDLE_S = 60  # an idle keep-alive connection, or one that never sends a request, is closed after this
HEADERS_S = 60  # a request's headers must be complete this long after its first byte
BODY_IDLE_S = 60.0  # a body that stops arriving for this long is answered 408 and its connection closed
MAX_URL = 8 << 10  # request line (uvicorn accumulates it): 414 beyond
MAX_HEADER = 8 << 10  # one header line, name and value: 431 beyond
MAX_HEAD = 64 << 10  # the whole request head: 431 beyond
HEAD_SLICE = 4 << 10  # a request head is fed to the parser this many bytes at a time
MAX_PIPELINED = 4  # requests parsed ahead of their answers on one connection (then not read)
DRAIN_BEFORE_CLOSE = 64 << 10  # an unread body up to this size is read before a closing answer (no RST)
LARGE = 256 << 10  # JSON parsing and encoding above this size run on an executor thread
# peak memory of parsing a JSON request and converting its data, per byte of JSON: measured 2.6x
# for float32 values as json.dumps writes them; short values ("0.5,") make more objects per byte
JSON_PARSE_FACTOR = 10


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Gone(Exception):
    """The client disconnected: nothing can be answered."""


def _check_param(value) -> str | None:
    """Why a JSON parameter value is not an OIP parameter (bool, 64-bit integer, number, string)."""
    if isinstance(value, bool | float | str):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else f"integers must fit in 64 bits, got {clip(value)}"
    return f"expected a bool, integer, number or string, got {type(value).__name__}"


def _params(params, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where} 'parameters' must be an object, got {type(params).__name__}")
    for key, value in params.items():
        problem = _check_param(value)
        if problem:
            raise InvalidArgument(f"{where} parameter {clip(key)}: {problem}")
    return dict(params)


_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # numpy kind of the target -> JSON kinds accepted


def build_request(
    header: dict,
    binary: memoryview,
    model: str,
    version: str,
    limits: Limits,
    shm: ShmCall | None = None,
    shm_off: str | None = None,
) -> tuple[InferRequest, dict[str, bool], bool]:
    """JSON header (+ binary section) -> (InferRequest, per-output binary choice, default choice).
    Binary tensors are zero-copy views of `binary`; shapes are checked before anything is built.
    With `shm` (the call's shared-memory side), tensors naming a region are read from it / have it
    checked for their output; without, shared-memory parameters are refused (`shm_off`: why)."""
    if not isinstance(header, dict):
        raise InvalidArgument("request body must be a JSON object with 'inputs'")
    unknown = sorted(set(header) - {"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
    if unknown:
        raise InvalidArgument(
            f"unknown request field(s) {clip(unknown)}; expected id, parameters, inputs, outputs (and model_name, "
            "model_version matching the URL)"
        )
    version = _body_model(header, model, version)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {clip(request_id)}")
    request_id.encode("utf-8")  # a lone surrogate (\ud800) fails here: UnicodeError -> 400
    params = _params(header.get("parameters"), "request")
    binary_all = params.pop("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise InvalidArgument(f"request parameter 'binary_data_output' must be true or false, got {clip(binary_all)}")
    request = InferRequest(model_name=model, model_version=version, id=request_id, parameters=params)
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
        if name in request.inputs:
            raise InvalidArgument(f"input {clip(name)} appears twice; each input name may appear once")
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidArgument(
                f"input {clip(name)}: datatype {clip(datatype)} unknown; expected one of {sorted(DATATYPES)}"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"input {clip(name)}: 'shape' must be a list of integers, got {clip(shape)}")
        if len(shape) <= MAX_RANK and any(not 0 <= d < 2**63 for d in shape):
            raise InvalidArgument(f"input {clip(name)}: every dimension of shape {clip(shape)} must be in 0..2^63-1")
        dtype = DATATYPES[datatype][0]
        check_shape(name, shape, limits, dtype.itemsize if dtype != OBJECT else 0)  # before anything is allocated
        count = math.prod(shape)
        tparams = _params(tensor.get("parameters"), f"input {clip(name)}")
        if shm is None:
            refuse_shared_memory(f"input {clip(name)}", tparams, shm_off)
        elif any(k in tparams for k in SHM_PARAMETERS):  # without a region: refused by read_input
            if "data" in tensor or "binary_data_size" in tparams:  # Triton's words
                raise InvalidArgument(
                    f"input {clip(name)}: Input must set only one of 'data', 'binary_data_size', 'shared_memory_region'"
                )
            request.inputs[name] = shm.read_input(name, datatype, shape, tparams)
            continue
        size = tparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"input {clip(name)}: binary_data_size must be an integer >= 0, got {clip(size)}")
            if "data" in tensor:
                raise InvalidArgument(f"input {clip(name)}: give either 'data' or binary_data_size, not both")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input {clip(name)}: binary_data_size {size} runs past the {len(binary)} binary bytes sent"
                )
            if dtype == OBJECT:  # length-prefixed strings, as in gRPC's raw contents
                check_bytes_count(name, count)
                try:
                    array = deserialize_bytes(binary[offset : offset + size], count, f"input {clip(name)}")
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
                array = array.reshape(shape)
            else:
                if size != count * dtype.itemsize:
                    raise InvalidArgument(
                        f"input {clip(name)}: binary_data_size {size} != {count} elements x {dtype.itemsize} bytes "
                        f"({datatype}, shape {shape})"
                    )
                array = np.frombuffer(binary, dtype.newbyteorder("<"), count, offset).reshape(shape)
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidArgument(f"input {clip(name)}: 'data' missing (or binary_data_size for binary data)")
            if dtype == OBJECT:
                check_bytes_count(name, count)
                request.inputs[name] = _json_strings(name, tensor["data"], shape, count)
                continue
            array = _json_numbers(name, tensor["data"], datatype, dtype)
            if array.size != count:
                raise InvalidArgument(
                    f"input {clip(name)}: shape {shape} holds {count} elements, 'data' has {array.size}"
                )
            array = array.reshape(shape)
        request.inputs[name] = array
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} binary byte(s) after the last binary input")
    binary_outputs: dict[str, bool] = {}
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgument(f"outputs[{i}] must be an object with a string 'name'")
        if out["name"] in request.outputs:  # Triton's words
            raise InvalidArgument(f"output {clip(out['name'])} already exists in request")
        oparams = _params(out.get("parameters"), f"output {clip(out['name'])}")
        if shm is None:
            refuse_shared_memory(f"output {clip(out['name'])}", oparams, shm_off)
        elif any(k in oparams for k in SHM_PARAMETERS):  # without a region: refused by add_output
            for other in ("classification", "binary_data") if SHM_REGION in oparams else ():  # Triton's words
                if other in oparams and (other != "binary_data" or oparams[other] is True):
                    raise InvalidArgument(f"Output can't set both 'shared_memory_region' and '{other}'")
            shm.add_output(out["name"], oparams)
        if "binary_data" in oparams:  # an explicit choice wins over binary_data_output
            choice = oparams.pop("binary_data")
            if not isinstance(choice, bool):
                raise InvalidArgument(
                    f"output {clip(out['name'])}: binary_data must be true or false, got {clip(choice)}"
                )
            binary_outputs[out["name"]] = choice
        classification.class_count(out["name"], oparams)
        request.outputs.append(out["name"])
        if oparams:
            request.output_parameters[out["name"]] = oparams
    return request, binary_outputs, binary_all


def _body_model(header: dict, model: str, version: str) -> str:
    """KServe's SDK repeats the model (and version) in the body: accepted when they agree with the
    URL; a body version names the version when the URL has none. Returns the version to run."""
    name = header.get("model_name")
    if name is not None and name != model:
        raise InvalidArgument(
            f"request body 'model_name' {clip(name)} contradicts the URL's model {clip(model)}; leave it out or "
            "make it match"
        )
    body_version = header.get("model_version")
    if body_version is None or body_version == "":
        return version
    if not isinstance(body_version, str):
        raise InvalidArgument(f"request body 'model_version' must be a string, got {clip(body_version)}")
    if version and body_version != version:
        raise InvalidArgument(
            f"request body 'model_version' {clip(body_version)} contradicts the URL's version {clip(version)}; "
            "leave it out or make it match"
        )
    return body_version


_KIND_WORDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integer numbers", "U": "strings"}
MAX_JSON_DEPTH = 100  # nesting of a tensor's 'data' (Triton's limit and words)


def _json_numbers(name: str, data, datatype: str, dtype: np.dtype) -> np.ndarray:
    """A numeric tensor's JSON 'data' (nested lists, any nesting that holds the right count) as a
    flat-or-nested numpy array of `dtype`; messages say what was wrong in this server's words."""
    depth, probe = 0, data
    while isinstance(probe, list) and probe:
        depth, probe = depth + 1, probe[0]
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument(
                f"input {clip(name)}: JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_DEPTH})"
            )
    if depth > 32:  # numpy takes at most 64 dimensions: flatten such (legal, if odd) nesting first
        flat, stack = [], [data]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            else:
                flat.append(item)
        data = flat
    expected = f"input {clip(name)}: 'data' must be a (nested) list of {datatype} values"
    try:
        parsed = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{expected} with lists of equal lengths at each level") from None
    if parsed.size and parsed.dtype.kind not in _KINDS[dtype.kind]:  # e.g. 1.9 for INT64: refused, not cut
        got = _KIND_WORDS.get(parsed.dtype.kind, "mixed or non-numeric values (or integers past 64 bits)")
        raise InvalidArgument(f"{expected}, got {got}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # FP32 overflow: inf, refused later
            array = parsed.astype(dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"{expected}; some are out of its range") from None
    if dtype.kind in "iu" and parsed.size and not np.array_equal(array, parsed):
        raise InvalidArgument(f"{expected}; some are out of the {datatype} range")
    return array


def _json_strings(name: str, data, shape: list[int], count: int) -> np.ndarray:
    """BYTES 'data' in JSON: a (nested) list of strings (UTF-8 encoded), as Triton's REST API."""
    flat: list = []
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidArgument(
                    f"input {clip(name)}: JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_DEPTH})"
                )
            stack.extend((x, depth + 1) for x in reversed(item))
        elif isinstance(item, str):
            flat.append(item.encode("utf-8"))
        else:
            raise InvalidArgument(f"input {clip(name)}: BYTES 'data' must be a (nested) list of strings, got "
                                  f"{clip(item)}")  # fmt: skip
        if len(flat) > count:
            break
    if len(flat) != count:
        raise InvalidArgument(f"input {clip(name)}: shape {shape} holds {count} elements, 'data' has {len(flat)}")
    array = np.empty(count, OBJECT)
    array[:] = flat
    return array.reshape(shape)


def response_body(response: InferResponse, binary_outputs: dict[str, bool], binary_all: bool,
                  in_shm=()) -> tuple[bytes, int]:  # fmt: skip
    """InferResponse -> (body, JSON header length or -1 when the body is plain JSON). Outputs in
    `in_shm` were written to shared memory: described by name, datatype and shape only."""
    head = {"model_name": response.model_name, "model_version": response.model_version, "outputs": []}
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = dict(response.parameters)
    blobs, fast = [], {}
    for i, (name, array) in enumerate(response.outputs.items()):
        datatype = oip_of(array.dtype) or str(array.dtype)
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in in_shm:
            pass
        elif binary_outputs.get(name, binary_all):
            if datatype == "BYTES":
                blob = serialize_bytes(array)
            else:
                blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype in (np.float32, np.float16) and array.size and np.isfinite(array).all():
            # "%.9g" round-trips every float32 exactly, 2.8x faster and 40 % shorter than
            # json.dumps' 17-digit repr of the float64 it would see (measured: 25,600 values)
            token = f"\x00data{i}\x00"
            fast[json.dumps(token)] = "[" + ",".join(["%.9g"] * array.size) % tuple(array.reshape(-1).tolist()) + "]"
            entry["data"] = token
        elif datatype == "BYTES":  # strings as text (bytes that are not UTF-8: use binary_data)
            entry["data"] = [v.decode("utf-8", "replace") for v in to_bytes_array(array).reshape(-1).tolist()]
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


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Exchange:
    """One request and its answer, on the ASGI interface."""

    def __init__(self, app: RestApp, scope, receive, send) -> None:
        self.app, self.receive, self.send = app, receive, send
        self.method = scope["method"]
        self.peer = scope.get("client")  # (host, port)
        self.raw_path = scope.get("raw_path") or scope["path"].encode()
        self.headers: dict[str, list[str]] = {}
        for key, value in scope["headers"]:
            self.headers.setdefault(key.decode("latin-1"), []).append(value.decode("latin-1"))
        length = self.headers.get("content-length")
        self.length = int(length[0]) if length else None  # the parser accepts exactly one, digits only
        self.chunked = "transfer-encoding" in self.headers
        self.expects_continue = any(v.lower() == "100-continue" for v in self.headers.get("expect", ()))
        self.body_read = False
        self.started = False
        self.close = False

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        if values and len(values) > 1:
            raise HttpError(400, f"more than one {name} header")
        return values[0] if values else None

    async def body(self, limit: int, required: bool = True) -> bytes:
        """The whole body, after its length was checked against `limit`; a stall of BODY_IDLE_S is
        answered 408. Up to SPOOL_BYTES in memory, larger bodies in a temporary file until complete."""
        length = self.length
        if length is None:
            if self.chunked:
                self.close = True
                raise HttpError(411, "Content-Length required: chunked uploads are not accepted")
            if required:
                raise HttpError(411, "Content-Length header required")
            return b""
        if length > limit:
            hint = "; send the tensors in binary (Inference-Header-Content-Length)" if limit < self.app.max_body else ""
            raise HttpError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes{hint}")
        encoding = (self.header("Content-Encoding") or "identity").lower()
        if encoding != "identity":
            raise HttpError(415, f"Content-Encoding {clip(encoding)} not supported; send the body uncompressed")
        spool = length > SPOOL_BYTES
        with self.app.spooling(length if spool else 0):
            sink = tempfile.TemporaryFile() if spool else bytearray()
            try:
                got = 0
                more = length > 0
                while more:
                    try:
                        message = await asyncio.wait_for(self.receive(), self.app.body_idle_s)
                    except asyncio.TimeoutError:
                        self.close = True
                        raise HttpError(
                            408,
                            f"request body stalled: {got} of {length} bytes received, none for "
                            f"{self.app.body_idle_s:g} s",
                        ) from None
                    if message["type"] == "http.disconnect":
                        raise _Gone()
                    chunk = message.get("body", b"")
                    got += len(chunk)
                    sink.write(chunk) if spool else sink.extend(chunk)
                    more = message.get("more_body", False)
                self.body_read = True
                if spool:
                    sink.seek(0)
                    return sink.read()
                return bytes(sink)
            finally:
                if spool:
                    sink.close()

    async def respond(self, status: int, body: bytes, content_type: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:  # fmt: skip
        out = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        out += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        if self.close or self.app.admission.refusing:  # a drain: clients move off this connection
            out.append((b"connection", b"close"))
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": out})
        if len(body) <= DRAIN_BEFORE_CLOSE:
            await self.send({"type": "http.response.body", "body": body})
            return
        await self.send({"type": "http.response.body", "body": body, "more_body": True})
        # the closing (empty) part waits until the socket has taken the reply (uvicorn drains a
        # paused transport first): a reply's memory stays held in the budget until then
        await self.send({"type": "http.response.body", "body": b""})

    async def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        if self.started:
            return
        unread = not self.body_read and bool(self.length)
        if unread and (self.length > DRAIN_BEFORE_CLOSE or self.expects_continue):
            self.close = True  # the client may still be sending (or waiting to send) a large body
        elif unread and (self.close or self.app.admission.refusing):
            # closing with unread bytes would reset the connection (RST) and could lose this answer
            with contextlib.suppress(Exception):
                await self.body(DRAIN_BEFORE_CLOSE)
        await self.respond(status, _dumps({"error": message}), headers=headers)


class RestApp:
    """The ASGI app: routes, admission, and OIP v2 <-> the data plane.

    `max_body` bounds a request body (binary tensors included); `max_json` the JSON part, which
    costs far more memory once parsed (a JSON float becomes a ~32-byte Python object); at most
    `max_concurrent` requests are handled at once (then 429; health never counts); at most
    `max_spooled` bytes of bodies wait in temporary files at once (then 429)."""

    def __init__(self, plane, is_ready, admission, tokens: list[str], max_body: int, max_json: int = 32 << 20,
                 max_concurrent: int = 1056, max_spooled: int | None = None, budget=None,
                 gate: Gate | None = None, restricted: dict | None = None) -> None:  # fmt: skip
        """`gate`: the server's call gate (`server.gate`), shared with the gRPC frontend; default: one
        of this app's own over `admission` and `budget`. `restricted`: admin-only protocol groups
        (`security.parse_restricted`)."""
        self.restricted = restricted or {}
        self.gate = gate or Gate(plane, admission, budget, bool(tokens))
        self.plane, self.is_ready, self.admission = plane, is_ready, self.gate.admission
        self.budget = self.gate.budget  # server.memory.MemoryBudget: what an inference call holds until sent
        self.tokens = [t.encode() for t in tokens]
        self.max_body = max_body
        self.max_json = min(max_json, max_body)
        self.max_concurrent = max_concurrent
        self.max_spooled = max_spooled if max_spooled is not None else max(4 * max_body, 1 << 30)
        self.body_idle_s = BODY_IDLE_S
        self.busy = 0
        self.spooled = 0

    @contextlib.contextmanager
    def slot(self):
        if self.busy >= self.max_concurrent:
            raise HttpError(429, f"{self.max_concurrent} HTTP requests in progress: the limit; retry later")
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    @contextlib.contextmanager
    def spooling(self, nbytes: int):
        if nbytes and self.spooled + nbytes > self.max_spooled:
            raise HttpError(429, f"{self.spooled} bytes of uploads in progress; a body of {nbytes} more would exceed "
                            f"{self.max_spooled}; retry later")  # fmt: skip
        self.spooled += nbytes
        try:
            yield
        finally:
            self.spooled -= nbytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        ex = _Exchange(self, scope, receive, send)
        try:
            await self._route(ex)
        except _Gone:
            log.debug("HTTP %s %s: the client went away", ex.method, clip(ex.raw_path))
        except HttpError as exc:
            await ex.error(exc.status, exc.message, exc.headers)
        except Exception as exc:  # noqa: BLE001 - mapped in one place; unexpected ones are logged there
            _, status, message = error_status(exc)
            await ex.error(status, message)

    async def _route(self, ex: _Exchange) -> None:
        path = ex.raw_path.decode("latin-1").split("?", 1)[0].rstrip("/")
        if self.tokens and not path.startswith("/v2/health/"):
            match = bearer_matches(ex.header("Authorization") or "", self.tokens)
            if not match:
                message = "invalid bearer token" if match is False else "missing 'Authorization: Bearer <token>' header"
                raise HttpError(401, message, {"WWW-Authenticate": "Bearer"})
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts[:1] != ["v2"]:
            raise HttpError(404, f"no such endpoint {clip(path)}; the API is under /v2")
        await self._dispatch(ex, parts[1:])

    @staticmethod
    def _need(ex: _Exchange, allowed: str) -> None:
        if ex.method != allowed and not (allowed == "GET" and ex.method == "HEAD"):
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise HttpError(405, f"{ex.method} not allowed here; use {allowed}", {"Allow": allow})

    async def _dispatch(self, ex: _Exchange, parts: list[str]) -> None:
        plane = self.plane
        if parts in (["health", "live"], ["health", "ready"]):  # never refused for capacity
            self._need(ex, "GET")
            ok = parts[1] == "live" or (self.is_ready() and plane.repository.is_ready())
            return await ex.respond(200 if ok else 503, _dumps({parts[1]: ok}))
        if not parts:
            self._need(ex, "GET")
            return await ex.respond(200, _dumps(describe.server_metadata(handlers.extensions(self.gate.shm_enabled))))
        if parts[0] == "repository":
            return await self._repository(ex, parts[1:])
        if parts[0] in ("systemsharedmemory", "cudasharedmemory"):
            return await self._shared_memory(ex, parts)
        if parts == ["models", "stats"]:
            self._need(ex, "GET")
            return await ex.respond(200, _dumps(describe.statistics(plane)))
        if parts[0] != "models" or len(parts) < 2:
            raise HttpError(404, f"no such endpoint /v2/{clip('/'.join(parts))}")
        model, rest, version = parts[1], parts[2:], ""
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise HttpError(404, "a version number must follow /versions/")
            version, rest = rest[1], rest[2:]
        if not rest:
            self._need(ex, "GET")
            meta, _ = describe.model_metadata(plane, model, version)
            return await ex.respond(200, _dumps(meta))
        if rest == ["ready"]:
            self._need(ex, "GET")
            try:
                ready = describe.model_ready(plane, model, version, self.is_ready())
            except NotFound as exc:
                raise HttpError(404, exc.message) from None
            except Unavailable as exc:
                raise HttpError(503, exc.message) from None
            return await ex.respond(200 if ready else 503, _dumps({"name": model, "ready": ready}))
        if rest == ["config"]:
            self._need(ex, "GET")
            return await ex.respond(200, _dumps(describe.model_config(plane, model, version)))
        if rest == ["stats"]:
            self._need(ex, "GET")
            return await ex.respond(200, _dumps(describe.statistics(plane, model, version)))
        if rest == ["infer"]:
            self._need(ex, "POST")
            return await self._infer(ex, model, version)
        raise HttpError(404, f"no such endpoint under model {clip(model)}: {clip('/'.join(rest))}")

    async def _repository(self, ex: _Exchange, parts: list[str]) -> None:
        """Triton's model repository extension: index, load, unload (bodies: optional JSON)."""
        self._need(ex, "POST")
        refusal = restricted_refusal(self.restricted, "model-repository", ex.header)
        if refusal is not None:
            raise HttpError(403, refusal)
        with self.slot():
            raw = await ex.body(self.max_json, required=False)  # Triton's curl examples send none
            try:
                options = json.loads(raw) if raw.strip() else {}
            except (ValueError, RecursionError) as exc:
                raise HttpError(400, _json_error(exc)) from None
            if not isinstance(options, dict):
                raise HttpError(400, "request body must be a JSON object")
            if parts == ["index"]:
                ready_only = options.get("ready", False)
                if not isinstance(ready_only, bool):
                    raise HttpError(400, f"Invalid value for 'ready': expected a boolean, got {clip(ready_only)}")
                return await ex.respond(200, _dumps(describe.repository_index(self.plane, ready_only)))
            if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
                params = _params(options.get("parameters"), parts[2])
                with self.admission.call():
                    if parts[2] == "load":
                        await handlers.load_model(self.plane, parts[1], params)
                    else:
                        await handlers.unload_model(self.plane, parts[1], params)
                return await ex.respond(200, b"{}")
        raise HttpError(404, f"no such endpoint /v2/repository/{clip('/'.join(parts))}")

    async def _shared_memory(self, ex: _Exchange, parts: list[str]) -> None:
        """Triton's shared-memory extension: `/v2/{system|cuda}sharedmemory[/region/<name>]/` then
        `status` (GET: a JSON list of regions), `register` (POST {"key", "offset", "byte_size"}) or
        `unregister` (POST); regions belong to the caller's token when tokens are on."""
        kind, rest = parts[0], parts[1:]
        name = ""
        if len(rest) == 3 and rest[0] == "region":
            name, rest = rest[1], rest[2:]
        if len(rest) != 1 or rest[0] not in ("status", "register", "unregister"):
            raise HttpError(404, f"no such endpoint /v2/{clip('/'.join(parts))}")
        action = rest[0]
        self._need(ex, "GET" if action == "status" else "POST")
        refusal = restricted_refusal(self.restricted, "shared-memory", ex.header)
        if refusal is not None:
            raise HttpError(403, refusal)
        with self.slot():
            options = {}
            if action == "register":
                raw = await ex.body(self.max_json, required=False)
                try:
                    options = json.loads(raw) if raw.strip() else {}
                except (ValueError, RecursionError) as exc:
                    raise HttpError(400, _json_error(exc)) from None
                if not isinstance(options, dict):
                    raise HttpError(400, "Shared memory register request must be a JSON object")
            if kind == "cudasharedmemory":
                rows = cuda_shared_memory(action, name)
                return await ex.respond(200, _dumps(rows) if action == "status" else b"")
            registry = self.gate.shm
            if registry is None:
                raise Unimplemented("system shared memory is not served here")
            owner = owner_of(ex.header("Authorization"), bool(self.tokens))
            if action == "status":
                return await ex.respond(200, _dumps(registry.status(name, owner)))
            if action == "unregister":
                registry.unregister(name, owner)
                return await ex.respond(200, b"")
            for field in ("key", "byte_size"):  # Triton's words
                if field not in options:
                    raise InvalidArgument(f"Shared memory register request has no '{field}' field")
            key, offset, size = options["key"], options.get("offset", 0), options["byte_size"]
            if not isinstance(key, str):
                raise InvalidArgument(f"Shared memory register request: 'key' must be a string, got {clip(key)}")
            registry.register(name, key, offset, size, owner)
            return await ex.respond(200, b"")

    async def _hold(self, request: InferRequest, body_bytes: int, binary_outputs: dict[str, bool],
                    binary_all: bool) -> _Held:  # fmt: skip
        """Reserve the call's memory in the budget (waiting within its deadline): its body, ORT's
        working memory and its response (JSON text: JSON_RESPONSE_FACTOR x the outputs' bytes)."""
        if self.budget is None:
            return _Held(None)
        rt = self.plane.repository.get(request.model_name, request.model_version)
        binary = all(binary_outputs.get(n, binary_all) for n in request.outputs) if request.outputs else binary_all
        cost = call_cost(rt, request.inputs, request.outputs, body_bytes, 1 if binary else JSON_RESPONSE_FACTOR)
        return _Held(await self.budget.hold(cost, request.client, request.deadline), cost.response)

    async def _infer(self, ex: _Exchange, model: str, version: str) -> None:
        header_len = ex.header(HEADER_LENGTH)
        n = None
        if header_len is not None:
            if not header_len.isascii() or not header_len.strip().isdigit():
                raise HttpError(400, f"{HEADER_LENGTH} {clip(header_len)} must be a non-negative integer")
            if len(header_len.strip()) > 20:  # int() refuses over 4,300 digits; no body is that long
                raise HttpError(400, f"{HEADER_LENGTH} has {len(header_len.strip())} digits: at most 20 are accepted")
            n = int(header_len)
        deadline = None
        timeout = ex.header("Inference-Timeout-Ms")  # optional, like a gRPC deadline
        if timeout is not None:
            try:
                ms = float(timeout)
            except ValueError:
                ms = math.nan
            if not math.isfinite(ms) or ms <= 0:
                raise HttpError(400, f"Inference-Timeout-Ms {clip(timeout)} must be a positive number of milliseconds")
            deadline = time.monotonic() + ms / 1000
        with self.slot():  # taken before the body is read: at most max_concurrent uploads at once
            if self.admission.refusing:
                raise Unavailable("server is shutting down and takes no new requests; retry (another replica)")
            body = await ex.body(self.max_body if n is not None else self.max_json)
            if n is not None:
                if not 0 <= n <= len(body):  # 0: Triton's raw binary request (the body is one input)
                    raise HttpError(400, f"{HEADER_LENGTH} {n} must be in 0..{len(body)} (the body length)")
                if n > self.max_json:
                    raise HttpError(413, f"JSON header of {n} bytes exceeds the limit of {self.max_json} bytes")
            else:
                n = len(body)
            loop = asyncio.get_running_loop()
            authorization = ex.header("Authorization")
            client = gate_client(f"{ex.peer[0]}:{ex.peer[1]}" if ex.peer else "",
                                 [authorization] if authorization else [], bool(self.tokens))  # fmt: skip
            shm = self.gate.shm_call(authorization)
            shm_off = self.gate.shm.disabled if self.gate.shm is not None else None
            parse = (_parse, body, n, model, version, self.plane.limits, self.plane, shm, shm_off)
            # parsed JSON is Python objects: up to JSON_PARSE_FACTOR x its text, held meanwhile; a request
            # naming shared memory reads it while parsed: off the event loop too (pread blocks)
            if n > LARGE or (shm is not None and body.find(SHM_REGION.encode(), 0, n) >= 0):
                with _Held(await self.budget.hold(JSON_PARSE_FACTOR * n, client, deadline) if self.budget else None):
                    request, binary_outputs, binary_all = await loop.run_in_executor(self.plane.executor, *parse)
            else:
                request, binary_outputs, binary_all = _parse(*parse[1:])
            gate = self.gate
            # admitted until the reply is written: a drain waits for it, so no reply is cut short
            with gate.call():
                rt = gate.model(request.model_name, request.model_version)
                check_structure(rt, len(request.inputs), len(request.outputs), len(request.parameters),
                                len(request.id))  # fmt: skip
                # the header and Triton's `timeout` request parameter (µs; tritonclient sends it)
                request.deadline = gate_deadline(deadline, request.parameters)
                request.client = client
                held = await self._hold(request, len(body), binary_outputs, binary_all)
                with held:
                    start = time.perf_counter_ns()
                    response = await self.plane.infer_async(request, gate.inline())
                    in_shm = set(shm.outputs) if shm is not None else set()
                    if in_shm:  # only after the run succeeded
                        await shm.write_async(response.outputs, self.plane.executor)
                    size = sum(a.nbytes for n, a in response.outputs.items() if n not in in_shm)
                    # the reply's encoded size, counted before it is built: outputs sized by input values
                    # (ConstantOfShape, Tile) are known only now
                    json_bytes = sum(a.nbytes for n, a in response.outputs.items()
                                     if not binary_outputs.get(n, binary_all) and n not in in_shm)  # fmt: skip
                    extra = JSON_RESPONSE_FACTOR * json_bytes + size - held.response
                    more = _Held(await self.budget.hold(extra, client, request.deadline)
                                 if self.budget is not None and extra > LARGE else None)  # fmt: skip
                    encode = (response_body, response, binary_outputs, binary_all, in_shm)
                    with more:
                        payload, json_len = (await loop.run_in_executor(self.plane.executor, *encode)
                                             if size > LARGE else encode[0](*encode[1:]))  # fmt: skip
                    try:
                        if json_len < 0:
                            await ex.respond(200, payload)
                        else:
                            await ex.respond(200, payload, "application/octet-stream", {HEADER_LENGTH: str(json_len)})
                    except Exception:  # counted OK by the data plane, never received
                        self.plane.record_send_failure(response, "CANCELLED", time.perf_counter_ns() - start)
                        raise
                    if _disconnected(ex):  # uvicorn drops what is sent after the client left
                        self.plane.record_send_failure(response, "CANCELLED", time.perf_counter_ns() - start)


def _disconnected(ex: _Exchange) -> bool:
    """Whether the exchange's client went away (uvicorn's request cycle says so; its `send` then
    drops the reply without an error)."""
    return bool(getattr(getattr(ex.send, "__self__", None), "disconnected", False))


class _Held(contextlib.AbstractContextManager):
    """A memory hold as a context manager: released on exit, however the exchange ends."""

    def __init__(self, hold, response: int = 0) -> None:
        self.hold = hold
        self.response = response  # bytes of it counted for the reply

    def __exit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.release()


def _parse(body: bytes, n: int, model: str, version: str, limits: Limits, plane=None, shm: ShmCall | None = None,
           shm_off: str | None = None):  # fmt: skip
    """Body -> (InferRequest, binary outputs, binary default); the first `n` bytes are the JSON.
    `n` 0: Triton's raw binary request, the body is the one input's bytes (`plane` gives the
    model's configuration, from which its shape is deduced). `shm`, `shm_off`: `build_request`'s."""
    if n == 0:
        if plane is None:
            raise HttpError(400, f"{HEADER_LENGTH} 0 (a raw binary request) is not accepted here")
        return raw_request(body, model, version, limits, describe.model_config(plane, model, version))
    try:
        header = json.loads(body[:n] if n < len(body) else body)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, _json_error(exc)) from None
    try:
        return build_request(header, memoryview(body)[n:], model, version, limits, shm, shm_off)
    except UnicodeError:
        raise HttpError(400, "request not valid: a string holds a lone surrogate (not encodable as UTF-8)") from None
    except RecursionError:
        raise HttpError(400, "request not valid: nested too deeply") from None


def _json_error(exc: BaseException) -> str:
    """Why a body is not JSON, in this server's words (the parser's own text stays out)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"request body is not valid JSON (line {exc.lineno} column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return "request body is not valid JSON: it is not UTF-8 text"
    if isinstance(exc, RecursionError):
        return "request body is not valid JSON: JSON nesting depth exceeds what the parser accepts"
    return "request body is not valid JSON (a number too long to read, or text that is not UTF-8)"


def raw_request(body: bytes, model: str, version: str, limits: Limits, config: dict):
    """Triton's raw binary request: `body` is the bytes of the model's only input, its shape
    deduced from the model's configuration (`config`, Triton's ModelConfig as plain data): at most
    one variable dim (a BYTES input: shape [1], the body its one element); a batching model gets
    a batch of 1. Every output comes back binary. Messages in Triton's words."""
    inputs = config.get("input", [])
    if len(inputs) != 1:
        raise InvalidArgument(
            f"Raw request must only have 1 input (found 1) to be deduced but got {len(inputs)} inputs in "
            f"'{model}' model configuration"
        )
    name = inputs[0]["name"]
    datatype = TRITON_TO_OIP.get(inputs[0]["data_type"], "")
    shape = [1] if config.get("max_batch_size", 0) else []
    dynamic, count = None, 1
    for d in inputs[0].get("dims", []):
        if d < 0:
            if dynamic is not None:
                raise InvalidArgument(
                    f"The shape of the raw input '{name}' can not be deduced because there are more than one "
                    "variable-sized dimension"
                )
            dynamic = len(shape)
        else:
            count *= d
        shape.append(int(d))
    if datatype == "BYTES":
        if dynamic is not None or count != 1:
            raise InvalidArgument(f"For BYTE datatype raw input '{name}', the model must have input shape [1]")
        array = np.empty(1, OBJECT)
        array[0] = bytes(body)
        array = array.reshape(shape)
    elif datatype in DATATYPES:
        dtype = DATATYPES[datatype][0]
        unit = count * dtype.itemsize
        if dynamic is not None:
            if unit == 0 or len(body) % unit:
                raise InvalidArgument(
                    f"raw input '{name}': {len(body)} bytes are not a whole number of {unit}-byte steps of its "
                    f"variable dimension ({datatype}, shape {shape})"
                )
            shape[dynamic] = len(body) // unit
        elif len(body) != unit:
            raise InvalidArgument(
                f"raw input '{name}': {len(body)} bytes, expected {unit} for shape {shape} of {datatype}"
            )
        check_shape(name, shape, limits, dtype.itemsize)
        array = np.frombuffer(body, dtype.newbyteorder("<")).reshape(shape)
    else:
        raise InvalidArgument(f"raw input '{name}': datatype {clip(inputs[0]['data_type'])} cannot be sent raw")
    return InferRequest(model_name=model, model_version=version, inputs={name: array}), {}, True


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the request head is over a limit (answered, then closed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


_REASONS = {413: b"Content Too Large", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits it lacks, per connection:

    - timers: a connection that never sends a request is closed after its keep-alive timeout
      (uvicorn arms that timer only after a response), and a request's headers must be complete
      HEADERS_S after its first byte (a trickle is closed);
    - a bounded head: request line MAX_URL bytes (414), each header MAX_HEADER (431), the whole
      head MAX_HEAD (431), then the connection is closed; the parser is fed a head HEAD_SLICE bytes
      at a time, so an endless line or value costs at most MAX_HEAD of buffering (httptools and
      uvicorn grow them by concatenation: quadratic in their length);
    - bounded pipelining: beyond MAX_PIPELINED requests parsed ahead of their answers, the rest of
      what the client sent waits unparsed and the connection is not read (a client that pipelines
      and never reads holds a few requests, not all it sent);
    - a send timeout: a connection whose reply the client takes none of for `send_timeout_s` is
      closed, and the memory its reply held is returned."""

    _headers_due: asyncio.TimerHandle | None = None
    _send_due: asyncio.TimerHandle | None = None
    send_timeout_s: float = 60.0
    metrics = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = False  # inside a request head (from its first byte to its blank line)
        self._body_left: int | None = None  # body bytes still to come (known length), else None
        self._chunked = False  # the body of the request being parsed is chunked (length unknown)
        self._backlog = b""  # received, not parsed yet (pipelining bound)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        # uvicorn resumes reading whenever the app reads a body or a response completes, whatever
        # is waiting unparsed: while a backlog waits, the socket stays unread (only
        # on_response_complete, which parses the backlog first, reads on)
        resume = self.flow.resume_reading

        def resume_unless_backlogged() -> None:
            if not self._backlog:
                resume()

        self.flow.resume_reading = resume_unless_backlogged
        self._resume = resume

    # -- feeding the parser -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._backlog or len(self.pipeline) >= MAX_PIPELINED:
            self._backlog += data
            self.flow.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        data = memoryview(data)  # slices of a view copy nothing (bytes slices would: quadratic in a backlog)
        while data and self.parser is not None and not self.transport.is_closing():
            if len(self.pipeline) >= MAX_PIPELINED:
                self._backlog = bytes(data)
                self.flow.pause_reading()
                return
            if self._body_left:
                piece, data = data[: self._body_left], data[self._body_left :]
            elif self._chunked and not self._in_head:
                piece, data = data, data[:0]  # a chunked body (refused by the app): its length is unknown
            else:
                piece, data = data[:HEAD_SLICE], data[HEAD_SLICE:]
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(piece)
            except _HeadTooLarge as exc:
                return self._refuse_head(exc.status, exc.message)
            except httptools.HttpParserError as exc:
                if isinstance(exc.__context__, _HeadTooLarge):
                    return self._refuse_head(exc.__context__.status, exc.__context__.message)
                self.logger.warning("Invalid HTTP request received.")
                return self.send_400_response("Invalid HTTP request received.")
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    return self.handle_websocket_upgrade()
                self._unsupported_upgrade_warning()
            if self._in_head:
                self._head_bytes += len(piece)  # counts at most HEAD_SLICE bytes before the head
                if self._head_bytes > MAX_HEAD:
                    return self._refuse_head(431, f"request head over {MAX_HEAD} bytes")

    def _refuse_head(self, status: int, message: str) -> None:
        body = f"{message}\n".encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()
        self.parser = None

    # -- parser callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._body_left, self._chunked = True, 0, None, False
        self._headers_due = self.loop.call_later(HEADERS_S, self.timeout_keep_alive_handler)

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_URL:
            raise _HeadTooLarge(414, f"request line over {MAX_URL} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_HEADER:
            raise _HeadTooLarge(431, f"header {clip(name.decode('latin-1'), 40)} over {MAX_HEADER} bytes")
        if name.lower() == b"content-length" and value.strip().isdigit() and len(value) <= 20:
            self._body_left = int(value)
        elif name.lower() == b"transfer-encoding":
            self._chunked = True
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._chunked:
            self._body_left = None
        if self._headers_due is not None:
            self._headers_due.cancel()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._body_left:
            self._body_left = max(0, self._body_left - len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_left, self._chunked = None, False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._backlog and len(self.pipeline) < MAX_PIPELINED and not self.transport.is_closing():
            backlog, self._backlog = self._backlog, b""
            self._feed(backlog)
            if not self._backlog:
                self._resume()

    # -- the send timeout -----------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_due is None:
            self._send_due = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        if self._send_due is not None:
            self._send_due.cancel()
            self._send_due = None
        super().resume_writing()

    def _send_timed_out(self) -> None:
        self._send_due = None
        if not self.transport.is_closing():
            log.info("HTTP connection %s took none of its reply for %g s: closed", self.client, self.send_timeout_s)
            if self.metrics is not None:
                self.metrics.connections_cut.inc()
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        for timer in (self._headers_due, self._send_due):
            if timer is not None:
                timer.cancel()
        self._backlog = b""
        super().connection_lost(exc)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the process's signals belong to server.app (drain); uvicorn installs none


class RestServer:
    """The HTTP/REST port: a socket bound up front (before models load), then uvicorn serving
    `app` on the caller's event loop until `shutdown`."""

    def __init__(self, app: RestApp, send_timeout_s: float = 60.0, metrics=None) -> None:
        self.app = app
        # the protocol class of this port: its send timeout and where it counts cut connections
        self._protocol = type("_Protocol", (_HttpProtocol,), {"send_timeout_s": send_timeout_s, "metrics": metrics})
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    def bind(self, host: str, port: int, reuse_port: bool = False) -> int:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise StartupError(f"--http-port {port}: cannot use host {clip(host)}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} busy (HTTP/REST --http-port on {host})") from None
            raise StartupError(f"--http-port {port} on {host}: {exc.strerror or exc}") from None
        self._sock, self.port = sock, sock.getsockname()[1]
        return self.port

    async def start(self, tls=None) -> None:
        config = uvicorn.Config(
            self.app,
            http=self._protocol,
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,  # the server's logging stays as configured
            access_log=False,
            proxy_headers=False,
            server_header=False,
            headers=[("server", "lstm-serve")],
            timeout_keep_alive=IDLE_S,
            ssl_context_factory=(lambda config, default: tls) if tls is not None else None,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise StartupError("the HTTP/REST server stopped while starting")
            await asyncio.sleep(0.005)

    async def shutdown(self, timeout: float) -> None:
        """Close the port and idle connections; answers being written finish (up to `timeout`)."""
        if self._server is None:
            if self._sock is not None:
                self._sock.close()
            return
        # stop accepting first; connections just accepted get their request answered (503 with
        # `Connection: close` during a drain) before uvicorn closes the ones left idle
        for server in self._server.servers:
            server.close()
        await asyncio.sleep(min(0.25, timeout))
        self._server.config.timeout_graceful_shutdown = max(0.1, timeout)
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
