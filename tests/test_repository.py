"""server/repository.py on its own: a ModelRepository over a folder of tiny onnx.helper models,
real ONNX Runtime sessions, no server and no socket.

Scanning (names, versions), version_policy, load errors (what a client is told, readiness),
model-control modes, polling by the files' stamps, lookups, and the output-layout probe.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server import repository
from server.errors import InvalidArgument, ModelControlDisabled, NotFound, StartupError, Unavailable
from server.repository import ModelRepository, output_dims, probe_output_layout
from server.runtime import Providers, RuntimeOptions

CPU = Providers(("CPUExecutionProvider",), "CPUExecutionProvider")
OPTIONS = RuntimeOptions(device="cpu", intra_op_threads=1)
F = TensorProto.FLOAT


def _model(scale: float = 1.0, a_shape=("batch", 4), b_shape=("batch", 4)) -> onnx.ModelProto:
    """b = a * scale."""
    nodes = [
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", F, [], [scale])),
        helper.make_node("Mul", ["a", "k"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("a", F, list(a_shape))],
        [helper.make_tensor_value_info("b", F, list(b_shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _write(root: Path, name: str, version: int | str, model: onnx.ModelProto | bytes | None = None) -> Path:
    path = root / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, bytes):
        path.write_bytes(model)
    else:
        onnx.save(model if model is not None else _model(float(version) if str(version).isdigit() else 1.0), str(path))
    return path


def _repo(root: Path, mode: str = "explicit", **kw) -> ModelRepository:
    repo = ModelRepository(root, CPU, OPTIONS, control_mode=mode, **kw)
    repo.changes = []
    repo.on_change = lambda name, ready: repo.changes.append((name, ready))
    return repo


def _answer(rt, value: float = 1.0) -> list[float]:
    return rt.run({"a": np.full((1, 4), value, np.float32)}, ["b"])["b"].ravel().tolist()


def test_scanning_finds_valid_model_folders_only(tmp_path):
    _write(tmp_path, "good", 1)
    _write(tmp_path, "also.good-2", 3)
    _write(tmp_path, ".hidden", 1)  # not a model name
    _write(tmp_path, "noversion", "v1")  # version folder not an integer
    (tmp_path / "empty" / "1").mkdir(parents=True)  # no model.onnx
    (tmp_path / "file.txt").write_text("x")
    repo = _repo(tmp_path)
    assert repo.model_names_on_disk() == ["also.good-2", "good"]
    assert _repo(tmp_path / "missing").model_names_on_disk() == []


def test_names_and_versions_rules():
    assert repository.valid_name("m_1.v-2") and not repository.valid_name("-m") and not repository.valid_name("a/b")
    assert not repository.valid_name("x" * 129) and repository.valid_name("x" * 128)
    assert not repository.valid_name(3)
    assert repository.valid_version("1") and repository.valid_version("9" * 18)
    assert not repository.valid_version("9" * 19) and not repository.valid_version("-1")
    assert not repository.valid_version("١")  # an Arabic-Indic digit: isdigit() but not ASCII
    assert not repository.valid_version("")


def test_load_all_serves_every_version_and_the_latest_by_default(tmp_path):
    for v in (1, 2, 10):
        _write(tmp_path, "m", v)
    repo = _repo(tmp_path)
    assert repo.load_all() == []
    assert repo.is_ready() and repo.ready_models() == ["m"]
    assert repo.get("m").version == 10 and _answer(repo.get("m")) == [10.0] * 4
    assert _answer(repo.get("m", "2")) == [2.0] * 4
    assert repo.index() == [("m", "1", "READY", ""), ("m", "2", "READY", ""), ("m", "10", "READY", "")]
    assert repo.changes == [("m", True)]
    with pytest.raises(NotFound, match=r"'m' version '3' is not found; loaded: \[1, 2, 10\]"):
        repo.get("m", "3")
    with pytest.raises(NotFound, match="Request for unknown model: 'm' version '01x' is not found"):
        repo.get("m", "01x")
    with pytest.raises(NotFound, match="Request for unknown model: 'other' is not found"):
        repo.get("other")


@pytest.mark.parametrize(
    "policy, kept",
    [
        ("", [1, 2, 3]),
        ("version_policy { all {} }", [1, 2, 3]),
        ("version_policy { latest { num_versions: 2 } }", [2, 3]),
        ("version_policy { specific { versions: [1, 3] } }", [1, 3]),
    ],
)
def test_version_policy_chooses_the_versions_loaded(tmp_path, policy, kept):
    for v in (1, 2, 3):
        _write(tmp_path, "m", v)
    (tmp_path / "m" / "config.pbtxt").write_text(policy)
    repo = _repo(tmp_path)
    assert sorted(repo.load("m").versions) == kept


def test_a_policy_that_keeps_nothing_fails_the_model(tmp_path):
    _write(tmp_path, "m", 1)
    (tmp_path / "m" / "config.pbtxt").write_text("version_policy { specific { versions: [7] } }")
    repo = _repo(tmp_path)
    with pytest.raises(
        InvalidArgument, match=r"model 'm': config.pbtxt version_policy keeps none of the versions \[1\]"
    ):
        repo.load("m")
    assert not repo.is_ready() and repo.failures()[0][0] == "m"


@pytest.mark.parametrize(
    "files, message",
    [
        ({"config.json": "{nope"}, "model 'm' config.json: not valid JSON (line 1 column 2)"),
        ({"config.json": "[1]"}, "model 'm' config.json: expected a JSON object"),
        ({"config.json": b'{"a": "\xff"}'}, "model 'm' config.json: cannot be read as UTF-8 JSON"),
        ({"config.json": "{}", "config.pbtxt": ""}, "model 'm' has both config.json and config.pbtxt: keep one"),
        ({"config.json": '{"batching": {"bogus": 1}}'}, "model 'm' config.json: unknown batching option(s) ['bogus']"),
        ({"config.pbtxt": "foo: 1"}, "model 'm' config.pbtxt: line 1: unknown field 'foo'"),
        (
            {"config.pbtxt": b"name: '\xff'"},
            "model 'm' config.pbtxt: cannot be read as UTF-8 text (UnicodeDecodeError)",
        ),
        ({"config.pbtxt": b" " * (1 << 20) + b"\n"}, "model 'm' config.pbtxt: larger than 1048576 bytes"),
        (
            {
                "config.pbtxt": "sequence_batching { state [{ input_name: 'a' output_name: 'b' data_type: TYPE_FP32 "
                "dims: [1] initial_state [{ data_type: TYPE_FP32 dims: [1] data_file: '../config.pbtxt' }] }] }"
            },
            "model 'm' config.pbtxt: sequence_batching.state[0].initial_state.data_file must be a file name",
        ),
    ],
)
def test_config_errors_fail_the_load_with_a_named_reason(tmp_path, files, message):
    _write(tmp_path, "m", 1)
    for name, text in files.items():
        path = tmp_path / "m" / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    repo = _repo(tmp_path)
    with pytest.raises(InvalidArgument) as err:
        repo.load("m")
    assert err.value.message.startswith(message)
    assert repo.failures() == [("m", err.value.message)]
    assert not repo.is_ready() and repo.changes == [("m", False)]
    with pytest.raises(Unavailable, match="model 'm' is not ready"):
        repo.get("m")


def test_an_unreadable_file_names_the_file_not_the_path(tmp_path):
    _write(tmp_path, "m", 1, b"not an onnx file")
    repo = _repo(tmp_path)
    with pytest.raises(InvalidArgument) as err:
        repo.load("m")
    assert err.value.message.startswith(
        "model 'm' version 1 failed to load: ONNX Runtime could not load m/1/model.onnx"
    )
    assert err.value.message.endswith("the server log has the details")
    assert str(tmp_path) not in err.value.message
    assert repo.index() == [("m", "", "UNAVAILABLE", err.value.message)]


def test_a_config_that_disagrees_with_the_file_says_where(tmp_path):
    _write(tmp_path, "m", 1)
    (tmp_path / "m" / "config.pbtxt").write_text(
        'max_batch_size: 2\ninput [{ name: "a" data_type: TYPE_FP32 dims: [5] }]'
    )
    repo = _repo(tmp_path)
    with pytest.raises(InvalidArgument) as err:
        repo.load("m")
    assert err.value.message == (
        "model 'm' version 1 failed to load: m/1/model.onnx: input 'a': dim 1 is 5 in config.pbtxt but 4 in "
        "model.onnx (config [-1, 5], model [-1, 4])"
    )


def test_exit_on_error_stops_at_the_first_failure(tmp_path):
    _write(tmp_path, "a_bad", 1, b"junk")
    _write(tmp_path, "b_good", 1)
    with pytest.raises(StartupError, match=r"model 'a_bad' version 1 failed to load: .*--exit-on-error"):
        _repo(tmp_path, mode="none", exit_on_error=True).load_all()
    repo = _repo(tmp_path, mode="none")
    failures = repo.load_all()
    assert [name for name, _ in failures] == ["a_bad"] and repo.ready_models() == ["b_good"]
    assert not repo.is_ready()


def test_a_failed_reload_keeps_the_old_versions_serving(tmp_path):
    _write(tmp_path, "m", 1)
    repo = _repo(tmp_path)
    repo.load("m")
    _write(tmp_path, "m", 2, b"junk")
    with pytest.raises(InvalidArgument, match="model 'm' version 2 failed to load"):
        repo.load("m")
    assert repo.is_ready() and _answer(repo.get("m")) == [1.0] * 4
    assert [row[:3] for row in repo.index()] == [("m", "1", "READY"), ("m", "2", "UNAVAILABLE")]


@pytest.mark.parametrize(
    "mode, needle", [("none", "--model-control-mode none"), ("poll", "polls its model repository")]
)
def test_load_and_unload_need_explicit_mode(tmp_path, mode, needle):
    _write(tmp_path, "m", 1)
    repo = _repo(tmp_path, mode=mode)
    for action in (repo.load, repo.unload):
        with pytest.raises(ModelControlDisabled, match=needle):
            action("m")
    with pytest.raises(ValueError, match="control_mode must be one of"):
        ModelRepository(tmp_path, CPU, OPTIONS, control_mode="sometimes")


def test_load_and_unload_by_request(tmp_path):
    _write(tmp_path, "m", 1)
    repo = _repo(tmp_path)
    with pytest.raises(InvalidArgument, match="model name '../m' is not a model folder name"):
        repo.load("../m")
    with pytest.raises(NotFound, match="model 'nope' has no <version>/model.onnx"):
        repo.load("nope")
    with pytest.raises(NotFound, match="model 'm' is not loaded"):
        repo.unload("m")
    first = repo.load("m").versions[1]
    assert repo.load("m").versions[1] is first  # unchanged on disk: the live session is kept
    repo.unload("m")
    assert first.retired and repo.ready_models() == [] and repo.is_ready()  # unloaded on request: still ready
    with pytest.raises(Unavailable, match=r"model 'm' is not ready \(UNAVAILABLE: unloaded\)"):
        repo.get("m")
    assert repo.changes == [("m", True), ("m", True), ("m", False)]


def test_a_config_given_with_the_load_request_reloads_every_version(tmp_path):
    from server.model_config import parse

    _write(tmp_path, "m", 1)
    _write(tmp_path, "m", 2)
    repo = _repo(tmp_path)
    old = repo.load("m").versions
    entry = repo.load("m", parse("version_policy { latest { num_versions: 1 } }", "m"))
    assert sorted(entry.versions) == [2] and entry.versions[2] is not old[2]
    assert old[1].retired and old[2].retired


def _touch(path: Path, later_s: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + later_s * 10**9))


def test_poll_follows_the_files_stamps(tmp_path):
    path = _write(tmp_path, "m", 1)
    repo = _repo(tmp_path, mode="poll")
    assert repo.sync() == ["m"] and _answer(repo.get("m")) == [1.0] * 4
    first = repo.get("m")
    assert repo.sync() == []  # nothing changed on disk: nothing reloaded
    onnx.save(_model(3.0), str(path))
    _touch(path)
    assert repo.sync() == ["m"] and _answer(repo.get("m")) == [3.0] * 4 and first.retired
    (tmp_path / "m" / "config.pbtxt").write_text("")  # a config file appearing counts too
    assert repo.sync() == ["m"]
    _write(tmp_path, "m", 2, b"junk")
    assert repo.sync() == ["m"]  # refused, old version serves
    assert repo.sync() == []  # the same refused content is not retried in a loop
    assert repo.get("m").version == 1
    shutil.rmtree(tmp_path / "m")  # the folder gone: unloaded
    assert repo.sync() == ["m"] and repo.ready_models() == [] and repo.changes[-1] == ("m", False)


def test_poll_forgets_a_failed_model_whose_folder_is_gone(tmp_path):
    path = _write(tmp_path, "m", 1, b"junk")
    repo = _repo(tmp_path, mode="poll")
    repo.sync()
    assert not repo.is_ready()
    path.unlink()
    assert repo.sync() == ["m"] and repo.is_ready() and repo.failures() == []


def test_disk_stamp_is_each_versions_mtime_and_size_and_the_configs(tmp_path):
    path = _write(tmp_path, "m", 4)
    stamp = repository._disk_stamp(tmp_path / "m")
    assert stamp == {4: (path.stat().st_mtime_ns, path.stat().st_size)}
    (tmp_path / "m" / "config.json").write_text("{}")
    assert repository._disk_stamp(tmp_path / "m")["config"] == (tmp_path / "m" / "config.json").stat().st_mtime_ns


# -- output layout probe ---------------------------------------------------------------------


def _ragged_model(y_time_name) -> onnx.ModelProto:
    """x [batch, time, 2], lengths [batch] -> y [batch, time, 2] (time axis named or not), s [batch, 3]."""
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("ReduceSum", ["x", "ax"], ["r"], keepdims=0),
        helper.make_node("Concat", ["r", "r2"], ["s"], axis=1),
        helper.make_node("Slice", ["r", "zero", "one", "one"], ["r2"]),
        helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1], [1])),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])),
    ]
    graph = helper.make_graph(
        nodes,
        "r",
        [helper.make_tensor_value_info("x", F, ["batch", "time", 2]),
         helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", F, ["batch", y_time_name, 2]),
         helper.make_tensor_value_info("s", F, ["batch", None])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_probe_learns_each_outputs_batch_and_time_axes(tmp_path):
    _write(tmp_path, "r", 1, _ragged_model(None))
    (tmp_path / "r" / "config.pbtxt").write_text(
        'parameters { key: "lengths_input" value { string_value: "lengths" } }'
    )
    rt = _repo(tmp_path).load("r").versions[1]
    assert rt.output_layout == {"y": ["batch", "time", 2], "s": ["batch", 3]}
    assert rt.signature.output("y").time_axis == 1  # the file left it unnamed: taken from the probe
    assert rt.signature.batching_rule == "ragged"
    assert output_dims(rt, "y", 5, 7) == [5, 7, 2] and output_dims(rt, "s", 5, 7) == [5, 3]
    assert output_dims(rt, "nope", 1, 1) is None


def test_probe_stops_merging_when_a_declared_batch_axis_does_not_follow_the_batch(tmp_path):
    # b = sum of everything, kept: [1, 1] whatever the batch, yet max_batch_size says axis 0 is the batch
    nodes = [helper.make_node("ReduceSum", ["a"], ["b"], keepdims=1)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("a", F, [None, 4])],
        [helper.make_tensor_value_info("b", F, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _write(tmp_path, "m", 1, model)
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 4")
    rt = _repo(tmp_path).load("m").versions[1]
    assert rt.output_layout == {"b": [1, 1]}
    assert not rt.signature.merge and rt.signature.batching_rule == "none"


def test_probe_gives_up_on_a_free_dim_it_cannot_size(tmp_path):
    _write(tmp_path, "m", 1, _model(2.0, a_shape=("batch", None), b_shape=("batch", None)))
    rt = _repo(tmp_path).load("m").versions[1]
    assert rt.output_layout == {} and probe_output_layout(rt) == {}
    assert output_dims(rt, "b", 1, 1) is None
    assert rt.signature.batching_rule == "equal"  # not ragged: merging by equal shapes stays safe


def test_version_folders_starting_with_zero_are_ignored(tmp_path):
    _write(tmp_path, "m", "0", _model(7.0))
    _write(tmp_path, "m", "01", _model(5.0))
    _write(tmp_path, "m", "1", _model(1.0))
    entry = _repo(tmp_path).load("m")
    assert sorted(entry.versions) == [1]
    assert _answer(entry.versions[1]) == [1.0] * 4


def test_a_model_on_disk_not_yet_loaded_is_indexed(tmp_path):
    _write(tmp_path, "m", 1)
    repo = _repo(tmp_path)
    assert repo.index() == [("m", "", "UNAVAILABLE", "not loaded")]
    assert repo.is_ready() and repo.ready_models() == []
