"""server/dtypes.py on its own: the datatype table and the BYTES wire form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from server import dtypes
from server.proto import grpc_service_pb2 as pb


def test_the_table_agrees_with_onnx_protobuf_and_numpy():
    assert len(dtypes.DATATYPES) == 13
    tensor_fields = {f.name for f in pb.InferTensorContents.DESCRIPTOR.fields}
    triton_types = set(pb.DataType.keys())
    for name, (dtype, field, triton) in dtypes.DATATYPES.items():
        assert field in tensor_fields, name
        assert triton in triton_types, name
        assert dtypes.numpy_dtype(name) is dtype
        assert dtypes.TRITON_TO_OIP[triton] == name
        assert dtypes.triton_type(name) == triton
    # every ONNX type named maps to an OIP name whose numpy dtype is ONNX's own
    for onnx_type, name in dtypes.ONNX_TO_OIP.items():
        elem = getattr(onnx.TensorProto, {"float": "FLOAT", "double": "DOUBLE", "string": "STRING"}.get(
            onnx_type[7:-1], onnx_type[7:-1].upper()))  # fmt: skip
        expected = onnx.helper.tensor_dtype_to_np_dtype(elem)
        assert dtypes.numpy_dtype(name) == (np.dtype(object) if name == "BYTES" else expected), onnx_type
    assert sorted(dtypes.ONNX_TO_OIP.values()) == sorted(dtypes.DATATYPES)


def test_triton_type_of_a_type_oip_cannot_name():
    assert dtypes.triton_type("FP32") == "TYPE_FP32"
    assert dtypes.triton_type("BYTES") == "TYPE_STRING"
    assert dtypes.triton_type("tensor(bfloat16)") == "TYPE_INVALID"


@pytest.mark.parametrize(
    "array, name",
    [
        (np.zeros(1, np.float16), "FP16"),
        (np.zeros(1, np.uint64), "UINT64"),
        (np.zeros(1, bool), "BOOL"),
        (np.array(["a"]), "BYTES"),
        (np.array([b"a"]), "BYTES"),
        (np.array([b"a"], dtype=object), "BYTES"),
        (np.zeros(1, np.complex64), None),
        (np.zeros(1, "datetime64[s]"), None),
    ],
)
def test_oip_of(array, name):
    assert dtypes.oip_of(array.dtype) == name


def test_contiguous_keeps_shape_and_avoids_a_copy_when_it_can():
    a = np.arange(6).reshape(2, 3)
    assert dtypes.contiguous(a) is a
    t = dtypes.contiguous(a.T)
    assert t.flags.c_contiguous and t.shape == (3, 2) and t.tolist() == a.T.tolist()
    scalar = np.float32(2.5) * np.ones((), np.float32)
    assert dtypes.contiguous(scalar).shape == ()


def test_to_bytes_array_from_str_bytes_and_objects():
    out = dtypes.to_bytes_array(np.array([["é", "b"]]))
    assert out.dtype == object and out.shape == (1, 2) and out.tolist() == [["é".encode(), b"b"]]
    mixed = np.array(["x", b"y", bytearray(b"z")], dtype=object)
    assert dtypes.to_bytes_array(mixed).tolist() == [b"x", b"y", b"z"]
    assert all(type(v) is bytes for v in dtypes.to_bytes_array(mixed).tolist())


def test_serialize_and_deserialize_bytes_round_trip():
    values = np.array([[b"", b"\x00\x01"], [b"abc", "é".encode()]], dtype=object)
    wire = dtypes.serialize_bytes(values)
    assert wire == b"\0\0\0\0" + b"\2\0\0\0\0\1" + b"\3\0\0\0abc" + b"\2\0\0\0\xc3\xa9"
    back = dtypes.deserialize_bytes(wire, 4, "t").reshape(2, 2)
    assert back.tolist() == values.tolist()
    assert dtypes.serialize_bytes(np.empty((0,), object)) == b""
    assert dtypes.deserialize_bytes(b"", 0, "t").shape == (0,)
    assert dtypes.deserialize_bytes(memoryview(wire), 4, "t").tolist() == values.ravel().tolist()


@pytest.mark.parametrize(
    "data, count, message",
    [
        (b"", 1, "x: raw BYTES content ends after 0 of 1 elements"),
        (b"\1\0\0", 1, "x: raw BYTES content ends after 0 of 1 elements"),
        (b"\2\0\0\0a", 1, "x: raw BYTES element 0 is 2 bytes, past the end of the content"),
        (b"\0\0\0\0\0", 1, "x: 1 byte(s) after the last of 1 BYTES elements"),
        (b"\0\0\0\0", 0, "x: 4 byte(s) after the last of 0 BYTES elements"),
    ],
)
def test_deserialize_bytes_names_what_is_wrong(data, count, message):
    with pytest.raises(ValueError) as err:
        dtypes.deserialize_bytes(data, count, "x")
    assert str(err.value) == message
