"""The data plane: validate a decoded request against a model, run it, build the response.

Transport-free: the gRPC servicer converts protobuf <-> calls here, and nothing else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from server.codec import Limits, decode_inputs, encode_output
from server.errors import InvalidArgument, ResourceExhausted
from server.proto import grpc_service_pb2 as pb
from server.repository import ModelRepository
from server.runtime import ModelRuntime
from server.stats import Statistics


@dataclass
class Prepared:
    """A validated request: a padded batch ready for the runtime."""

    runtime: ModelRuntime
    x: np.ndarray  # (B, T, F) float32
    lengths: np.ndarray  # (B,) int64
    outputs: list[str]


def validate(rt: ModelRuntime, arrays: dict[str, np.ndarray], requested: list[str]) -> Prepared:
    """Check names, dtypes, ranks, sizes and lengths; messages name the input and the expectation."""
    known = {i.name for i in rt.inputs}
    for name in arrays:
        if name not in known:
            raise InvalidArgument(
                f"unknown input '{name}' for model '{rt.name}'; expected {sorted(known)}"
            )
    if "x" not in arrays:
        raise InvalidArgument(f"missing required input 'x' (FP32, shape [batch, time, {rt.features}])")
    x = arrays["x"]
    if x.dtype != np.float32:
        raise InvalidArgument(f"input 'x': datatype must be FP32, got {_oip(x.dtype)}")
    if x.ndim != 3:
        raise InvalidArgument(
            f"input 'x': expected rank 3 [batch, time, {rt.features}], got shape {list(x.shape)}"
        )
    batch, steps, features = x.shape
    if features != rt.features:
        raise InvalidArgument(
            f"input 'x': feature size must be {rt.features} (model '{rt.name}'), got {features}"
        )
    if batch < 1 or steps < 1:
        raise InvalidArgument(f"input 'x': batch and time must be >= 1, got shape {list(x.shape)}")
    rt.check_lengths(steps)
    if "lengths" in arrays:
        lengths = arrays["lengths"]
        if lengths.dtype != np.int64:
            raise InvalidArgument(f"input 'lengths': datatype must be INT64, got {_oip(lengths.dtype)}")
        if lengths.shape != (batch,):
            raise InvalidArgument(
                f"input 'lengths': expected shape [{batch}] (one length per sequence of 'x'), "
                f"got {list(lengths.shape)}"
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
    names = rt.output_names
    if requested:
        unknown = [n for n in requested if n not in names]
        if unknown:
            raise InvalidArgument(f"requested output(s) {unknown} unknown; model '{rt.name}' has {names}")
        if len(set(requested)) != len(requested):
            raise InvalidArgument(f"requested outputs {requested}: each may appear once")
        outputs = list(requested)
    else:
        outputs = names
    return Prepared(rt, np.ascontiguousarray(x), np.ascontiguousarray(lengths), outputs)


def _oip(dtype: np.dtype) -> str:
    from server.codec import DATATYPES

    for name, (dt, _) in DATATYPES.items():
        if dt == dtype:
            return name
    return str(dtype)


class DataPlane:
    def __init__(self, repository: ModelRepository, stats: Statistics, limits: Limits, executor=None) -> None:
        self.repository = repository
        self.stats = stats
        self.limits = limits
        # executor(prepared) -> (outputs, queue_ns, infer_ns); the batcher plugs in here
        self.executor = executor or self._run_direct

    def _run_direct(self, prepared: Prepared) -> tuple[dict[str, np.ndarray], int, int]:
        t0 = time.perf_counter_ns()
        out = prepared.runtime.run(prepared.x, prepared.lengths, prepared.outputs)
        infer_ns = time.perf_counter_ns() - t0
        self.stats.record_execution(prepared.runtime.name, prepared.runtime.version, prepared.x.shape[0], infer_ns)
        return out, 0, infer_ns

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        rt = self.repository.get(request.model_name, request.model_version)
        try:
            arrays = decode_inputs(request, self.limits)
            x = arrays.get("x")
            if x is not None and x.ndim >= 1 and x.shape[0] > self.limits.max_batch:
                raise ResourceExhausted(
                    f"input 'x': {x.shape[0]} sequences exceed the per-request limit of {self.limits.max_batch}"
                )
            prepared = validate(rt, arrays, [o.name for o in request.outputs])
            t_in = time.perf_counter_ns()
            outputs, queue_ns, infer_ns = self.executor(prepared)
            t_run = time.perf_counter_ns()
            response = pb.ModelInferResponse(model_name=rt.name, model_version=str(rt.version), id=request.id)
            for name in prepared.outputs:
                encode_output(response, name, outputs[name])
            end = time.perf_counter_ns()
        except Exception:
            self.stats.record_failure(rt.name, rt.version, time.perf_counter_ns() - start)
            raise
        self.stats.record_success(
            rt.name, rt.version, end - start, queue_ns, t_in - start, infer_ns, end - t_run, prepared.x.shape[0]
        )
        return response

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
        headers = {
            "lstm-export-metadata": json.dumps(rt.export_metadata, sort_keys=True),
            "lstm-provider": rt.provider,
            "lstm-static-length": str(rt.static_length or ""),
            "lstm-model-version": str(rt.version),
        }
        return response, headers
