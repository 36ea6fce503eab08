"""InferTensor <-> numpy for the Open Inference Protocol v2, with the checks a hostile client needs.

Sizes are checked with Python integers before anything of that size is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from contract.onnxfile import varint_bytes
from server.dtypes import DATATYPES as _TYPES
from server.dtypes import OBJECT, contiguous, deserialize_bytes, oip_of, serialize_bytes, to_bytes_array
from server.errors import InvalidArgument, ResourceExhausted, clip
from server.proto import grpc_service_pb2 as pb
from server.shm import BYTE_SIZE as SHM_BYTE_SIZE
from server.shm import OFFSET as SHM_OFFSET
from server.shm import REGION as SHM_REGION

DATATYPES = {name: (dtype, field) for name, (dtype, field, _) in _TYPES.items()}  # OIP -> (numpy, contents field)
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
# BYTES elements per tensor: each is a Python object (~60 B) and a string for ONNX Runtime, and is
# decoded one by one; 1M of them take ~1 s of a core and ~150 MB, a bound whatever --max-elements says
MAX_BYTES_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_elements: int = 64 * 1024 * 1024  # per input tensor
    max_batch: int = 4096  # sequences per request


INT64_MAX = 2**63 - 1


def check_shape(name: str, shape, limits: Limits, itemsize: int = 0) -> tuple[int, ...]:
    """The one element-limit check (gRPC, REST and the data plane): rank, negative dims, and
    --max-elements for the tensor and for each dim, with Python integers before anything of that
    size is allocated. `name`: as the client sent it (clipped here); `itemsize`: bytes per element
    when known (0: BYTES or unknown).

    A shape no tensor can have (element count or byte size past int64) is INVALID_ARGUMENT with
    Triton's wording, since no retry can succeed; one over this server's --max-elements is
    RESOURCE_EXHAUSTED, gRPC's status for a message over a size limit."""
    shape = tuple(map(int, shape))
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"input {clip(name)}: {len(shape)} dimensions; at most {MAX_RANK} are accepted")
    if min(shape, default=0) < 0:
        raise InvalidArgument(f"input {clip(name)}: shape {clip(list(shape))} has a negative dimension")
    count = 1
    for d in shape:
        count *= d  # Python int: no overflow, no allocation
    if count > INT64_MAX:
        raise InvalidArgument(
            f"invalid shape for input {clip(name)}: shape {clip(list(shape))} causes total element count to "
            f"exceed maximum size of {INT64_MAX}"
        )
    if itemsize > 1 and count * itemsize > INT64_MAX:
        raise InvalidArgument(
            f"byte size overflow for input {clip(name)}: element count ({count}) * data type size ({itemsize}) "
            f"exceeds maximum allowed size ({INT64_MAX})"
        )
    # each dim too (a zero elsewhere makes the product small, but numpy refuses such a shape)
    if count > limits.max_elements or max(shape, default=0) > limits.max_elements:
        raise ResourceExhausted(
            f"input {clip(name)}: shape {clip(list(shape))} is {count} elements, "
            f"more than the limit of {limits.max_elements} (or a dimension above it)"
        )
    return shape


def check_bytes_count(name: str, count: int) -> None:
    if count > MAX_BYTES_ELEMENTS:
        raise ResourceExhausted(
            f"input {clip(name)}: {count} BYTES elements, more than the limit of {MAX_BYTES_ELEMENTS} per tensor"
        )


def _typed_ints(name: str, values, dtype: np.dtype) -> np.ndarray:
    """Typed int_contents / uint_contents hold 32-bit values: narrower types are range-checked
    (numpy would wrap 300 to 44 for UINT8), as REST's JSON data is."""
    wide = np.asarray(values, np.int64 if dtype.kind == "i" else np.uint64)
    info = np.iinfo(dtype)
    bad = np.flatnonzero((wide < info.min) | (wide > info.max)) if wide.size else []
    if len(bad):
        raise InvalidArgument(
            f"input {clip(name)}: contents value {int(wide[bad[0]])} at index {int(bad[0])} is out of the "
            f"{dtype.name.upper()} range {info.min}..{info.max}"
        )
    return wide.astype(dtype)


def _has_contents(contents) -> bool:
    return any(len(getattr(contents, f)) for f in _CONTENT_FIELDS)


def parameter_value(p: pb.InferParameter):
    """An InferParameter as a plain value (None when no field of its oneof is set)."""
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def plain_parameters(parameters) -> dict:
    """A protobuf map of InferParameter as plain values (`parameter_value` of each): what the
    transport-free code reads. Keys are read and looked up directly (the map's items() view walks
    it through Python's generic Mapping code, ~2x slower)."""
    return {key: parameter_value(parameters[key]) for key in parameters}


def decode_inputs(request: pb.ModelInferRequest, limits: Limits, shm=None) -> dict[str, np.ndarray]:
    """Decode every input of a request into numpy arrays (shape and byte counts checked). With
    `shm` (the call's `server.shm.ShmCall`), an input whose parameters name a region is read from
    it, and raw_input_contents hold the other inputs only, in order (as tritonclient sends them)."""
    raw = request.raw_input_contents
    tensors = list(request.inputs)  # each element read once: protobuf builds a wrapper per access
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"inputs {clip(names)}: each input name may appear once")
    # inputs with shared-memory parameters (one without a region is refused by `read_input`)
    in_shm = set()
    if shm is not None:
        for t in tensors:
            params = t.parameters
            if params and (SHM_REGION in params or SHM_OFFSET in params or SHM_BYTE_SIZE in params):
                in_shm.add(t.name)
    # typed contents: only a tensor whose `contents` message was sent can hold any
    typed = [t.name for t in tensors if t.HasField("contents") and _has_contents(t.contents)]
    if raw and typed:
        raise InvalidArgument(
            f"input(s) {clip(typed)} use typed 'contents' while the request also has raw_input_contents; "
            "send all inputs raw or all typed"
        )
    if typed and in_shm & set(typed):
        raise InvalidArgument(
            f"input(s) {clip(sorted(in_shm & set(typed)))}: data in both 'contents' and shared memory; send one"
        )
    if raw and len(raw) != len(request.inputs) - len(in_shm):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs) - len(in_shm)} inputs not in shared "
            "memory; expected one per input"
            if in_shm
            else f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; expected one per input"
        )
    out: dict[str, np.ndarray] = {}
    index = -1  # raw_input_contents entry of the current input
    for tensor in tensors:
        if tensor.datatype not in DATATYPES:
            raise InvalidArgument(
                f"input {clip(tensor.name)}: unknown datatype {clip(tensor.datatype)}; expected one of "
                f"{', '.join(DATATYPES)}"
            )
        dtype, field = DATATYPES[tensor.datatype]
        shape = check_shape(tensor.name, tensor.shape, limits, dtype.itemsize if dtype != OBJECT else 0)
        count = math.prod(shape)  # shape checked above: small Python ints (np.prod costs ~10x)
        if in_shm and tensor.name in in_shm:
            out[tensor.name] = shm.read_input(tensor.name, tensor.datatype, shape, plain_parameters(tensor.parameters))
            continue
        index += 1
        if raw:
            data = raw[index]
            if dtype == OBJECT:
                check_bytes_count(tensor.name, count)
                try:
                    array = deserialize_bytes(data, count, f"input {clip(tensor.name)}").reshape(shape)
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
            elif dtype == np.bool_ and len(data) == count and count and np.frombuffer(data, np.uint8).max() > 1:
                raise InvalidArgument(f"input {clip(tensor.name)}: raw BOOL content holds bytes other than 0 and 1")
            else:
                expected = count * dtype.itemsize
                if len(data) != expected:
                    raise InvalidArgument(
                        f"input {clip(tensor.name)}: raw content is {len(data)} bytes, expected {expected} "
                        f"for shape {list(shape)} of {tensor.datatype}"
                    )
                array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise InvalidArgument(
                    f"input {clip(tensor.name)}: contents.{field} has {len(values)} values, expected {count} "
                    f"for shape {list(shape)}"
                )
            if dtype == OBJECT:
                check_bytes_count(tensor.name, count)
                array = np.empty(count, OBJECT)
                array[:] = list(values)
                array = array.reshape(shape)
            elif dtype.kind in "iu" and dtype.itemsize < 4:
                array = _typed_ints(tensor.name, values, dtype).reshape(shape)
            else:
                array = np.asarray(values, dtype=dtype).reshape(shape)
        out[tensor.name] = array
    return out


def encode_output(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append one output, always as raw_output_contents (tritonclient decodes only raw)."""
    array = describe_output(response, name, contiguous(array))
    response.raw_output_contents.append(serialize_bytes(array) if array.dtype == OBJECT else array.tobytes())


_RAW_OUTPUT_TAG = bytes([(6 << 3) | 2])  # ModelInferResponse.raw_output_contents = 6, length-delimited


def serialize_response(response: pb.ModelInferResponse | bytes, raw: list[np.ndarray]) -> bytes:
    """`response` (outputs described, no raw contents; or its wire bytes) in wire format with `raw`
    appended as its raw_output_contents: each array's bytes are copied once, into the message
    (building the field with `tobytes()` and serializing would copy them three times). Fields may
    come in any order on the wire, so the message parses as if the contents were set on it."""
    parts: list = [response if isinstance(response, bytes) else response.SerializeToString()]
    for array in raw:
        if array.dtype == OBJECT:
            data = serialize_bytes(array)
            parts += [_RAW_OUTPUT_TAG, varint_bytes(len(data)), data]
            continue
        array = contiguous(array)
        parts += [_RAW_OUTPUT_TAG, varint_bytes(array.nbytes), array]  # join reads its buffer: no copy
    return b"".join(parts)  # exactly bytes: grpc refuses a subclass


def serialize_any(message) -> bytes:
    """gRPC response serializer: a message, or a response `serialize_response` already built."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def describe_output(response: pb.ModelInferResponse, name: str, array: np.ndarray) -> np.ndarray:
    """Append one output's description (name, datatype, shape); its bytes go in raw_output_contents
    (`encode_output` sets them, `serialize_response` appends them on the wire)."""
    datatype = oip_of(array.dtype)
    if datatype is None:
        raise ValueError(f"output {name}: unsupported dtype {array.dtype}")
    tensor = response.outputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    return to_bytes_array(array) if datatype == "BYTES" else array


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Client side: raw (or typed) outputs of a response as numpy arrays."""
    out = {}
    for index, tensor in enumerate(response.outputs):
        dtype, field = DATATYPES[tensor.datatype]
        shape = tuple(tensor.shape)
        count = math.prod(shape)
        if response.raw_output_contents:
            data = response.raw_output_contents[index]
            if dtype == OBJECT:
                out[tensor.name] = deserialize_bytes(data, count, f"output {tensor.name}").reshape(shape)
            else:
                out[tensor.name] = np.frombuffer(data, dtype=dtype).reshape(shape)
        elif dtype == OBJECT:
            array = np.empty(count, OBJECT)
            array[:] = list(tensor.contents.bytes_contents)
            out[tensor.name] = array.reshape(shape)
        else:
            out[tensor.name] = np.asarray(getattr(tensor.contents, field), dtype=dtype).reshape(shape)
    return out


def encode_input(request: pb.ModelInferRequest, name: str, array: np.ndarray, raw: bool = True) -> None:
    """Client side: append one input, raw bytes (default) or typed contents (FP16 has no typed
    field: raw only). String, bytes and object arrays go as BYTES."""
    array = contiguous(np.asarray(array))
    datatype = oip_of(array.dtype)
    if datatype is None:
        raise ValueError(f"input {name}: numpy dtype {array.dtype} has no OIP datatype")
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(array.shape)
    if datatype == "BYTES":
        array = to_bytes_array(array)
    if not raw and datatype == "FP16":
        raise ValueError(f"input {name}: FP16 has no typed contents field in OIP; send it raw")
    if raw:
        request.raw_input_contents.append(serialize_bytes(array) if datatype == "BYTES" else array.tobytes())
    else:
        getattr(tensor.contents, DATATYPES[datatype][1]).extend(array.ravel().tolist())


def to_parameter(key: str, value) -> pb.InferParameter:
    """A plain parameter value as OIP's InferParameter (an integer of 2**63 or more as uint64)."""
    if value is None:
        return pb.InferParameter()
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return pb.InferParameter(int64_param=value)
        if 2**63 <= value < 2**64:
            return pb.InferParameter(uint64_param=value)
        raise InvalidArgument(f"parameter '{key}': integers must fit in 64 bits, got {value}")
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise InvalidArgument(f"parameter '{key}': expected a bool, integer, number or string, got {type(value).__name__}")
