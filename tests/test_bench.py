"""`make bench` harness in quick mode (seconds): keeps the load generator and report working.

Speed is never asserted here (speed lives in the benchmark); this checks that
every line ran without errors and the report files are written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import markdown
from tests.conftest import STATIC_T

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick(repo, tmp_path):
    """Every line, both variants (--before: here this same checkout), the targets and the thread report."""
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--models", str(repo), "--model", "bi",
         "--static-model", f"bi_static_t{STATIC_T}", "--out", str(out), "--before", str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    lines = {r["line"] for r in report["rows"]}
    assert {"a", "b", "c", "d", "e"} <= lines
    served = [r for r in report["rows"] if r["line"] in ("c", "d", "e")]
    assert {r.get("variant") for r in served} == {"before", "after"}
    measured = [r for r in report["rows"] if "seq_per_s" in r]
    assert measured and all(r["errors"] == 0 and r["requests"] > 0 for r in measured)
    targets = {t["key"]: t for t in report["targets"]}
    streaming = {k: targets.pop(k) for k in ("streaming_unary", "streaming_streams", "streaming_one")}
    assert all(t["value"] > 0 for t in streaming.values()), streaming  # line (s), this run only
    assert set(targets) == {
        "threads", "c64_best", "c64_floor", "c1_over_live", "c64_meanbatch", "gain", "c1_over_run", "vs_torch"
    }  # fmt: skip
    floor = [r for r in report["rows"] if r["line"] == "t"]
    assert len(floor) == 1 and floor[0]["seq_per_s"] > 0 and floor[0]["errors"] == 0, floor
    assert 0 < targets["c64_floor"]["value"] < 1
    assert all("before" in t for t in targets.values())
    threads = report["info"]["server_threads"]
    assert set(threads) == {"before", "after"} and all(len(v["threads"]) > 3 for v in threads.values())
    if len(os.sched_getaffinity(0)) >= 2:  # pinned: every server thread on CPU 0, as the target says
        assert targets["threads"]["value"] == 0 and targets["threads"]["ok"], targets["threads"]
    md = markdown(report["info"], report["rows"], report["targets"])  # what the docs' performance page shows
    assert "seq/s before" in md and "Server threads (after" in md and out.with_suffix(".png").stat().st_size > 0


def test_wire_response_parses_like_the_message():
    """ModelInfer answers in wire format built by hand (each output copied once); it must parse to the
    very message the protobuf path builds: float and int outputs, a non-contiguous slice, an empty
    one, echoed parameters."""
    import numpy as np

    from server.dataplane import InferResponse
    from server.grpc_codec import to_infer_response, to_infer_response_bytes
    from server.proto import grpc_service_pb2 as pb

    rng = np.random.default_rng(0)
    big = rng.standard_normal((3, 200, 512)).astype(np.float32)
    outputs = {
        "y": big[1:2, :150],  # a slice: not contiguous
        "h_n": rng.standard_normal((4, 1, 256)).astype(np.float32),
        "ids": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }
    request = pb.ModelInferRequest(model_name="m")
    request.parameters["sequence_id"].string_param = "abc"
    response = InferResponse("m", "2", "req-1", outputs, {"sequence_id": "abc", "sequence_end": True})
    wire = to_infer_response_bytes(response, request)
    parsed = pb.ModelInferResponse.FromString(wire)
    assert parsed == to_infer_response(response, request)
    np.testing.assert_array_equal(np.frombuffer(parsed.raw_output_contents[0], np.float32).reshape(1, 150, 512),
                                  outputs["y"])  # fmt: skip


@pytest.mark.slow
def test_transport_experiment_quick(repo, tmp_path):
    """bench.transport runs its servers (product, asyncio, REST binary and JSON) and answers every call."""
    out = tmp_path / "transport.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.transport", "--models", str(repo), "--model", "bi", "--seconds", "0.3",
         "--modes", "product,aio-thread,rest-binary,rest-json", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["product", "aio-thread", "rest-binary", "rest-json"]
    assert all(r["errors"] == 0 and r["c16_seq_per_s"] > 0 and r["live_calls_per_s"] > 0 for r in rows)


def test_stream_path_harness_quick(repo, tmp_path):
    """`python -m bench.path`: chunks of a stateful model through the servicer's stream path without
    gRPC; every chunk answered (a refused one fails the run), CPU per chunk measured."""
    out = tmp_path / "path.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.path", "--models", str(repo), "--model", "suni", "--seconds", "0.3",
         "--sequences", "4", "--no-pin", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    figures = json.loads(out.read_text())
    assert figures["chunks"] > 0 and figures["cpu_ms_per_chunk"] > 0, figures
    assert "stream path without gRPC, 4 sequences of suni" in res.stdout
