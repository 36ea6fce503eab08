"""Triton's classification extension, transport-free: an output requested with the parameter
`classification: k` comes back as its k highest-valued elements, each the BYTES string
"<value>:<index>[:<label>]" (highest first; equal values: lower index first).

Shape, as Triton: a model whose axis 0 is the batch (config.pbtxt `max_batch_size > 0`, or, with
no config.pbtxt, an output whose axis 0 the ONNX file names as the batch) gets [batch, min(k, n)]
with n the elements of one batch entry; any other output is ranked whole: [min(k, n)]. Labels are
the lines of the output's `label_filename` (config.pbtxt, or the config a load request gave),
checked and read when the model loads (server/model_config.py); an index past the last line has none.
"""

from __future__ import annotations

import numpy as np

from server.dtypes import OBJECT, oip_of
from server.errors import InvalidArgument, clip

PARAMETER = "classification"
MAX_ELEMENTS = 1_000_000  # elements ranked per batch entry (Triton's bound)


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


def classify(name: str, array: np.ndarray, k: int, batch_first: bool, labels: tuple[str, ...] | None) -> np.ndarray:
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
    return rt.repo_config.get("triton") is None and spec is not None and spec.batch_axis == 0


def _labels(rt, output: str) -> tuple[str, ...] | None:
    """The output's labels, read from its label_filename when the model loaded (model_config.py)."""
    triton = rt.repo_config.get("triton")
    spec = next((t for t in triton.outputs if t.name == output), None) if triton is not None else None
    return spec.labels if spec is not None else None
