"""The HTTP/REST port: uvicorn serving `server.rest_app.RestApp` on the server's event loop, with
the per-connection limits uvicorn lacks (`_HttpProtocol`).

The one place that depends on uvicorn's internals: `_HttpProtocol` subclasses uvicorn's
`HttpToolsProtocol` (its parser callbacks, `pipeline`, `parser`, the keep-alive timer) and replaces
its `flow.resume_reading`; `_Uvicorn` overrides `uvicorn.Server.capture_signals`. pyproject.toml
pins the uvicorn minor releases this is tested with. `tests/test_rest.py::test_uvicorn_internals`
fails, naming what is missing, if a uvicorn release drops or renames any of them; the behaviour
built on them is tested end to end by `tests/test_memory.py` (`test_rest_head_limits`,
`test_endless_request_heads_cost_nothing`, the pipelining tests) and `tests/test_rest.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import StartupError, clip
from server.rest_app import RestApp

log = logging.getLogger(__name__)
IDLE_S = 60  # an idle keep-alive connection, or one that never sends a request, is closed after this
HEADERS_S = 60  # a request's headers must be complete this long after its first byte
MAX_URL = 8 << 10  # request line (uvicorn accumulates it): 414 beyond
MAX_HEADER = 8 << 10  # one header line, name and value: 431 beyond
MAX_HEAD = 64 << 10  # the whole request head: 431 beyond
HEAD_SLICE = 4 << 10  # a request head is fed to the parser this many bytes at a time
MAX_PIPELINED = 4  # requests parsed ahead of their answers on one connection (then not read)


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
