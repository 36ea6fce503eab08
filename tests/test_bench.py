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

from tests.conftest import STATIC_T

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick(repo, tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--models", str(repo), "--model", "bi",
         "--static-model", f"bi_static_t{STATIC_T}", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    lines = {r["line"] for r in report["rows"]}
    assert {"a", "b", "c", "d", "e"} <= lines
    measured = [r for r in report["rows"] if "seq_per_s" in r]
    assert measured and all(r["errors"] == 0 and r["requests"] > 0 for r in measured)
    assert len(report["targets"]) == 4
    assert out.with_suffix(".md").read_text().count("|") > 20 and out.with_suffix(".png").stat().st_size > 0


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
