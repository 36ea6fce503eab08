"""Shared fixtures: small seeded models exported once per session, and a real server on port 0."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from export.model import LSTMConfig, LSTMEncoder
from export.onnx_export import export_dynamic, export_static

# float32 through two different LSTM implementations (PyTorch's and ORT's): agreement to 1e-5
# is the project's contract; observed errors are ~1e-7.
TOL = 1e-5
STATIC_T = 12

SMALL = {
    "bi": LSTMConfig(input_size=6, hidden_size=8, num_layers=2, bidirectional=True),
    "uni": LSTMConfig(input_size=5, hidden_size=3, num_layers=1, bidirectional=False),
}
# exported with initial-state inputs h0/c0 (stateful streaming)
STATEFUL = {
    "suni": LSTMConfig(input_size=5, hidden_size=7, num_layers=2, bidirectional=False),
    "sbi": LSTMConfig(input_size=5, hidden_size=4, num_layers=1, bidirectional=True),
}


def make_encoder(config: LSTMConfig, seed: int = 0) -> LSTMEncoder:
    torch.manual_seed(seed)
    return LSTMEncoder(config).eval()


def reference(encoder: LSTMEncoder, x: np.ndarray, lengths: np.ndarray, h0=None, c0=None) -> dict[str, np.ndarray]:
    state = [None if s is None else torch.from_numpy(s) for s in (h0, c0)]
    with torch.no_grad():
        y, h, c = encoder(torch.from_numpy(x), torch.from_numpy(lengths), *state)
    return {"y": y.numpy(), "h_n": h.numpy(), "c_n": c.numpy()}


def ragged(rng: np.random.Generator, batch: int, steps: int, features: int, full: bool = True):
    """A seeded ragged batch: lengths drawn 1..steps, unsorted, one of them = steps if `full`."""
    lengths = rng.integers(1, steps + 1, size=batch).astype(np.int64)
    if full:
        lengths[rng.integers(batch)] = steps
    x = rng.standard_normal((batch, steps, features)).astype(np.float32)
    return x, lengths


def run_export(*args: str) -> int:
    """`python -m export ARGS` in this process: its exit status (argparse errors included)."""
    from export.__main__ import main as export_main

    try:
        return export_main(list(args))
    except SystemExit as exc:  # argparse errors
        return int(exc.code)


@pytest.fixture(scope="session")
def encoders() -> dict[str, LSTMEncoder]:
    return {name: make_encoder(cfg) for name, cfg in SMALL.items()}


@pytest.fixture(scope="session")
def stateful_encoders() -> dict[str, LSTMEncoder]:
    return {name: make_encoder(cfg, seed=3) for name, cfg in STATEFUL.items()}


@pytest.fixture(scope="session")
def repo(tmp_path_factory, encoders, stateful_encoders) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, enc in encoders.items():
        export_dynamic(enc, root / name / "1" / "model.onnx")
    for name, enc in stateful_encoders.items():
        export_dynamic(enc, root / name / "1" / "model.onnx", initial_state=True)
    export_static(encoders["bi"], STATIC_T, root / f"bi_static_t{STATIC_T}" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="session")
def server(repo):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(
            port=0,
            model_repository=repo,
            device="cpu",
            log_level="WARNING",
            metrics_port=0,
            instances=2,
            model_control_mode="explicit",  # tests load and unload models by request
        )
    )
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture()
def client(target):
    from server.client import LSTMClient

    with LSTMClient(target, timeout=30) as c:
        yield c


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs():
    logging.getLogger("server").setLevel(logging.WARNING)
