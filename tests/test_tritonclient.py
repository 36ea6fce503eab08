"""tritonclient's gRPC client (a third-party OIP client) against the server, in its own venv/process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOL, ragged, reference

HERE = Path(__file__).resolve().parent
TRITON_PYTHON = os.environ.get("TRITON_PYTHON") or str(HERE.parent / ".venv-triton" / "bin" / "python")


def test_tritonclient_live_metadata_infer(target, encoders, tmp_path):
    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    x, lengths = ragged(np.random.default_rng(12), 4, 9, 6)
    np.savez(tmp_path / "in.npz", x=x, lengths=lengths)
    res = subprocess.run(
        [
            TRITON_PYTHON,
            str(HERE / "tritonclient_check.py"),
            target,
            "bi",
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["server"]["name"] == "lstm-serve"
    meta = report["metadata"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]] == ["x", "lengths"]
    assert meta["inputs"][0]["shape"] == ["-1", "-1", "6"]  # int64 in JSON form are strings
    assert "INVALID_ARGUMENT" in report["error"] or "feature size" in report["error"], report["error"]
    got = np.load(tmp_path / "out.npz")
    want = reference(encoders["bi"], x, lengths)
    for name in ("y", "h_n", "c_n"):
        assert np.abs(got[name] - want[name]).max() <= TOL, name
