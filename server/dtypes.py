"""The one table of tensor datatypes: OIP names <-> numpy dtypes <-> ONNX types <-> Triton's TYPE_*.

Every module that turns a datatype name into numpy (or back) reads it here. BYTES tensors are numpy
object arrays of `bytes` (one element per string), as tritonclient builds them; ONNX Runtime takes
them as `tensor(string)` and returns `str` objects, which `to_bytes_array` turns back into bytes.
"""

from __future__ import annotations

import numpy as np

OBJECT = np.dtype(object)

# OIP datatype -> (numpy dtype, InferTensorContents field, Triton model_config DataType name)
DATATYPES: dict[str, tuple[np.dtype, str, str]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents", "TYPE_BOOL"),
    "UINT8": (np.dtype(np.uint8), "uint_contents", "TYPE_UINT8"),
    "UINT16": (np.dtype(np.uint16), "uint_contents", "TYPE_UINT16"),
    "UINT32": (np.dtype(np.uint32), "uint_contents", "TYPE_UINT32"),
    "UINT64": (np.dtype(np.uint64), "uint64_contents", "TYPE_UINT64"),
    "INT8": (np.dtype(np.int8), "int_contents", "TYPE_INT8"),
    "INT16": (np.dtype(np.int16), "int_contents", "TYPE_INT16"),
    "INT32": (np.dtype(np.int32), "int_contents", "TYPE_INT32"),
    "INT64": (np.dtype(np.int64), "int64_contents", "TYPE_INT64"),
    "FP16": (np.dtype(np.float16), "fp32_contents", "TYPE_FP16"),
    "FP32": (np.dtype(np.float32), "fp32_contents", "TYPE_FP32"),
    "FP64": (np.dtype(np.float64), "fp64_contents", "TYPE_FP64"),
    "BYTES": (OBJECT, "bytes_contents", "TYPE_STRING"),
}

ONNX_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
TRITON_TO_OIP = {triton: name for name, (_, _, triton) in DATATYPES.items()}
_OIP_OF = {dtype: name for name, (dtype, _, _) in DATATYPES.items()}


def contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous, same shape (np.ascontiguousarray makes a scalar's shape (1,))."""
    return array if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(array.shape)


def numpy_dtype(datatype: str) -> np.dtype:
    return DATATYPES[datatype][0]


def triton_type(datatype: str) -> str:
    """'FP32' -> 'TYPE_FP32' ('TYPE_INVALID' for a type OIP has no name for, e.g. BF16 from a file)."""
    return DATATYPES[datatype][2] if datatype in DATATYPES else "TYPE_INVALID"


def oip_of(dtype: np.dtype) -> str | None:
    """The OIP name of a numpy dtype (str arrays count as BYTES), None when OIP has none."""
    if dtype.kind in "USO":
        return "BYTES"
    return _OIP_OF.get(dtype)


def to_bytes_array(array: np.ndarray) -> np.ndarray:
    """A string tensor (str, bytes or object elements) as an object array of bytes."""
    flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.reshape(-1).tolist()]
    out = np.empty(len(flat), OBJECT)
    out[:] = flat
    return out.reshape(array.shape)


def serialize_bytes(array: np.ndarray) -> bytes:
    """OIP's raw form of a BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    parts = []
    for value in to_bytes_array(array).reshape(-1).tolist():
        parts += [len(value).to_bytes(4, "little"), value]
    return b"".join(parts)


def deserialize_bytes(data, count: int, what: str) -> np.ndarray:
    """The inverse of `serialize_bytes`: exactly `count` length-prefixed elements filling `data`;
    ValueError (naming `what`) otherwise."""
    view = memoryview(data)
    out = np.empty(count, OBJECT)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise ValueError(f"{what}: raw BYTES content ends after {i} of {count} elements")
        size = int.from_bytes(view[pos : pos + 4], "little")
        pos += 4
        if pos + size > len(view):
            raise ValueError(f"{what}: raw BYTES element {i} is {size} bytes, past the end of the content")
        out[i] = bytes(view[pos : pos + size])
        pos += size
    if pos != len(view):
        raise ValueError(f"{what}: {len(view) - pos} byte(s) after the last of {count} BYTES elements")
    return out
