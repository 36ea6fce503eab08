"""Triton's config.pbtxt in a model folder: the supported fields take effect (checked on a real server,
in its ModelConfig and in how it batches), fields without effect are listed as ignored, and the rest
refuse the model with a message naming them."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.errors import InvalidArgument
from server.model_config import parse
from server.proto import grpc_service_pb2 as pb
from tests.conftest import TOL, reference

CPU = "CPUExecutionProvider"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", {}),
        ("# a comment only\n", {}),
        ("max_batch_size: 8", {"batching": {"max_batch": 8, "enabled": True}}),
        ("max_batch_size: 0", {}),
        ("dynamic_batching { }", {"batching": {"enabled": True}}),
        (
            "dynamic_batching { max_queue_delay_microseconds: 500 }",
            {"batching": {"max_queue_delay_us": 500, "enabled": True}},
        ),
        (
            "max_batch_size: 16 dynamic_batching { preferred_batch_size: [16] max_queue_delay_microseconds: 100 }",
            {"batching": {"max_batch": 16, "max_queue_delay_us": 100, "preferred_batch_size": [16], "enabled": True}},
        ),
        (
            "max_batch_size: 8 dynamic_batching { preferred_batch_size: [4, 2, 4] }",
            {"batching": {"max_batch": 8, "preferred_batch_size": [2, 4], "enabled": True}},
        ),
        ("instance_group [{ kind: KIND_CPU }]", {"batching": {"instances": 2, "enabled": True}}),
        ("instance_group [{ count: 2 kind: KIND_CPU }, { count: 1 }]", {"batching": {"instances": 3, "enabled": True}}),
        (
            'name: "m" platform: "onnxruntime_onnx" backend: "onnxruntime" max_batch_size: 4\n'
            'instance_group [\n  {\n    name: "m_0"\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n',
            {"batching": {"max_batch": 4, "instances": 1, "enabled": True}},
        ),
    ],
)
def test_supported_fields_map_onto_batching(text, expected):
    parsed = parse(text, "m", CPU)
    assert {k: v for k, v in parsed.items() if k != "triton"} == expected
    assert parsed["triton"].ignored == []


def test_fields_without_effect_are_listed_as_ignored():
    text = "max_batch_size: 8\nmodel_warmup [{ name: 'w' batch_size: 1 }]\noptimization { graph { level: 1 } }\n"
    text += "output [{ name: 'y' data_type: TYPE_FP32 dims: [-1, 16] label_filename: 'labels.txt' }]"
    assert parse(text, "m", CPU)["triton"].ignored == ["model_warmup", "optimization.graph"]  # label_filename: read


def test_tensors_states_versions_and_parameters_are_read(tmp_path):
    (tmp_path / "initial_state").mkdir()
    (tmp_path / "initial_state" / "s0").write_bytes(b"\0" * 16)
    text = """
    max_batch_size: 4
    input [{ name: "a" data_type: TYPE_FP16 dims: [3] optional: true reshape { shape: [1, 3] } }]
    output [{ name: "b" data_type: TYPE_STRING dims: [-1] }]
    sequence_batching {
      max_sequence_idle_microseconds: 2500000
      oldest { max_candidate_sequences: 4 }
      state [{ input_name: "s_in" output_name: "s_out" data_type: TYPE_FP32 dims: [4]
               initial_state [{ data_type: TYPE_FP32 dims: [4] name: "init" data_file: "s0" }] }]
    }
    version_policy { latest { num_versions: 2 } }
    parameters { key: "lengths_input" value { string_value: "len" } }
    """
    triton = parse(text, "m", CPU, tmp_path)["triton"]
    assert triton.max_batch_size == 4 and triton.idle_us == 2_500_000 and triton.version_policy == ("latest", 2)
    a, b = triton.inputs[0], triton.outputs[0]
    assert (a.name, a.datatype, a.dims, a.optional, a.reshape) == ("a", "FP16", (3,), True, (1, 3))
    assert (b.name, b.datatype, b.dims) == ("b", "BYTES", (-1,))
    (state,) = triton.states
    assert (state.input_name, state.output_name, state.dims) == ("s_in", "s_out", (4,))
    assert state.initial_file == tmp_path / "initial_state" / "s0"
    assert triton.parameters == {"lengths_input": "len"}
    assert triton.ignored == [] and triton.strategy == "oldest" and triton.max_sequences == 4


@pytest.mark.parametrize(
    "text,needle",
    [
        ("batch_input [{ kind: BATCH_ELEMENT_COUNT target_name: 'n' data_type: TYPE_FP32 }]", "field(s) batch_input "),
        (
            "input [{ name: 'x' data_type: TYPE_FP32 dims: [-1] allow_ragged_batch: true }]",
            "unsupported field(s) input.allow_ragged_batch ",
        ),
        (
            "sequence_batching { control_input [{ name: 'START' }] }",
            "control_input[0] 'START': exactly one control per input, got 0",
        ),
        ("sequence_batching { iterative_sequence: true }", "unsupported field(s) sequence_batching.iterative_sequence"),
        ("model_transaction_policy { decoupled: true }", "unsupported field(s) model_transaction_policy "),
        ("optimization { execution_accelerators { } }", "unsupported field(s) optimization.execution_accelerators"),
        ("dynamic_batching { default_queue_policy { max_queue_size: 3 } }", "dynamic_batching.default_queue_policy"),
        ("foo: 1", "line 1: unknown field 'foo' (not in Triton's ModelConfig)"),
        ("input [{ name: 'x' data_type: TYPE_FP32 dims: [-2] }]", "input 'x' dims [-2]"),
        ("input [{ name: 'x' dims: [1] }]", "input 'x' data_type TYPE_INVALID is not a datatype"),
        ("input [{ name: 'x' data_type: TYPE_FP32 }, { name: 'x' data_type: TYPE_FP32 }]", "input 'x' is listed twice"),
        ("version_policy { latest { num_versions: 0 } }", "num_versions must be >= 1"),
        ("default_model_filename: 'model.plan'", "default_model_filename 'model.plan'"),
        (
            "sequence_batching { state [{ input_name: 'a' data_type: TYPE_FP32 dims: [1] }] }",
            "state[0] needs input_name and output_name",
        ),
        (
            "sequence_batching { state [{ input_name: 'a' output_name: 'b' data_type: TYPE_FP32 dims: [-1] }] }",
            "a variable dim needs an initial_state with fixed dims",
        ),
        (
            "sequence_batching { state [{ input_name: 'a' output_name: 'b' data_type: TYPE_FP32 dims: [1] "
            "initial_state [{ data_type: TYPE_FP32 dims: [1] data_file: 'nope' }] }] }",
            "initial_state/nope not found",
        ),
        ("instance_group [{ count: 1 gpus: [0] }]", "unsupported field(s) instance_group.gpus"),
        (
            "dynamic_batching { preferred_batch_size: [4, 8] }",
            "preferred_batch_size [4, 8]: each size",
        ),
        ("max_batch_size: 8 dynamic_batching { preferred_batch_size: 9 }", "preferred_batch_size [9]: each size must"),
        ("instance_group [{ count: -2 }]", "instance_group[0].count must be >= 1, got -2"),
        ("instance_group [{ count: 1 kind: KIND_GPU }]", "kind KIND_GPU, but this server runs every model on CPU"),
        ("instance_group [{ count: 1 kind: KIND_MODEL }]", "kind KIND_MODEL is not supported"),
        ("max_batch_size: -1", "max_batch_size must be >= 0, got -1"),
        ("max_batch_size: 'eight'", "line 1: 'max_batch_size: 'eight'': Couldn't parse integer"),
        ("max_batch_size: 8 max_batch_size: 9", 'should not have multiple "max_batch_size" fields'),
        ('name: "other"', "name 'other' is not the model's folder name 'm'"),
        ('platform: "tensorflow_savedmodel"', "platform 'tensorflow_savedmodel': this server runs onnxruntime_onnx"),
        ('backend: "python"', "backend 'python': this server runs onnxruntime only"),
        ("max_batch_size: 8 {", "line 1"),
    ],
)
def test_everything_else_is_refused_by_name(text, needle, tmp_path):
    with pytest.raises(InvalidArgument) as err:
        parse(text, "m", CPU, tmp_path)
    message = err.value.message
    assert message.startswith("model 'm' config.pbtxt: ") and needle in message and "\n" not in message, message


def test_kind_matches_the_device_the_server_uses():
    cuda = "CUDAExecutionProvider"
    assert parse("instance_group [{ count: 2 kind: KIND_GPU }]", "m", cuda)["batching"]["instances"] == 2
    with pytest.raises(InvalidArgument, match="KIND_CPU, but this server runs every model on CUDAExecutionProvider"):
        parse("instance_group [{ kind: KIND_CPU count: 1 }]", "m", cuda)


# -- on a real server ------------------------------------------------------------------------------


def _folder(repo: Path, root: Path, pbtxt: str | None, config_json: str | None = None) -> Path:
    (root / "m" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "bi" / "1" / "model.onnx", root / "m" / "1" / "model.onnx")
    if pbtxt is not None:
        (root / "m" / "config.pbtxt").write_text(pbtxt)
    if config_json is not None:
        (root / "m" / "config.json").write_text(config_json)
    return root


def _server(root: Path, **settings):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(port=0, model_repository=root, device="cpu", metrics_port=-1, log_level="CRITICAL", **settings)
    )
    srv.start()
    return srv


@pytest.mark.slow
def test_config_pbtxt_takes_effect(repo, tmp_path, encoders):
    """max_batch_size 2 with a 2 s queue delay: 6 concurrent single-sequence calls are merged in
    pairs, never more (with the file ignored the server would not batch at all: --no-batching)."""
    from server.client import LSTMClient

    pbtxt = 'name: "m"\nmax_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 2000000 }\n'
    pbtxt += "instance_group [{ count: 1 kind: KIND_CPU }]\n"
    srv = _server(_folder(repo, tmp_path / "models", pbtxt), batching=False, max_batch=64)
    try:
        target = f"127.0.0.1:{srv.port}"
        with LSTMClient(target, timeout=30) as c:
            params = {k: v.get("string_value", "") for k, v in c.config("m")["parameters"].items()}
            assert params["batching.enabled"] == "true" and params["batching.max_batch"] == "2"
            assert params["batching.max_queue_delay_us"] == "2000000" and params["batching.instances"] == "1"
        rng = np.random.default_rng(3)
        xs = [rng.standard_normal((1, 5, 6)).astype(np.float32) for _ in range(6)]

        clients = [LSTMClient(target, timeout=30) for _ in xs]
        start = threading.Barrier(len(xs))

        def call(client, x):
            client.ready()  # connected before the barrier: the six calls arrive together
            start.wait()
            return client.infer_batch("m", x, np.array([5], np.int64))

        try:
            with ThreadPoolExecutor(len(xs)) as pool:
                results = list(pool.map(call, clients, xs))
        finally:
            for client in clients:
                client.close()
        for x, got in zip(xs, results):
            want = reference(encoders["bi"], x, np.array([5], np.int64))
            assert np.abs(got["y"] - want["y"]).max() <= TOL
        with LSTMClient(target, timeout=30) as c:
            stats = c.stub.ModelStatistics(pb.ModelStatisticsRequest(name="m"))
        sizes = {b.batch_size for b in stats.model_stats[0].batch_stats}
        assert max(sizes) == 2, sizes  # merged (the delay took effect) and capped (max_batch_size did)
    finally:
        srv.stop(1)


@pytest.mark.parametrize(
    "pbtxt,config_json,needle",
    [
        ("max_batch_size: 8\nbatch_input [{ kind: BATCH_ELEMENT_COUNT }]\n", None, "unsupported field(s) batch_input"),
        (
            "input [{ name: 'x' data_type: TYPE_FP32 dims: [-1, -1, 5] }]",
            None,
            "m/1/model.onnx: input 'x': dim 2 is 5 in config.pbtxt but 6 in model.onnx",
        ),
        (
            "input [{ name: 'x' data_type: TYPE_FP64 dims: [-1, -1, 6] }]",
            None,
            "input 'x': data_type FP64 in config.pbtxt, FP32 in model.onnx",
        ),
        ("output [{ name: 'z' data_type: TYPE_FP32 dims: [1] }]", None, "config.pbtxt output 'z': model.onnx has no"),
        ("max_batch_size: 8", '{"batching": {"max_batch": 8}}', "has both config.json and config.pbtxt: keep one"),
    ],
)
@pytest.mark.slow
def test_unsupported_config_pbtxt_refuses_the_model(repo, tmp_path, pbtxt, config_json, needle):
    from server.client import LSTMClient
    from server.errors import StartupError

    root = _folder(repo, tmp_path / "models", pbtxt, config_json)
    with pytest.raises(StartupError, match="config"):  # --exit-on-error (the default): no start at all
        _server(root)
    srv = _server(root, exit_on_error=False)
    try:
        with LSTMClient(f"127.0.0.1:{srv.port}", timeout=10) as c:
            assert not c.ready()
            with pytest.raises(grpc.RpcError) as err:
                c.infer_batch("m", np.zeros((1, 2, 6), np.float32))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and needle in err.value.details(), err.value.details()
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_editing_config_pbtxt_reloads_the_model(repo, tmp_path):
    """The repository notices a new or changed config.pbtxt (model control mode poll)."""
    from server.client import LSTMClient

    root = _folder(repo, tmp_path / "models", None)
    srv = _server(root, model_control_mode="poll", poll_s=0.1)
    try:
        with LSTMClient(f"127.0.0.1:{srv.port}", timeout=10) as c:
            assert c.config("m")["parameters"]["batching.max_batch"]["string_value"] == "64"
            (root / "m" / "config.pbtxt").write_text("max_batch_size: 3\n")
            deadline = time.monotonic() + 20
            while c.config("m")["parameters"]["batching.max_batch"]["string_value"] != "3":
                assert time.monotonic() < deadline, "config.pbtxt was not picked up"
                time.sleep(0.1)
            (root / "m" / "config.pbtxt").write_text("max_batch_size: 3\nfoo: 1\n")  # a bad edit: refused,
            time.sleep(1.0)  # the loaded version keeps serving with its settings
            assert c.config("m")["parameters"]["batching.max_batch"]["string_value"] == "3"
            assert c.infer_batch("m", np.zeros((1, 2, 6), np.float32))["y"].shape == (1, 2, 16)
    finally:
        srv.stop(1)
