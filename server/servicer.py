"""GRPCInferenceService: converts protobuf <-> data-plane calls; errors map in one place."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time

import grpc

from server.dataplane import DataPlane
from server.errors import ServingError, Unavailable
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.stats import VersionStats

log = logging.getLogger(__name__)
SERVER_NAME = "lstm-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "statistics", "binary_tensor_data", "sequence_lens"]


def _to_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The single mapping from exceptions to gRPC status; unexpected errors are INTERNAL and logged."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    log.exception("unexpected error")
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    # no deadline: grpcio reports None or a huge number of seconds
    return None if remaining is None or remaining > 1e6 else time.monotonic() + remaining


def _unary(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            code, message = _to_status(exc)
            context.abort(code, message)

    return wrapper


class Admission:
    """Counts inference calls in progress; on shutdown refuses new ones (UNAVAILABLE, with a
    message) and waits for those in progress, before the gRPC server itself is stopped."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._refusing = False

    @contextlib.contextmanager
    def call(self):
        with self._cond:
            if self._refusing:
                raise Unavailable("server is shutting down and takes no new requests; retry (another replica)")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._cond.notify_all()

    def refuse_and_wait(self, timeout: float) -> int:
        """Refuse new calls; wait up to `timeout` s for the running ones; returns how many still run."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._refusing = True
            while self._in_flight and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return self._in_flight


def statistics_response(plane: DataPlane, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
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


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, is_ready, admission: Admission | None = None) -> None:
        self.plane = plane
        self.is_ready = is_ready  # callable: False while draining
        self.admission = admission or Admission()

    @_unary
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_unary
    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready())

    @_unary
    def ModelReady(self, request, context):
        try:
            self.plane.repository.get(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.is_ready())
        except ServingError:
            return pb.ModelReadyResponse(ready=False)

    @_unary
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @_unary
    def ModelMetadata(self, request, context):
        response, headers = self.plane.model_metadata(request.name, request.version)
        context.send_initial_metadata(tuple(headers.items()))
        return response

    @_unary
    def ModelConfig(self, request, context):
        return self.plane.model_config(request.name, request.version)

    @_unary
    def ModelInfer(self, request, context):
        with self.admission.call():
            return self.plane.infer(request, _deadline(context))

    def ModelStreamInfer(self, request_iterator, context):
        # Like Triton: a bad request gets an error_message in the stream; the stream goes on.
        for request in request_iterator:
            try:
                with self.admission.call():
                    response = self.plane.infer(request, _deadline(context))
                yield pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:  # noqa: BLE001
                code, message = _to_status(exc)
                yield pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id
                    ),
                )

    @_unary
    def ModelStatistics(self, request, context):
        return statistics_response(self.plane, request.name, request.version)

    @_unary
    def RepositoryIndex(self, request, context):
        return repository_index(self.plane, request.ready)

    @_unary
    def RepositoryModelLoad(self, request, context):
        self.plane.repository.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_unary
    def RepositoryModelUnload(self, request, context):
        self.plane.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
