"""server/codec.py on its own: protobuf InferTensor <-> numpy, with no socket and no server.

Round trips (raw and typed contents, every datatype), the BYTES wire layout, and the checks a
hostile request meets before anything of its claimed size is allocated: each malformed request
is refused with the status a client sees and a message naming the input.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from server import codec
from server.codec import INT64_MAX, MAX_BYTES_ELEMENTS, MAX_RANK, Limits
from server.errors import InvalidArgument, ResourceExhausted
from server.proto import grpc_service_pb2 as pb

RNG = np.random.default_rng(7)

# one array per OIP datatype, values that a wrong decode would change
ARRAYS = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 255, 7]], np.uint8),
    "UINT16": np.array([65535, 1, 0], np.uint16),
    "UINT32": np.array([2**32 - 1, 5], np.uint32),
    "UINT64": np.array([2**64 - 1, 2**63], np.uint64),
    "INT8": np.array([-128, 127, 0], np.int8),
    "INT16": np.array([[-32768], [32767]], np.int16),
    "INT32": np.array([-(2**31), 2**31 - 1], np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1, 3], np.int64),
    "FP16": np.array([1.5, -2.25, 65504.0], np.float16),
    "FP32": RNG.standard_normal((2, 3, 4)).astype(np.float32),
    "FP64": RNG.standard_normal(5),
    "BYTES": np.array([[b"", b"a\x00b"], [b"\xff" * 3, "é".encode()]], dtype=object),
}


def _request(*tensors: tuple[str, np.ndarray], raw: bool = True) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, array in tensors:
        codec.encode_input(request, name, array, raw=raw)
    return request


def _tensor(request: pb.ModelInferRequest, name: str, datatype: str, shape) -> pb.ModelInferRequest.InferInputTensor:
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    return tensor


@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_raw_round_trip_keeps_dtype_shape_and_values(datatype):
    array = ARRAYS[datatype]
    request = _request(("in", array))
    assert request.inputs[0].datatype == datatype
    assert list(request.inputs[0].shape) == list(array.shape)
    out = codec.decode_inputs(request, Limits())["in"]
    assert out.shape == array.shape
    assert out.dtype == array.dtype
    assert out.tolist() == array.tolist()


@pytest.mark.parametrize("datatype", [d for d in ARRAYS if d != "FP16"])
def test_typed_round_trip_keeps_dtype_shape_and_values(datatype):
    array = ARRAYS[datatype]
    request = _request(("in", array), raw=False)
    assert not request.raw_input_contents
    out = codec.decode_inputs(request, Limits())["in"]
    assert out.dtype == array.dtype
    assert out.tolist() == array.tolist()


def test_fp16_has_no_typed_field():
    with pytest.raises(ValueError, match="FP16 has no typed contents"):
        _request(("half", ARRAYS["FP16"]), raw=False)


def test_str_arrays_go_as_bytes_utf8():
    request = _request(("s", np.array(["é", "ab"])))
    assert request.inputs[0].datatype == "BYTES"
    assert codec.decode_inputs(request, Limits())["s"].tolist() == ["é".encode(), b"ab"]


def test_bytes_raw_layout_is_length_prefixed_little_endian():
    request = _request(("s", np.array([b"ab", b"", b"xyz"], dtype=object)))
    assert request.raw_input_contents[0] == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x03\x00\x00\x00xyz"


def test_encode_output_and_decode_outputs_round_trip():
    response = pb.ModelInferResponse(model_name="m")
    for name, array in ARRAYS.items():
        codec.encode_output(response, name, array)
    assert [t.datatype for t in response.outputs] == list(ARRAYS)
    out = codec.decode_outputs(response)
    for name, array in ARRAYS.items():
        assert out[name].dtype == array.dtype, name
        assert out[name].tolist() == array.tolist(), name


def test_encode_output_of_a_non_contiguous_array_sends_its_logical_order():
    array = np.arange(12, dtype=np.int32).reshape(3, 4).T  # Fortran order
    response = pb.ModelInferResponse()
    codec.encode_output(response, "t", array)
    assert list(response.outputs[0].shape) == [4, 3]
    assert np.frombuffer(response.raw_output_contents[0], np.int32).tolist() == array.ravel().tolist()


def test_serialize_response_parses_as_if_the_contents_were_set():
    arrays = {"f": ARRAYS["FP32"], "s": ARRAYS["BYTES"], "t": np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2]}
    described = pb.ModelInferResponse(model_name="m", id="7")
    raw = [codec.describe_output(described, name, a) for name, a in arrays.items()]
    wire = codec.serialize_response(described, raw)
    assert type(wire) is bytes
    expected = pb.ModelInferResponse(model_name="m", id="7")
    for name, a in arrays.items():
        codec.encode_output(expected, name, a)
    assert pb.ModelInferResponse.FromString(wire) == expected
    assert codec.serialize_any(wire) is wire
    assert codec.serialize_any(expected) == expected.SerializeToString()


def test_varint_matches_protobuf_for_large_lengths():
    data = np.zeros(70_000, np.uint8)  # a length needing three varint bytes
    response = pb.ModelInferResponse()
    wire = codec.serialize_response(response, [codec.describe_output(response, "z", data)])
    assert len(pb.ModelInferResponse.FromString(wire).raw_output_contents[0]) == 70_000


def test_describe_output_refuses_a_dtype_oip_cannot_carry():
    with pytest.raises(ValueError, match="output c: unsupported dtype complex64"):
        codec.describe_output(pb.ModelInferResponse(), "c", np.zeros(2, np.complex64))


# -- malformed requests ----------------------------------------------------------------------


def test_raw_size_must_match_shape_and_type():
    request = pb.ModelInferRequest()
    _tensor(request, "x", "FP32", [2, 3])
    request.raw_input_contents.append(b"\x00" * 20)
    with pytest.raises(InvalidArgument) as err:
        codec.decode_inputs(request, Limits())
    assert err.value.message == "input 'x': raw content is 20 bytes, expected 24 for shape [2, 3] of FP32"


def test_typed_values_in_another_types_field_are_refused_by_the_expected_field():
    request = pb.ModelInferRequest()
    _tensor(request, "x", "FP32", [2]).contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument) as err:
        codec.decode_inputs(request, Limits())
    assert err.value.message == "input 'x': contents.fp32_contents has 0 values, expected 2 for shape [2]"


def test_typed_count_must_match_shape():
    request = pb.ModelInferRequest()
    _tensor(request, "ids", "INT64", [3]).contents.int64_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match=r"input 'ids': contents.int64_contents has 2 values, expected 3"):
        codec.decode_inputs(request, Limits())


@pytest.mark.parametrize(
    "datatype, value, message",
    [
        ("UINT8", 300, "contents value 300 at index 1 is out of the UINT8 range 0..255"),
        ("INT8", -129, "contents value -129 at index 1 is out of the INT8 range -128..127"),
        ("INT16", 40000, "contents value 40000 at index 1 is out of the INT16 range -32768..32767"),
    ],
)
def test_narrow_typed_ints_are_range_checked_not_wrapped(datatype, value, message):
    request = pb.ModelInferRequest()
    field = "uint_contents" if datatype.startswith("U") else "int_contents"
    getattr(_tensor(request, "n", datatype, [2]).contents, field).extend([1, value])
    with pytest.raises(InvalidArgument) as err:
        codec.decode_inputs(request, Limits())
    assert err.value.message == f"input 'n': {message}"


def test_raw_bool_must_be_zero_or_one():
    request = pb.ModelInferRequest()
    _tensor(request, "flag", "BOOL", [2])
    request.raw_input_contents.append(b"\x01\x02")
    with pytest.raises(InvalidArgument, match="input 'flag': raw BOOL content holds bytes other than 0 and 1"):
        codec.decode_inputs(request, Limits())


@pytest.mark.parametrize(
    "data, count, message",
    [
        (b"\x01\x00\x00\x00a\x02\x00", 2, "raw BYTES content ends after 1 of 2 elements"),
        (b"\x05\x00\x00\x00ab", 1, "raw BYTES element 0 is 5 bytes, past the end of the content"),
        (b"\x01\x00\x00\x00ab", 1, "1 byte(s) after the last of 1 BYTES elements"),
        (b"\xff\xff\xff\xff", 1, "raw BYTES element 0 is 4294967295 bytes, past the end of the content"),
    ],
)
def test_malformed_raw_bytes_name_the_input(data, count, message):
    request = pb.ModelInferRequest()
    _tensor(request, "text", "BYTES", [count])
    request.raw_input_contents.append(data)
    with pytest.raises(InvalidArgument) as err:
        codec.decode_inputs(request, Limits())
    assert err.value.message == f"input 'text': {message}"


def test_duplicate_names_mixed_contents_and_raw_count_are_refused():
    dup = _request(("a", np.zeros(1, np.float32)), ("a", np.zeros(1, np.float32)))
    with pytest.raises(InvalidArgument, match=r"inputs \['a', 'a'\]: each input name may appear once"):
        codec.decode_inputs(dup, Limits())
    mixed = _request(("a", np.zeros(1, np.float32)))
    _tensor(mixed, "b", "INT32", [1]).contents.int_contents.append(1)
    with pytest.raises(InvalidArgument, match=r"input\(s\) \['b'\] use typed 'contents' while the request"):
        codec.decode_inputs(mixed, Limits())
    short = _request(("a", np.zeros(1, np.float32)))
    _tensor(short, "b", "FP32", [0])
    with pytest.raises(InvalidArgument, match="raw_input_contents has 1 entries for 2 inputs"):
        codec.decode_inputs(short, Limits())


def test_unknown_datatype_lists_the_known_ones():
    request = pb.ModelInferRequest()
    _tensor(request, "x", "BF16", [1])
    with pytest.raises(InvalidArgument) as err:
        codec.decode_inputs(request, Limits())
    assert err.value.message.startswith("input 'x': unknown datatype 'BF16'; expected one of BOOL, UINT8,")
    assert err.value.message.endswith("FP64, BYTES")


# -- sizes checked before allocation ---------------------------------------------------------


def test_check_shape_limits_and_statuses():
    limits = Limits(max_elements=100)
    assert codec.check_shape("x", [10, 10], limits) == (10, 10)
    with pytest.raises(
        ResourceExhausted, match=r"input 'x': shape \[10, 11\] is 110 elements, more than the limit of 100"
    ):
        codec.check_shape("x", [10, 11], limits)
    with pytest.raises(ResourceExhausted):  # one dim above the limit though the product is 0
        codec.check_shape("x", [0, 101], limits)
    with pytest.raises(InvalidArgument, match=r"input 'x': shape \[2, -1\] has a negative dimension"):
        codec.check_shape("x", [2, -1], limits)
    with pytest.raises(InvalidArgument, match=f"input 'x': {MAX_RANK + 1} dimensions; at most {MAX_RANK}"):
        codec.check_shape("x", [1] * (MAX_RANK + 1), limits)
    with pytest.raises(InvalidArgument, match=f"causes total element count to exceed maximum size of {INT64_MAX}"):
        codec.check_shape("x", [2**32, 2**32], limits)
    with pytest.raises(
        InvalidArgument, match=r"byte size overflow for input 'x': element count \(2305843009213693952\)"
    ):
        codec.check_shape("x", [2**61], limits, itemsize=4)


def test_a_long_name_is_clipped_in_the_message():
    with pytest.raises(InvalidArgument) as err:
        codec.check_shape("n" * 1000, [-1], Limits())
    assert "...(+936 chars)" in err.value.message
    assert len(err.value.message) < 200


def test_a_huge_claimed_shape_is_refused_without_allocating():
    request = pb.ModelInferRequest()
    _tensor(request, "x", "FP32", [1 << 20, 1 << 20])  # 4 TiB if believed
    request.raw_input_contents.append(b"\x00" * 16)
    tracemalloc.start()
    try:
        with pytest.raises(ResourceExhausted, match="input 'x'"):
            codec.decode_inputs(request, Limits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_bytes_element_count_is_bounded_before_decoding():
    request = pb.ModelInferRequest()
    _tensor(request, "s", "BYTES", [MAX_BYTES_ELEMENTS + 1])
    request.raw_input_contents.append(b"")
    with pytest.raises(ResourceExhausted, match=f"input 's': {MAX_BYTES_ELEMENTS + 1} BYTES elements, more than"):
        codec.decode_inputs(request, Limits(max_elements=1 << 30))
    typed = pb.ModelInferRequest()
    _tensor(typed, "s", "BYTES", [MAX_BYTES_ELEMENTS + 1]).contents.bytes_contents.extend([b""] * 2)
    with pytest.raises(InvalidArgument, match="input 's': contents.bytes_contents has 2 values"):
        codec.decode_inputs(typed, Limits(max_elements=1 << 30))


def test_decoded_raw_arrays_are_views_of_the_request():
    array = ARRAYS["FP32"]
    request = _request(("x", array))
    out = codec.decode_inputs(request, Limits())["x"]
    assert not out.flags.writeable  # frombuffer over the message's bytes: no copy made


# -- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, field, expected",
    [
        (True, "bool_param", True),
        (-5, "int64_param", -5),
        (2**63, "uint64_param", 2**63),
        (0.5, "double_param", 0.5),
        ("s", "string_param", "s"),
    ],
)
def test_to_parameter_picks_the_field(value, field, expected):
    param = codec.to_parameter("k", value)
    assert param.WhichOneof("parameter_choice") == field
    assert getattr(param, field) == expected


def test_to_parameter_refuses_what_oip_cannot_carry():
    assert codec.to_parameter("k", None).WhichOneof("parameter_choice") is None
    with pytest.raises(InvalidArgument, match="parameter 'k': integers must fit in 64 bits, got 18446744073709551616"):
        codec.to_parameter("k", 2**64)
    with pytest.raises(InvalidArgument, match="parameter 'k': expected a bool, integer, number or string, got list"):
        codec.to_parameter("k", [1])
