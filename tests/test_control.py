"""Triton's stateful models with control inputs (sequence_batching.control_input), served from a
repository built like Triton's docs/examples/model_repository: the configs as Triton ships them
(simple_sequence, simple_dyna_sequence; simple_string_dyna_sequence as qa/L0_http derives it, with
the `state` section an ONNX model needs to accumulate), ONNX models made here with onnx.helper that
compute what Triton's do (qa/common/gen_qa_sequence_models.py). Checked over real gRPC: the server
feeds START / END / READY / CORRID, concurrent sequences batch together, and every result equals
running that sequence alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.errors import InvalidArgument
from server.model_config import parse
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc

CPU = "CPUExecutionProvider"

_CONTROLS = """
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: %s } ] }
  ]
"""
_TENSORS = """
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""
# Triton's docs/examples/model_repository/simple_sequence/config.pbtxt (license header left out)
SIMPLE_SEQUENCE = (
    """name: "simple_sequence"
platform: "onnxruntime_onnx"
max_batch_size: 8
sequence_batching {
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] }
  ]
}
"""
    + _TENSORS
    + """
instance_group [ { kind: KIND_CPU } ]
"""
)
# .../simple_dyna_sequence/config.pbtxt
SIMPLE_DYNA_SEQUENCE = (
    """name: "simple_dyna_sequence"
platform: "onnxruntime_onnx"
max_batch_size: 8
sequence_batching {
  max_sequence_idle_microseconds: 10000000
  oldest { max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }
"""
    + _CONTROLS % "TYPE_UINT64"
    + """
}
"""
    + _TENSORS
    + """
parameters [ { key: "execute_delay_ms" value: { string_value: "3" } } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
"""
)
# qa/L0_http's simple_string_dyna_sequence: the dyna config with CORRID TYPE_STRING; Triton's is a
# C++ backend that accumulates, so the ONNX model here keeps its sum in an implicit state
SIMPLE_STRING_DYNA_SEQUENCE = (
    SIMPLE_DYNA_SEQUENCE.replace("simple_dyna_sequence", "simple_string_dyna_sequence")
    .replace("data_type: TYPE_UINT64", "data_type: TYPE_STRING")
    .replace(
        "max_sequence_idle_microseconds: 10000000",
        "max_sequence_idle_microseconds: 10000000\n"
        '  state [ { input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]',
    )
)


def _int(name: str, elem=TensorProto.INT32):
    return helper.make_tensor_value_info(name, elem, ["batch_size", 1])


def sequence_model() -> onnx.ModelProto:
    """gen_qa_sequence_models.py's ONNX model: OUTPUT = READY * (INPUT + START)."""
    nodes = [
        helper.make_node("Add", ["INPUT", "START"], ["add"]),
        helper.make_node("Mul", ["READY", "add"], ["OUTPUT"]),
    ]
    graph = helper.make_graph(nodes, "seq", [_int("INPUT"), _int("START"), _int("READY")], [_int("OUTPUT")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def dyna_model(corrid=TensorProto.UINT64, accumulate: bool = False) -> onnx.ModelProto:
    """The dyna model: OUTPUT = READY * (INPUT + START + END * CORRID); `accumulate`: Triton's
    dyna_sequence backend instead, OUTPUT = READY * (sum so far + INPUT + END * CORRID), the sum
    kept in the implicit state ACC_IN -> ACC_OUT."""
    nodes = [
        helper.make_node("Cast", ["CORRID"], ["corrid"], to=TensorProto.INT32),
        helper.make_node("Mul", ["END", "corrid"], ["end_id"]),
        helper.make_node("Add", ["ACC_IN" if accumulate else "START", "INPUT"], ["sum0"]),
        helper.make_node("Add", ["sum0", "end_id"], ["sum1"]),
        helper.make_node("Mul", ["READY", "sum1"], ["OUTPUT"]),
    ]
    inputs = [_int("INPUT"), _int("START"), _int("END"), _int("READY"), _int("CORRID", corrid)]
    outputs = [_int("OUTPUT")]
    if accumulate:
        nodes.append(helper.make_node("Identity", ["OUTPUT"], ["ACC_OUT"]))
        inputs.append(_int("ACC_IN"))
        outputs.append(_int("ACC_OUT"))
    graph = helper.make_graph(nodes, "dyna", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def triton_sequence_repository(root: Path) -> Path:
    """Triton's sequence models as its examples expect them (see the module docstring)."""
    for name, model, pbtxt in (
        ("simple_sequence", sequence_model(), SIMPLE_SEQUENCE),
        ("simple_dyna_sequence", dyna_model(), SIMPLE_DYNA_SEQUENCE),
        ("simple_string_dyna_sequence", dyna_model(TensorProto.STRING, True), SIMPLE_STRING_DYNA_SEQUENCE),
    ):
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))
        (root / name / "config.pbtxt").write_text(pbtxt)
    return root


def expected(model: str, seq_id, values: list[int]) -> list[int]:
    """What each request of a sequence returns, computed here, not by the server."""
    out, acc = [], 0
    for i, v in enumerate(values):
        start, end = int(i == 0), int(i == len(values) - 1)
        if model == "simple_sequence":
            out.append(v + start)
        elif model == "simple_dyna_sequence":
            out.append(v + start + end * int(seq_id))
        else:
            acc = acc + v + end * int(seq_id)
            out.append(acc)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server.app import InferenceServer
    from server.config import Settings

    root = triton_sequence_repository(tmp_path_factory.mktemp("triton_seq"))
    srv = InferenceServer(
        Settings(port=0, http_port=0, model_repository=root, device="cpu", metrics_port=-1, log_level="WARNING")
    )
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture()
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _request(model: str, value: int, seq_id=None, start=False, end=False) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    t.contents.int_contents.append(value)
    if seq_id is not None:
        if isinstance(seq_id, str):
            req.parameters["sequence_id"].string_param = seq_id
        else:
            req.parameters["sequence_id"].uint64_param = seq_id
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    return req


def _value(response: pb.ModelInferResponse) -> int:
    assert [o.name for o in response.outputs] == ["OUTPUT"]
    return int(np.frombuffer(response.raw_output_contents[0], np.int32)[0])


def run_sequence(stub, model: str, seq_id, values: list[int], barrier=None) -> list[int]:
    out = []
    for i, v in enumerate(values):
        if barrier is not None:
            barrier.wait()
        response = stub.ModelInfer(_request(model, v, seq_id, i == 0, i == len(values) - 1), timeout=30)
        out.append(_value(response))
    return out


def _stats(stub, model: str) -> tuple[int, int]:
    s = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10).model_stats[0]
    return s.inference_count, s.execution_count


# -- config ----------------------------------------------------------------------------------


def test_triton_configs_parse_with_their_controls_and_strategies():
    triton = parse(SIMPLE_DYNA_SEQUENCE, "simple_dyna_sequence", CPU)
    parsed = parse(SIMPLE_DYNA_SEQUENCE, "simple_dyna_sequence", CPU)
    assert [(c.input, c.kind, c.datatype, c.false_true) for c in triton["triton"].controls] == [
        ("START", "start", "INT32", (0, 1)),
        ("END", "end", "INT32", (0, 1)),
        ("READY", "ready", "INT32", (0, 1)),
        ("CORRID", "corrid", "UINT64", (0, 1)),
    ]
    assert triton["triton"].strategy == "oldest" and triton["triton"].max_sequences == 1024
    assert parsed["batching"] == {"max_batch": 8, "max_queue_delay_us": 10000, "instances": 2, "enabled": True}
    simple = parse(SIMPLE_SEQUENCE, "simple_sequence", CPU)
    # instance_group without count: Triton's default for an onnxruntime KIND_CPU group is 2
    assert simple["batching"]["instances"] == 2 and simple["triton"].strategy == ""
    assert simple["triton"].ignored == []
    fp = 'sequence_batching { control_input [{ name: "S" control [{ fp32_false_true: [0.5, 2] }] }] }'
    assert parse(fp, "m", CPU)["triton"].controls[0].false_true == (0.5, 2.0)


@pytest.mark.parametrize(
    "control,message",
    [
        ("kind: CONTROL_SEQUENCE_START", "exactly one of int32_false_true"),
        ("kind: CONTROL_SEQUENCE_READY int32_false_true: [0, 1, 2]", "two values"),
        ("kind: CONTROL_SEQUENCE_END int32_false_true: [0, 1] data_type: TYPE_INT32", "no data_type"),
        ("kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32", "TYPE_UINT64"),
        ("kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 int32_false_true: [0, 1]", "no false/true"),
    ],
)
def test_a_bad_control_names_the_input_and_what_is_expected(control, message):
    text = f'sequence_batching {{ control_input [{{ name: "C" control [{{ {control} }}] }}] }}'
    with pytest.raises(InvalidArgument, match=message) as err:
        parse(text, "m", CPU)
    assert "control_input[0] 'C'" in str(err.value)


def test_instance_group_defaults_follow_triton():
    assert parse("instance_group [{ }]", "m", CPU)["batching"]["instances"] == 2  # KIND_AUTO on a CPU: CPU
    assert parse("instance_group [{ }]", "m", "CUDAExecutionProvider")["batching"]["instances"] == 1  # one GPU
    assert parse("instance_group [{ kind: KIND_GPU }]", "m", "")["batching"]["instances"] == 1
    with pytest.raises(InvalidArgument, match="count must be >= 1, got -1"):
        parse("instance_group [{ count: -1 }]", "m", CPU)


def test_explicit_max_batch_size_zero_is_recorded():
    assert parse("max_batch_size: 0", "m", CPU)["triton"].batch_declared
    assert not parse("# max_batch_size: 0\n", "m", CPU)["triton"].batch_declared


# -- served ----------------------------------------------------------------------------------


def test_metadata_hides_the_control_inputs(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="simple_dyna_sequence"), timeout=10)
    assert [t.name for t in meta.inputs] == ["INPUT"] and [t.name for t in meta.outputs] == ["OUTPUT"]
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="simple_string_dyna_sequence"), timeout=10)
    assert [t.name for t in meta.inputs] == ["INPUT"] and [t.name for t in meta.outputs] == ["OUTPUT"]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="simple_sequence"), timeout=10).config
    assert [t.name for t in config.input] == ["INPUT"] and config.max_batch_size == 8
    assert [c.name for c in config.sequence_batching.control_input] == ["START", "READY"]
    assert list(config.sequence_batching.control_input[1].control[0].int32_false_true) == [0, 1]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="simple_dyna_sequence"), timeout=10).config
    corrid = config.sequence_batching.control_input[3].control[0]
    assert corrid.kind == pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID
    assert corrid.data_type == pb.TYPE_UINT64
    oldest = config.sequence_batching.oldest
    assert (oldest.max_candidate_sequences, oldest.max_queue_delay_microseconds) == (1024, 10000)


@pytest.mark.parametrize(
    "model,seq_id",
    [
        ("simple_sequence", 1000),
        ("simple_sequence", "d3c3a1a2-1f4e-4a51-9bb3-0c5f3a7f2b11"),
        ("simple_dyna_sequence", 1001),
        ("simple_string_dyna_sequence", "1002"),
    ],
)
def test_a_sequence_alone_gets_what_the_model_computes(stub, model, seq_id):
    values = [0, 11, 7, 5, 3, 2, 0, 1]
    assert run_sequence(stub, model, seq_id, values) == expected(model, seq_id, values)


def test_corrid_uint64_keeps_all_64_bits(tmp_path):
    """A uint64 CORRID above 2**63 reaches the model exactly (an identity of CORRID)."""
    from server.app import InferenceServer
    from server.config import Settings

    nodes = [helper.make_node("Identity", ["CORRID"], ["ID"]), helper.make_node("Identity", ["INPUT"], ["OUTPUT"])]
    inputs = [_int("INPUT"), _int("CORRID", TensorProto.UINT64)]
    graph = helper.make_graph(nodes, "id", inputs, [_int("OUTPUT"), _int("ID", TensorProto.UINT64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    (tmp_path / "corrid" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "corrid/1/model.onnx"))
    (tmp_path / "corrid" / "config.pbtxt").write_text(
        'max_batch_size: 4\nsequence_batching { control_input [{ name: "CORRID" control [{ '
        "kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }] }] }\n"
    )
    srv = InferenceServer(Settings(port=0, model_repository=tmp_path, device="cpu", metrics_port=-1,
                                   log_level="WARNING"))  # fmt: skip
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            big = (1 << 64) - 3
            req = _request("corrid", 4, big, True, True)
            req.outputs.add(name="ID")
            response = stub.ModelInfer(req, timeout=30)
            assert int(np.frombuffer(response.raw_output_contents[0], np.uint64)[0]) == big
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_request("corrid", 4, "abc", True, True), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "CORRID" in err.value.details()
    finally:
        srv.stop(grace=1)


@pytest.mark.parametrize("model", ["simple_dyna_sequence", "simple_string_dyna_sequence", "simple_sequence"])
def test_interleaved_sequences_batch_together_and_equal_each_alone(server, stub, model):
    """8 sequences advance in lockstep from 8 threads (a barrier before each step), so their
    requests meet in the queue (the oldest strategy waits 10 ms for company): they run in merged
    batches, and every sequence still gets exactly what it gets alone."""
    rng = np.random.default_rng(7)
    ids = [5000 + i for i in range(8)]
    sids = [str(i) if model == "simple_string_dyna_sequence" else i for i in ids]
    values = {i: [int(v) for v in rng.integers(-50, 50, 6)] for i in ids}
    alone = {i: run_sequence(stub, model, s, values[i]) for i, s in zip(ids, sids)}
    assert alone == {i: expected(model, i, values[i]) for i in ids}
    before = _stats(stub, model)
    barrier = threading.Barrier(len(ids))
    with ThreadPoolExecutor(len(ids)) as pool:
        channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in ids]
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        futures = {i: pool.submit(run_sequence, st, model, s, values[i], barrier) for i, s, st in zip(ids, sids, stubs)}
        together = {i: f.result(timeout=60) for i, f in futures.items()}
        for c in channels:
            c.close()
    assert together == alone
    inferences, executions = (a - b for a, b in zip(_stats(stub, model), before))
    assert inferences == 8 * 6
    if model != "simple_sequence":  # direct, no delay: merging depends on timing; oldest waits for company
        assert executions < inferences, (inferences, executions)


def test_a_request_without_sequence_id_is_refused_by_name(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_request("simple_sequence", 3), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must specify a non-zero or non-empty correlation ID" in err.value.details()
    assert run_sequence(stub, "simple_sequence", 77, [3]) == [4]  # still serving


def test_control_inputs_cannot_be_sent_by_the_client(stub):
    req = _request("simple_sequence", 3, 78, True, True)
    t = req.inputs.add(name="START", datatype="INT32", shape=[1, 1])
    t.contents.int_contents.append(0)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "START" in err.value.details()


def _serve(root: Path):
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(
        Settings(port=0, http_port=0, model_repository=root, device="cpu", metrics_port=-1, log_level="WARNING")
    )
    srv.start()
    return srv


def test_oldest_strategy_candidates_and_preferred_batch_size(tmp_path):
    """`max_candidate_sequences: 2`: a third live sequence is refused by name until one ends.
    `preferred_batch_size: [2]` with a 0.5 s wait: 4 sequences stepping together run in pairs
    (without it the wait would gather all 4 into one run)."""
    pbtxt = SIMPLE_DYNA_SEQUENCE.replace(
        "oldest { max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }",
        "oldest { max_candidate_sequences: 2 }",
    ).replace("simple_dyna_sequence", "few")
    paired = SIMPLE_DYNA_SEQUENCE.replace(
        "oldest { max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }",
        "oldest { preferred_batch_size: [2] max_queue_delay_microseconds: 500000 }",
    ).replace("simple_dyna_sequence", "paired")
    for name, text in (("few", pbtxt), ("paired", paired)):
        (tmp_path / name / "1").mkdir(parents=True)
        onnx.save(dyna_model(), str(tmp_path / name / "1" / "model.onnx"))
        (tmp_path / name / "config.pbtxt").write_text(text)
    srv = _serve(tmp_path)
    try:
        target = f"127.0.0.1:{srv.port}"
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert _value(stub.ModelInfer(_request("few", 1, 11, start=True), timeout=30)) == 2
            assert _value(stub.ModelInfer(_request("few", 1, 12, start=True), timeout=30)) == 2
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_request("few", 1, 13, start=True), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_candidate_sequences = 2" in err.value.details()
            assert _value(stub.ModelInfer(_request("few", 1, 11, end=True), timeout=30)) == 12
            assert _value(stub.ModelInfer(_request("few", 1, 13, start=True), timeout=30)) == 2

            ids = [21, 22, 23, 24]
            values = {i: [i, -i, 3] for i in ids}
            barrier = threading.Barrier(len(ids))
            channels = [grpc.insecure_channel(target) for _ in ids]
            with ThreadPoolExecutor(len(ids)) as pool:
                futures = {
                    i: pool.submit(run_sequence, pb_grpc.GRPCInferenceServiceStub(c), "paired", i, values[i], barrier)
                    for i, c in zip(ids, channels)
                }
                assert {i: f.result(timeout=60) for i, f in futures.items()} == {
                    i: expected("simple_dyna_sequence", i, values[i]) for i in ids
                }
            for c in channels:
                c.close()
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="paired"), timeout=10).model_stats[0]
            sizes = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
            assert sizes == {2: 6}, sizes
    finally:
        srv.stop(grace=1)


def test_tritons_sequence_examples_pass_unchanged(tmp_path):
    """Triton's 8 Python sequence examples (triton-inference-server/client src/python/examples),
    run unchanged with tritonclient against this repository. They are Triton's files, not copied
    here: set TRITON_CLIENT_EXAMPLES to a folder holding them (tests never download)."""
    import os
    import subprocess

    folder = os.environ.get("TRITON_CLIENT_EXAMPLES")
    if not folder:
        pytest.skip("TRITON_CLIENT_EXAMPLES is not set (a folder with Triton's simple_*sequence*_client.py)")
    from tests.test_any_model import TRITON_PYTHON

    srv = _serve(triton_sequence_repository(tmp_path))
    try:
        grpc_url, http_url = f"localhost:{srv.port}", f"localhost:{srv.http_port}"
        runs = [
            (script, url, flag)
            for script, url in (
                ("simple_grpc_sequence_sync_infer_client.py", grpc_url),
                ("simple_grpc_sequence_stream_infer_client.py", grpc_url),
                ("simple_grpc_aio_sequence_stream_infer_client.py", grpc_url),
                ("simple_http_sequence_sync_infer_client.py", http_url),
            )
            for flag in ([], ["-d"])
        ]
        for script, url, flag in runs:
            res = subprocess.run(
                [TRITON_PYTHON, str(Path(folder) / script), "-u", url, *flag],
                capture_output=True, text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")},
            )  # fmt: skip
            assert res.returncode == 0 and "PASS" in res.stdout, (script, flag, res.stdout[-2000:], res.stderr[-2000:])
    finally:
        srv.stop(grace=1)


def test_direct_strategy_waits_only_below_its_minimum_slot_utilization(tmp_path):
    """Triton's direct strategy: `max_queue_delay_microseconds` is how long a run may wait while
    fewer than `minimum_slot_utilization` x max_batch_size rows are ready. At 0 (the default) a
    lone request runs at once despite a 3 s delay; at 0.5 of 4 slots two sequences stepping
    together run in pairs, without waiting out the delay."""
    base = SIMPLE_SEQUENCE.replace("max_batch_size: 8", "max_batch_size: 4")
    eager = base.replace(
        "sequence_batching {",
        "sequence_batching {\n  direct { max_queue_delay_microseconds: 3000000 minimum_slot_utilization: 0 }",
    ).replace("simple_sequence", "eager")
    half = eager.replace("minimum_slot_utilization: 0", "minimum_slot_utilization: 0.5").replace("eager", "half")
    assert "max_queue_delay_us" not in parse(eager, "eager", CPU)["batching"]
    assert parse(half, "half", CPU)["batching"]["ready_rows"] == 2
    for name, text in (("eager", eager), ("half", half)):
        (tmp_path / name / "1").mkdir(parents=True)
        onnx.save(sequence_model(), str(tmp_path / name / "1" / "model.onnx"))
        (tmp_path / name / "config.pbtxt").write_text(text)
    srv = _serve(tmp_path)
    try:
        target = f"127.0.0.1:{srv.port}"
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            t0 = time.monotonic()
            assert run_sequence(stub, "eager", 5, [4, 5]) == [5, 5]
            assert time.monotonic() - t0 < 2.0
            barrier = threading.Barrier(2)
            channels = [grpc.insecure_channel(target) for _ in range(2)]
            t0 = time.monotonic()
            with ThreadPoolExecutor(2) as pool:
                futures = [
                    pool.submit(run_sequence, pb_grpc.GRPCInferenceServiceStub(c), "half", 30 + i, [i, 7, 8], barrier)
                    for i, c in enumerate(channels)
                ]
                assert [f.result(timeout=60) for f in futures] == [[1, 7, 8], [2, 7, 8]]
            elapsed = time.monotonic() - t0
            for c in channels:
                c.close()
            assert elapsed < 2.5, elapsed  # three steps, none waited out the 3 s delay
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="half"), timeout=10).model_stats[0]
            assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {2: 3}
    finally:
        srv.stop(grace=1)


def test_an_idle_sequence_gives_its_slot_back(tmp_path):
    """`max_candidate_sequences: 1` with `max_sequence_idle_microseconds: 300000`: a second
    sequence is refused while the first is live, starts once the first has been idle 0.3 s, and
    the first's next request is told to start again, in Triton's words."""
    text = SIMPLE_DYNA_SEQUENCE.replace(
        "oldest { max_candidate_sequences: 1024 max_queue_delay_microseconds: 10000 }",
        "oldest { max_candidate_sequences: 1 }",
    ).replace("max_sequence_idle_microseconds: 10000000", "max_sequence_idle_microseconds: 300000")
    text = text.replace("simple_dyna_sequence", "one")
    (tmp_path / "one" / "1").mkdir(parents=True)
    onnx.save(dyna_model(), str(tmp_path / "one" / "1" / "model.onnx"))
    (tmp_path / "one" / "config.pbtxt").write_text(text)
    from server.app import InferenceServer
    from server.config import Settings

    srv = InferenceServer(Settings(port=0, model_repository=tmp_path, device="cpu", metrics_port=-1,
                                   log_level="WARNING", sequence_idle_s=600))  # fmt: skip
    srv.start()  # the server's own sweep runs every second: the start below frees the idle one itself
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert _value(stub.ModelInfer(_request("one", 1, 41, start=True), timeout=30)) == 2
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_request("one", 1, 42, start=True), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.4)
            assert _value(stub.ModelInfer(_request("one", 5, 42, start=True), timeout=30)) == 6
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_request("one", 1, 41), timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert err.value.details().startswith(
                "inference request for sequence 41 to model 'one' must specify the START flag on the first request"
            )
            assert "freed after 0.3 s idle" in err.value.details()
    finally:
        srv.stop(grace=1)


def test_batch_policy_checks_preferred_sizes_and_ready_rows():
    from server.batcher import BatchPolicy, policy_from_config

    policy = policy_from_config(BatchPolicy(), "m", {"batching": {"max_batch": 8, "preferred_batch_size": [4, 2, 4]}})
    assert policy.preferred_batch_size == (2, 4)
    for bad in ({"preferred_batch_size": [9]}, {"preferred_batch_size": [0]}, {"ready_rows": -1}):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            policy_from_config(BatchPolicy(), "m", {"batching": {"max_batch": 8, **bad}})
