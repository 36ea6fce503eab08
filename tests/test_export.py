"""Export: parity of dynamic and static ONNX models with PyTorch, graph structure, metadata, CLI."""

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

from export.model import LSTMConfig, LSTMEncoder, StaticUnrolledLSTM
from export.onnx_export import OPSET, export_dynamic, export_static, read_metadata
from tests.conftest import SMALL, STATIC_T, TOL, make_encoder, ragged, reference

ROOT = Path(__file__).resolve().parents[1]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, x, lengths) -> dict[str, np.ndarray]:
    return dict(zip(["y", "h_n", "c_n"], sess.run(["y", "h_n", "c_n"], {"x": x, "lengths": lengths})))


def _assert_close(got: dict, want: dict, lengths: np.ndarray) -> None:
    for name in ("y", "h_n", "c_n"):
        assert got[name].shape == want[name].shape, name
        err = float(np.abs(got[name] - want[name]).max())
        assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL}"
    for i, n in enumerate(lengths):
        assert not got["y"][i, n:].any(), f"y[{i}] not exactly zero past length {n}"


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("batch,steps", [(1, 1), (1, 9), (3, 1), (5, 7), (8, 33), (16, 64)])
def test_dynamic_parity_ragged(repo, encoders, name, batch, steps):
    # T values and batch sizes differ from the export-time dummy (batch 3, T 5).
    sess = _session(repo / name / "1" / "model.onnx")
    rng = np.random.default_rng(batch * 1000 + steps)
    x, lengths = ragged(rng, batch, steps, SMALL[name].input_size)
    _assert_close(_run(sess, x, lengths), reference(encoders[name], x, lengths), lengths)


def test_dynamic_unsorted_and_padding_invariant(repo, encoders):
    """More padding never changes a result: the same sequences padded to T and to 3T agree."""
    sess = _session(repo / "bi" / "1" / "model.onnx")
    rng = np.random.default_rng(7)
    x, lengths = ragged(rng, 6, 10, 6)
    lengths = np.array([3, 10, 1, 7, 2, 9], np.int64)  # unsorted on purpose
    wide = np.zeros((6, 30, 6), np.float32)
    wide[:, :10] = x
    wide[:, 10:] = 99.0  # garbage in the padding must not leak into any result
    a, b = _run(sess, x, lengths), _run(sess, wide, lengths)
    assert np.abs(a["h_n"] - b["h_n"]).max() <= TOL
    assert np.abs(a["y"] - b["y"][:, :10]).max() <= TOL
    assert not b["y"][:, 10:].any()
    _assert_close(a, reference(encoders["bi"], x, lengths), lengths)


@pytest.mark.slow
def test_static_matches_dynamic_and_torch(repo, encoders):
    static = _session(repo / f"bi_static_t{STATIC_T}" / "1" / "model.onnx")
    dynamic = _session(repo / "bi" / "1" / "model.onnx")
    rng = np.random.default_rng(3)
    for batch in (1, 4, 9):
        x, lengths = ragged(rng, batch, STATIC_T, 6)
        got = _run(static, x, lengths)
        _assert_close(got, _run(dynamic, x, lengths), lengths)
        _assert_close(got, reference(encoders["bi"], x, lengths), lengths)


@pytest.mark.parametrize("steps", [3, 8, 20])
@pytest.mark.slow
def test_static_each_T_and_refuses_other_T(tmp_path, encoders, steps):
    enc = encoders["bi"]
    path = export_static(enc, steps, tmp_path / "m.onnx").path
    sess = _session(path)
    rng = np.random.default_rng(steps)
    x, lengths = ragged(rng, 3, steps, 6)
    _assert_close(_run(sess, x, lengths), reference(enc, x, lengths), lengths)
    for other in (steps - 1, steps + 1):
        if other < 1:
            continue
        bad = np.zeros((1, other, 6), np.float32)
        with pytest.raises((ort.capi.onnxruntime_pybind11_state.InvalidArgument, RuntimeError)):
            sess.run(None, {"x": bad, "lengths": np.array([1], np.int64)})


def test_static_torch_module_equals_reference(encoders):
    enc = encoders["bi"]
    rng = np.random.default_rng(11)
    x, lengths = ragged(rng, 5, 9, 6)
    with torch.no_grad():
        got = StaticUnrolledLSTM(enc, 9)(torch.from_numpy(x), torch.from_numpy(lengths))
    want = reference(enc, x, lengths)
    for g, name in zip(got, ("y", "h_n", "c_n")):
        assert np.abs(g.numpy() - want[name]).max() <= TOL


def test_tensorflow_dynamic_rnn_example(tmp_path):
    """TF's documented shape: 5 inputs, 3 units, batch 2, 4 steps, lengths [4, 1]."""
    cfg = LSTMConfig(input_size=5, hidden_size=3, num_layers=1, bidirectional=False)
    enc = make_encoder(cfg, seed=1)
    path = export_dynamic(enc, tmp_path / "tf.onnx").path
    x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32)
    lengths = np.array([4, 1], np.int64)
    out = _run(_session(path), x, lengths)
    assert out["y"].shape == (2, 4, 3)
    assert not out["y"][1, 1:].any()  # rows 1..3 of the second sequence are zero
    assert np.abs(out["h_n"][0, 0] - out["y"][0, 3]).max() == 0.0  # h_n = last valid output row
    assert np.abs(out["h_n"][0, 1] - out["y"][1, 0]).max() == 0.0
    expected = 4 * ((5 + 3) * 3 + 2 * 3)
    assert cfg.param_count() == expected == sum(p.numel() for p in enc.parameters())
    assert read_metadata(path)["lstm.param_count"] == str(expected)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dynamic_graph_structure(repo, name):
    model = onnx.load(str(repo / name / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    cfg = SMALL[name]
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert len(lstms) == cfg.num_layers
    # sequence_lens (input 4) of every LSTM comes from `lengths` through casts only
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in lstms:
        assert node.input[4], "LSTM has no sequence_lens"
        src = node.input[4]
        while src in producers:
            prod = producers[src]
            assert prod.op_type == "Cast", f"sequence_lens passes through {prod.op_type}"
            src = prod.input[0]
        assert src == "lengths"
        direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "forward")
        assert direction == ("bidirectional" if cfg.bidirectional else "forward")
    dims = {v.name: _dims(v) for v in list(model.graph.input) + list(model.graph.output)}
    d = cfg.num_directions
    assert dims == {
        "x": ["batch", "time", cfg.input_size],
        "lengths": ["batch"],
        "y": ["batch", "time", d * cfg.hidden_size],
        "h_n": [cfg.num_layers * d, "batch", cfg.hidden_size],
        "c_n": [cfg.num_layers * d, "batch", cfg.hidden_size],
    }
    assert 14 <= OPSET <= 21 and model.opset_import[0].version == OPSET
    assert model.ir_version <= 13  # what onnxruntime 1.31 loads


@pytest.mark.slow
def test_dynamic_node_count_independent_of_T_static_grows(tmp_path, encoders):
    enc = encoders["bi"]
    dyn = onnx.load(str(export_dynamic(enc, tmp_path / "d.onnx").path))
    counts = [len(onnx.load(str(export_static(enc, t, tmp_path / f"s{t}.onnx").path)).graph.node) for t in (2, 4, 8)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[2] - counts[1] == 2 * (counts[1] - counts[0])  # linear in T
    assert len(dyn.graph.node) < counts[0]
    # the dynamic file has no dimension tied to any particular T
    assert all(isinstance(d, str) for d in _dims(dyn.graph.input[0])[:2])


def test_metadata(repo, encoders):
    meta = read_metadata(repo / f"bi_static_t{STATIC_T}" / "1" / "model.onnx")
    assert json.loads(meta["lstm.config"]) == {
        "input_size": 6,
        "hidden_size": 8,
        "num_layers": 2,
        "bidirectional": True,
        "cell": "lstm",
        "bias": True,
        "nonlinearity": "tanh",
    }
    assert json.loads(meta["lstm.axes"]) == {
        "x": {"batch": 0, "time": 1},
        "lengths": {"batch": 0},
        "y": {"batch": 0, "time": 1},
        "h_n": {"batch": 1},
        "c_n": {"batch": 1},
    }
    assert meta["lstm.export_mode"] == "static" and meta["lstm.static_length"] == str(STATIC_T)
    assert meta["lstm.param_count"] == str(SMALL["bi"].param_count())
    assert meta["lstm.torch_version"] == torch.__version__ and meta["lstm.onnx_version"] == onnx.__version__
    dyn = read_metadata(repo / "bi" / "1" / "model.onnx")
    assert dyn["lstm.export_mode"] == "dynamic" and dyn["lstm.static_length"] == ""
    assert dyn["lstm.weights_sha256"] == meta["lstm.weights_sha256"]  # same weights
    other = make_encoder(SMALL["bi"], seed=1)
    from export.onnx_export import weights_sha256

    assert weights_sha256(other) != dyn["lstm.weights_sha256"]


def test_ort_loads_without_warnings(repo, capfd):
    """No shape warnings from ONNX Runtime at load or at an unseen batch/T."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 1  # show warnings
    sess = ort.InferenceSession(str(repo / "bi" / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.zeros((7, 41, 6), np.float32), "lengths": np.full((7,), 41, np.int64)})
    err = capfd.readouterr().err
    assert "W:onnxruntime" not in err and "Warning" not in err, err


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--hidden-size", "0"], "hidden_size"),
        (["--input-size", "-3"], "input_size"),
        (["--layers", "0"], "num_layers"),
        (["--static", "0"], "T must be >= 1"),
        (["--static", "x"], "not an integer"),
        (["--bogus", "1"], "--bogus"),
        (["--model-version", "0"], "model-version"),
    ],
)
@pytest.mark.slow
def test_cli_bad_config(tmp_path, args, needle):
    out = tmp_path / "out"
    res = _cli("--name", "m", "--out", str(out), *args, cwd=tmp_path)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.slow
def test_cli_exports_one_model(tmp_path):
    res = _cli(
        "--name",
        "m",
        "--out",
        str(tmp_path),
        "--input-size",
        "4",
        "--hidden-size",
        "3",
        "--layers",
        "1",
        "--unidirectional",
        "--static",
        "3",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "1" / "model.onnx").is_file()
    assert (tmp_path / "m_static_t3" / "1" / "model.onnx").is_file()
    assert not list(tmp_path.rglob("*.part"))


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import export.onnx_export as ox

    def boom(*a, **k):
        Path(a[2]).write_bytes(b"half a file")
        raise RuntimeError("simulated failure mid-export")

    monkeypatch.setattr(ox, "_export", boom)
    with pytest.raises(RuntimeError):
        ox.export_dynamic(make_encoder(SMALL["uni"]), tmp_path / "m" / "1" / "model.onnx")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_bad_config_values():
    for kwargs in ({"input_size": 0}, {"hidden_size": -1}, {"num_layers": 1.5}, {"bidirectional": "yes"}):
        with pytest.raises(ValueError):
            LSTMConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown"):
        LSTMConfig.from_json('{"input_size": 3, "dropout": 0.1}')
    with pytest.raises(ValueError, match="T"):
        StaticUnrolledLSTM(LSTMEncoder(LSTMConfig(2, 2, 1, False)), 0)


# -- the exporter stands alone -------------------------------------------------------------------
def _local_imports(path: Path) -> set[str]:
    """Modules of export/ and contract/ (and anything from server) that `path` imports, at any depth
    (imports inside functions count)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from export import family` imports export.family; `from export.x import f` imports export.x
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("export", "contract", "server")}
    return found


def _package_modules(package: str) -> dict[str, Path]:
    return {
        package if p.stem == "__init__" else f"{package}.{p.stem}": p for p in sorted((ROOT / package).glob("*.py"))
    }


@pytest.mark.slow  # a fresh interpreter importing torch: ~3 s
def test_exporter_imports_no_server_code_and_no_grpc():
    """The offline exporter installs and runs without grpc or the stubs: no export/ module imports server/
    (at any depth), and importing every one of them, in a fresh interpreter, loads no grpc."""
    modules = {**_package_modules("export"), **_package_modules("contract")}
    for name, path in modules.items():
        reaches = sorted(m for m in _local_imports(path) if m.split(".")[0] == "server")
        assert not reaches, f"{path.relative_to(ROOT)} imports {reaches}: export/ and contract/ stand alone"
        if name.startswith("contract"):
            assert not {m for m in _local_imports(path) if m.startswith("export")}, f"{name} imports export"
    code = (
        "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'server')))"
    )
    res = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout


def test_no_import_cycle_among_export_and_contract_modules():
    modules = {**_package_modules("export"), **_package_modules("contract")}
    graph = {name: {m for m in _local_imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert graph["export.user"] >= {"export.onnx_export", "export.verify"}  # the walk sees real imports

    def cycle_from(start: str, stack: list[str]) -> list[str] | None:
        for nxt in sorted(graph[start]):
            if nxt in stack:
                return [*stack[stack.index(nxt) :], nxt]
            found = cycle_from(nxt, [*stack, nxt])
            if found:
                return found
        return None

    for name in modules:
        cycle = cycle_from(name, [name])
        assert cycle is None, " -> ".join(cycle)


def test_contract_cuda_probe_answers_as_both_sides_did():
    """contract.cuda is the one CUDA probe (the server's --device and the exporter's fp16 twins both ask
    it): its model is the one-node Add built here with onnx.helper, and its answer says why not."""
    from contract.cuda import cuda_usable, probe_model_bytes
    from export.precision import cuda_usable as exporter_cuda_usable
    from server import runtime

    a = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])
    b = onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["a", "a"], ["b"])], "probe", [a], [b])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert probe_model_bytes() == model.SerializeToString()
    ok, why = cuda_usable()
    assert exporter_cuda_usable is cuda_usable and runtime.cuda_usable is cuda_usable
    assert (why == "") if ok else ("CUDA" in why or "GPU" in why), why
    if ok:  # a device id that cannot exist is refused, by name
        ok_far, why_far = cuda_usable(device_id=4096)
        assert not ok_far and "4096" in why_far, why_far
