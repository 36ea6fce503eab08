"""Token-id models (nn.Embedding -> LSTM/GRU -> Linear) exported with `python -m export --module`:
the file's interface, native recurrence, and parity with eager PyTorch in ONNX Runtime on ragged
batches whose padding ids are random valid ids (so only `lengths` keeps padding out of a result)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import OPSET, read_metadata
from export.user import export_module, resolve_input_dtype
from export.verify import ExportError
from tests import own_modules, token_modules
from tests.conftest import TOL, run_export

ROOT = Path(__file__).resolve().parent.parent
STATIC_T = 6


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    # the tagger's int64 input is detected (nn.Embedding first); the classifier's is given
    assert run_export("--module", "tests.token_modules:bilstm_tagger", "--name", "tagger", "--out", str(out),
                      "--output-names", "logits") == 0  # fmt: skip
    assert run_export("--module", "tests.token_modules:gru_classifier", "--input-dtype", "int64", "--name",
                      "classifier", "--out", str(out), "--output-names", "logits",
                      "--static", str(STATIC_T)) == 0  # fmt: skip
    return out


def _file(repo: Path, name: str) -> Path:
    return repo / name / "1" / "model.onnx"


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _eager(model: torch.nn.Module, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy()


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    # float32 through two recurrence implementations: the export's contract |d| <= 1e-5 * max(1, |want|)
    assert got.shape == want.shape
    scaled = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    assert scaled.max(initial=0.0) <= TOL, scaled.max()


def _ragged(rng: np.random.Generator, vocab: int, batch: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Unsorted lengths 1..steps (one full, one of 1), ids below `vocab` everywhere, padding included."""
    lengths = rng.integers(1, steps + 1, size=batch).astype(np.int64)
    lengths[0], lengths[-1] = 1, steps
    rng.shuffle(lengths)
    return rng.integers(0, vocab, size=(batch, steps), dtype=np.int64), lengths


def _repad(rng: np.random.Generator, tokens: np.ndarray, lengths: np.ndarray, vocab: int) -> np.ndarray:
    """The same sequences, other random valid ids past each length."""
    other = tokens.copy()
    for i, n in enumerate(lengths):
        other[i, n:] = rng.integers(0, vocab, size=tokens.shape[1] - n)
    assert (other != tokens).any()
    return other


def test_file_interface_for_the_server(repo):
    """What a server reads: INT64 x (batch, time), lengths (batch), named dims, token metadata."""
    for name, vocab, out_dims in (("tagger", 50, ["batch", "time", 5]), ("classifier", 30, ["batch", 3])):
        model = onnx.load(str(_file(repo, name)))
        onnx.checker.check_model(model, full_check=True)
        inputs = {v.name: (v.type.tensor_type.elem_type, _dims(v)) for v in model.graph.input}
        outputs = {v.name: (v.type.tensor_type.elem_type, _dims(v)) for v in model.graph.output}
        assert inputs == {
            "x": (onnx.TensorProto.INT64, ["batch", "time"]),
            "lengths": (onnx.TensorProto.INT64, ["batch"]),
        }
        assert outputs == {"logits": (onnx.TensorProto.FLOAT, out_dims)}
        meta = read_metadata(_file(repo, name))
        assert meta["lstm.input"] == "tokens" and meta["lstm.vocab_size"] == str(vocab)
        assert meta["lstm.export_mode"] == "dynamic" and meta["export.outputs"] == "logits"
        logits_axes = {"batch": 0, "time": 1} if name == "tagger" else {"batch": 0}
        assert json.loads(meta["lstm.axes"]) == {
            "x": {"batch": 0, "time": 1},
            "lengths": {"batch": 0},
            "logits": logits_axes,
        }
        assert model.opset_import[0].version == OPSET and 14 <= OPSET <= 21
        assert model.ir_version <= 13  # what onnxruntime 1.31 loads


@pytest.mark.parametrize("name,op,layers", [("tagger", "LSTM", 2), ("classifier", "GRU", 1)])
def test_one_native_node_per_layer_fed_by_lengths(repo, name, op, layers):
    model = onnx.load(str(_file(repo, name)))
    nodes = [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert [n.op_type for n in nodes] == [op] * layers
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in nodes:
        # sequence_lens (input 4) is computed from `lengths` alone (sorted by the module's
        # enforce_sorted=False packing), never from the ids
        assert len(node.input) > 4 and node.input[4]
        todo, sources = [node.input[4]], set()
        while todo:
            tensor = todo.pop()
            if tensor in producers:
                todo.extend(i for i in producers[tensor].input if i)
            else:
                sources.add(tensor)
        assert sources & {v.name for v in model.graph.input} == {"lengths"}
    if op == "GRU":  # PyTorch applies the reset gate after the hidden matmul
        assert all(any(a.name == "linear_before_reset" and a.i == 1 for a in n.attribute) for n in nodes)
    directions = {next((a.s.decode() for a in n.attribute if a.name == "direction"), "forward") for n in nodes}
    assert directions == ({"bidirectional"} if name == "tagger" else {"forward"})


@pytest.mark.parametrize(
    "name,factory,vocab,per_token",
    [
        ("tagger", token_modules.bilstm_tagger, token_modules.TAGGER_VOCAB, True),
        ("classifier", token_modules.gru_classifier, token_modules.CLASSIFIER_VOCAB, False),
    ],
)
def test_ragged_parity_and_padding_never_changes_a_result(repo, name, factory, vocab, per_token):
    model = factory().eval()
    sess = _session(_file(repo, name))
    rng = np.random.default_rng(2024)
    for batch, steps in ((6, 11), (1, 1), (3, 17)):  # T = 11 and 17 were not used at export (T = 5)
        tokens, lengths = _ragged(rng, vocab, batch, steps)
        (got,) = sess.run(["logits"], {"x": tokens, "lengths": lengths})
        _assert_close(got, _eager(model, tokens, lengths))  # the whole padded batch, as eager computes it
        for i, n in enumerate(lengths):  # each sequence alone, unpadded: padding is no part of its result
            alone = _eager(model, tokens[i : i + 1, :n], lengths[i : i + 1])[0]
            _assert_close(got[i, :n] if per_token else got[i], alone[:n] if per_token else alone)
        if steps > 1:
            (again,) = sess.run(["logits"], {"x": _repad(rng, tokens, lengths, vocab), "lengths": lengths})
            for i, n in enumerate(lengths):
                _assert_close(again[i, :n] if per_token else again[i], got[i, :n] if per_token else got[i])
        if per_token:  # dynamic_rnn semantics: the LSTM's output is zero past each length, so logits = bias
            bias = model.out.bias.detach().numpy()
            for i, n in enumerate(lengths):
                _assert_close(got[i, n:], np.broadcast_to(bias, got[i, n:].shape).astype(np.float64))


def test_static_twin_takes_its_one_length(repo):
    path = repo / f"classifier_static_t{STATIC_T}" / "1" / "model.onnx"
    model = onnx.load(str(path))
    assert [(v.name, _dims(v)) for v in model.graph.input] == [("x", ["batch", STATIC_T]), ("lengths", ["batch"])]
    assert not [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]  # unrolled
    meta = read_metadata(path)
    assert meta["lstm.export_mode"] == "static" and meta["lstm.static_length"] == str(STATIC_T)
    assert meta["lstm.input"] == "tokens" and json.loads(meta["lstm.axes"])["x"] == {"batch": 0, "time": 1}
    sess = _session(path)
    model_t = token_modules.gru_classifier().eval()
    tokens, lengths = _ragged(np.random.default_rng(7), token_modules.CLASSIFIER_VOCAB, 5, STATIC_T)
    (got,) = sess.run(["logits"], {"x": tokens, "lengths": lengths})
    _assert_close(got, _eager(model_t, tokens, lengths))
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):
        sess.run(["logits"], {"x": tokens[:, :-1], "lengths": np.minimum(lengths, STATIC_T - 1)})


def test_input_dtype_detected_from_the_first_module_applied():
    assert resolve_input_dtype(token_modules.bilstm_tagger()) == ("int64", token_modules.TAGGER_VOCAB)
    assert resolve_input_dtype(token_modules.gru_classifier(), "int64") == ("int64", token_modules.CLASSIFIER_VOCAB)
    assert resolve_input_dtype(own_modules.gru_classifier()) == ("float32", None)  # no nn.Embedding
    # an nn.Embedding that is not applied to the input first (positions after a Linear): features
    assert resolve_input_dtype(token_modules.features_with_positions()) == ("float32", None)


def test_features_model_holding_an_embedding_exports_as_features(tmp_path):
    assert run_export("--module", "tests.token_modules:features_with_positions", "--feature-size", "6",
                      "--name", "pos", "--out", str(tmp_path)) == 0  # fmt: skip
    model = onnx.load(str(_file(tmp_path, "pos")))
    x = model.graph.input[0]
    assert (x.name, x.type.tensor_type.elem_type, _dims(x)) == ("x", onnx.TensorProto.FLOAT, ["batch", "time", 6])
    assert "lstm.input" not in read_metadata(_file(tmp_path, "pos"))


BAD = [
    (["--module", "tests.token_modules:bilstm_tagger", "--input-dtype", "int32"],
     "argument --input-dtype: 'int32' is not supported; expected float32"),
    (["--module", "tests.token_modules:bilstm_tagger", "--input-dtype", "float16"],
     "argument --input-dtype: 'float16' is not supported"),
    (["--module", "tests.token_modules:bilstm_tagger", "--input-dtype", "float32", "--feature-size", "12"],
     "--input-dtype float32: EmbeddingTagger applies nn.Embedding(50, ...) to its input first"),
    (["--module", "tests.token_modules:bilstm_tagger", "--feature-size", "12"],
     "--feature-size applies to float32 features; EmbeddingTagger takes int64 token ids"),
    (["--module", "tests.token_modules:features_with_positions", "--feature-size", "6", "--input-dtype", "int64"],
     "--input-dtype int64: FeaturesWithPositions applies Linear to its input first"),
    (["--module", "tests.own_modules:gru_classifier", "--feature-size", "6", "--input-dtype", "int64"],
     "--input-dtype int64: Tagger has no nn.Embedding"),
    (["--module", "tests.token_modules:features_with_positions"], "--module needs --feature-size"),
    (["--module", "tests.token_modules:unpacked"], "have no sequence_lens input, so padding would change results"),
    (["--module", "tests.token_modules:max_norm_tagger"],
     "EmbeddingTagger: embed is nn.Embedding with max_norm=1, which rescales its weights in place"),
    (["--module", "tests.token_modules:bilstm_tagger", "--report"], "a token model (int64 x): drop --report"),
    (["--input-dtype", "int64"], "--input-dtype int64 applies to --module exports"),
    (["--weights", "{bare}", "--input-dtype", "int64"], "--input-dtype int64 applies to --module exports"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_refusals_exit_2_one_line_nothing_written(tmp_path, capsys, args, message):
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.LSTM(4, 3).state_dict(), bare)
    out = tmp_path / "repo"
    rc = run_export(*[a.format(bare=bare) for a in args], "--name", "m", "--out", str(out), "--static", "4")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


@pytest.mark.slow
def test_bad_input_dtype_from_python_and_a_real_process(tmp_path):
    with pytest.raises(ExportError, match=r"^--input-dtype int32: not supported; expected float32"):
        export_module(token_modules.bilstm_tagger(), tmp_path / "m" / "1" / "model.onnx", input_dtype="int32")
    res = subprocess.run(
        [sys.executable, "-m", "export", "--module", "tests.token_modules:bilstm_tagger", "--input-dtype", "int8",
         "--name", "m", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: argument --input-dtype: 'int8' is not supported; expected float32 (x: (batch, time, features)) "
        "or int64 (x: (batch, time) token ids for an nn.Embedding)"
    ]
    assert not any(tmp_path.rglob("*"))
