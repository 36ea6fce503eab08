"""Triton's classification extension, transport-free: an output requested with the parameter
`classification: k` comes back as its k highest-valued elements, each the BYTES string
"<value>:<index>[:<label>]" (highest first; equal values: lower index first).

Shape, as Triton: a model whose axis 0 is the batch (config.pbtxt `max_batch_size > 0`, or, with
no config.pbtxt, an output whose axis 0 the ONNX file names as the batch) gets [batch, min(k, n)]
with n the elements of one batch entry; any other output is ranked whole: [min(k, n)]. Labels are
the lines of the output's `label_filename` (config.pbtxt, or the config a load request gave), a
file inside the model's folder of at most MAX_LABEL_BYTES; an index past the last line has none.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from server.dtypes import OBJECT, oip_of
from server.errors import FailedPrecondition, InvalidArgument, clip
from server.proto import grpc_service_pb2 as pb

PARAMETER = "classification"
MAX_ELEMENTS = 1_000_000  # elements ranked per batch entry (Triton's bound)
MAX_LABEL_BYTES = 1 << 20  # a label file larger than this is refused (ImageNet's 1000 labels: 21 KB)
LABELS_KEY = "labels"  # model_config key: {output: label_filename} given with a load request
_CONFIG_BYTES = 1 << 20  # config.pbtxt read for label_filename (model_config.MAX_BYTES)


def class_count(output: str, parameters: dict) -> int:
    """The `classification` count requested for `output` (0: none); INVALID_ARGUMENT unless it is
    an integer >= 0 (0 asks for the raw tensor, as Triton's HTTP API reads it)."""
    value = parameters.get(PARAMETER)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(
            f"output {clip(output)}: parameter 'classification' must be an integer >= 0 (the number of "
            f"classes to return), got {clip(value)}"
        )
    return value


def check(output_parameters: dict[str, dict]) -> None:
    """Validate every output's classification parameter before anything runs."""
    for output, parameters in output_parameters.items():
        class_count(output, parameters)


def label_files(config: pb.ModelConfig) -> dict[str, str]:
    """{output: label_filename} of a Triton ModelConfig."""
    return {o.name: o.label_filename for o in config.output if o.label_filename}


def apply(rt, output_parameters: dict[str, dict], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The response's outputs with each output that asked for classification replaced by its
    top-k classes. `rt`: the ModelRuntime that produced them."""
    counts = {name: class_count(name, params) for name, params in output_parameters.items()}
    if not any(counts.values()):
        return outputs
    out = dict(outputs)
    for name, k in counts.items():
        if k and name in out:
            out[name] = classify(name, out[name], k, _batch_first(rt, name), _labels(rt, name))
    return out


def classify(name: str, array: np.ndarray, k: int, batch_first: bool, labels: list[str] | None) -> np.ndarray:
    """Top-k of `array` (per batch entry when `batch_first`) as "value:index[:label]" bytes."""
    if array.dtype == OBJECT or array.dtype.kind not in "iuf":
        raise InvalidArgument(
            f"output {clip(name)}: class result not available for output due to unsupported type "
            f"'{oip_of(array.dtype) or array.dtype}'"
        )
    batched = batch_first and array.ndim > 0
    rows = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
    n = rows.shape[1]
    if n > MAX_ELEMENTS:
        raise InvalidArgument(
            f"output {clip(name)}: classification output tensor too large ({n} elements per batch entry; at most "
            f"{MAX_ELEMENTS})"
        )
    count = min(k, n)
    result = np.empty((rows.shape[0], count), OBJECT)
    for b, row in enumerate(rows):
        # descending, equal values in index order: a stable ascending sort of the reversed row, reversed
        order = (n - 1 - np.argsort(row[::-1], kind="stable")[::-1])[:count]
        for j, index in enumerate(order.tolist()):
            text = f"{row[index]}:{index}"  # numpy's shortest round-trip text of the value
            if labels is not None and index < len(labels):
                text += f":{labels[index]}"
            result[b, j] = text.encode("utf-8")
    return result if batched else result.reshape(count)


def _batch_first(rt, name: str) -> bool:
    sig = rt.signature
    if sig.max_batch_size > 0:
        return True
    spec = sig.output(name)
    return rt.model_config.get("triton") is None and spec is not None and spec.batch_axis == 0


def _labels(rt, output: str) -> list[str] | None:
    folder = Path(rt.path).parent.parent  # <repository>/<model>/<version>/model.onnx
    files = rt.model_config.get(LABELS_KEY)
    if files is None:  # the model's own config.pbtxt (the parsed config does not keep label_filename)
        files = _pbtxt_label_files(folder / "config.pbtxt")
    filename = files.get(output)
    return read_labels(rt.name, output, folder, filename) if filename else None


def _pbtxt_label_files(path: Path) -> dict[str, str]:
    try:
        stat = path.stat()
    except OSError:
        return {}
    return _pbtxt_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _pbtxt_cached(path: str, mtime_ns: int, size: int) -> dict[str, str]:
    if size > _CONFIG_BYTES:
        return {}
    config = pb.ModelConfig()
    try:
        text_format.Parse(Path(path).read_text("utf-8"), config)
    except (OSError, UnicodeDecodeError, text_format.ParseError):
        return {}  # the model would not have loaded: nothing to label
    return label_files(config)


def label_path(model: str, output: str, folder: Path, filename: str) -> Path:
    """The label file of `output`: inside `folder` and at most MAX_LABEL_BYTES, else
    FAILED_PRECONDITION naming the model, the output and the file."""
    where = f"model '{model}' output {clip(output)}: label_filename {clip(filename)}"
    root = folder.resolve()
    path = (root / filename).resolve()
    if not path.is_relative_to(root) or path == root:
        raise FailedPrecondition(f"{where} must name a file inside the model's folder")
    if not path.is_file():
        raise FailedPrecondition(f"{where} not found in the model's folder")
    if path.stat().st_size > MAX_LABEL_BYTES:
        raise FailedPrecondition(f"{where} is larger than {MAX_LABEL_BYTES} bytes")
    return path


def read_labels(model: str, output: str, folder: Path, filename: str) -> list[str]:
    path = label_path(model, output, folder, filename)
    stat = path.stat()
    return _read_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int) -> list[str]:
    text = Path(path).read_bytes().decode("utf-8", "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]
