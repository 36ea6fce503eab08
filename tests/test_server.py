"""End-to-end: a real gRPC server on a free loopback port, real ORT sessions, real clients."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import LSTMClient, pad_sequences
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import SMALL, STATIC_T, TOL, ragged, reference

ROOT = Path(__file__).resolve().parents[1]


def _close(got: dict, want: dict, names=("y", "h_n", "c_n")) -> None:
    for name in names:
        assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
        err = float(np.abs(got[name] - want[name]).max())
        assert err <= TOL, f"{name}: {err}"


def test_health_and_reflection(target):
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "inference.GRPCInferenceService/bi"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_server_live_ready_metadata(client, target):
    assert client.live() and client.ready()
    assert client.model_ready("bi") and not client.model_ready("nope")
    with grpc.insecure_channel(target) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "lstm-serve" and "model_repository" in meta.extensions


def test_model_metadata(client):
    meta = client.metadata("bi")
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, -1, 6]},
        {"name": "lengths", "datatype": "INT64", "shape": [-1]},
    ]
    assert meta["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, -1, 16]},
        {"name": "h_n", "datatype": "FP32", "shape": [4, -1, 8]},
        {"name": "c_n", "datatype": "FP32", "shape": [4, -1, 8]},
    ]
    assert meta["provider"] == "CPUExecutionProvider"
    assert meta["export"]["lstm.export_mode"] == "dynamic" and meta["static_length"] is None
    static = client.metadata(f"bi_static_t{STATIC_T}")
    assert static["inputs"][0]["shape"] == [-1, STATIC_T, 6] and static["static_length"] == STATIC_T
    assert static["export"]["lstm.static_length"] == str(STATIC_T)


def test_model_config(client, server):
    cfg = client.config("bi")
    assert cfg["name"] == "bi" and cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert cfg.get("max_batch_size", 0) == 0  # dims are whole shapes (h_n's batch axis is not first)
    assert cfg["input"] == [
        {"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "-1", "6"]},
        {"name": "lengths", "data_type": "TYPE_INT64", "dims": ["-1"], "optional": True},
    ]
    assert [(o["name"], o["dims"]) for o in cfg["output"]] == [
        ("y", ["-1", "-1", "16"]), ("h_n", ["4", "-1", "8"]), ("c_n", ["4", "-1", "8"])
    ]  # fmt: skip
    assert cfg["instance_group"] == [{"name": "bi_0", "count": 2, "kind": "KIND_CPU"}]  # Settings(instances=2)
    assert "dynamic_batching" in cfg and "sequence_batching" not in cfg
    assert cfg["version_policy"] == {"all": {}}
    params = {k: v.get("string_value", "") for k, v in cfg["parameters"].items()}
    assert params["execution_provider"] == "CPUExecutionProvider" and params["export.lstm.export_mode"] == "dynamic"
    assert params["batching.instances"] == "2" and "static_length" not in params
    static = client.config(f"bi_static_t{STATIC_T}")
    assert static["input"][0]["dims"] == ["-1", str(STATIC_T), "6"]
    assert static["parameters"]["static_length"]["string_value"] == str(STATIC_T)
    stateful = client.config("suni")
    assert [i["name"] for i in stateful["input"] if i.get("optional")] == ["lengths", "h0", "c0"]
    idle_us = int(stateful["sequence_batching"]["max_sequence_idle_microseconds"])
    assert idle_us == int(server.settings.sequence_idle_s * 1e6)
    with pytest.raises(grpc.RpcError) as err:
        client.config("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Request for unknown model: 'nope' is not found" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.config("bi", version="7")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'bi' version '7' is not found" in err.value.details()


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_infer_parity(client, encoders, name, raw):
    rng = np.random.default_rng(5)
    for batch, steps in [(1, 1), (4, 9), (7, 40)]:
        x, lengths = ragged(rng, batch, steps, SMALL[name].input_size)
        got = client.infer_batch(name, x, lengths, raw=raw)
        _close(got, reference(encoders[name], x, lengths))
        for i, n in enumerate(lengths):
            assert not got["y"][i, n:].any()


def test_infer_variable_length_sequences_trimmed(client, encoders):
    rng = np.random.default_rng(9)
    seqs = [rng.standard_normal((n, 6)).astype(np.float32) for n in (5, 1, 17, 3)]
    results = client.infer("bi", seqs)
    x, lengths = pad_sequences(seqs)
    ref = reference(encoders["bi"], x, lengths)
    for i, (seq, res) in enumerate(zip(seqs, results)):
        assert res["y"].shape == (len(seq), 16)
        assert np.abs(res["y"] - ref["y"][i, : len(seq)]).max() <= TOL
        assert np.abs(res["h_n"] - ref["h_n"][:, i]).max() <= TOL


def test_lengths_omitted_means_full_length(client, encoders):
    x = np.random.default_rng(1).standard_normal((3, 8, 6)).astype(np.float32)
    _close(client.infer_batch("bi", x), reference(encoders["bi"], x, np.full(3, 8, np.int64)))


def test_requested_output_subset(client, encoders):
    x, lengths = ragged(np.random.default_rng(2), 3, 6, 6)
    got = client.infer_batch("bi", x, lengths, outputs=["h_n"])
    assert list(got) == ["h_n"]
    _close(got, reference(encoders["bi"], x, lengths), names=("h_n",))
    got = client.infer_batch("bi", x, lengths, outputs=["c_n", "y"])
    assert sorted(got) == ["c_n", "y"]


def test_static_model_pads_shorter_and_refuses_longer(client, encoders):
    x, lengths = ragged(np.random.default_rng(4), 5, STATIC_T - 4, 6)
    got = client.infer_batch(f"bi_static_t{STATIC_T}", x, lengths)
    _close(got, reference(encoders["bi"], x, lengths))
    long = np.zeros((1, STATIC_T + 1, 6), np.float32)
    with pytest.raises(grpc.RpcError) as err:
        client.infer_batch(f"bi_static_t{STATIC_T}", long)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {STATIC_T}" in err.value.details()


def test_stream_infer(client, encoders):
    rng = np.random.default_rng(6)
    batches = [ragged(rng, b, t, 6) for b, t in [(2, 3), (5, 11), (1, 1)]]
    requests = [
        client.request("bi", x, lengths, raw=(i % 2 == 0), request_id=str(i)) for i, (x, lengths) in enumerate(batches)
    ]
    bad = client.request("bi", np.zeros((1, 2, 3), np.float32))  # wrong feature size
    replies = list(client.stream(requests[:2] + [bad] + requests[2:]))
    # a stream's error_message is the bare text, as Triton's
    assert isinstance(replies[2], RuntimeError) and str(replies[2]).startswith("input 'x': dim 2 must be 6")
    good = replies[:2] + replies[3:]
    for (x, lengths), got in zip(batches, good):
        _close(got, reference(encoders["bi"], x, lengths))


def _raw_request(model="bi", **kw) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model, **kw)


def _tensor(name, datatype, shape):
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


def _x(batch=2, steps=3, feat=6):
    return np.ones((batch, steps, feat), np.float32).tobytes()


ERROR_CASES = {
    "unknown model": (_raw_request("nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "unknown version": (
        _raw_request(model_version="7", inputs=[_tensor("x", "FP32", [2, 3, 6])], raw_input_contents=[_x()]),
        grpc.StatusCode.NOT_FOUND,
        "version",
    ),
    "wrong input name": (
        _raw_request(
            inputs=[_tensor("x", "FP32", [2, 3, 6]), _tensor("lens", "INT64", [2])],
            raw_input_contents=[_x(), np.ones(2, np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'lens'",
    ),
    "wrong datatype": (
        _raw_request(inputs=[_tensor("x", "FP64", [2, 3, 6])], raw_input_contents=[np.ones((2, 3, 6)).tobytes()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FP32",
    ),
    "garbage datatype": (
        _raw_request(inputs=[_tensor("x", "FLOAT", [2, 3, 6])], raw_input_contents=[_x()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "datatype",
    ),
    "wrong rank": (
        _raw_request(inputs=[_tensor("x", "FP32", [6, 6])], raw_input_contents=[_x(1, 6, 6)[: 36 * 4]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rank 3",
    ),
    "wrong feature size": (
        _raw_request(inputs=[_tensor("x", "FP32", [2, 3, 5])], raw_input_contents=[_x(2, 3, 5)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dim 2 must be 6",
    ),
    "batch mismatch": (
        _raw_request(
            inputs=[_tensor("x", "FP32", [2, 3, 6]), _tensor("lengths", "INT64", [3])],
            raw_input_contents=[_x(), np.ones(3, np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'lengths'",
    ),
    "length zero": (
        _raw_request(
            inputs=[_tensor("x", "FP32", [2, 3, 6]), _tensor("lengths", "INT64", [2])],
            raw_input_contents=[_x(), np.array([0, 3], np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "1..3",
    ),
    "length above T": (
        _raw_request(
            inputs=[_tensor("x", "FP32", [2, 3, 6]), _tensor("lengths", "INT64", [2])],
            raw_input_contents=[_x(), np.array([4, 3], np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lengths[0] = 4",
    ),
    "raw byte count": (
        _raw_request(inputs=[_tensor("x", "FP32", [2, 3, 6])], raw_input_contents=[_x()[:-4]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected 144",
    ),
    "raw and typed mixed": (
        _raw_request(
            inputs=[
                _tensor("x", "FP32", [2, 3, 6]),
                pb.ModelInferRequest.InferInputTensor(
                    name="lengths",
                    datatype="INT64",
                    shape=[2],
                    contents=pb.InferTensorContents(int64_contents=[1, 2]),
                ),
            ],
            raw_input_contents=[_x()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "typed",
    ),
    "typed count": (
        _raw_request(
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="x",
                    datatype="FP32",
                    shape=[1, 2, 6],
                    contents=pb.InferTensorContents(fp32_contents=[1.0] * 11),
                )
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected 12",
    ),
    "missing x": (
        _raw_request(inputs=[_tensor("lengths", "INT64", [2])], raw_input_contents=[np.ones(2, np.int64).tobytes()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing required input 'x'",
    ),
    "negative dim": (
        _raw_request(inputs=[_tensor("x", "FP32", [-2, 3, 6])], raw_input_contents=[b""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "negative",
    ),
    "huge shape": (
        _raw_request(inputs=[_tensor("x", "FP32", [10**6, 10**6, 6])], raw_input_contents=[b""]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limit",
    ),
    "unknown output": (
        _raw_request(
            inputs=[_tensor("x", "FP32", [2, 3, 6])],
            raw_input_contents=[_x()],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="z")],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'z'",
    ),
    "zero time": (
        _raw_request(inputs=[_tensor("x", "FP32", [2, 0, 6])], raw_input_contents=[b""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ">= 1",
    ),
    "NaN, no lengths sent": (  # every step is valid: the message does not speak of lengths
        _raw_request(
            inputs=[_tensor("x", "FP32", [1, 2, 6])], raw_input_contents=[np.full((1, 2, 6), np.nan, "f").tobytes()]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x': values must be finite; x[0, 0, 0] = nan (12 non-finite value(s))",
    ),
    "NaN within the lengths": (
        _raw_request(
            inputs=[_tensor("x", "FP32", [1, 2, 6]), _tensor("lengths", "INT64", [1])],
            raw_input_contents=[np.full((1, 2, 6), np.nan, "f").tobytes(), np.array([1], np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x': values must be finite; x[0, 0, 0] = nan (6 non-finite value(s) within the valid lengths)",
    ),
}


def test_non_finite_padding_is_ignored(client, encoders):
    """NaN past a sequence's length is never read, so it is allowed (and changes nothing)."""
    x, lengths = ragged(np.random.default_rng(3), 3, 7, 6)
    lengths[:] = [7, 4, 2]
    padded = x.copy()
    padded[1, 4:] = np.nan
    padded[2, 2:] = np.inf
    _close(client.infer_batch("bi", padded, lengths), reference(encoders["bi"], x, lengths))


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_then_good_request(target, client, encoders, case):
    request, code, needle = ERROR_CASES[case]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details(), err.value.details()
    x, lengths = ragged(np.random.default_rng(0), 2, 4, 6)
    _close(client.infer_batch("bi", x, lengths), reference(encoders["bi"], x, lengths))


def test_unloaded_model_is_unavailable(server, client):
    from server.repository import ModelEntry

    server.repository._models["ghost"] = ModelEntry("ghost", "UNAVAILABLE", "test")
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.infer_batch("ghost", np.zeros((1, 1, 6), np.float32))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        del server.repository._models["ghost"]


@pytest.mark.slow
def test_concurrent_clients(target, encoders):
    """16 threads x 50 requests of mixed lengths and models: every answer correct."""

    def worker(seed: int) -> int:
        rng = np.random.default_rng(seed)
        ok = 0
        with LSTMClient(target) as c:
            for _ in range(50):
                name = "bi" if rng.random() < 0.7 else "uni"
                x, lengths = ragged(rng, int(rng.integers(1, 6)), int(rng.integers(1, 30)), SMALL[name].input_size)
                got = c.infer_batch(name, x, lengths)
                _close(got, reference(encoders[name], x, lengths))
                ok += 1
        return ok

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(worker, range(16))) == 800


def test_statistics(client, target):
    client.infer_batch("uni", np.zeros((2, 3, 5), np.float32))
    with grpc.insecure_channel(target) as channel:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="uni"))
    (ms,) = stats.model_stats
    assert ms.name == "uni" and ms.inference_stats.success.count >= 1 and ms.inference_count >= 2


def test_repository_index_load_unload_while_serving(server, target, encoders, tmp_path):
    """Load/unload versions of one model while another is called: no failed call."""
    from export.onnx_export import export_dynamic
    from tests.conftest import make_encoder

    repo = server.repository.root
    src = repo / "uni" / "1" / "model.onnx"
    extra = repo / "uni_copy"
    (extra / "1").mkdir(parents=True)
    shutil.copy(src, extra / "1" / "model.onnx")
    stop = threading.Event()
    failures: list[Exception] = []
    calls = [0]

    def hammer():
        rng = np.random.default_rng(0)
        with LSTMClient(target) as c:
            while not stop.is_set():
                x, lengths = ragged(rng, 3, 7, 6)
                try:
                    _close(c.infer_batch("bi", x, lengths), reference(encoders["bi"], x, lengths))
                    calls[0] += 1
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = {(m.name, m.version): m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
            assert index[("bi", "1")] == "READY" and ("uni_copy", "") in index
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="uni_copy"))
            assert LSTMClient(channel=channel).model_ready("uni_copy")
            # a second version appears on disk and is loaded by RPC
            export_dynamic(make_encoder(SMALL["uni"], seed=5), extra / "2" / "model.onnx")
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="uni_copy"))
            c = LSTMClient(channel=channel)
            assert c.metadata("uni_copy")["versions"] == ["1", "2"]
            x = np.ones((1, 2, 5), np.float32)
            v1, v2 = c.infer_batch("uni_copy", x, version="1"), c.infer_batch("uni_copy", x)
            assert np.abs(v1["h_n"] - v2["h_n"]).max() > 1e-3  # latest (2) has other weights
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="uni_copy"))
            assert not c.model_ready("uni_copy")
            with pytest.raises(grpc.RpcError) as err:
                c.infer_batch("uni_copy", x)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="no_such_model"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # a corrupt new version is refused with a clear error; the loaded versions keep serving
            (repo / "uni" / "9").mkdir()
            (repo / "uni" / "9" / "model.onnx").write_bytes(b"not an onnx file")
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="uni"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version 9" in err.value.details()
            assert c.infer_batch("uni", x)["h_n"].shape == (1, 1, 3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        shutil.rmtree(repo / "uni" / "9", ignore_errors=True)
        shutil.rmtree(extra, ignore_errors=True)
    assert failures == [] and calls[0] > 0


def test_provider_auto_picks_cpu_without_error_log(repo, caplog, capfd):
    from server.runtime import RuntimeOptions, select_providers

    with caplog.at_level(logging.DEBUG):
        chosen = select_providers(RuntimeOptions(device="auto"))
    if chosen.kind == "CUDAExecutionProvider":
        pytest.skip("a usable GPU is present: the CPU-only check does not apply (see scripts/gpu_check.sh)")
    assert chosen.kind == "CPUExecutionProvider"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    err = capfd.readouterr().err
    assert " E:onnxruntime" not in err and "[E:" not in err, err


def _popen_server(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_cuda_fails_fast_with_clear_message(repo):
    from server.runtime import RuntimeOptions, select_providers

    if select_providers(RuntimeOptions(device="auto")).kind == "CUDAExecutionProvider":
        pytest.skip("a usable GPU is present")
    start = time.monotonic()
    proc = _popen_server("--device", "cuda", "--model-repository", str(repo), "--port", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "--device cuda: CUDA cannot be used" in out, out
    assert time.monotonic() - start < 30
    proc = _popen_server("--device", "tpu", "--model-repository", str(repo), "--port", "0")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "expected auto, cpu, cuda or cuda:N" in out


@pytest.mark.slow
def test_subprocess_server_serves_and_drains(repo, encoders):
    """`python -m server` on port 0: prints its port, serves, SIGTERM -> exit 0, no error log."""
    proc = _popen_server("--model-repository", str(repo), "--port", "0", "--metrics-port", "-1", "--grace-s", "5")
    lines = []
    try:
        port = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "".join(lines)
        x, lengths = ragged(np.random.default_rng(8), 3, 5, 6)
        with LSTMClient(f"127.0.0.1:{port}") as c:
            _close(c.infer_batch("bi", x, lengths), reference(encoders["bi"], x, lengths))
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        lines.append(rest)
        assert proc.returncode == 0, "".join(lines)
        text = "".join(lines)
        assert "CPUExecutionProvider" in text and " ERROR " not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()


def test_settings_from_env_and_flags(tmp_path):
    from server.config import load_settings

    s = load_settings(
        ["--port", "0"], {"LSTM_SERVE_PORT": "9", "LSTM_SERVE_DEVICE": "cpu", "LSTM_SERVE_CUDA_TF32": "1"}
    )
    assert s.port == 0 and s.device == "cpu" and s.cuda_tf32 is True
    with pytest.raises(ValueError, match="LSTM_SERVE_GRPC_WORKERS"):
        load_settings([], {"LSTM_SERVE_GRPC_WORKERS": "many"})
    with pytest.raises(ValueError, match="--graph-optimization must be one of disable, basic, extended, all"):
        load_settings(["--graph-optimization", "max"], {})


def test_server_needs_no_onnx_or_torch_and_probe_model_is_right():
    import base64

    import onnx

    from contract.cuda import PROBE_MODEL_B64

    x = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["a", "a"], ["b"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert base64.b64decode(PROBE_MODEL_B64) == model.SerializeToString()
    code = "import sys, server.app, server.__main__; bad = {'onnx', 'torch'} & set(sys.modules); assert not bad, bad"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert res.returncode == 0, res.stderr  # the container image installs requirements-server.txt only
