"""What Triton's clients, Triton's QA and KServe's SDK send, on both frontends of a real server:
the classification extension, load with a `config` override (and `file:` refused alike),
KServe's `model_name` in REST bodies, Triton's raw binary request, and Triton's wording where its
tests read a message's leading words. Models are built here with onnx.helper.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server import classification, describe, trace
from server.codec import Limits, check_shape
from server.errors import InvalidArgument, ResourceExhausted
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.rest_codec import build_request, raw_request

HERE = Path(__file__).resolve().parent

# classes of the "cls" model's two rows (FP32 identity; the INT32 output is the same values cast)
ROWS = np.array([[0.5, 3.25, -1.0, 3.25, 2.0], [7.0, 1.0, 0.0, 8.5, -2.5]], np.float32)
LABELS = ["cat", "dog", "bird", "fish", "frog"]
CLS_PBTXT = """
max_batch_size: 8
input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [5] }]
output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [5] label_filename: "labels.txt" },
        { name: "OUTPUT1" data_type: TYPE_INT32 dims: [5] }]
"""


def _model(inputs, outputs, nodes) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vi(name, kind, shape):
    return helper.make_tensor_value_info(name, kind, shape)


def _save(root: Path, name: str, model: onnx.ModelProto, pbtxt: str | None = None) -> None:
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, str(root / name / "1" / "model.onnx"))
    if pbtxt is not None:
        (root / name / "config.pbtxt").write_text(pbtxt)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server.app import InferenceServer
    from server.config import Settings

    root = tmp_path_factory.mktemp("dropin")
    f = TensorProto.FLOAT
    outs = [_vi("OUTPUT0", f, ["N", 5]), _vi("OUTPUT1", TensorProto.INT32, ["N", 5])]
    cls = _model([_vi("INPUT0", f, ["N", 5])], outs,
                 [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"]),
                  helper.make_node("Cast", ["INPUT0"], ["OUTPUT1"], to=TensorProto.INT32)])  # fmt: skip
    _save(root, "cls", cls, CLS_PBTXT)
    (root / "cls" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (root / "cls" / "other.txt").write_text("a\nb\nc\nd\ne\n")
    # raw binary: one variable dim (no batching), one fixed BYTES element, two variable dims, three inputs
    _save(root, "raw1", _model([_vi("INPUT0", f, ["T"])], [_vi("OUTPUT0", f, ["T"])],
                               [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]),
          'max_batch_size: 0\ninput [{ name: "INPUT0" data_type: TYPE_FP32 dims: [-1] }]\n'
          'output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [-1] }]\n')  # fmt: skip
    _save(root, "rawb", _model([_vi("INPUT0", f, ["N", 4])], [_vi("OUTPUT0", f, ["N", 4])],
                               [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]),
          'max_batch_size: 4\ninput [{ name: "INPUT0" data_type: TYPE_FP32 dims: [4] }]\n'
          'output [{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [4] }]\n')  # fmt: skip
    s = TensorProto.STRING
    _save(root, "rawstr", _model([_vi("INPUT0", s, [1])], [_vi("OUTPUT0", s, [1])],
                                 [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]),
          'max_batch_size: 0\ninput [{ name: "INPUT0" data_type: TYPE_STRING dims: [1] }]\n'
          'output [{ name: "OUTPUT0" data_type: TYPE_STRING dims: [1] }]\n')  # fmt: skip
    _save(root, "rawstrs", _model([_vi("INPUT0", s, ["T"])], [_vi("OUTPUT0", s, ["T"])],
                                  [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]),
          'max_batch_size: 0\ninput [{ name: "INPUT0" data_type: TYPE_STRING dims: [-1] }]\n'
          'output [{ name: "OUTPUT0" data_type: TYPE_STRING dims: [-1] }]\n')  # fmt: skip
    h = TensorProto.FLOAT16
    _save(root, "raw2var", _model([_vi("INPUT0", h, ["A", "B"])], [_vi("OUTPUT0", h, ["A", "B"])],
                                  [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])]),
          'max_batch_size: 0\ninput [{ name: "INPUT0" data_type: TYPE_FP16 dims: [-1, -1] }]\n'
          'output [{ name: "OUTPUT0" data_type: TYPE_FP16 dims: [-1, -1] }]\n')  # fmt: skip
    three = [_vi(f"INPUT{i}", f, ["T"]) for i in range(3)]
    _save(root, "raw3", _model(three, [_vi("OUTPUT0", f, ["T"])], [helper.make_node("Sum", [t.name for t in three],
                                                                                       ["OUTPUT0"])]))  # fmt: skip
    srv = InferenceServer(Settings(port=0, http_port=0, model_repository=root, device="cpu", metrics_port=-1,
                                   log_level="WARNING", model_control_mode="explicit"))  # fmt: skip
    srv.start()
    srv.root = root
    yield srv
    srv.stop(1)


def _http(port, path, body=None, headers=None, method="POST"):
    """(status, headers, body bytes) without raising on 4xx/5xx."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def _error(port, path, body, status, headers=None) -> str:
    got, _, raw = _http(port, path, body, headers)
    assert got == status, raw
    return json.loads(raw)["error"]


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _expected(values: np.ndarray, k: int, labels=None) -> list[bytes]:
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    return [(f"{values[i]}:{i}" + (f":{labels[i]}" if labels and i < len(labels) else "")).encode() for i in order]


# -- classification --------------------------------------------------------------------------------


def _grpc_cls(stub, k, outputs=("OUTPUT0",), kind="int64_param"):
    req = pb.ModelInferRequest(model_name="cls")
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=list(ROWS.shape))
    t.contents.fp32_contents.extend(ROWS.ravel().tolist())
    for name in outputs:
        o = req.outputs.add(name=name)
        setattr(o.parameters["classification"], kind, k)
    return stub.ModelInfer(req, timeout=30)


def test_classification_over_grpc(stub):
    from server.codec import decode_outputs

    reply = _grpc_cls(stub, 3, ("OUTPUT0", "OUTPUT1"))
    out = decode_outputs(reply)
    assert [o.datatype for o in reply.outputs] == ["BYTES", "BYTES"] and list(reply.outputs[0].shape) == [2, 3]
    for b in range(2):  # per batch entry, labels from label_filename; ties: the lower index first
        assert out["OUTPUT0"][b].tolist() == _expected(ROWS[b], 3, LABELS)
        assert out["OUTPUT1"][b].tolist() == _expected(ROWS[b].astype(np.int32), 3)
    assert out["OUTPUT0"][0].tolist() == [b"3.25:1:dog", b"3.25:3:fish", b"2.0:4:frog"]
    # more classes than elements: all of them (Triton: min(k, n))
    reply = _grpc_cls(stub, 50)
    assert list(reply.outputs[0].shape) == [2, 5]
    # Triton's type rule for the parameter, and a negative count
    for k, kind, needle in ((2.0, "double_param", "must be an integer >= 0"), (-1, "int64_param", "got -1")):
        with pytest.raises(grpc.RpcError) as err:
            _grpc_cls(stub, k, kind=kind)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_classification_over_rest(server):
    body = {"inputs": [{"name": "INPUT0", "shape": [2, 5], "datatype": "FP32", "data": ROWS.tolist()}],
            "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 2}},
                        {"name": "OUTPUT1", "parameters": {"classification": 1, "binary_data": True}}]}  # fmt: skip
    status, headers, raw = _http(server.http_port, "/v2/models/cls/infer", body)
    assert status == 200, raw
    n = int(headers["inference-header-content-length"])
    head = json.loads(raw[:n])
    out0, out1 = head["outputs"]
    assert out0 == {"name": "OUTPUT0", "datatype": "BYTES", "shape": [2, 2],
                    "data": [s.decode() for b in range(2) for s in _expected(ROWS[b], 2, LABELS)]}  # fmt: skip
    assert out1["datatype"] == "BYTES" and out1["shape"] == [2, 1]
    from server.dtypes import deserialize_bytes

    assert deserialize_bytes(raw[n:], 2, "OUTPUT1").tolist() == [b"3:1", b"8:3"]
    # the parameter's type is checked before anything runs
    body["outputs"][0]["parameters"]["classification"] = "2"
    assert "parameter 'classification' must be an integer >= 0" in _error(server.http_port, "/v2/models/cls/infer",
                                                                          body, 400)  # fmt: skip


def test_classify_unit():
    values = np.array([1, 5, 10, 4], np.uint8)  # Triton's documented example
    assert classification.classify("o", values, 2, False, None).tolist() == [b"10:2", b"5:1"]
    with pytest.raises(InvalidArgument, match="unsupported type 'BOOL'"):
        classification.classify("o", np.array([True]), 1, False, None)
    strings = np.array([b"a"], object)
    with pytest.raises(InvalidArgument, match="unsupported type 'BYTES'"):
        classification.classify("o", strings, 1, False, None)
    too_many = np.zeros(classification.MAX_ELEMENTS + 1, np.float32)
    with pytest.raises(InvalidArgument, match="classification output tensor too large"):
        classification.classify("o", too_many, 1, False, None)
    # floats: numpy's shortest text that reads back as the same value
    tiny = np.array([1e-7, 0.1], np.float32)
    got = classification.classify("o", tiny, 2, False, None).tolist()
    assert [np.float32(float(s.split(b":")[0])) for s in got] == [tiny[1], tiny[0]]


def test_label_file_must_stay_in_the_model_folder(tmp_path):
    from server import model_config

    (tmp_path / "m").mkdir()
    (tmp_path / "secret.txt").write_text("x\n")
    (tmp_path / "m" / "big.txt").write_bytes(b"a\n" * (model_config.MAX_LABEL_BYTES // 2 + 1))
    (tmp_path / "m" / "link.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "m" / "ok.txt").write_text("a\r\nb\n")
    text = "output [{ name: 'o' data_type: TYPE_FP32 dims: [2] label_filename: '%s' }]"
    for name, needle in (("../secret.txt", "inside the model's folder"), ("link.txt", "inside the model's folder"),
                         ("nope.txt", "not found"), ("big.txt", "larger than"), (".", "inside")):  # fmt: skip
        with pytest.raises(InvalidArgument, match=needle) as err:  # a load error, not a request-time one
            model_config.parse(text % name, "m", folder=tmp_path / "m")
        assert err.value.message.startswith(f"model 'm' config.pbtxt: output 'o' label_filename '{name}'")
    got = model_config.parse(text % "ok.txt", "m", folder=tmp_path / "m", source="load parameter 'config'")
    assert got["triton"].outputs[0].labels == ("a", "b")
    with pytest.raises(InvalidArgument, match="^model 'm' load parameter 'config': output 'o'"):
        model_config.parse(text % "nope.txt", "m", folder=tmp_path / "m", source="load parameter 'config'")


def test_missing_label_file_makes_the_model_unavailable(tmp_path):
    """The model fails to load (listed UNAVAILABLE with the reason); nothing fails per request."""
    from server.repository import ModelRepository
    from server.runtime import RuntimeOptions, select_providers

    f = TensorProto.FLOAT
    model = _model([_vi("INPUT0", f, ["N", 5])], [_vi("OUTPUT0", f, ["N", 5])],
                   [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])])  # fmt: skip
    _save(tmp_path, "cls", model, CLS_PBTXT.split("output")[0] + 'output [{ name: "OUTPUT0" data_type: TYPE_FP32 '
          'dims: [5] label_filename: "labels.txt" }]')  # fmt: skip
    options = RuntimeOptions()
    repo = ModelRepository(tmp_path, select_providers(options), options, "explicit")
    repo.load_all()
    (row,) = repo.index()
    assert row[:3] == ("cls", "", "UNAVAILABLE")
    assert "output 'OUTPUT0' label_filename 'labels.txt' not found in the model's folder" in row[3], row
    (tmp_path / "cls" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    repo.load("cls")
    assert repo.index()[0][2] == "READY"
    out = classification.apply(repo.get("cls"), {"OUTPUT0": {"classification": 1}},
                               {"OUTPUT0": ROWS})  # fmt: skip
    assert out["OUTPUT0"].tolist() == [[b"3.25:1:dog"], [b"8.5:3:fish"]]


# -- load with parameters ------------------------------------------------------------------------


def _grpc_load(stub, name, **params):
    req = pb.RepositoryModelLoadRequest(model_name=name)
    for key, value in params.items():
        key = key.replace("__", ":")
        if isinstance(value, bytes):
            req.parameters[key].bytes_param = value
        else:
            req.parameters[key].string_param = value
    return stub.RepositoryModelLoad(req, timeout=60)


def _config_json(max_batch_size: int, label_file: str = "other.txt") -> str:
    return json.dumps({
        "max_batch_size": max_batch_size,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [5]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [5], "label_filename": label_file},
                   {"name": "OUTPUT1", "data_type": "TYPE_INT32", "dims": [5]}],
    })  # fmt: skip


def test_load_with_config_override(server, stub):
    port = server.http_port

    def max_batch() -> int:
        status, _, raw = _http(port, "/v2/models/cls/config", method="GET")
        return json.loads(raw)["max_batch_size"]

    try:
        _grpc_load(stub, "cls", config=_config_json(2))  # applied to this load: config and labels
        assert max_batch() == 2
        reply = _grpc_cls(stub, 1)
        from server.codec import decode_outputs

        assert decode_outputs(reply)["OUTPUT0"].tolist() == [[b"3.25:1:b"], [b"8.5:3:d"]]
        # over REST too, as tritonclient.http sends it
        assert _http(port, "/v2/repository/models/cls/load", {"parameters": {"config": _config_json(3)}})[0] == 200
        assert max_batch() == 3
        # a load without parameters goes back to the model's config.pbtxt
        assert _http(port, "/v2/repository/models/cls/load", b"")[0] == 200
        assert max_batch() == 8
    finally:
        _http(port, "/v2/repository/models/cls/load", b"")


BAD_LOADS = [
    # (parameters, fragment of the message) - the same on both frontends
    ({"config": "{not json"}, "model 'cls' load parameter 'config' is not valid JSON (line 1 column 2)"),
    ({"config": "[]"}, "must be a JSON object"),
    ({"config": '{"max_batch_size": 2, "bogus": 1}'}, "unknown field 'bogus' (not in Triton's ModelConfig)"),
    ({"config": '{"max_batch_size": "many"}'}, "field 'max_batch_size' has a value of the wrong type"),
    ({"config": '{"max_batch_size": -1}'}, "model 'cls' load parameter 'config': max_batch_size must be >= 0"),
    ({"config": '{"ensemble_scheduling": {}}'}, "unsupported field(s) ensemble_scheduling"),
    ({"config": _config_json(2, "../cls/../../etc/passwd")}, "must name a file inside the model's folder"),
    ({"config": "{}", "file:1/model.onnx": "AAAA"}, "'file:' parameters (model files sent with the load request) are"),
    ({"other": "x"}, "unknown load parameter 'other'"),
]


@pytest.mark.parametrize("params,needle", BAD_LOADS, ids=[b[1][:30] for b in BAD_LOADS])
def test_bad_load_parameters_refused_alike(server, stub, params, needle):
    rest = _error(server.http_port, "/v2/repository/models/cls/load", {"parameters": params}, 400)
    grpc_params = {k.replace(":", "__"): (v.encode() if k.startswith("file:") else v) for k, v in params.items()}
    with pytest.raises(grpc.RpcError) as err:
        _grpc_load(stub, "cls", **grpc_params)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in rest and needle in err.value.details(), (rest, err.value.details())
    assert _http(server.http_port, "/v2/models/cls/ready", method="GET")[0] == 200  # still serving, as it was


def test_server_metadata_advertises_classification(server, stub):
    assert "classification" in stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions
    status, _, raw = _http(server.http_port, "/v2", method="GET")
    assert "classification" in json.loads(raw)["extensions"]


# -- KServe's REST body: model_name (and model_version) ---------------------------------------------


def test_body_model_name_accepted_unless_it_contradicts_the_url(server):
    port = server.http_port
    body = {"id": "k1", "model_name": "cls", "inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32",
                                                         "data": ROWS[:1].ravel().tolist()}]}  # fmt: skip
    status, _, raw = _http(port, "/v2/models/cls/infer", body)
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == ROWS[0].tolist()
    assert _http(port, "/v2/models/cls/infer", {**body, "model_version": "1"})[0] == 200
    assert _http(port, "/v2/models/cls/versions/1/infer", {**body, "model_version": "1"})[0] == 200
    assert "'model_name' 'raw1' contradicts the URL's model 'cls'" in _error(
        port, "/v2/models/cls/infer", {**body, "model_name": "raw1"}, 400)  # fmt: skip
    assert "'model_version' '2' contradicts the URL's version '1'" in _error(
        port, "/v2/models/cls/versions/1/infer", {**body, "model_version": "2"}, 400)  # fmt: skip
    # a body version where the URL has none names it (and an unknown one is not found)
    assert _http(port, "/v2/models/cls/infer", {**body, "model_version": "7"})[0] == 404
    assert "unknown request field(s) ['extra']" in _error(port, "/v2/models/cls/infer", {**body, "extra": 1}, 400)


# -- Triton's raw binary request --------------------------------------------------------------------

RAW = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}


def test_raw_binary_request_over_http(server):
    port = server.http_port
    for n in (8, 32):  # Triton's L0_http test_raw_binary / _longer: the shape's one free dim from the size
        data = np.arange(n, dtype=np.float32).tobytes()
        status, headers, raw = _http(port, "/v2/models/raw1/infer", data, RAW)
        assert status == 200, raw
        size = int(headers["inference-header-content-length"])
        assert json.loads(raw[:size])["outputs"][0]["shape"] == [n] and raw[size:] == data
    status, headers, raw = _http(port, "/v2/models/rawstr/infer", b"427", RAW)  # test_byte
    assert status == 200 and raw[int(headers["inference-header-content-length"]) + 4 :] == b"427"
    assert "the model must have input shape [1]" in _error(port, "/v2/models/rawstrs/infer", b"427", 400, RAW)


def test_raw_binary_request_codec(server):
    """The codec's side of the raw binary request, with the configurations the server reports."""
    plane, limits = server.plane, Limits()

    def raw(model, data):
        return raw_request(data, model, "", limits, describe.model_config(plane, model, ""))

    for n in (8, 32):
        data = np.arange(n, dtype=np.float32).tobytes()
        request, binary, binary_all = raw("raw1", data)
        assert request.inputs["INPUT0"].shape == (n,) and request.inputs["INPUT0"].tobytes() == data and binary_all
    request, _, _ = raw("rawb", np.ones(4, np.float32).tobytes())  # a batching model: a batch of 1
    assert request.inputs["INPUT0"].shape == (1, 4)
    request, _, _ = raw("rawstr", b"427")
    assert request.inputs["INPUT0"].tolist() == [b"427"]
    for model, data, needle in (
        ("rawstrs", b"427", "For BYTE datatype raw input 'INPUT0', the model must have input shape [1]"),
        ("raw2var", np.ones([2, 2], np.float16).tobytes(), "The shape of the raw input 'INPUT0' can not be deduced "
         "because there are more than one variable-sized dimension"),
        ("raw3", np.arange(24, dtype=np.float32).tobytes(), "Raw request must only have 1 input (found 1) to be "
         "deduced but got 3 inputs in"),
        ("raw1", b"\x00" * 7, "7 bytes are not a whole number of 4-byte steps"),
        ("rawb", b"\x00" * 12, "12 bytes, expected 16 for shape [1, 4] of FP32"),
    ):  # fmt: skip
        with pytest.raises(InvalidArgument) as err:
            raw(model, data)
        assert needle in err.value.message, err.value.message


# -- Triton's wording; shapes no tensor can have; no parser text in messages -----------------------


def test_overflowing_shapes_are_400_with_tritons_words(server, stub):
    """Triton's L0_http test_buffer_size_overflow: an element count or byte size past int64 can never
    succeed: INVALID_ARGUMENT (400), not RESOURCE_EXHAUSTED (429)."""
    port = server.http_port
    for shape, needle in (([2**4, 2**60 + 2], "causes total element count to exceed maximum size of"),
                          ([2**2, 2**60 + 2], "byte size overflow for input 'INPUT0'")):  # fmt: skip
        body = {"inputs": [{"name": "INPUT0", "shape": shape, "datatype": "FP32", "data": [1.0]}]}
        assert needle in _error(port, "/v2/models/cls/infer", body, 400)
        req = pb.ModelInferRequest(model_name="cls")
        req.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
        req.raw_input_contents.append(b"")
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    with pytest.raises(ResourceExhausted):  # over this server's limit, representable: unchanged
        check_shape("x", [10**6, 10**6], Limits())


def test_duplicate_outputs_in_tritons_words(server, stub):
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [0.0] * 5}],
            "outputs": [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}]}  # fmt: skip
    assert "output 'OUTPUT0' already exists in request" in _error(server.http_port, "/v2/models/cls/infer", body, 400)
    req = pb.ModelInferRequest(model_name="cls")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 5]).contents.fp32_contents.extend([0.0] * 5)
    req.outputs.add(name="OUTPUT0")
    req.outputs.add(name="OUTPUT0")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=10)
    assert "output 'OUTPUT0' already exists in request" in err.value.details()


def test_json_nesting_depth(server):
    """Triton's L0_http test_json_recursion_depth_limit: 50 levels of nesting are data, 120 are refused."""

    def nested(depth, value):
        for _ in range(depth):
            value = [value]
        return value

    port = server.http_port
    for depth, ok in ((50, True), (120, False)):
        body = {"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": nested(depth, 0.0)}]}
        got, _, raw = _http(port, "/v2/models/cls/infer", body)
        assert got == 400, raw  # one value for five: refused either way, but for what it is
        needle = "holds 5 elements, 'data' has 1" if ok else "JSON nesting depth exceeds maximum allowed limit (100)"
        assert needle in json.loads(raw)["error"], raw
        strings = nested(depth, "hello")
        request = {"inputs": [{"name": "s", "shape": [1, 1], "datatype": "BYTES", "data": strings}]}
        if ok:
            assert build_request(request, memoryview(b""), "m", "", Limits())[0].inputs["s"].tolist() == [[b"hello"]]
        else:
            with pytest.raises(InvalidArgument, match=r"JSON nesting depth exceeds maximum allowed limit \(100\)"):
                build_request(request, memoryview(b""), "m", "", Limits())


BAD_JSON = [
    # (body, fragment that must be there, texts of Python's parsers that must not)
    (b"{not json", "request body is not valid JSON (line 1 column 2)", "Expecting"),
    (b"\xff\xfe{", "not valid JSON", "codec"),
    (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32",
                             "data": [[0.0, 1.0], [2.0]]}]}).encode(),
     "'data' must be a (nested) list of FP32 values with lists of equal lengths", "inhomogeneous"),
    (json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": ["a"] * 5}]}).encode(),
     "'data' must be a (nested) list of FP32 values, got strings", "kind"),
    (b'{"inputs": [{"name": "INPUT0", "shape": [1, 5], "datatype": "FP32", "data": [1' + b"0" * 5000 + b"]}]}",
     "not valid JSON", "4300"),
]  # fmt: skip


@pytest.mark.parametrize("body,needle,leak", BAD_JSON, ids=[b[1][:30] for b in BAD_JSON])
def test_parser_texts_stay_out_of_messages(server, body, needle, leak):
    message = _error(server.http_port, "/v2/models/cls/infer", body, 400, {"Content-Type": "application/json"})
    assert needle in message and leak not in message, message


# -- KServe's SDK itself --------------------------------------------------------------------------

KSERVE_PYTHON = os.environ.get("KSERVE_PYTHON", "")


def test_kserve_sdk_rest_and_grpc(server):
    """KServe's InferenceRESTClient (v2) and InferenceGRPCClient, run from a venv holding `kserve`
    (KSERVE_PYTHON; the SDK pulls in a large tree, so it is not in the project's venvs)."""
    if not KSERVE_PYTHON or not Path(KSERVE_PYTHON).exists():
        pytest.skip("set KSERVE_PYTHON to the python of a venv with kserve installed")
    run = subprocess.run([KSERVE_PYTHON, str(HERE / "kserve_sdk_check.py"), str(server.port), str(server.http_port)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {
        "rest_binary_False": True,
        "rest_binary_True": True,
        "rest_classification": ["3.25:1:dog", "3.25:3:fish", "8.5:3:fish", "7.0:0:cat"],
        "grpc_ready": True,
        "grpc": True,
        "grpc_classification": ["3.25:1:dog", "8.5:3:fish"],
    }, got


# -- tritonclient ---------------------------------------------------------------------------------

TRITON_PYTHON = os.environ.get("TRITON_PYTHON") or str(HERE.parent / ".venv-triton" / "bin" / "python")


def test_tritonclient_classification_and_load_config(server):
    """Triton's own clients: `class_count` and `load_model(config=...)` on both protocols; a bad
    config and `files` refused alike (StatusCode/HTTP status wording from tritonclient)."""
    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    run = subprocess.run([TRITON_PYTHON, str(HERE / "tritonclient_dropin_check.py"), str(server.port),
                          str(server.http_port)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    bad = "model 'cls' load parameter 'config' is not valid JSON (line 1 column 2)"
    files = "'file:' parameters (model files sent with the load request) are not supported"
    assert got.pop("grpc_bad_config").endswith(bad) and got.pop("http_bad_config").endswith(bad)
    assert files in got.pop("grpc_file") and files in got.pop("http_file")
    assert got == {
        "grpc_classes": ["3.25:1:dog", "3.25:3:fish", "8.5:3:fish", "7.0:0:cat"],
        "http_classes": ["3.25:1:dog", "3.25:3:fish", "8.5:3:fish", "7.0:0:cat"],
        "grpc_load_config": 2,
        "labels_after_grpc_load": ["3.25:1:b", "8.5:3:d"],
        "http_load_config": 3,
        "reloaded": 8,
        "grpc_trace": {k: {"value": v} for k, v in trace.SETTINGS.items()},
        "http_trace": trace.rest_form(trace.SETTINGS),
        "http_trace_update": trace.rest_form(trace.SETTINGS),
        "http_model_trace": ["OFF"],
        "grpc_trace_update": {"value": ["OFF"]},
        "grpc_trace_on": ["StatusCode.UNIMPLEMENTED", TRACE_ON],
        "http_trace_on": ["501", TRACE_ON],
    }, got


TRACE_ON = (
    "trace setting 'trace_level' = ['TIMESTAMPS']: tracing is not implemented by this server; trace_level stays ['OFF']"
)


def test_unload_parameters(server):
    port = server.http_port
    assert "unload parameter(s) ['x'] are not supported" in _error(
        port, "/v2/repository/models/raw3/unload", {"parameters": {"x": 1}}, 400)  # fmt: skip
    assert "'unload_dependents' must be true or false" in _error(
        port, "/v2/repository/models/raw3/unload", {"parameters": {"unload_dependents": 1}}, 400)  # fmt: skip
    assert _http(port, "/v2/models/raw3/ready", method="GET")[0] == 200  # nothing was unloaded
    try:  # tritonclient's unload_model(unload_dependents=True): no model here has dependents
        body = {"parameters": {"unload_dependents": True}}
        assert _http(port, "/v2/repository/models/raw3/unload", body)[0] == 200
        assert _http(port, "/v2/models/raw3/ready", method="GET")[0] == 503
    finally:
        assert _http(port, "/v2/repository/models/raw3/load", b"")[0] == 200
