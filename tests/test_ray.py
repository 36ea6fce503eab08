"""Ray Serve: the data plane as a 2-replica deployment on a 2-node local Ray cluster, behind Ray
Serve's gRPC proxy; tritonclient (unary and streaming) and the project's client call it unchanged.

Runs with .venv-ray (ray[serve], ~800 MB, `make ray-venv`; `make test-ray` creates it) in its own
process, like tritonclient in .venv-triton.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from scale.replicas import free_port
from server.client import LSTMClient
from server.codec import decode_outputs
from tests.conftest import TOL, ragged, reference

ROOT = Path(__file__).resolve().parents[1]
RAY_PYTHON = os.environ.get("RAY_PYTHON") or str(ROOT / ".venv-ray" / "bin" / "python")
TRITON_PYTHON = os.environ.get("TRITON_PYTHON") or str(ROOT / ".venv-triton" / "bin" / "python")


@contextlib.contextmanager
def _ray_serve(repo, *args: str):
    """Start scale.ray_serve on a free port; yield (target, output lines); SIGINT it at the end."""
    if not Path(RAY_PYTHON).exists():
        pytest.fail(f"Ray venv missing at {RAY_PYTHON}: run `make test-ray` (it builds the venv)")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [RAY_PYTHON, "-m", "scale.ray_serve", "--models", str(repo), "--nodes", "2", "--grpc-port", str(port), *args],
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
        yield f"127.0.0.1:{port}", lines
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


def _node_of(client: LSTMClient, x, lengths, want) -> str:
    reply = client.stub.ModelInfer(client.request("bi", x, lengths), timeout=60)
    got = decode_outputs(reply)
    assert all(np.abs(got[n] - want[n]).max() <= TOL for n in want)
    return reply.parameters["ray_node_id"].string_param


@pytest.mark.slow
def test_ray_serve_two_nodes(repo, encoders, tmp_path):
    with _ray_serve(repo, "--replicas", "2") as (target, _lines):
        x, lengths = ragged(np.random.default_rng(21), 3, 11, 6)
        want = reference(encoders["bi"], x, lengths)
        with LSTMClient(target, timeout=60) as c:
            nodes = {_node_of(c, x, lengths, want) for _ in range(30)}
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


@pytest.mark.slow
def test_ray_serve_autoscales_under_load(repo, encoders):
    """--autoscale 1:2:1: one replica while calls come one at a time; under 8 concurrent callers Ray
    Serve adds the second replica, which (1 CPU per node and per replica) must land on the other node."""
    with _ray_serve(repo, "--autoscale", "1:2:1", "--autoscale-delay", "1") as (target, lines):
        assert "autoscaling {'min_replicas': 1, 'max_replicas': 2" in "".join(lines)
        x, lengths = ragged(np.random.default_rng(22), 3, 11, 6)
        want = reference(encoders["bi"], x, lengths)
        with LSTMClient(target, timeout=60) as c:
            idle_nodes = {_node_of(c, x, lengths, want) for _ in range(10)}
            assert len(idle_nodes) == 1, "min_replicas=1: one replica before any load"
            seen: set[str] = set()
            stop = threading.Event()
            errors: list[BaseException] = []

            def caller():
                try:
                    while not stop.is_set():
                        seen.add(_node_of(c, x, lengths, want))
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
                    stop.set()

            threads = [threading.Thread(target=caller) for _ in range(8)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(seen) < 2 and not stop.is_set():
                time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not errors, errors[:1]
        assert len(seen) == 2, f"under load replies still came from {len(seen)} node(s): no second replica"
