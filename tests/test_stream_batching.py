"""A stream's requests run concurrently: chunks of many sequences on one ModelStreamInfer stream
batch like many streams, each sequence's chunks in order; and a merged run whose callers all left
is stopped. Real servers on loopback port 0, real ONNX Runtime sessions, seeded models."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.codec import decode_outputs, encode_input
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import TOL, reference
from tests.test_gate import _cpu_s, _loop_request, _save, _start, loop_graph

onnx = pytest.importorskip("onnx")
from onnx import TensorProto  # noqa: E402
from onnx import helper as oh  # noqa: E402

SEQUENCES, CHUNKS, FRAMES, FEATURES = 16, 4, 6, 5  # "suni": a stateful encoder of 5 features


def batched_loop_graph():
    """y = Loop(max(n)) { acc = sin(acc) + acc } over x (b, k): every tensor has a batch axis, so
    requests merge; the clients' `n` sets the run time."""
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("Sin", ["acc_in"], ["s"]),
         oh.make_node("Add", ["s", "acc_in"], ["acc_out"])],
        "body",
        [oh.make_tensor_value_info("i", TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         oh.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["batch", "k"])],
        [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         oh.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["batch", "k"])],
    )  # fmt: skip
    return oh.make_graph(
        [oh.make_node("Constant", [], ["t"], value=oh.make_tensor("tv", TensorProto.BOOL, [], [True])),
         oh.make_node("ReduceMax", ["n"], ["m"], keepdims=0),
         oh.make_node("Loop", ["m", "t", "x"], ["y"], body=body)],
        "bloop",
        [oh.make_tensor_value_info("n", TensorProto.INT64, ["batch"]),
         oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "k"])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "k"])],
    )  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory, repo) -> Path:
    root = tmp_path_factory.mktemp("stream_models")
    _save(loop_graph(), root / "loop" / "1" / "model.onnx")
    _save(batched_loop_graph(), root / "bloop" / "1" / "model.onnx")
    # batching on, and merged although a row's run time depends on its batch-mates (max(n))
    (root / "bloop" / "config.json").write_text(
        json.dumps({"batching": {"enabled": True}, "allow_batch_dependent_results": True})
    )
    (root / "suni" / "1").mkdir(parents=True)
    (root / "suni" / "1" / "model.onnx").write_bytes((repo / "suni" / "1" / "model.onnx").read_bytes())
    return root


@pytest.fixture(scope="module")
def served(models):
    srv = _start(models, http_port=-1, max_queue_delay_us=5000)  # a 5 ms window: merging does not hang on timing
    yield srv
    srv.stop(0)


def _chunk(seq: int, x: np.ndarray, rid: str, start: bool, end: bool) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="suni", id=rid)
    encode_input(r, "x", x[None])
    encode_input(r, "lengths", np.array([x.shape[0]], np.int64))
    r.parameters["sequence_id"].uint64_param = seq
    r.parameters["sequence_start"].bool_param = start
    r.parameters["sequence_end"].bool_param = end
    return r


def _stats(stub, name: str):
    (ms,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)).model_stats
    return ms


def test_one_stream_of_16_interleaved_sequences_batches_in_order(served, stateful_encoders):
    """16 sequences' chunks interleaved on one stream (a bad request and a chunk of a sequence never
    started among them): each sequence equals its whole run, the replies carry their ids in request
    order, the bad ones get Triton's bare error text, and the server merged chunks into fewer runs."""
    enc = stateful_encoders["suni"]
    rng = np.random.default_rng(31)
    signals = [rng.standard_normal((CHUNKS * FRAMES, FEATURES)).astype(np.float32) for _ in range(SEQUENCES)]
    requests = []
    for j in range(CHUNKS):
        for k in range(SEQUENCES):
            x = signals[k][j * FRAMES : (j + 1) * FRAMES]
            requests.append(_chunk(100 + k, x, f"{k}-{j}", j == 0, j == CHUNKS - 1))
        if j == 1:  # in the middle: a bad request (wrong feature size) and a chunk of a sequence never started
            requests.append(_chunk(999, np.zeros((FRAMES, FEATURES + 1), np.float32), "bad-shape", False, False))
            requests.append(_chunk(998, signals[0][:FRAMES], "not-started", False, False))
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        before = _stats(stub, "suni")
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=120))
        after = _stats(stub, "suni")
    assert [r.infer_response.id for r in replies] == [r.id for r in requests]
    ys: dict[int, list] = {k: [] for k in range(SEQUENCES)}
    for reply in replies:
        rid = reply.infer_response.id
        if rid == "bad-shape":
            assert reply.error_message.startswith("input 'x'") and str(FEATURES) in reply.error_message
            continue
        if rid == "not-started":  # Triton's leading words, bare (its QA tests match how they start)
            assert reply.error_message.startswith("inference request for sequence 998 to model 'suni' must specify")
            continue
        assert not reply.error_message, reply.error_message
        out = decode_outputs(reply.infer_response)
        ys[int(rid.split("-")[0])].append((out["y"][0], out["h_n"]))
    for k in range(SEQUENCES):
        want = reference(enc, signals[k][None], np.array([CHUNKS * FRAMES]))
        assert np.abs(np.concatenate([y for y, _ in ys[k]]) - want["y"][0]).max() <= TOL
        assert np.abs(ys[k][-1][1][:, 0] - want["h_n"][:, 0]).max() <= TOL
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == SEQUENCES * CHUNKS
    assert executions < inferences / 2, (executions, inferences)  # merged: chunks of different sequences share runs


def test_sequence_chunks_run_in_order_while_others_overtake(served, stateful_encoders):
    """One sequence's chunks on a stream run one after another (each from the state the previous one
    left) even while chunks of other sequences and independent requests run beside them."""
    enc = stateful_encoders["suni"]
    rng = np.random.default_rng(32)
    sig = rng.standard_normal((40, FEATURES)).astype(np.float32)
    requests = [_chunk(7, sig[a : a + 2], f"c{a}", a == 0, a == 38) for a in range(0, 40, 2)]  # 20 back to back
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        replies = list(pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(iter(requests), timeout=60))
    assert all(not r.error_message for r in replies), [r.error_message for r in replies if r.error_message]
    y = np.concatenate([decode_outputs(r.infer_response)["y"][0] for r in replies])
    assert np.abs(y - reference(enc, sig[None], np.array([40]))["y"][0]).max() <= TOL


def test_cancelling_the_stream_cancels_its_work(served):
    """Long runs in progress on a stream (runs by themselves, and queued ones): the client cancels the
    stream, and the server stops burning CPU; the model still serves."""
    feed: queue.Queue = queue.Queue()
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        call = stub.ModelStreamInfer(iter(feed.get, None))
        for i in range(4):
            r = _loop_request(2**62)
            r.id = f"long-{i}"
            feed.put(r)
        time.sleep(1.0)
        cpu = _cpu_s()
        time.sleep(0.5)
        assert _cpu_s() - cpu > 0.2, "the long runs did not start"
        call.cancel()
        feed.put(None)
        time.sleep(0.5)
        cpu = _cpu_s()
        time.sleep(1.0)
        assert _cpu_s() - cpu < 0.5, "the cancelled stream's runs still burn CPU"
        assert stub.ModelInfer(_loop_request(3), timeout=10).outputs[0].name == "y"


def _bloop_request(n: int) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="bloop")
    encode_input(r, "n", np.array([n], np.int64))
    encode_input(r, "x", np.ones((1, 64), np.float32))
    return r


def test_merged_run_stops_once_all_its_clients_left(served):
    """Four long requests merged into one run (a model whose every tensor has a batch axis): while
    one client still waits the run goes on; once all four left it stops, and the model serves."""
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelInfer(_bloop_request(3), timeout=10).outputs[0].name == "y"
        before = _stats(stub, "bloop")
        blocker = stub.ModelInfer.future(_bloop_request(2**62))  # occupies the run slot: the next four queue
        time.sleep(0.3)
        calls = [stub.ModelInfer.future(_bloop_request(2**62)) for _ in range(4)]
        time.sleep(0.3)
        blocker.cancel()  # the blocker's run stops; the four queued run merged
        time.sleep(1.0)
        running = _stats(stub, "bloop")
        assert running.execution_count - before.execution_count == 0  # neither run finished
        for c in calls[:3]:
            c.cancel()
        time.sleep(0.5)
        cpu = _cpu_s()
        time.sleep(0.5)
        assert _cpu_s() - cpu > 0.2, "the merged run stopped while a client still waited"
        calls[3].cancel()
        time.sleep(0.5)
        cpu = _cpu_s()
        time.sleep(1.0)
        assert _cpu_s() - cpu < 0.5, "the merged run still burns CPU after all its clients left"
        assert stub.ModelInfer(_bloop_request(3), timeout=10).outputs[0].name == "y"
        for c in calls:
            with pytest.raises(grpc.FutureCancelledError):
                c.result()


def test_stream_writes_are_serialized_under_concurrency(served):
    """Many independent requests on one stream finishing in any order: every reply arrives whole,
    once, with its id (one writer per stream)."""
    rng = np.random.default_rng(33)
    requests = []
    for i in range(200):
        n = int(rng.integers(1, 50))
        r = _loop_request(n)
        r.id = f"r{i}-{n}"
        requests.append(r)
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        replies = list(pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(iter(requests), timeout=60))
    assert [r.infer_response.id for r in replies] == [r.id for r in requests]
    for r in replies:
        assert not r.error_message, r.error_message
        n = int(r.infer_response.id.split("-")[1])
        y = decode_outputs(r.infer_response)["y"]
        acc = np.ones(64, np.float32)
        for _ in range(n):
            acc = np.sin(acc) + acc
        assert np.abs(y - acc).max() <= 1e-4 * max(1.0, float(np.abs(acc).max()))
