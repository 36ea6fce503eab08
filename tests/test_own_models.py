"""Bring your own model: a user's trained nn.LSTM / nn.GRU / nn.RNN (a bare layer's state dict, a
bigger model's state dict with a prefix, or their own module around one) exported with
`python -m export` and served, compared with the user's own layer run eagerly with
pack_padded_sequence. Tolerance: 1e-5 (float32 through two implementations; observed ~1e-7)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tests.conftest import TOL, run_export

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FEATURES, HIDDEN = 5, 6
LAYER = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

# (cell, bidirectional, layers, bias, batch_first, nonlinearity, prefix): every cell uni and bi,
# 1-3 layers, with and without bias, time-major and batch-major, bare and under a prefix.
CASES = [
    ("lstm", False, 1, True, True, "tanh", ""),
    ("lstm", True, 2, False, False, "tanh", "encoder.rnn"),
    ("lstm", True, 3, True, True, "tanh", ""),
    ("gru", False, 1, True, False, "tanh", ""),
    ("gru", True, 2, False, True, "tanh", ""),
    ("gru", False, 3, False, True, "tanh", "encoder.rnn"),
    ("gru", True, 3, True, False, "tanh", ""),
    ("rnn", False, 1, True, True, "relu", ""),
    ("rnn", True, 2, False, False, "tanh", "encoder.rnn"),
    ("rnn", True, 3, True, True, "relu", ""),
    ("rnn", False, 2, False, True, "tanh", ""),
]


def case_name(case) -> str:
    cell, bi, layers, bias, batch_first, nl, prefix = case
    return f"{cell}_{'bi' if bi else 'uni'}_l{layers}_{'bias' if bias else 'nobias'}_{nl}{'_pre' if prefix else ''}"


def make_layer(case, seed: int) -> nn.RNNBase:
    cell, bi, layers, bias, batch_first, nl, _ = case
    torch.manual_seed(seed)
    kwargs = {"nonlinearity": nl} if cell == "rnn" else {}
    return LAYER[cell](FEATURES, HIDDEN, layers, bias=bias, batch_first=batch_first, bidirectional=bi, **kwargs).eval()


def save_checkpoint(layer: nn.RNNBase, prefix: str, path: Path) -> None:
    if not prefix:
        torch.save(layer.state_dict(), path)
        return
    # a bigger model: an embedding and a head around the layer, which sits at `prefix`
    model = nn.Module()
    model.embed = nn.Linear(3, FEATURES)
    model.encoder = nn.Module()
    model.encoder.rnn = layer
    model.head = nn.Linear(HIDDEN, 2)
    torch.save(model.state_dict(), path)


def eager(layer: nn.RNNBase, x: np.ndarray, lengths: np.ndarray, h0=None) -> dict[str, np.ndarray]:
    """The user's own layer, packed: y (B, T, D*H), h_n (and c_n) (L*D, B, H)."""
    xt = torch.from_numpy(x)
    inp = xt if layer.batch_first else xt.transpose(0, 1)
    packed = pack_padded_sequence(inp, torch.from_numpy(lengths), batch_first=layer.batch_first, enforce_sorted=False)
    with torch.no_grad():
        out, state = layer(packed, h0)
        y, _ = pad_packed_sequence(out, batch_first=layer.batch_first, total_length=x.shape[1])
    y = y if layer.batch_first else y.transpose(0, 1)
    if isinstance(layer, nn.LSTM):
        return {"y": y.numpy(), "h_n": state[0].numpy(), "c_n": state[1].numpy()}
    return {"y": y.numpy(), "h_n": state.numpy()}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Every case exported from its checkpoint (+ streaming, static and module exports) into one repository."""
    root = tmp_path_factory.mktemp("own")
    repo = root / "models"
    layers = {}
    for i, case in enumerate(CASES):
        name = case_name(case)
        layers[name] = make_layer(case, seed=i)
        ckpt = root / f"{name}.pt"
        save_checkpoint(layers[name], case[6], ckpt)
        args = ["--weights", str(ckpt), "--name", name, "--out", str(repo)]
        if case[6]:
            args += ["--prefix", case[6]]
        if case[0] == "rnn":
            args += ["--nonlinearity", case[5]]
        assert run_export(*args) == 0, name
    for cell in ("gru", "rnn", "lstm"):  # stateful streaming: one state (GRU, RNN) or two (LSTM)
        case = (cell, False, 2, True, True, "tanh", "")
        layers[f"{cell}_state"] = make_layer(case, seed=40)
        torch.save(layers[f"{cell}_state"].state_dict(), root / f"{cell}_state.pt")
        assert run_export("--weights", str(root / f"{cell}_state.pt"), "--name", f"{cell}_state", "--out", str(repo),
                          "--initial-state") == 0  # fmt: skip
    for name in ("gru_bi_l2_nobias_tanh", "rnn_bi_l3_bias_relu"):  # static twins of two cases
        case = next(c for c in CASES if case_name(c) == name)
        args = ["--weights", str(root / f"{name}.pt"), "--name", name, "--out", str(root / "static"), "--static", "7"]
        assert run_export(*args, *(["--nonlinearity", case[5]] if case[0] == "rnn" else [])) == 0
        (repo / f"{name}_static_t7").mkdir()
        (root / "static" / f"{name}_static_t7" / "1").rename(repo / f"{name}_static_t7" / "1")
    assert run_export("--module", "tests.own_modules:gru_classifier", "--name", "tagger", "--out", str(repo),
                      "--feature-size", "6", "--output-names", "logits,tags", "--static", "8") == 0  # fmt: skip
    assert run_export("--module", "tests.own_modules:relu_last_state", "--name", "last", "--out", str(repo),
                      "--feature-size", "6") == 0  # fmt: skip
    return repo, layers


@pytest.fixture(scope="module")
def own_server(own):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(
            port=0, http_port=0, model_repository=own[0], device="cpu", log_level="WARNING", instances=2, metrics_port=0
        )
    )
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture()
def own_client(own_server):
    from server.client import LSTMClient

    with LSTMClient(f"127.0.0.1:{own_server.port}") as c:
        yield c


def _ragged(seed: int, features: int = FEATURES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, features)).astype(np.float32) for n in (4, 11, 1, 7)]


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_graph_has_one_native_node_per_layer(own, case):
    model = onnx.load(str(own[0] / case_name(case) / "1" / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert [n.op_type for n in nodes] == [case[0].upper()] * case[2]
    assert all(len(n.input) > 4 and n.input[4] for n in nodes)  # sequence_lens wired
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    if case[0] == "gru":  # PyTorch applies the reset gate after the hidden matmul
        assert all(a["linear_before_reset"] == 1 for a in attrs)
    if case[0] == "rnn":
        assert all(a["activations"][0] == case[5].capitalize().encode() for a in attrs)
    outputs = [o.name for o in model.graph.output]
    assert outputs == (["y", "h_n", "c_n"] if case[0] == "lstm" else ["y", "h_n"])
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert dims["y"] == ["batch", "time", HIDDEN * (2 if case[1] else 1)]
    assert dims["h_n"] == [case[2] * (2 if case[1] else 1), "batch", HIDDEN]


@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_served_equals_users_layer(own, own_client, case):
    name = case_name(case)
    seqs = _ragged(len(name))
    results = own_client.infer(name, seqs)
    from server.client import pad_sequences

    x, lengths = pad_sequences(seqs)
    want = eager(own[1][name], x, lengths)
    assert set(results[0]) == set(want)
    for i, n in enumerate(lengths):
        assert results[i]["y"].shape == (n, HIDDEN * (2 if case[1] else 1))
        assert np.abs(results[i]["y"] - want["y"][i, :n]).max() <= TOL
        for state in set(want) - {"y"}:
            assert np.abs(results[i][state] - want[state][:, i]).max() <= TOL, state


def test_concurrent_ragged_requests_are_batched_exactly(own, own_client):
    """GRU outputs (no c_n) split correctly when requests of different T share one run."""
    import concurrent.futures

    name = "gru_bi_l3_bias_tanh"
    layer = own[1][name]
    seqs = [np.random.default_rng(i).standard_normal((1 + 3 * i, FEATURES)).astype(np.float32) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda s: own_client.infer(name, [s])[0], seqs))
    for seq, got in zip(seqs, results):
        want = eager(layer, seq[None], np.array([len(seq)], np.int64))
        assert np.abs(got["y"] - want["y"][0]).max() <= TOL
        assert np.abs(got["h_n"] - want["h_n"][:, 0]).max() <= TOL


@pytest.mark.parametrize("cell", ["gru", "rnn", "lstm"])
def test_stateful_stream_equals_whole_sequence(own, own_client, cell):
    layer = own[1][f"{cell}_state"]
    seq = np.random.default_rng(3).standard_normal((17, FEATURES)).astype(np.float32)
    want = eager(layer, seq[None], np.array([17], np.int64))
    ys = []
    with own_client.sequence(f"{cell}_state") as stream:
        for chunk in (seq[:5], seq[5:6], seq[6:]):
            out = stream.send(chunk)
            ys.append(out["y"])
        final = stream.close()
    assert np.abs(np.concatenate(ys) - want["y"][0]).max() <= TOL
    assert set(final) == ({"h_n", "c_n"} if cell == "lstm" else {"h_n"})
    for state in final:
        assert np.abs(final[state] - want[state][:, 0]).max() <= TOL


def test_gru_initial_state_input(own, own_client):
    layer = own[1]["gru_state"]
    seqs = _ragged(8)
    from server.client import pad_sequences

    x, lengths = pad_sequences(seqs)
    h0 = np.random.default_rng(1).standard_normal((2, len(seqs), HIDDEN)).astype(np.float32)
    req = own_client.request("gru_state", x, lengths)
    from server.codec import decode_outputs, encode_input

    encode_input(req, "h0", h0)
    out = decode_outputs(own_client.stub.ModelInfer(req, timeout=30))
    want = eager(layer, x, lengths, torch.from_numpy(h0))
    for name in ("y", "h_n"):
        assert np.abs(out[name] - want[name]).max() <= TOL
    bad = own_client.request("gru_state", x, lengths)
    encode_input(bad, "c0", h0)
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        own_client.stub.ModelInfer(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'c0'" in err.value.details()


@pytest.mark.parametrize("name", ["gru_bi_l2_nobias_tanh", "rnn_bi_l3_bias_relu"])
def test_static_twin_served_equals_users_layer(own, own_client, name):
    seqs = _ragged(5)[:3]  # lengths 4, 11 (too long for T=7: refused), 1
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        own_client.infer(f"{name}_static_t7", seqs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 7" in err.value.details()
    seqs = [seqs[0], seqs[2], seqs[1][:7]]
    from server.client import pad_sequences

    results = own_client.infer(f"{name}_static_t7", seqs)
    x, lengths = pad_sequences(seqs)
    want = eager(own[1][name], x, lengths)
    for i, n in enumerate(lengths):
        assert np.abs(results[i]["y"] - want["y"][i, :n]).max() <= TOL
        assert np.abs(results[i]["h_n"] - want["h_n"][:, i]).max() <= TOL


def test_user_module_served_with_its_own_output_names(own, own_client):
    from tests.own_modules import gru_classifier, relu_last_state

    meta = own_client.metadata("tagger")
    assert [o["name"] for o in meta["outputs"]] == ["logits", "tags"]
    assert meta["axes"]["tags"] == {"batch": 0, "time": 1} and meta["axes"]["logits"] == {"batch": 0}
    model = gru_classifier().eval()
    seqs = _ragged(11, features=6)
    for name in ("tagger", "tagger_static_t8"):
        use = seqs if name == "tagger" else [s[:8] for s in seqs]
        results = own_client.infer(name, use)
        for seq, got in zip(use, results):
            with torch.no_grad():
                logits, tags = model(torch.from_numpy(seq[None]), torch.tensor([len(seq)]))
            assert got["tags"].shape == (len(seq), 4) and got["logits"].shape == (3,)
            assert np.abs(got["logits"] - logits[0].numpy()).max() <= TOL
            assert np.abs(got["tags"] - tags[0].numpy()).max() <= TOL
    model = relu_last_state().eval()
    results = own_client.infer("last", seqs)
    for seq, got in zip(seqs, results):
        with torch.no_grad():
            want = model(torch.from_numpy(seq[None]), torch.tensor([len(seq)]))[0].numpy()
        assert got["output_0"].shape == (5,) and np.abs(got["output_0"] - want).max() <= TOL


def test_tritonclient_serves_own_models(own, own_server, tmp_path):
    """A client nobody here wrote (tritonclient, own venv) gets the same numbers for every case."""
    from tests.test_tritonclient import TRITON_PYTHON

    if not Path(TRITON_PYTHON).exists():
        pytest.fail(f"tritonclient venv missing at {TRITON_PYTHON}: run `make triton-venv` (make test does)")
    from server.client import pad_sequences

    names = [case_name(c) for c in CASES] + ["tagger"]
    feeds = {}
    for name in names:
        x, lengths = pad_sequences(_ragged(len(name), features=6 if name == "tagger" else FEATURES))
        feeds[f"{name}::x"], feeds[f"{name}::lengths"] = x, lengths
    np.savez(tmp_path / "in.npz", **feeds)
    res = subprocess.run(
        [TRITON_PYTHON, str(HERE / "tritonclient_models_check.py"), f"127.0.0.1:{own_server.port}",
         str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), *names],
        capture_output=True, text=True, timeout=180, env={"PATH": os.environ.get("PATH", "")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "out.npz")
    for case in CASES:
        name = case_name(case)
        want = eager(own[1][name], feeds[f"{name}::x"], feeds[f"{name}::lengths"])
        for out, value in want.items():
            assert np.abs(got[f"{name}::{out}"] - value).max() <= TOL, (name, out)
    from tests.own_modules import gru_classifier

    with torch.no_grad():
        logits, tags = gru_classifier().eval()(
            torch.from_numpy(feeds["tagger::x"]), torch.from_numpy(feeds["tagger::lengths"])
        )
    assert np.abs(got["tagger::logits"] - logits.numpy()).max() <= TOL
    assert np.abs(got["tagger::tags"] - tags.numpy()).max() <= TOL


# -- refused exports: exit code 2, one line, nothing written -----------------------------------
def _bad_files(root: Path) -> dict[str, Path]:
    files = {"junk": root / "junk.pt", "empty": root / "empty.pt", "norec": root / "norec.pt", "two": root / "two.pt",
             "proj": root / "proj.pt", "shapes": root / "shapes.pt", "list": root / "list.pt"}  # fmt: skip
    files["junk"].write_text("not a checkpoint")
    torch.save({}, files["empty"])
    torch.save({"linear.weight": torch.zeros(2, 3), "linear.bias": torch.zeros(2)}, files["norec"])
    two = nn.Module()
    two.enc = nn.GRU(4, 3)
    two.dec = nn.LSTM(3, 3)
    torch.save(two.state_dict(), files["two"])
    torch.save(nn.LSTM(4, 8, proj_size=2).state_dict(), files["proj"])
    state = nn.GRU(4, 3, num_layers=2).state_dict()
    state["weight_hh_l1"] = torch.zeros(9, 4)  # not (3H, H)
    torch.save(state, files["shapes"])
    torch.save([torch.zeros(3)], files["list"])
    for key, value in (("nan", float("nan")), ("inf", float("-inf"))):
        state = {k: v.clone() for k, v in nn.GRU(4, 3).state_dict().items()}
        state["weight_hh_l0"][2, 1] = value  # a diverged run: every output would be NaN
        torch.save(state, root / f"{key}.pt")
        files[key] = root / f"{key}.pt"
    state = {k: v.double() for k, v in nn.GRU(4, 3).state_dict().items()}
    state["bias_ih_l0"][4] = 1e300  # finite as float64, inf as the float32 the file holds
    torch.save(state, root / "f64big.pt")
    files["f64big"] = root / "f64big.pt"
    return files


BAD = [
    (["--weights", "{junk}"], "not a PyTorch checkpoint"),
    (["--weights", "{list}"], "not a state dict of tensors"),
    (["--weights", "{empty}"], "not a state dict of tensors"),
    (["--weights", "{norec}"], "no nn.LSTM, nn.GRU or nn.RNN weights in the state dict (keys: linear.weight, linear.bias)"),  # noqa: E501
    (["--weights", "{two}"], "2 recurrent layers in the state dict ('dec', 'enc'): choose one with --prefix"),
    (["--weights", "{two}", "--prefix", "nope"], "--prefix 'nope': no recurrent layer there; layers found under: 'enc', 'dec'"),  # noqa: E501
    (["--weights", "{proj}"], "LSTM with proj_size has no ONNX LSTM equivalent"),
    (["--weights", "{shapes}"], "weight_hh_l1 has shape [9, 4]"),
    (["--weights", "{root}/missing.pt"], "no such file"),
    (["--module", "no_such_package.mod:factory", "--feature-size", "6"], "cannot import 'no_such_package.mod'"),
    (["--module", "tests.own_modules", "--feature-size", "6"], "expected package.module:factory"),
    (["--module", "tests.own_modules:missing", "--feature-size", "6"], "has no callable 'missing'"),
    (["--module", "tests.own_modules:not_a_module", "--feature-size", "6"], "returned a str, expected an nn.Module"),
    (["--module", "tests.own_modules:wrong_signature", "--feature-size", "6"], "expected forward(x, lengths)"),
    (["--module", "tests.own_modules:gru_classifier"], "--module needs --feature-size"),
    (["--module", "tests.own_modules:gru_classifier", "--feature-size", "5"], "failed (RuntimeError"),
    (["--module", "tests.own_modules:projected", "--feature-size", "6"], "LSTM with proj_size has no ONNX LSTM equivalent"),  # noqa: E501
    (["--module", "tests.own_modules:unpacked", "--feature-size", "6"], "have no sequence_lens input"),
    (["--module", "tests.own_modules:no_total_length", "--feature-size", "6"], "total_length=x.shape[1]"),
    (["--module", "tests.own_modules:gru_classifier", "--weights", "{norec}", "--feature-size", "6"], "does not fit gru_classifier()"),  # noqa: E501
    (["--module", "tests.own_modules:gru_classifier", "--feature-size", "6", "--output-names", "a"], "returns 2 output(s)"),  # noqa: E501
    (["--weights", "{nan}"], "weight_hh_l0 holds 1 non-finite value(s) as float32, first [2, 1] = nan"),
    (["--weights", "{inf}"], "weight_hh_l0 holds 1 non-finite value(s) as float32, first [2, 1] = -inf"),
    (["--weights", "{f64big}"], "bias_ih_l0 holds 1 non-finite value(s) as float32, first [4] = 1e+300 (beyond float32)"),  # noqa: E501
    (["--weights", "{two}", "--prefix", "enc", "--model-version", "1000000000000000000"], "--model-version must be 1..999999999999999999"),  # noqa: E501
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, _bad_files(root)


@pytest.mark.parametrize("args,message", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_exit_2_one_line_nothing_written(bad_files, tmp_path, capsys, args, message):
    root, files = bad_files
    out = tmp_path / "repo"
    fmt = {**{k: str(v) for k, v in files.items()}, "root": str(root)}
    rc = run_export(*[a.format(**fmt) for a in args], "--name", "m", "--out", str(out), "--static", "4")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


@pytest.mark.slow
def test_bad_input_real_process(bad_files, tmp_path):
    """The same through a real `python -m export` process: exit status 2 and one stderr line."""
    res = subprocess.run(
        [sys.executable, "-m", "export", "--weights", str(bad_files[1]["two"]), "--name", "m", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: 2 recurrent layers")
    assert not any(tmp_path.rglob("*"))


class _RunsCodeOnLoad:
    """What a malicious checkpoint pickles: unpickling it would call os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["in_state_dict", "whole_file", "module"])
def test_checkpoint_that_runs_code_is_refused_unrun(tmp_path, capsys, payload):
    """A pickle that would run code on load (or a whole pickled module) is refused in one line
    without being run: torch.load(weights_only=True) refuses it before it builds anything."""
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.pt"
    if payload == "in_state_dict":
        torch.save({"weight_ih_l0": _RunsCodeOnLoad(marker), "weight_hh_l0": torch.zeros(3, 3)}, ckpt)
    elif payload == "whole_file":
        import pickle

        ckpt.write_bytes(pickle.dumps(_RunsCodeOnLoad(marker), protocol=4))
    else:
        torch.save(nn.GRU(4, 3), ckpt)  # torch.save(model) instead of model.state_dict()
    rc = run_export("--weights", str(ckpt), "--name", "m", "--out", str(tmp_path / "repo"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not marker.exists()
    refused = (
        f"error: --weights {ckpt}: holds a pickled Python object ({{}}), not only tensors; refused without loading "
        "it (unpickling could run code). Expected torch.save(layer.state_dict())"
    )
    expected = {
        "in_state_dict": refused.format("posix.system"),
        "module": refused.format("torch.nn.modules.rnn.GRU"),
        "whole_file": f"error: --weights {ckpt}: not a PyTorch checkpoint of tensors (torch.load failed: "
        "UnpicklingError: Unsupported operand 149); expected the file torch.save(layer.state_dict()) writes",
    }
    assert err.splitlines() == [expected[payload]], err
    assert not (tmp_path / "repo").exists()


class _NaNWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(6, 4, batch_first=True)
        with torch.no_grad():
            self.rnn.bias_hh_l0[3] = float("nan")

    def forward(self, x, lengths):
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class _Float64Output(_NaNWeights):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.rnn = nn.GRU(6, 4, batch_first=True)

    def forward(self, x, lengths):
        return super().forward(x, lengths).double()


def test_module_with_nan_weights_or_float64_output_refused(tmp_path):
    """NaN weights would pass the parity check (NaN on both sides); a float64 output has no place in
    the server's float32 responses. Both are refused by name before anything is written."""
    from export.user import export_module
    from export.verify import ExportError

    path = tmp_path / "m" / "1" / "model.onnx"
    nan = r"^_NaNWeights: rnn.bias_hh_l0 holds 1 non-finite value\(s\) as float32, first \[3\] = nan"
    with pytest.raises(ExportError, match=nan):
        export_module(_NaNWeights().eval(), path, 6)
    with pytest.raises(
        ExportError, match=r"^output 'output_0' is torch.float64; the export's parity gate compares float32 outputs"
    ):
        export_module(_Float64Output().eval(), path, 6)
    assert not any(tmp_path.rglob("*.onnx"))


def test_report_needs_static_lengths(tmp_path, capsys):
    """--report compares static with dynamic: without --static it is refused before anything is
    exported (it used to export, then fail in the measuring process with a traceback and remove the file)."""
    rc = run_export("--module", "tests.own_modules:relu_last_state", "--feature-size", "6", "--name", "last",
                    "--out", str(tmp_path), "--report")  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == "error: --report compares static and dynamic files: give --static T (e.g. --static 20,50)"
    assert not any(tmp_path.rglob("*"))


@pytest.mark.slow
def test_cli_output_is_ours_and_files_are_readable(tmp_path):
    """A real `python -m export` of a module that uses only the final state (the export retries past
    a torch exporter failure): stdout and stderr hold our lines only (no C++ shape-inference warnings,
    no TorchScript graph dump), and the file is readable by others (umask 022: 0644, not mkstemp's 0600)."""
    res = subprocess.run(
        [sys.executable, "-m", "export", "--module", "tests.own_modules:relu_last_state", "--feature-size", "6",
         "--name", "last", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=180, preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("last: dynamic -> ") and "parity vs eager PyTorch" in lines[1]
    assert (tmp_path / "last" / "1" / "model.onnx").stat().st_mode & 0o777 == 0o644


def test_static_length_bounded(tmp_path, capsys):
    """--static 100000 ran for minutes growing past 2.6 GB; T above 1000 is refused at once (CLI and API)."""
    from export.user import export_module
    from export.verify import ExportError
    from tests.own_modules import relu_last_state

    rc = run_export("--weights", str(tmp_path / "none.pt"), "--name", "m", "--out", str(tmp_path), "--static", "100000")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: argument --static: static length T must be <= 1000, got 100000 ("), err
    with pytest.raises(ExportError, match=r"static length T must be an integer 1\.\.1000, got 1001"):
        export_module(relu_last_state(), tmp_path / "m" / "1" / "model.onnx", 6, static=(1001,))
    assert not any(tmp_path.rglob("*.onnx"))


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
@pytest.mark.slow
def test_signal_mid_export_leaves_nothing(tmp_path, signame, code):
    """SIGTERM (timeout, a cancelled job) or Ctrl-C while a static twin is being written: the export
    exits 143 / 130 and removes what it wrote, the dynamic file already in place included (it used to
    stay, with the static one's temporary file beside it; Ctrl-C printed a traceback)."""
    import signal
    import time

    ckpt = tmp_path / "gru.pt"
    torch.save(nn.GRU(4, 3).state_dict(), ckpt)
    repo = tmp_path / "repo"
    # As in a terminal, Ctrl-C raises KeyboardInterrupt even where this test itself inherited SIGINT
    # ignored (a shell starts background jobs so, and Python then never installs its handler).
    argv = ["export", "--weights", str(ckpt), "--name", "g", "--out", str(repo), "--static", "1000"]
    run_cli = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"sys.argv = {argv!r}; runpy.run_module('export', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", run_cli], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list((repo / "g_static_t1000").rglob("*.part")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    assert (repo / "g" / "1" / "model.onnx").is_file()  # the dynamic file was written first
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    if signame == "SIGINT":
        assert err.strip().splitlines()[-1] == "error: interrupted; the files of this export were removed", err
        assert "Traceback" not in err, err
    assert not repo.exists() or not any(repo.rglob("*")), sorted(repo.rglob("*"))


def test_parity_gate_refuses_a_file_that_differs(tmp_path, monkeypatch):
    """The check can fail: a file that disagrees with eager PyTorch by more than 1e-5 is not written."""
    from export import verify
    from export.model import RecurrentConfig, RecurrentEncoder
    from export.onnx_export import ExportError, export_dynamic

    encoder = RecurrentEncoder(RecurrentConfig(4, 3, 1, False, "gru")).eval()
    real = verify.check_parity

    def off_by_a_bit(path, reference, *args, **kwargs):
        return real(path, lambda **feeds: {k: v + 2e-5 for k, v in reference(**feeds).items()}, *args, **kwargs)

    monkeypatch.setattr("export.onnx_export.check_parity", off_by_a_bit)
    with pytest.raises(ExportError, match=r"differs from eager PyTorch by 2(\.\d+)?e-05 \(tolerance 1e-05\)"):
        export_dynamic(encoder, tmp_path / "g" / "1" / "model.onnx")
    assert not (tmp_path / "g" / "1" / "model.onnx").exists()


def test_state_dict_config_read_from_names_and_shapes():
    from export.user import config_from_state_dict

    layer = nn.GRU(7, 5, num_layers=3, bidirectional=True, bias=False)
    config, own = config_from_state_dict({f"a.b.{k}": v for k, v in layer.state_dict().items()}, nonlinearity="tanh")
    assert (config.cell, config.input_size, config.hidden_size, config.num_layers) == ("gru", 7, 5, 3)
    assert config.bidirectional and not config.bias
    assert set(own) == set(layer.state_dict())
    meta = json.loads(config.to_json())
    assert meta["cell"] == "gru"


@contextlib.contextmanager
def _serving(root: Path, name: str, model: onnx.ModelProto):
    """A server on a repository holding `model` alone, as <root>/<name>/1/model.onnx."""
    from server.app import InferenceServer
    from server.config import Settings

    (root / name / "1").mkdir(parents=True)
    onnx.save(model, str(root / name / "1" / "model.onnx"))
    srv = InferenceServer(Settings(port=0, model_repository=root, device="cpu", log_level="WARNING", metrics_port=0))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace=1)


def test_file_without_named_axes_served_unbatched(own, tmp_path):
    """A file that names no axis: batch is taken as axis 0 of every tensor and nothing is merged."""
    from server.client import LSTMClient
    from tests.own_modules import gru_classifier

    model = onnx.load(str(own[0] / "tagger" / "1" / "model.onnx"))
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.Clear()  # unknown, unnamed
    kept = [p for p in model.metadata_props if p.key != "lstm.axes"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    with _serving(tmp_path, "anon", model) as srv:
        rt = srv.repository.get("anon", "")
        assert not rt.batchable and [o.batch_axis for o in rt.outputs] == [0, 0]
        seqs = _ragged(2, features=6)
        with LSTMClient(f"127.0.0.1:{srv.port}") as client:
            assert client.metadata("anon")["axes"]["logits"] == {"batch": 0}
            results = client.infer("anon", seqs)
        ref = gru_classifier().eval()
        for seq, got in zip(seqs, results):
            with torch.no_grad():
                logits, _ = ref(torch.from_numpy(seq[None]), torch.tensor([len(seq)]))
            assert got["logits"].shape == (3,) and np.abs(got["logits"] - logits[0].numpy()).max() <= TOL


@pytest.mark.slow
def test_report_for_a_user_module(tmp_path):
    """--report measures static vs dynamic for the user's own model, as for the built-in family."""
    rc = run_export("--module", "tests.own_modules:relu_last_state", "--feature-size", "6", "--name", "last",
                    "--out", str(tmp_path), "--static", "3", "--report")  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "report" / "last" / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"dynamic", "static T=3"}
    assert rows["static T=3"]["nodes"] > rows["dynamic"]["nodes"] and rows["dynamic"]["load_s"] > 0
    assert (tmp_path / "report" / "last" / "report.png").stat().st_size > 0


def test_rest_json_serves_gru_and_user_module(own, own_server):
    """The REST frontend reads names and axes from the file too: a GRU (no c_n) and a user module."""
    import urllib.request

    from server.client import pad_sequences

    def infer(model: str, x: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        body = {"inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "lengths", "shape": list(lengths.shape), "datatype": "INT64", "data": lengths.tolist()},
        ]}  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{own_server.http_port}/v2/models/{model}/infer",
                                     data=json.dumps(body).encode(), method="POST")  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            reply = json.loads(resp.read())
        return {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in reply["outputs"]}

    name = "gru_bi_l2_nobias_tanh"
    x, lengths = pad_sequences(_ragged(21))
    got = infer(name, x, lengths)
    want = eager(own[1][name], x, lengths)
    assert set(got) == {"y", "h_n"}
    for out in want:
        assert np.abs(got[out] - want[out]).max() <= TOL, out
    from tests.own_modules import gru_classifier

    x, lengths = pad_sequences(_ragged(22, features=6))
    got = infer("tagger", x, lengths)
    with torch.no_grad():
        logits, tags = gru_classifier().eval()(torch.from_numpy(x), torch.from_numpy(lengths))
    assert np.abs(got["logits"] - logits.numpy()).max() <= TOL and np.abs(got["tags"] - tags.numpy()).max() <= TOL


def test_outputs_of_other_datatypes_are_served(tmp_path):
    """A file from elsewhere with FP64 and INT64 outputs: served over gRPC in its own datatypes."""
    from onnx import TensorProto, helper

    from server.client import LSTMClient

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 3])
    lengths = helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])
    y64 = helper.make_tensor_value_info("y64", TensorProto.DOUBLE, ["batch", "time", 3])
    twice = helper.make_tensor_value_info("twice", TensorProto.INT64, ["batch"])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y64"], to=TensorProto.DOUBLE), helper.make_node("Add", ["lengths", "lengths"], ["twice"])],  # noqa: E501
        "dtypes", [x, lengths], [y64, twice],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with _serving(tmp_path, "dtypes", model) as srv:
        seqs = _ragged(4, features=3)
        with LSTMClient(f"127.0.0.1:{srv.port}") as client:
            results = client.infer("dtypes", seqs)
        for seq, got in zip(seqs, results):
            assert got["y64"].dtype == np.float64 and np.array_equal(got["y64"], seq.astype(np.float64))
            assert got["twice"].dtype == np.int64 and int(got["twice"]) == 2 * len(seq)


class _FailsInExport(nn.Module):
    """Eager PyTorch runs it; torch.onnx.export fails inside it with an IndexError, the shape newer torch's
    TorchScript exporter gives its std::out_of_range (older ones: RuntimeError)."""

    def __init__(self, error: type[Exception]) -> None:
        super().__init__()
        self.error = error
        torch.manual_seed(4)
        self.rnn = nn.GRU(6, 3, batch_first=True)

    def forward(self, x, lengths):
        _, h = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        if torch.onnx.is_in_onnx_export():
            raise self.error("vector::_M_range_check: __n (which is 1) >= this->size() (which is 1)")
        return h[-1]  # (B, 3)


def index_error_module() -> nn.Module:
    return _FailsInExport(IndexError)


@pytest.mark.parametrize("error", [IndexError, RuntimeError])
def test_exporter_failure_is_one_line_whatever_its_type(tmp_path, capsys, error):
    """torch's exporter fails as RuntimeError or IndexError: both retry once through the unpacked-outputs
    view and, failing again, become one ExportError naming the first failure (CLI: one line, exit 2)."""
    from export.user import export_module
    from export.verify import ExportError

    path = tmp_path / "m" / "1" / "model.onnx"
    with pytest.raises(ExportError, match=rf"^torch.onnx.export failed: {error.__name__}: vector::_M_range_check"):
        export_module(_FailsInExport(error).eval(), path, 6)
    rc = run_export("--module", "tests.test_own_models:index_error_module", "--feature-size", "6", "--name", "m",
                    "--out", str(tmp_path))  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: torch.onnx.export failed: IndexError: "), err
    assert not any(tmp_path.rglob("*.onnx"))


_SEEN_BY_FORWARD: list[object] = []


class _RecordsTorchsPack(nn.Module):
    """Uses pack/pad imported by name (so --static can unroll it) and records, on each call, what torch's
    own module holds under that name: other code in the process must keep the real function."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.rnn = nn.LSTM(6, 4, batch_first=True)

    def forward(self, x, lengths):
        _SEEN_BY_FORWARD.append(torch.nn.utils.rnn.pack_padded_sequence)
        out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]  # (B, T, 4)


class _AttributeStylePack(_RecordsTorchsPack):
    def forward(self, x, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


@pytest.mark.slow
def test_static_unrolling_leaves_torch_and_other_modules_alone(tmp_path):
    """--static swaps pack/pad for pass-throughs only in the user's own module while it runs: torch's
    namespace keeps the real functions throughout, and this file's names are restored afterwards."""
    import torch.nn.utils.rnn as rnn_utils

    from export.user import export_module
    from export.verify import ExportError

    real = rnn_utils.pack_padded_sequence
    _SEEN_BY_FORWARD.clear()
    results = export_module(_RecordsTorchsPack().eval(), tmp_path / "m" / "1" / "model.onnx", 6, static=(4,))
    assert len(results) == 2 and (tmp_path / "m_static_t4" / "1" / "model.onnx").is_file()
    assert _SEEN_BY_FORWARD and all(f is real for f in _SEEN_BY_FORWARD)
    assert pack_padded_sequence is real and rnn_utils.pad_packed_sequence is pad_packed_sequence
    # a module that reaches the functions through torch's namespace exports dynamically; --static says how to fix it
    export_module(_AttributeStylePack().eval(), tmp_path / "a" / "1" / "model.onnx", 6)
    with pytest.raises(ExportError, match=r"^--static: the LSTM layer must be called as layer\(pack_padded_sequence"):
        export_module(_AttributeStylePack().eval(), tmp_path / "b" / "1" / "model.onnx", 6, static=(4,))
    assert not any(tmp_path.glob("b_static_t4/**/*.onnx"))  # (the CLI also removes the dynamic file it wrote)
