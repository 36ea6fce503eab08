"""The descriptions both frontends answer (server/describe.py), without sockets: a data plane over
real models, its descriptions checked against protobuf's own JSON printer with Triton's options
(original field names, fields without presence written at their defaults), and the gRPC message
built from each."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from server import describe
from server.config import Settings
from server.errors import NotFound
from server.factory import build_plane
from server.proto import grpc_service_pb2 as pb
from tests.test_control import triton_sequence_repository

MODELS = ["bi", "uni", "suni", "sbi", "bi_static_t12"]
TRITON = ["simple_sequence", "simple_dyna_sequence", "simple_string_dyna_sequence"]


@pytest.fixture(scope="module")
def plane(repo, tmp_path_factory):
    """The shared test models and Triton's sequence examples (a state, control inputs, an oldest
    strategy, parameters) in one repository, every model loaded."""
    root = tmp_path_factory.mktemp("describe")
    for name in MODELS:
        (root / name).symlink_to(repo / name, target_is_directory=True)
    triton_sequence_repository(root)
    dyn = root / "dyn"
    for version in ("1", "2"):
        (dyn / version).mkdir(parents=True)
        (dyn / version / "model.onnx").symlink_to(repo / "uni" / "1" / "model.onnx")
    (dyn / "config.pbtxt").write_text(
        'name: "dyn"\nversion_policy { latest { num_versions: 2 } }\n'
        "dynamic_batching { max_queue_delay_microseconds: 300 }\n"
        'parameters { key: "zeta" value { string_value: "last" } }\n'
        'parameters { key: "alpha" value { string_value: "first" } }\n'
    )
    plane = build_plane(Settings(model_repository=root, device="cpu", instances=2, model_control_mode="explicit"))
    for name in [*MODELS, *TRITON, "dyn"]:
        plane.repository.load(name, None)
    yield plane
    plane.executor.shutdown(wait=False)


def _as_text(value):
    """Every number as its decimal text (protobuf's JSON writes 64-bit integers as strings, Triton's as numbers)."""
    if isinstance(value, dict):
        return {k: _as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _printed(message) -> dict:
    """The message as protobuf's JSON printer writes it with Triton's HTTP options."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _in_declaration_order(descriptor, value: dict) -> None:
    """Fields in declaration order at every level (the order Triton's JSON printer writes them)."""
    names = [f.name for f in descriptor.fields if f.name in value]
    assert list(value) == names, (descriptor.full_name, list(value))
    for f in descriptor.fields:
        if f.name not in value or f.message_type is None:
            continue
        if f.message_type.GetOptions().map_entry:
            inner = f.message_type.fields_by_name["value"].message_type
            items = list(value[f.name].values()) if inner is not None else []
        else:
            inner = f.message_type
            items = value[f.name] if isinstance(value[f.name], list) else [value[f.name]]
        for item in items:
            _in_declaration_order(inner, item)


@pytest.mark.parametrize("name", [*MODELS, *TRITON, "dyn"])
def test_model_config_is_tritons_json(plane, name):
    """Every field protobuf's printer writes (defaults included), nothing else, 64-bit integers as
    numbers, in declaration order; the gRPC message built from it is the one ParseDict builds."""
    config = describe.model_config(plane, name)
    message = pb.ModelConfig(**config)
    assert message == json_format.ParseDict(config, pb.ModelConfig())
    assert _as_text(config) == _as_text(_printed(message))
    _in_declaration_order(pb.ModelConfig.DESCRIPTOR, config)
    text = json.dumps(config)  # plain JSON: no protobuf or numpy value slipped in
    assert '"max_batch_size": ' in text and '"data_type": "TYPE_' in text
    assert pb.ModelConfigResponse(config=config).config == message


def test_model_config_reports_what_the_config_declared(plane):
    dyn = describe.model_config(plane, "dyn")
    assert dyn["version_policy"] == {"latest": {"num_versions": 2}}
    assert dyn["dynamic_batching"]["max_queue_delay_microseconds"] == 300
    assert "sequence_batching" not in dyn  # a oneof: only the member that is set
    params = list(dyn["parameters"])
    assert params == sorted(params) and dyn["parameters"]["alpha"] == {"string_value": "first"}
    seq = describe.model_config(plane, "simple_string_dyna_sequence")
    assert seq["max_batch_size"] == 8 and seq["input"][0]["dims"] == [1]  # batch left out, as in the file
    batching = seq["sequence_batching"]
    assert batching["max_sequence_idle_microseconds"] == 10_000_000
    assert batching["oldest"]["max_candidate_sequences"] == 1024
    assert [c["name"] for c in batching["control_input"]] == ["START", "END", "READY", "CORRID"]
    (state,) = batching["state"]
    assert (state["input_name"], state["output_name"], state["dims"]) == ("ACC_IN", "ACC_OUT", [1])
    (initial,) = state["initial_state"]
    assert initial["zero_data"] is True and "data_file" not in initial  # the oneof's set member only
    stateless = describe.model_config(plane, "bi")
    assert stateless["max_batch_size"] == 0 and stateless["version_policy"] == {"all": {}}
    assert stateless["parameters"]["execution_provider"] == {"string_value": "CPUExecutionProvider"}


def test_model_config_unknown_model_is_not_found(plane):
    with pytest.raises(NotFound):
        describe.model_config(plane, "nope")
    with pytest.raises(NotFound):
        describe.model_config(plane, "bi", "7")


def test_model_metadata_and_its_message(plane):
    meta, headers = describe.model_metadata(plane, "suni")
    assert list(meta) == ["name", "versions", "platform", "inputs", "outputs"]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert describe.model_metadata(plane, "dyn")[0]["versions"] == ["1", "2"]
    assert [t["name"] for t in meta["inputs"]] == ["x", "lengths", "h0", "c0"]
    assert all(isinstance(d, int) for t in meta["inputs"] + meta["outputs"] for d in t["shape"])
    message = pb.ModelMetadataResponse(**meta)
    assert _as_text(meta) == _as_text(_printed(message))
    assert headers["lstm-model-version"] == "1" and headers["lstm-provider"] == "CPUExecutionProvider"
    assert json.loads(headers["lstm-roles"])["states"][0] == {"implicit": False, "input": "h0", "output": "h_n"}


def test_metadata_header_keeps_lstm_keys_first_and_counts_the_rest():
    meta = {f"user.key{i:03d}": "v" * 40 for i in range(100)} | {"lstm.opset": "17", "lstm.precision": "fp32"}
    text = describe._metadata_json(meta)
    kept = json.loads(text)
    assert len(text) <= describe.HEADER_MAX
    assert kept["lstm.opset"] == "17" and kept["lstm.precision"] == "fp32"
    assert kept["_omitted"] == len(meta) - (len(kept) - 1) > 0
    small = {"lstm.opset": "17"}
    assert json.loads(describe._metadata_json(small)) == small  # whole when it fits: no _omitted


def test_headers_are_bounded_and_ascii():
    headers = {"a": "x" * 1020, "b": "y" * 1025, "c": "z" * 1020, "d": "é" * 10, "e": "w" * 1020, "f": "v" * 1020}
    out = describe._bounded(headers)
    assert "b" not in out  # over one header's limit: left out whole, never cut
    assert out["d"] == "\\xe9" * 10  # what gRPC can send
    assert sum(len(k) + len(v) for k, v in out.items()) <= describe.HEADERS_MAX
    assert list(out) == ["a", "c", "d", "e"]  # "f" would pass the total


def test_statistics_list_loaded_versions_with_zeros(plane):
    every = describe.statistics(plane)
    names = [(s["name"], s["version"]) for s in every["model_stats"]]
    assert names == sorted(names) and ("dyn", "1") in names and ("dyn", "2") in names
    assert [s["version"] for s in describe.statistics(plane, "dyn", "2")["model_stats"]] == ["2"]
    assert [s["version"] for s in describe.statistics(plane, "dyn")["model_stats"]] == ["1", "2"]
    for one in every["model_stats"]:
        assert _as_text(one) == _as_text(_printed(pb.ModelStatistics(**one)))
        _in_declaration_order(pb.ModelStatistics.DESCRIPTOR, one)
    one = describe.statistics(plane, "bi", "1")["model_stats"]
    assert [(s["name"], s["version"], s["inference_count"]) for s in one] == [("bi", "1", 0)]
    assert one[0]["inference_stats"]["success"] == {"count": 0, "ns": 0}
    for name, version in (("nope", ""), ("bi", "2")):
        with pytest.raises(NotFound):
            describe.statistics(plane, name, version)
    assert pb.ModelStatisticsResponse(**every).model_stats[0].name == every["model_stats"][0]["name"]


def test_repository_index_and_readiness(plane):
    index = describe.repository_index(plane)
    assert {"name": "bi", "version": "1", "state": "READY", "reason": ""} in index
    assert describe.repository_index(plane, ready_only=True) == [m for m in index if m["state"] == "READY"]
    assert [m.name for m in pb.RepositoryIndexResponse(models=index).models] == [m["name"] for m in index]
    assert describe.model_ready(plane, "bi", "", True) is True
    assert describe.model_ready(plane, "bi", "", False) is False  # draining: not ready
    with pytest.raises(NotFound):
        describe.model_ready(plane, "nope", "", True)


def test_server_metadata_message():
    meta = describe.server_metadata(["model_repository", "statistics"])
    assert pb.ServerMetadataResponse(**meta).extensions == ["model_repository", "statistics"]
    assert list(meta) == ["name", "version", "extensions"] and meta["name"] == "lstm-serve"


def test_triton_json_refuses_a_field_the_message_lacks():
    with pytest.raises(KeyError, match="inference.ModelInput has no field"):
        describe.triton_json(pb.ModelConfig.DESCRIPTOR, {"input": [{"name": "x", "dtype": "TYPE_FP32"}]})
    full = describe.triton_json(pb.ModelInput.DESCRIPTOR, {"name": "x"})
    assert full == _printed(pb.ModelInput(name="x"))  # every default, no 64-bit values here
