"""Hardening: bounded sequence ids, responses sized before they run, readiness with failed models,
--exit-on-error, empty token sources, --model-control-mode, hostile names and versions, load logs.

Real servers on loopback port 0 (in-process and `python -m server`), real ONNX Runtime sessions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import LSTMClient
from server.errors import clip
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.sequences import EVICTED_MAX_BYTES, EVICTED_MAX_COUNT, MAX_ID_BYTES, SequenceStore

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "inference.GRPCInferenceService"


def _start(repo: Path, **kw):
    from server.app import InferenceServer
    from server.config import Settings

    kw = {"port": 0, "model_repository": repo, "device": "cpu", "metrics_port": -1, "log_level": "WARNING", **kw}
    srv = InferenceServer(Settings(**kw))
    srv.start()
    return srv


def _stub(channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def _health(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _rpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=30, **kw)
    return err.value


def _server_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", "--device", "cpu", "--port", "0", "--metrics-port", "-1", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def _repo_with_broken(repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "good" / "1").mkdir(parents=True)
    shutil.copy(repo / "uni" / "1" / "model.onnx", root / "good" / "1" / "model.onnx")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return root


# -- sequence ids ---------------------------------------------------------------------------------


def _chunk(seq_id: str, start: bool = True, end: bool = False) -> pb.ModelInferRequest:
    request = LSTMClient.request(None, "suni", np.ones((1, 2, 5), np.float32))
    request.parameters["sequence_id"].string_param = seq_id
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


def test_sequence_id_size_is_limited(target):
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 4 << 20)]) as channel:
        stub = _stub(channel)
        for seq_id in ("x" * (MAX_ID_BYTES + 1), "é" * (MAX_ID_BYTES // 2 + 1), "y" * (1 << 20)):
            err = _rpc_error(stub.ModelInfer, _chunk(seq_id))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            assert "'sequence_id'" in err.details() and f"at most {MAX_ID_BYTES} bytes" in err.details()
            assert len(err.details()) < 200  # the id itself is not echoed
        ok = stub.ModelInfer(_chunk("é" * (MAX_ID_BYTES // 2), end=True), timeout=30)  # exactly 256 bytes
        assert ok.parameters["sequence_end"].bool_param


def test_evicted_ids_are_bounded_by_count_and_bytes():
    store = SequenceStore(max_sequences=100_000, idle_s=1e-9)
    zeros = np.zeros((1, 1, 2), np.float32)
    n = EVICTED_MAX_BYTES // MAX_ID_BYTES + 500  # more long ids than the byte cap holds
    for i in range(n):
        seq_id = f"{i:08d}".ljust(MAX_ID_BYTES, "z")
        store.acquire("m", 1, seq_id, True, {"h0": zeros, "c0": zeros})
        store.release("m", seq_id, {"h0": zeros, "c0": zeros}, False)
    time.sleep(0.01)
    store.sweep()  # each acquire sweeps too: all n are freed by now
    assert store.evictions == n and len(store) == 0
    count, size = store.evicted_memory()
    assert size <= EVICTED_MAX_BYTES and count < n and count <= EVICTED_MAX_COUNT
    with pytest.raises(Exception, match="was freed after"):  # the newest are remembered
        store.acquire("m", 1, f"{n - 1:08d}".ljust(MAX_ID_BYTES, "z"), False, {"h0": zeros, "c0": zeros})
    with pytest.raises(Exception, match="unknown sequence '00000000zzz"):  # the oldest forgotten
        store.acquire("m", 1, "00000000".ljust(MAX_ID_BYTES, "z"), False, {"h0": zeros, "c0": zeros})
    short = SequenceStore(max_sequences=100_000, idle_s=1e-9)
    for i in range(EVICTED_MAX_COUNT + 300):  # short ids: the count cap binds
        short.acquire("m", 1, i, True, {"h0": zeros, "c0": zeros})
        short.release("m", i, {"h0": zeros, "c0": zeros}, False)
    time.sleep(0.01)
    short.sweep()
    assert short.evicted_memory()[0] == EVICTED_MAX_COUNT


# -- responses sized before they run --------------------------------------------------------------


def test_output_size_estimate_matches_the_real_response(server):
    """The estimate is never below the serialized response and at most ~2 KiB above it (dynamic,
    static with its time axis cut back, bidirectional, every output subset)."""
    from server.dataplane import InferRequest
    from server.grpc_codec import to_infer_response
    from server.validate import validate

    plane = server.plane
    for model, shape, outputs in [("bi", (3, 7, 6), []), ("bi", (1, 1, 6), ["h_n"]), ("uni", (5, 9, 5), ["y"]),
                                  (f"bi_static_t{12}", (2, 5, 6), []), ("suni", (4, 3, 5), ["c_n", "y"])]:  # fmt: skip
        request = InferRequest(model, inputs={"x": np.ones(shape, np.float32)}, outputs=outputs)
        prepared = validate(plane.repository.get(model), request.inputs, outputs)
        estimate = plane.output_shapes(prepared, prepared.outputs)
        response = plane.infer(request)
        assert list(response.outputs) == list(estimate), model
        for name, array in response.outputs.items():
            assert estimate[name] == (list(array.shape), array.nbytes), (model, name)
        total = sum(size for _, size in estimate.values()) + 1024 + 64 * len(estimate)
        size = to_infer_response(response).ByteSize()  # what goes on the wire
        assert size <= total <= size + 2048


def test_oversized_response_refused_before_compute(repo):
    srv = _start(repo, max_message_mb=1, metrics_port=0)
    try:
        x = np.ones((64, 300, 6), np.float32)  # 0.46 MB in; y would be 64*300*16*4 = 1.2 MB out
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel, LSTMClient(channel=channel) as c:
            stub = _stub(channel)
            err = _rpc_error(stub.ModelInfer, c.request("bi", x))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            for needle in ("'y' [64, 300, 16] = 1,228,800 B", "1,048,576 bytes", "--max-message-mb"):
                assert needle in err.details(), err.details()
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="bi"), timeout=10).model_stats[0]
            assert stats.execution_count == 0 and stats.inference_stats.fail.count == 1  # never ran
            assert stats.inference_stats.success.count == 0
            assert c.infer_batch("bi", x, outputs=["h_n"])["h_n"].shape == (4, 64, 8)  # what fits is served
            # the same over a stream: an error in the stream, the stream goes on
            replies = list(c.stream([c.request("bi", x), c.request("bi", x[:2])]))
            assert isinstance(replies[0], Exception) and "--max-message-mb" in str(replies[0])  # bare text
            assert replies[1]["y"].shape == (2, 300, 16)
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'lstm_requests_total{code="RESOURCE_EXHAUSTED",model="bi"} 2.0' in body
    finally:
        srv.stop(1)


def test_send_failure_hook_moves_a_success_to_fail(repo):
    """What a frontend calls when the response `infer` returned could not be sent."""
    srv = _start(repo, metrics_port=0)
    try:
        from server.dataplane import InferRequest

        response = srv.plane.infer(InferRequest("uni", inputs={"x": np.ones((2, 3, 5), np.float32)}))
        snap = srv.stats.snapshot()[("uni", 1)]
        assert (snap.success.count, snap.fail.count) == (1, 0)
        srv.plane.record_send_failure(response, grpc.StatusCode.CANCELLED, snap.success.ns + 1000)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stats = _stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="uni"), timeout=10).model_stats[0]
        assert stats.inference_stats.success.count == 0 and stats.inference_stats.success.ns == 0
        assert stats.inference_stats.fail.count == 1 and stats.inference_stats.fail.ns == snap.success.ns + 1000
        assert stats.inference_count == 2 and stats.execution_count == 1  # it did run
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'lstm_send_failures_total{code="CANCELLED",model="uni"} 1.0' in body
    finally:
        srv.stop(1)


# -- readiness, --exit-on-error -------------------------------------------------------------------


@pytest.mark.slow
def test_failed_model_makes_the_server_not_ready(repo, tmp_path):
    root = _repo_with_broken(repo, tmp_path)
    srv = _start(root, exit_on_error=False, model_control_mode="explicit", http_port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel, LSTMClient(channel=channel) as c:
            stub = _stub(channel)
            assert c.live() and not c.ready()
            assert _health(channel) == _health(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert c.model_ready("good") and not c.model_ready("broken")
            assert c.infer_batch("good", np.ones((1, 2, 5), np.float32))["h_n"].shape == (1, 1, 3)  # still serves
            index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
            assert index["good"].state == "READY" and index["broken"].state == "UNAVAILABLE"
            reason = index["broken"].reason
            assert "model 'broken' version 1 failed to load" in reason and "broken/1/model.onnx" in reason, reason
            assert str(tmp_path) not in reason and "ONNXRuntimeError" not in reason, reason
            status = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v2/health/ready")
            with pytest.raises(urllib.error.HTTPError) as http_err:
                urllib.request.urlopen(status, timeout=10)
            with http_err.value:
                assert http_err.value.code == 503
            # fixed on disk and loaded by request: ready again
            shutil.copy(root / "good" / "1" / "model.onnx", root / "broken" / "1" / "model.onnx")
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"), timeout=30)
            assert c.ready() and _health(channel) == health_pb2.HealthCheckResponse.SERVING
            with urllib.request.urlopen(status, timeout=10) as r:
                assert r.status == 200
            # broken again: a reload that fails while version 1 serves keeps the server ready and
            # lists the refused version; a model that fails with nothing serving makes it unready
            (root / "broken" / "2").mkdir()
            (root / "broken" / "2" / "model.onnx").write_bytes(b"garbage")
            err = _rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="broken"))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "version 2" in err.details()
            assert str(tmp_path) not in err.details()
            assert c.ready()
            rows = {(m.name, m.version): m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
            assert rows[("broken", "1")].state == "READY" and rows[("broken", "2")].state == "UNAVAILABLE"
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="broken"), timeout=30)
            assert c.ready()  # unloaded on request: not a failure
            err = _rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="broken"))
            assert not c.ready() and _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="broken"), timeout=30)
            assert c.ready()  # a failed model can be unloaded, which clears the failure
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_exit_on_error_is_the_default(repo, tmp_path):
    root = _repo_with_broken(repo, tmp_path)
    proc = _server_cmd("--model-repository", str(root))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "model 'broken' version 1 failed to load" in errors[0], proc.stderr
    assert "--no-exit-on-error" in errors[0] and "listening" not in proc.stdout


# -- tokens ---------------------------------------------------------------------------------------


def test_token_sources_that_hold_no_token_refuse_to_start(tmp_path):
    from server.errors import StartupError

    empty = tmp_path / "models"
    empty.mkdir()
    comments = tmp_path / "tokens"
    comments.write_text("# tokens, one per line\n\n   # indented comment\n")
    proc = _server_cmd("--model-repository", str(empty), "--auth-tokens-file", str(comments))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "holds no token" in errors[0] and str(comments) in errors[0], proc.stderr
    for tokens in ("", " , ,"):
        with pytest.raises(StartupError, match="holds no token"):
            _start(empty, auth_tokens=tokens)


def test_missing_token_file_refuses_to_start(tmp_path):
    from server.errors import StartupError

    empty = tmp_path / "models"
    empty.mkdir()
    with pytest.raises(StartupError, match="cannot be read"):
        _start(empty, auth_tokens_file=str(tmp_path / "nope"))


# -- model control --------------------------------------------------------------------------------


@pytest.mark.slow
def test_model_control_none_refuses_load_and_unload(repo):
    srv = _start(repo, http_port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = _stub(channel)
            load = pb.RepositoryModelLoadRequest(model_name="uni")
            unload = pb.RepositoryModelUnloadRequest(model_name="uni")
            for call, req in ((stub.RepositoryModelLoad, load), (stub.RepositoryModelUnload, unload)):
                err = _rpc_error(call, req)
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "not allowed" in err.details() and "--model-control-mode explicit" in err.details()
            assert stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models  # the index stays open
            assert LSTMClient(channel=channel).model_ready("uni")  # nothing was unloaded
        for action in ("load", "unload"):
            req = urllib.request.Request(
                f"http://127.0.0.1:{srv.http_port}/v2/repository/models/uni/{action}", data=b"", method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            with err.value:
                assert err.value.code == 503
                assert "--model-control-mode explicit" in json.loads(err.value.read())["error"]
    finally:
        srv.stop(1)


def test_model_control_poll_refuses_requests_and_settings_pair(repo):
    from server.config import Settings, load_settings

    srv = _start(repo, model_control_mode="poll", poll_s=30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            err = _rpc_error(_stub(channel).RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="bi"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "--model-control-mode poll" in err.details()
    finally:
        srv.stop(1)
    assert Settings(model_control_mode="poll").poll_s == 15.0  # Triton's default interval
    with pytest.raises(ValueError, match="only with --model-control-mode poll"):
        Settings(poll_s=2)
    with pytest.raises(ValueError, match="--model-control-mode must be one of none, explicit, poll"):
        load_settings(["--model-control-mode", "sometimes"], {})
    assert load_settings([], {"LSTM_SERVE_MODEL_CONTROL_MODE": "explicit"}).model_control_mode == "explicit"


# -- hostile names and numbers --------------------------------------------------------------------


def test_huge_versions_and_names_get_clean_errors(server, target):
    huge = "9" * 5000
    long_name = "m" * 300
    x = np.ones((1, 2, 6), np.float32)
    with grpc.insecure_channel(target) as channel, LSTMClient(channel=channel) as c:
        stub = _stub(channel)
        calls = [
            (stub.ModelInfer, c.request("bi", x, version=huge)),
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="bi", version=huge)),
            (stub.ModelConfig, pb.ModelConfigRequest(name="bi", version=huge)),
            (stub.ModelStatistics, pb.ModelStatisticsRequest(name="bi", version=huge)),
            (stub.ModelInfer, c.request("bi", x, version="٣")),  # a non-ASCII digit
            (stub.ModelInfer, c.request(long_name, x)),
            (stub.ModelMetadata, pb.ModelMetadataRequest(name="модель")),
            (stub.ModelInfer, c.request("bi\x00", x)),
        ]
        for call, request in calls:
            err = _rpc_error(call, request)
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
            assert len(err.details()) < 200 and "Exceeds the limit" not in err.details(), err.details()
        assert not stub.ModelReady(pb.ModelReadyRequest(name="bi", version=huge), timeout=10).ready
        for name in (long_name, "модель", "../bi", "bi/1", ".hidden", "-x", "a\x00b", ""):
            err = _rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.details())
            assert "is not a model folder name" in err.details() and len(err.details()) < 250
        err = _rpc_error(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="no_such_model"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and str(server.repository.root) not in err.details()
        assert c.ready() and c.infer_batch("bi", x)["y"].shape == (1, 2, 16)  # still serving


def test_clip_escapes_and_bounds():
    assert clip("ab\n\x1b[31m") == repr("ab\n\x1b[31m")
    shown = clip("z" * 10_000)
    assert len(shown) < 100 and shown.endswith("...(+9936 chars)")
    assert "too long" in clip(10**5000)


# -- load logs ------------------------------------------------------------------------------------


def test_load_log_lines(repo, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="server.repository")
    caplog.set_level(logging.INFO, logger="server.runtime")
    srv = _start(repo, log_level="INFO")
    srv.stop(0)
    text = caplog.text
    assert "loading bi (version 1, dynamic, " in text and " MB, " in text and " nodes)" in text, text
    assert "loading bi_static_t12 (version 1, static T=12, " in text, text
    assert "loaded bi in " in text and "loaded bi_static_t12 in " in text, text
    # the unrolled graph loads without ORT's memory-reuse planner (super-linear in nodes); bi keeps it
    assert "bi_static_t12: more than 1000 graph nodes, ONNX Runtime memory-reuse planner off" in text, text
    assert "bi: more than" not in text, text
    caplog.clear()
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = _start(empty, log_level="INFO")
    try:
        assert "make export" in caplog.text, caplog.text
        with LSTMClient(f"127.0.0.1:{srv.port}") as c:
            assert c.ready()  # no model, none failed
    finally:
        srv.stop(0)
