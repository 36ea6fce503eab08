"""Serving ONNX files this project did not write: the signature comes from the file and Triton's
config.pbtxt. Each model here is made in the test by another tool (torch's dynamo exporter,
onnx.helper, the project's exporter for a token-id module) or comes installed from a PyPI
package, and is called over real gRPC and REST, with this project's client and tritonclient."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from server.model_config import parse
from server.proto import grpc_service_pb2 as pb
from tests.conftest import TOL

HERE = Path(__file__).resolve().parent
TRITON_PYTHON = os.environ.get("TRITON_PYTHON") or str(HERE.parent / ".venv-triton" / "bin" / "python")


def _start(root: Path, **kw):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(Settings(port=0, http_port=0, model_repository=root, device="cpu", metrics_port=-1,
                                   log_level="WARNING", **kw))  # fmt: skip
    srv.start()
    return srv


def _save(root: Path, name: str, model: onnx.ModelProto, pbtxt: str | None = None) -> Path:
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / name / "1" / "model.onnx"))
    if pbtxt is not None:
        (root / name / "config.pbtxt").write_text(pbtxt)
    return root / name / "1" / "model.onnx"


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rest(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _tritonclient(protocol: str, url: str, model: str, inputs: dict, tmp_path: Path) -> tuple[dict, dict]:
    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    np.savez(tmp_path / "in.npz", **inputs)
    res = subprocess.run(
        [TRITON_PYTHON, str(HERE / "tritonclient_tensors_check.py"), protocol, url, model,
         str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as out:
        return {k: out[k] for k in out.files}, json.loads(res.stdout.strip().splitlines()[-1])


# -- torch's own (dynamo) exporter -----------------------------------------------------------------


def _dynamo_encoder(path: Path):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)

        def forward(self, x):
            y, (h, c) = self.lstm(x)
            return y, h, c

    torch.manual_seed(0)
    module = Encoder().eval()
    batch, steps = torch.export.Dim("batch"), torch.export.Dim("time")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.randn(2, 5, 6),), dynamo=True, input_names=["x"],
                                    output_names=["y", "h_n", "c_n"], dynamic_shapes={"x": {0: batch, 1: steps}},
                                    opset_version=18)  # fmt: skip
    program.save(str(path))
    model = onnx.load(str(path))
    model.ir_version = 8  # onnx 1.23 writes IR 14 by default, which onnxruntime-gpu 1.31 refuses
    onnx.save(model, str(path))
    return module


@pytest.mark.slow
def test_dynamo_export_served_concurrently_equals_ort(tmp_path):
    root = tmp_path / "models"
    path = root / "dyn" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    _dynamo_encoder(path)
    (root / "dyn" / "config.json").write_text('{"batching": {"enabled": true}}')  # a file from elsewhere: opts in
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"LSTM"}  # native recurrent nodes
    session = _session(path)
    rng = np.random.default_rng(4)
    shapes = [(1, 5), (3, 5), (2, 9), (1, 1), (4, 9), (2, 5), (1, 30), (3, 2), (2, 9), (1, 5), (5, 7), (2, 30)]
    xs = [rng.standard_normal((b, t, 6)).astype(np.float32) for b, t in shapes]
    srv = _start(root, max_queue_delay_us=20_000)
    try:
        from server.client import LSTMClient

        target = f"127.0.0.1:{srv.port}"
        with LSTMClient(target) as c:
            meta = c.metadata("dyn")
            assert [i["name"] for i in meta["inputs"]] == ["x"] and meta["inputs"][0]["shape"] == [-1, -1, 6]
            assert c.config("dyn")["parameters"]["batching_rule"]["string_value"] == "equal"
        start = threading.Barrier(len(xs))

        def call(x):
            with LSTMClient(target) as c:
                c.ready()
                start.wait()
                return c.infer_tensors("dyn", {"x": x})

        with ThreadPoolExecutor(len(xs)) as pool:
            results = list(pool.map(call, xs))
        for x, got in zip(xs, results):
            want = dict(zip(["y", "h_n", "c_n"], session.run(None, {"x": x})))
            for name in want:
                assert got[name].shape == want[name].shape, name
                assert np.abs(got[name] - want[name]).max() <= TOL, name
        with LSTMClient(target) as c:
            stats = c.stub.ModelStatistics(pb.ModelStatisticsRequest(name="dyn")).model_stats[0]
        assert stats.inference_count == sum(b for b, _ in shapes)
        # merged only where every dim but the batch agreed: some runs held several requests
        assert stats.execution_count < len(shapes), stats
    finally:
        srv.stop(1)


# -- a hand-built graph: FP16, a scalar, INT64, BOOL, strings ----------------------------------------


def _mixed_model() -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT16, ["batch", 3]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
        helper.make_tensor_value_info("k", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("m", TensorProto.BOOL, ["batch"]),
        helper.make_tensor_value_info("t", TensorProto.STRING, ["batch"]),
    ]
    outputs = [
        helper.make_tensor_value_info("scaled", TensorProto.FLOAT16, ["batch", 3]),
        helper.make_tensor_value_info("k_plus", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("not_m", TensorProto.BOOL, ["batch"]),
        helper.make_tensor_value_info("k_text", TensorProto.STRING, ["batch"]),
        helper.make_tensor_value_info("t_echo", TensorProto.STRING, ["batch"]),
    ]
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    nodes = [
        helper.make_node("Cast", ["s"], ["s16"], to=TensorProto.FLOAT16),
        helper.make_node("Mul", ["a", "s16"], ["scaled"]),
        helper.make_node("Add", ["k", "one"], ["k_plus"]),
        helper.make_node("Not", ["m"], ["not_m"]),
        helper.make_node("Cast", ["k"], ["k_text"], to=TensorProto.STRING),
        helper.make_node("Identity", ["t"], ["t_echo"]),
    ]
    graph = helper.make_graph(nodes, "mixed", inputs, outputs, [one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    path = _save(root, "mixed", _mixed_model())
    srv = _start(root)
    yield srv, _session(path)
    srv.stop(1)


def _mixed_inputs():
    return {
        "a": np.array([[1.5, -2.0, 0.25], [3.0, 0.5, -1.0]], np.float16),
        "s": np.array(2.0, np.float32),
        "k": np.array([7, -3], np.int64),
        "m": np.array([True, False]),
        "t": np.array([b"hello", "wörld".encode()], dtype=object),
    }


def _expected(session) -> dict:
    feeds = dict(_mixed_inputs())
    feeds["t"] = np.array([v.decode() for v in feeds["t"]], dtype=object)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds)))
    for n in ("k_text", "t_echo"):
        out[n] = np.array([v.encode() for v in out[n]], dtype=object)
    return out


def test_mixed_datatypes_over_grpc_exact(mixed):
    from server.client import LSTMClient

    srv, session = mixed
    want = _expected(session)
    with LSTMClient(f"127.0.0.1:{srv.port}") as c:
        meta = c.metadata("mixed")
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("a", "FP16", [-1, 3]), ("s", "FP32", []), ("k", "INT64", [-1]), ("m", "BOOL", [-1]), ("t", "BYTES", [-1])
        ]  # fmt: skip
        config = c.config("mixed")
        assert [i["data_type"] for i in config["input"]] == ["TYPE_FP16", "TYPE_FP32", "TYPE_INT64", "TYPE_BOOL",
                                                             "TYPE_STRING"]  # fmt: skip
        got = c.infer_tensors("mixed", _mixed_inputs())
        for name, value in want.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
        with pytest.raises(grpc.RpcError) as err:
            c.infer_tensors("mixed", {**_mixed_inputs(), "s": np.array([2.0], np.float32)})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 's': expected rank 0 (shape [])" in err.value.details(), err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.infer_tensors("mixed", {**_mixed_inputs(), "a": np.zeros((2, 4), np.float16)})
        assert "input 'a': dim 1 must be 3" in err.value.details(), err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.infer_tensors("mixed", {**_mixed_inputs(), "k": np.array([1, 2, 3], np.int64)})
        assert "input 'k': batch size 3 (axis 0) differs from input 'a' (2)" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.infer_tensors("mixed", {k: v for k, v in _mixed_inputs().items() if k != "m"})
        assert "missing required input 'm' (BOOL, shape [-1])" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            c.infer_tensors("mixed", {**_mixed_inputs(), "k": np.array([1, 2], np.int32)})
        assert "input 'k': datatype must be INT64, got INT32" in err.value.details()


def test_mixed_datatypes_typed_contents(mixed):
    """The same values as typed InferTensorContents (bool/int64/fp32/bytes fields) for a graph
    without FP16: one with the FP16 input left out is refused by name, the rest is exact."""
    from server.client import LSTMClient

    srv, session = mixed
    with LSTMClient(f"127.0.0.1:{srv.port}") as c:
        inputs = {k: v for k, v in _mixed_inputs().items() if k != "a"}
        req = c.tensors_request("mixed", inputs, raw=False)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.ModelInfer(req)
        assert "missing required input 'a' (FP16" in err.value.details()
        # BYTES typed contents decode to the same strings
        from server.codec import Limits, decode_inputs

        decoded = decode_inputs(req, Limits())
        assert list(decoded["t"]) == [b"hello", "wörld".encode()] and decoded["m"].dtype == np.bool_


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_mixed_datatypes_through_tritonclient(mixed, protocol, tmp_path):
    srv, session = mixed
    want = _expected(session)
    inputs = _mixed_inputs()
    inputs["t"] = inputs["t"].astype(bytes)  # saved without pickling; sent as BYTES
    url = f"127.0.0.1:{srv.port if protocol == 'grpc' else srv.http_port}"
    got, report = _tritonclient(protocol, url, "mixed", inputs, tmp_path)
    for name, value in want.items():
        expected = value.astype(bytes) if value.dtype == object else value
        assert got[name].dtype == expected.dtype and np.array_equal(got[name], expected), (protocol, name)
    config = report["config"]
    assert [i["name"] for i in config["input"]] == ["a", "s", "k", "m", "t"]


def test_mixed_over_rest_json(mixed):
    srv, session = mixed
    want = _expected(session)
    body = {"inputs": [
        {"name": "a", "datatype": "FP16", "shape": [2, 3], "data": [1.5, -2.0, 0.25, 3.0, 0.5, -1.0]},
        {"name": "s", "datatype": "FP32", "shape": [], "data": 2.0},
        {"name": "k", "datatype": "INT64", "shape": [2], "data": [7, -3]},
        {"name": "m", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "t", "datatype": "BYTES", "shape": [2], "data": ["hello", "wörld"]},
    ]}  # fmt: skip
    status, reply = _rest(srv.http_port, "/v2/models/mixed/infer", body)
    assert status == 200, reply
    out = {o["name"]: o for o in reply["outputs"]}
    assert out["k_text"]["datatype"] == "BYTES" and out["k_text"]["data"] == ["7", "-3"]
    assert out["t_echo"]["data"] == ["hello", "wörld"]
    assert out["not_m"]["data"] == [False, True] and out["k_plus"]["data"] == [8, -2]
    assert np.array_equal(np.array(out["scaled"]["data"], np.float16), want["scaled"].reshape(-1))


# -- Triton's implicit state ------------------------------------------------------------------------

STATE_PBTXT = """
name: "acc"
max_batch_size: 8
input [{ name: "INPUT" data_type: TYPE_FP32 dims: [-1, 4] }]
output [{ name: "OUTPUT" data_type: TYPE_FP32 dims: [-1, 4] }]
sequence_batching {
  max_sequence_idle_microseconds: 1500000
  oldest { max_candidate_sequences: 8 }
  state [{
    input_name: "INPUT_STATE"
    output_name: "OUTPUT_STATE"
    data_type: TYPE_FP32
    dims: [4]
    initial_state [{ data_type: TYPE_FP32 dims: [4] zero_data: true name: "zeros" }]
  }]
}
"""


def _accumulator() -> onnx.ModelProto:
    """OUTPUT[b, t] = tanh(state[b] + cumsum(INPUT[b, :t+1])); the next state adds the chunk's sum:
    chunked equals whole (the dims are named N and T: the batch comes from max_batch_size)."""
    inputs = [
        helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["N", "T", 4]),
        helper.make_tensor_value_info("INPUT_STATE", TensorProto.FLOAT, ["N", 4]),
    ]
    outputs = [
        helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["N", "T", 4]),
        helper.make_tensor_value_info("OUTPUT_STATE", TensorProto.FLOAT, ["N", 4]),
    ]
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("CumSum", ["INPUT", "axis"], ["cum"]),
        helper.make_node("Unsqueeze", ["INPUT_STATE", "axes"], ["s3"]),
        helper.make_node("Add", ["cum", "s3"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["OUTPUT"]),
        helper.make_node("ReduceSum", ["INPUT", "axes"], ["total"], keepdims=0),
        helper.make_node("Add", ["INPUT_STATE", "total"], ["OUTPUT_STATE"]),
    ]
    graph = helper.make_graph(nodes, "acc", inputs, outputs, [axis, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    _save(root, "acc", _accumulator(), STATE_PBTXT)
    srv = _start(root)
    yield srv
    srv.stop(1)


def _seq_params(seq_id, start, end):
    return {"sequence_id": seq_id, "sequence_start": start, "sequence_end": end}


def test_implicit_state_chunks_equal_whole(stateful):
    from server.client import LSTMClient

    srv = stateful
    rng = np.random.default_rng(8)
    signal = rng.standard_normal((1, 60, 4)).astype(np.float32) * 0.1
    whole = np.tanh(np.cumsum(signal, axis=1))  # the model on all 60 steps from a zero state
    chunks = np.split(signal, 6, axis=1)
    with LSTMClient(f"127.0.0.1:{srv.port}") as c:
        meta = c.metadata("acc")
        assert [i["name"] for i in meta["inputs"]] == ["INPUT"] and [o["name"] for o in meta["outputs"]] == ["OUTPUT"]
        config = c.config("acc")
        assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == ["-1", "4"]
        assert config["sequence_batching"]["state"][0]["input_name"] == "INPUT_STATE"
        assert config["sequence_batching"]["max_sequence_idle_microseconds"] == "1500000"
        # unary
        unary = [c.infer_tensors("acc", {"INPUT": ch}, parameters=_seq_params(11, i == 0, i == 5))["OUTPUT"]
                 for i, ch in enumerate(chunks)]  # fmt: skip
        # ModelStreamInfer
        requests = [c.tensors_request("acc", {"INPUT": ch}, parameters=_seq_params("s-12", i == 0, i == 5))
                    for i, ch in enumerate(chunks)]  # fmt: skip
        streamed = [r["OUTPUT"] for r in c.stream(requests)]
    # REST
    rest = []
    for i, ch in enumerate(chunks):
        body = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": list(ch.shape), "data": ch.ravel().tolist()}],
                "parameters": _seq_params(13, i == 0, i == 5)}  # fmt: skip
        status, reply = _rest(srv.http_port, "/v2/models/acc/infer", body)
        assert status == 200, reply
        assert reply["parameters"]["sequence_id"] == 13
        rest.append(np.array(reply["outputs"][0]["data"], np.float32).reshape(ch.shape))
    for got in (unary, streamed, rest):
        assert np.abs(np.concatenate(got, axis=1) - whole).max() <= TOL


@pytest.mark.slow
def test_implicit_state_sequences_stay_apart_and_idle_ones_are_freed(stateful):
    from server.client import LSTMClient

    srv = stateful
    rng = np.random.default_rng(9)
    a, b = (rng.standard_normal((1, 20, 4)).astype(np.float32) * 0.1 for _ in range(2))
    with LSTMClient(f"127.0.0.1:{srv.port}") as c:
        outs: dict = {"a": [], "b": []}
        for i in range(4):  # interleaved: a0 b0 a1 b1 ...
            for key, signal in (("a", a), ("b", b)):
                chunk = signal[:, i * 5 : (i + 1) * 5]
                params = _seq_params(f"{key}-21", i == 0, i == 3)
                outs[key].append(c.infer_tensors("acc", {"INPUT": chunk}, parameters=params)["OUTPUT"])
        for key, signal in (("a", a), ("b", b)):
            assert np.abs(np.concatenate(outs[key], axis=1) - np.tanh(np.cumsum(signal, axis=1))).max() <= TOL
        c.infer_tensors("acc", {"INPUT": a[:, :3]}, parameters=_seq_params(22, True, False))
        time.sleep(2.0)  # the config's max_sequence_idle_microseconds: 1.5 s
        with pytest.raises(grpc.RpcError) as err:
            c.infer_tensors("acc", {"INPUT": a[:, 3:6]}, parameters=_seq_params(22, False, False))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "freed after 1.5 s idle" in err.value.details()
        # the state input may be sent with sequence_start, to start elsewhere than zeros
        start = np.full((1, 4), 0.5, np.float32)
        got = c.infer_tensors("acc", {"INPUT": a[:, :2], "INPUT_STATE": start}, parameters=_seq_params(23, True, True))
        assert np.abs(got["OUTPUT"] - np.tanh(0.5 + np.cumsum(a[:, :2], axis=1))).max() <= TOL


# -- Triton's documented example configs -------------------------------------------------------------


def test_tritons_implicit_state_example_config_parses():
    """Triton's implicit-state example (tests/data/triton_implicit_state.pbtxt, source in the file)."""
    triton = parse((HERE / "data" / "triton_implicit_state.pbtxt").read_text(), "model_a")["triton"]
    (state,) = triton.states
    assert triton.sequence and (state.input_name, state.output_name) == ("INPUT_STATE", "OUTPUT_STATE")
    assert state.datatype == "INT32" and state.dims == (1,)  # dims [-1] made concrete by initial_state


@pytest.mark.slow
def test_tritons_implicit_state_example_config_loads_and_keeps_state(tmp_path):
    """The same example as the config.pbtxt of a model it fits (OUTPUT = OUTPUT_STATE = INPUT +
    INPUT_STATE, INT32 [1]): a three-chunk sequence accumulates, starting from the zero state."""
    from server.client import LSTMClient

    tensors = [helper.make_tensor_value_info(n, TensorProto.INT32, [1]) for n in ("INPUT", "INPUT_STATE")]
    outs = [helper.make_tensor_value_info(n, TensorProto.INT32, [1]) for n in ("OUTPUT", "OUTPUT_STATE")]
    nodes = [helper.make_node("Add", ["INPUT", "INPUT_STATE"], ["OUTPUT"]),
             helper.make_node("Identity", ["OUTPUT"], ["OUTPUT_STATE"])]  # fmt: skip
    model = helper.make_model(helper.make_graph(nodes, "acc", tensors, outs), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    root = tmp_path / "models"
    _save(root, "model_a", model, (HERE / "data" / "triton_implicit_state.pbtxt").read_text())
    srv = _start(root)
    try:
        with LSTMClient(f"127.0.0.1:{srv.port}") as c:
            got = [int(c.infer_tensors("model_a", {"INPUT": np.array([v], np.int32)},
                                       parameters=_seq_params(1, i == 0, i == 2))["OUTPUT"][0])
                   for i, v in enumerate((5, 7, -2))]  # fmt: skip
        assert got == [5, 12, 10]
    finally:
        srv.stop(1)


def test_tritons_ragged_batching_example_config_is_refused_by_name():
    """Triton's ragged-batching example uses batch_input and allow_ragged_batch: refused, naming them."""
    from server.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as err:
        parse((HERE / "data" / "triton_ragged_batching.pbtxt").read_text(), "ragged_model")
    message = err.value.message
    assert "unsupported field(s) input.allow_ragged_batch, batch_input " in message, message


# -- a token-id tagger exported with the project's exporter ------------------------------------------


@pytest.mark.slow
def test_token_tagger_served_ragged_equals_eager(tmp_path):
    import torch

    from export.__main__ import main as export_main
    from server.client import LSTMClient
    from tests.token_modules import bilstm_tagger

    root = tmp_path / "models"
    argv = ["--module", "tests.token_modules:bilstm_tagger", "--output-names", "logits", "--name", "tagger"]
    assert export_main([*argv, "--out", str(root)]) == 0  # the int64 input is detected (nn.Embedding first)
    module = bilstm_tagger().eval()  # seeded: the weights that were exported
    rng = np.random.default_rng(5)
    requests = [
        [rng.integers(0, 50, size=int(t)) for t in rng.integers(1, 15, size=int(b))] for b in (1, 3, 2, 4, 1, 2)
    ]
    srv = _start(root, max_queue_delay_us=20_000)
    try:
        target = f"127.0.0.1:{srv.port}"
        with LSTMClient(target) as c:
            assert c.metadata("tagger")["inputs"][0]["datatype"] == "INT64"
            with pytest.raises(grpc.RpcError) as err:
                c.infer("tagger", [np.array([3, 50, 1])])
            assert (
                err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                and "values must be in 0..49" in err.value.details()
            )
        start = threading.Barrier(len(requests))

        def call(seqs):
            with LSTMClient(target) as c:
                c.ready()
                start.wait()
                return c.infer("tagger", seqs)

        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(call, requests))
        for seqs, got in zip(requests, results):
            for ids, out in zip(seqs, got):
                with torch.no_grad():
                    (want,) = _eager_tagger(module, ids)
                assert out["logits"].shape == want.shape and np.abs(out["logits"] - want).max() <= TOL
        with LSTMClient(target) as c:
            stats = c.stub.ModelStatistics(pb.ModelStatisticsRequest(name="tagger")).model_stats[0]
        assert stats.execution_count < len(requests) + 1, stats  # concurrent ragged requests were merged
    finally:
        srv.stop(1)


def _eager_tagger(module, ids):
    import torch

    out = module(torch.from_numpy(np.asarray(ids, np.int64)[None]), torch.tensor([len(ids)]))
    out = out[0] if isinstance(out, tuple) else out
    return (out[0].numpy(),)


# -- a model shipped inside a PyPI package -------------------------------------------------------------


def _silero_file() -> Path:
    """The ONNX file inside the installed silero-vad package (found, not imported: its Python code
    needs torchaudio, which is not installed; only the model file is used)."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("silero-vad is not installed in .venv (make venv installs it, --no-deps, for this test)")
    return Path(spec.submodule_search_locations[0]) / "data" / "silero_vad_op18_ifless.onnx"


SILERO_PBTXT = """
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  state [{ input_name: "state" output_name: "stateN" data_type: TYPE_FP32 dims: [2, 1, 128] }]
}
"""


@pytest.mark.slow
def test_silero_vad_from_its_pypi_package_streams_like_ort(tmp_path):
    """Silero VAD (inputs input [batch, samples], sr a scalar, state [2, batch, 128]; outputs output,
    stateN) with Triton's implicit state: 512-sample windows of a signal streamed through the server
    give what ONNX Runtime gives with the state carried by hand."""
    from server.client import LSTMClient

    source = _silero_file()
    root = tmp_path / "models"
    (root / "vad" / "1").mkdir(parents=True)
    shutil.copy(source, root / "vad" / "1" / "model.onnx")
    (root / "vad" / "config.pbtxt").write_text(SILERO_PBTXT)
    session = _session(source)
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (t > 0.8) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
    windows = [audio[None, i : i + 512] for i in range(0, len(audio) - 512, 512)][:40]
    sr = np.array(16000, np.int64)
    state = zeros = np.zeros((2, 1, 128), np.float32)
    want, fresh = [], []
    for w in windows:
        out, state = session.run(None, {"input": w, "sr": sr, "state": state})
        want.append(out)
        fresh.append(session.run(None, {"input": w, "sr": sr, "state": zeros})[0])
    srv = _start(root)
    try:
        with LSTMClient(f"127.0.0.1:{srv.port}") as c:
            meta = c.metadata("vad")
            assert sorted(i["name"] for i in meta["inputs"]) == ["input", "sr"]  # state is the server's
            got = [c.infer_tensors("vad", {"input": w, "sr": sr}, parameters=_seq_params(5, i == 0,
                                   i == len(windows) - 1))["output"] for i, w in enumerate(windows)]  # fmt: skip
    finally:
        srv.stop(1)
    errors = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
    assert max(errors) <= TOL, max(errors)
    # the state carried between windows changes the answers (so the server did carry it)
    assert max(float(np.abs(w - f).max()) for w, f in zip(want, fresh)) > 10 * TOL


@pytest.mark.slow
def test_cli_sends_named_tensors(mixed, tmp_path):
    """`python -m server.client --input NAME=FILE.npy ...` calls any model and prints every output."""
    import sys

    srv, session = mixed
    args = []
    for name, value in _mixed_inputs().items():
        np.save(tmp_path / f"{name}.npy", value.astype(bytes) if value.dtype == object else value)
        args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    res = subprocess.run(
        [sys.executable, "-m", "server.client", "--model", "mixed", "--target", f"127.0.0.1:{srv.port}", *args,
         "--save", str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=60, cwd=HERE.parent,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line)
    assert lines["k_plus"] == "int64 [8, -2]" and lines["not_m"] == "bool [False, True]", res.stdout
    assert lines["t_echo"] == "BYTES shape=[2] ['hello', 'wörld']", res.stdout
    with np.load(tmp_path / "out.npz") as out:
        assert np.array_equal(out["scaled"], _expected(session)["scaled"])
    bad = subprocess.run([sys.executable, "-m", "server.client", "--input", "a"], capture_output=True, text=True,
                         timeout=60, cwd=HERE.parent)  # fmt: skip
    assert bad.returncode == 2 and "expected NAME=FILE.npy" in bad.stderr, bad.stderr


# -- what an attack review of this found (each a regression test) ------------------------------------


def _graph(name, inputs, outputs, nodes, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _gru_with_unnamed_time_output() -> onnx.ModelProto:
    """x [batch, time, 3] and its lengths -> a GRU with sequence_lens; y [batch, steps_out, 4]: the
    output's time axis is not named `time` (only the probe can tell)."""
    rng = np.random.default_rng(1)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.5  # noqa: E731
    inits = [
        onnx.numpy_helper.from_array(f32(1, 12, 3), "W"), onnx.numpy_helper.from_array(f32(1, 12, 4), "R"),
        onnx.numpy_helper.from_array(f32(1, 24), "B"), helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("Cast", ["len"], ["len32"], to=TensorProto.INT32),
        helper.make_node("GRU", ["xt", "W", "R", "B", "len32"], ["Y", "Y_h"], hidden_size=4, linear_before_reset=1),
        helper.make_node("Squeeze", ["Y", "ax1"], ["Ys"]),
        helper.make_node("Transpose", ["Ys"], ["y"], perm=[1, 0, 2]),
        helper.make_node("Squeeze", ["Y_h", "ax1"], ["h"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 3]),
              helper.make_tensor_value_info("len", TensorProto.INT64, ["batch"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "steps_out", 4]),
               helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4])]  # fmt: skip
    return _graph("gru", inputs, outputs, nodes, inits)


def _concurrently(target: str, model: str, requests: list[dict]) -> list:
    from server.client import LSTMClient

    start = threading.Barrier(len(requests))

    def call(inputs):
        with LSTMClient(target) as c:
            c.ready()
            start.wait()
            try:
                return c.infer_tensors(model, inputs)
            except grpc.RpcError as exc:
                return exc

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(call, requests))


@pytest.mark.slow
def test_review_findings_on_a_real_server(tmp_path):
    root = tmp_path / "models"
    # a model that sums over axis 0, served with Triton's rule (max_batch_size > 0: axis 0 is the batch)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", 4])
    _save(
        root,
        "sum0",
        _graph(
            "sum0",
            [x],
            [y],
            [helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)],
            [helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
        ),  # fmt: skip
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 100000 }\n",
    )
    gru = _save(root, "gru", _gru_with_unnamed_time_output(),
                'parameters { key: "lengths_input" value { string_value: "len" } }\n'
                "dynamic_batching { max_queue_delay_microseconds: 50000 }\n")  # fmt: skip
    reps = helper.make_tensor_value_info("reps", TensorProto.INT64, [2])
    xt = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])
    yt = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["a", "b"])
    _save(root, "tile", _graph("tile", [xt, reps], [yt], [helper.make_node("Tile", ["X", "reps"], ["Y"])]))
    u8 = helper.make_tensor_value_info("u", TensorProto.UINT8, ["batch"])
    b = helper.make_tensor_value_info("b", TensorProto.BOOL, ["batch"])
    outs = [helper.make_tensor_value_info("uo", TensorProto.UINT8, ["batch"]),
            helper.make_tensor_value_info("bo", TensorProto.BOOL, ["batch"])]  # fmt: skip
    _save(root, "narrow", _graph("narrow", [u8, b], outs, [helper.make_node("Identity", ["u"], ["uo"]),
                                                            helper.make_node("Not", ["b"], ["bo"])]))  # fmt: skip
    srv = _start(root, max_message_mb=1)
    try:
        target = f"127.0.0.1:{srv.port}"
        # 1. never merged: each request gets its own sum (the probe saw Y not follow the batch)
        got = _concurrently(target, "sum0", [{"X": np.full((1, 4), i + 1, np.float32)} for i in range(4)])
        assert [g["Y"].tolist() for g in got] == [[[i + 1.0] * 4] for i in range(4)]
        # 2. a merged ragged run cuts y (time axis found by the probe) back to each request's length
        session = _session(gru)
        rng = np.random.default_rng(2)
        reqs = [{"x": rng.standard_normal((1, t, 3)).astype(np.float32), "len": np.array([t])} for t in range(1, 9)]
        for r, g in zip(reqs, _concurrently(target, "gru", reqs)):
            want = dict(zip(["y", "h"], session.run(None, r)))
            assert g["y"].shape == want["y"].shape and np.abs(g["y"] - want["y"]).max() <= TOL
        from server.client import LSTMClient

        with LSTMClient(target) as c:
            # 4. an output sized by input values is checked after it is computed
            with pytest.raises(grpc.RpcError) as err:
                c.infer_tensors("tile", {"X": np.ones((1, 4), np.float32), "reps": np.array([600, 200])})
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-message-mb" in err.value.details()
            # 7. the model's own refusal of a value is the client's error, not INTERNAL
            with pytest.raises(grpc.RpcError) as err:
                c.infer_tensors("tile", {"X": np.ones((1, 4), np.float32), "reps": np.array([1, -1])})
            assert (
                err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ONNX Runtime refused" in err.value.details()
            )
            # 5. typed narrow integers are range-checked; 6. raw BOOL bytes are 0 or 1
            req = c.tensors_request(
                "narrow", {"u": np.array([1, 2], np.uint8), "b": np.array([True, False])}, raw=False
            )
            req.inputs[0].contents.uint_contents[0] = 300
            with pytest.raises(grpc.RpcError) as err:
                c.stub.ModelInfer(req)
            assert "contents value 300 at index 0 is out of the UINT8 range 0..255" in err.value.details()
            req = c.tensors_request("narrow", {"u": np.array([1, 2], np.uint8), "b": np.array([True, False])})
            req.raw_input_contents[1] = b"\x02\x00"
            with pytest.raises(grpc.RpcError) as err:
                c.stub.ModelInfer(req)
            assert "raw BOOL content holds bytes other than 0 and 1" in err.value.details()
            # 9. config.pbtxt max_batch_size is a per-request limit, as in Triton
            with pytest.raises(grpc.RpcError) as err:
                c.infer_tensors("sum0", {"X": np.ones((9, 4), np.float32)})
            assert "batch size 9 is more than its config.pbtxt max_batch_size 8" in err.value.details()
            assert c.live()
    finally:
        srv.stop(1)


def test_review_findings_at_load_and_decode(tmp_path):
    from server.codec import MAX_BYTES_ELEMENTS, Limits, decode_inputs
    from server.errors import ResourceExhausted

    # 8. optional in config.pbtxt for an input the graph requires: refused at load, naming it
    root = tmp_path / "models"
    xy = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch"]) for n in ("X", "Y")]
    z = helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["batch"])
    _save(root, "add", _graph("add", xy, [z], [helper.make_node("Add", ["X", "Y"], ["Z"])]),
          "input [{ name: 'Y' data_type: TYPE_FP32 dims: [-1] optional: true }]")  # fmt: skip
    from server.errors import StartupError

    with pytest.raises(
        StartupError, match="add/1/model.onnx: input 'Y': optional in config.pbtxt, but model.onnx requ"
    ):
        _start(root)
    # 3. BYTES elements per tensor are bounded before anything is decoded
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="s", datatype="BYTES", shape=[MAX_BYTES_ELEMENTS + 1])
    req.raw_input_contents.append(b"\0\0\0\0" * (MAX_BYTES_ELEMENTS + 1))
    with pytest.raises(ResourceExhausted, match=f"more than the limit of {MAX_BYTES_ELEMENTS} per tensor"):
        decode_inputs(req, Limits())


# -- Triton's no-batch models, and files with large metadata ---------------------------------------


def _three_identities() -> onnx.ModelProto:
    """a, b, c: INT32 [n] each, free sizes (Triton's qa "nobatch" shape [-1]) -> their copies."""
    names = ("a", "b", "c")
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in names]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32, ["n_" + n]) for n in names]
    outputs = [helper.make_tensor_value_info(f"{n}_out", TensorProto.INT32, ["n_" + n]) for n in names]
    return _graph("ids", inputs, outputs, nodes)


def test_explicit_max_batch_size_zero_means_no_batch_axis(tmp_path):
    """With `max_batch_size: 0` axis 0 is not a batch: inputs of sizes 1, 2 and 1 agree with
    nothing, and a zero-size tensor runs (qa/L0_infer_zero). Without a config.pbtxt the free axis 0
    is still taken as the batch (today's behaviour), so sizes that differ are refused by name."""
    from server.client import LSTMClient

    root = tmp_path / "models"
    dims = 'input [{ name: "a" data_type: TYPE_INT32 dims: [-1] }, { name: "b" data_type: TYPE_INT32 dims: [-1] }]'
    _save(root, "nobatch", _three_identities(), f"max_batch_size: 0\n{dims}\n")
    _save(root, "noconfig", _three_identities())
    srv = _start(root)
    try:
        ragged = {"a": np.array([1], np.int32), "b": np.array([2, 3], np.int32), "c": np.array([4], np.int32)}
        empty = {"a": np.zeros([0], np.int32), "b": np.array([5], np.int32), "c": np.zeros([0], np.int32)}
        with LSTMClient(f"127.0.0.1:{srv.port}", timeout=30) as c:
            for inputs in (ragged, empty):
                out = c.infer_tensors("nobatch", inputs)
                for name, value in inputs.items():
                    assert out[f"{name}_out"].shape == value.shape and (out[f"{name}_out"] == value).all()
            config = c.config("nobatch")
            assert config.get("max_batch_size", 0) == 0 and [i["dims"] for i in config["input"]] == [["-1"]] * 3
            with pytest.raises(grpc.RpcError) as err:
                c.infer_tensors("noconfig", ragged)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch size 2" in err.value.details()
        status, body = _rest(srv.http_port, "/v2/models/nobatch/infer", {"inputs": [
            {"name": "a", "datatype": "INT32", "shape": [0], "data": []},
            {"name": "b", "datatype": "INT32", "shape": [2], "data": [7, 8]},
            {"name": "c", "datatype": "INT32", "shape": [1], "data": [9]}]})  # fmt: skip
        assert status == 200, body
        assert {o["name"]: o["shape"] for o in body["outputs"]} == {"a_out": [0], "b_out": [2], "c_out": [1]}
    finally:
        srv.stop(grace=1)


def test_large_metadata_props_do_not_break_grpc_model_metadata(tmp_path):
    """A file whose metadata_props hold ~60 KB (PaddleOCR's character list is 52 KB): gRPC
    ModelMetadata answers tritonclient and the project's client (headers stay within 1 KB each,
    4 KB in all), and ModelConfig's parameters carry the whole value."""
    from server.client import LSTMClient

    model = _three_identities()
    chars = "".join(chr(0x4E00 + i) for i in range(6000))  # CJK: 18 KB of UTF-8 ...
    for key, value in (("character", chars * 3), ("small", "kept"), ("lstm.note", "x" * 300)):
        model.metadata_props.add(key=key, value=value)
    assert sum(len(p.value.encode()) for p in model.metadata_props) > 50_000
    root = tmp_path / "models"
    _save(root, "big", model)
    srv = _start(root)
    try:
        target = f"127.0.0.1:{srv.port}"
        inputs = {"a": np.array([1, 2], np.int32), "b": np.array([3, 4], np.int32), "c": np.array([5, 6], np.int32)}
        out, seen = _tritonclient("grpc", target, "big", inputs, tmp_path)
        assert (out["b_out"] == inputs["b"]).all()
        assert [i["name"] for i in seen["metadata"]["inputs"]] == ["a", "b", "c"]
        assert seen["config"]["parameters"]["export.character"]["string_value"] == chars * 3
        with LSTMClient(target, timeout=30) as c:
            meta = c.metadata("big")
            # the header said one key was left out: the client read the whole metadata from ModelConfig
            assert meta["export"] == {"small": "kept", "lstm.note": "x" * 300, "character": chars * 3}
            assert c.config("big")["parameters"]["export.character"]["string_value"] == chars * 3
        with grpc.insecure_channel(target) as channel:
            from server.proto import grpc_service_pb2_grpc as pb_grpc

            _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata.with_call(
                pb.ModelMetadataRequest(name="big"), timeout=10
            )
            mine = {k: v for k, v in call.initial_metadata() if k.startswith("lstm-")}
            assert "lstm-roles" in mine and all(len(v) <= 1024 for v in mine.values())
            assert sum(len(k) + len(v) for k, v in mine.items()) <= 4096
    finally:
        srv.stop(grace=1)
