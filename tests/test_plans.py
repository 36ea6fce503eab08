"""What is remembered of a request's structure per model version (`Signature.plans`): `validate`'s
structural checks, `call_cost` and the response's size. A structure that passed once still gets its
value checks; a refused one is refused every time and never remembered; the cache is bounded by
`PLANS_MAX` and what it answers agrees with a fresh computation; a sequence's later chunks (which
skip building initial states) give what the model gives with its state fed back.

Real ONNX Runtime sessions of models built here (a seeded stateful LSTM export, an onnx.helper
token model), a real repository and data plane; no server code is faked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.model import LSTMConfig
from export.onnx_export import export_dynamic
from server.codec import Limits
from server.dataplane import DataPlane, InferRequest
from server.errors import InvalidArgument, ResourceExhausted
from server.layout import probe_output_layout
from server.memory import call_cost
from server.repository import ModelRepository
from server.runtime import RuntimeOptions, load_model, select_providers
from server.signature import PLANS_MAX
from server.stats import Statistics
from server.validate import validate
from tests.conftest import TOL, make_encoder

FEATURES, HIDDEN, LAYERS = 5, 7, 2
VOCAB = 50


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A repository: `lstm` (x, lengths, h0, c0 -> y, h_n, c_n; stateful) and `tokens` (token ids
    x [batch, time] with lengths; ids must be below the vocabulary)."""
    root = tmp_path_factory.mktemp("plans")
    config = LSTMConfig(input_size=FEATURES, hidden_size=HIDDEN, num_layers=LAYERS, bidirectional=False)
    export_dynamic(make_encoder(config, seed=11), root / "lstm" / "1" / "model.onnx", initial_state=True)
    table = np.random.default_rng(5).standard_normal((VOCAB, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "x"], ["y"], axis=0), helper.make_node("Identity", ["lengths"], ["n"])],
        "tokens",
        [
            helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", 4]),
            helper.make_tensor_value_info("n", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor("table", TensorProto.FLOAT, table.shape, table.reshape(-1).tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    props = {"lstm.export_mode": "dynamic", "lstm.input": "tokens", "lstm.vocab_size": str(VOCAB)}
    helper.set_model_props(model, props)
    (root / "tokens" / "1").mkdir(parents=True)
    onnx.save(model, root / "tokens" / "1" / "model.onnx")
    return root


def _load(models: Path, name: str):
    """A freshly loaded version (its own Signature, so its own empty plans), probed as the
    repository probes it (which remembers nothing)."""
    options = RuntimeOptions(device="cpu")
    rt = load_model(name, 1, models / name / "1" / "model.onnx", select_providers(options), options)
    probe_output_layout(rt)
    return rt


def _x(rows: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, steps, FEATURES)).astype(np.float32)


def _refused(rt, arrays, outputs=(), **kw) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate(rt, arrays, list(outputs), **kw)
    return err.value.message


# -- 1. a structure that passed once still gets its value checks ------------------------------------


def test_a_remembered_structure_still_gets_every_value_check(models):
    rt = _load(models, "lstm")
    sig = rt.signature
    x, lengths = _x(2, 6), np.array([6, 3], np.int64)
    prepared = validate(rt, {"x": x, "lengths": lengths}, [])
    assert (prepared.work.rows, prepared.work.steps) == (2, 6) and len(sig.plans) == 1  # remembered
    # the same structure (names, datatypes, shapes, outputs), bad values: refused every time
    nan = x.copy()
    nan[1, 2, 0] = np.nan  # row 1 is 3 steps long: step 2 is valid
    for _ in range(2):
        message = _refused(rt, {"x": nan, "lengths": lengths})
        assert "input 'x': values must be finite" in message and "x[1, 2, 0]" in message, message
    for bad in ([7, 3], [6, 0]):
        message = _refused(rt, {"x": x, "lengths": np.array(bad, np.int64)})
        assert "input 'lengths': every length must be in 1..6" in message, message
    inf = np.full((LAYERS, 2, HIDDEN), np.inf, np.float32)
    zeros = np.zeros((LAYERS, 2, HIDDEN), np.float32)
    validate(rt, {"x": x, "lengths": lengths, "h0": zeros, "c0": zeros}, [])  # remembered
    message = _refused(rt, {"x": x, "lengths": lengths, "h0": inf, "c0": zeros})
    assert "input 'h0': values must be finite" in message, message
    # NaN only in padding (row 1 past its length) is never read: accepted, with the same structure
    padded = x.copy()
    padded[1, 4, 1] = np.nan
    assert validate(rt, {"x": padded, "lengths": lengths}, []).work.rows == 2
    # lengths left out: filled in full, every time (not a remembered array shared between requests)
    a = validate(rt, {"x": x}, [])
    b = validate(rt, {"x": x}, [])
    assert a.feeds["lengths"].tolist() == b.feeds["lengths"].tolist() == [6, 6]
    # initial states are built per request: zeros of this request's batch
    assert a.feeds["h0"].shape == (LAYERS, 2, HIDDEN) and not a.feeds["h0"].any()
    assert a.feeds["h0"] is not b.feeds["h0"]
    assert len(sig.plans) == 3  # the refusals above shared the remembered structures, added none


def test_token_ids_are_range_checked_on_a_remembered_structure(models):
    rt = _load(models, "tokens")
    ids, lengths = np.array([[1, 2, 3], [4, 5, 6]], np.int64), np.array([3, 2], np.int64)
    assert validate(rt, {"x": ids, "lengths": lengths}, []).work.steps == 3
    assert len(rt.signature.plans) == 1
    for value, where in ((VOCAB, "x[1, 0]"), (-1, "x[1, 0]")):
        bad = ids.copy()
        bad[1, 0] = value
        for _ in range(2):
            message = _refused(rt, {"x": bad, "lengths": lengths})
            assert f"input 'x': values must be in 0..{VOCAB - 1}" in message and f"{where} = {value}" in message
    assert validate(rt, {"x": ids, "lengths": lengths}, ["n"]).outputs == ["n"]


# -- 2. a refused structure is refused every time and never remembered ------------------------------


def test_a_refused_structure_is_refused_every_time_and_not_remembered(models):
    rt = _load(models, "lstm")
    sig = rt.signature
    x = _x(2, 4)
    validate(rt, {"x": x}, ["y"])
    before = dict(sig.plans)
    cases = [
        ({"x": _x(2, 4)[:, :, :3]}, ["y"], "input 'x': dim 2 must be 5"),  # wrong fixed dim
        ({"x": x}, ["w"], "requested output(s) ['w'] unknown"),
        ({"x": x}, ["y", "y"], "each may appear once"),
        ({"x": x.astype(np.float64)}, ["y"], "input 'x': datatype must be FP32, got FP64"),
        ({"x": x[0]}, ["y"], "input 'x': expected rank 3"),
        ({"x": x, "lengths": np.array([4, 4, 4], np.int64)}, ["y"], "input 'lengths': expected shape [2]"),
        ({"x": x, "z": x}, ["y"], "unknown input 'z'"),
        ({"x": np.zeros((2, 0, FEATURES), np.float32)}, ["y"], "batch and time must be >= 1"),
        ({"x": x, "h0": np.zeros((LAYERS, 3, HIDDEN), np.float32)}, ["y"], "input 'h0': batch size 3"),
    ]
    for arrays, outputs, expected in cases:
        for _ in range(3):
            message = _refused(rt, arrays, outputs)
            assert expected in message, message
        assert sig.plans == before, arrays.keys()
    assert validate(rt, {"x": x}, ["y"]).outputs == ["y"]  # the good structure still passes


# -- 3. the bound -----------------------------------------------------------------------------------


def test_plans_are_bounded_and_answers_stay_right(models):
    rt = _load(models, "lstm")
    sig = rt.signature
    n = PLANS_MAX + 40
    for steps in range(1, n + 1):
        rows = 1 + steps % 3
        prepared = validate(rt, {"x": _x(rows, steps)}, ["h_n"] if steps % 2 else [])
        assert (prepared.work.rows, prepared.work.steps) == (rows, steps)
        assert prepared.outputs == (["h_n"] if steps % 2 else ["y", "h_n", "c_n"])
        assert prepared.feeds["lengths"].tolist() == [steps] * rows
        assert prepared.feeds["c0"].shape == (LAYERS, rows, HIDDEN)
        assert 1 <= len(sig.plans) <= PLANS_MAX
    # every structure again (most forgotten, some remembered): the same answers; bad values refused
    for steps in range(n, 0, -7):
        rows = 1 + steps % 3
        prepared = validate(rt, {"x": _x(rows, steps)}, [])
        assert (prepared.work.rows, prepared.work.steps) == (rows, steps)
        message = _refused(rt, {"x": _x(rows, steps), "lengths": np.full(rows, steps + 1, np.int64)})
        assert f"every length must be in 1..{steps}" in message, message
        assert len(sig.plans) <= PLANS_MAX
    assert "dim 2 must be 5" in _refused(rt, {"x": np.zeros((1, 3, 4), np.float32)})


# -- 4. call_cost ---------------------------------------------------------------------------------


def test_call_cost_remembers_only_the_models_own_structures_and_agrees_with_a_fresh_count(models):
    rt = _load(models, "lstm")
    sig = rt.signature
    x = _x(3, 20)
    for inputs, outputs in [({"z": x}, []), ({"x": x[0]}, []), ({"x": x, "h0": x[0]}, []), ({"x": x}, ["w"])]:
        call_cost(rt, inputs, outputs)  # unknown name, wrong rank, unknown output: counted, not remembered
        assert sig.plans == {}, (list(inputs), outputs)
    # with the request's size given: counted fresh, never remembered
    given = call_cost(rt, {"x": x}, ["y"], request_bytes=x.nbytes)
    assert sig.plans == {}
    assert call_cost(rt, {"x": x}, ["y"], request_bytes=10 * x.nbytes).request == 10 * x.nbytes
    assert sig.plans == {}
    first = call_cost(rt, {"x": x}, ["y"])
    assert len(sig.plans) == 1 and first == given and first.request == x.nbytes
    assert first.response == 3 * 20 * HIDDEN * 4  # y: (batch, time, hidden) float32
    again = call_cost(rt, {"x": _x(3, 20, seed=9)}, ["y"])  # same structure, other values
    assert again == first and len(sig.plans) == 1
    # every part of the structure counts: a fresh version (empty plans) and the uncached count agree
    fresh = _load(models, "lstm")
    lengths = np.array([20, 4, 9], np.int64)
    for inputs, outputs, factor in [
        ({"x": x}, ["h_n"], 1),
        ({"x": x}, ["y"], 3),
        ({"x": x}, [], 1),
        ({"x": _x(3, 21)}, ["y"], 1),
        ({"x": _x(4, 20)}, ["y"], 1),
        ({"x": x.astype(np.float64)}, ["y"], 1),  # a datatype validate refuses: counted by its own bytes
        ({"x": x, "lengths": lengths}, ["y", "c_n"], 1),
        ({"lengths": lengths, "x": x}, ["y", "c_n"], 1),
    ]:
        inputs_bytes = sum(a.nbytes for a in inputs.values())
        cost = call_cost(rt, inputs, outputs, response_factor=factor)
        assert cost == call_cost(rt, inputs, outputs, inputs_bytes, factor), (list(inputs), outputs, factor)
        assert cost == call_cost(fresh, inputs, outputs, response_factor=factor)
        assert call_cost(rt, inputs, outputs, response_factor=factor) == cost  # now remembered
    assert len(sig.plans) <= PLANS_MAX
    for steps in range(1, PLANS_MAX + 30):  # bounded with validate's
        call_cost(rt, {"x": _x(1, steps)}, [])
        assert len(sig.plans) <= PLANS_MAX


# -- 5. served: a sequence's later chunks, and the response's size -------------------------------------


@pytest.fixture(scope="module")
def plane(models):
    options = RuntimeOptions(device="cpu")
    repo = ModelRepository(models, select_providers(options), options, "explicit")
    repo.load("lstm")
    return DataPlane(repo, Statistics(), Limits())


def _chunk(seq_id: str, x: np.ndarray, start: bool, end: bool, **extra) -> InferRequest:
    params = {"sequence_id": seq_id, "sequence_start": start, "sequence_end": end}
    return InferRequest("lstm", inputs={"x": x, **extra}, outputs=[], parameters=params)


def test_a_sequences_chunks_agree_with_the_model_with_its_state_fed_back(plane, models):
    session = ort.InferenceSession(str(models / "lstm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(21)
    h = rng.standard_normal((LAYERS, 1, HIDDEN)).astype(np.float32)
    c = rng.standard_normal((LAYERS, 1, HIDDEN)).astype(np.float32)
    for round_ in range(2):  # the second round's structures are all remembered
        state = {"h0": h, "c0": c}
        chunks = [_x(1, steps, seed=100 * round_ + steps) for steps in (4, 3, 4)]
        seq = f"s{round_}"
        for i, x in enumerate(chunks):
            start, end = i == 0, i == len(chunks) - 1
            extra = state if start else {}
            response = plane.infer(_chunk(seq, x, start, end, **extra))
            feeds = {"x": x, "lengths": np.array([x.shape[1]]), **state}
            want = dict(zip(["y", "h_n", "c_n"], session.run(None, feeds)))
            for name in ("y", "h_n", "c_n"):
                np.testing.assert_allclose(response.outputs[name], want[name], rtol=0, atol=TOL, err_msg=f"{name} {i}")
            state = {"h0": want["h_n"], "c0": want["c_n"]}
            if i == 0:  # a later chunk may not carry a state; the refusal leaves the sequence as it was
                for name in ("h0", "c0"):
                    with pytest.raises(InvalidArgument) as err:
                        plane.infer(_chunk(seq, chunks[1], False, False, **{name: state[name]}))
                    assert f"['{name}'] are only accepted with sequence_start" in err.value.message
    # a start without h0/c0 starts from zeros (validate's initial states), as the model does
    x = _x(1, 5, seed=3)
    response = plane.infer(_chunk("z", x, True, True))
    zeros = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    want = session.run(None, {"x": x, "lengths": np.array([5]), "h0": zeros, "c0": zeros})
    np.testing.assert_allclose(response.outputs["y"], want[0], rtol=0, atol=TOL)


def test_the_response_size_is_counted_per_batch_and_time(models):
    options = RuntimeOptions(device="cpu")
    repo = ModelRepository(models, select_providers(options), options, "explicit")
    repo.load("lstm")
    # room for y of 2 x 40 steps (2 * 40 * 7 * 4 = 2240 B plus framing), not of 2 x 400
    small = DataPlane(repo, Statistics(), Limits(), max_message_bytes=8 << 10)
    for _ in range(2):
        for steps, fits in ((40, True), (400, False), (41, True), (1, True)):
            request = InferRequest("lstm", inputs={"x": _x(2, steps)}, outputs=["y"])
            if fits:
                assert small.infer(request).outputs["y"].shape == (2, steps, HIDDEN)
            else:
                with pytest.raises(ResourceExhausted, match=rf"'y' \[2, {steps}, {HIDDEN}\]"):
                    small.infer(request)
    sig = repo.get("lstm").signature
    assert ("response", 2, 400, "y") in sig.plans  # the refusal came from the count made before the run
    assert len(sig.plans) <= PLANS_MAX
