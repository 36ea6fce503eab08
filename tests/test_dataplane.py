"""The data plane on its own: `validate` and `DataPlane.infer`/`infer_async` with a small fake model
version that implements `server.runtime.Runtime` (no sockets, no ONNX Runtime)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from server.codec import Limits
from server.dataplane import DataPlane, InferRequest
from server.errors import InvalidArgument, NotFound
from server.repository import READY, ModelEntry, ModelRepository
from server.runtime import ModelRuntime, Providers, RunControl, Runtime, RuntimeOptions
from server.signature import Signature, TensorSpec
from server.stats import Statistics
from server.validate import validate


@dataclasses.dataclass
class Doubler:
    """A model version that answers y = 2 * x for x FP32 [batch, 3], counting its runs."""

    name: str = "doubler"
    version: int = 1
    signature: Signature = dataclasses.field(
        default_factory=lambda: Signature(
            inputs=[TensorSpec("x", "FP32", [-1, 3], batch_axis=0)],
            outputs=[TensorSpec("y", "FP32", [-1, 3], batch_axis=0), TensorSpec("n", "INT64", [-1], batch_axis=0)],
        )
    )
    export_metadata: dict = dataclasses.field(default_factory=dict)
    repo_config: dict = dataclasses.field(default_factory=dict)
    policy: object | None = None
    batcher: object | None = None
    retired: bool = False
    output_layout: dict = dataclasses.field(default_factory=dict)
    batch_invariance: str = ""
    bounded: bool = True
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    static_length: int | None = None
    batchable: bool = True
    runs: list = dataclasses.field(default_factory=list)

    def run(self, feeds, outputs, control: RunControl | None = None):
        self.runs.append((dict(feeds), list(outputs)))
        x = feeds["x"]
        every = {"y": 2 * x, "n": np.arange(x.shape[0], dtype=np.int64)}
        return {name: every[name] for name in outputs}


def test_the_fake_and_the_real_version_both_offer_the_protocol():
    assert isinstance(Doubler(), Runtime)
    members = set(Runtime.__annotations__) | {"static_length", "batchable", "run"}
    real = {f.name for f in dataclasses.fields(ModelRuntime)} | set(dir(ModelRuntime))
    assert members <= real, members - real
    assert not isinstance(object(), Runtime)


def _plane(tmp_path: Path, rt: Doubler) -> DataPlane:
    repo = ModelRepository(tmp_path, Providers(("CPUExecutionProvider",), "CPUExecutionProvider"), RuntimeOptions())
    repo._models[rt.name] = ModelEntry(rt.name, READY, versions={rt.version: rt})
    return DataPlane(repo, Statistics(), Limits())


def test_validate_fills_the_work_and_names_what_is_wrong():
    rt = Doubler()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    prepared = validate(rt, {"x": x}, [])
    assert prepared.runtime is rt and prepared.outputs == ["y", "n"] and prepared.work.rows == 2
    np.testing.assert_array_equal(prepared.feeds["x"], x)
    cases = [
        ({"z": x}, [], "unknown input 'z' for model 'doubler'; expected ['x']"),
        ({}, [], "missing required input 'x' (FP32, shape [-1, 3])"),
        ({"x": x.astype(np.float64)}, [], "input 'x': datatype must be FP32, got FP64"),
        ({"x": x[:, :2]}, [], "input 'x': dim 1 must be 3"),
        ({"x": x[0]}, [], "input 'x': expected rank 2 (shape [-1, 3]), got shape [3]"),
        ({"x": x}, ["w"], "requested output(s) ['w'] unknown; model 'doubler' has ['y', 'n']"),
        ({"x": x}, ["y", "y"], "requested outputs ['y', 'y']: each may appear once"),
    ]
    for arrays, outputs, message in cases:
        with pytest.raises(InvalidArgument) as err:
            validate(rt, arrays, outputs)
        assert message in err.value.message, err.value.message


def test_infer_runs_the_version_and_answers_what_was_asked(tmp_path):
    rt = Doubler()
    plane = _plane(tmp_path, rt)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = plane.infer(InferRequest("doubler", "", inputs={"x": x}, outputs=["y"], id="r1"))
    assert (response.model_name, response.model_version, response.id) == ("doubler", "1", "r1")
    assert list(response.outputs) == ["y"]
    np.testing.assert_allclose(response.outputs["y"], 2 * x, rtol=0, atol=1e-5)
    assert len(rt.runs) == 1 and rt.runs[0][1] == ["y"]


def test_infer_refuses_bad_requests_before_running_and_keeps_serving(tmp_path):
    rt = Doubler()
    plane = _plane(tmp_path, rt)
    with pytest.raises(NotFound, match="unknown model: 'nope'"):
        plane.infer(InferRequest("nope", "", inputs={"x": np.zeros((1, 3), np.float32)}, outputs=[]))
    with pytest.raises(NotFound, match="version '7' is not found"):
        plane.infer(InferRequest("doubler", "7", inputs={"x": np.zeros((1, 3), np.float32)}, outputs=[]))
    with pytest.raises(InvalidArgument, match="input 'x': dim 1 must be 3"):
        plane.infer(InferRequest("doubler", "", inputs={"x": np.zeros((1, 4), np.float32)}, outputs=[]))
    assert rt.runs == []
    response = plane.infer(InferRequest("doubler", "1", inputs={"x": np.ones((3, 3), np.float32)}, outputs=[]))
    assert list(response.outputs) == ["y", "n"] and response.outputs["n"].tolist() == [0, 1, 2]


def test_infer_async_answers_as_infer(tmp_path):
    rt = Doubler()
    plane = _plane(tmp_path, rt)
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    try:
        response = asyncio.run(plane.infer_async(InferRequest("doubler", "", inputs={"x": x}, outputs=[])))
    finally:
        plane.executor.shutdown(wait=True)
    np.testing.assert_allclose(response.outputs["y"], 2 * x, rtol=0, atol=1e-5)
    assert response.outputs["n"].tolist() == [0, 1, 2, 3] and len(rt.runs) == 1
