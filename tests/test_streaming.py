"""Stateful streaming: initial states in the export, chunked == whole, server-side sequence state."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from scale.replicas import start_replica
from server.client import LSTMClient
from server.errors import FailedPrecondition, NotFound, ResourceExhausted
from server.sequences import SequenceStore
from tests.conftest import STATEFUL, TOL, ragged, reference

ROOT = Path(__file__).resolve().parents[1]


def _sess(repo, name):
    return ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def _states(rng, cfg, batch):
    shape = (cfg.num_layers * cfg.num_directions, batch, cfg.hidden_size)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_export_with_initial_states_parity(repo, stateful_encoders, name):
    cfg = STATEFUL[name]
    sess = _sess(repo, name)
    rng = np.random.default_rng(0)
    for batch, steps in [(1, 1), (4, 9), (7, 23)]:
        x, lengths = ragged(rng, batch, steps, cfg.input_size)
        h0, c0 = _states(rng, cfg, batch)
        got = dict(zip(["y", "h_n", "c_n"], sess.run(None, {"x": x, "lengths": lengths, "h0": h0, "c0": c0})))
        want = reference(stateful_encoders[name], x, lengths, h0, c0)
        for k in want:
            assert np.abs(got[k] - want[k]).max() <= TOL, k
    model = onnx.load(str(repo / name / "1" / "model.onnx"))
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert len(lstms) == cfg.num_layers and all(n.input[5] and n.input[6] for n in lstms)  # initial_h/c wired


def test_chunked_equals_whole_in_process(repo):
    """Unidirectional: chunks of random sizes, each from the previous chunk's final state, equal the
    whole run; rows whose sequence ended in an earlier chunk keep their state."""
    cfg = STATEFUL["suni"]
    sess = _sess(repo, "suni")
    rng = np.random.default_rng(1)
    for _ in range(5):
        batch, steps = int(rng.integers(2, 6)), int(rng.integers(5, 40))
        x, lengths = ragged(rng, batch, steps, cfg.input_size)
        h0, c0 = _states(rng, cfg, batch)
        whole = dict(zip(["y", "h_n", "c_n"], sess.run(None, {"x": x, "lengths": lengths, "h0": h0, "c0": c0})))
        h, c = h0.copy(), c0.copy()
        y = np.zeros_like(whole["y"])
        t = 0
        while t < steps:
            size = int(rng.integers(1, 8))
            left = lengths - t
            active = np.flatnonzero(left > 0)
            if active.size:
                chunk_len = np.minimum(left[active], size)
                feeds = {
                    "x": np.ascontiguousarray(x[active, t : t + size]),
                    "lengths": chunk_len,
                    "h0": np.ascontiguousarray(h[:, active]),
                    "c0": np.ascontiguousarray(c[:, active]),
                }
                out = sess.run(None, feeds)
                y[active, t : t + size] = out[0]
                h[:, active], c[:, active] = out[1], out[2]
            t += size
        assert np.abs(y - whole["y"]).max() <= TOL
        assert np.abs(h - whole["h_n"]).max() <= TOL and np.abs(c - whole["c_n"]).max() <= TOL


def _chunks(rng, n):
    cuts, t = [], 0
    while t < n:
        size = int(rng.integers(1, 12))
        cuts.append((t, min(n, t + size)))
        t += size
    return cuts


def test_32_concurrent_streams_equal_whole(target, stateful_encoders):
    enc = stateful_encoders["suni"]
    cfg = STATEFUL["suni"]

    def one(k: int) -> float:
        rng = np.random.default_rng(100 + k)
        n = int(rng.integers(1, 60))
        signal_ = rng.standard_normal((n, cfg.input_size)).astype(np.float32)
        with_state = k % 4 == 0
        h0, c0 = _states(rng, cfg, 1) if with_state else (None, None)
        want = reference(enc, signal_[None], np.array([n]), h0, c0)
        with LSTMClient(target) as client:
            kw = {"h0": h0[:, 0], "c0": c0[:, 0]} if with_state else {}
            stream = client.sequence("suni", sequence_id=f"s{k}" if k % 3 else None, use_stream=k % 2 == 1, **kw)
            ys = []
            for a, b in _chunks(rng, n):
                out = stream.send(signal_[a:b])
                ys.append(out["y"])
            final = stream.close()
        err = float(np.abs(np.concatenate(ys) - want["y"][0]).max())
        err = max(err, float(np.abs(final["h_n"] - want["h_n"][:, 0]).max()))
        return max(err, float(np.abs(final["c_n"] - want["c_n"][:, 0]).max()))

    with ThreadPoolExecutor(32) as pool:
        errors = list(pool.map(one, range(32)))
    assert max(errors) <= TOL


def _seq_request(client, model, seq_id, x=None, start=False, end=False):
    from server.proto import grpc_service_pb2 as pb

    req = client.request(model, x) if x is not None else pb.ModelInferRequest(model_name=model)
    req.parameters["sequence_id"].uint64_param = seq_id
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    return req


def test_sequence_errors(target):
    x = np.ones((1, 3, 5), np.float32)
    with LSTMClient(target) as c:
        cases = [
            (_seq_request(c, "suni", 424242, x), grpc.StatusCode.NOT_FOUND, "unknown sequence"),
            (_seq_request(c, "sbi", 1, x, start=True), grpc.StatusCode.INVALID_ARGUMENT, "bidirectional"),
            (_seq_request(c, "uni", 1, np.ones((1, 3, 5), np.float32), start=True), grpc.StatusCode.INVALID_ARGUMENT,
             "initial-state"),
            (_seq_request(c, "suni", 2, np.ones((2, 3, 5), np.float32), start=True), grpc.StatusCode.INVALID_ARGUMENT,
             "batch 1"),
        ]  # fmt: skip
        for req, code, needle in cases:
            with pytest.raises(grpc.RpcError) as err:
                c.stub.ModelInfer(req, timeout=10)
            assert err.value.code() == code and needle in err.value.details(), err.value.details()
        # an ended sequence is gone
        c.stub.ModelInfer(_seq_request(c, "suni", 7, x, start=True, end=True), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.ModelInfer(_seq_request(c, "suni", 7, x), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_store_refuses_concurrent_chunks_and_limit():
    store = SequenceStore(max_sequences=2, idle_s=60)
    z = np.zeros((1, 1, 2), np.float32)
    store.acquire("m", 1, "a", True, {"h0": z, "c0": z})
    with pytest.raises(FailedPrecondition, match="in flight"):
        store.acquire("m", 1, "a", False, {"h0": z, "c0": z})
    store.release("m", "a", {"h0": z, "c0": z}, False)
    store.acquire("m", 1, "a", False, {"h0": z, "c0": z})  # fine once the first chunk is done
    store.release("m", "a", {"h0": z, "c0": z}, False)
    store.acquire("m", 1, "b", True, {"h0": z, "c0": z})
    store.release("m", "b", {"h0": z, "c0": z}, False)
    with pytest.raises(ResourceExhausted, match="limit"):
        store.acquire("m", 1, "c", True, {"h0": z, "c0": z})


@pytest.mark.slow
def test_idle_eviction_and_limit_over_grpc(repo):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(Settings(port=0, model_repository=repo, device="cpu", metrics_port=0, log_level="WARNING",
                                   max_sequences=3, sequence_idle_s=0.3, sequence_client_share=1.0))  # fmt: skip
    srv.start()
    try:
        target = f"127.0.0.1:{srv.port}"
        x = np.ones((1, 2, 5), np.float32)
        with LSTMClient(target) as c:
            for i in range(3):
                c.stub.ModelInfer(_seq_request(c, "suni", i, x, start=True), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                c.stub.ModelInfer(_seq_request(c, "suni", 99, x, start=True), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(1.5)  # idle > 0.3 s: freed by the sweeper
            with pytest.raises(grpc.RpcError) as err:
                c.stub.ModelInfer(_seq_request(c, "suni", 0, x), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "freed after" in err.value.details()
            c.stub.ModelInfer(_seq_request(c, "suni", 99, x, start=True), timeout=10)  # room again
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        assert "lstm_live_sequences 1.0" in body and "lstm_sequence_evictions_total 3.0" in body
    finally:
        srv.stop(1)


@pytest.mark.slow
def test_restart_loses_sequences_cleanly(repo):
    def spawn(port: int):
        replica = start_replica(repo, ["--port", str(port)])  # the last --port wins
        return replica.proc, replica.port

    proc, port = spawn(0)
    x = np.ones((1, 4, 5), np.float32)
    try:
        with LSTMClient(f"127.0.0.1:{port}") as c:
            c.stub.ModelInfer(_seq_request(c, "suni", 5, x, start=True), timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc, port2 = spawn(port)
        with LSTMClient(f"127.0.0.1:{port2}") as c:
            with pytest.raises(grpc.RpcError) as err:
                c.stub.ModelInfer(_seq_request(c, "suni", 5, x), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "server restart" in err.value.details()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_chunks_of_different_sequences_are_batched_together(repo, stateful_encoders):
    """With a 30 ms batching window, chunks of 8 concurrent sequences share runs (each row with its own
    state) and every sequence still equals its whole run."""
    from server.app import InferenceServer
    from server.config import Settings
    from server.proto import grpc_service_pb2 as pb

    srv = InferenceServer(Settings(port=0, model_repository=repo, device="cpu", metrics_port=-1, log_level="WARNING",
                                   max_queue_delay_us=30000))  # fmt: skip
    srv.start()
    target = f"127.0.0.1:{srv.port}"
    enc = stateful_encoders["suni"]
    barrier = threading.Barrier(8)

    def one(k: int) -> float:
        rng = np.random.default_rng(500 + k)
        sig = rng.standard_normal((24, 5)).astype(np.float32)
        want = reference(enc, sig[None], np.array([24]))
        with LSTMClient(target) as client:
            stream = client.sequence("suni")
            ys = []
            for a in range(0, 24, 6):
                barrier.wait()  # all 8 sequences send their chunk together
                ys.append(stream.send(sig[a : a + 6])["y"])
            final = stream.close()
        return max(
            float(np.abs(np.concatenate(ys) - want["y"][0]).max()),
            float(np.abs(final["h_n"] - want["h_n"][:, 0]).max()),
        )

    try:
        with ThreadPoolExecutor(8) as pool:
            assert max(pool.map(one, range(8))) <= TOL
        with grpc.insecure_channel(target) as ch:
            from server.proto import grpc_service_pb2_grpc as pb_grpc

            stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name="suni"))
        (ms,) = stats.model_stats
        assert ms.inference_count == 32 and ms.execution_count < 32
        assert max(b.batch_size for b in ms.batch_stats) >= 4
    finally:
        srv.stop(1)


def test_failed_chunks_leave_state_as_it_was():
    store = SequenceStore(max_sequences=4, idle_s=60)
    z, one = np.zeros((1, 1, 2), np.float32), np.ones((1, 1, 2), np.float32)
    store.acquire("m", 1, "a", True, {"h0": z, "c0": z})
    store.release("m", "a", None, False)  # the start chunk failed
    assert len(store) == 0  # as if it never came: a later chunk gets NOT_FOUND, not a zero state
    with pytest.raises(NotFound):
        store.acquire("m", 1, "a", False, {"h0": z, "c0": z})
    store.acquire("m", 1, "b", True, {"h0": z, "c0": z})
    store.release("m", "b", {"h0": one, "c0": one}, False)
    store.acquire("m", 1, "b", True, {"h0": z, "c0": z})  # a restart ...
    store.release("m", "b", None, False)  # ... that failed keeps the old state
    state = store.acquire("m", 1, "b", False, {"h0": z, "c0": z})
    assert np.array_equal(state.state["h0"], one)
