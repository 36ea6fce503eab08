"""The data plane: validate a decoded request against a model, run it (batched), build the response.

Transport-free: requests come in as numpy arrays and plain parameters (`InferRequest`) and leave as
numpy arrays (`InferResponse`); the gRPC servicer, the HTTP/REST app and the Ray Serve deployment
each convert their wire format to and from these. `infer` runs a request in the calling thread;
`infer_async` runs it from an asyncio event loop, with ONNX Runtime on executor threads (an idle or
waiting request costs a coroutine, not a thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.batcher import Batcher, BatchInfo, BatchPolicy
from server.codec import DATATYPES, Limits
from server.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, ServingError
from server.metrics import Metrics
from server.proto import grpc_service_pb2 as pb
from server.repository import ModelRepository, output_axes
from server.runtime import ModelRuntime
from server.sequences import SequenceStore, parse_sequence
from server.stats import Statistics


@dataclass
class Prepared:
    """A validated request: a padded batch ready for the runtime."""

    runtime: ModelRuntime
    x: np.ndarray  # (B, T, F) float32
    lengths: np.ndarray  # (B,) int64
    outputs: list[str]
    h0: np.ndarray | None = None  # (L*D, B, H) initial states (models exported with h0/c0)
    c0: np.ndarray | None = None


@dataclass
class InferRequest:
    """One inference request as a frontend hands it over. `inputs`: numpy arrays by name;
    `outputs`: the output names asked for ([] = all); `parameters`: OIP request parameters as plain
    values (bool, int, float, str); `deadline`: time.monotonic() by which the client stops waiting."""

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, object] = field(default_factory=dict)
    deadline: float | None = None


@dataclass
class InferResponse:
    """The answer: the model version that ran, the outputs asked for (in order), and response
    parameters as plain values (a stateful chunk echoes its sequence_id and sequence_end)."""

    model_name: str
    model_version: str
    id: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, object] = field(default_factory=dict)


def to_parameter(key: str, value) -> pb.InferParameter:
    """A plain parameter value as OIP's InferParameter (an integer of 2**63 or more as uint64)."""
    if value is None:
        return pb.InferParameter()
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return pb.InferParameter(int64_param=value)
        if 2**63 <= value < 2**64:
            return pb.InferParameter(uint64_param=value)
        raise InvalidArgument(f"parameter '{key}': integers must fit in 64 bits, got {value}")
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise InvalidArgument(f"parameter '{key}': expected a bool, integer, number or string, got {type(value).__name__}")


def _sequence(parameters: dict[str, object]):
    keys = [k for k in ("sequence_id", "sequence_start", "sequence_end") if k in parameters]
    return parse_sequence({k: to_parameter(k, parameters[k]) for k in keys}) if keys else None


@dataclass
class _Call:
    """A step of a request: fn(*args); `infer` calls it in place, `infer_async` on an executor thread."""

    fn: Callable
    args: tuple


@dataclass
class _Wait:
    """A step of a request: the batcher's future, waited for until the client's deadline (+0.5 s)."""

    future: concurrent.futures.Future
    deadline: float | None
    model: str

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic()) + 0.5

    def expired(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"model '{self.model}': the client's deadline passed while queued")


# inputs above this size are validated (finite-value scan included) on an executor thread
_VALIDATE_INLINE_BYTES = 1 << 20
# requests up to this size may run on the event loop when nothing else is in progress (infer_async)
INLINE_MAX_BYTES = 64 << 10


def _oip(dtype: np.dtype) -> str:
    return next((name for name, (dt, _) in DATATYPES.items() if dt == dtype), str(dtype))


def _check_finite(name: str, array: np.ndarray, lengths: np.ndarray | None = None) -> None:
    """NaN/Inf values are refused: ONNX Runtime's CPU LSTM turns a NaN input into finite outputs
    (measured) where PyTorch gives NaN, so passing them on would answer with plausible numbers
    that agree with nothing. For `x` only the valid steps count (padding is never read)."""
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = ~finite
    if lengths is not None:
        bad &= (np.arange(array.shape[1])[None, :] < lengths[:, None])[..., None]
        if not bad.any():
            return
    where = [int(i) for i in np.argwhere(bad)[0]]
    raise InvalidArgument(
        f"input '{name}': values must be finite; {name}{where} = {array[tuple(where)]} "
        f"({int(bad.sum())} non-finite value(s){' within the valid lengths' if lengths is not None else ''})"
    )


def validate(rt: ModelRuntime, arrays: dict[str, np.ndarray], requested: list[str]) -> Prepared:
    """Check names, dtypes, ranks, sizes and lengths; messages name the input and the expectation."""
    known = [i.name for i in rt.inputs]
    for name in arrays:
        if name not in known:
            raise InvalidArgument(f"unknown input '{name}' for model '{rt.name}'; expected {known}")
    if "x" not in arrays:
        raise InvalidArgument(f"missing required input 'x' (FP32, shape [batch, time, {rt.features}])")
    x = arrays["x"]
    if x.dtype != np.float32:
        raise InvalidArgument(f"input 'x': datatype must be FP32, got {_oip(x.dtype)}")
    if x.ndim != 3:
        raise InvalidArgument(f"input 'x': expected rank 3 [batch, time, {rt.features}], got shape {list(x.shape)}")
    batch, steps, features = x.shape
    if features != rt.features:
        raise InvalidArgument(f"input 'x': feature size must be {rt.features} (model '{rt.name}'), got {features}")
    if batch < 1 or steps < 1:
        raise InvalidArgument(f"input 'x': batch and time must be >= 1, got shape {list(x.shape)}")
    rt.check_lengths(steps)
    if "lengths" in arrays:
        lengths = arrays["lengths"]
        if lengths.dtype != np.int64:
            raise InvalidArgument(f"input 'lengths': datatype must be INT64, got {_oip(lengths.dtype)}")
        if lengths.shape != (batch,):
            raise InvalidArgument(
                f"input 'lengths': expected shape [{batch}] (one length per sequence of 'x'), got {list(lengths.shape)}"
            )
        bad = np.flatnonzero((lengths < 1) | (lengths > steps))
        if bad.size:
            i = int(bad[0])
            raise InvalidArgument(
                f"input 'lengths': every length must be in 1..{steps} (the time size of 'x'); "
                f"lengths[{i}] = {int(lengths[i])}"
            )
    else:
        lengths = np.full((batch,), steps, np.int64)
    _check_finite("x", x, lengths)
    states = {}
    for name in rt.state_names:
        if name in arrays:
            expected = (rt.state_shape[0], batch, rt.state_shape[1])
            value = arrays[name]
            if value.dtype != np.float32:
                raise InvalidArgument(f"input '{name}': datatype must be FP32, got {_oip(value.dtype)}")
            if value.shape != expected:
                raise InvalidArgument(
                    f"input '{name}': expected shape {list(expected)} (layers*directions, batch, hidden), "
                    f"got {list(value.shape)}"
                )
            _check_finite(name, value)
            states[name] = np.ascontiguousarray(value)
    if states:  # a state not sent starts at zero (LSTM: h0 without c0 or the reverse)
        for name in rt.state_names:
            if name not in states:
                states[name] = np.zeros_like(next(iter(states.values())))
    names = rt.output_names
    outputs = list(requested) or names
    unknown = [n for n in outputs if n not in names]
    if unknown:
        raise InvalidArgument(f"requested output(s) {unknown} unknown; model '{rt.name}' has {names}")
    if len(set(outputs)) != len(outputs):
        raise InvalidArgument(f"requested outputs {outputs}: each may appear once")
    return Prepared(
        rt, np.ascontiguousarray(x), np.ascontiguousarray(lengths), outputs, states.get("h0"), states.get("c0")
    )


def axes_json(rt: ModelRuntime) -> dict[str, dict[str, int]]:
    """{tensor: {"batch": axis, "time": axis}} as the model file names them: what a client needs to
    split a batched response per sequence (ModelMetadata header `lstm-axes`, config parameter `axes`)."""
    out: dict[str, dict[str, int]] = {}
    for t in rt.inputs + rt.outputs:
        dims = {k: v for k, v in (("batch", t.batch_axis), ("time", t.time_axis)) if v is not None}
        if dims:
            out[t.name] = dims
    return out


# OIP datatype names -> Triton's model_config DataType values.
_TRITON_TYPES = {
    "BOOL": pb.TYPE_BOOL, "UINT8": pb.TYPE_UINT8, "UINT16": pb.TYPE_UINT16, "UINT32": pb.TYPE_UINT32,
    "UINT64": pb.TYPE_UINT64, "INT8": pb.TYPE_INT8, "INT16": pb.TYPE_INT16, "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64, "FP16": pb.TYPE_FP16, "FP32": pb.TYPE_FP32, "FP64": pb.TYPE_FP64,
    "BYTES": pb.TYPE_STRING, "BF16": pb.TYPE_BF16,
}  # fmt: skip


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        stats: Statistics,
        limits: Limits,
        policy: BatchPolicy | None = None,
        metrics: Metrics | None = None,
        sequences: SequenceStore | None = None,
        max_message_bytes: int = 256 << 20,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        """`max_message_bytes`: the largest response a frontend can send (--max-message-mb);
        requests whose outputs would not fit are refused before they run. `executor`: the threads
        `infer_async` runs ONNX Runtime (and large validations) on (default: 32 threads)."""
        self.repository = repository
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="infer")
        self.max_message_bytes = max_message_bytes
        self.stats = stats
        self.limits = limits
        self.policy = policy or BatchPolicy(enabled=False)
        self.metrics = metrics or Metrics()
        self._lock = threading.Lock()
        repository.on_retire = self._retire
        repository.config_check = lambda name, config: self.policy_from_config(name, config)
        self.sequences = sequences if sequences is not None else SequenceStore()

    # -- batching ---------------------------------------------------------------------------
    def policy_for(self, rt: ModelRuntime) -> BatchPolicy:
        """Server defaults, overridden by the model's config.json {"batching": {...}}."""
        return self.policy_from_config(rt.name, rt.model_config)

    def policy_from_config(self, name: str, config: dict) -> BatchPolicy:
        """Checked when a model loads (a bad config.json fails the load, not every request)."""
        override = config.get("batching", {})
        if not isinstance(override, dict):
            raise InvalidArgument(f"model '{name}' config.json: 'batching' must be an object")
        fields = {f.name for f in dataclasses.fields(BatchPolicy)}
        unknown = sorted(set(override) - fields)
        if unknown:
            raise InvalidArgument(f"model '{name}' config.json: unknown batching option(s) {unknown}")
        try:
            return dataclasses.replace(self.policy, **override)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"model '{name}' config.json: {exc}") from None

    def _batcher(self, rt: ModelRuntime) -> Batcher | None:
        if rt.batcher is None:
            with self._lock:
                if rt.batcher is None:
                    policy = self.policy_for(rt)
                    if not policy.enabled or not rt.batchable:  # no batch axis named in the file: unbatched
                        rt.batcher = False
                    else:
                        rt.batcher = Batcher(
                            f"{rt.name}:{rt.version}",
                            rt.run,
                            policy,
                            on_batch=lambda info, rt=rt: self._on_batch(rt, info),
                            executor=self.executor,
                            axes=rt.output_axes,
                        )
        return rt.batcher or None

    def _on_batch(self, rt: ModelRuntime, info: BatchInfo) -> None:
        self.stats.record_execution(rt.name, rt.version, info.sequences, info.infer_ns)
        m = self.metrics
        m.infer.labels(rt.name).observe(info.infer_ns / 1e9)
        m.batch.labels(rt.name).observe(info.sequences)
        m.batch_requests.labels(rt.name).observe(info.requests)
        m.padding.labels(rt.name).observe(info.padding_fraction)

    def _retire(self, runtimes: list[ModelRuntime]) -> None:
        with self._lock:  # with _batcher(): no batcher is created for a retired version later
            for rt in runtimes:
                if rt.batcher:
                    rt.batcher.close()  # queued requests still run, then its threads exit
                rt.batcher = False  # late requests on this version run directly

    def _execute(self, p: Prepared, deadline: float | None, inline: bool):
        """Steps (see `_steps`) that run a prepared request; returns (outputs, queue_ns, infer_ns)."""
        rt = p.runtime
        batcher = self._batcher(rt)
        if batcher is not None:
            # inline: an idle batcher runs the request in this (the caller's) thread; else it is
            # queued for the batcher's own thread (an event loop must not run ONNX Runtime)
            future = batcher.submit(p.x, p.lengths, p.outputs, deadline, p.h0, p.c0, inline=inline)
            self.metrics.queue_depth.labels(rt.name).set(batcher.queue_depth())
            # the client's deadline bounds the wait (a request expired in the queue is not run)
            result, queue_ns, info = yield _Wait(future, deadline, rt.name)
            self.metrics.queue.labels(rt.name).observe(max(queue_ns, 0) / 1e9)
            return result, max(queue_ns, 0), info.infer_ns
        t0 = time.perf_counter_ns()
        out = yield _Call(rt.run, (p.x, p.lengths, p.outputs, p.h0, p.c0))
        infer_ns = time.perf_counter_ns() - t0
        steps = p.x.shape[1]
        pad = 1.0 - float(p.lengths.sum()) / (p.x.shape[0] * steps)
        self._on_batch(rt, BatchInfo(1, p.x.shape[0], steps, pad, infer_ns))
        return out, 0, infer_ns

    # -- requests ---------------------------------------------------------------------------
    def infer(self, request: InferRequest) -> InferResponse:
        """Run a request in the calling thread (an idle batcher runs it right here, no hand-off)."""
        steps = self._steps(request, inline=True)
        value, error = None, None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                if isinstance(step, _Call):
                    value = step.fn(*step.args)
                else:
                    try:
                        value = step.future.result(timeout=step.timeout())
                    except concurrent.futures.TimeoutError:
                        raise step.expired() from None
            except BaseException as exc:  # noqa: BLE001 - handed back to the request's own steps
                error = exc

    async def infer_async(self, request: InferRequest, alone: bool = False) -> InferResponse:
        """Run a request from an event loop: ONNX Runtime runs on the batcher's or the executor's
        threads while the loop awaits it. Cancelling the caller (a client gone) cancels a request
        still queued; a running one completes and its sequence state stays consistent.

        `alone`: the frontend has no other call in progress. Then a small request (inputs of at
        most `INLINE_MAX_BYTES`) that finds its model idle runs right here on the loop, as `infer`
        would: no hand-off to another thread and back (measured ~0.5 ms per call on one core);
        the loop is busy for that one small run, which no other call was waiting for."""
        loop = asyncio.get_running_loop()
        here = alone and sum(a.nbytes for a in request.inputs.values()) <= INLINE_MAX_BYTES
        steps = self._steps(request, inline=here)
        value, error = None, None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                if isinstance(step, _Call):
                    if here:
                        value = step.fn(*step.args)
                    else:
                        value = await loop.run_in_executor(self.executor, step.fn, *step.args)
                elif step.future.done():  # ran inline (an idle batcher) or already answered
                    value = step.future.result()
                else:
                    try:
                        value = await asyncio.wait_for(asyncio.wrap_future(step.future), step.timeout())
                    except asyncio.TimeoutError:
                        raise step.expired() from None
            except BaseException as exc:  # noqa: BLE001 - handed back to the request's own steps
                error = exc

    def _steps(self, request: InferRequest, inline: bool):
        """A request as a generator of steps (`_Call`, `_Wait`) that `infer` and `infer_async`
        drive; written once, so both run the same checks, batching, sequences and statistics."""
        start = time.perf_counter_ns()
        rt: ModelRuntime | None = None
        code = "OK"
        try:
            rt = self.repository.get(request.model_name, request.model_version)
            self._check_limits(request.inputs)
            sequence = _sequence(request.parameters)
            if sequence is not None:
                return (yield from self._sequence_steps(rt, request, sequence, start, inline))
            args = (rt, request.inputs, list(request.outputs))
            large = sum(a.nbytes for a in request.inputs.values()) > _VALIDATE_INLINE_BYTES
            prepared = (yield _Call(validate, args)) if large else validate(*args)
            return (yield from self._respond(rt, request, prepared, start, inline))
        except ServingError as exc:
            code = exc.code.name
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            label = rt.name if rt is not None else "_unknown"
            elapsed = time.perf_counter_ns() - start
            if rt is not None and code != "OK":
                self.stats.record_failure(rt.name, rt.version, elapsed)
            self.metrics.requests.labels(label, code).inc()
            self.metrics.latency.labels(label).observe(elapsed / 1e9)

    def _check_limits(self, inputs: dict[str, np.ndarray]) -> None:
        """--max-elements per tensor (frontends also check shapes before they allocate) and
        --max-request-batch sequences per request."""
        limit = self.limits.max_elements
        for name, array in inputs.items():
            if array.size > limit or any(d > limit for d in array.shape):
                raise ResourceExhausted(
                    f"input '{name}': shape {list(array.shape)} is {array.size} elements, "
                    f"more than the limit of {limit} (or a dimension above it)"
                )
        x = inputs.get("x")
        if x is not None and x.ndim >= 1 and x.shape[0] > self.limits.max_batch:
            raise ResourceExhausted(
                f"input 'x': {x.shape[0]} sequences exceed the per-request limit of {self.limits.max_batch}"
            )

    def _respond(self, rt: ModelRuntime, request: InferRequest, prepared: Prepared, start: int, inline: bool,
                 returned=None, after=None):  # fmt: skip
        """Steps that run a prepared request and build its response. `returned`: outputs the
        client gets (default: all that ran); `after(outputs)`: called with the outputs first."""
        self._check_response_size(prepared, returned or prepared.outputs, request)
        t_in = time.perf_counter_ns()
        outputs, queue_ns, infer_ns = yield from self._execute(prepared, request.deadline, inline)
        if after is not None:
            after(outputs)
        t_run = time.perf_counter_ns()
        response = InferResponse(
            rt.name, str(rt.version), request.id, {name: outputs[name] for name in returned or prepared.outputs}
        )
        end = time.perf_counter_ns()
        self.stats.record_success(
            rt.name, rt.version, end - start, queue_ns, t_in - start, infer_ns, end - t_run, prepared.x.shape[0]
        )
        return response

    def output_shapes(self, prepared: Prepared, names: list[str]) -> dict[str, tuple[list[int], int]] | None:
        """The shape and bytes each output will have, from the request's batch and time and the
        axes probed when the model version loaded (`repository.output_axes`), before anything
        runs; None when that version's outputs could not be probed."""
        rt = prepared.runtime
        axes = output_axes(rt)
        if not axes:
            return None
        size = {"batch": prepared.x.shape[0], "time": prepared.x.shape[1]}
        datatypes = {o.name: o.datatype for o in rt.outputs}
        shapes = {}
        for name in names:
            dims = [size.get(axis, axis) for axis in axes[name]]
            itemsize = DATATYPES[datatypes[name]][0].itemsize if datatypes.get(name) in DATATYPES else 8
            shapes[name] = (dims, math.prod(dims) * itemsize)  # Python ints: exact, ~10x faster than np.prod
        return shapes

    def _check_response_size(self, prepared: Prepared, names: list[str], request) -> None:
        """RESOURCE_EXHAUSTED before any compute when the response could not be sent."""
        shapes = self.output_shapes(prepared, names)
        if shapes is None:
            return
        # protobuf framing: names, datatypes, shapes, the echoed id and parameters (generous)
        total = sum(size for _, size in shapes.values()) + 1024 + len(request.id) + 64 * len(shapes)
        if total > self.max_message_bytes:
            parts = ", ".join(f"'{n}' {dims} = {size:,} B" for n, (dims, size) in shapes.items())
            raise ResourceExhausted(
                f"the response would be about {total:,} bytes (outputs {parts}), more than the message limit of "
                f"{self.max_message_bytes:,} bytes (--max-message-mb); request fewer outputs (e.g. only 'h_n'), "
                "or fewer or shorter sequences per request"
            )

    def record_send_failure(self, response: InferResponse | pb.ModelInferResponse, code, elapsed_ns: int) -> None:
        """For frontends: the response `infer`/`infer_async` returned (counted OK) could not be sent
        (a gRPC write or REST socket write raised, the call was cancelled or its deadline passed
        before the reply went out). Moves the request from success to fail in ModelStatistics and
        counts it in lstm_send_failures_total{model, code}. `code`: a grpc.StatusCode or its name;
        `elapsed_ns`: receipt to failure, as the frontend measured it."""
        try:
            version = int(response.model_version)
        except ValueError:
            return
        code_name = getattr(code, "name", str(code))
        self.stats.record_send_failure(response.model_name, version, elapsed_ns)
        self.metrics.send_failures.labels(response.model_name, code_name).inc()

    def _sequence_steps(self, rt: ModelRuntime, request: InferRequest, sequence, start: int, inline: bool):
        """Steps of one chunk of a server-side stateful sequence (Triton's sequence_id/start/end)."""
        seq_id, first, last = sequence
        if not first:  # later chunks run, and are checked, on the version the sequence started on
            pinned = self.sequences.version_of(rt.name, seq_id)
            if pinned is not None and pinned != rt.version:
                try:
                    rt = self.repository.get(rt.name, str(pinned))
                except ServingError:
                    self.sequences.drop(rt.name, seq_id)
                    raise NotFound(
                        f"sequence {seq_id!r} started on version {pinned} of model '{rt.name}', which is no longer "
                        "loaded; its state is freed: start it again with sequence_start"
                    ) from None
        if rt.state_shape is None:
            raise InvalidArgument(
                f"model '{rt.name}' has no initial-state inputs (h0, or h0 and c0), so it cannot keep state between "
                "chunks; export it with `python -m export --initial-state`"
            )
        if rt.bidirectional:
            raise InvalidArgument(
                f"model '{rt.name}' is bidirectional: its backward direction needs the whole sequence, so it "
                "cannot be streamed in chunks; send whole sequences, or use a unidirectional model"
            )
        arrays = request.inputs
        if not first and ("h0" in arrays or "c0" in arrays):
            raise InvalidArgument(
                "inputs 'h0'/'c0' are only accepted with sequence_start; later chunks continue from the state "
                "the server keeps"
            )
        if not arrays and not last:
            raise InvalidArgument("missing required input 'x' (only a sequence_end request may carry no inputs)")
        prepared = validate(rt, arrays, list(request.outputs)) if arrays else None
        if prepared is not None and prepared.x.shape[0] != 1:
            raise InvalidArgument(
                f"input 'x': a sequence chunk carries one sequence (batch 1), got batch {prepared.x.shape[0]}"
            )
        ld, hidden = rt.state_shape
        zeros = np.zeros((ld, 1, hidden), np.float32)
        h0 = prepared.h0 if prepared is not None and prepared.h0 is not None else zeros
        c0 = prepared.c0 if prepared is not None and prepared.c0 is not None else zeros
        if "c0" not in rt.state_names:  # GRU and RNN carry one state
            c0 = None
        state_outputs = rt.state_outputs  # ["h_n", "c_n"] (LSTM) or ["h_n"]
        state = self.sequences.acquire(rt.name, rt.version, seq_id, first, h0, c0)
        stored: dict[str, np.ndarray] = {}
        try:
            if state.version != rt.version:  # pinned above; only a restart in between gets here
                raise NotFound(f"sequence {seq_id!r}: its version changed while this chunk was prepared; retry")
            if prepared is None:  # end without data: return the final state and free it
                stored = {"h_n": state.h, "c_n": state.c} if "c_n" in state_outputs else {"h_n": state.h}
                wanted = list(request.outputs) or state_outputs
                bad = [n for n in wanted if n not in stored]
                if bad:
                    raise InvalidArgument(
                        f"an end-only sequence request returns {' and '.join(state_outputs)}, not {bad}"
                    )
                response = InferResponse(rt.name, str(rt.version), request.id, {n: stored[n] for n in wanted})
            else:
                returned = prepared.outputs
                prepared = dataclasses.replace(
                    prepared, runtime=rt, h0=state.h, c0=state.c,
                    outputs=sorted(set(prepared.outputs) | set(state_outputs)),
                )  # fmt: skip
                response = yield from self._respond(rt, request, prepared, start, inline, returned, stored.update)
        except BaseException:
            self.sequences.release(rt.name, seq_id, None, None, False)
            raise
        self.sequences.release(rt.name, seq_id, stored["h_n"], stored.get("c_n"), last)
        response.parameters["sequence_id"] = request.parameters["sequence_id"]
        response.parameters["sequence_end"] = last
        return response

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        """Triton's ModelConfig view of a model version (what tritonclient's get_model_config reads).

        max_batch_size is 0: the dims below are whole shapes, batch included, because the batch axis
        is not first in every tensor (h0/c0/h_n/c_n are [layers*directions, batch, hidden]). The
        server still merges concurrent requests along each tensor's batch axis: dynamic_batching
        says so when it is on (for models with h0/c0 inputs, sequence_batching takes its place, as
        upstream allows only one). Everything else this server knows (export metadata, execution
        provider, static length, the full batching policy) is in `parameters`, as strings.
        """
        rt = self.repository.get(name, version)
        policy = self.policy_for(rt)
        optional = {"lengths", "h0", "c0"}  # validate(): lengths default to full, states to zeros
        config = pb.ModelConfig(
            name=rt.name,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=0,
            version_policy=pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All()),
        )
        for t in rt.inputs:
            config.input.add(
                name=t.name, data_type=_TRITON_TYPES[t.datatype], dims=t.shape, optional=t.name in optional
            )
        for t in rt.outputs:
            config.output.add(name=t.name, data_type=_TRITON_TYPES[t.datatype], dims=t.shape)
        gpu = rt.provider == "CUDAExecutionProvider"
        config.instance_group.add(
            name=f"{rt.name}_0",
            count=policy.instances if policy.enabled else 1,
            kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU,
        )
        if rt.state_shape is not None:  # one of the two (a oneof upstream); batching stays in `parameters`
            config.sequence_batching.max_sequence_idle_microseconds = int(self.sequences.idle_s * 1e6)
        elif policy.enabled:
            config.dynamic_batching.max_queue_delay_microseconds = policy.max_queue_delay_us
        params = {f"export.{k}": str(v) for k, v in rt.export_metadata.items()}
        params["execution_provider"] = rt.provider
        if rt.static_length is not None:
            params["static_length"] = str(rt.static_length)
        params["axes"] = json.dumps(axes_json(rt), sort_keys=True)
        params["model_version"] = str(rt.version)
        params.update({f"batching.{k}": json.dumps(v) for k, v in dataclasses.asdict(policy).items()})
        for key, value in sorted(params.items()):
            config.parameters[key].string_value = value
        return pb.ModelConfigResponse(config=config)

    def model_metadata(self, name: str, version: str) -> tuple[pb.ModelMetadataResponse, dict[str, str]]:
        rt = self.repository.get(name, version)
        entry = self.repository.entry(name)
        versions = sorted(entry.versions) if entry else [rt.version]
        response = pb.ModelMetadataResponse(
            name=rt.name, versions=[str(v) for v in versions], platform="onnxruntime_onnx"
        )
        for info, target in ((rt.inputs, response.inputs), (rt.outputs, response.outputs)):
            for t in info:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        policy = self.policy_for(rt)
        headers = {
            "lstm-export-metadata": json.dumps(rt.export_metadata, sort_keys=True),
            "lstm-provider": rt.provider,
            "lstm-static-length": str(rt.static_length or ""),
            "lstm-model-version": str(rt.version),
            "lstm-batching": json.dumps(dataclasses.asdict(policy), sort_keys=True),
            "lstm-axes": json.dumps(axes_json(rt), sort_keys=True),
        }
        return response, headers
