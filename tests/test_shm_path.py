"""The per-call shared-memory path after its costs were cut (server/shm.py): a call's outputs in one
object share one fstat, still taken before the first byte is written; checking an output region
takes no use count (an unregistered region's descriptor closes at once); a request's well-formed
parameters take the fast path and give what the checked path gives."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from server.errors import FailedPrecondition
from server.proto import grpc_service_pb2 as pb
from server.shm import SHM_ROOT, SharedMemoryRegistry, ShmCall, ShmRef, _checked_params, parse_params

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="needs /dev/shm (Linux)")


@pytest.fixture()
def key():
    """A 64-byte shared-memory object (shm_open + ftruncate), removed after the test."""
    name = f"lstm-serve-test-{uuid.uuid4().hex[:12]}"
    path = SHM_ROOT / name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 64)
    os.close(fd)
    yield "/" + name
    path.unlink(missing_ok=True)


def test_outputs_in_one_shrunk_object_fail_before_any_is_written(key):
    registry = SharedMemoryRegistry()
    try:
        registry.register("r", key, 0, 64)
        os.truncate(SHM_ROOT / key[1:], 40)  # the client shrinks its object after registering it
        y = np.arange(4, dtype=np.float32)
        with pytest.raises(FailedPrecondition, match=r"now holds 40 bytes, fewer than the 48 .* it shrank"):
            registry.write_outputs([("r", 0, 16, y, "y"), ("r", 32, 16, y, "z")])
        assert (SHM_ROOT / key[1:]).read_bytes() == bytes(40)  # the first output, which fits, was not written
        assert registry.write_outputs([("r", 0, 16, y, "y"), ("r", 20, 16, y, "z")]) == [16, 16]
        data = (SHM_ROOT / key[1:]).read_bytes()
        np.testing.assert_array_equal(np.frombuffer(data[20:36], np.float32), y)
    finally:
        registry.close()


def test_checking_an_output_region_takes_no_use_count(key):
    registry = SharedMemoryRegistry()
    registry.register("r", key, 0, 64)
    region = registry._regions[(None, "r")]
    registry.check("r", 0, 64)
    assert region.users == 0
    registry.unregister("r")
    with pytest.raises(OSError):  # closed at once: nobody was using it
        os.fstat(region.fd)


def test_the_parameters_fast_path_agrees_with_the_checked_path():
    cases = [
        {"shared_memory_region": "r", "shared_memory_byte_size": 64},
        {"shared_memory_region": "r", "shared_memory_offset": 8, "shared_memory_byte_size": 4},
        {"shared_memory_region": "r", "shared_memory_offset": 0, "shared_memory_byte_size": 0},
        {"binary_data": True},
        {},
    ]
    for params in cases:
        assert parse_params("x", params) == _checked_params("x", params, "tensor")
    assert parse_params("x", cases[1]) == ShmRef("r", 8, 4)


def test_a_grpc_request_reads_and_writes_through_one_call(key):
    """codec.decode_inputs + ShmCall as the gRPC frontend drives them: one input from the region,
    one inline; the output written into the region after the 'run'."""
    from server.codec import Limits
    from server.grpc_codec import to_infer_request

    registry = SharedMemoryRegistry()
    try:
        registry.register("r", key, 0, 64)
        x = np.arange(6, dtype=np.float32).reshape(1, 6)
        (SHM_ROOT / key[1:]).write_bytes(bytes(8) + x.tobytes() + bytes(32))
        request = pb.ModelInferRequest(model_name="m")
        t = request.inputs.add(name="x", datatype="FP32", shape=[1, 6])
        t.parameters["shared_memory_region"].string_param = "r"
        t.parameters["shared_memory_offset"].int64_param = 8
        t.parameters["shared_memory_byte_size"].int64_param = 24
        lengths = request.inputs.add(name="lengths", datatype="INT64", shape=[1])
        lengths.contents.int64_contents.append(6)
        out = request.outputs.add(name="y")
        out.parameters["shared_memory_region"].string_param = "r"
        out.parameters["shared_memory_offset"].int64_param = 40
        out.parameters["shared_memory_byte_size"].int64_param = 24
        call = ShmCall(registry)
        plane = type("Plane", (), {"limits": Limits()})()
        infer = to_infer_request(pb.ModelInferRequest.FromString(request.SerializeToString()), plane, None, call)
        np.testing.assert_array_equal(infer.inputs["x"], x)
        np.testing.assert_array_equal(infer.inputs["lengths"], [6])
        assert infer.output_parameters == {
            "y": {"shared_memory_region": "r", "shared_memory_offset": 40, "shared_memory_byte_size": 24}
        }
        call.write({"y": x * 2})
        data = (SHM_ROOT / key[1:]).read_bytes()
        np.testing.assert_array_equal(np.frombuffer(data[40:64], np.float32), x.reshape(-1) * 2)
    finally:
        registry.close()
