"""The server object: gRPC server with the inference, health and reflection services.

`InferenceServer(settings).start()` returns the bound port; `stop(grace)` drains in-flight calls.
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.batcher import BatchPolicy
from server.codec import Limits
from server.config import Settings
from server.dataplane import DataPlane
from server.errors import StartupError
from server.metrics import Metrics
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.repository import ModelRepository
from server.rest import RestServer
from server.runtime import RuntimeOptions, select_providers
from server.security import TokenAuthInterceptor, load_tokens, server_credentials, tls_context
from server.sequences import SequenceStore
from server.servicer import Admission, InferenceServicer
from server.stats import Statistics

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.options = RuntimeOptions(
            device=settings.device,
            cuda_tf32=settings.cuda_tf32,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            graph_optimization=settings.graph_optimization,
        )
        self.providers = select_providers(self.options)  # StartupError if cuda asked and unusable
        log.info("execution provider in use: %s", self.providers.kind)
        self.repository = ModelRepository(settings.model_repository, self.providers, self.options)
        self.stats = Statistics()
        self.metrics = Metrics()
        self.metrics.provider.labels(self.providers.kind).set(1)
        policy = BatchPolicy(
            enabled=settings.batching,
            max_batch=settings.max_batch,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_cells=settings.max_elements,
            max_queue=settings.max_queue,
            instances=settings.instances,
        )

        def _sequences_changed(live: int, evicted: int) -> None:
            self.metrics.live_sequences.set(live)
            if evicted:
                self.metrics.sequence_evictions.inc(evicted)

        self.sequences = SequenceStore(settings.max_sequences, settings.sequence_idle_s, _sequences_changed)
        self.plane = DataPlane(
            self.repository,
            self.stats,
            Limits(settings.max_elements, settings.max_request_batch),
            policy,
            self.metrics,
            self.sequences,
        )
        self.metrics_port: int | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._draining = threading.Event()
        self.admission = Admission()
        self._server: grpc.Server | None = None
        self.port: int | None = None
        self.rest: RestServer | None = None
        self.http_port: int | None = None

    @property
    def provider(self) -> str:
        return self.providers.kind

    def _set_model_health(self, name: str, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(f"{SERVICE_NAME}/{name}", status)

    def start(self) -> int:
        s = self.settings
        if not s.model_repository.is_dir():
            raise StartupError(f"model repository {s.model_repository} is not a folder (run `make export`)")
        self.repository.on_change = self._set_model_health
        self.repository.load_all()
        size = s.max_message_mb * 1024 * 1024
        interceptors = []
        try:
            tokens = load_tokens(s.auth_tokens, Path(s.auth_tokens_file) if s.auth_tokens_file else None)
        except OSError as exc:
            raise StartupError(f"--auth-tokens-file: {exc}") from None
        if tokens:
            interceptors.append(TokenAuthInterceptor(tokens))
            log.info("bearer-token authentication on (%d token(s)); health stays open", len(tokens))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.grpc_workers, thread_name_prefix="grpc"),
            interceptors=interceptors,
            # beyond this many calls at once gRPC answers RESOURCE_EXHAUSTED instead of queueing
            maximum_concurrent_rpcs=s.grpc_workers + s.max_queue,
            options=[
                ("grpc.max_send_message_length", size),
                ("grpc.max_receive_message_length", size),
                ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.plane, lambda: not self._draining.is_set(), self.admission), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{s.host}:{s.port}"
        if s.tls_cert:
            try:
                creds = server_credentials(
                    Path(s.tls_cert), Path(s.tls_key), Path(s.tls_client_ca) if s.tls_client_ca else None
                )
            except OSError as exc:
                raise StartupError(f"TLS: {exc}") from None
            port = server.add_secure_port(address, creds)
            log.info("TLS on%s", " with client-certificate verification" if s.tls_client_ca else "")
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise StartupError(f"cannot bind {s.host}:{s.port}")
        server.start()
        if s.http_port >= 0:
            self.rest = RestServer(
                self.plane,
                lambda: not self._draining.is_set(),
                self.admission,
                tokens,
                max_body=s.max_message_mb << 20,
                max_concurrent=s.grpc_workers + s.max_queue,
            )
            try:
                tls = tls_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
                self.http_port = self.rest.start(s.host, s.http_port, tls)
            except (OSError, ssl.SSLError) as exc:
                server.stop(0)
                raise StartupError(f"HTTP/REST port {s.host}:{s.http_port}: {exc}") from None
            log.info("HTTP/REST (OIP v2) on %s://%s:%d/v2", "https" if tls else "http", s.host, self.http_port)
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            log.info("Prometheus metrics on http://%s:%d/metrics", s.host, self.metrics_port)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self.port = server, port
        if s.poll_s > 0:
            threading.Thread(target=self._poll, name="repository-poll", daemon=True).start()
        threading.Thread(target=self._sweep_sequences, name="sequence-sweep", daemon=True).start()
        log.info(
            "serving %d model(s) %s on %s:%d with %s",
            len(self.repository.ready_models()),
            self.repository.ready_models(),
            s.host,
            port,
            self.providers.kind,
        )
        return port

    def _sweep_sequences(self) -> None:
        """Free sequences idle longer than sequence_idle_s (also checked on every access)."""
        period = min(1.0, max(0.05, self.settings.sequence_idle_s / 4))
        while not self._draining.wait(period):
            self.sequences.sweep()

    def _poll(self) -> None:
        """Triton's poll mode: load new/changed versions, unload models removed from disk."""
        while not self._draining.wait(self.settings.poll_s):
            try:
                self.repository.sync()
            except Exception:  # noqa: BLE001 - the poller must go on
                log.exception("repository poll failed")

    def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING and ServerReady false first (calls still served for
        `drain_delay_s`, so balancers notice); then new inference calls get UNAVAILABLE while the
        running ones finish (up to `grace` s); then the gRPC server stops."""
        if self._server is None:
            return
        grace = self.settings.grace_s if grace is None else grace
        self._draining.set()
        self.health.enter_graceful_shutdown()
        if self.settings.drain_delay_s > 0:
            time.sleep(self.settings.drain_delay_s)
        start = time.monotonic()
        left = self.admission.refuse_and_wait(grace)
        # Calls the transport already took in but no handler has started yet would be cancelled by
        # the core's stop: let them reach our handler first (they get a clean UNAVAILABLE).
        time.sleep(min(0.5, max(0.0, grace - (time.monotonic() - start))))
        left = self.admission.refuse_and_wait(max(0.0, grace - (time.monotonic() - start)))
        if left:
            log.warning("%d call(s) still running after the %.1f s grace period: cancelled", left, grace)
        self._server.stop(max(0.0, grace - (time.monotonic() - start))).wait()
        self._server = None
        if self.rest is not None:
            self.rest.stop()
            self.rest = None

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()


def serve(settings: Settings, announce: bool) -> int:
    """Run one server process until SIGTERM/SIGINT (drain, then exit code 0); 2 if it cannot start."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
    )
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
            threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.wait()
    return 0
