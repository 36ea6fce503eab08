"""The call gate (`server.gate`): hostile calls are refused or stopped while an honest client's
health checks keep answering. Real servers on loopback port 0 (gRPC and REST), real ONNX Runtime
sessions, models built here with onnx.helper (an ONNX Loop whose trip count the client chooses,
the shape of a generation model's max_length).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.codec import encode_input
from server.errors import InvalidArgument
from server.proto import grpc_service_pb2 as pb
from server.proto import grpc_service_pb2_grpc as pb_grpc
from server.runtime import bounded_by_input_size

onnx = pytest.importorskip("onnx")
from onnx import TensorProto  # noqa: E402
from onnx import helper as oh  # noqa: E402

TOKENS = ("token-a", "token-b")
HEALTH_S = 0.5  # an honest client's health check answers within this while an attack runs


def _save(graph, path: Path) -> Path:
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def loop_graph():
    """y = Loop(n) { acc = sin(acc) + acc }: the client's `n` sets the run time."""
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]),
         oh.make_node("Sin", ["acc_in"], ["s"]),
         oh.make_node("Add", ["s", "acc_in"], ["acc_out"])],
        "body",
        [oh.make_tensor_value_info("i", TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         oh.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["k"])],
        [oh.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         oh.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["k"])],
    )  # fmt: skip
    return oh.make_graph(
        [oh.make_node("Constant", [], ["t"], value=oh.make_tensor("tv", TensorProto.BOOL, [], [True])),
         oh.make_node("Loop", ["n", "t", "x"], ["y"], body=body)],
        "loop",
        [oh.make_tensor_value_info("n", TensorProto.INT64, []),
         oh.make_tensor_value_info("x", TensorProto.FLOAT, ["k"])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])],
    )  # fmt: skip


def fill_graph(from_shape: bool):
    """y = ConstantOfShape(shape): `shape` is the request's values (unbounded) or Shape(x) (bounded)."""
    nodes = [oh.make_node("Shape", ["x"], ["s"])] if from_shape else []
    nodes.append(oh.make_node("ConstantOfShape", ["s" if from_shape else "x"], ["y"]))
    return oh.make_graph(
        nodes, "fill", [oh.make_tensor_value_info("x", TensorProto.INT64, ["d"])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip


@pytest.fixture(scope="module")
def loop_repo(tmp_path_factory, repo) -> Path:
    root = tmp_path_factory.mktemp("gate_models")
    _save(loop_graph(), root / "loop" / "1" / "model.onnx")
    for name in ("suni", "uni"):  # a stateful and a plain encoder from the shared fixture
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes((repo / name / "1" / "model.onnx").read_bytes())
    return root


def _start(repo: Path, **kw):
    from server.app import InferenceServer
    from server.config import Settings

    kw = {"port": 0, "http_port": 0, "model_repository": repo, "device": "cpu", "metrics_port": -1,
          "log_level": "WARNING", **kw}  # fmt: skip
    srv = InferenceServer(Settings(**kw))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def served(loop_repo):
    srv = _start(loop_repo)
    yield srv
    srv.stop(0)


def _loop_request(n: int, **params) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="loop")
    encode_input(r, "n", np.array(n, np.int64))
    encode_input(r, "x", np.ones(64, np.float32))
    for key, value in params.items():
        r.parameters[key].int64_param = value
    return r


def _cpu_s() -> float:
    """CPU seconds this process (the in-process server and the test) has used."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HealthProbe:
    """An honest client: gRPC health and REST /v2/health/live in a loop; the slowest answers."""

    def __init__(self, srv) -> None:
        self.srv, self.worst_grpc, self.worst_rest, self.count = srv, 0.0, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.srv.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while not self._stop.is_set():
                t = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                self.worst_grpc = max(self.worst_grpc, time.monotonic() - t)
                t = time.monotonic()
                with urllib.request.urlopen(f"http://127.0.0.1:{self.srv.http_port}/v2/health/live", timeout=30) as r:
                    r.read()
                self.worst_rest = max(self.worst_rest, time.monotonic() - t)
                self.count += 1
                time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def test_graph_bound_is_decided_from_the_file(tmp_path, repo):
    assert bounded_by_input_size(repo / "uni" / "1" / "model.onnx") == (True, "")
    bounded, why = bounded_by_input_size(_save(loop_graph(), tmp_path / "loop.onnx"))
    assert not bounded and "Loop" in why
    bounded, why = bounded_by_input_size(_save(fill_graph(from_shape=False), tmp_path / "fill.onnx"))
    assert not bounded and "ConstantOfShape" in why and "'x'" in why
    assert bounded_by_input_size(_save(fill_graph(from_shape=True), tmp_path / "shape.onnx")) == (True, "")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    assert not bounded_by_input_size(tmp_path / "junk.onnx")[0]


def test_long_run_never_blocks_the_loop_and_stops_at_the_deadline(served):
    assert not served.repository.get("loop").bounded
    assert served.repository.get("uni").bounded
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch, HealthProbe(served) as probe:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(_loop_request(10), timeout=10)  # alone and small: still never inline
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_loop_request(2**62), timeout=2)
        took = time.monotonic() - t
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert took < 3
        time.sleep(0.3)  # the stop reaches ORT within the watchdog's tick
        cpu = _cpu_s()
        time.sleep(1.0)
        idle_cpu = _cpu_s() - cpu
    assert probe.count >= 5
    assert probe.worst_grpc < HEALTH_S and probe.worst_rest < HEALTH_S, (probe.worst_grpc, probe.worst_rest)
    assert idle_cpu < 0.5, f"the abandoned run still burns CPU: {idle_cpu:.2f} s in 1 s"


def test_timeout_parameter_is_a_deadline_on_both_frontends(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:  # no gRPC deadline: Triton's `timeout` (µs) alone
            stub.ModelInfer(_loop_request(2**62, timeout=1_000_000), timeout=30)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert "deadline" in err.value.details()
        assert time.monotonic() - t < 2.5
    body = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [], "data": [2**62]},
                       {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}],
            "parameters": {"timeout": 1_000_000}}  # fmt: skip
    t = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as err:
        url = f"http://127.0.0.1:{served.http_port}/v2/models/loop/infer"
        headers = {"Content-Type": "application/json"}
        urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers), timeout=30)
    with err.value:
        assert err.value.code == 504, err.value.read()
    assert time.monotonic() - t < 2.5


def test_cancelled_call_stops_its_run(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        future = stub.ModelInfer.future(_loop_request(2**62))
        time.sleep(0.5)
        future.cancel()
        time.sleep(0.5)
        cpu = _cpu_s()
        time.sleep(1.0)
        assert _cpu_s() - cpu < 0.5, "the cancelled call's run still burns CPU"
        assert stub.ModelInfer(_loop_request(3), timeout=10).outputs[0].name == "y"  # the model still serves


def test_rest_client_that_leaves_stops_its_run(served):
    """A REST call with no deadline whose client hangs up: its run is stopped as a cancelled gRPC
    call's is, so abandoned calls neither burn CPU nor keep the executor's threads from others."""
    inputs = [{"name": "n", "datatype": "INT64", "shape": [], "data": [2**62]},
              {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]  # fmt: skip
    body = json.dumps({"inputs": inputs}).encode()
    head = (f"POST /v2/models/loop/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    for _ in range(3):  # more than the executor could run at once were they kept
        with socket.create_connection(("127.0.0.1", served.http_port), timeout=10) as sock:
            sock.sendall(head + body)
            time.sleep(0.5)  # the run is under way
    time.sleep(0.5)  # the stop reaches ORT within the watchdog's tick
    cpu = _cpu_s()
    time.sleep(1.0)
    assert _cpu_s() - cpu < 0.5, "the run of a client that left still burns CPU"
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:  # the model still serves
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelInfer(_loop_request(3), timeout=5).outputs[0].name == "y"


def test_run_cap_stops_any_run_and_names_the_flag(loop_repo):
    srv = _start(loop_repo, max_run_s=0.5, http_port=-1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_loop_request(2**62), timeout=30)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--max-run-s 0.5" in err.value.details()
            assert time.monotonic() - t < 2
    finally:
        srv.stop(0)


def _empty_entries(field: str, count: int) -> bytes:
    """A ModelInferRequest for `uni` with `count` empty entries in a repeated field (parameters:
    distinct names, no values), built as wire bytes (protobuf would take seconds to build it)."""
    number = pb.ModelInferRequest.DESCRIPTOR.fields_by_name[field].number
    key = bytes([(number << 3) | 2])
    if field != "parameters":
        entries = (key + b"\x00") * count
    else:  # map entry {1: name}
        entries = b"".join(key + bytes([len(k) + 2, 0x0A, len(k)]) + k for k in (b"%07d" % i for i in range(count)))
    return pb.ModelInferRequest(model_name="uni").SerializeToString() + entries


def test_millions_of_empty_entries_are_refused_by_count_while_health_answers(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}", options=[("grpc.max_send_message_length", -1)]) as ch:
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        attacks = {field: _empty_entries(field, 2_000_000) for field in ("inputs", "outputs", "parameters")}
        with HealthProbe(served) as probe:
            for what, payload in attacks.items():
                t = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    raw(payload, timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert f"more than {1024 if what != 'parameters' else 64} {what}" in err.value.details()
                assert time.monotonic() - t < 2
                print(f"2,000,000 empty {what}: refused in {time.monotonic() - t:.2f} s")
            time.sleep(0.3)
    print(f"honest health meanwhile: worst gRPC {probe.worst_grpc:.3f} s, REST {probe.worst_rest:.3f} s")
    assert probe.worst_grpc < HEALTH_S and probe.worst_rest < HEALTH_S, (probe.worst_grpc, probe.worst_rest)


def test_rest_json_with_millions_of_keys_is_refused_before_it_is_parsed(served):
    """REST: a body of 2,000,000 parameters (27 MB, under the JSON size limit) is refused from a
    count of its keys, before the parser (which holds the interpreter for seconds) sees it."""
    params = ",".join(f'"{i:x}":0' for i in range(2_000_000))
    body = ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}],"parameters":{' + params + "}}").encode()
    url = f"http://127.0.0.1:{served.http_port}/v2/models/loop/infer"
    with HealthProbe(served) as probe:
        for _ in range(3):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(
                    urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=60
                )
            with err.value:
                assert err.value.code == 400
                assert "object keys" in json.loads(err.value.read())["error"]
        time.sleep(0.3)
    print(f"honest health meanwhile: worst gRPC {probe.worst_grpc:.3f} s, REST {probe.worst_rest:.3f} s")
    assert probe.worst_grpc < HEALTH_S and probe.worst_rest < HEALTH_S, (probe.worst_grpc, probe.worst_rest)


def test_shared_memory_parameters_are_checked_and_the_server_goes_on(served):
    """Shared memory is on by default: a tensor's region parameters are checked (Triton's words),
    an unknown region is NOT_FOUND before anything runs, and the next plain call is served."""
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        r = pb.ModelInferRequest(model_name="uni")
        encode_input(r, "x", np.ones((1, 2, 5), np.float32))
        out = r.outputs.add(name="h_n")
        out.parameters["shared_memory_region"].string_param = "out0"
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(r, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'shared_memory_byte_size' must be specified" in err.value.details()
        assert "output 'h_n'" in err.value.details()
        out.parameters["shared_memory_byte_size"].int64_param = 40
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(r, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "Unable to find shared memory region: 'out0'" in err.value.details()
        del r.outputs[:]
        assert stub.ModelInfer(r, timeout=10).outputs  # served as before
        assert "system_shared_memory" in stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions


def test_shared_memory_off_refuses_its_parameters_by_name(loop_repo):
    """--no-system-shared-memory: registering is UNIMPLEMENTED, a tensor naming a region is refused
    by name on both frontends (never silently answered in the message), the extension unlisted."""
    srv = _start(loop_repo, system_shared_memory=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=8))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "--no-system-shared-memory" in err.value.details()
            r = pb.ModelInferRequest(model_name="uni")
            encode_input(r, "x", np.ones((1, 2, 5), np.float32))
            out = r.outputs.add(name="h_n")
            out.parameters["shared_memory_region"].string_param = "out0"
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(r, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "output 'h_n'" in err.value.details() and "--no-system-shared-memory" in err.value.details()
            assert "system_shared_memory" not in stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).extensions
        body = {"inputs": [{"name": "x", "shape": [1, 2, 5], "datatype": "FP32", "data": [1.0] * 10}],
                "outputs": [{"name": "h_n", "parameters": {"shared_memory_region": "out0",
                                                           "shared_memory_byte_size": 40}}]}  # fmt: skip
        req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v2/models/uni/infer",
                                     data=json.dumps(body).encode(), method="POST")  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400
        message = json.loads(err.value.read())["error"]
        assert "output 'h_n'" in message and "shared_memory_region" in message, message
    finally:
        srv.stop(0)


def test_a_gate_without_a_registry_refuses_shared_memory_by_name():
    from server.gate import check_tensor_parameters

    check_tensor_parameters("input 'x'", {"other": 1})
    with pytest.raises(InvalidArgument, match="input 'x': parameter 'shared_memory_offset': shared memory is not"):
        check_tensor_parameters("input 'x'", {"shared_memory_offset": 0})


@pytest.fixture(scope="module")
def with_tokens(loop_repo):
    srv = _start(loop_repo, auth_tokens=",".join(TOKENS), http_port=-1)
    yield srv
    srv.stop(0)


def _chunk(seq_id: int, x: np.ndarray, start=False, end=False) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="suni")
    encode_input(r, "x", x)
    r.parameters["sequence_id"].uint64_param = seq_id
    r.parameters["sequence_start"].bool_param = start
    r.parameters["sequence_end"].bool_param = end
    r.outputs.add(name="h_n")
    return r


def _h_n(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32)


def test_a_sequence_belongs_to_the_token_that_started_it(with_tokens):
    a = [("authorization", f"Bearer {TOKENS[0]}")]
    b = [("authorization", f"Bearer {TOKENS[1]}")]
    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((1, 3, 5)).astype(np.float32) for _ in range(2))
    with grpc.insecure_channel(f"127.0.0.1:{with_tokens.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(_chunk(77, x1, start=True), metadata=a, timeout=10)
        expected = _h_n(stub.ModelInfer(_chunk(78, x1, start=True), metadata=a, timeout=10))  # a twin
        expected = _h_n(stub.ModelInfer(_chunk(78, x2), metadata=a, timeout=10))
        end_only = pb.ModelInferRequest(model_name="suni")  # would answer the sequence's final state
        end_only.parameters["sequence_id"].uint64_param = 77
        end_only.parameters["sequence_end"].bool_param = True
        for request in (_chunk(77, x2), _chunk(77, x2, end=True), end_only):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, metadata=b, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
            assert "unknown sequence 77" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # B cannot restart (replace) A's sequence either
            stub.ModelInfer(_chunk(77, x2, start=True), metadata=b, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        got = _h_n(stub.ModelInfer(_chunk(77, x2, end=True), metadata=a, timeout=10))
        np.testing.assert_array_equal(got, expected)  # A's state was not moved by B


def test_two_authorization_values_are_refused(with_tokens):
    with grpc.insecure_channel(f"127.0.0.1:{with_tokens.port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        both = [("authorization", f"Bearer {TOKENS[0]}"), ("authorization", f"Bearer {TOKENS[1]}")]
        with pytest.raises(grpc.RpcError) as err:
            stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=both, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "2 'authorization' metadata values" in err.value.details()
        stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=both[:1], timeout=10)


def test_one_call_is_capped_naming_the_flag_and_streaming():
    import asyncio

    from server.config import Settings
    from server.memory import MIB, Cost, MemoryBudget

    assert Settings().max_request_memory_mb == 1024  # one call's peak well under 2 GiB by default

    async def main():
        budget = MemoryBudget(16 << 30, client_share=0.5, wait_s=1, request_limit=1024 * MIB)
        with pytest.raises(Exception) as err:  # the 100 MiB encoder request's estimate: ~5 GiB
            await budget.hold(Cost(100 * MIB, 5 << 30, 1 * MIB), "peer:a")
        assert "--max-request-memory-mb" in str(err.value) and "sequence_id" in str(err.value)
        assert "ModelStreamInfer" in str(err.value)
        hold = await budget.hold(Cost(1 * MIB, 900 * MIB, 1 * MIB), "peer:a")  # within: granted
        assert budget.held == 902 * MIB
        hold.release()
        assert budget.held == 0

    asyncio.run(main())


def test_kept_sequence_state_is_bounded_per_sequence_client_and_in_all():
    from server.errors import ResourceExhausted
    from server.sequences import SequenceStore

    def state(nbytes: int) -> dict[str, np.ndarray]:
        return {"h": np.zeros(nbytes // 4, np.float32)}

    store = SequenceStore(max_sequences=16, idle_s=60, client_share=0.5, max_state_bytes=1000, state_memory=3000)
    with pytest.raises(ResourceExhausted, match="--max-sequence-state-mb"):  # too large from the start
        store.acquire("m", 1, 1, True, state(1200), client="token:a")
    assert len(store) == 0 and store.kept_bytes == 0
    store.acquire("m", 1, 1, True, state(400), client="token:a")
    store.release("m", 1, state(800), False)  # a growing state: still within its cap
    assert store.kept_bytes == 800
    store.acquire("m", 1, 1, False, {}, client="token:a")
    with pytest.raises(ResourceExhausted, match="freed"):  # grew past it: refused, and the sequence freed
        store.release("m", 1, state(1200), False)
    assert len(store) == 0 and store.kept_bytes == 0
    store.acquire("m", 1, 2, True, state(800), client="token:a")
    store.release("m", 2, state(800), False)
    with pytest.raises(ResourceExhausted, match="--sequence-client-share"):  # a's share: 1500 of 3000
        store.acquire("m", 1, 3, True, state(800), client="token:a")
    for seq_id in (4, 5):  # other clients still have room, until all kept state is at its budget
        store.acquire("m", 1, seq_id, True, state(800), client=f"token:{seq_id}")
        store.release("m", seq_id, state(800), False)
    with pytest.raises(ResourceExhausted, match="kept-state budget"):
        store.acquire("m", 1, 6, True, state(800), client="token:c")
    store.acquire("m", 1, 2, False, {}, client="token:a")
    store.release("m", 2, state(800), True)  # ended: its bytes are free again
    assert store.kept_bytes == 1600
    store.acquire("m", 1, 6, True, state(800), client="token:c")


def test_json_reply_of_an_output_sized_by_values_is_counted_before_it_is_built(tmp_path):
    graph = oh.make_graph(
        [oh.make_node("ConstantOfShape", ["x"], ["y"], value=oh.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))],
        "fill", [oh.make_tensor_value_info("x", TensorProto.INT64, [1])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )  # fmt: skip
    _save(graph, tmp_path / "fill" / "1" / "model.onnx")
    srv = _start(tmp_path, memory_budget_mb=256, memory_client_share=0.5)
    url = f"http://127.0.0.1:{srv.http_port}/v2/models/fill/infer"

    def post(n: int, binary: bool):
        body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [n]}],
                "outputs": [{"name": "y", "parameters": {"binary_data": binary}}]}  # fmt: skip
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    try:
        status, body = post(4 << 20, binary=False)  # 16 MiB of float32: ~200 MiB as JSON, over the 128 MiB share
        assert status == 429, body[:300]
        assert b"--memory-budget-mb" in body
        status, body = post(4 << 20, binary=True)  # the same output as binary: 16 MiB, admitted
        assert status == 200 and len(body) > 16 << 20
        status, body = post(1000, binary=False)
        assert status == 200 and json.loads(body)["outputs"][0]["data"][:2] == [1.0, 1.0]
        for _ in range(100):  # released once the server has sent the reply (just after the client read it)
            if srv.budget.held == 0:
                break
            time.sleep(0.02)
        assert srv.budget.held == 0
    finally:
        srv.stop(0)


def test_repository_protocol_can_be_restricted_to_an_admin_header(loop_repo):
    from server.config import Settings

    with pytest.raises(ValueError, match="unknown group"):
        Settings(restricted_api="everything:k=v")
    with pytest.raises(ValueError, match="key=value"):
        Settings(restricted_api="model-repository:novalue")
    srv = _start(loop_repo, model_control_mode="explicit", restricted_api="model-repository:admin-key=s3cret")
    admin = [("admin-key", "s3cret")]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            for metadata in ([], [("admin-key", "wrong")]):
                with pytest.raises(grpc.RpcError) as err:
                    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="uni"), metadata=metadata,
                                               timeout=10)  # fmt: skip
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "'admin-key' header" in err.value.details() and "s3cret" not in err.value.details()
            assert srv.repository.get("uni")  # still loaded
            assert stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=admin, timeout=10).models
            stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)  # other groups stay open
        url = f"http://127.0.0.1:{srv.http_port}/v2/repository/index"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, b"", method="POST"), timeout=10)
        with err.value:
            assert err.value.code == 403
        request = urllib.request.Request(url, b"", {"admin-key": "s3cret"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and any(m["name"] == "uni" for m in json.loads(r.read()))
    finally:
        srv.stop(0)


def test_ort_arena_cap_refuses_an_output_sized_by_values_cleanly(tmp_path):
    """--ort-arena-cap: ONNX Runtime's own allocations are capped at the budget (its own process:
    the shared arena is registered once per process)."""
    import subprocess
    import sys

    graph = oh.make_graph(
        [oh.make_node("ConstantOfShape", ["x"], ["y"], value=oh.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
         oh.make_node("ReduceSum", ["y"], ["s"], keepdims=0)],
        "fill", [oh.make_tensor_value_info("x", TensorProto.INT64, [1])],
        [oh.make_tensor_value_info("s", TensorProto.FLOAT, [])],
    )  # fmt: skip
    _save(graph, tmp_path / "fill" / "1" / "model.onnx")
    from scale.replicas import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--device", "cpu", "--port", str(port), "--metrics-port", "-1",
         "--model-repository", str(tmp_path), "--ort-arena-cap", "--memory-budget-mb", "256"],
        cwd=root, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            def call(n: int):
                r = pb.ModelInferRequest(model_name="fill")
                encode_input(r, "x", np.array([n], np.int64))
                return stub.ModelInfer(r, timeout=30)

            rss = lambda: int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1]) * 4096 >> 20  # noqa: E731
            before = rss()
            with pytest.raises(grpc.RpcError) as err:  # a 2 GiB temporary, from an 8-byte value
                call(512 << 20)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "256 MiB cap (--memory-budget-mb)" in err.value.details()
            assert rss() < before + 300
            reply = call(1000)  # the server goes on
            assert np.frombuffer(reply.raw_output_contents[0], np.float32)[0] == 1000.0
    finally:
        proc.terminate()
        proc.wait(30)


def test_large_releases_give_heap_back_to_the_os():
    import asyncio

    from server.arena import malloc_trim
    from server.memory import MIB, TRIM_DELAY_S, MemoryBudget

    assert malloc_trim() in (True, False)  # glibc here: callable

    async def main():
        budget = MemoryBudget(1 << 30, client_share=1.0)
        junk = [bytearray(64 << 10) for _ in range(3200)]  # 200 MiB of heap (below the mmap threshold)
        keep = junk[::32]  # a few stay: the freed pages lie between them, which free() keeps mapped
        hold = await budget.hold(100 * MIB, "peer:a")
        before = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 >> 20
        del junk
        hold.release()
        assert budget._trim_due
        await asyncio.sleep(TRIM_DELAY_S + 0.5)
        after = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 >> 20
        assert not budget._trim_due and budget._released == 0 and len(keep) == 100
        return before, after

    before, after = asyncio.run(main())
    assert after < before - 100, (before, after)  # the freed 200 MiB left the process


def test_versions_sized_by_values_allocate_from_the_shared_capped_arena(served):
    """The inline decision's classification also picks the allocator: a version whose work is not
    bounded by its input sizes (the Loop) allocates from ONNX Runtime's shared arena with a cap; a
    bounded one (the exported encoder) keeps its own arena."""
    from server.arena import MIB, arena_cap, shared_arena

    loop, uni = served.repository.get("loop"), served.repository.get("uni")
    assert not loop.bounded and loop.shared_arena
    assert uni.bounded and not uni.shared_arena
    arena = shared_arena()  # registered by the first server of this test process
    assert arena is not None and not arena.every_session and arena.max_bytes > 0
    # the cap: what one call may hold, or the budget where that is smaller; every session: the budget
    assert arena_cap(8192 * MIB, 1024 * MIB) == (1024 * MIB, "--max-request-memory-mb")
    assert arena_cap(512 * MIB, 1024 * MIB) == (512 * MIB, "--memory-budget-mb")
    assert arena_cap(8192 * MIB, None) == (8192 * MIB, "--memory-budget-mb")
    assert arena_cap(8192 * MIB, 1024 * MIB, every_session=True) == (8192 * MIB, "--memory-budget-mb")
    # a run of the Loop shrinks the arena at its end and again once its outputs are dropped
    from server.arena import SHRINKER

    before = SHRINKER.shrinks
    out = loop.run({"n": np.array(3, np.int64), "x": np.ones(64, np.float32)}, ["y"])
    assert out["y"].shape == (64,)
    del out
    for _ in range(100):
        if SHRINKER.shrinks > before:
            break
        time.sleep(0.02)
    assert SHRINKER.shrinks > before
