"""InferTensor <-> numpy for the Open Inference Protocol v2, with the checks a hostile client needs.

Sizes are checked with Python integers before anything of that size is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidArgument, ResourceExhausted
from server.proto import grpc_service_pb2 as pb

# OIP datatype -> (numpy dtype, InferTensorContents field). BYTES is not used by these models.
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype(np.uint8), "uint_contents"),
    "UINT16": (np.dtype(np.uint16), "uint_contents"),
    "UINT32": (np.dtype(np.uint32), "uint_contents"),
    "UINT64": (np.dtype(np.uint64), "uint64_contents"),
    "INT8": (np.dtype(np.int8), "int_contents"),
    "INT16": (np.dtype(np.int16), "int_contents"),
    "INT32": (np.dtype(np.int32), "int_contents"),
    "INT64": (np.dtype(np.int64), "int64_contents"),
    "FP16": (np.dtype(np.float16), "fp32_contents"),
    "FP32": (np.dtype(np.float32), "fp32_contents"),
    "FP64": (np.dtype(np.float64), "fp64_contents"),
}
_OIP_OF = {dtype: name for name, (dtype, _) in DATATYPES.items()}  # numpy dtype -> OIP datatype
ONNX_TO_OIP = {
    "tensor(float)": "FP32",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(bool)": "BOOL",
}
_CONTENT_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


MAX_RANK = 16  # numpy refuses more than 64 dimensions; these models take at most 3


@dataclass(frozen=True)
class Limits:
    max_elements: int = 64 * 1024 * 1024  # per input tensor
    max_batch: int = 4096  # sequences per request


def _shape(tensor: pb.ModelInferRequest.InferInputTensor, limits: Limits) -> tuple[int, ...]:
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"input '{tensor.name}': {len(shape)} dimensions; at most {MAX_RANK} are accepted")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input '{tensor.name}': shape {list(shape)} has a negative dimension")
    count = 1
    for d in shape:
        count *= d  # Python int: no overflow, no allocation
    # each dim too (a zero elsewhere makes the product small, but numpy refuses such a shape)
    if count > limits.max_elements or any(d > limits.max_elements for d in shape):
        raise ResourceExhausted(
            f"input '{tensor.name}': shape {list(shape)} is {count} elements, "
            f"more than the limit of {limits.max_elements} (or a dimension above it)"
        )
    return shape


def decode_inputs(request: pb.ModelInferRequest, limits: Limits) -> dict[str, np.ndarray]:
    """Decode every input of a request into numpy arrays (shape and byte counts checked)."""
    raw = request.raw_input_contents
    names = [t.name for t in request.inputs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"inputs {names}: each input name may appear once")
    typed = [t.name for t in request.inputs if any(len(getattr(t.contents, f)) for f in _CONTENT_FIELDS)]
    if raw and typed:
        raise InvalidArgument(
            f"input(s) {typed} use typed 'contents' while the request also has raw_input_contents; "
            "send all inputs raw or all typed"
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; expected one per input"
        )
    out: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.datatype not in DATATYPES:
            raise InvalidArgument(
                f"input '{tensor.name}': unknown datatype {tensor.datatype!r}; expected one of {', '.join(DATATYPES)}"
            )
        dtype, field = DATATYPES[tensor.datatype]
        shape = _shape(tensor, limits)
        count = math.prod(shape)  # shape checked above: small Python ints (np.prod costs ~10x)
        if raw:
            data = raw[index]
            expected = count * dtype.itemsize
            if len(data) != expected:
                raise InvalidArgument(
                    f"input '{tensor.name}': raw content is {len(data)} bytes, expected {expected} "
                    f"for shape {list(shape)} of {tensor.datatype}"
                )
            array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise InvalidArgument(
                    f"input '{tensor.name}': contents.{field} has {len(values)} values, expected {count} "
                    f"for shape {list(shape)}"
                )
            array = np.asarray(values, dtype=dtype).reshape(shape)
        out[tensor.name] = array
    return out


def encode_output(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append one output, always as raw_output_contents (tritonclient decodes only raw)."""
    array = describe_output(response, name, np.ascontiguousarray(array))
    response.raw_output_contents.append(array.tobytes())


_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])  # ModelInferResponse.raw_output_contents = 6, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def serialize_response(response: pb.ModelInferResponse, raw: list[np.ndarray]) -> bytes:
    """`response` (outputs described, no raw contents) in wire format with `raw` appended as its
    raw_output_contents: each array's bytes are copied once, into the message (building the field
    with `tobytes()` and serializing would copy them three times). Fields may come in any order on
    the wire, so the message parses as if the contents were set on it."""
    parts: list = [response.SerializeToString()]
    for array in raw:
        array = np.ascontiguousarray(array)
        parts += [_RAW_OUTPUT_TAG, _varint(array.nbytes), array]  # join reads its buffer: no copy
    return b"".join(parts)  # exactly bytes: grpc refuses a subclass


def serialize_any(message) -> bytes:
    """gRPC response serializer: a message, or a response `serialize_response` already built."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def describe_output(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> np.ndarray:
    """Append one output's description (name, datatype, shape); its bytes go in raw_output_contents
    (`encode_output` sets them, `serialize_response` appends them on the wire)."""
    datatype = _OIP_OF.get(array.dtype)
    if datatype is None:
        raise ValueError(f"output {name}: unsupported dtype {array.dtype}")
    tensor = response.outputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    return array


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Client side: raw (or typed) outputs of a response as numpy arrays."""
    out = {}
    for index, tensor in enumerate(response.outputs):
        dtype, field = DATATYPES[tensor.datatype]
        shape = tuple(tensor.shape)
        if response.raw_output_contents:
            out[tensor.name] = np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(shape)
        else:
            out[tensor.name] = np.asarray(getattr(tensor.contents, field), dtype=dtype).reshape(shape)
    return out


def encode_input(request: pb.ModelInferRequest, name: str, array: np.ndarray, raw: bool = True) -> None:
    """Client side: append one input, raw bytes (default) or typed contents."""
    inv = {v[0]: k for k, v in DATATYPES.items() if k not in ("UINT8", "UINT16", "INT8", "INT16", "FP16")}
    array = np.ascontiguousarray(array)
    datatype = inv[array.dtype]
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    if raw:
        request.raw_input_contents.append(array.tobytes())
    else:
        getattr(tensor.contents, DATATYPES[datatype][1]).extend(array.ravel().tolist())
