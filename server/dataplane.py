"""The data plane: a decoded request checked against a model (`server.validate`), run (batched), the response built.

Transport-free: requests come in as numpy arrays and plain parameters (`InferRequest`) and leave as
numpy arrays (`InferResponse`); the gRPC servicer, the HTTP/REST app and the Ray Serve deployment
each convert their wire format to and from these. `infer` runs a request in the calling thread;
`infer_async` runs it from an asyncio event loop, with ONNX Runtime on executor threads (an idle or
waiting request costs a coroutine, not a thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server import classification, control
from server.batcher import Batcher, BatchInfo, BatchPolicy, Work, run_alone
from server.codec import Limits, check_shape
from server.dtypes import OBJECT, numpy_dtype
from server.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, ServingError, clip
from server.layout import output_dims
from server.metrics import Metrics
from server.osthread import thread_pool
from server.repository import ModelRepository
from server.runtime import RunControl, Runtime
from server.sequences import SequenceStore, parse_sequence
from server.stats import Statistics
from server.ticket import Ticket
from server.validate import Prepared, initial_state, validate


@dataclass
class InferRequest:
    """One inference request as a frontend hands it over. `inputs`: numpy arrays by name;
    `outputs`: the output names asked for ([] = all); `parameters`: OIP request parameters as plain
    values (bool, int, float, str); `deadline`: time.monotonic() by which the client stops waiting;
    `client`: who sent it (bearer token or connection, `memory.client_key`) for per-client shares."""

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, object] = field(default_factory=dict)
    deadline: float | None = None
    client: str = ""
    output_parameters: dict[str, dict[str, object]] = field(default_factory=dict)  # per requested output
    checked: bool = False  # the frontend checked each input's shape against the limits (`codec.check_shape`)


@dataclass
class InferResponse:
    """The answer: the model version that ran, the outputs asked for (in order), and response
    parameters as plain values (a stateful chunk echoes its sequence_id and sequence_end)."""

    model_name: str
    model_version: str
    id: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    parameters: dict[str, object] = field(default_factory=dict)


def _sequence(parameters: dict[str, object]):
    keys = [k for k in ("sequence_id", "sequence_start", "sequence_end") if k in parameters]
    return parse_sequence({k: parameters[k] for k in keys}) if keys else None


@dataclass
class _Call:
    """A step of a request: fn(*args); `infer` calls it in place, `infer_async` on an executor thread."""

    fn: Callable
    args: tuple
    control: RunControl | None = None  # the ONNX Runtime run inside, stopped if the caller goes away


@dataclass
class _Wait:
    """A step of a request: the batcher's future, waited for until the client's deadline (+0.5 s)."""

    future: Ticket
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
        self.executor = executor or thread_pool("infer", 32)
        self.max_message_bytes = max_message_bytes
        self.stats = stats
        self.limits = limits
        self.policy = policy or BatchPolicy(enabled=False)
        self.metrics = metrics or Metrics()
        self.sequences = sequences if sequences is not None else SequenceStore()

    # -- batching ---------------------------------------------------------------------------
    def policy_for(self, rt: Runtime) -> BatchPolicy:
        """The model's batching policy (server defaults + its config), settled when it loaded."""
        return rt.policy if rt.policy is not None else self.policy

    def _batcher(self, rt: Runtime) -> Batcher | None:
        if rt.batcher is None:
            with rt.lock:  # with ModelRuntime.retire(): no batcher is created for a retired version
                if rt.batcher is None:
                    policy = self.policy_for(rt)
                    if rt.retired or not policy.enabled or not rt.batchable:
                        rt.batcher = False  # no batch axis in some tensor: each request runs alone
                    else:
                        rt.batcher = Batcher(
                            f"{rt.name}:{rt.version}",
                            rt.run,
                            policy,
                            on_batch=lambda info, rt=rt: self._on_batch(rt, info),
                            executor=self.executor,
                            signature=rt.signature,
                            stoppable=True,
                        )
        return rt.batcher or None

    def _on_batch(self, rt: Runtime, info: BatchInfo) -> None:
        self.stats.record_execution(rt.name, rt.version, info.sequences, info.infer_ns)
        m = self.metrics.model(rt.name)
        m.infer.observe(info.infer_ns / 1e9)
        m.batch.observe(info.sequences)
        m.batch_requests.observe(info.requests)
        m.padding.observe(info.padding_fraction)

    def _execute(self, p: Prepared, deadline: float | None, inline: bool):
        """Steps (see `_steps`) that run a prepared request; returns (outputs, queue_ns, infer_ns)."""
        rt = p.runtime
        batcher = self._batcher(rt)
        if batcher is not None:
            # inline: an idle batcher runs the request in this (the caller's) thread; else it is
            # queued for the batcher's own thread (an event loop must not run ONNX Runtime)
            future = batcher.submit(p.work, deadline, inline=inline)
            m = self.metrics.model(rt.name)
            m.queue_depth.set(batcher.queued())
            # the client's deadline bounds the wait (a request expired in the queue is not run)
            result, queue_ns, info = yield _Wait(future, deadline, rt.name)
            m.queue.observe(max(queue_ns, 0) / 1e9)
            return result, max(queue_ns, 0), info.infer_ns
        # a run by itself can be stopped: at the client's deadline, or when the client goes away
        control = RunControl(deadline)
        run = functools.partial(rt.run, control=control)
        out, info = yield _Call(run_alone, (p.work, run, rt.signature), control)
        self._on_batch(rt, info)
        return out, 0, info.infer_ns

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
        the loop is busy for that one small run, which no other call was waiting for. Only for a
        model version whose work is bounded by its inputs' sizes (`ModelRuntime.bounded`, decided
        at load): a run whose length a request's values choose (a Loop's trip count) never runs
        on the loop. A run by itself is stopped (ONNX Runtime's terminate flag) when the caller is
        cancelled and at its deadline."""
        loop = asyncio.get_running_loop()
        here = alone and sum(a.nbytes for a in request.inputs.values()) <= INLINE_MAX_BYTES
        if here:
            try:
                here = self.repository.get(request.model_name, request.model_version).bounded
            except ServingError:
                here = False  # the steps say why
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
                        running = loop.run_in_executor(self.executor, step.fn, *step.args)
                        try:
                            value = await running
                        except asyncio.CancelledError:
                            if step.control is not None:  # the caller left: stop ONNX Runtime
                                step.control.stop("cancelled")
                                running.add_done_callback(_retrieve)
                            raise
                elif step.future.done():  # ran inline (an idle batcher) or already answered
                    value = step.future.result()
                else:
                    value = await _wait(loop, step)
            except BaseException as exc:  # noqa: BLE001 - handed back to the request's own steps
                error = exc

    def _steps(self, request: InferRequest, inline: bool):
        """A request as a generator of steps (`_Call`, `_Wait`) that `infer` and `infer_async`
        drive; written once, so both run the same checks, batching, sequences and statistics."""
        start = time.perf_counter_ns()
        rt: Runtime | None = None
        code = "OK"
        try:
            rt = self.repository.get(request.model_name, request.model_version)
            if not request.checked:
                self._check_limits(request.inputs)
            sequence = _sequence(request.parameters)
            if sequence is not None:
                return (yield from self._sequence_steps(rt, request, sequence, start, inline))
            args = (rt, request.inputs, list(request.outputs))
            large = sum(a.nbytes for a in request.inputs.values()) > _VALIDATE_INLINE_BYTES
            prepared = (yield _Call(validate, args)) if large else validate(*args)
            self._check_rows(prepared)
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
            elapsed = time.perf_counter_ns() - start
            if rt is not None and code != "OK":
                self.stats.record_failure(rt.name, rt.version, elapsed)
            m = self.metrics.model(rt.name if rt is not None else "_unknown")
            m.requests(code).inc()
            m.latency.observe(elapsed / 1e9)

    def _check_limits(self, inputs: dict[str, np.ndarray]) -> None:
        """--max-elements per tensor, for callers that hand the data plane arrays directly (the
        frontends check the same, with the same function, before they allocate anything)."""
        for name, array in inputs.items():
            check_shape(name, array.shape, self.limits)

    def _check_rows(self, prepared: Prepared) -> None:
        """--max-request-batch sequences per request, and config.pbtxt's max_batch_size (Triton's)."""
        mbs = prepared.runtime.signature.max_batch_size
        if mbs > 0 and prepared.work.rows > mbs:
            raise InvalidArgument(
                f"model '{prepared.runtime.name}': batch size {prepared.work.rows} is more than its config.pbtxt "
                f"max_batch_size {mbs}"
            )
        if prepared.work.rows > self.limits.max_batch:
            raise ResourceExhausted(
                f"{prepared.work.rows} sequences in one request exceed the per-request limit of {self.limits.max_batch}"
            )

    def _respond(self, rt: Runtime, request: InferRequest, prepared: Prepared, start: int, inline: bool,
                 returned=None, after=None):  # fmt: skip
        """Steps that run a prepared request and build its response. `returned`: outputs the
        client gets (default: all that ran); `after(outputs)`: called with the outputs first."""
        names = returned if returned is not None else prepared.outputs
        self._check_response_size(prepared, names, request)
        t_in = time.perf_counter_ns()
        outputs, queue_ns, infer_ns = yield from self._execute(prepared, request.deadline, inline)
        if after is not None:
            after(outputs)
        t_run = time.perf_counter_ns()
        response = InferResponse(rt.name, str(rt.version), request.id, {name: outputs[name] for name in names})
        response.outputs = classification.apply(rt, request.output_parameters, response.outputs)
        # what came out, too: a prediction made on zeros cannot see outputs sized by input values (Tile, Range)
        outputs = response.outputs
        detail = lambda: {n: (list(a.shape), _nbytes(a)) for n, a in outputs.items()}  # noqa: E731 - refusals only
        self._check_size(sum(_nbytes(a) for a in outputs.values()), request, detail, len(outputs))
        end = time.perf_counter_ns()
        self.stats.record_success(
            rt.name, rt.version, end - start, queue_ns, t_in - start, infer_ns, end - t_run, prepared.work.rows
        )
        return response

    def output_shapes(self, prepared: Prepared, names: list[str]) -> dict[str, tuple[list[int], int]] | None:
        """The shape and bytes each output will have, from the request's batch and time and the
        layout probed when the model version loaded (`layout.probe_output_layout`), before
        anything runs; None when that version's outputs could not be probed (or are strings)."""
        rt = prepared.runtime
        shapes = {}
        for name in names:
            spec = rt.signature.output(name)
            dims = output_dims(rt, name, prepared.work.rows, prepared.work.steps or 1)
            if dims is None or spec is None or spec.datatype == "BYTES":
                return None
            shapes[name] = (dims, math.prod(dims) * numpy_dtype(spec.datatype).itemsize)
        return shapes

    def _check_response_size(self, prepared: Prepared, names: list[str], request) -> None:
        """RESOURCE_EXHAUSTED before any compute when the response could not be sent. The outputs'
        bytes are computed once per (batch, time, outputs) and model version (`Signature.plans`)."""
        w, sig = prepared.work, prepared.runtime.signature
        key = ("response", w.rows, w.steps, *names)
        payload = sig.plans.get(key, False)
        if payload is False:
            shapes = self.output_shapes(prepared, names)  # None: unknown before the run
            payload = sig.remember(
                key, (sum(size for _, size in shapes.values()), shapes) if shapes is not None else None
            )
        if payload is not None:
            self._check_size(payload[0], request, payload[1])

    def _check_size(self, payload: int, request, shapes, count: int | None = None) -> None:
        """`shapes`: {output: (dims, bytes)}, or a callable giving it with `count` its length (built
        only for the refusal's message)."""
        # protobuf framing: names, datatypes, shapes, the echoed id and parameters (generous)
        total = payload + 1024 + len(request.id) + 64 * (len(shapes) if count is None else count)
        if total > self.max_message_bytes:
            if callable(shapes):
                shapes = shapes()
            parts = ", ".join(f"'{n}' {dims} = {size:,} B" for n, (dims, size) in shapes.items())
            raise ResourceExhausted(
                f"the response would be about {total:,} bytes (outputs {parts}), more than the message limit of "
                f"{self.max_message_bytes:,} bytes (--max-message-mb); request fewer outputs, "
                "or fewer or shorter sequences per request"
            )

    def record_send_failure(self, response, code, elapsed_ns: int) -> None:
        """For frontends: the response `infer`/`infer_async` returned (counted OK) could not be sent
        (a gRPC write or REST socket write raised, the call was cancelled or its deadline passed
        before the reply went out). Moves the request from success to fail in ModelStatistics and
        counts it in lstm_send_failures_total{model, code}. `response`: the InferResponse (or
        anything with model_name and model_version); `code`: a grpc.StatusCode or its name;
        `elapsed_ns`: receipt to failure, as the frontend measured it."""
        try:
            version = int(response.model_version)
        except ValueError:
            return
        code_name = getattr(code, "name", str(code))
        self.stats.record_send_failure(response.model_name, version, elapsed_ns)
        self.metrics.send_failures.labels(response.model_name, code_name).inc()

    def _sequence_steps(self, rt: Runtime, request: InferRequest, sequence, start: int, inline: bool):
        """Steps of one chunk of a server-side stateful sequence (Triton's sequence_id/start/end)."""
        seq_id, first, last = sequence
        if not first:  # later chunks run, and are checked, on the version the sequence started on
            pinned = self.sequences.version_of(rt.name, seq_id, client=request.client)
            if pinned is not None and pinned != rt.version:
                try:
                    rt = self.repository.get(rt.name, str(pinned))
                except ServingError:
                    self.sequences.drop(rt.name, seq_id, client=request.client)
                    raise NotFound(
                        f"sequence {seq_id!r} started on version {pinned} of model '{rt.name}', which is no longer "
                        "loaded; its state is freed: start it again with sequence_start"
                    ) from None
        sig = rt.signature
        if not sig.stateful:
            raise InvalidArgument(
                f"model '{rt.name}' keeps no state between requests (no state inputs: h0/c0 of a "
                "`python -m export --initial-state` export, or config.pbtxt sequence_batching.state), so it "
                "cannot continue a sequence across chunks"
            )
        if sig.bidirectional:
            raise InvalidArgument(
                f"model '{rt.name}' is bidirectional: its backward direction needs the whole sequence, so it "
                "cannot be streamed in chunks; send whole sequences, or use a unidirectional model"
            )
        arrays = request.inputs
        sent_state = [n for n in sig.state_input_names() if n in arrays]
        if not first and sent_state:
            raise InvalidArgument(
                f"input(s) {sent_state} are only accepted with sequence_start; later chunks continue from the "
                "state the server keeps"
            )
        if not arrays and not last:
            required = [t.name for t in sig.inputs if not t.optional]
            raise InvalidArgument(
                f"missing required input(s) {required} (only a sequence_end request may carry no inputs)"
            )
        prepared = validate(rt, arrays, list(request.outputs), sequence=True, states=first) if arrays else None
        if prepared is not None and prepared.work.rows != 1:
            first_batched = next((t.name for t in sig.inputs if t.batch_axis is not None and t.name in arrays), "")
            raise InvalidArgument(  # Triton's leading words: its clients and QA tests match them
                f"inference request to model '{rt.name}' must specify batch-size 1 due to requirements of sequence "
                f"batcher: input '{first_batched}': a sequence chunk carries one sequence (batch 1), got batch "
                f"{prepared.work.rows}"
            )
        initial = {}  # a start's state: what it sent, the config's initial_state or zeros
        if first:
            initial = {n: prepared.feeds[n] for n in sig.state_input_names()} if prepared else initial_state(sig, 1)
        triton = rt.repo_config.get("triton")
        idle_s = triton.idle_us / 1e6 if triton is not None and triton.idle_us else None
        controls = control.feeds(sig.controls, sig.control_shapes, seq_id, first, last) if prepared else {}
        slots = control.slots_for(self.sequences)
        if first and triton is not None and triton.max_sequences:
            live = lambda other: self.sequences.version_of(rt.name, other) is not None  # noqa: E731
            why = "sequence_batching.oldest.max_candidate_sequences"
            slots.take(rt.name, rt.version, seq_id, triton.max_sequences, live, why, self.sequences.sweep)
        try:
            state = self.sequences.acquire(rt.name, rt.version, seq_id, first, initial, idle_s, client=request.client)
        except NotFound as exc:  # not live: Triton's leading words, then why (never started, freed when idle)
            raise NotFound(
                f"inference request for sequence {clip(seq_id)} to model '{rt.name}' must specify the START flag on "
                f"the first request of the sequence: {exc.message}"
            ) from None
        stored: dict[str, np.ndarray] = {}
        pairs = sig.states
        try:
            if state.version != rt.version:  # pinned above; only a restart in between gets here
                raise NotFound(f"sequence {seq_id!r}: its version changed while this chunk was prepared; retry")
            visible = [p for p in pairs if not p.implicit]
            if prepared is None:  # end without data: return the final state and free it
                current = {p.output: state.state[p.input] for p in visible}
                wanted = list(request.outputs) or [p.output for p in visible]
                bad = [n for n in wanted if n not in current]
                if bad:
                    raise InvalidArgument(
                        f"an end-only sequence request returns {' and '.join(current) or 'nothing'}, not {clip(bad)}"
                    )
                stored = dict(state.state)
                response = InferResponse(rt.name, str(rt.version), request.id, {n: current[n] for n in wanted})
            else:
                returned = prepared.outputs
                feeds = {**prepared.feeds, **state.state, **controls}
                w = prepared.work  # as dataclasses.replace(w, feeds=..., outputs=..., key=None), at a third the cost
                cells = w.cells  # a model without a ragged input: per row, its largest input, the state included
                if sig.ragged is None:
                    cells = max([cells, *(a.size // w.rows for a in state.state.values())])
                work = Work(feeds, sorted(set(returned) | {p.output for p in pairs}), w.rows, w.steps, None, cells,
                            w.signature)  # fmt: skip

                def keep(outputs):  # each state output as its own copy (the run's are views of a merged
                    for p in pairs:  # batch), which the reply then reads too: one copy, not one for each
                        stored[p.input] = outputs[p.output] = np.array(outputs[p.output])

                response = yield from self._respond(rt, request, Prepared(rt, work), start, inline, returned, keep)
        except BaseException:
            self.sequences.release(rt.name, seq_id, None, False, client=request.client)
            raise
        self.sequences.release(rt.name, seq_id, stored, last, client=request.client)
        if last:
            slots.free(rt.name, rt.version, seq_id)
        response.parameters["sequence_id"] = request.parameters["sequence_id"]
        response.parameters["sequence_end"] = last
        return response


async def _wait(loop: asyncio.AbstractEventLoop, step: _Wait):
    """The batcher's answer, awaited until the step's timeout (as `asyncio.wait_for` over
    `asyncio.wrap_future`, with one timer and no extra future or task per request): at the timeout
    a still-queued request is not run and the step's DeadlineExceeded is raised; the caller
    cancelled: the request leaves (`Ticket.leave`)."""
    waiter = step.future.wait_on(loop)
    timeout = step.timeout()
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        waiter.cancel()  # and so the ticket, while it is queued

    timer = loop.call_later(timeout, expire) if timeout is not None else None
    try:
        return await waiter
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if expired and not (task is not None and task.cancelling()):
            raise step.expired() from None
        step.future.leave()  # the caller left: not run, or its run stopped once every request in it left
        raise
    finally:
        if timer is not None:
            timer.cancel()


def _retrieve(future: asyncio.Future) -> None:
    """Done-callback of a run nobody awaits any more (its caller was cancelled): its outcome
    (usually the Cancelled the stop caused) is read, so asyncio logs nothing."""
    if not future.cancelled():
        future.exception()


def _nbytes(array: np.ndarray) -> int:
    if array.dtype == OBJECT:
        return sum(len(v) + 4 for v in array.reshape(-1).tolist())
    return array.nbytes
