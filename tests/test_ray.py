"""Ray Serve: the data plane as a 2-replica deployment on a 2-node local Ray cluster, behind Ray
Serve's gRPC proxy; tritonclient (unary and streaming) and the project's client call it unchanged.

Runs with .venv-ray (ray[serve], ~500 MB, `make ray-venv`; `make test` creates it) in its own
process, like tritonclient in .venv-triton.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from server.client import LSTMClient
from tests.conftest import TOL, ragged, reference

ROOT = Path(__file__).resolve().parents[1]
RAY_PYTHON = os.environ.get("RAY_PYTHON") or str(ROOT / ".venv-ray" / "bin" / "python")
TRITON_PYTHON = os.environ.get("TRITON_PYTHON") or str(ROOT / ".venv-triton" / "bin" / "python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_two_nodes(repo, encoders, tmp_path):
    if not Path(RAY_PYTHON).exists():
        pytest.fail(f"Ray venv missing at {RAY_PYTHON}: run `make ray-venv` (make test does)")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [RAY_PYTHON, "-m", "scale.ray_serve", "--models", str(repo), "--nodes", "2", "--replicas", "2",
         "--grpc-port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.search(r"gRPC proxy on 127\.0\.0\.1:\d+", line):
                break
        else:
            pytest.fail("ray serve did not start:\n" + "".join(lines[-40:]))
        assert proc.poll() is None, "".join(lines[-40:])
        threading.Thread(target=lambda: [lines.append(ln) for ln in proc.stdout], daemon=True).start()
        target = f"127.0.0.1:{port}"
        x, lengths = ragged(np.random.default_rng(21), 3, 11, 6)
        want = reference(encoders["bi"], x, lengths)
        nodes = set()
        with LSTMClient(target, timeout=60) as c:
            for _ in range(30):
                reply = c.stub.ModelInfer(c.request("bi", x, lengths), timeout=60)
                nodes.add(reply.parameters["ray_node_id"].string_param)
                from server.codec import decode_outputs

                got = decode_outputs(reply)
                assert all(np.abs(got[n] - want[n]).max() <= TOL for n in want)
        assert len(nodes) == 2, f"replies came from {len(nodes)} node(s); expected both"
        np.savez(tmp_path / "in.npz", x=x, lengths=lengths)
        res = subprocess.run(
            [TRITON_PYTHON, str(ROOT / "tests" / "tritonclient_stream_check.py"), target, "bi",
             str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
            capture_output=True, text=True, timeout=180, env={"PATH": os.environ.get("PATH", "")},
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        out = np.load(tmp_path / "out.npz")
        for n in ("y", "h_n", "c_n"):
            assert np.abs(out[n] - want[n]).max() <= TOL
        for i in range(3):
            assert np.abs(out[f"stream{i}_y"] - want["y"]).max() <= TOL
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
