"""The server object: gRPC (grpc.aio) and HTTP/REST (uvicorn) frontends over one data plane, on one
asyncio event loop that runs in a thread the server owns.

`InferenceServer(settings).start()` binds the ports, loads the models and returns the gRPC port;
`stop(grace)` drains (no accepted call is cancelled); `wait()` blocks until stopped.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import resource
import signal
import socket
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import Settings
from server.errors import StartupError
from server.factory import build_plane
from server.gate import Gate
from server.handlers import Admission
from server.memory import budget_from_settings
from server.metrics import Metrics
from server.osthread import name_os_thread, rename_inherited, thread_pool
from server.proto import grpc_service_pb2 as pb
from server.rest_app import RestApp
from server.rest_http import RestServer
from server.security import (
    RestrictedApiInterceptor,
    TokenAuthInterceptor,
    load_tokens,
    parse_restricted,
    server_credentials,
    tls_context,
)
from server.servicer import InferenceServicer, add_to_server
from server.shm import SharedMemoryRegistry

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def shm_disabled(s: Settings) -> str | None:
    """Why system shared memory is off (the message a register call gets), or None when it is on."""
    if not s.system_shared_memory:
        return "Client shared memory is disabled (--no-system-shared-memory)"
    if s.workers > 1:
        return (
            "system shared memory needs --workers 1: each worker process keeps its own registrations "
            f"(this server runs --workers {s.workers})"
        )
    return None


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag} {path}: {exc.strerror or exc}") from None


def _check_port_free(host: str, port: int, what: str) -> None:
    """A clear one-line error before gRPC tries (its own error is a log line of the C core)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as exc:
        raise StartupError(f"{what} {port}: cannot use host {host!r}: {exc.strerror or exc}") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} busy ({what} on {host})") from None
            raise StartupError(f"{what} {port} on {host}: {exc.strerror or exc}") from None


class InferenceServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.plane = build_plane(settings, self.metrics)  # StartupError if cuda asked and unusable
        self.repository = self.plane.repository
        self.stats = self.plane.stats
        self.sequences = self.plane.sequences
        self.providers = self.repository.providers
        # inference calls in progress over both frontends (RESOURCE_EXHAUSTED beyond; idle or
        # half-open connections and calls waiting for their request are not counted)
        self.admission = Admission(limit=settings.grpc_workers + settings.max_queue)
        # bytes the accepted calls hold until their replies are sent (server.memory)
        self.budget = budget_from_settings(settings, self.metrics)
        self.gate: Gate | None = None  # the call gate both frontends share (`_gate`, once tokens are known)
        # client shared-memory regions, one registry for both frontends (closed by `stop`)
        self.shm = SharedMemoryRegistry(settings.max_shm_regions, settings.max_shm_mb << 20,
                                        disabled=shm_disabled(settings))  # fmt: skip
        if settings.system_shared_memory and self.shm.disabled:
            log.warning("system shared memory off: %s", self.shm.disabled)
        self._metrics_sock = None
        self._metrics_server: asyncio.AbstractServer | None = None
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._grpc: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self.port: int | None = None
        self.rest: RestServer | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._serving = False

    @property
    def provider(self) -> str:
        return self.providers.kind

    def _gate(self, tokens: list[str]) -> Gate:
        """The one call gate of both frontends (admission, limits, budget, inline decision)."""
        if self.gate is None:
            self.gate = Gate(self.plane, self.admission, self.budget, tokens_on=bool(tokens), shm=self.shm)
        return self.gate

    def is_ready(self) -> bool:
        return not self._draining.is_set()

    # -- the event loop ---------------------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _soon(self, coro_fn, *args) -> None:
        """Schedule a coroutine on the loop from any thread (fire and forget)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(coro_fn(*args)))

    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        # the loop's blocking hand-offs (run_in_executor(None, ...)): threads named for what they are
        self._loop.set_default_executor(thread_pool("aio-exec", prefix="asyncio"))
        ready = threading.Event()

        def run() -> None:
            name_os_thread("loop")
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="serving-loop", daemon=True)
        self._thread.start()
        ready.wait()

    def _stop_loop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    # -- health -----------------------------------------------------------------------------
    async def _health_set(self, service: str, status) -> None:
        await self.health.set(service, status)

    async def _server_health(self) -> None:
        status = SERVING if self.repository.is_ready() else NOT_SERVING  # False while a model failed to load
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _set_model_health(self, name: str, ready: bool) -> None:  # repository.on_change, any thread
        self._soon(self._health_set, f"{SERVICE_NAME}/{name}", SERVING if ready else NOT_SERVING)
        if self._serving:  # the server's own status follows the repository's readiness
            self._soon(self._server_health)

    # -- start ------------------------------------------------------------------------------
    def start(self) -> int:
        """Check the files, bind every port, then load the models, then serve: a busy port or a
        missing file is a StartupError (one line) before any model loads."""
        s = self.settings
        if not Path(s.model_repository).is_dir():
            raise StartupError(f"--model-repository {s.model_repository}: not a folder (run `make export`)")
        tokens = load_tokens(s.auth_tokens, s.auth_tokens_file or None)  # StartupError if unreadable or empty
        creds = tls = None
        if s.tls_cert:
            cert, key = _read("--tls-cert", s.tls_cert), _read("--tls-key", s.tls_key)
            ca = _read("--tls-client-ca", s.tls_client_ca) if s.tls_client_ca else None
            try:
                tls = tls_context(s.tls_cert, s.tls_key, s.tls_client_ca)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise StartupError(f"--tls-cert/--tls-key: not a usable certificate and key: {exc}") from None
            creds = server_credentials(cert, key, ca)
        self._start_loop()
        try:
            self.port = self._run(self._bind_grpc(tokens, creds))
            if s.http_port >= 0:
                app = RestApp(self.plane, self.is_ready, self.admission, tokens, max_body=s.max_message_mb << 20,
                              max_concurrent=s.grpc_workers + s.max_queue, budget=self.budget,
                              gate=self._gate(tokens), restricted=parse_restricted(s.restricted_api))  # fmt: skip
                self.rest = RestServer(app, send_timeout_s=s.send_timeout_s, metrics=self.metrics)
                self.http_port = self.rest.bind(s.host, s.http_port, reuse_port=s.workers > 1)
            if s.metrics_port >= 0:
                try:
                    self._metrics_sock = self.metrics.bind(s.host, s.metrics_port)  # served by _serve
                    self.metrics_port = self._metrics_sock.getsockname()[1]
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise StartupError(f"port {s.metrics_port} busy (--metrics-port on {s.host})") from None
                    raise StartupError(f"--metrics-port {s.metrics_port}: {exc.strerror or exc}") from None
            self.repository.on_change = self._set_model_health
            self.repository.load_all()  # StartupError on a failed model with --exit-on-error
            self._run(self._serve(tls))
        except BaseException:
            self._abort()
            raise
        if s.metrics_port >= 0:
            log.info("Prometheus metrics on http://%s:%d/metrics", s.host, self.metrics_port)
        if self.rest is not None:
            log.info("HTTP/REST (OIP v2) on %s://%s:%d/v2", "https" if tls else "http", s.host, self.http_port)
        # What start-up built (modules, sessions, descriptors) lives as long as the process: out of
        # the collector's reach, a full collection triggered by a call's garbage has less to walk.
        gc.freeze()
        if s.poll_s > 0:
            threading.Thread(target=self._poll, name="repository-poll", daemon=True).start()
        threading.Thread(target=self._sweep_sequences, name="sequence-sweep", daemon=True).start()
        log.info(
            "serving %d model(s) %s on %s:%d with %s",
            len(self.repository.ready_models()),
            self.repository.ready_models(),
            s.host,
            self.port,
            self.providers.kind,
        )
        return self.port

    async def _bind_grpc(self, tokens: list[str], creds) -> int:
        s = self.settings
        self.health = health.aio.HealthServicer()
        interceptors = [TokenAuthInterceptor(tokens)] if tokens else []
        restricted = parse_restricted(s.restricted_api)
        if restricted:
            interceptors.append(RestrictedApiInterceptor(restricted))
            log.info("restricted protocol groups: %s (each needs its header)", ", ".join(restricted))
        if tokens:
            log.info("bearer-token authentication on (%d token(s)); health stays open", len(tokens))
        size = s.max_message_mb << 20
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", size),
                ("grpc.max_receive_message_length", size),
                ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
                *_connection_limits(s),
            ],
        )
        servicer = InferenceServicer(self.plane, self.is_ready, gate=self._gate(tokens))
        add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        if s.port and s.workers == 1:
            _check_port_free(s.host, s.port, "gRPC --port")
        address = f"{s.host}:{s.port}"
        try:
            port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            raise StartupError(f"gRPC --port {s.port}: cannot bind {address}")
        if creds:
            log.info("TLS on%s", " with client-certificate verification" if s.tls_client_ca else "")
        self._grpc = server
        return port

    async def _serve(self, tls) -> None:
        await self._grpc.start()
        if self._metrics_sock is not None:
            self._metrics_server = await self.metrics.serve_async(self._metrics_sock)
        if self.rest is not None:
            await self.rest.start(tls)
        for name in self.repository.ready_models():
            await self.health.set(f"{SERVICE_NAME}/{name}", SERVING)
        await self._server_health()
        rename_inherited("loop")  # gRPC's poller, started from this thread, carries its name until now
        self._serving = True

    def _abort(self) -> None:
        """Undo a failed start: ports closed, loop stopped."""
        if self._loop is not None and self._loop.is_running():

            async def close() -> None:
                self._close_metrics()
                if self.rest is not None:
                    await self.rest.shutdown(0)
                if self._grpc is not None:
                    await self._grpc.stop(0)

            try:
                self._run(close(), timeout=10)
            except Exception:  # noqa: BLE001 - already failing; report the first error
                log.debug("cleanup after a failed start", exc_info=True)
            self._stop_loop()
        self.plane.executor.shutdown(wait=False)
        self._stopped.set()  # stop() and wait() return at once

    # -- background work --------------------------------------------------------------------
    def _sweep_sequences(self) -> None:
        """Free sequences idle longer than sequence_idle_s (also checked on every access)."""
        name_os_thread("seq-sweep")
        period = min(1.0, max(0.05, self.settings.sequence_idle_s / 4))
        while not self._draining.wait(period):
            self.sequences.sweep()

    def _poll(self) -> None:
        """Triton's poll mode: load new/changed versions, unload models removed from disk."""
        name_os_thread("repo-poll")
        while not self._draining.wait(self.settings.poll_s):
            try:
                self.repository.sync()
            except Exception:  # noqa: BLE001 - the poller must go on
                log.exception("repository poll failed")

    # -- stop -------------------------------------------------------------------------------
    def refuse_new_calls(self) -> None:
        """Readiness false and new inference calls refused (UNAVAILABLE / 503), as a drain does
        after its delay; the calls in progress go on. `stop` does this and more."""
        self._draining.set()
        self._run(self._refuse())

    async def _refuse(self) -> None:
        self.admission.refuse()

    def stop(self, grace: float | None = None, close_grpc: bool = True) -> None:
        """Drain: health NOT_SERVING and readiness false first (calls still served for
        `drain_delay_s`, so balancers notice); then new calls get UNAVAILABLE (REST: 503 with
        `Connection: close`) while the running ones finish (up to `grace` s); then both ports
        close. A call that reached a handler is never cancelled within the grace period.

        `close_grpc=False` leaves the gRPC connections to the process's exit (`serve`): grpc's own
        shutdown cancels (CANCELLED) calls that reach it while its GOAWAY is on the wire; a
        connection closed by the exit makes them UNAVAILABLE, which clients retry elsewhere."""
        with self._stop_lock:
            if self._loop is None or self._stopped.is_set():
                return
            grace = self.settings.grace_s if grace is None else grace
            self._draining.set()
            try:
                self._run(self._drain(grace, close_grpc))
            finally:
                self._stop_loop()
                self.plane.executor.shutdown(wait=False)
                self.shm.close()
                self._stopped.set()

    async def _drain(self, grace: float, close_grpc: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if self._grpc is None:
            return
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_delay_s > 0:
            await asyncio.sleep(self.settings.drain_delay_s)
        start = loop.time()

        def left() -> float:
            return max(0.0, grace - (loop.time() - start))

        self.admission.refuse()  # streams waiting for a request end UNAVAILABLE too
        await self.admission.wait_idle(left())
        # calls already on their way reach a handler and get a clean UNAVAILABLE; REST clients
        # get `Connection: close` on their next answer and leave their connections
        await asyncio.sleep(min(0.5, left()))
        running = await self.admission.wait_idle(left())
        if running:
            log.warning("%d call(s) still running after the %.1f s grace period: cancelled", running, grace)
        jobs = [self._grpc.stop(left())] if close_grpc else []
        if self.rest is not None:
            jobs.append(self.rest.shutdown(left()))
        await asyncio.gather(*jobs, return_exceptions=True)
        self._close_metrics()

    def _close_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
        elif self._metrics_sock is not None:
            self._metrics_sock.close()

    def wait(self) -> None:
        """Block until `stop` has finished (at once if the server never started)."""
        if self._loop is not None:
            self._stopped.wait()


def _connection_limits(s: Settings) -> list[tuple[str, int]]:
    """grpc options bounding what one HTTP/2 connection holds: its concurrent streams, and its age
    (GOAWAY, then the grace for its calls, then closed: a client that never reads its replies is
    cut off and what they held is returned; clients that read reconnect transparently)."""
    options = [("grpc.max_concurrent_streams", s.max_streams_per_connection)]
    if s.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, int(s.max_connection_age_s * 1000))),
            ("grpc.max_connection_age_grace_ms", max(1, int(s.connection_age_grace_s * 1000))),
        ]
    return options


def _raise_open_files_limit() -> None:
    """Idle connections cost a file descriptor each: use the hard limit, not the (often 1024) soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            log.debug("could not raise RLIMIT_NOFILE", exc_info=True)


def serve(settings: Settings, announce: bool) -> int:
    """Run one server process until SIGTERM/SIGINT (drain, then exit code 0); 2 if it cannot start."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
    )
    _raise_open_files_limit()
    try:
        server = InferenceServer(settings)
        port = server.start()
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    if announce:
        print(f"listening on {settings.host}:{port}", flush=True)
    stopping = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        if not stopping.is_set():
            stopping.set()
            logging.getLogger("server").info("signal %d: draining (grace %.1f s)", signum, settings.grace_s)
            threading.Thread(target=server.stop, kwargs={"close_grpc": False}, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.wait()
    # drained: every accepted call answered, REST closed; the exit closes the gRPC connections
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
