"""The gRPC codec: protobuf <-> the data plane's `InferRequest`/`InferResponse` (MLServer's
`grpc/converters.py`). Request bytes are parsed here too: a malformed message becomes `Malformed`
(answered INVALID_ARGUMENT by the handler), a large one is parsed off the event loop, and one with
too many entries is refused from the wire before it is parsed. The RPC methods are `server.servicer`'s;
`scale.ray_serve` and `bench.transport` use these converters without a server.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from google.protobuf.message import DecodeError

from contract.onnxfile import varint_bytes
from server import classification
from server.codec import (
    decode_inputs,
    describe_output,
    encode_output,
    parameter_value,
    plain_parameters,
    serialize_response,
    to_parameter,
)
from server.dataplane import DataPlane, InferRequest, InferResponse
from server.dtypes import OBJECT
from server.errors import InvalidArgument, clip
from server.gate import infer_request_counts_refusal
from server.proto import grpc_service_pb2 as pb
from server.shm import REGION as SHM_REGION
from server.shm import ShmCall
from server.signature import structure

log = logging.getLogger(__name__)


class Malformed:
    """What the request deserializer hands a handler for bytes that are not the request message:
    answered INVALID_ARGUMENT (in a stream: an error_message) instead of grpcio's bare UNKNOWN."""

    def __init__(self, cls, exc: Exception) -> None:
        # the parser's own text stays in the log: it names protobuf internals, not the request
        self.message = f"request is not a valid {cls.DESCRIPTOR.full_name} message (it does not parse)"
        log.debug("malformed %s: %s", cls.DESCRIPTOR.full_name, exc)


# a request message larger than this is parsed on an executor thread, not the event loop (a 40 MB
# message of millions of empty tensors takes seconds to parse)
PARSE_INLINE_BYTES = 1 << 20


class _Unparsed:
    """A large request message's bytes, parsed by the handler off the event loop (`parse_off_loop`)."""

    __slots__ = ("cls", "data")

    def __init__(self, cls, data: bytes) -> None:
        self.cls, self.data = cls, data

    def parse(self):
        try:
            return self.cls.FromString(self.data)
        except DecodeError as exc:
            return Malformed(self.cls, exc)


class Refused(Malformed):
    """A request refused before it is parsed (`gate.infer_request_counts_refusal`): INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        self.message = message


# a ModelInferRequest larger than this has its entries counted from the wire before it is parsed
COUNT_ABOVE_BYTES = 64 << 10


def deserializer(cls):
    infer = cls is pb.ModelInferRequest

    def parse(data: bytes):
        if infer and len(data) > COUNT_ABOVE_BYTES:
            refusal = infer_request_counts_refusal(data)
            if refusal is not None:
                return Refused(refusal)
        if len(data) > PARSE_INLINE_BYTES:
            return _Unparsed(cls, data)
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Malformed(cls, exc)

    return parse


async def parse_off_loop(request, executor):
    if isinstance(request, _Unparsed):
        return await asyncio.get_running_loop().run_in_executor(executor, request.parse)
    return request


def to_infer_request(request: pb.ModelInferRequest, plane: DataPlane, deadline: float | None,
                     shm: ShmCall | None = None) -> InferRequest:  # fmt: skip
    """A ModelInferRequest as the data plane's request: tensors decoded (sizes checked before
    anything is allocated), parameters (the request's and each output's) as plain values. With
    `shm` (the call's shared-memory side), inputs naming a region are read from it and outputs
    naming one have their region checked now (written by `ShmCall.write_async` after the run)."""
    outputs, output_parameters = [], {}
    for o in request.outputs:
        name = o.name
        if name in outputs:  # Triton's words
            raise InvalidArgument(f"output {clip(name)} already exists in request")
        outputs.append(name)
        if o.parameters:
            output_parameters[name] = params = plain_parameters(o.parameters)
            if shm is not None:
                shm.add_output(name, params)
    if output_parameters:
        classification.check(output_parameters)  # before anything runs
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=decode_inputs(request, plane.limits, shm),
        outputs=outputs,
        parameters=plain_parameters(request.parameters) if request.parameters else {},
        deadline=deadline,
        output_parameters=output_parameters,
        checked=True,  # decode_inputs checked every input's shape (codec.check_shape) before allocating it
    )


def to_infer_response(response: InferResponse, request: pb.ModelInferRequest | None = None) -> pb.ModelInferResponse:
    """The data plane's answer as a ModelInferResponse: outputs raw (tritonclient decodes only raw);
    a parameter the request also carried (sequence_id) is echoed with the request's own type. An
    output the request put in shared memory is described with an empty raw entry (as Triton: the
    entries stay aligned with the outputs); its bytes are in its region already."""
    out = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version, id=response.id)
    in_shm = shm_outputs(request)
    for name, array in response.outputs.items():
        if name in in_shm:
            describe_output(out, name, array)
            out.raw_output_contents.append(b"")
        else:
            encode_output(out, name, array)
    _echo_parameters(out, response, request)
    return out


def shm_outputs(request: pb.ModelInferRequest | None) -> set[str]:
    """The outputs `request` asks to have written to shared memory (their replies carry no data)."""
    if request is None:
        return set()
    return {o.name for o in request.outputs if SHM_REGION in o.parameters}


_NO_BYTES = np.empty(0, np.uint8)


_HEADS: dict[tuple, bytes] = {}  # (model, version, each output's name, dtype, shape) -> those fields' wire bytes
_HEADS_MAX = 1024  # then all are forgotten (outputs' shapes follow the requests': bounded, never grown)


def to_infer_response_bytes(response: InferResponse, request: pb.ModelInferRequest | None = None) -> bytes:
    """`to_infer_response` in wire format, each output's bytes copied once (into the message).
    The model's name and version and the outputs' descriptions come first, serialized once per
    output structure (`_HEADS`; not for strings or outputs in shared memory, whose descriptions
    or contents vary); the id and parameters follow them (protobuf reads fields in any order, and
    a message's fields may come in separate runs: the reply parses as the one message)."""
    in_shm = shm_outputs(request)
    outputs = response.outputs
    key = head = None
    if not in_shm and not any(a.dtype == OBJECT for a in outputs.values()):
        key = (response.model_name, response.model_version, *structure(outputs))
        head = _HEADS.get(key)
    if head is None:
        described = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version)
        arrays = [
            _NO_BYTES if name in in_shm else array
            for name, array in ((name, describe_output(described, name, array)) for name, array in outputs.items())
        ]
        head = described.SerializeToString()
        if key is not None:
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[key] = head
    else:
        arrays = list(outputs.values())
    tail = pb.ModelInferResponse(id=response.id)
    _echo_parameters(tail, response, request)
    return serialize_response(head + tail.SerializeToString(), arrays)


_STREAM_INFER_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response: field 2, length-delimited


def to_stream_response_bytes(response: InferResponse, request: pb.ModelInferRequest | None = None) -> bytes:
    """A ModelStreamInferResponse carrying `to_infer_response_bytes` (no error), in wire format:
    the outputs are not copied into a message and serialized again."""
    body = to_infer_response_bytes(response, request)
    return b"".join((_STREAM_INFER_RESPONSE_TAG, varint_bytes(len(body)), body))


def _echo_parameters(out: pb.ModelInferResponse, response: InferResponse, request) -> None:
    for key, value in response.parameters.items():
        sent = request.parameters.get(key) if request is not None else None
        if sent is not None and parameter_value(sent) == value:
            out.parameters[key].CopyFrom(sent)
        else:
            out.parameters[key].CopyFrom(to_parameter(key, value))


_TYPED_INLINE = 1 << 16  # typed values decoded on the loop at most (raw contents are a view: free)


def costly_to_decode(request: pb.ModelInferRequest) -> bool:
    """BYTES tensors are decoded element by element, typed contents value by value."""
    raw = bool(request.raw_input_contents)  # then no typed contents (decode_inputs refuses the mix)
    for t in request.inputs:
        if t.datatype == "BYTES":
            return True
        if raw or not t.HasField("contents"):  # no contents message sent: no typed values
            continue
        c = t.contents
        typed = len(c.fp32_contents) + len(c.int64_contents) + len(c.int_contents) + len(c.fp64_contents)
        if typed + len(c.uint_contents) + len(c.uint64_contents) + len(c.bool_contents) > _TYPED_INLINE:
            return True
    return False
