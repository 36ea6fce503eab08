"""The real model: speaker identification on Japanese Vowels, through PyTorch, ONNX and the server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export import japanese_vowels as jv
from export.onnx_export import export_classifier, read_metadata
from export.train import CHECKPOINT, load_checkpoint, pad, train

STATIC_T = 29  # longest utterance in the data set


@pytest.fixture(scope="module")
def data():
    return jv.load("test")


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def speaker_repo(tmp_path_factory, checkpoint):
    model, _ = checkpoint
    root = tmp_path_factory.mktemp("speaker")
    export_classifier(model, root / "speaker_id" / "1" / "model.onnx")
    export_classifier(model, root / f"speaker_id_static_t{STATIC_T}" / "1" / "model.onnx", STATIC_T)
    return root


def _torch_predict(model, seqs) -> np.ndarray:
    x, lengths = pad(seqs)
    with torch.no_grad():
        logits, _ = model(x, lengths)
    return logits.argmax(1).numpy()


def _ort_predict(path, seqs, steps=None) -> tuple[np.ndarray, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, lengths = pad(seqs)
    x = x.numpy()
    if steps is not None:  # the static model takes exactly T steps: pad to it
        x = np.concatenate([x, np.zeros((x.shape[0], steps - x.shape[1], x.shape[2]), np.float32)], axis=1)
    logits, probs = sess.run(["logits", "probs"], {"x": x, "lengths": lengths.numpy()})
    return logits.argmax(1), probs


@pytest.mark.slow
def test_loader_matches_sktime():
    from sktime.datasets import load_japanese_vowels

    ours, labels = jv.load("train")
    X, y = load_japanese_vowels(split="train", return_X_y=True)
    assert len(ours) == len(X) == 270
    for i in (0, 17, 269):
        theirs = np.stack([X.iloc[i, d].to_numpy() for d in range(12)], axis=1)
        assert np.array_equal(ours[i], theirs.astype(np.float32))
        assert labels[i] == int(y[i]) - 1
    test, _ = jv.load("test")
    assert len(test) == 370 and {len(s) for s in ours + test} <= set(range(7, 30))


@pytest.mark.slow
def test_committed_checkpoint_accuracy_and_identical_predictions(speaker_repo, checkpoint, data):
    model, result = checkpoint
    seqs, labels = data
    pt = _torch_predict(model, seqs)
    dyn, probs = _ort_predict(speaker_repo / "speaker_id" / "1" / "model.onnx", seqs)
    sta, _ = _ort_predict(speaker_repo / f"speaker_id_static_t{STATIC_T}" / "1" / "model.onnx", seqs, STATIC_T)
    accuracy = float((dyn == labels).mean())
    assert accuracy >= 0.95, accuracy
    assert accuracy == pytest.approx(result["test_accuracy"], abs=1e-9)
    assert np.array_equal(pt, dyn) and np.array_equal(dyn, sta)  # all 370 identical
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    meta = read_metadata(speaker_repo / "speaker_id" / "1" / "model.onnx")
    assert meta["classifier.num_classes"] == "9" and "inside the graph" in meta["classifier.normalisation"]


@pytest.mark.slow
def test_server_predictions_identical_under_concurrency(speaker_repo, checkpoint, data):
    """The gRPC server answering a mix of concurrent requests (1-7 utterances each, raw coefficients)."""
    from server.app import InferenceServer
    from server.client import LSTMClient
    from server.config import Settings

    model, _ = checkpoint
    seqs, labels = data
    expected = _torch_predict(model, seqs)
    srv = InferenceServer(
        Settings(
            port=0,
            model_repository=speaker_repo,
            device="cpu",
            metrics_port=-1,
            log_level="WARNING",
            max_queue_delay_us=2000,
        )
    )
    port = srv.start()
    try:
        rng = np.random.default_rng(0)
        chunks, start = [], 0
        while start < len(seqs):
            size = int(rng.integers(1, 8))
            chunks.append(list(range(start, min(start + size, len(seqs)))))
            start += size
        got = np.full(len(seqs), -1)
        lock = threading.Lock()

        def call(idx: list[int], model_name: str) -> None:
            with LSTMClient(f"127.0.0.1:{port}") as c:
                results = c.infer(model_name, [seqs[i] for i in idx], outputs=["logits"])
            with lock:
                for i, r in zip(idx, results):
                    got[i] = int(np.argmax(r["logits"]))

        names = ["speaker_id", f"speaker_id_static_t{STATIC_T}"]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(call, chunks, [names[k % 2] for k in range(len(chunks))]))
    finally:
        srv.stop(1)
    assert np.array_equal(got, expected)
    assert float((got == labels).mean()) >= 0.95


@pytest.mark.slow
def test_retraining_reproduces_accuracy(checkpoint):
    _, result = checkpoint
    _, again = train(epochs=result["epochs"], seed=result["seed"], progress=False, log=lambda s: None)
    assert abs(again["test_accuracy"] - result["test_accuracy"]) <= 0.01, (again, result)
