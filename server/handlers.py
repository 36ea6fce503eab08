"""What both frontends answer, transport-free: the gRPC servicer and the HTTP/REST app are peers
that each turn these into their wire format; neither imports the other.

- `error_status`: the one mapping from exceptions to (gRPC status, HTTP status, message);
- `Admission`: inference calls in progress (bounded, refused once a drain starts, awaited by it);
- server metadata, model metadata, model config, readiness, statistics and the repository index,
  in the shapes Triton defines (its protobuf messages; REST writes them as Triton's JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from google.protobuf import json_format

from server.dataplane import DataPlane
from server.errors import ResourceExhausted, Unavailable, to_status
from server.proto import grpc_service_pb2 as pb
from server.stats import VersionStats

log = logging.getLogger(__name__)
SERVER_NAME = "lstm-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "statistics", "binary_tensor_data", "sequence_lens"]

# Every gRPC status code, as HTTP says it (Triton's choices where it makes one; 499 is the de-facto
# "client closed request").
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def error_status(exc: BaseException) -> tuple[grpc.StatusCode, int, str]:
    """(gRPC status, HTTP status, client message) for an exception: a domain error (`server.errors`)
    carries its gRPC status (`errors.to_status`); anything else is INTERNAL / 500, with a fixed
    message for the client and the details in the log."""
    code, message = to_status(exc)
    return code, HTTP_STATUS.get(code, 500), message


class Admission:
    """Inference calls in progress, counted on the event loop (both frontends run there).

    Beyond `limit` calls at once a new one gets RESOURCE_EXHAUSTED (idle or half-open
    connections are not calls: they cost nothing here). Once `refuse()` is called (a drain) new
    calls get UNAVAILABLE with a message, and `wait_idle` waits for the running ones."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refusing = False
        self._idle: asyncio.Event | None = None
        self._refused: asyncio.Event | None = None

    @contextlib.contextmanager
    def call(self):
        if self.refusing:
            raise Unavailable("server is shutting down and takes no new requests; retry (another replica)")
        if self.limit is not None and self.in_flight >= self.limit:
            raise ResourceExhausted(f"{self.in_flight} inference calls in progress: the limit; retry later")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    def refuse(self) -> None:
        """From now on new calls are refused (call on the event loop)."""
        self.refusing = True
        self.refused_event().set()

    def refused_event(self) -> asyncio.Event:
        """Set once calls are refused: streams waiting for their next request end on it."""
        if self._refused is None:
            self._refused = asyncio.Event()
            if self.refusing:
                self._refused.set()
        return self._refused

    async def wait_idle(self, timeout: float) -> int:
        """Wait up to `timeout` s for the calls in progress; returns how many still run."""
        if self.in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        return self.in_flight


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)


def model_metadata(plane: DataPlane, name: str, version: str = "") -> tuple[pb.ModelMetadataResponse, dict[str, str]]:
    """Triton's model metadata, and what this server adds (export metadata, provider, batching)
    as headers (gRPC initial metadata)."""
    data, headers = plane.model_metadata(name, version)
    response = pb.ModelMetadataResponse(name=data["name"], versions=data["versions"], platform=data["platform"])
    for key, target in (("inputs", response.inputs), ("outputs", response.outputs)):
        for t in data[key]:
            target.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return response, headers


def model_config(plane: DataPlane, name: str, version: str = "") -> pb.ModelConfigResponse:
    """Triton's ModelConfig message, from the data plane's plain description."""
    return pb.ModelConfigResponse(config=json_format.ParseDict(plane.model_config(name, version), pb.ModelConfig()))


def model_ready(plane: DataPlane, name: str, version: str, server_ready: bool) -> bool:
    """Ready when the server is (not draining) and the model (version) is loaded; raises NOT_FOUND
    for an unknown model or version and UNAVAILABLE for a known one that is not loaded."""
    plane.repository.get(name, version)
    return server_ready


def statistics(plane: DataPlane, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
    """Triton's ModelStatistics for one model (version) or all; NOT_FOUND for an unknown model."""
    snap = plane.stats.snapshot()
    response = pb.ModelStatisticsResponse()
    if name:
        plane.repository.get(name, version)  # NOT_FOUND if unknown
    for model in plane.repository.ready_models():  # loaded versions that never ran: zeros, as Triton
        entry = plane.repository.entry(model)
        for ver in entry.versions if entry is not None else ():
            snap.setdefault((model, ver), VersionStats())
    for (model, ver), s in sorted(snap.items()):
        if name and model != name:
            continue
        if version and str(ver) != version:
            continue
        ms = response.model_stats.add(
            name=model,
            version=str(ver),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            d = getattr(s, field)
            getattr(ms.inference_stats, field).CopyFrom(pb.StatisticDuration(count=d.count, ns=d.ns))
        for size, d in sorted(s.batches.items()):
            ms.batch_stats.add(batch_size=size, compute_infer=pb.StatisticDuration(count=d.count, ns=d.ns))
    return response


def repository_index(plane: DataPlane, ready_only: bool = False) -> pb.RepositoryIndexResponse:
    """Every model on disk or known, with its state, like Triton's repository index."""
    response = pb.RepositoryIndexResponse()
    for model, version, state, reason in plane.repository.index():
        if ready_only and state != "READY":
            continue
        response.models.add(name=model, version=version, state=state, reason=reason)
    return response


async def load_model(plane: DataPlane, name: str) -> None:
    """(Re)load a model; ONNX Runtime sessions are built on an executor thread, not the loop."""
    await asyncio.get_running_loop().run_in_executor(plane.executor, plane.repository.load, name)


async def unload_model(plane: DataPlane, name: str) -> None:
    await asyncio.get_running_loop().run_in_executor(plane.executor, plane.repository.unload, name)
