"""Prometheus metrics (prometheus-client) on their own HTTP port; off with --metrics-port -1.

The port is served on the server's event loop (`serve_async`), not by a thread per connection: an
idle or trickling scraper costs a coroutine, is closed after METRICS_IDLE_S, and at most
METRICS_MAX_CONNECTIONS are open at once (more are closed at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger(__name__)
METRICS_IDLE_S = 10.0  # a scrape's request must arrive within this (and the reply be taken)
METRICS_MAX_CONNECTIONS = 64  # open connections to the metrics port at once; more are closed
METRICS_MAX_HEAD = 8 << 10  # bytes of a scrape's request head
METRICS_BACKLOG = 128

_LAT = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_FRAC = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class ModelMetrics:
    """One model's labelled series of `Metrics` (what the request path updates)."""

    __slots__ = ("_metrics", "name", "latency", "queue", "queue_depth", "infer", "batch", "batch_requests",
                 "padding", "_requests")  # fmt: skip

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics, self.name = metrics, name
        self.latency = metrics.latency.labels(name)
        self.queue = metrics.queue.labels(name)
        self.queue_depth = metrics.queue_depth.labels(name)
        self.infer = metrics.infer.labels(name)
        self.batch = metrics.batch.labels(name)
        self.batch_requests = metrics.batch_requests.labels(name)
        self.padding = metrics.padding.labels(name)
        self._requests: dict[str, Counter] = {}

    def requests(self, code: str):
        """lstm_requests_total{model, code}."""
        child = self._requests.get(code)
        if child is None:
            child = self._requests[code] = self._metrics.requests.labels(self.name, code)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # the standard process_* (RSS, CPU seconds, open fds, start time) and python_* metrics
        ProcessCollector(registry=r)
        r.register(PLATFORM_COLLECTOR)
        r.register(GC_COLLECTOR)
        self.requests = Counter(
            "lstm_requests", "inference requests by model and gRPC status", ["model", "code"], registry=r
        )
        self.latency = Histogram(
            "lstm_request_latency_seconds",
            "request latency, receipt to reply",
            ["model"],
            buckets=_LAT,
            registry=r,
        )
        self.queue = Histogram(
            "lstm_queue_seconds",
            "time a request waited in the batcher queue",
            ["model"],
            buckets=_LAT,
            registry=r,
        )
        self.infer = Histogram(
            "lstm_inference_seconds",
            "ONNX Runtime run time per (merged) batch",
            ["model"],
            buckets=_LAT,
            registry=r,
        )
        self.batch = Histogram(
            "lstm_batch_sequences", "sequences per ONNX Runtime run", ["model"], buckets=_BATCH, registry=r
        )
        self.batch_requests = Histogram(
            "lstm_batch_requests", "requests merged into one run", ["model"], buckets=_BATCH, registry=r
        )
        self.padding = Histogram(
            "lstm_padding_ratio", "padded cells / all cells of a run", ["model"], buckets=_FRAC, registry=r
        )
        self.provider = Gauge(
            "lstm_execution_provider_info", "1 for the ONNX Runtime provider in use", ["provider"], registry=r
        )
        self.live_sequences = Gauge("lstm_live_sequences", "stateful sequences held by the server", registry=r)
        self.sequence_evictions = Counter(
            "lstm_sequence_evictions", "sequences freed after the idle timeout", registry=r
        )
        self.send_failures = Counter(
            "lstm_send_failures",
            "responses counted OK in lstm_requests_total that could not be sent (client gone, deadline, "
            "transport refusal), by the status the send failed with",
            ["model", "code"],
            registry=r,
        )
        self.queue_depth = Gauge("lstm_queue_depth", "requests waiting in the batcher", ["model"], registry=r)
        self.memory_budget = Gauge("lstm_memory_budget_bytes", "the memory budget (--memory-budget-mb)", registry=r)
        self.memory_held = Gauge(
            "lstm_memory_held_bytes",
            "memory held by inference calls in progress (request, estimated working memory, response until sent)",
            registry=r,
        )
        self.memory_refusals = Counter(
            "lstm_memory_refusals", "calls refused RESOURCE_EXHAUSTED by the memory budget", registry=r
        )
        self.connections_cut = Counter(
            "lstm_connections_cut", "connections closed because their client took no reply (send timeout)", registry=r
        )
        self._open = 0
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        """The per-model series of `name` (`labels()` looked up once per model, not per request)."""
        series = self._models.get(name)
        if series is None:
            series = self._models[name] = ModelMetrics(self, name)
        return series

    def bind(self, host: str, port: int) -> socket.socket:
        """The metrics socket, bound and listening (OSError if it cannot be)."""
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(METRICS_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def serve_async(self, sock: socket.socket) -> asyncio.AbstractServer:
        """Serve GET /metrics on `sock` from the running event loop."""
        return await asyncio.start_server(self._connection, sock=sock, limit=METRICS_MAX_HEAD)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= METRICS_MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            await asyncio.wait_for(self._answer(reader, writer), METRICS_IDLE_S)
        except (asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - a scrape must never take the loop down
            log.debug("metrics connection failed", exc_info=True)
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")  # one request per connection, then close
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            status, body, kind = b"405 Method Not Allowed", b"use GET\n", b"text/plain"
        elif path not in (b"/metrics", b"/"):
            status, body, kind = b"404 Not Found", b"metrics are at /metrics\n", b"text/plain"
        else:
            status, body, kind = b"200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()
        writer.write(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + (b"" if method == b"HEAD" else body)
        )  # fmt: skip
        await writer.drain()
