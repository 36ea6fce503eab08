"""Open Inference Protocol v2 JSON and Triton's binary tensor extension <-> the data plane's
`InferRequest`/`InferResponse` (the REST codec: no HTTP here; the app is `server.rest_app`).

Binary extension (what tritonclient.http sends by default): the request body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw little-endian tensor bytes of every
input that has `"parameters": {"binary_data_size": N}`, in input order. Outputs requested with
`"parameters": {"binary_data": true}` (or the request parameter `binary_data_output: true`) come
back the same way: JSON header, then their bytes, with the header's length in
`Inference-Header-Content-Length`. Triton's raw binary request (header length 0: the body is the
one input's bytes) is `raw_request`.

A body that does not decode is INVALID_ARGUMENT (400), naming where it fails.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from server import classification, describe
from server.codec import DATATYPES, MAX_RANK, Limits, check_bytes_count, check_shape
from server.dataplane import InferRequest, InferResponse
from server.dtypes import OBJECT, TRITON_TO_OIP, deserialize_bytes, oip_of, serialize_bytes, to_bytes_array
from server.errors import InvalidArgument, clip
from server.gate import MAX_PARAMETERS, MAX_WIRE_TENSORS, refuse_shared_memory
from server.shm import PARAMETERS as SHM_PARAMETERS
from server.shm import REGION as SHM_REGION
from server.shm import ShmCall

HEADER_LENGTH = "Inference-Header-Content-Length"


def _check_param(value) -> str | None:
    """Why a JSON parameter value is not an OIP parameter (bool, 64-bit integer, number, string)."""
    if isinstance(value, bool | float | str):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else f"integers must fit in 64 bits, got {clip(value)}"
    return f"expected a bool, integer, number or string, got {type(value).__name__}"


def parse_params(params, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where} 'parameters' must be an object, got {type(params).__name__}")
    for key, value in params.items():
        problem = _check_param(value)
        if problem:
            raise InvalidArgument(f"{where} parameter {clip(key)}: {problem}")
    return dict(params)


_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}  # numpy kind of the target -> JSON kinds accepted


def build_request(
    header: dict,
    binary: memoryview,
    model: str,
    version: str,
    limits: Limits,
    shm: ShmCall | None = None,
    shm_off: str | None = None,
) -> tuple[InferRequest, dict[str, bool], bool]:
    """JSON header (+ binary section) -> (InferRequest, per-output binary choice, default choice).
    Binary tensors are zero-copy views of `binary`; shapes are checked before anything is built.
    With `shm` (the call's shared-memory side), tensors naming a region are read from it / have it
    checked for their output; without, shared-memory parameters are refused (`shm_off`: why)."""
    if not isinstance(header, dict):
        raise InvalidArgument("request body must be a JSON object with 'inputs'")
    unknown = sorted(set(header) - {"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
    if unknown:
        raise InvalidArgument(
            f"unknown request field(s) {clip(unknown)}; expected id, parameters, inputs, outputs (and model_name, "
            "model_version matching the URL)"
        )
    version = _body_model(header, model, version)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {clip(request_id)}")
    request_id.encode("utf-8")  # a lone surrogate (\ud800) fails here: UnicodeError -> 400
    params = parse_params(header.get("parameters"), "request")
    binary_all = params.pop("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise InvalidArgument(f"request parameter 'binary_data_output' must be true or false, got {clip(binary_all)}")
    request = InferRequest(model_name=model, model_version=version, id=request_id, parameters=params)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"inputs[{i}]: 'name' must be a non-empty string")
        if name in request.inputs:
            raise InvalidArgument(f"input {clip(name)} appears twice; each input name may appear once")
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidArgument(
                f"input {clip(name)}: datatype {clip(datatype)} unknown; expected one of {sorted(DATATYPES)}"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"input {clip(name)}: 'shape' must be a list of integers, got {clip(shape)}")
        if len(shape) <= MAX_RANK and any(not 0 <= d < 2**63 for d in shape):
            raise InvalidArgument(f"input {clip(name)}: every dimension of shape {clip(shape)} must be in 0..2^63-1")
        dtype = DATATYPES[datatype][0]
        check_shape(name, shape, limits, dtype.itemsize if dtype != OBJECT else 0)  # before anything is allocated
        count = math.prod(shape)
        tparams = parse_params(tensor.get("parameters"), f"input {clip(name)}")
        if shm is None:
            refuse_shared_memory(f"input {clip(name)}", tparams, shm_off)
        elif any(k in tparams for k in SHM_PARAMETERS):  # without a region: refused by read_input
            if "data" in tensor or "binary_data_size" in tparams:  # Triton's words
                raise InvalidArgument(
                    f"input {clip(name)}: Input must set only one of 'data', 'binary_data_size', 'shared_memory_region'"
                )
            request.inputs[name] = shm.read_input(name, datatype, shape, tparams)
            continue
        size = tparams.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"input {clip(name)}: binary_data_size must be an integer >= 0, got {clip(size)}")
            if "data" in tensor:
                raise InvalidArgument(f"input {clip(name)}: give either 'data' or binary_data_size, not both")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input {clip(name)}: binary_data_size {size} runs past the {len(binary)} binary bytes sent"
                )
            if dtype == OBJECT:  # length-prefixed strings, as in gRPC's raw contents
                check_bytes_count(name, count)
                try:
                    array = deserialize_bytes(binary[offset : offset + size], count, f"input {clip(name)}")
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
                array = array.reshape(shape)
            else:
                if size != count * dtype.itemsize:
                    raise InvalidArgument(
                        f"input {clip(name)}: binary_data_size {size} != {count} elements x {dtype.itemsize} bytes "
                        f"({datatype}, shape {shape})"
                    )
                array = np.frombuffer(binary, dtype.newbyteorder("<"), count, offset).reshape(shape)
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidArgument(f"input {clip(name)}: 'data' missing (or binary_data_size for binary data)")
            if dtype == OBJECT:
                check_bytes_count(name, count)
                request.inputs[name] = _json_strings(name, tensor["data"], shape, count)
                continue
            array = _json_numbers(name, tensor["data"], datatype, dtype)
            if array.size != count:
                raise InvalidArgument(
                    f"input {clip(name)}: shape {shape} holds {count} elements, 'data' has {array.size}"
                )
            array = array.reshape(shape)
        request.inputs[name] = array
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} binary byte(s) after the last binary input")
    binary_outputs: dict[str, bool] = {}
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgument(f"outputs[{i}] must be an object with a string 'name'")
        if out["name"] in request.outputs:  # Triton's words
            raise InvalidArgument(f"output {clip(out['name'])} already exists in request")
        oparams = parse_params(out.get("parameters"), f"output {clip(out['name'])}")
        if shm is None:
            refuse_shared_memory(f"output {clip(out['name'])}", oparams, shm_off)
        elif any(k in oparams for k in SHM_PARAMETERS):  # without a region: refused by add_output
            for other in ("classification", "binary_data") if SHM_REGION in oparams else ():  # Triton's words
                if other in oparams and (other != "binary_data" or oparams[other] is True):
                    raise InvalidArgument(f"Output can't set both 'shared_memory_region' and '{other}'")
            shm.add_output(out["name"], oparams)
        if "binary_data" in oparams:  # an explicit choice wins over binary_data_output
            choice = oparams.pop("binary_data")
            if not isinstance(choice, bool):
                raise InvalidArgument(
                    f"output {clip(out['name'])}: binary_data must be true or false, got {clip(choice)}"
                )
            binary_outputs[out["name"]] = choice
        classification.class_count(out["name"], oparams)
        request.outputs.append(out["name"])
        if oparams:
            request.output_parameters[out["name"]] = oparams
    return request, binary_outputs, binary_all


def _body_model(header: dict, model: str, version: str) -> str:
    """KServe's SDK repeats the model (and version) in the body: accepted when they agree with the
    URL; a body version names the version when the URL has none. Returns the version to run."""
    name = header.get("model_name")
    if name is not None and name != model:
        raise InvalidArgument(
            f"request body 'model_name' {clip(name)} contradicts the URL's model {clip(model)}; leave it out or "
            "make it match"
        )
    body_version = header.get("model_version")
    if body_version is None or body_version == "":
        return version
    if not isinstance(body_version, str):
        raise InvalidArgument(f"request body 'model_version' must be a string, got {clip(body_version)}")
    if version and body_version != version:
        raise InvalidArgument(
            f"request body 'model_version' {clip(body_version)} contradicts the URL's version {clip(version)}; "
            "leave it out or make it match"
        )
    return body_version


_KIND_WORDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integer numbers", "U": "strings"}
MAX_JSON_DEPTH = 100  # nesting of a tensor's 'data' (Triton's limit and words)


def _json_numbers(name: str, data, datatype: str, dtype: np.dtype) -> np.ndarray:
    """A numeric tensor's JSON 'data' (nested lists, any nesting that holds the right count) as a
    flat-or-nested numpy array of `dtype`; messages say what was wrong in this server's words."""
    depth, probe = 0, data
    while isinstance(probe, list) and probe:
        depth, probe = depth + 1, probe[0]
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument(
                f"input {clip(name)}: JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_DEPTH})"
            )
    if depth > 32:  # numpy takes at most 64 dimensions: flatten such (legal, if odd) nesting first
        flat, stack = [], [data]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(reversed(item))
            else:
                flat.append(item)
        data = flat
    expected = f"input {clip(name)}: 'data' must be a (nested) list of {datatype} values"
    try:
        parsed = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{expected} with lists of equal lengths at each level") from None
    if parsed.size and parsed.dtype.kind not in _KINDS[dtype.kind]:  # e.g. 1.9 for INT64: refused, not cut
        got = _KIND_WORDS.get(parsed.dtype.kind, "mixed or non-numeric values (or integers past 64 bits)")
        raise InvalidArgument(f"{expected}, got {got}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # FP32 overflow: inf, refused later
            array = parsed.astype(dtype)
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument(f"{expected}; some are out of its range") from None
    if dtype.kind in "iu" and parsed.size and not np.array_equal(array, parsed):
        raise InvalidArgument(f"{expected}; some are out of the {datatype} range")
    return array


def _json_strings(name: str, data, shape: list[int], count: int) -> np.ndarray:
    """BYTES 'data' in JSON: a (nested) list of strings (UTF-8 encoded), as Triton's REST API."""
    flat: list = []
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidArgument(
                    f"input {clip(name)}: JSON nesting depth exceeds maximum allowed limit ({MAX_JSON_DEPTH})"
                )
            stack.extend((x, depth + 1) for x in reversed(item))
        elif isinstance(item, str):
            flat.append(item.encode("utf-8"))
        else:
            raise InvalidArgument(f"input {clip(name)}: BYTES 'data' must be a (nested) list of strings, got "
                                  f"{clip(item)}")  # fmt: skip
        if len(flat) > count:
            break
    if len(flat) != count:
        raise InvalidArgument(f"input {clip(name)}: shape {shape} holds {count} elements, 'data' has {len(flat)}")
    array = np.empty(count, OBJECT)
    array[:] = flat
    return array.reshape(shape)


def response_body(response: InferResponse, binary_outputs: dict[str, bool], binary_all: bool,
                  in_shm=()) -> tuple[bytes, int]:  # fmt: skip
    """InferResponse -> (body, JSON header length or -1 when the body is plain JSON). Outputs in
    `in_shm` were written to shared memory: described by name, datatype and shape only."""
    head = {"model_name": response.model_name, "model_version": response.model_version, "outputs": []}
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = dict(response.parameters)
    blobs, fast = [], {}
    for i, (name, array) in enumerate(response.outputs.items()):
        datatype = oip_of(array.dtype) or str(array.dtype)
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in in_shm:
            pass
        elif binary_outputs.get(name, binary_all):
            if datatype == "BYTES":
                blob = serialize_bytes(array)
            else:
                blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif array.dtype in (np.float32, np.float16) and array.size and np.isfinite(array).all():
            # "%.9g" round-trips every float32 exactly, 2.8x faster and 40 % shorter than
            # json.dumps' 17-digit repr of the float64 it would see (measured: 25,600 values)
            token = f"\x00data{i}\x00"
            fast[json.dumps(token)] = "[" + ",".join(["%.9g"] * array.size) % tuple(array.reshape(-1).tolist()) + "]"
            entry["data"] = token
        elif datatype == "BYTES":  # strings as text (bytes that are not UTF-8: use binary_data)
            entry["data"] = [v.decode("utf-8", "replace") for v in to_bytes_array(array).reshape(-1).tolist()]
        else:
            entry["data"] = array.reshape(-1).tolist()  # json.dumps: NaN/Infinity as Python writes them
        head["outputs"].append(entry)
    out = json.dumps(head, separators=(",", ":"))
    for token, data in fast.items():
        out = out.replace(token, data, 1)
    text = out.encode()
    if not blobs:
        return text, -1
    return b"".join([text, *blobs]), len(text)


def parse_body(body: bytes, n: int, model: str, version: str, limits: Limits, plane=None, shm: ShmCall | None = None,
           shm_off: str | None = None):  # fmt: skip
    """Body -> (InferRequest, binary outputs, binary default); the first `n` bytes are the JSON.
    `n` 0: Triton's raw binary request, the body is the one input's bytes (`plane` gives the
    model's configuration, from which its shape is deduced). `shm`, `shm_off`: `build_request`'s."""
    if n == 0:
        if plane is None:
            raise InvalidArgument(f"{HEADER_LENGTH} 0 (a raw binary request) is not accepted here")
        return raw_request(body, model, version, limits, describe.model_config(plane, model, version))
    text = body[:n] if n < len(body) else body
    check_key_count(text)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(json_error(exc)) from None
    try:
        return build_request(header, memoryview(body)[n:], model, version, limits, shm, shm_off)
    except UnicodeError:
        raise InvalidArgument("request not valid: a string holds a lone surrogate (not encodable as UTF-8)") from None
    except RecursionError:
        raise InvalidArgument("request not valid: nested too deeply") from None


# The object keys a request's JSON can need: a few of its own and MAX_PARAMETERS parameters, and
# for each of at most MAX_WIRE_TENSORS inputs and outputs a few keys and MAX_PARAMETERS parameters.
# Counted before the body is parsed: the parser holds the interpreter for all of it, every client's
# calls waiting (measured: a 40 MB body of 2,000,000 parameters, 1.6 s in json.loads; counted here:
# 11 ms, the key scan only where there are more colons than keys allowed, stopped at the limit).
MAX_JSON_KEYS = 16 + MAX_PARAMETERS + 2 * MAX_WIRE_TENSORS * (8 + MAX_PARAMETERS)
# A key's end: a quote not escaped (an even run of backslashes before it), then optional
# whitespace and a colon. Inside a JSON string every quote is escaped, so only keys match.
_KEY_END = re.compile(rb'(?<!\\)(?:\\\\)*"[ \t\r\n]*:')


def check_key_count(text: bytes, limit: int = MAX_JSON_KEYS) -> None:
    """InvalidArgument where the JSON `text` has more than `limit` object keys, found without
    parsing it (a colon count first, C speed; the key scan only where that exceeds `limit`)."""
    if text.count(b":") <= limit:
        return
    for count, _ in enumerate(_KEY_END.finditer(text), 1):
        if count > limit:
            raise InvalidArgument(
                f"request JSON has more than {limit:,} object keys: a request takes at most {MAX_PARAMETERS} "
                f"parameters, and {MAX_WIRE_TENSORS} inputs and outputs each with at most {MAX_PARAMETERS}"
            )


def json_error(exc: BaseException) -> str:
    """Why a body is not JSON, in this server's words (the parser's own text stays out)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"request body is not valid JSON (line {exc.lineno} column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return "request body is not valid JSON: it is not UTF-8 text"
    if isinstance(exc, RecursionError):
        return "request body is not valid JSON: JSON nesting depth exceeds what the parser accepts"
    return "request body is not valid JSON (a number too long to read, or text that is not UTF-8)"


def raw_request(body: bytes, model: str, version: str, limits: Limits, config: dict):
    """Triton's raw binary request: `body` is the bytes of the model's only input, its shape
    deduced from the model's configuration (`config`, Triton's ModelConfig as plain data): at most
    one variable dim (a BYTES input: shape [1], the body its one element); a batching model gets
    a batch of 1. Every output comes back binary. Messages in Triton's words."""
    inputs = config.get("input", [])
    if len(inputs) != 1:
        raise InvalidArgument(
            f"Raw request must only have 1 input (found 1) to be deduced but got {len(inputs)} inputs in "
            f"'{model}' model configuration"
        )
    name = inputs[0]["name"]
    datatype = TRITON_TO_OIP.get(inputs[0]["data_type"], "")
    shape = [1] if config.get("max_batch_size", 0) else []
    dynamic, count = None, 1
    for d in inputs[0].get("dims", []):
        if d < 0:
            if dynamic is not None:
                raise InvalidArgument(
                    f"The shape of the raw input '{name}' can not be deduced because there are more than one "
                    "variable-sized dimension"
                )
            dynamic = len(shape)
        else:
            count *= d
        shape.append(int(d))
    if datatype == "BYTES":
        if dynamic is not None or count != 1:
            raise InvalidArgument(f"For BYTE datatype raw input '{name}', the model must have input shape [1]")
        array = np.empty(1, OBJECT)
        array[0] = bytes(body)
        array = array.reshape(shape)
    elif datatype in DATATYPES:
        dtype = DATATYPES[datatype][0]
        unit = count * dtype.itemsize
        if dynamic is not None:
            if unit == 0 or len(body) % unit:
                raise InvalidArgument(
                    f"raw input '{name}': {len(body)} bytes are not a whole number of {unit}-byte steps of its "
                    f"variable dimension ({datatype}, shape {shape})"
                )
            shape[dynamic] = len(body) // unit
        elif len(body) != unit:
            raise InvalidArgument(
                f"raw input '{name}': {len(body)} bytes, expected {unit} for shape {shape} of {datatype}"
            )
        check_shape(name, shape, limits, dtype.itemsize)
        array = np.frombuffer(body, dtype.newbyteorder("<")).reshape(shape)
    else:
        raise InvalidArgument(f"raw input '{name}': datatype {clip(inputs[0]['data_type'])} cannot be sent raw")
    return InferRequest(model_name=model, model_version=version, inputs={name: array}), {}, True
