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
    config = report["config"]["config"]  # get_model_config: ModelConfigResponse as JSON
    assert config["name"] == "bi" and config["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("x", "TYPE_FP32", ["-1", "-1", "6"]), ("lengths", "TYPE_INT64", ["-1"])
    ]  # fmt: skip
    assert [o["name"] for o in config["output"]] == ["y", "h_n", "c_n"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    assert "INVALID_ARGUMENT" in report["error"] or "feature size" in report["error"], report["error"]
    got = np.load(tmp_path / "out.npz")
    want = reference(encoders["bi"], x, lengths)
    for name in ("y", "h_n", "c_n"):
        assert np.abs(got[name] - want[name]).max() <= TOL, name


def test_proto_matches_tritonclient_descriptors():
    """Every message, field, enum value and method of protos/grpc_service.proto has the same number,
    type, label, type name and oneof as in tritonclient's own descriptors: the wire-compatibility
    claim in the proto's header, checked for the whole file."""
    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    from server.proto import grpc_service_pb2 as pb
    from tests.triton_descriptors import describe

    res = subprocess.run(
        [TRITON_PYTHON, str(HERE / "triton_descriptors.py")],
        capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    theirs = json.loads(res.stdout)
    ours = describe([pb.DESCRIPTOR], pb.DESCRIPTOR.services_by_name["GRPCInferenceService"])
    problems = []
    for name, fields in ours["messages"].items():
        if name not in theirs["messages"]:
            problems.append(f"message {name}: not in tritonclient")
            continue
        for field, spec in fields.items():
            other = theirs["messages"][name].get(field)
            if other != spec:
                problems.append(f"{name}.{field}: ours {spec}, tritonclient {other}")
    for name, values in ours["enums"].items():
        other = theirs["enums"].get(name, {})
        problems += [
            f"enum {name}.{v}: ours {n}, tritonclient {other.get(v)}" for v, n in values.items() if other.get(v) != n
        ]
    for name, spec in ours["methods"].items():
        if theirs["methods"].get(name) != spec:
            problems.append(f"rpc {name}: ours {spec}, tritonclient {theirs['methods'].get(name)}")
    assert not problems, "\n".join(problems)
    assert len(ours["messages"]) >= 40 and "ModelConfig" in ours["methods"]  # the comparison covered the file
    shm = {f"{kind}SharedMemory{verb}" for kind in ("System", "Cuda") for verb in ("Status", "Register", "Unregister")}
    assert shm <= set(ours["methods"]), sorted(shm - set(ours["methods"]))


SHM_EXAMPLES = [
    ("simple_grpc_shm_client.py", "grpc"),
    ("simple_grpc_shm_string_client.py", "grpc"),
    ("simple_http_shm_client.py", "http"),
    ("simple_http_shm_string_client.py", "http"),
    ("reuse_infer_objects_client.py", "both"),
]


def test_tritons_shared_memory_examples_pass_unchanged(tmp_path):
    """Triton's system shared-memory examples (triton-inference-server/client src/python/examples),
    run unchanged with tritonclient against Triton's `simple` and `simple_string` models. They are
    Triton's files, not copied here: set TRITON_CLIENT_EXAMPLES to a folder holding them (tests
    never download). They use fixed /dev/shm keys: run one at a time on a machine."""
    folder = os.environ.get("TRITON_CLIENT_EXAMPLES")
    if not folder:
        pytest.skip("TRITON_CLIENT_EXAMPLES is not set (a folder with Triton's simple_*_shm_client.py)")
    from server.app import InferenceServer
    from server.config import Settings
    from tests.test_shm import _simple_models

    _simple_models(tmp_path)
    srv = InferenceServer(Settings(port=0, http_port=0, model_repository=tmp_path, device="cpu", log_level="ERROR",
                                   metrics_port=-1))  # fmt: skip
    srv.start()
    try:
        for script, protocol in SHM_EXAMPLES:
            urls = {"grpc": [f"localhost:{srv.port}"], "http": [f"localhost:{srv.http_port}"]}.get(protocol)
            runs = [["-u", urls[0]]] if urls else [["-u", f"localhost:{srv.port}", "-i", "grpc"],
                                                   ["-u", f"localhost:{srv.http_port}", "-i", "http"]]  # fmt: skip
            for flags in runs:
                res = subprocess.run(
                    [TRITON_PYTHON, str(Path(folder) / script), *flags],
                    capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")},
                )  # fmt: skip
                assert res.returncode == 0, (script, flags, res.stdout[-2000:], res.stderr[-2000:])
                ok = "error" not in res.stdout if script.startswith("reuse") else "PASS" in res.stdout
                assert ok, (script, flags, res.stdout[-2000:])
    finally:
        srv.stop(grace=1)
