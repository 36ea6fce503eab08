"""Validation of a decoded request against a model's signature, before it runs: names, datatypes,
ranks, fixed dims, batch sizes, lengths, finite values, value ranges; what may be left out (lengths,
states) filled in. Transport-free (numpy arrays in, a `Prepared` request out); every refusal is an
`InvalidArgument` naming the input and what was expected. The data plane calls `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.batcher import Work
from server.dtypes import OBJECT, contiguous, numpy_dtype, oip_of
from server.errors import InvalidArgument, clip
from server.runtime import Runtime, reshape
from server.signature import Signature, TensorSpec, structure

_FEW_ROWS = 64  # lengths of at most this many sequences are range-checked in Python (see `validate`)


@dataclass
class Prepared:
    """A validated request: complete feeds for the runtime, and what it asked for."""

    runtime: Runtime
    work: Work  # feeds (defaults filled in), outputs to compute, rows, steps, merge key

    @property
    def outputs(self) -> list[str]:
        return self.work.outputs

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        return self.work.feeds


def _oip(dtype: np.dtype) -> str:
    return oip_of(dtype) or str(dtype)


def _check_finite(name: str, array: np.ndarray, spec: TensorSpec, lengths: np.ndarray | None = None) -> None:
    """NaN/Inf values are refused in a recurrent model's sequence and state inputs: ONNX Runtime's
    CPU LSTM turns a NaN input into finite outputs (measured) where PyTorch gives NaN, so passing
    them on would answer with plausible numbers that agree with nothing. Only the valid steps count
    (padding is never read)."""
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = ~finite
    if lengths is not None:
        b, t = spec.batch_axis, spec.time_axis
        valid = np.arange(array.shape[t])[None, :] < lengths[:, None]  # (B, T)
        valid = valid.reshape(valid.shape + (1,) * (array.ndim - 2))
        bad &= np.moveaxis(valid, (0, 1), (b, t))
        if not bad.any():
            return
    where = [int(i) for i in np.argwhere(bad)[0]]
    raise InvalidArgument(
        f"input '{name}': values must be finite; {name}{where} = {array[tuple(where)]} "
        f"({int(bad.sum())} non-finite value(s){' within the valid lengths' if lengths is not None else ''})"
    )


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    """A BYTES input as ONNX Runtime takes string tensors: an object array of str (UTF-8 text)."""
    flat = array.reshape(-1).tolist()
    out = np.empty(len(flat), OBJECT)
    for i, value in enumerate(flat):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"input '{name}': BYTES element {i} is not UTF-8 text (ONNX Runtime's string tensors hold text)"
                ) from None
        out[i] = str(value)
    return out.reshape(array.shape)


def _fixed(spec: TensorSpec, rows: int) -> list[int] | None:
    """The shape of `spec` for `rows` sequences, None when a dim other than the batch is free."""
    shape = list(spec.shape)
    if spec.batch_axis is not None:
        shape[spec.batch_axis] = rows
    return None if any(d < 0 for d in shape) else shape


def initial_state(sig: Signature, rows: int, given: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every state input for `rows` sequences: what the client sent, else the config's
    initial_state (repeated along the batch axis), else zeros."""
    given = given or {}
    out = {}
    for pair in sig.states:
        if pair.input in given:
            out[pair.input] = given[pair.input]
            continue
        spec = sig.input(pair.input)
        if pair.initial is not None:
            value = pair.initial
            if spec.batch_axis is not None and rows != 1:
                value = np.repeat(value, rows, axis=spec.batch_axis)
            out[pair.input] = value
            continue
        shape = _fixed(spec, rows)
        if shape is None:
            raise InvalidArgument(
                f"input '{pair.input}' must be sent: its shape {spec.shape} is not fixed, so the server cannot "
                "start it at zeros"
            )
        out[pair.input] = np.zeros(shape, numpy_dtype(spec.datatype))
    return out


def validate(rt: Runtime, arrays: dict[str, np.ndarray], requested: list[str], sequence: bool = False,
             states: bool = True) -> Prepared:  # fmt: skip
    """Check names, datatypes, ranks, fixed dims, batch sizes and lengths against the model's
    signature; fill in what may be left out (lengths: full; states: initial, unless `states` is
    False: a sequence's later chunk, whose state the server keeps). Messages name the input and
    what was expected. `sequence`: the request is a sequence's (the caller adds the control
    inputs); a model with control inputs takes no other.

    What depends only on the request's structure (its inputs' names, datatypes and shapes, the
    outputs asked for) is checked once per structure and model version (`_structure`, remembered
    in `Signature.plans`); what depends on values (lengths, finite, token ids, text) every time."""
    sig = rt.signature
    key = (sequence, *requested, None, *structure(arrays))
    plan = sig.plans.get(key)
    if plan is None:
        plan = sig.remember(key, _structure(rt, arrays, requested, sequence))
    rows, steps, outputs = plan
    feeds = {name: _as_text(name, a) if a.dtype == OBJECT or a.dtype.kind in "SU" else contiguous(a)
             for name, a in arrays.items()}  # fmt: skip
    if sig.lengths is not None and sig.ragged in feeds:
        lengths = None  # not sent: every step is valid, so none is left out of the finite check
        if sig.lengths in feeds:
            lengths = feeds[sig.lengths]
            if rows <= _FEW_ROWS:  # Python's min/max over a short list: ~6x cheaper than two numpy reductions
                values = lengths.tolist()
                out_of_range = min(values) < 1 or max(values) > steps
            else:
                out_of_range = lengths.min() < 1 or lengths.max() > steps
            bad = np.flatnonzero((lengths < 1) | (lengths > steps)) if out_of_range else ()
            if len(bad):
                i = int(bad[0])
                raise InvalidArgument(
                    f"input '{sig.lengths}': every length must be in 1..{steps} (the time size of '{sig.ragged}'); "
                    f"{sig.lengths}[{i}] = {int(lengths[i])}"
                )
        else:
            feeds[sig.lengths] = np.full((rows,), steps, numpy_dtype(sig.input(sig.lengths).datatype))
        _check_finite(sig.ragged, feeds[sig.ragged], sig.input(sig.ragged), lengths)
    for pair in sig.states:
        if pair.input in feeds and not pair.implicit:  # a recurrent export's h0/c0
            _check_finite(pair.input, feeds[pair.input], sig.input(pair.input))
    for name, array in feeds.items() if sig.checks_values else ():
        spec = sig.input(name)
        if spec.value_range is not None and array.size:
            lo, hi = spec.value_range
            bad = np.flatnonzero((array < lo) | (array > hi))
            if bad.size:
                where = [int(i) for i in np.unravel_index(int(bad[0]), array.shape)]
                raise InvalidArgument(
                    f"input '{name}': values must be in {lo}..{hi} (token ids below the vocabulary size "
                    f"{hi + 1}); {name}{where} = {int(array.reshape(-1)[bad[0]])}"
                )
    if sig.states and states:
        feeds.update(initial_state(sig, rows, feeds))
    if sig.ragged is not None and sig.ragged in feeds:
        x = feeds[sig.ragged]
        cells = x.size // max(1, rows * steps)
    else:
        cells = max((a.size // rows for a in feeds.values()), default=1)
    return Prepared(rt, Work(feeds, list(outputs), rows, steps if sig.ragged is not None else None, None, cells, sig))


def _structure(rt: Runtime, arrays: dict[str, np.ndarray], requested: list[str], sequence: bool):
    """`validate`'s checks of what the request's structure alone decides (names, datatypes, ranks,
    fixed dims, batch sizes, the lengths' shape, config.pbtxt reshapes, the outputs asked for):
    (rows, steps, outputs), or the refusal naming the input and what was expected."""
    sig = rt.signature
    if sig.controls and not sequence:
        raise InvalidArgument(
            f"inference request to model '{rt.name}' must specify a non-zero or non-empty correlation ID: it is a "
            f"sequence model (its control inputs {[c.input for c in sig.controls]} are fed by the server); send "
            "sequence_id, with sequence_start on a sequence's first request and sequence_end on its last"
        )
    for name in arrays:
        if sig.input(name) is None:
            raise InvalidArgument(f"unknown input {clip(name)} for model '{rt.name}'; expected {sig.input_names}")
        if name in sig.control_shapes:
            raise InvalidArgument(
                f"input '{name}' of model '{rt.name}' is a sequence control input: the server feeds it from "
                f"sequence_id / sequence_start / sequence_end; send only {sig.input_names}"
            )
    for spec in sig.required_inputs:
        if spec.name not in arrays:
            raise InvalidArgument(
                f"missing required input '{spec.name}' ({spec.datatype}, shape {spec.shape}) for model '{rt.name}'"
            )
    rows, rows_from, steps = None, None, None
    for name, array in arrays.items():
        spec = sig.input(name)
        want = spec.dtype
        if array.dtype != want and not (want == OBJECT and array.dtype.kind in "OSU"):
            raise InvalidArgument(f"input '{name}': datatype must be {spec.datatype}, got {_oip(array.dtype)}")
        shape = array.shape
        if len(shape) != spec.rank:
            raise InvalidArgument(
                f"input '{name}': expected rank {spec.rank} (shape {spec.shape}), got shape {list(shape)}"
            )
        if name == sig.lengths:
            continue  # checked below, against the ragged input
        axis = spec.batch_axis
        if axis is not None:
            if rows is None:
                rows, rows_from = shape[axis], name
            elif shape[axis] != rows:
                raise InvalidArgument(
                    f"input '{name}': batch size {shape[axis]} (axis {axis}) differs from input '{rows_from}' ({rows})"
                )
        if name == sig.ragged:
            steps = shape[spec.time_axis]
            if sig.static_length is not None and steps > sig.static_length:
                raise InvalidArgument(
                    f"input '{name}': {steps} time steps, but static model '{rt.name}' takes at most "
                    f"{sig.static_length} (its fixed T); use the dynamic model for longer sequences"
                )
        for axis, expected in sig.fixed_dims[name]:
            if shape[axis] != expected:
                raise InvalidArgument(
                    f"input '{name}': dim {axis} must be {expected} (model '{rt.name}' takes shape {spec.shape}), "
                    f"got shape {list(shape)}"
                )
    if rows is not None and rows < 1 or steps is not None and steps < 1:
        which = rows_from if rows is not None and rows < 1 else sig.ragged
        raise InvalidArgument(f"input '{which}': batch and time must be >= 1, got shape {list(arrays[which].shape)}")
    if rows is None:
        rows = 1  # no batch axis: one request is one sequence
    if sig.lengths is not None and sig.ragged in arrays and sig.lengths in arrays:
        shape = arrays[sig.lengths].shape
        if shape != (rows,):
            raise InvalidArgument(
                f"input '{sig.lengths}': expected shape [{rows}] (one length per sequence of '{sig.ragged}'), "
                f"got {list(shape)}"
            )
    for name, array in arrays.items() if sig.checks_values else ():
        spec = sig.input(name)
        if spec.model_shape is not None:  # config.pbtxt reshape: refused here, not inside the run
            try:
                reshape(array, spec.model_shape, spec.batch_axis)
            except ValueError:
                raise InvalidArgument(
                    f"input '{name}': shape {list(array.shape)} cannot be reshaped to the model's {spec.model_shape} "
                    f"(config.pbtxt reshape)"
                ) from None
    names = sig.output_names
    outputs = list(requested) or names
    unknown = [n for n in outputs if n not in names]
    if unknown:
        raise InvalidArgument(f"requested output(s) {clip(unknown)} unknown; model '{rt.name}' has {names}")
    if len(set(outputs)) != len(outputs):
        raise InvalidArgument(f"requested outputs {clip(outputs)}: each may appear once")
    return rows, steps, tuple(outputs)
