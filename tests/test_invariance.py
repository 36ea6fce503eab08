"""Batch invariance: a request's answer does not depend on who else was in its merged run.

The load-time check (server/invariance.py) on models built here: row-wise models from elsewhere
(LayerNorm, a LayerNorm spelt with ReduceSum, a MatMul), a model that subtracts the batch mean, the
same with the opt-in switch and without any batching config, this project's float32 exports
(dynamic, stateful, static) and their int8 and fp16 twins. Then a real server under concurrent
load: every answer equals the request run alone (bit for bit, or 1e-5 for the float32 exports),
except where the config opted in to batch-dependent results."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export import family, pinned, precision
from export.onnx_export import export_dynamic, export_static
from server import invariance
from server.batcher import BatchPolicy
from server.proto import grpc_service_pb2 as pb
from server.repository import ModelRepository
from server.runtime import RuntimeOptions, select_providers
from tests.conftest import SMALL, STATEFUL, TOL, make_encoder

F = 64  # features of the hand-built models
DYNAMIC = "dynamic_batching { }\n"  # the config.pbtxt that turns batching on (Triton's opt-in)
ALLOW = f'parameters {{ key: "{invariance.ALLOW}" value {{ string_value: "true" }} }}\n'


def _model(nodes: list, initializers: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", F])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", F])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(value, name)


def _models() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)
    gamma = _const("g", rng.standard_normal(F).astype(np.float32))
    beta = _const("b", rng.standard_normal(F).astype(np.float32))
    axis, count = _const("ax", np.array([1], np.int64)), _const("n", np.array(float(F), np.float32))
    weight = _const("W", (rng.standard_normal((F, F)) / 8).astype(np.float32))
    node = helper.make_node
    return {
        "layernorm": _model([node("LayerNormalization", ["X", "g", "b"], ["Y"], axis=-1)], [gamma, beta]),
        "layernorm_reducesum": _model(  # the shape tf2onnx writes: ReduceSum / Div / Sub / Sqrt
            [
                node("ReduceSum", ["X", "ax"], ["s"], keepdims=1),
                node("Div", ["s", "n"], ["mu"]),
                node("Sub", ["X", "mu"], ["d"]),
                node("Mul", ["d", "d"], ["d2"]),
                node("ReduceSum", ["d2", "ax"], ["v"], keepdims=1),
                node("Div", ["v", "n"], ["var"]),
                node("Sqrt", ["var"], ["sd"]),
                node("Div", ["d", "sd"], ["z"]),
                node("Mul", ["z", "g"], ["zg"]),
                node("Add", ["zg", "b"], ["Y"]),
            ],
            [gamma, beta, axis, count],
        ),  # fmt: skip
        "matmul": _model([node("MatMul", ["X", "W"], ["Y"])], [weight]),
        # subtracts the mean over the batch: every row depends on every other row
        "batch_mean": _model(
            [node("ReduceMean", ["X"], ["mu"], axes=[0], keepdims=1), node("Sub", ["X", "mu"], ["Y"])], []
        ),
    }


ROW_WISE = ("layernorm", "layernorm_reducesum", "matmul")


def _token_batch_mean() -> onnx.ModelProto:
    """Token ids [batch, 4] (no declared range) -> embeddings minus their mean over the batch, and
    the argmax of each: the check must vary integer rows too, and compare integer outputs exactly."""
    table = _const("E", np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32))
    node = helper.make_node
    graph = helper.make_graph(
        [node("Gather", ["E", "ids"], ["e"]), node("ReduceMean", ["e"], ["mu"], axes=[0], keepdims=1),
         node("Sub", ["e", "mu"], ["Y"]), node("ArgMax", ["Y"], ["top"], axis=2, keepdims=0)],
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4, 8]),
         helper.make_tensor_value_info("top", TensorProto.INT64, ["batch", 4])],
        [table],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _save(root: Path, name: str, model: onnx.ModelProto, pbtxt: str | None = None, config: dict | None = None):
    path = family.model_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if pbtxt is not None:
        (root / name / "config.pbtxt").write_text(pbtxt)
    if config is not None:
        (root / name / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inv")
    models = _models()
    for name, model in models.items():
        _save(root, name, model, DYNAMIC)
    _save(root, "batch_mean_allowed", models["batch_mean"], DYNAMIC + ALLOW)
    _save(root, "token_batch_mean", _token_batch_mean(), DYNAMIC)
    _save(root, "batch_mean_allowed_json", models["batch_mean"], config={"batching": {"enabled": True},
                                                                          invariance.ALLOW: True})  # fmt: skip
    _save(root, "batch_mean_no_config", models["batch_mean"])
    _save(root, "layernorm_no_config", models["layernorm"])
    _save(root, "layernorm_json", models["layernorm"], config={"batching": {"enabled": True}})
    for name, cfg in SMALL.items():
        export_dynamic(make_encoder(cfg), family.model_path(root, name))
    for name, cfg in STATEFUL.items():
        export_dynamic(make_encoder(cfg, seed=3), family.model_path(root, name), initial_state=True)
    export_static(make_encoder(SMALL["bi"]), 12, family.model_path(root, "bi_static_t12"))
    for prec in ("int8", "fp16"):
        precision.make_twin(family.model_path(root, "bi"), prec, family.model_path(root, f"bi_{prec}"), "bi")
    # the int8 twin `make export` writes for the family (activation ranges pinned from calibration data)
    features = SMALL["bi"].input_size
    precision.make_twin(family.model_path(root, "bi"), "int8", family.model_path(root, "bi_int8_pinned"), "bi",
                        calibration=pinned.standard_normal(features))  # fmt: skip
    # an int8 twin as written before twins ran row by row: ORT's dynamic quantization over the whole
    # batch (what an int8 file from elsewhere typically is)
    row_loop = precision.row_loop
    precision.row_loop = lambda model, name: model
    try:
        precision.make_twin(family.model_path(root, "bi"), "int8", family.model_path(root, "bi_int8_per_run"), "bi")
    finally:
        precision.row_loop = row_loop
    return root


@pytest.fixture(scope="module")
def repository(models_root) -> ModelRepository:
    options = RuntimeOptions(device="cpu")
    repo = ModelRepository(models_root, select_providers(options), options, policy=BatchPolicy())
    for name in repo.model_names_on_disk():
        repo.load(name)
    return repo


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_batch_dependence(path: Path) -> float:
    """ONNX Runtime's own answer, without the server: each of 4 rows alone vs inside batches of 5
    and 32 rows (at two offsets); the largest difference."""
    session = _session(path)
    x = np.random.default_rng(3).standard_normal((32, F)).astype(np.float32)
    worst = 0.0
    for row in range(4):
        alone = session.run(None, {"X": x[row : row + 1]})[0]
        for batch, at in ((x[:5], row), (x, row), (np.roll(x, 7, axis=0), row + 7)):
            worst = max(worst, float(np.abs(session.run(None, {"X": batch})[0][at : at + 1] - alone).max()))
    return worst


# -- the check at load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROW_WISE)
def test_row_wise_models_merge_exactly_when_onnx_runtime_keeps_rows_apart(models_root, repository, name):
    """What ONNX Runtime does to a row inside a batch is measured here, apart from the server: where
    it changes nothing the check says bit-identical and requests merge; where it moves a row, the
    check must have caught it and the model runs unmerged."""
    rt = repository.get(name, "")
    ort_diff = _ort_batch_dependence(family.model_path(models_root, name))
    if ort_diff == 0.0:
        assert rt.batch_invariance == "bit-identical" and rt.signature.batching_rule == "equal", rt.batch_invariance
    else:
        assert rt.batch_invariance.endswith("(not merged)") and rt.signature.batching_rule == "none"
        assert float(rt.batch_invariance.split()[2]) > 0


def test_batch_mean_model_fails_the_check_and_is_not_merged(models_root, repository, caplog):
    rt = repository.get("batch_mean", "")
    assert rt.signature.batching_rule == "none" and not rt.batchable
    text = rt.batch_invariance
    assert text.startswith("max diff ") and text.endswith(" (not merged)"), text
    assert float(text.split()[2]) > 0.1  # rows of N(0, 1) minus a mean over up to 32 rows
    # one log line, naming the difference, the output and the switch that merges it anyway
    options = RuntimeOptions(device="cpu")
    again = ModelRepository(models_root, select_providers(options), options, policy=BatchPolicy())
    with caplog.at_level(logging.INFO, logger="server.invariance"):
        again.load("batch_mean")
    lines = [r.getMessage() for r in caplog.records if r.name == "server.invariance"]
    assert len(lines) == 1, lines
    assert "model batch_mean version 1: a request's outputs depend on its batch-mates (max diff " in lines[0]
    assert "output 'Y'" in lines[0] and invariance.SWITCH in lines[0] and "requests are not merged" in lines[0]


def test_integer_inputs_vary_too(repository):
    """Token ids of unknown range are drawn 0 or 1 (zeros for every row would hide the batch mean)."""
    rt = repository.get("token_batch_mean", "")
    assert rt.signature.batching_rule == "none"
    text = rt.batch_invariance
    assert text == "output 'top' differs (a non-float value or a shape) (not merged)", text


@pytest.mark.parametrize("name", ["batch_mean_allowed", "batch_mean_allowed_json"])
def test_opt_in_merges_and_reports_the_measured_bound(repository, name):
    rt = repository.get(name, "")
    assert rt.signature.batching_rule == "equal" and rt.batchable
    assert rt.batch_invariance.startswith("opted in: max diff ") and float(rt.batch_invariance.split()[4]) > 0.1


def test_files_from_elsewhere_merge_only_when_their_config_turns_batching_on(repository):
    """A file naming an axis `batch` is not enough (Triton's rule): without config.pbtxt batching or
    config.json batching.enabled, requests run alone, even for a row-wise model."""
    for name in ("batch_mean_no_config", "layernorm_no_config"):
        rt = repository.get(name, "")
        assert rt.signature.batching_rule == "none", name
        assert rt.batch_invariance == "not merged (its config does not turn batching on)", name
    assert invariance.opted_in({"batching": {"enabled": True}}) and not invariance.opted_in({"batching": {}})
    rt = repository.get("layernorm_json", "")
    assert rt.signature.batching_rule == ("equal" if rt.batch_invariance == "bit-identical" else "none")


@pytest.mark.parametrize("name", ["bi", "uni", "suni", "sbi", "bi_static_t12"])
def test_project_float_exports_still_merge(repository, name):
    rt = repository.get(name, "")
    assert rt.signature.batching_rule == "ragged" and rt.batchable
    text = rt.batch_invariance
    assert text == "bit-identical" or (text.startswith("max diff ") and text.endswith(f"(within {TOL:g})")), text
    found = invariance.measure(rt, seed=7)  # other rows, other lengths: the same contract
    assert found is not None and found[1] <= TOL, found


def test_int8_twin_runs_row_by_row_and_merges(repository):
    """The export's int8 twin without calibration data quantizes each batch row on its own:
    bit-identical alone vs merged."""
    rt = repository.get("bi_int8", "")
    assert rt.export_metadata["lstm.precision"] == "int8"
    assert "per row" in rt.export_metadata["lstm.precision_method"]
    assert rt.signature.batching_rule == "ragged" and rt.batch_invariance == "bit-identical", rt.batch_invariance


def test_pinned_int8_twin_is_bit_identical_and_merges(repository):
    """The int8 twin with pinned activation ranges runs the whole batch in one run, every scale
    fixed in the graph: the load check finds it bit-identical and it is served merged."""
    rt = repository.get("bi_int8_pinned", "")
    assert rt.export_metadata["lstm.precision"] == "int8"
    assert "pinned" in rt.export_metadata["lstm.precision_method"]
    assert rt.signature.batching_rule == "ragged" and rt.batch_invariance == "bit-identical", rt.batch_invariance
    found = invariance.measure(rt, seed=11)  # other rows and lengths than the load's check
    assert found is not None and found[1] == 0.0, found


def test_batch_dependent_int8_is_caught_and_served_unmerged(repository):
    """ORT's DynamicQuantizeLSTM / DynamicQuantizeLinear over a whole batch pick one activation scale
    per run: a row's answer moves with its batch-mates, so such a file runs each request alone."""
    rt = repository.get("bi_int8_per_run", "")
    assert rt.export_metadata["lstm.precision"] == "int8"
    assert rt.signature.batching_rule == "none" and rt.batch_invariance.endswith("(not merged)"), rt.batch_invariance
    assert 1e-4 < float(rt.batch_invariance.split()[2]) < precision.TOLERANCE["int8"]


def test_fp16_twin_merges_only_if_bit_identical(repository):
    rt = repository.get("bi_fp16", "")
    found = invariance.measure(rt, seed=7)
    assert found is not None
    if rt.batch_invariance == "bit-identical":
        assert rt.signature.batching_rule == "ragged" and found[0] == 0.0
    else:
        assert rt.signature.batching_rule == "none" and rt.batch_invariance.endswith("(not merged)")


def test_the_check_is_time_bounded(models_root, monkeypatch, caplog):
    """Out of time, the check claims nothing: a file from elsewhere is not merged (one line says why
    and names the switch); this project's float exports keep merging (their parity is tested at
    export)."""
    monkeypatch.setattr(invariance, "BUDGET_S", 0.0)
    options = RuntimeOptions(device="cpu")
    repo = ModelRepository(models_root, select_providers(options), options, policy=BatchPolicy())
    with caplog.at_level(logging.INFO, logger="server.invariance"):
        repo.load("layernorm")
        repo.load("bi")
    lines = [r.getMessage() for r in caplog.records if r.name == "server.invariance"]
    assert len(lines) == 1 and "the check did not finish in 0 s" in lines[0] and invariance.SWITCH in lines[0]
    ln, bi = repo.get("layernorm", ""), repo.get("bi", "")
    assert ln.batch_invariance == "not checked (not merged)" and ln.signature.batching_rule == "none"
    assert bi.batch_invariance.startswith("not checked (") and bi.signature.batching_rule == "ragged"


def test_batching_off_is_not_checked(models_root):
    options = RuntimeOptions(device="cpu")
    repo = ModelRepository(models_root, select_providers(options), options, policy=BatchPolicy(enabled=False))
    repo.load("bi")
    rt = repo.get("bi", "")
    assert rt.batch_invariance == "not checked (batching off)" and rt.signature.batching_rule == "ragged"


# -- a real server under concurrent load ---------------------------------------------------------------
@pytest.fixture(scope="module")
def server(models_root):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(Settings(port=0, model_repository=models_root, device="cpu", log_level="WARNING",
                                   metrics_port=-1, max_queue_delay_us=20_000))  # fmt: skip
    srv.start()
    yield srv
    srv.stop(grace=1)


def _concurrent(srv, model: str, requests: list[dict]) -> tuple[list[dict], int]:
    """Every request from its own client at once (a 20 ms queue delay gathers them); the answers,
    and how many ONNX Runtime runs the model made meanwhile."""
    from server.client import LSTMClient

    target = f"127.0.0.1:{srv.port}"
    start = threading.Barrier(len(requests))

    def runs() -> int:
        with LSTMClient(target) as c:
            return c.stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)).model_stats[0].execution_count

    def call(feeds):
        with LSTMClient(target, timeout=60) as c:
            c.ready()
            start.wait()
            return c.infer_tensors(model, feeds)

    before = runs()
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(call, requests))
    return answers, runs() - before


def _rows(seed: int, count: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"X": (rng.standard_normal((1 + i % 3, F)) * (1 + i)).astype(np.float32)} for i in range(count)]


def _sequences(seed: int, count: int, features: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        lengths = rng.integers(1, 20, 1 + i % 3).astype(np.int64)
        x = (rng.standard_normal((len(lengths), int(lengths.max()), features)) * (1 + i % 4)).astype(np.float32)
        for row, n in enumerate(lengths):
            x[row, n:] = 0.0
        out.append({"x": x, "lengths": lengths})
    return out


@pytest.mark.parametrize(
    ("model", "kind", "bound"),
    [
        ("batch_mean", "rows", 0.0),
        ("layernorm", "rows", 0.0),
        ("bi", "seq", TOL),
        ("bi_int8", "seq", 0.0),
        ("bi_int8_pinned", "seq", 0.0),
        ("bi_int8_per_run", "seq", 0.0),
    ],
)
def test_concurrent_answers_equal_alone_within_the_contract(models_root, repository, server, model, kind, bound):
    """12 clients at once: each answer equals its request run alone by the served version itself
    (the server's own session, so the same kernels and threads), within the contract: bit for bit,
    or 1e-5 for this project's float32 exports. An unmerged model made one run per request."""
    requests = _rows(11, 12) if kind == "rows" else _sequences(11, 12, SMALL["bi"].input_size)
    answers, runs = _concurrent(server, model, requests)
    rt = server.repository.get(model, "")
    for feeds, got in zip(requests, answers):
        alone = rt.run(feeds, rt.output_names)
        for name, value in alone.items():
            assert got[name].shape == value.shape, (model, name)
            assert np.abs(got[name] - value).max() <= bound, (model, name)
    if rt.batchable:
        assert runs < len(requests), (model, runs)  # merging happened, and changed nothing
    else:
        assert runs == len(requests), (model, runs)


def test_opted_in_batch_mean_is_merged_and_its_answers_move(server):
    """The opt-in means what it says: requests merge, and the batch-mean answers differ from alone."""
    requests = _rows(12, 12)
    answers, runs = _concurrent(server, "batch_mean_allowed", requests)
    assert runs < len(requests)
    rt = server.repository.get("batch_mean_allowed", "")
    moved = max(float(np.abs(got["Y"] - rt.run(f, ["Y"])["Y"]).max()) for f, got in zip(requests, answers))
    assert moved > 0.1


def test_model_config_says_the_verdict(server):
    from server.client import LSTMClient

    with LSTMClient(f"127.0.0.1:{server.port}") as c:
        for model in ("batch_mean", "batch_mean_allowed", "layernorm", "bi", "bi_int8", "bi_int8_per_run"):
            params = c.config(model)["parameters"]
            assert params["batch_invariance"]["string_value"] == server.repository.get(model, "").batch_invariance
            assert params["batching_rule"]["string_value"] == server.repository.get(model, "").signature.batching_rule
