"""Reliability: fuzzed requests, malformed wire bytes, drain on SIGTERM, hot reload under load, soak."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scale.replicas import start_replica
from server.client import LSTMClient
from server.codec import DATATYPES
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import SMALL, TOL, make_encoder, ragged, reference

ROOT = Path(__file__).resolve().parents[1]
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}

_dims = st.one_of(st.integers(-3, 9), st.sampled_from([0, 10**6, 2**31, 2**62, -(2**62)]))
_names = st.one_of(st.sampled_from(["x", "lengths", "y", "", "X", "h_n"]), st.text(max_size=8))
_dtypes = st.one_of(st.sampled_from(sorted(DATATYPES) + ["BYTES", "FP8", "", "int64"]), st.text(max_size=6))


@st.composite
def _tensor(draw, raw: bool):
    t = pb.ModelInferRequest.InferInputTensor(
        name=draw(_names), datatype=draw(_dtypes), shape=draw(st.lists(_dims, max_size=4))
    )
    raw_bytes = b""
    if raw:
        raw_bytes = draw(st.one_of(st.binary(max_size=512), st.builds(lambda n: bytes(4 * n), st.integers(0, 400))))
    else:
        kind = draw(st.sampled_from(["fp32", "int64", "int", "bytes", "none"]))
        if kind == "fp32":
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=200)))
        elif kind == "int64":
            t.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20)))
        elif kind == "int":
            t.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20)))
        elif kind == "bytes":
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=3)))
    return t, raw_bytes


@st.composite
def _requests(draw):
    raw = draw(st.booleans())
    tensors = draw(st.lists(_tensor(raw), max_size=3))
    req = pb.ModelInferRequest(
        model_name=draw(st.one_of(st.sampled_from(["bi", "uni", "bi_static_t12", "nope"]), st.text(max_size=6))),
        model_version=draw(st.sampled_from(["", "1", "2", "x", "-1"])),
        id=draw(st.text(max_size=5)),
    )
    for t, data in tensors:
        req.inputs.append(t)
        if raw and draw(st.integers(0, 9)) > 0:  # now and then one missing: a count mismatch
            req.raw_input_contents.append(data)
    for _ in range(draw(st.integers(0, 2))):
        req.outputs.add(name=draw(_names))
    for key in draw(st.lists(st.text(max_size=5), max_size=2)):
        p = req.parameters[key]
        choice = draw(st.sampled_from(["b", "i", "s", "d"]))
        if choice == "b":
            p.bool_param = draw(st.booleans())
        elif choice == "i":
            p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif choice == "s":
            p.string_param = draw(st.text(max_size=5))
        else:
            p.double_param = draw(st.floats(allow_nan=True))
    return req


@pytest.fixture(scope="module")
def stub(target):
    channel = grpc.insecure_channel(target)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=_requests())
@pytest.mark.slow
def test_fuzzed_requests_get_a_status(stub, request):
    try:
        stub.ModelInfer(request, timeout=20)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
        assert exc.details(), "an error without a message"
    assert code in ALLOWED, (code, request)


def test_server_alive_after_fuzzing_and_malformed_bytes(target, encoders):
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        for junk in (b"\xff" * 40, b"\x0a\xff\xff\xff\xff\x0f", os.urandom(1000)):
            with pytest.raises(grpc.RpcError) as err:
                raw(junk, timeout=10)
            # grpcio rejects bytes it cannot parse before our code runs: INTERNAL, with a message
            assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    x, lengths = ragged(np.random.default_rng(0), 3, 5, 6)
    with LSTMClient(target) as c:
        got = c.infer_batch("bi", x, lengths)
    want = reference(encoders["bi"], x, lengths)
    assert all(np.abs(got[n] - want[n]).max() <= TOL for n in want)


def test_huge_shape_refused_cheaply(stub):
    req = pb.ModelInferRequest(model_name="bi")
    req.inputs.add(name="x", datatype="FP32", shape=[10**6, 10**6, 6])
    req.raw_input_contents.append(b"")
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "6000000000000 elements" in err.value.details()
    assert time.perf_counter() - t0 < 5  # no 24 TB allocation was attempted


def _spawn(repo: Path, *args: str) -> tuple[subprocess.Popen, int]:
    replica = start_replica(repo, list(args))
    return replica.proc, replica.port


@pytest.mark.slow
def test_graceful_drain_on_sigterm(repo):
    """SIGTERM under load: health NOT_SERVING first while calls still succeed, then new calls get
    UNAVAILABLE, accepted calls complete, exit 0 within the grace period."""
    proc, port = _spawn(repo, "--drain-delay-s", "1.5", "--grace-s", "5")
    target = f"127.0.0.1:{port}"
    outcomes: list[tuple[float, str]] = []
    odd: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    x = np.random.default_rng(0).standard_normal((16, 400, 6)).astype(np.float32)  # a few ms per call

    def load():
        with LSTMClient(target, timeout=20) as c:
            while not stop.is_set():
                try:
                    c.infer_batch("bi", x, outputs=["h_n"])
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                    if code not in ("OK", "UNAVAILABLE"):
                        odd.append((time.monotonic(), f"{code}: {exc.details()}"))
                with lock:
                    outcomes.append((time.monotonic(), code))
                if code == "UNAVAILABLE":
                    time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    not_serving_at = None
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() - t_term < 1.2:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
            except grpc.RpcError:
                break
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                not_serving_at = time.monotonic()
                break
            time.sleep(0.02)
    code = proc.wait(timeout=30)
    t_exit = time.monotonic()
    time.sleep(0.5)  # lets the output reader finish and close the pipe
    stop.set()
    for t in threads:
        t.join()
    assert code == 0
    assert t_exit - t_term < 1.5 + 5 + 3
    assert not_serving_at is not None, "health never turned NOT_SERVING before the server stopped"
    codes = {c for _, c in outcomes}
    last_ok = max(t for t, c in outcomes if c == "OK")
    timeline = [(round(t - t_term, 3), d) for t, d in odd[:5]]
    assert codes <= {"OK", "UNAVAILABLE"}, (codes, timeline, round(last_ok - t_term, 3), round(t_exit - t_term, 3))
    ok_after = [t for t, c in outcomes if c == "OK" and t > not_serving_at]
    assert ok_after, "calls should still succeed while health is NOT_SERVING (drain delay)"
    assert any(c == "UNAVAILABLE" and t > not_serving_at for t, c in outcomes)


@pytest.mark.slow
def test_hot_reload_under_load(tmp_path, repo):
    """A new version dropped into the repository while clients call: zero failed calls, answers
    switch to the new version atomically; a corrupt version is refused, the old one keeps serving."""
    from export.onnx_export import export_dynamic
    from server.app import InferenceServer
    from server.config import Settings

    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    shutil.copy(repo / "uni" / "1" / "model.onnx", root / "m" / "1" / "model.onnx")
    srv = InferenceServer(
        Settings(
            port=0,
            model_repository=root,
            device="cpu",
            metrics_port=-1,
            log_level="CRITICAL",
            poll_s=0.2,
            model_control_mode="poll",
        )
    )
    srv.start()
    target = f"127.0.0.1:{srv.port}"
    enc1, enc2 = make_encoder(SMALL["uni"]), make_encoder(SMALL["uni"], seed=7)
    x, lengths = ragged(np.random.default_rng(1), 3, 6, 5)
    want = {"1": reference(enc1, x, lengths)["h_n"], "2": reference(enc2, x, lengths)["h_n"]}
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[Exception] = []

    def client(k: int) -> None:
        with LSTMClient(target) as c:
            while not stop.is_set():
                req = c.request("m", x, lengths, outputs=["h_n"])
                try:
                    reply = c.stub.ModelInfer(req, timeout=10)
                except grpc.RpcError as exc:
                    failures.append(exc)
                    continue
                from server.codec import decode_outputs

                got = decode_outputs(reply)["h_n"]
                assert np.abs(got - want[reply.model_version]).max() <= TOL  # the version it says
                seen[k].append(reply.model_version)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        export_dynamic(enc2, root / "m" / "2" / "model.onnx")  # atomic write, picked up by the poller
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(s and s[-1] == "2" for s in seen):
            time.sleep(0.1)
        (root / "m" / "3").mkdir()
        (root / "m" / "3" / "model.onnx").write_bytes(b"corrupt")
        time.sleep(1.0)  # several polls: refused once, then remembered (no reload loop)
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        srv.stop(1)
    assert failures == []
    for versions in seen:
        assert versions and versions[0] == "1" and versions[-1] == "2"
        switch = versions.index("2")
        assert set(versions[switch:]) == {"2"}, "answers went back to version 1 after the switch"
    entry = srv.repository.entry("m")
    assert sorted(entry.versions) == [1, 2]  # version 3 refused, 1 and 2 still loaded


@pytest.mark.slow
def test_soak_short(repo, tmp_path):
    """The soak harness for a few seconds (`make soak` runs it for 60 s on the default model)."""
    out = tmp_path / "soak.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--models", str(repo), "--model", "bi", "--duration", "6",
         "--processes", "2", "--threads", "4", "--check-every", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert res.returncode in (0, 1), res.stdout + res.stderr
    assert result["lost"] == 0 and result["wrong"] == 0 and result["server_alive_at_end"]
    assert result["outcomes"].keys() == {"OK"} and result["checked"] > 0
