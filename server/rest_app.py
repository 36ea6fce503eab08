"""Open Inference Protocol v2 over HTTP/REST (KServe's "v2" protocol), a peer of the gRPC frontend.

An ASGI app served by uvicorn (httptools parser; the port is `server.rest_http`) on the server's
event loop. HTTP itself (framing, keep-alive, pipelining, `Expect: 100-continue`, idle connections)
is uvicorn's; this module maps OIP v2 JSON and Triton's binary tensor extension (decoded by
`server.rest_codec`) to the data plane's numpy requests, and answers
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
(`status.HTTP_STATUS`), plus 401, 405, 408, 411, 413 and 415 for HTTP-level mistakes; requests
the HTTP parser itself refuses get uvicorn's plain-text 400 and the connection is closed.

Admission before the body: a request's Content-Length is checked against the limit and a request
slot taken before a byte of its body is read (health checks take none); while the body arrives,
up to SPOOL_BYTES of it are held in memory, a larger body goes to an unlinked temporary file, so a
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import tempfile
import time
import zlib
from urllib.parse import unquote

from server import describe, handlers, trace
from server.dataplane import InferRequest
from server.errors import InvalidArgument, Unavailable, Unimplemented, clip
from server.gate import Gate, check_structure
from server.gate import client as gate_client
from server.gate import deadline as gate_deadline
from server.memory import JSON_RESPONSE_FACTOR, call_cost
from server.rest_codec import HEADER_LENGTH, json_error, parse_body, parse_params, response_body
from server.security import bearer_matches, restricted_refusal
from server.shm import REGION as SHM_REGION
from server.shm import cuda_shared_memory, owner_of
from server.status import error_status

log = logging.getLogger(__name__)
SPOOL_BYTES = 256 << 10  # bodies larger than this wait for their last byte in a temporary file
BODY_IDLE_S = 60.0  # a body that stops arriving for this long is answered 408 and its connection closed
DRAIN_BEFORE_CLOSE = 64 << 10  # an unread body up to this size is read before a closing answer (no RST)
LARGE = 256 << 10  # JSON parsing and encoding above this size run on an executor thread
# peak memory of parsing a JSON request and converting its data, per byte of JSON: measured 2.6x
# for float32 values as json.dumps writes them; short values ("0.5,") make more objects per byte
JSON_PARSE_FACTOR = 10


INLINE_INFLATE = 1 << 20  # compressed bodies above this are inflated on an executor thread


def _inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib, or raw deflate) body inflated to at most `limit` bytes: a body that
    would inflate beyond it is refused before more than `limit` bytes are held."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    for bits in (wbits,) if encoding == "gzip" else (wbits, -zlib.MAX_WBITS):
        inflater = zlib.decompressobj(bits)
        try:
            out = inflater.decompress(raw, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            raise HttpError(
                400,
                f"request body inflates ({encoding}) to a size that exceeds the maximum allowed value of {limit} bytes",
            )
        if not inflater.eof:
            raise HttpError(400, f"request body is a truncated {encoding} stream")
        return out
    raise HttpError(400, f"request body is not valid {encoding} data (Content-Encoding: {encoding})")


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Gone(Exception):
    """The client disconnected: nothing can be answered."""


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
            # Triton's leading words ("request JSON size of N bytes exceeds the maximum allowed value")
            what = "request JSON size" if limit < self.app.max_body else "request size"
            raise HttpError(413, f"{what} of {length} bytes exceeds the maximum allowed value of {limit} bytes{hint}")
        encoding = (self.header("Content-Encoding") or "identity").lower()
        if encoding not in ("identity", "gzip", "deflate"):
            raise HttpError(
                415, f"Content-Encoding {clip(encoding)} not supported; send it as gzip, deflate or identity"
            )
        if encoding != "identity":
            raw = await self._read(length)
            if len(raw) > INLINE_INFLATE:  # inflating is CPU work: off the event loop
                return await asyncio.get_running_loop().run_in_executor(None, _inflate, raw, encoding, limit)
            return _inflate(raw, encoding, limit)
        return await self._read(length)

    async def _read(self, length: int) -> bytes:
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

    async def unless_gone(self, work):
        """Await the coroutine `work`; if the client disconnects first, cancel it (a run it started
        is stopped: the data plane's RunControl, as for a cancelled gRPC call) and raise _Gone.
        After the body is read, uvicorn's `receive` answers only when the connection is lost."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self._disconnected())
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watch.cancel()
            raise
        if task.done():
            watch.cancel()
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _Gone()

    async def _disconnected(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

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
        if parts == ["trace", "setting"]:
            return await self._trace(ex)
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
            ready = describe.model_ready(plane, model, version, self.is_ready())
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
        if rest == ["trace", "setting"] and not version:
            plane.repository.get(model, "")  # NOT_FOUND / UNAVAILABLE by name
            return await self._trace(ex)
        raise HttpError(404, f"no such endpoint under model {clip(model)}: {clip('/'.join(rest))}")

    async def _trace(self, ex: _Exchange) -> None:
        """Triton's trace settings: GET reads them, POST updates them (server/trace.py: tracing is
        off and stays off; a change is refused by name)."""
        if ex.method not in ("GET", "HEAD", "POST"):
            raise HttpError(405, f"{ex.method} not allowed here; use GET or POST", {"Allow": "GET, HEAD, POST"})
        updates: dict = {}
        if ex.method == "POST":
            with self.slot():
                raw = await ex.body(self.max_json, required=False)
            try:
                updates = trace.from_json(json.loads(raw) if raw.strip() else {})
            except (ValueError, RecursionError) as exc:
                raise InvalidArgument(json_error(exc)) from None
        return await ex.respond(200, _dumps(trace.rest_form(trace.trace_setting(updates))))

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
                raise InvalidArgument(json_error(exc)) from None
            if not isinstance(options, dict):
                raise InvalidArgument("request body must be a JSON object")
            if parts == ["index"]:
                ready_only = options.get("ready", False)
                if not isinstance(ready_only, bool):
                    raise InvalidArgument(f"Invalid value for 'ready': expected a boolean, got {clip(ready_only)}")
                return await ex.respond(200, _dumps(describe.repository_index(self.plane, ready_only)))
            if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
                params = parse_params(options.get("parameters"), parts[2])
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
                    raise InvalidArgument(json_error(exc)) from None
                if not isinstance(options, dict):
                    raise InvalidArgument("Shared memory register request must be a JSON object")
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
                    raise HttpError(
                        413,
                        f"request JSON size of {n} bytes exceeds the maximum allowed value of {self.max_json} bytes",
                    )
            else:
                n = len(body)
            loop = asyncio.get_running_loop()
            authorization = ex.header("Authorization")
            client = gate_client(f"{ex.peer[0]}:{ex.peer[1]}" if ex.peer else "",
                                 [authorization] if authorization else [], bool(self.tokens))  # fmt: skip
            shm = self.gate.shm_call(authorization)
            shm_off = self.gate.shm.disabled if self.gate.shm is not None else None
            parse = (parse_body, body, n, model, version, self.plane.limits, self.plane, shm, shm_off)
            # parsed JSON is Python objects: up to JSON_PARSE_FACTOR x its text, held meanwhile; a request
            # naming shared memory reads it while parsed: off the event loop too (pread blocks)
            if n > LARGE or (shm is not None and body.find(SHM_REGION.encode(), 0, n) >= 0):
                with _Held(await self.budget.hold(JSON_PARSE_FACTOR * n, client, deadline) if self.budget else None):
                    request, binary_outputs, binary_all = await loop.run_in_executor(self.plane.executor, *parse)
            else:
                request, binary_outputs, binary_all = parse_body(*parse[1:])
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
                    # a client that leaves stops its run (no deadline needed)
                    response = await ex.unless_gone(self.plane.infer_async(request, gate.inline()))
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
