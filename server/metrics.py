"""Prometheus metrics (prometheus-client) on their own HTTP port; off with --metrics-port -1."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

_LAT = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_FRAC = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


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

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
