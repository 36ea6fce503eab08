"""The data plane: validate a decoded request against a model, run it (batched), build the response.

Transport-free: the gRPC servicer converts protobuf <-> calls here, and nothing else.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import time
from dataclasses import dataclass

import numpy as np

from server.batcher import Batcher, BatchInfo, BatchPolicy
from server.codec import DATATYPES, Limits, decode_inputs, encode_output
from server.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, ServingError
from server.metrics import Metrics
from server.proto import grpc_service_pb2 as pb
from server.repository import ModelRepository
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
    for name in ("h0", "c0"):
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
    if states and "h0" not in states:
        states["h0"] = np.zeros_like(states["c0"])
    if states and "c0" not in states:
        states["c0"] = np.zeros_like(states["h0"])
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
    ) -> None:
        self.repository = repository
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
                    if not policy.enabled:
                        rt.batcher = False
                    else:
                        rt.batcher = Batcher(
                            f"{rt.name}:{rt.version}",
                            rt.run,
                            policy,
                            on_batch=lambda info, rt=rt: self._on_batch(rt, info),
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

    def _execute(self, p: Prepared, deadline: float | None) -> tuple[dict[str, np.ndarray], int, int]:
        rt = p.runtime
        batcher = self._batcher(rt)
        if batcher is not None:
            future = batcher.submit(p.x, p.lengths, p.outputs, deadline, p.h0, p.c0)
            self.metrics.queue_depth.labels(rt.name).set(batcher.queue_depth())
            try:  # the client's deadline bounds the wait (a request expired in the queue is not run)
                wait = None if deadline is None else max(0.0, deadline - time.monotonic()) + 0.5
                result, queue_ns, info = future.result(timeout=wait)
            except concurrent.futures.TimeoutError:
                raise DeadlineExceeded(f"model '{rt.name}': the client's deadline passed while queued") from None
            self.metrics.queue.labels(rt.name).observe(max(queue_ns, 0) / 1e9)
            return result, max(queue_ns, 0), info.infer_ns
        t0 = time.perf_counter_ns()
        out = rt.run(p.x, p.lengths, p.outputs, p.h0, p.c0)
        infer_ns = time.perf_counter_ns() - t0
        steps = p.x.shape[1]
        pad = 1.0 - float(p.lengths.sum()) / (p.x.shape[0] * steps)
        self._on_batch(rt, BatchInfo(1, p.x.shape[0], steps, pad, infer_ns))
        return out, 0, infer_ns

    # -- requests ---------------------------------------------------------------------------
    def infer(self, request: pb.ModelInferRequest, deadline: float | None = None) -> pb.ModelInferResponse:
        """`deadline`: time.monotonic() by which the client stops waiting (None: no deadline)."""
        start = time.perf_counter_ns()
        rt: ModelRuntime | None = None
        code = "OK"
        try:
            rt = self.repository.get(request.model_name, request.model_version)
            sequence = parse_sequence(request.parameters)
            if sequence is not None:
                return self._infer_sequence(rt, request, sequence, deadline, start)
            arrays = self._decode(request)
            prepared = validate(rt, arrays, [o.name for o in request.outputs])
            return self._respond(rt, request, prepared, deadline, start)
        except ServingError as exc:
            code = exc.code.name
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            label = rt.name if rt is not None else "_unknown"
            elapsed = time.perf_counter_ns() - start
            if rt is not None and code != "OK":
                self.stats.record_failure(rt.name, rt.version, elapsed)
            self.metrics.requests.labels(label, code).inc()
            self.metrics.latency.labels(label).observe(elapsed / 1e9)

    def _decode(self, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
        arrays = decode_inputs(request, self.limits)
        x = arrays.get("x")
        if x is not None and x.ndim >= 1 and x.shape[0] > self.limits.max_batch:
            raise ResourceExhausted(
                f"input 'x': {x.shape[0]} sequences exceed the per-request limit of {self.limits.max_batch}"
            )
        return arrays

    def _respond(self, rt: ModelRuntime, request, prepared: Prepared, deadline, start: int, returned=None,
                 after=None) -> pb.ModelInferResponse:  # fmt: skip
        """Run a prepared request and build its response. `returned`: outputs the client gets
        (default: all that ran); `after(outputs)`: called with the outputs before the reply."""
        t_in = time.perf_counter_ns()
        outputs, queue_ns, infer_ns = self._execute(prepared, deadline)
        if after is not None:
            after(outputs)
        t_run = time.perf_counter_ns()
        response = pb.ModelInferResponse(model_name=rt.name, model_version=str(rt.version), id=request.id)
        for name in returned or prepared.outputs:
            encode_output(response, name, outputs[name])
        end = time.perf_counter_ns()
        self.stats.record_success(
            rt.name, rt.version, end - start, queue_ns, t_in - start, infer_ns, end - t_run, prepared.x.shape[0]
        )
        return response

    def _infer_sequence(self, rt: ModelRuntime, request, sequence, deadline, start: int) -> pb.ModelInferResponse:
        """One chunk of a server-side stateful sequence (Triton's sequence_id/start/end)."""
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
                f"model '{rt.name}' has no initial-state inputs (h0, c0), so it cannot keep state between "
                "chunks; export it with `python -m export --initial-state`"
            )
        if rt.bidirectional:
            raise InvalidArgument(
                f"model '{rt.name}' is bidirectional: its backward direction needs the whole sequence, so it "
                "cannot be streamed in chunks; send whole sequences, or use a unidirectional model"
            )
        arrays = self._decode(request)
        if not first and ("h0" in arrays or "c0" in arrays):
            raise InvalidArgument(
                "inputs 'h0'/'c0' are only accepted with sequence_start; later chunks continue from the state "
                "the server keeps"
            )
        if not arrays and not last:
            raise InvalidArgument("missing required input 'x' (only a sequence_end request may carry no inputs)")
        prepared = validate(rt, arrays, [o.name for o in request.outputs]) if arrays else None
        if prepared is not None and prepared.x.shape[0] != 1:
            raise InvalidArgument(
                f"input 'x': a sequence chunk carries one sequence (batch 1), got batch {prepared.x.shape[0]}"
            )
        ld, hidden = rt.state_shape
        zeros = np.zeros((ld, 1, hidden), np.float32)
        h0 = prepared.h0 if prepared is not None and prepared.h0 is not None else zeros
        c0 = prepared.c0 if prepared is not None and prepared.c0 is not None else zeros
        state = self.sequences.acquire(rt.name, rt.version, seq_id, first, h0, c0)
        stored: dict[str, np.ndarray] = {}
        try:
            if state.version != rt.version:  # pinned above; only a restart in between gets here
                raise NotFound(f"sequence {seq_id!r}: its version changed while this chunk was prepared; retry")
            if prepared is None:  # end without data: return the final state and free it
                stored = {"h_n": state.h, "c_n": state.c}
                wanted = [o.name for o in request.outputs] or ["h_n", "c_n"]
                bad = [n for n in wanted if n not in stored]
                if bad:
                    raise InvalidArgument(f"an end-only sequence request returns h_n and c_n, not {bad}")
                response = pb.ModelInferResponse(model_name=rt.name, model_version=str(rt.version), id=request.id)
                for name in wanted:
                    encode_output(response, name, stored[name])
            else:
                returned = prepared.outputs
                prepared = dataclasses.replace(
                    prepared, runtime=rt, h0=state.h, c0=state.c,
                    outputs=sorted(set(prepared.outputs) | {"h_n", "c_n"}),
                )  # fmt: skip
                response = self._respond(rt, request, prepared, deadline, start, returned, after=stored.update)
        except BaseException:
            self.sequences.release(rt.name, seq_id, None, None, False)
            raise
        self.sequences.release(rt.name, seq_id, stored["h_n"], stored["c_n"], last)
        response.parameters["sequence_id"].CopyFrom(request.parameters["sequence_id"])
        response.parameters["sequence_end"].bool_param = last
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
        }
        return response, headers
