"""What a model folder may make the server read or allocate, decided when the model loads: files
the config names stay inside the folder (links resolved) and are size-checked before they are
read; a state no sequence could keep fails the load; a folder without versions is listed, not
skipped; a sequence another token holds stays invisible on the pinned-version path; ModelConfig
echoes what image clients read. Real repositories and servers (loopback port 0), real ONNX Runtime
sessions, models built with onnx.helper.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.codec import decode_outputs, encode_input
from server.errors import InvalidArgument, NotFound
from server.model_config import MAX_BYTES, parse, read
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.repository import ModelRepository
from server.runtime import RuntimeOptions, select_providers
from tests.test_any_model import STATE_PBTXT, _accumulator

TOKENS = ("token-a", "token-b")
STATE_FILE_PBTXT = STATE_PBTXT.replace('zero_data: true name: "zeros"', 'name: "init" data_file: "s0"')


def _save(root: Path, name: str, model: onnx.ModelProto, pbtxt: str | None = None, version: int = 1) -> Path:
    (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / name / str(version) / "model.onnx"))
    if pbtxt is not None:
        (root / name / "config.pbtxt").write_text(pbtxt.replace('name: "acc"', f'name: "{name}"'))
    return root / name


def _repository(root: Path, **kw) -> ModelRepository:
    options = RuntimeOptions()
    return ModelRepository(root, select_providers(options), options, "explicit", **kw)


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:  # no blocks written: reading it would cost `size` bytes
        f.truncate(size)
    return path


# -- files a config names ---------------------------------------------------------------------------


def test_initial_state_data_file_stays_inside_and_is_sized_before_it_is_read(tmp_path):
    folder = tmp_path / "acc"
    (folder / "initial_state").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"\1" * 16)  # the right size, outside the model folder
    (folder / "initial_state" / "s0").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidArgument, match="initial_state/s0 must name a file inside the model's folder"):
        parse(STATE_FILE_PBTXT, "acc", folder=folder)
    (folder / "initial_state" / "s0").unlink()
    shutil.rmtree(folder / "initial_state")
    (folder / "initial_state").symlink_to(tmp_path)  # the folder itself a link out
    with pytest.raises(InvalidArgument, match="inside the model's folder"):
        parse(STATE_FILE_PBTXT.replace('"s0"', '"secret"'), "acc", folder=folder)
    (folder / "initial_state").unlink()
    (folder / "initial_state").mkdir()
    for name in ("..", "../secret", "a/b"):
        with pytest.raises(InvalidArgument, match="must be a file name"):
            parse(STATE_FILE_PBTXT.replace('"s0"', f'"{name}"'), "acc", folder=folder)
    _sparse(folder / "initial_state" / "s0", 8 << 30)
    t0 = time.perf_counter()
    with pytest.raises(InvalidArgument, match=r"s0 is 8589934592 bytes, expected 16"):
        parse(STATE_FILE_PBTXT, "acc", folder=folder)
    assert time.perf_counter() - t0 < 1.0  # decided by its size, not by reading 8 GiB
    (folder / "initial_state" / "s0").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (state,) = parse(STATE_FILE_PBTXT, "acc", folder=folder)["triton"].states
    assert state.initial_file == (folder / "initial_state" / "s0").resolve()


def test_config_pbtxt_is_sized_before_it_is_read_and_may_not_link_out(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    _sparse(folder / "config.pbtxt", 4 << 30)
    t0 = time.perf_counter()
    with pytest.raises(InvalidArgument, match=f"config.pbtxt: larger than {MAX_BYTES} bytes"):
        read(folder, "m")
    assert time.perf_counter() - t0 < 1.0
    (folder / "config.pbtxt").unlink()
    (tmp_path / "elsewhere.pbtxt").write_text("max_batch_size: 1\n")
    (folder / "config.pbtxt").symlink_to(tmp_path / "elsewhere.pbtxt")
    with pytest.raises(InvalidArgument, match="a link to a file outside the model's folder"):
        read(folder, "m")


def test_a_missing_initial_state_file_is_a_load_error(tmp_path):
    _save(tmp_path, "acc", _accumulator(), STATE_FILE_PBTXT)
    repo = _repository(tmp_path)
    assert repo.load_all() == [("acc", "model 'acc' config.pbtxt: sequence_batching.state[0].initial_state."
                                       "data_file initial_state/s0 not found in the model's folder")]  # fmt: skip
    (tmp_path / "acc" / "initial_state").mkdir()
    (tmp_path / "acc" / "initial_state" / "s0").write_bytes(np.full(4, 0.5, np.float32).tobytes())
    repo.load("acc")
    (pair,) = repo.get("acc").signature.states
    np.testing.assert_array_equal(pair.initial, np.full((1, 4), 0.5, np.float32))


# -- state no sequence could keep -------------------------------------------------------------------


def test_state_larger_than_one_sequence_may_keep_fails_the_load(tmp_path, repo):
    _save(tmp_path, "acc", _accumulator(), STATE_PBTXT)  # a 4-float state: 16 bytes
    (tmp_path / "suni" / "1").mkdir(parents=True)  # h0/c0 inputs of an exported LSTM
    shutil.copy(repo / "suni" / "1" / "model.onnx", tmp_path / "suni" / "1" / "model.onnx")
    small = _repository(tmp_path, max_state_bytes=15)
    failures = dict(small.load_all())
    assert set(failures) == {"acc", "suni"}
    for reason in failures.values():
        assert "failed to load" in reason and "more than a sequence may keep" in reason, reason
        assert "--max-sequence-state-mb" in reason
    assert not small.is_ready()
    roomy = _repository(tmp_path, max_state_bytes=1 << 20)
    assert roomy.load_all() == [] and roomy.ready_models() == ["acc", "suni"]


# -- the repository index ---------------------------------------------------------------------------


def test_a_folder_without_versions_is_listed_unavailable_and_fails_to_load(tmp_path):
    _save(tmp_path, "acc", _accumulator(), STATE_PBTXT)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.pbtxt").write_text("max_batch_size: 1\n")
    (tmp_path / "novers" / "latest").mkdir(parents=True)  # not a version: versions are integers
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a_file").write_text("not a model")
    repo = _repository(tmp_path)
    failures = dict(repo.load_all())
    assert set(failures) == {"empty", "novers"}
    rows = {row[0]: row for row in repo.index()}
    assert set(rows) == {"acc", "empty", "novers"}
    assert rows["acc"][2] == "READY"
    assert rows["empty"][2] == "UNAVAILABLE" and rows["empty"][3].startswith("failed to load 'empty': its folder ")
    assert "<model>/<version>/model.onnx" in rows["novers"][3]
    assert not repo.is_ready()
    with pytest.raises(InvalidArgument, match="^failed to load 'empty'"):
        repo.load("empty")
    with pytest.raises(NotFound, match="^failed to load 'nope': no such model folder"):
        repo.load("nope")
    _save(tmp_path, "empty", _accumulator())  # given a version, it loads and the server is ready again
    shutil.rmtree(tmp_path / "novers")
    repo.sync()
    assert repo.is_ready() and repo.ready_models() == ["acc", "empty"]


# -- served: ModelConfig and sequences ---------------------------------------------------------------


def _image_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("data_0", TensorProto.FLOAT, ["N", 3, 2, 2])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceSum", ["data_0", "axes"], ["prob"], keepdims=0)
    graph = helper.make_graph([node], "img", [x], [y], [axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


IMAGE_PBTXT = """
max_batch_size: 2
input [{ name: "data_0" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [3, 2, 2] }]
output [{ name: "prob" data_type: TYPE_FP32 dims: [3] label_filename: "labels.txt" }]
"""


def _start(root: Path, **kw):
    from server.app import InferenceServer
    from server.config import Settings

    kw = {"port": 0, "http_port": 0, "model_repository": root, "device": "cpu", "metrics_port": -1,
          "log_level": "WARNING", "model_control_mode": "explicit", **kw}  # fmt: skip
    srv = InferenceServer(Settings(**kw))
    srv.start()
    return srv


def test_model_config_echoes_input_format_and_label_filename(tmp_path):
    _save(tmp_path, "img", _image_model(), IMAGE_PBTXT)
    (tmp_path / "img" / "labels.txt").write_text("red\ngreen\nblue\n")
    _save(tmp_path, "plain", _image_model(), IMAGE_PBTXT.replace(" format: FORMAT_NCHW", "").replace(
        ' label_filename: "labels.txt"', ""))  # fmt: skip
    with pytest.raises(InvalidArgument, match="input 'data_0' format FORMAT_NHWC needs 3 dims"):
        parse(IMAGE_PBTXT.replace("NCHW", "NHWC").replace("[3, 2, 2]", "[12]"), "img")
    srv = _start(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="img"), timeout=10).config
            assert config.input[0].format == pb.ModelInput.FORMAT_NCHW
            assert config.output[0].label_filename == "labels.txt"
            plain = stub.ModelConfig(pb.ModelConfigRequest(name="plain"), timeout=10).config
            assert plain.input[0].format == pb.ModelInput.FORMAT_NONE and plain.output[0].label_filename == ""
            request = pb.ModelInferRequest(model_name="img")
            encode_input(request, "data_0", np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2))
            request.outputs.add(name="prob").parameters["classification"].int64_param = 2
            got = decode_outputs(stub.ModelInfer(request, timeout=10))["prob"].tolist()
            assert got == [[b"38.0:2:blue", b"22.0:1:green"]]  # labels read at load
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/v2/models/img/config", timeout=10) as r:
            rest = json.loads(r.read())
        assert rest["input"][0]["format"] == "FORMAT_NCHW" and rest["output"][0]["label_filename"] == "labels.txt"
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/v2/models/plain/config", timeout=10) as r:
            assert json.loads(r.read())["input"][0]["format"] == "FORMAT_NONE"  # always there: clients index it
    finally:
        srv.stop(0)


def _chunk(seq_id: int, start=False, end=False, version: str = "") -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="acc", model_version=version)
    encode_input(r, "INPUT", np.full((1, 2, 4), 0.1, np.float32))
    r.parameters["sequence_id"].uint64_param = seq_id
    r.parameters["sequence_start"].bool_param = start
    r.parameters["sequence_end"].bool_param = end
    return r


def test_a_pinned_sequence_is_neither_shown_nor_freed_to_another_token(tmp_path):
    """A's sequence started on version 1; version 1 is then unloaded. B naming the same id must get
    'unknown sequence' (not which version A pinned), and must not free A's state: A still learns
    that its version is gone."""
    for version in (1, 2):
        _save(tmp_path, "acc", _accumulator(), STATE_PBTXT, version)
    srv = _start(tmp_path, auth_tokens=",".join(TOKENS), http_port=-1)
    a = [("authorization", f"Bearer {TOKENS[0]}")]
    b = [("authorization", f"Bearer {TOKENS[1]}")]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(_chunk(5, start=True, version="1"), metadata=a, timeout=10)
            assert stub.ModelInfer(_chunk(5), metadata=a, timeout=10).model_version == "1"  # pinned
            shutil.rmtree(tmp_path / "acc" / "1")
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="acc"), metadata=a, timeout=30)
            for request in (_chunk(5), _chunk(5, end=True)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(request, metadata=b, timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert "unknown sequence 5" in err.value.details() and "version" not in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_chunk(5), metadata=a, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "started on version 1" in err.value.details(), err.value.details()  # not freed by B
    finally:
        srv.stop(0)
