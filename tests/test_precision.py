"""Precision twins (`--precision int8,fp16`): each twin is written and within its stated tolerance of
the float32 model, or refused in one line (exit 2) with nothing written; the accuracy gate refuses a
broken classifier twin; a served int8 twin answers what ONNX Runtime gives in-process on the same
file (1e-5: the server adds no error of its own). Tolerances: export.precision.TOLERANCE (int8 0.1,
fp16 0.01 of max(1, max |output|), chosen from measurements written there)."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

from export import family, pinned, precision
from export.__main__ import main as export_main
from export.onnx_export import export_dynamic
from export.verify import ExportError
from tests.conftest import TOL

FEATURES, HIDDEN = 5, 6
LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def run_export(*args: str) -> int:
    try:
        return export_main(list(args))
    except SystemExit as exc:  # argparse errors
        return int(exc.code)


def session(path: Path, providers=("CPUExecutionProvider",)) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=list(providers))


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node of `graph`, those inside subgraphs (the int8 twin's per-row Loop) included."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                out += all_nodes(sub)
    return out


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def range_error(reference: Path, twin: Path, features: int, seed: int) -> float:
    """The gate's measure on batches the gate never saw: max |twin - fp32| / max(1, max |fp32|)."""
    ref, got = session(reference), session(twin)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch, steps in ((3, 17), (6, 64), (1, 120)):
        x = rng.standard_normal((batch, steps, features)).astype(np.float32)
        lengths = rng.integers(1, steps + 1, batch).astype(np.int64)
        lengths[0] = steps
        feeds = {"x": x, "lengths": lengths}
        for out, a, b in zip(ref.get_outputs(), got.run(None, feeds), ref.run(None, feeds)):
            diff = np.abs(a - b)
            if "time" in out.shape:  # past a sequence's end the int8 twin writes zeros, not the head on padding
                t, bx = out.shape.index("time"), out.shape.index("batch")
                steps = np.arange(diff.shape[t]).reshape([-1 if k == t else 1 for k in range(diff.ndim)])
                diff = np.where(steps < lengths.reshape([-1 if k == bx else 1 for k in range(diff.ndim)]), diff, 0)
            worst = max(worst, float(diff.max()) / max(1.0, float(np.abs(b).max())))
    return worst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for i, (cell, layer) in enumerate(LAYERS.items()):
        torch.manual_seed(i)
        kwargs = {"bidirectional": True} if cell != "rnn" else {"nonlinearity": "tanh"}
        out[cell] = root / f"{cell}.pt"
        torch.save(layer(FEATURES, HIDDEN, 2, **kwargs).state_dict(), out[cell])
    return out


def test_int8_and_fp16_twins_of_an_lstm_state_dict(checkpoints, tmp_path, capsys):
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints["lstm"]), "--name", "enc", "--out", str(repo),
                      "--precision", "fp32,int8", "--precision", "fp16") == 0  # fmt: skip
    printed = capsys.readouterr().out
    base = family.model_path(repo, "enc")
    for prec in ("int8", "fp16"):
        path = family.model_path(repo, f"enc_{prec}")
        meta = metadata(path)
        assert meta["lstm.precision"] == prec and meta["lstm.twin_of"] == "enc"
        assert float(meta["lstm.precision_tolerance"]) == precision.TOLERANCE[prec]
        assert float(meta["lstm.precision_max_abs_error"]) > 0  # a lower precision: never bit-equal
        assert meta["lstm.precision_checked_on"] == "CPUExecutionProvider" or precision.cuda_usable()[0]
        assert meta["lstm.config"] == metadata(base)["lstm.config"]  # the float model's own keys are kept
        assert f"enc_{prec}: {prec} twin of enc" in printed
        err = range_error(base, path, FEATURES, seed=7)
        assert 0 < err <= precision.TOLERANCE[prec], (prec, err)
    assert metadata(base)["lstm.precision"] == "fp32" and "lstm.twin_of" not in metadata(base)  # the reference
    assert "int8 form: row_loop (the graph runs once per row of the batch: no calibration data" in printed
    q = onnx.load(str(family.model_path(repo, "enc_int8")))
    assert [n.op_type for n in q.graph.node if n.op_type == "Loop"] == ["Loop"]  # one row at a time
    lstm = [n for n in all_nodes(q.graph) if n.op_type == "DynamicQuantizeLSTM"]
    assert len(lstm) == 2 and not [n for n in all_nodes(q.graph) if n.op_type == "LSTM"]
    assert all(n.domain == "com.microsoft" and n.input[4] for n in lstm)  # sequence_lens kept
    h = onnx.load(str(family.model_path(repo, "enc_fp16")))
    assert {t.data_type for t in h.graph.initializer if t.name.startswith("onnx::LSTM")} == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in h.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    assert {o.type.tensor_type.elem_type for o in h.graph.output} == {onnx.TensorProto.FLOAT}


def test_int8_calibration_file_pins_a_user_model(checkpoints, tmp_path, capsys):
    """--int8-calibration FILE.npy: the twin of a --weights model is pinned from it and gated on it;
    a file of the wrong shape or without --precision int8 is refused in one line, nothing written."""
    rng = np.random.default_rng(8)
    cal = tmp_path / "cal.npy"
    np.save(cal, (2 * rng.standard_normal((20, 30, FEATURES))).astype(np.float32))
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints["lstm"]), "--name", "p", "--out", str(repo),
                      "--precision", "int8", "--int8-calibration", str(cal)) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "int8 form: pinned (" in printed and "cal.npy (20 sequences of 30 steps)" in printed
    assert "ragged batches of the calibration inputs cal.npy" in printed
    path = family.model_path(repo, "p_int8")
    assert not [n for n in onnx.load(str(path)).graph.node if n.op_type == "Loop"]
    assert batch_dependence(path, FEATURES) == 0.0 and interface(path) == interface(family.model_path(repo, "p"))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 30, FEATURES + 1), np.float32))
    for args, message in (
        (["--precision", "int8", "--int8-calibration", str(bad)],
         f"--int8-calibration {bad}: array float32[4, 30, {FEATURES + 1}]; expected (N, T, {FEATURES}) or "
         f"(T, {FEATURES}) float32"),
        (["--precision", "fp16", "--int8-calibration", str(cal)], "--int8-calibration applies to --name exports"),
        (["--precision", "int8", "--int8-calibration", str(tmp_path / "none.npy")], "not a readable .npy array"),
    ):  # fmt: skip
        code = run_export("--weights", str(checkpoints["lstm"]), "--name", "q", "--out", str(tmp_path / "n"), *args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_gru_and_rnn_int8_refused_in_one_line_nothing_written(checkpoints, tmp_path, capsys, cell):
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints[cell]), "--name", "m", "--out", str(repo),
                      "--precision", "fp32,int8") == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: m: int8 refused: ONNX Runtime quantizes no GRU or RNN")
    assert f"{cell.upper()} node(s)" in err[0] and "float copy" in err[0]
    assert not repo.exists()  # neither the float model nor a twin


@pytest.mark.parametrize("cell", ["gru", "rnn"])
def test_gru_and_rnn_fp16_twins_written_within_tolerance(checkpoints, tmp_path, cell):
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints[cell]), "--name", "m", "--out", str(repo),
                      "--precision", "fp16") == 0  # fmt: skip
    path = family.model_path(repo, "m_fp16")
    assert metadata(path)["lstm.precision"] == "fp16"
    assert [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in ("GRU", "RNN")] == [cell.upper()] * 2
    err = range_error(family.model_path(repo, "m"), path, FEATURES, seed=3)
    assert 0 < err <= precision.TOLERANCE["fp16"], err


def test_twins_of_a_user_module(tmp_path, capsys):
    """An LSTM module with Linear layers gets both twins (its MatMuls quantized too); the same module
    with a GRU gets an fp16 twin and a one-line int8 refusal that says how little could be int8."""
    repo = tmp_path / "m"
    args = ["--feature-size", "6", "--output-names", "logits,tags", "--precision", "int8,fp16"]
    assert run_export("--module", "tests.own_modules:lstm_tagger", "--name", "tag", "--out", str(repo), *args) == 0
    ops = {n.op_type for n in all_nodes(onnx.load(str(family.model_path(repo, "tag_int8"))).graph)}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= ops and "LSTM" not in ops
    for prec in ("int8", "fp16"):
        err = range_error(family.model_path(repo, "tag"), family.model_path(repo, f"tag_{prec}"), 6, seed=11)
        assert 0 < err <= precision.TOLERANCE[prec], (prec, err)
    capsys.readouterr()
    assert run_export("--module", "tests.own_modules:gru_classifier", "--name", "gru", "--out", str(repo),
                      "--feature-size", "6", "--precision", "int8") == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8 refused" in err[0] and "% of the weight bytes" in err[0], err
    assert not (repo / "gru").exists() and not (repo / "gru_int8").exists()
    assert run_export("--module", "tests.own_modules:gru_classifier", "--name", "gru", "--out", str(repo),
                      "--feature-size", "6", "--precision", "fp16") == 0  # fmt: skip
    err = range_error(family.model_path(repo, "gru"), family.model_path(repo, "gru_fp16"), 6, seed=12)
    assert 0 < err <= precision.TOLERANCE["fp16"]


def test_twins_of_a_token_module(tmp_path):
    """Token ids in (nn.Embedding first): the gate feeds ids below the vocabulary, as the float gate does."""
    repo = tmp_path / "m"
    assert run_export("--module", "tests.token_modules:bilstm_tagger", "--name", "tok", "--out", str(repo),
                      "--precision", "int8,fp16") == 0  # fmt: skip
    for prec in ("int8", "fp16"):
        twin = family.model_path(repo, f"tok_{prec}")
        meta = metadata(twin)
        assert meta["lstm.precision"] == prec and meta["lstm.vocab_size"] == "50"
        assert 0 < float(meta["lstm.precision_max_abs_error"]) <= precision.TOLERANCE[prec]
        assert session(twin).get_inputs()[0].type == "tensor(int64)"


def test_fp16_with_float16_inputs_and_outputs(checkpoints, tmp_path):
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints["lstm"]), "--name", "h", "--out", str(repo),
                      "--precision", "fp16", "--fp16-io-float16") == 0  # fmt: skip
    s = session(family.model_path(repo, "h_fp16"))
    assert [i.type for i in s.get_inputs()] == ["tensor(float16)", "tensor(int64)"]
    assert {o.type for o in s.get_outputs()} == {"tensor(float16)"}


def test_parity_gate_refuses_past_its_tolerance(checkpoints, tmp_path, capsys, monkeypatch):
    """The gate can fail: with a tolerance below int8's real error the twin is refused, nothing written."""
    monkeypatch.setitem(precision.TOLERANCE, "int8", 1e-4)
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints["lstm"]), "--name", "e", "--out", str(repo),
                      "--precision", "int8") == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the int8 twin differs from the float32 model by" in err[0], err
    assert err[0].endswith("tolerance 0.0001 for int8); the file was not written")
    assert not repo.exists()


def test_a_converter_failure_is_one_line_and_leaves_nothing(checkpoints, tmp_path, capsys, monkeypatch):
    import onnxruntime.transformers.float16 as f16

    def broken(*args, **kwargs):
        raise RuntimeError("an op this converter cannot handle\n(second line)")

    monkeypatch.setattr(f16, "convert_float_to_float16", broken)
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints["lstm"]), "--name", "c", "--out", str(repo),
                      "--precision", "fp16") == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: c: fp16: the float16 conversion failed (RuntimeError: an op this converter cannot "
                   "handle (second line)); nothing written"], err  # fmt: skip
    assert not repo.exists()


def test_bad_precision_values_exit_2_one_line(checkpoints, tmp_path, capsys):
    for args, message in (
        (["--precision", "int4"], "argument --precision: precision 'int4': expected fp32, int8, fp16"),
        (["--precision", ","], "argument --precision: no precision given"),
        (["--precision", "int8", "--fp16-io-float16"], "--fp16-io-float16 applies to fp16 twins"),
    ):
        code = run_export("--weights", str(checkpoints["lstm"]), "--name", "b", "--out", str(tmp_path / "m"), *args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_family_writes_int8_twins_and_says_why_no_fp16(tmp_path, capsys, monkeypatch):
    """`make export` (the family, here with one small member in the encoder's place): the int8 twins of
    the encoder-like member and of speaker_id beside their float models; fp16 skipped in one line
    where no GPU is usable (written, and checked where one is)."""
    small = family.FamilyMember("enc", family.LSTMConfig(6, 8, 2, True), seed=0, twins=("int8", "fp16"))
    monkeypatch.setattr(family, "FAMILY", (small,))
    assert run_export("--out", str(tmp_path), "--no-report") == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.iterdir())
    gpu = precision.cuda_usable()[0]
    twins = ["enc_fp16", "enc_int8", "speaker_id_fp16", "speaker_id_int8"] if gpu else ["enc_int8", "speaker_id_int8"]
    assert names == sorted(["enc", "speaker_id", "speaker_id_static_t29", *twins])
    assert gpu or "fp16 twins skipped: fp16 is for ONNX Runtime's CUDA provider" in printed
    meta = metadata(family.model_path(tmp_path, "speaker_id_int8"))
    assert meta["lstm.twin_of"] == "speaker_id" and "Japanese Vowels test split" in meta["lstm.precision_accuracy"]
    assert "speaker_id_int8: int8 twin of speaker_id" in printed and "accuracy on the Japanese Vowels" in printed
    assert printed.count("int8 form: pinned (") == 2  # the encoder-like member and speaker_id: calibration data


# -- int8: a request's answer does not depend on its batch-mates --------------------------------------
def compositions(features: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ragged batches with zero padding, each with a quiet row 0 (T = 23) among different mates: louder
    (x10, the case a per-run activation scale gets wrong), longer, a lone row, many rows."""
    rng = np.random.default_rng(seed)
    quiet = (0.5 * rng.standard_normal((23, features))).astype(np.float32)
    out = []
    for mates, scale, steps in ((3, 10.0, 40), (1, 1.0, 23), (0, 1.0, 23), (12, 3.0, 64)):
        x = np.zeros((1 + mates, steps, features), np.float32)
        lengths = np.concatenate([[23], rng.integers(1, steps + 1, mates)]).astype(np.int64)
        x[0, :23] = quiet
        for i in range(1, 1 + mates):
            x[i, : lengths[i]] = scale * rng.standard_normal((lengths[i], features))
        out.append((x, lengths))
    return out


def batch_dependence(path: Path, features: int, states: dict[str, tuple[int, int]] | None = None) -> float:
    """Largest |merged - alone| over every row and output of `compositions`: each row run alone
    (cut to its length, as a request of one sequence) against the same row inside the batch."""
    sess = session(path)
    axes = {o.name: o.shape for o in sess.get_outputs()}
    rng = np.random.default_rng(3)
    worst = 0.0
    for x, lengths in compositions(features, seed=11):
        feeds = {"x": x, "lengths": lengths}
        for name, (ld, hidden) in (states or {}).items():
            feeds[name] = (0.5 * rng.standard_normal((ld, len(lengths), hidden))).astype(np.float32)
        merged = dict(zip(axes, sess.run(None, feeds)))
        for i, n in enumerate(lengths):
            one = {k: (v[:, i : i + 1] if k in (states or {}) else v[i : i + 1]) for k, v in feeds.items()}
            one["x"] = one["x"][:, :n]
            for name, alone in zip(axes, sess.run(None, one)):
                row = np.take(merged[name], [i], axis=axes[name].index("batch"))
                if "time" in axes[name]:
                    t = axes[name].index("time")
                    assert not np.take(row, range(n, row.shape[t]), axis=t).any(), name  # zeros past the end
                    row = np.take(row, range(n), axis=t)
                assert row.shape == alone.shape, (name, row.shape, alone.shape)
                worst = max(worst, float(np.abs(row - alone).max()))
    return worst


def interface(path: Path) -> list[tuple]:
    """Every graph input and output: name, element type, dims (symbolic names kept)."""
    graph = onnx.load(str(path)).graph
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(graph.input) + list(graph.output)]  # fmt: skip


@pytest.mark.parametrize("form", ["row_loop", "pinned"])
@pytest.mark.parametrize(("initial_state", "bidirectional"), [(False, True), (True, False), (True, True)])
def test_int8_twin_is_batch_invariant(tmp_path, initial_state, bidirectional, form):
    """Alone vs merged, through ONNX Runtime, several batch compositions (a 10x louder mate, a longer
    one, a lone row, 13 rows; with h0/c0 inputs too): bit-identical in both forms (row by row; ranges
    pinned from calibration data), still within the int8 gate, and the float model's interface."""
    cfg = family.LSTMConfig(FEATURES, HIDDEN, 2 + bidirectional * initial_state, bidirectional)
    base = family.model_path(tmp_path, "m")
    export_dynamic(
        family.build(family.FamilyMember("m", cfg, seed=2 + bidirectional)), base, initial_state=initial_state
    )
    cal = pinned.standard_normal(FEATURES) if form == "pinned" else None
    twin = precision.make_twin(base, "int8", family.model_path(tmp_path, "m_int8"), "m", calibration=cal)
    assert f"int8 form: {form} (" in "\n".join(twin.lines())
    ops = [n.op_type for n in all_nodes(onnx.load(str(twin.path)).graph)]
    assert (
        ("Loop" in ops) == (form == "row_loop")
        and "LSTM" not in ops
        and ops.count("DynamicQuantizeLSTM") == cfg.num_layers
    )
    states = {n: (cfg.num_layers * cfg.num_directions, HIDDEN) for n in ("h0", "c0")} if initial_state else None
    assert batch_dependence(twin.path, FEATURES, states) == 0.0
    assert twin.parity.max_scaled <= precision.TOLERANCE["int8"]
    assert "does not depend on the batch" in metadata(twin.path)["lstm.precision_method"]
    assert interface(twin.path) == interface(base)


def test_pinned_anchors_hold_h_at_plus_minus_one_exactly(tmp_path):
    """The pinned twin's widened LSTMs, read before the anchors are sliced off: the two anchor units
        are exactly +1 and -1 (h) and +-HOLD (c) on every row and valid step, zeros past each length, and
        the real units stay within [-1, 1]; a row of length 0 (in-process: the server refuses one) gives
    zeros, as float32 does, and leaves its batch-mate's answer as it is alone."""
    base = family.model_path(tmp_path, "m")
    export_dynamic(family.build(family.FamilyMember("m", family.LSTMConfig(FEATURES, HIDDEN, 2, True), 2)), base)
    twin = precision.make_twin(base, "int8", family.model_path(tmp_path, "m_int8"), "m",
                               calibration=pinned.standard_normal(FEATURES))  # fmt: skip
    model = onnx.load(str(twin.path))
    wide = [o for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM" for o in n.output]
    assert all(n.attribute[-1].i == HIDDEN + 2 for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    model.graph.output.extend(helper.ValueInfoProto(name=v) for v in wide)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    lengths = np.array([30, 1, 7, 0, 2], np.int64)
    x = (10 * rng.standard_normal((5, 30, FEATURES))).astype(np.float32)  # far beyond the calibration range too
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "lengths": lengths})))
    for name in wide:
        value = got[name]
        if value.ndim == 4:  # Y (T, D, B, H + 2)
            for b, n in enumerate(lengths):
                assert (value[:n, :, b, -2] == 1.0).all() and (value[:n, :, b, -1] == -1.0).all(), name
                assert not value[n:, :, b].any(), name
            assert np.abs(value[..., :-2]).max() <= 1.0
        else:  # Y_h (+-1) or Y_c (+-HOLD) of every row but the empty one
            rows = np.flatnonzero(lengths)
            assert set(np.unique(value[:, rows, -2:]).tolist()) in ({-1.0, 1.0}, {-pinned.HOLD, pinned.HOLD}), name
    twin_sess = session(twin.path)
    alone = twin_sess.run(None, {"x": x[:1, :3], "lengths": lengths[:1] * 0 + 3})
    for out, pair, one in zip(
        twin_sess.get_outputs(), twin_sess.run(None, {"x": x[:2, :3], "lengths": np.array([3, 0])}), alone
    ):
        b = out.shape.index("batch")
        assert not np.take(pair, [1], axis=b).any() and np.array_equal(np.take(pair, [0], axis=b), one), out.name


def test_an_lstm_the_anchors_cannot_hold_falls_back_to_row_loop(tmp_path):
    """An LSTM with cell clipping (clip < the anchors' cell of 100): calibration data given, the twin
    is still written row by row, and the report line says why."""
    rng = np.random.default_rng(4)
    hidden = 4
    init = [onnx.numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name)
            for name, shape in (("W", (1, 4 * hidden, FEATURES)), ("R", (1, 4 * hidden, hidden)))]  # fmt: skip
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("Cast", ["lengths"], ["seq"], to=onnx.TensorProto.INT32),
        helper.make_node("LSTM", ["xt", "W", "R", "", "seq"], ["Y"], hidden_size=hidden, clip=5.0, name="clipped"),
        helper.make_node("Squeeze", ["Y", "one"], ["Ys"]),
        helper.make_node("Transpose", ["Ys"], ["y"], perm=[1, 0, 2]),
    ]
    init.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "one"))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "time", FEATURES]),
         helper.make_tensor_value_info("lengths", onnx.TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "time", hidden])], init,
    )  # fmt: skip
    base = tmp_path / "clip.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(base))
    twin = precision.make_twin(base, "int8", tmp_path / "clip_int8" / "model.onnx", "clip",
                               calibration=pinned.standard_normal(FEATURES))  # fmt: skip
    lines = "\n".join(twin.lines())
    assert (
        "int8 form: row_loop (the graph runs once per row of the batch: not pinned: LSTM 'clipped' sets clip" in lines
    )
    assert batch_dependence(twin.path, FEATURES) == 0.0


@pytest.mark.parametrize("form", ["row_loop", "pinned"])
def test_the_invariance_check_sees_a_batch_dependent_twin(tmp_path, monkeypatch, form):
    """The check above can fail: the same twin without its per-row Loop or its pinned ranges (plain
    quantize_dynamic, one activation scale per run) answers a row differently beside a louder batch-mate."""
    base = family.model_path(tmp_path, "m")
    export_dynamic(family.build(family.FamilyMember("m", family.LSTMConfig(FEATURES, HIDDEN, 2, True), 2)), base)
    monkeypatch.setattr(precision, "row_loop", lambda model, name: model)
    monkeypatch.setattr(pinned, "pin", lambda model, ranges, name: model)
    cal = pinned.standard_normal(FEATURES) if form == "pinned" else None
    twin = precision.make_twin(base, "int8", family.model_path(tmp_path, "m_int8"), "m", calibration=cal)
    assert not [n for n in onnx.load(str(twin.path)).graph.node if n.op_type == "Loop"]
    assert batch_dependence(twin.path, FEATURES) > 1e-3


def test_row_loop_refuses_an_output_without_a_batch_axis():
    """A graph whose output has no named batch axis cannot be run one row at a time: one ExportError."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "time", 2])
    lengths = helper.make_tensor_value_info("lengths", onnx.TensorProto.INT64, ["batch"])
    total = helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, [])
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)], "g", [x, lengths], [total])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match=r"^q: int8: 'total' has dims \[\], no 'batch' axis: its rows cannot"):
        precision.row_loop(model, "q")


# -- the speaker classifier: the accuracy gate ---------------------------------------------------------
@pytest.fixture(scope="module")
def speaker(tmp_path_factory) -> Path:
    from export.onnx_export import export_classifier
    from export.train import CHECKPOINT, load_checkpoint

    model, _ = load_checkpoint(CHECKPOINT)
    return export_classifier(model, family.model_path(tmp_path_factory.mktemp("sp"), "speaker_id")).path


def test_speaker_int8_accuracy_measured_and_kept(speaker, tmp_path):
    data = precision.japanese_vowels_test()
    target = tmp_path / "speaker_id_int8" / "1" / "model.onnx"
    cal = precision.japanese_vowels_calibration()
    twin = precision.make_twin(speaker, "int8", target, "speaker_id", data, calibration=cal)
    assert "int8 form: pinned (" in "\n".join(twin.lines()) and "Japanese Vowels test split" in twin.parity.line("s")
    assert not [n for n in onnx.load(str(twin.path)).graph.node if n.op_type in ("MatMulInteger", "Loop")]
    acc = twin.accuracy
    assert acc is not None and acc.count == 370 and acc.reference >= 0.97 and acc.drop_points <= 0.5
    assert any("accuracy on the Japanese Vowels test split (370 sequences)" in line for line in twin.lines())
    assert "Japanese Vowels test split: float32" in metadata(twin.path)["lstm.precision_accuracy"]
    assert precision.accuracy(twin.path, data) == acc.twin  # the file on disk is the one measured


def test_accuracy_gate_refuses_a_broken_twin(speaker, tmp_path, monkeypatch):
    """A twin whose head swaps two speakers: the parity gate is opened wide so that only the accuracy
    gate stands between it and the disk; it refuses, naming both accuracies."""
    real = precision.quantize_int8

    def swapped_head(src: Path, dst: Path, name: str, calibration=None) -> tuple[str, list[str]]:
        model = onnx.load(str(src))
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        for key in (gemm.input[1], gemm.input[2]):  # weight (C, K) with transB, bias (C,)
            t = next(t for t in model.graph.initializer if t.name == key)
            w = onnx.numpy_helper.to_array(t).copy()
            w[[0, 1]] = w[[1, 0]]
            t.CopyFrom(onnx.numpy_helper.from_array(w, key))
        broken = dst.with_name("broken.onnx")
        onnx.save(model, str(broken))
        try:
            return real(broken, dst, name, calibration)
        finally:
            broken.unlink()

    monkeypatch.setattr(precision, "quantize_int8", swapped_head)
    monkeypatch.setitem(precision.TOLERANCE, "int8", float("inf"))
    target = tmp_path / "speaker_id_int8" / "1" / "model.onnx"
    with pytest.raises(ExportError) as info:
        precision.make_twin(speaker, "int8", target, "speaker_id", precision.japanese_vowels_test())
    text = str(info.value)
    assert text.startswith("speaker_id_int8: accuracy on the Japanese Vowels test split (370 sequences)")
    assert "speaker_id (float32) 0.9784" in text and "refused; the file was not written" in text
    drop = float(text.split("(drop ")[1].split(" points")[0])
    assert drop > precision.MAX_ACCURACY_DROP
    assert not target.exists() and not list(target.parent.iterdir())  # no temporary file left either


# -- served: the server adds no error ------------------------------------------------------------------
@pytest.fixture(scope="module")
def twin_repo(tmp_path_factory, speaker) -> Path:
    from export.onnx_export import export_dynamic

    repo = tmp_path_factory.mktemp("twins")
    member = family.FAMILY[0]  # the family encoder: bidirectional 2 x 256, 80 inputs
    base = export_dynamic(family.build(member), family.model_path(repo, "encoder")).path
    # as `make export` writes them: ranges pinned from calibration data; and the row-by-row form beside
    precision.make_twin(base, "int8", family.model_path(repo, "encoder_int8"), "encoder",
                        calibration=pinned.standard_normal(80))  # fmt: skip
    precision.make_twin(base, "int8", family.model_path(repo, "encoder_int8_rows"), "encoder")
    sp = family.model_path(repo, "speaker_id")
    sp.parent.mkdir(parents=True)
    sp.write_bytes(speaker.read_bytes())
    precision.make_twin(sp, "int8", family.model_path(repo, "speaker_id_int8"), "speaker_id",
                        calibration=precision.japanese_vowels_calibration())  # fmt: skip
    precision.make_twin(base, "fp16", family.model_path(repo, "encoder_fp16"), "encoder")
    half = export_dynamic(family.build(family.FamilyMember("half", family.LSTMConfig(5, 6, 1, True), 4)),
                          family.model_path(repo, "half")).path  # fmt: skip
    precision.make_twin(half, "fp16", family.model_path(repo, "half_fp16"), "half", io_float16=True)
    return repo


@pytest.fixture(scope="module")
def twin_server(twin_repo):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(port=0, model_repository=twin_repo, device="cpu", log_level="WARNING", metrics_port=0, instances=2)
    )
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture()
def twin_client(twin_server):
    from server.client import LSTMClient

    with LSTMClient(f"127.0.0.1:{twin_server.port}", timeout=60) as c:
        yield c


def _requests(count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        lengths = rng.integers(1, 51, size=1 + i % 4).astype(np.int64)
        x = rng.standard_normal((len(lengths), int(lengths.max()), 80)).astype(np.float32)
        for j, n in enumerate(lengths):
            x[j, n:] = 0.0
        out.append((x, lengths))
    return out


@pytest.mark.parametrize("model", ["encoder_int8", "encoder_int8_rows"])
def test_served_int8_encoder_equals_in_process(twin_repo, twin_client, model):
    """One request at a time: the server runs each request's own padded batch, so its answer must be
    what ORT gives in-process on the same file and batch, to 1e-5 (both forms of the twin)."""
    path = family.model_path(twin_repo, model)
    local = session(path)
    for x, lengths in _requests(8, seed=5):
        want = dict(zip([o.name for o in local.get_outputs()], local.run(None, {"x": x, "lengths": lengths})))
        got = twin_client.infer_batch(model, x, lengths)
        assert set(got) == set(want) == {"y", "h_n", "c_n"}
        for name, value in want.items():
            assert got[name].shape == value.shape
            assert np.abs(got[name] - value).max() <= TOL, name


def test_served_fp16_twins_equal_in_process(twin_repo, twin_client):
    """fp16 with float32 boundaries (x FP32 in, FP32 out) and with float16 ones (FP16 both ways): the
    served answer is ORT's in-process one on the same file."""
    rng = np.random.default_rng(2)
    for model, features, dtype in (("encoder_fp16", 80, np.float32), ("half_fp16", 5, np.float16)):
        local = session(family.model_path(twin_repo, model))
        x = rng.standard_normal((3, 17, features)).astype(dtype)
        lengths = np.array([17, 4, 9], np.int64)
        want = dict(zip([o.name for o in local.get_outputs()], local.run(None, {"x": x, "lengths": lengths})))
        got = twin_client.infer_tensors(model, {"x": x, "lengths": lengths})
        for name, value in want.items():
            assert got[name].dtype == value.dtype == dtype, (model, name)
            assert np.abs(got[name].astype(np.float32) - value.astype(np.float32)).max() <= TOL, (model, name)


def test_family_int8_twins_are_batch_invariant(twin_repo):
    """The twins `make export` writes (the family encoder, 80 inputs, 2 x 256 bidirectional; the
    speaker classifier, whose head multiplies the LSTM's error; both pinned) and the encoder's
    row-by-row form: alone vs merged bit-identical."""
    assert batch_dependence(family.model_path(twin_repo, "encoder_int8"), 80) == 0.0
    assert batch_dependence(family.model_path(twin_repo, "encoder_int8_rows"), 80) == 0.0
    assert batch_dependence(family.model_path(twin_repo, "speaker_id_int8"), 12) == 0.0


@pytest.mark.parametrize("model", ["encoder_int8", "encoder_int8_rows"])
def test_served_int8_concurrent_equals_alone(twin_repo, twin_server, twin_client, model):
    """Concurrent requests, which the server merges into shared runs: each answer is bit-identical to
    ONNX Runtime in-process on that request alone (pinned ranges, or each row quantized on its own), and
    within int8's tolerance of the float model; the pinned twin clips the 10x louder request beyond its
    calibrated range, so that one request's own answer is further from float32 (no other's)."""
    import grpc

    from server.proto import grpc_service_pb2 as pb
    from server.proto import grpc_service_pb2_grpc as pb_grpc

    def runs() -> int:
        with grpc.insecure_channel(f"127.0.0.1:{twin_server.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            (ms,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats
        return ms.execution_count

    twin, base = session(family.model_path(twin_repo, model)), session(family.model_path(twin_repo, "encoder"))
    reqs = _requests(24, seed=9)
    reqs[0][0][:] *= 10.0  # a loud batch-mate for whoever shares its run
    # With two instances and eager batching, a request is merged only when both are busy as it arrives; on a
    # loaded machine one burst can go through one by one. Bursts repeat (bounded) until one was merged, and
    # every answer of every burst is checked below.
    checked: list[tuple[int, tuple[np.ndarray, np.ndarray], dict]] = []
    for _ in range(8):
        before = runs()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda r: twin_client.infer_batch(model, *r), reqs))
        checked += [(k, req, got) for k, (req, got) in enumerate(zip(reqs, results))]
        if runs() - before < len(reqs):
            break
    else:
        pytest.fail(f"no request was merged in {len(checked) // len(reqs)} bursts: the check below would prove nothing")
    for k, (x, lengths), got in checked:
        alone = twin.run(["y", "h_n", "c_n"], {"x": x, "lengths": lengths})
        want = base.run(["y", "h_n", "c_n"], {"x": x, "lengths": lengths})
        for name, mine, value in zip(("y", "h_n", "c_n"), alone, want):
            assert np.array_equal(got[name], mine), (name, float(np.abs(got[name] - mine).max()))
            if k or model == "encoder_int8_rows":
                assert np.abs(got[name] - value).max() <= precision.TOLERANCE["int8"] * max(1.0, np.abs(value).max())


def test_served_twin_metadata_says_precision(twin_client):
    meta = twin_client.metadata("encoder_int8")
    assert meta["export"]["lstm.precision"] == "int8" and meta["export"]["lstm.twin_of"] == "encoder"
    assert meta["precision"] == "int8" and twin_client.metadata("encoder")["precision"] == "fp32"
    assert [i["datatype"] for i in meta["inputs"]] == ["FP32", "INT64"]
    params = twin_client.config("encoder_int8")["parameters"]
    assert params["export.lstm.precision"]["string_value"] == "int8"
    assert params["export.lstm.twin_of"]["string_value"] == "encoder"
    assert params["precision"]["string_value"] == "int8"


def test_served_speaker_int8_accuracy(twin_client):
    """The served int8 classifier on the held-out split, 16 sequences per request: >= 0.97."""
    data = precision.japanese_vowels_test()
    right = 0
    for start in range(0, len(data.labels), 16):
        seqs = data.sequences[start : start + 16]
        results = twin_client.infer("speaker_id_int8", list(seqs), outputs=["logits"])
        right += sum(int(r["logits"].argmax() == label) for r, label in zip(results, data.labels[start:]))
    assert right / len(data.labels) >= 0.97, right


@pytest.mark.slow
def test_bench_int8_line_quick(twin_repo, tmp_path):
    """`make bench` line (i) in quick mode: float32 and int8 served by one server, the in-process pair,
    the ratio rows and the served classifier's accuracy (speed is not asserted: the benchmark says it)."""
    import os
    import subprocess
    import sys

    from bench.report import markdown  # what the docs render from the JSON

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--lines", "i", "--models", str(twin_repo), "--out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    served = [r for r in report["rows"] if r["line"] in ("i32", "i8")]
    assert {(r["line"], r["model"], r["concurrency"]) for r in served} == {
        (line, model, c) for line, model in (("i32", "encoder"), ("i8", "encoder_int8")) for c in (1, 4)
    }
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in served)
    targets = {t["key"]: t for t in report["targets"] if t["key"].startswith("int8_")}
    assert set(targets) == {"int8_served_c1", "int8_served_c4", "int8_served_bound", "int8_inprocess_b1",
                            "int8_inprocess_b4", "int8_batch_invariant", "int8_accuracy"}  # fmt: skip
    assert targets.pop("int8_batch_invariant")["value"] == 0.0 and all(t["value"] > 0 for t in targets.values())
    assert targets["int8_accuracy"]["value"] >= 0.97 and targets["int8_accuracy"]["ok"]
    md = markdown(report["info"], report["rows"], report["targets"])
    assert report["info"]["cpu"]["model_name"] and "served encoder_int8 / served encoder" in md


@pytest.mark.slow
def test_report_gains_the_precision_axis(checkpoints, tmp_path):
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints["lstm"]), "--name", "r", "--out", str(repo), "--static", "6",
                      "--report", "--precision", "int8,fp16") == 0  # fmt: skip
    report = json.loads((repo / "report" / "r" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["precision"]}
    assert list(rows) == ["dynamic fp32", "dynamic int8", "dynamic fp16", "static fp32 T=6"]
    assert rows["dynamic int8"]["bytes_weights"] < rows["dynamic fp32"]["bytes_weights"]
    assert rows["static fp32 T=6"]["nodes"] > rows["dynamic fp32"]["nodes"]
    # the int8 twin's quantized graph is the body of a Loop over the rows: counted with its subgraph
    int8_ops = json.loads(rows["dynamic int8"]["ops"])
    assert int8_ops.get("Loop") == 1 and int8_ops.get("DynamicQuantizeLSTM", 0) >= 1
    assert rows["dynamic int8"]["nodes"] > rows["dynamic fp32"]["nodes"] // 2
    assert all(r["latency_ms"] > 0 and r["load_s"] > 0 for r in rows.values())
    assert rows["dynamic int8"]["max_abs"] > 0 and rows["dynamic fp32"]["max_abs"] is None
    md = (repo / "report" / "r" / "report.md").read_text()
    assert "| r | dynamic int8 |" in md and "Precision (ONNX Runtime on 1 thread" in md


@pytest.mark.gpu
@pytest.mark.skipif(not precision.cuda_usable()[0], reason="fp16 on CUDA needs a usable GPU")
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_fp16_twin_checked_on_cuda(checkpoints, tmp_path, cell):
    repo = tmp_path / "m"
    assert run_export("--weights", str(checkpoints[cell]), "--name", "g", "--out", str(repo),
                      "--precision", "fp16") == 0  # fmt: skip
    assert metadata(family.model_path(repo, "g_fp16"))["lstm.precision_checked_on"] == "CUDAExecutionProvider"
