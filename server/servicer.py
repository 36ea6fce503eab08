"""GRPCInferenceService on grpc.aio: the RPC methods; protobuf <-> the data plane's numpy requests is
`server.grpc_codec`'s; errors map in one place (`server.status.error_status`).

Every handler is a coroutine on the server's event loop: an idle, slow or half-open call costs a
coroutine, not a thread; ONNX Runtime runs on the data plane's threads while the call awaits it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from server import describe, handlers, trace
from server.codec import parameter_value, plain_parameters, serialize_any
from server.dataplane import DataPlane
from server.errors import InvalidArgument, Unimplemented, clip
from server.gate import Gate, check_structure, check_tensor_parameters, client, deadline
from server.grpc_codec import (
    Malformed,
    costly_to_decode,
    deserializer,
    parse_off_loop,
    to_infer_request,
    to_infer_response_bytes,
    to_stream_response_bytes,
)
from server.handlers import Admission
from server.memory import MemoryBudget
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.shm import BYTE_SIZE as SHM_BYTE_SIZE
from server.shm import INLINE_BYTES as SHM_INLINE_BYTES
from server.shm import REGION as SHM_REGION
from server.shm import cuda_shared_memory, owner_of
from server.status import error_status

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def add_to_server(servicer: InferenceServicer, server) -> None:
    """`add_GRPCInferenceServiceServicer_to_server`, with request deserializers that let a handler
    answer malformed bytes itself."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    methods = {}
    for method in SERVICE.methods:
        make = kinds[(method.client_streaming, method.server_streaming)]
        methods[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=deserializer(getattr(pb, method.input_type.name)),
            response_serializer=serialize_any,  # ModelInfer answers in wire format already
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, methods),))
    server.add_registered_method_handlers(SERVICE.full_name, methods)


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    # no deadline: grpcio reports None or a huge number of seconds
    return None if remaining is None or remaining > 1e6 else time.monotonic() + remaining


def _unary(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        request = await parse_off_loop(request, self.plane.executor)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to its status, in one place
            code, _, message = error_status(exc)
        await context.abort(code, message)

    return wrapper


async def infer_message(gate: Gate, request: pb.ModelInferRequest, transport_deadline: float | None, peer: str,
                        authorizations: list[str]):  # fmt: skip
    """A ModelInferRequest through the gate (`server.gate`) and the data plane: (InferResponse,
    memory hold or None); the caller releases the hold once the reply is sent (the hold is
    released here if the call fails). gRPC servicer and Ray Serve deployment alike."""
    plane = gate.plane
    with gate.call():
        rt = gate.model(request.model_name, request.model_version)
        # O(1) caps before anything is looked at element by element
        check_structure(rt, len(request.inputs), len(request.outputs), len(request.parameters), len(request.id))
        if len(request.raw_input_contents) > len(request.inputs):
            raise InvalidArgument(
                f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs; "
                "send one per input"
            )
        shm_in = 0  # bytes the inputs name in shared memory
        for t in request.inputs:
            if t.parameters:
                check_tensor_parameters(f"input {clip(t.name)}", t.parameters, gate.shm)
                if SHM_REGION in t.parameters and SHM_BYTE_SIZE in t.parameters:
                    shm_in += max(0, t.parameters[SHM_BYTE_SIZE].int64_param)
        for o in request.outputs:
            if o.parameters:
                check_tensor_parameters(f"output {clip(o.name)}", o.parameters, gate.shm)
        who = client(peer, authorizations, gate.tokens_on)
        shm = gate.shm_call(authorizations[0] if authorizations else None)
        # strings, typed values or large shared-memory reads: decoded off the event loop
        if costly_to_decode(request) or shm_in > SHM_INLINE_BYTES:
            loop = asyncio.get_running_loop()
            infer = await loop.run_in_executor(plane.executor, to_infer_request, request, plane, None, shm)
        else:
            infer = to_infer_request(request, plane, None, shm)
        infer.deadline = deadline(transport_deadline, infer.parameters)
        infer.client = who
        hold = await gate.hold(rt, infer)
        try:
            result = await plane.infer_async(infer, gate.inline())
            if shm is not None:  # only after the run succeeded
                await shm.write_async(result.outputs, plane.executor)
        except BaseException:
            if hold is not None:
                hold.release()
            raise
    return result, hold


# a stream's requests in progress at most; while that many are, the stream is not read further
STREAM_IN_FLIGHT = 64


def _sequence_key(request: pb.ModelInferRequest) -> tuple | None:
    """What orders a stream's requests: the chunks of one sequence (model and `sequence_id`) run one
    after another; a request without one is independent."""
    if "sequence_id" not in request.parameters:
        return None
    return request.model_name, str(parameter_value(request.parameters["sequence_id"]))


def _release_answer(task: asyncio.Task) -> None:
    """A stream answer that will never be written: its memory hold goes back."""
    if not task.cancelled() and task.exception() is None:
        hold = task.result()[2]
        if hold is not None:
            hold.release()


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, is_ready, admission: Admission | None = None,
                 budget: MemoryBudget | None = None, tokens_on: bool = False,
                 gate: Gate | None = None) -> None:  # fmt: skip
        """`gate`: the server's call gate (`server.gate`), shared with the REST frontend; default:
        one of this servicer's own over `admission` and `budget`."""
        self.plane = plane
        self.is_ready = is_ready  # callable: False while draining
        self.gate = gate or Gate(plane, admission, budget, tokens_on)
        self.admission = self.gate.admission

    @_unary
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_unary
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.is_ready() and self.plane.repository.is_ready())

    @_unary
    async def ModelReady(self, request, context):
        try:
            return pb.ModelReadyResponse(
                ready=describe.model_ready(self.plane, request.name, request.version, self.is_ready())
            )
        except Exception:  # noqa: BLE001 - unknown or not loaded: not ready
            return pb.ModelReadyResponse(ready=False)

    @_unary
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**describe.server_metadata(handlers.extensions(self.gate.shm_enabled)))

    @_unary
    async def ModelMetadata(self, request, context):
        described, headers = describe.model_metadata(self.plane, request.name, request.version)
        await context.send_initial_metadata(tuple(headers.items()))
        return pb.ModelMetadataResponse(**described)

    @_unary
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=describe.model_config(self.plane, request.name, request.version))

    async def _infer(self, request: pb.ModelInferRequest, context):
        """Run one request through the gate (`server.gate`); (response, memory hold or None). The
        hold is the caller's to return once the reply is written (a failed call returns its own)."""
        authorizations = []
        if self.gate.tokens_on:  # the per-client key is the token then (reading metadata costs: not otherwise)
            authorizations = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        return await infer_message(self.gate, request, _deadline(context), context.peer() or "", authorizations)

    @_unary
    async def ModelInfer(self, request, context):
        start = time.perf_counter_ns()
        result, hold = await self._infer(request, context)
        plane = self.plane

        def ended(ctx) -> None:  # the RPC ended: the call's memory goes back; a reply not sent is counted
            if hold is not None:
                hold.release()
            if ctx.cancelled():
                plane.record_send_failure(result, grpc.StatusCode.CANCELLED, time.perf_counter_ns() - start)

        context.add_done_callback(ended)  # one callback (each costs grpc.aio a registration)
        return to_infer_response_bytes(result, request)

    async def ModelStreamInfer(self, request_iterator, context):
        """A stream's requests run concurrently (at most `STREAM_IN_FLIGHT`; the stream is not read
        further meanwhile), so chunks of many sequences on one stream batch like many streams; the
        chunks of one sequence run one after another, in order (`_sequence_key`). Each request is
        answered with its id, in request order (this project's client reads them so; tritonclient
        matches ids). A bad request gets an `error_message` (the bare text, as Triton's) and the
        stream goes on. Once a drain starts, a stream waiting for its next request answers what it
        has in progress, then ends UNAVAILABLE. The client leaving cancels what is in progress."""
        me = asyncio.current_task()
        draining, reading = False, False

        def drain(event_wait: asyncio.Future) -> None:  # the server started to drain: stop reading
            nonlocal draining
            if not event_wait.cancelled():
                draining = True
                if reading:
                    me.cancel()  # only the wait for the next request is interrupted (see below)

        # one watcher per stream rather than a task and an asyncio.wait per request read
        refused = asyncio.ensure_future(self.admission.refused_event().wait())
        refused.add_done_callback(drain)
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        answers: asyncio.Queue = asyncio.Queue()  # tasks in request order; None: no more
        last: dict[tuple, asyncio.Task] = {}  # the latest request of each sequence
        tasks: set[asyncio.Task] = set()
        writer = asyncio.ensure_future(self._stream_writer(context, answers, slots, me))
        try:
            while True:
                await slots.acquire()  # backpressure: a full stream is not read further
                if draining:
                    break
                reading = True
                try:
                    request = await context.read()
                except asyncio.CancelledError:
                    if not draining or me.uncancel() > 0:  # the call itself was cancelled too
                        raise
                    break
                finally:
                    reading = False
                if request is grpc.aio.EOF:
                    break
                request = await parse_off_loop(request, self.plane.executor)
                key = None if isinstance(request, Malformed) else _sequence_key(request)
                before = last.get(key) if key is not None else None
                task = asyncio.ensure_future(self._stream_one(request, context, before))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if key is not None:
                    last[key] = task
                    task.add_done_callback(lambda t, key=key: last.get(key) is t and last.pop(key))
                answers.put_nowait(task)
            answers.put_nowait(None)
            await writer  # every request answered
            if draining:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "server is shutting down; reopen the stream (another replica)"
                )
        finally:
            refused.cancel()
            if not writer.done():
                writer.cancel()
            for task in list(tasks):  # the client left (or a write failed): stop what is in progress
                task.cancel()
            while not answers.empty():  # computed but never written: its memory goes back
                task = answers.get_nowait()
                if task is not None:
                    task.add_done_callback(_release_answer)

    async def _stream_one(self, request, context, before: asyncio.Task | None):
        """One stream request, after `before` (the same sequence's previous request) finished:
        (response message or its wire bytes, InferResponse or None, memory hold or None, start ns)."""
        if before is not None and not before.done():
            await asyncio.wait({before})  # its outcome is its own; only the order matters here
        start = time.perf_counter_ns()
        if isinstance(request, Malformed):
            return pb.ModelStreamInferResponse(error_message=request.message), None, None, start
        try:
            result, hold = await self._infer(request, context)
        except Exception as exc:  # noqa: BLE001 - reported in the stream, which goes on
            _, _, message = error_status(exc)
            reply = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                          id=request.id)  # fmt: skip
            return pb.ModelStreamInferResponse(error_message=message, infer_response=reply), None, None, start
        try:
            response = to_stream_response_bytes(result, request)
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        return response, result, hold, start

    async def _stream_writer(self, context, answers: asyncio.Queue, slots: asyncio.Semaphore, reader) -> None:
        """The stream's one writer: each request's answer in request order; a failed write (the
        client gone) stops the reader and everything in progress."""
        try:
            while (task := await answers.get()) is not None:
                response, result, hold, start = await task
                try:
                    await context.write(response)
                except BaseException:
                    if result is not None:
                        code = grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.UNAVAILABLE
                        self.plane.record_send_failure(result, code, time.perf_counter_ns() - start)
                    raise
                finally:
                    if hold is not None:
                        hold.release()
                slots.release()
        except BaseException:
            reader.cancel()
            raise

    # -- Triton's shared-memory extension (`server.shm`) ----------------------------------------

    def _shm(self, context):
        """The registry and the caller's owner key (its token's, when tokens are on)."""
        if self.gate.shm is None:
            raise Unimplemented("system shared memory is not served here")
        tokens_on = self.gate.tokens_on
        authorization = dict(context.invocation_metadata() or ()).get("authorization") if tokens_on else None
        return self.gate.shm, owner_of(authorization, tokens_on)

    @_unary
    async def SystemSharedMemoryStatus(self, request, context):
        registry, owner = self._shm(context)
        R = pb.SystemSharedMemoryStatusResponse
        return R(regions={r["name"]: R.RegionStatus(**r) for r in registry.status(request.name, owner)})

    @_unary
    async def SystemSharedMemoryRegister(self, request, context):
        registry, owner = self._shm(context)
        registry.register(request.name, request.key, request.offset, request.byte_size, owner)
        return pb.SystemSharedMemoryRegisterResponse()

    @_unary
    async def SystemSharedMemoryUnregister(self, request, context):
        registry, owner = self._shm(context)
        registry.unregister(request.name, owner)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_unary
    async def CudaSharedMemoryStatus(self, request, context):
        cuda_shared_memory("status", request.name)
        return pb.CudaSharedMemoryStatusResponse()

    @_unary
    async def CudaSharedMemoryRegister(self, request, context):
        cuda_shared_memory("register", request.name)
        return pb.CudaSharedMemoryRegisterResponse()

    @_unary
    async def CudaSharedMemoryUnregister(self, request, context):
        cuda_shared_memory("unregister", request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    @_unary
    async def TraceSetting(self, request, context):
        if request.model_name:
            self.plane.repository.get(request.model_name, "")  # NOT_FOUND / UNAVAILABLE by name
        settings = trace.trace_setting({k: list(v.value) for k, v in request.settings.items()})
        R = pb.TraceSettingResponse  # noqa: N806
        return R(settings={k: R.SettingValue(value=v) for k, v in settings.items()})

    @_unary
    async def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse(**describe.statistics(self.plane, request.name, request.version))

    @_unary
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=describe.repository_index(self.plane, request.ready))

    @_unary
    async def RepositoryModelLoad(self, request, context):
        """Load with the request's parameters as plain values (`config`: string_param, as
        tritonclient sends it; `file:` ones, bytes_param, are refused by `handlers.load_model`)."""
        parameters = plain_parameters(request.parameters)
        with self.admission.call():
            await handlers.load_model(self.plane, request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request, context):
        with self.admission.call():
            params = plain_parameters(request.parameters)
            await handlers.unload_model(self.plane, request.model_name, params)
        return pb.RepositoryModelUnloadResponse()
