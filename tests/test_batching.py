"""Dynamic batching: merged runs equal unbatched runs, policy (grouping, limits, deadlines), metrics."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from server.batcher import Batcher, BatchPolicy, _Item, merge_and_run
from server.errors import DeadlineExceeded, ResourceExhausted
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.runtime import RuntimeOptions, load_model, select_providers
from server.validate import validate
from tests.conftest import TOL, ragged, reference


@pytest.fixture(scope="module")
def runtime(repo):
    providers = select_providers(RuntimeOptions(device="cpu"))
    return load_model("bi", 1, repo / "bi" / "1" / "model.onnx", providers, RuntimeOptions(device="cpu"))


def _work(runtime, x, lengths, outputs):
    """A request as the batcher takes it (validated against the model's signature)."""
    return validate(runtime, {"x": x, "lengths": lengths}, list(outputs)).work


def _items(runtime, rng, shapes, outputs=("y", "h_n", "c_n")):
    return [_Item(_work(runtime, *ragged(rng, b, t, 6), outputs), None) for b, t in shapes]


def test_merge_equals_unbatched(runtime, encoders):
    rng = np.random.default_rng(0)
    items = _items(runtime, rng, [(1, 3), (4, 40), (2, 17), (1, 1)])
    items[1].work.outputs = ["h_n"]  # different requested subsets in one batch
    results, info = merge_and_run(items, runtime.run, runtime.signature)
    assert info.requests == 4 and info.sequences == 8 and info.padded_steps == 40
    for item, got in zip(items, results):
        assert sorted(got) == sorted(item.work.outputs)
        x, lengths = item.work.feeds["x"], item.work.feeds["lengths"]
        want = reference(encoders["bi"], x, lengths)
        alone = runtime.run({"x": x, "lengths": lengths}, item.work.outputs)
        for name in item.work.outputs:
            assert got[name].shape == want[name].shape
            assert np.abs(got[name] - want[name]).max() <= TOL
            assert np.abs(got[name] - alone[name]).max() <= TOL


def _blocked_batcher(policy: BatchPolicy, runtime, infos: list):
    gate = threading.Event()

    def run(feeds, outputs):
        gate.wait(10)
        return runtime.run(feeds, outputs)

    return Batcher("bi:1", run, policy, on_batch=infos.append, signature=runtime.signature), gate


def _submit_in_thread(batcher: Batcher, runtime, x, lengths, outputs):
    """Submit from another thread: an idle eager batcher runs the request in the caller's thread."""
    pool = ThreadPoolExecutor(1)
    work = _work(runtime, x, lengths, outputs)
    outer = pool.submit(lambda: batcher.submit(work).result(30))
    pool.shutdown(wait=False)
    return outer


def test_idle_batcher_runs_inline(runtime):
    infos: list = []
    batcher = Batcher(
        "bi:1", runtime.run, BatchPolicy(max_queue_delay_us=0), on_batch=infos.append, signature=runtime.signature
    )
    x, lengths = ragged(np.random.default_rng(9), 2, 5, 6)
    future = batcher.submit(_work(runtime, x, lengths, ["h_n"]))
    assert future.done() and len(infos) == 1  # ran in this thread, before submit returned
    batcher.close()


def test_groups_similar_lengths_and_runs_oversized_alone(runtime, encoders):
    infos: list = []
    batcher, gate = _blocked_batcher(BatchPolicy(max_batch=4, max_queue_delay_us=0), runtime, infos)
    rng = np.random.default_rng(1)
    first = _submit_in_thread(batcher, runtime, *ragged(rng, 1, 3, 6), ["h_n"])  # occupies the only run slot
    time.sleep(0.1)
    shapes = [(2, 5), (2, 100), (2, 6), (2, 99), (9, 20)]  # the last is larger than max_batch
    reqs = [ragged(rng, b, t, 6) for b, t in shapes]
    futures = [batcher.submit(_work(runtime, x, lengths, ["y", "h_n"])) for x, lengths in reqs]
    gate.set()
    first.result(10)
    for (x, lengths), fut in zip(reqs, futures):
        got, _queue_ns, _info = fut.result(10)
        assert _info.requests >= 1
        want = reference(encoders["bi"], x, lengths)
        assert np.abs(got["y"] - want["y"]).max() <= TOL and np.abs(got["h_n"] - want["h_n"]).max() <= TOL
    batcher.close()
    # oldest first (T=5) with its nearest (T=6); then T=100 with T=99; the 9-sequence one alone
    steps = sorted((i.padded_steps, i.sequences) for i in infos[1:])
    assert steps == [(6, 4), (20, 9), (100, 4)], steps
    long_batch = next(i for i in infos if i.padded_steps == 100)
    valid = int(reqs[1][1].sum() + reqs[3][1].sum())
    assert long_batch.padding_fraction == pytest.approx(1 - valid / (4 * 100))


def test_queue_full_is_resource_exhausted(runtime):
    infos: list = []
    batcher, gate = _blocked_batcher(BatchPolicy(max_batch=1, max_queue=2), runtime, infos)
    x, lengths = ragged(np.random.default_rng(2), 1, 4, 6)
    running = _submit_in_thread(batcher, runtime, x, lengths, ["h_n"])
    time.sleep(0.1)
    queued = [batcher.submit(_work(runtime, x, lengths, ["h_n"])) for _ in range(2)]
    with pytest.raises(ResourceExhausted, match="queue full"):
        batcher.submit(_work(runtime, x, lengths, ["h_n"]))
    gate.set()
    for f in [running, *queued]:
        f.result(10)
    batcher.close()


def test_deadline_passed_while_queued_is_not_run(runtime):
    infos: list = []
    batcher, gate = _blocked_batcher(BatchPolicy(max_batch=1), runtime, infos)
    x, lengths = ragged(np.random.default_rng(3), 1, 4, 6)
    running = _submit_in_thread(batcher, runtime, x, lengths, ["h_n"])
    time.sleep(0.05)
    late = batcher.submit(_work(runtime, x, lengths, ["h_n"]), deadline=time.monotonic() + 0.05)
    time.sleep(0.2)
    gate.set()
    running.result(10)
    with pytest.raises(DeadlineExceeded):
        late.result(10)
    assert len(infos) == 1  # the expired request never reached the runtime
    batcher.close()


@pytest.fixture(scope="module")
def slow_batch_server(repo):
    """A server that waits 30 ms for company, so concurrent requests surely merge."""
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(
            port=0,
            model_repository=repo,
            device="cpu",
            log_level="WARNING",
            metrics_port=-1,
            max_queue_delay_us=30000,
            max_batch=64,
        )
    )
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.mark.slow
def test_concurrent_requests_merge_exactly(slow_batch_server, encoders):
    from server.client import LSTMClient

    target = f"127.0.0.1:{slow_batch_server.port}"
    rng = np.random.default_rng(4)
    reqs = [ragged(rng, int(rng.integers(1, 4)), int(rng.integers(1, 50)), 6) for _ in range(24)]

    def call(req):
        with LSTMClient(target) as c:
            return c.infer_batch("bi", *req)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, reqs))
    for (x, lengths), got in zip(reqs, results):
        want = reference(encoders["bi"], x, lengths)
        for name in ("y", "h_n", "c_n"):
            assert np.abs(got[name] - want[name]).max() <= TOL
    with grpc.insecure_channel(target) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name="bi"))
    (ms,) = stats.model_stats
    assert ms.execution_count < 24, "no request was merged"
    assert max(b.batch_size for b in ms.batch_stats) > 3
    assert ms.inference_count == sum(len(lengths) for _, lengths in reqs)


def test_prometheus_metrics(server, client):
    client.infer_batch("bi", np.zeros((2, 3, 6), np.float32), np.array([3, 1], np.int64))
    with pytest.raises(grpc.RpcError):
        client.infer_batch("bi", np.zeros((2, 3, 5), np.float32))
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'lstm_requests_total{code="OK",model="bi"}' in body
    assert 'lstm_requests_total{code="INVALID_ARGUMENT",model="bi"}' in body
    for name in (
        "lstm_request_latency_seconds_bucket",
        "lstm_queue_seconds_bucket",
        "lstm_inference_seconds_bucket",
        "lstm_batch_sequences_bucket",
        "lstm_padding_ratio_bucket",
    ):
        assert f'{name}{{le="' in body or f"{name}{{model=" in body, name
    assert 'lstm_execution_provider_info{provider="CPUExecutionProvider"} 1.0' in body
    assert "lstm_padding_fraction" not in body and "lstm_execution_provider{" not in body  # the old names
    # the process collector: this process's resident memory, in bytes, above 10 MiB
    rss = re.search(r"^process_resident_memory_bytes (\S+)$", body, re.M)
    assert rss and float(rss.group(1)) > 10 * 2**20, body[-2000:]
    for name in ("process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds", "python_info"):
        assert re.search(rf"^{name}[ {{]", body, re.M), name


def test_streams_and_unary_batched_exactly_bad_requests_fail_alone(slow_batch_server, encoders):
    """Concurrent streams and unary calls merge; each reply matches its request id exactly once;
    a bad request among them fails alone."""
    from server.client import LSTMClient

    target = f"127.0.0.1:{slow_batch_server.port}"
    rng = np.random.default_rng(21)

    def stream_worker(k: int) -> list[str]:
        reqs, expect = [], {}
        with LSTMClient(target) as c:
            for j in range(6):
                rid = f"s{k}-{j}"
                if j == 3:  # wrong feature size: must fail alone
                    reqs.append(c.request("bi", np.zeros((1, 4, 5), np.float32), request_id=rid))
                    expect[rid] = None
                    continue
                x, lengths = ragged(
                    np.random.default_rng(k * 100 + j), int(rng.integers(1, 4)), int(rng.integers(1, 40)), 6
                )
                reqs.append(c.request("bi", x, lengths, request_id=rid))
                expect[rid] = (x, lengths)
            seen = []
            for reply in c.stub.ModelStreamInfer(iter(reqs), timeout=60):
                rid = reply.infer_response.id
                seen.append(rid)
                if expect[rid] is None:
                    assert reply.error_message.startswith("input 'x'"), reply.error_message  # bare, as Triton's
                    continue
                assert not reply.error_message, reply.error_message
                from server.codec import decode_outputs

                got = decode_outputs(reply.infer_response)
                x, lengths = expect[rid]
                want = reference(encoders["bi"], x, lengths)
                for name in ("y", "h_n", "c_n"):
                    assert np.abs(got[name] - want[name]).max() <= TOL
        assert seen == [r.id for r in reqs]  # in order, each exactly once
        return seen

    def unary_worker(k: int) -> int:
        x, lengths = ragged(np.random.default_rng(1000 + k), 2, int(rng.integers(1, 30)), 6)
        with LSTMClient(target) as c:
            got = c.infer_batch("bi", x, lengths)
        want = reference(encoders["bi"], x, lengths)
        assert all(np.abs(got[n] - want[n]).max() <= TOL for n in ("y", "h_n", "c_n"))
        return 1

    with ThreadPoolExecutor(12) as pool:
        streams = [pool.submit(stream_worker, k) for k in range(6)]
        unary = [pool.submit(unary_worker, k) for k in range(18)]
        assert sum(f.result(60) for f in unary) == 18
        assert sum(len(f.result(60)) for f in streams) == 36


def test_far_apart_lengths_and_oversized_merges_are_not_merged(runtime):
    infos: list = []
    policy = BatchPolicy(max_batch=64, max_cells=4 * 30 * 6)
    batcher, gate = _blocked_batcher(policy, runtime, infos)
    rng = np.random.default_rng(5)
    first = _submit_in_thread(batcher, runtime, *ragged(rng, 1, 3, 6), ["h_n"])
    time.sleep(0.1)
    # T=5 and T=30 are more than 4x apart: never merged; three T=30 of 2 rows exceed max_cells together
    reqs = [ragged(rng, 2, 5, 6, full=True), ragged(rng, 2, 30, 6), ragged(rng, 2, 30, 6), ragged(rng, 2, 30, 6)]
    futures = [batcher.submit(_work(runtime, x, lengths, ["h_n"])) for x, lengths in reqs]
    gate.set()
    first.result(10)
    for f in futures:
        f.result(10)
    batcher.close()
    shapes = sorted((i.padded_steps, i.sequences) for i in infos[1:])
    assert shapes == [(5, 2), (30, 2), (30, 4)], shapes  # 6 rows x 30 x 6 > max_cells: split


def test_closed_batcher_runs_late_requests_directly(runtime, encoders):
    batcher = Batcher("bi:1", runtime.run, BatchPolicy(), signature=runtime.signature)
    batcher.close()
    x, lengths = ragged(np.random.default_rng(6), 2, 7, 6)
    got, _, _ = batcher.submit(_work(runtime, x, lengths, ["h_n"])).result(10)
    assert np.abs(got["h_n"] - reference(encoders["bi"], x, lengths)["h_n"]).max() <= TOL


@pytest.mark.slow
def test_bad_batching_config_fails_the_load(repo, tmp_path):
    import shutil

    from server.app import InferenceServer
    from server.client import LSTMClient
    from server.config import Settings

    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    shutil.copy(repo / "uni" / "1" / "model.onnx", root / "m" / "1" / "model.onnx")
    (root / "m" / "config.json").write_text('{"batching": {"instances": 0}}')
    srv = InferenceServer(Settings(port=0, model_repository=root, device="cpu", metrics_port=-1, log_level="CRITICAL",
                                   exit_on_error=False))  # fmt: skip
    srv.start()
    try:
        with LSTMClient(f"127.0.0.1:{srv.port}", timeout=10) as c:
            assert not c.ready()  # a model failed to load: the server is not ready
            with pytest.raises(grpc.RpcError) as err:
                c.infer_batch("m", np.zeros((1, 2, 5), np.float32))
        assert (
            err.value.code() == grpc.StatusCode.UNAVAILABLE
            and "'instances' must be an integer >= 1" in err.value.details()
        )
    finally:
        srv.stop(1)


def test_eager_busy_batcher_waits_for_requests_still_arriving(runtime):
    """A run ends with a request waiting, and more keep arriving (0.5 ms apart, as from threads
    that share the core with the run): the next run waits for them (COALESCE_GAP_S) instead of
    running the first alone; the results are each request's own."""
    from server import batcher as batcher_module

    infos: list = []
    batcher, gate = _blocked_batcher(BatchPolicy(max_queue_delay_us=0), runtime, infos)
    rng = np.random.default_rng(41)
    reqs = [ragged(rng, 1, 7, 6) for _ in range(6)]
    first = batcher.submit(_work(runtime, *reqs[0], ["h_n"]), inline=False)  # the worker's run, held at the gate
    time.sleep(0.1)
    waiting = batcher.submit(_work(runtime, *reqs[1], ["h_n"]), inline=False)  # queued behind it
    gate.set()
    futures = [first, waiting]
    for x, lengths in reqs[2:]:  # arriving one after another, each well within the gap
        time.sleep(batcher_module.COALESCE_GAP_S / 4)
        futures.append(batcher.submit(_work(runtime, x, lengths, ["h_n"]), inline=False))
    for f, (x, lengths) in zip(futures, reqs):
        got = f.result(30)[0]["h_n"]
        assert np.abs(got - reference_h_n(runtime, x, lengths)).max() <= TOL
    assert infos[0].requests == 1
    assert max(i.requests for i in infos[1:]) >= 3, [i.requests for i in infos]  # merged, not one by one
    batcher.close()


def reference_h_n(runtime, x, lengths):
    return runtime.run({"x": x, "lengths": lengths}, ["h_n"])["h_n"]
