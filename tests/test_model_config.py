"""Triton's config.pbtxt in a model folder: the supported fields take effect (checked on a real server,
in its ModelConfig and in how it batches), everything else refuses the model with a message naming it."""

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
            {"batching": {"max_batch": 16, "max_queue_delay_us": 100, "enabled": True}},
        ),
        ("instance_group [{ count: 2 kind: KIND_CPU }, { count: 1 }]", {"batching": {"instances": 3, "enabled": True}}),
        (
            'name: "m" platform: "onnxruntime_onnx" backend: "onnxruntime" max_batch_size: 4\n'
            'instance_group [\n  {\n    name: "m_0"\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n',
            {"batching": {"max_batch": 4, "instances": 1, "enabled": True}},
        ),
    ],
)
def test_supported_fields_map_onto_batching(text, expected):
    assert parse(text, "m", CPU) == expected


@pytest.mark.parametrize(
    "text,needle",
    [
        ("optimization { }", "line 1: unsupported field 'optimization'"),
        ("max_batch_size: 8\nmodel_warmup [{ name: 'w' }]", "line 2: unsupported field 'model_warmup'"),
        ("input [{ name: 'x' data_type: TYPE_FP32 dims: [-1, 6] }]", "unsupported field(s) input;"),
        ("output [{ name: 'y' }] parameters { key: 'a' value { string_value: 'b' } }", "field(s) output, parameters;"),
        ("sequence_batching { max_sequence_idle_microseconds: 1 }", "unsupported field(s) sequence_batching;"),
        ("version_policy { latest { num_versions: 1 } }", "unsupported field(s) version_policy;"),
        ("dynamic_batching { preserve_ordering: true }", "unsupported field(s) dynamic_batching.preserve_ordering"),
        ("dynamic_batching { default_queue_policy { } }", "unsupported field 'default_queue_policy' in ModelDynamic"),
        ("instance_group [{ count: 1 gpus: [0] }]", "unsupported field(s) instance_group.gpus"),
        ("dynamic_batching { preferred_batch_size: [4, 8] }", "preferred_batch_size [4, 8] is not supported"),
        ("max_batch_size: 8 dynamic_batching { preferred_batch_size: 4 }", "preferred_batch_size [4] is not supported"),
        ("instance_group [{ count: 0 }]", "instance_group[0].count must be >= 1, got 0"),
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
def test_everything_else_is_refused_by_name(text, needle):
    with pytest.raises(InvalidArgument) as err:
        parse(text, "m", CPU)
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
        ("max_batch_size: 8\noptimization { }\n", None, "config.pbtxt: line 2: unsupported field 'optimization'"),
        ("input [{ name: 'x' }]", None, "unsupported field(s) input"),
        ("max_batch_size: 8", '{"batching": {"max_batch": 8}}', "has both config.json and config.pbtxt: keep one"),
    ],
)
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
