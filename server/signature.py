"""A model's signature: what it takes and returns, built once when a version loads, from the ONNX
file and, when present, its Triton `config.pbtxt`.

For every input and output: name, OIP datatype, shape (-1 where the file leaves a dim free) and
roles. Everything downstream (validation, limits, batching, splitting, trimming, sequences,
metadata, config, both frontends) reads the signature; no tensor name is known to server code
outside `_roles_from_export`, which reads this project's own export metadata.

Roles:
- batch axis: the axis named `batch` in the file (or its `lstm.axes` metadata); else Triton's
  rule, when config.pbtxt has max_batch_size > 0: axis 0 of every tensor. None: no batch axis
  (the model's requests run one by one).
- ragged input + lengths input: an input whose time axis varies per sequence, and the INT32/INT64
  input [batch] holding each sequence's length (wired to the recurrent nodes' `sequence_lens`).
  Requests of different lengths merge by padding along the time axis; outputs with a time axis are
  cut back to each request's own length. From this project's metadata, or config.pbtxt's
  `parameters { key: "lengths_input" value { string_value: "<input>" } }` for a file from elsewhere.
- state pairs: (input, output) where the output after a chunk is the input of the next one: this
  project's `h0 -> h_n`, `c0 -> c_n`, or Triton's `sequence_batching.state` (implicit state: the
  client does not send it; the server keeps it per sequence).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from contract import metadata
from server.control import Control
from server.dtypes import ONNX_TO_OIP, numpy_dtype
from server.model_config import TritonConfig


@dataclass
class TensorSpec:
    name: str
    datatype: str  # OIP datatype; what ONNX Runtime wants (a type OIP has no name for stays as ORT says it)
    shape: list[int]  # the whole shape the client sends or gets, batch axis included; -1: free
    batch_axis: int | None = None
    time_axis: int | None = None  # the axis cut back to each request's length (ragged models)
    optional: bool = False  # may be left out of a request (lengths, state inputs, config `optional`)
    model_shape: list[int] | None = None  # config.pbtxt `reshape`: the shape the model sees, if different
    dim_names: list[str | None] = field(default_factory=list)  # the file's symbolic names (None: fixed)
    value_range: tuple[int, int] | None = None  # integer inputs: allowed values, inclusive (token ids)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.datatype)


@dataclass(frozen=True)
class StatePair:
    input: str  # fed from the state
    output: str  # becomes the state after each chunk
    implicit: bool  # Triton's implicit state: hidden from the client's inputs and outputs
    initial: np.ndarray | None = None  # one sequence's initial value (batch axis of size 1); None: zeros


PLANS_MAX = 256  # request structures remembered per model version (`Signature.plans`)


def structure(arrays: dict[str, np.ndarray]) -> tuple:
    """What a key of `Signature.plans` (and the reply heads' cache) holds of some tensors: each
    one's name, dtype and shape, in their order."""
    return tuple((name, a.dtype, a.shape) for name, a in arrays.items())


@dataclass
class Signature:
    inputs: list[TensorSpec]  # as the client sees them (implicit state inputs left out)
    outputs: list[TensorSpec]  # likewise (implicit state outputs left out)
    hidden_inputs: list[TensorSpec] = field(default_factory=list)  # implicit state inputs
    hidden_outputs: list[TensorSpec] = field(default_factory=list)
    ragged: str | None = None  # the input padded along its time axis when requests merge
    lengths: str | None = None  # the input with each sequence's length
    states: list[StatePair] = field(default_factory=list)
    static_length: int | None = None  # T of an unrolled model: the ragged input is padded to it
    bidirectional: bool = False  # a backward direction reads the whole sequence: no chunked streaming
    max_batch_size: int = 0  # Triton's: > 0 when config.pbtxt says so (dims then leave out the batch)
    merge: bool = True  # False: never merged (batch axes guessed, the load probe or server.invariance said no)
    controls: list[Control] = field(default_factory=list)  # sequence control inputs the server feeds
    control_shapes: dict[str, list[int]] = field(default_factory=dict)  # each one's shape for one row

    def __post_init__(self) -> None:
        # by name, for the per-request lookups (the lists are fixed once built; specs are shared)
        self._inputs = {t.name: t for t in self.inputs + self.hidden_inputs}
        self._outputs = {t.name: t for t in self.outputs + self.hidden_outputs}
        self.checks_values = any(t.value_range is not None or t.model_shape is not None for t in self._inputs.values())
        self.required_inputs = [t for t in self.inputs if not t.optional]
        # per input, the (axis, size) of every fixed dim a request must match: not the batch axis,
        # nor the ragged input's time axis (a static model's fixed T is an upper bound, checked apart)
        self.fixed_dims = {
            t.name: [(a, d) for a, d in enumerate(t.shape)
                     if d >= 0 and a != t.batch_axis and not (t.name == self.ragged and a == t.time_axis)]
            for t in self._inputs.values()
        }  # fmt: skip
        # per input, the axes a request's merge key leaves out (`batcher.Work.merge_key`)
        self.merge_skips = {
            t.name: (t.batch_axis, t.time_axis if t.name == self.ragged else None) for t in self._inputs.values()
        }
        # what `validate` concluded of each request structure it passed (bounded there)
        self.plans: dict[tuple, object] = {}
        # requests can be merged only where every tensor has a batch axis
        self.batchable = all(t.batch_axis is not None for t in self.all_inputs + self.all_outputs)

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs.get(name)

    def remember(self, key: tuple, value):
        """Keep what was concluded of one request structure (`plans`): at most `PLANS_MAX`, then
        all are forgotten (a client cycling through shapes costs recomputation, never memory)."""
        if len(self.plans) >= PLANS_MAX:
            self.plans.clear()
        self.plans[key] = value
        return value

    def output(self, name: str) -> TensorSpec | None:
        return self._outputs.get(name)

    @property
    def all_inputs(self) -> list[TensorSpec]:
        return self.inputs + self.hidden_inputs

    @property
    def all_outputs(self) -> list[TensorSpec]:
        return self.outputs + self.hidden_outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def batching_rule(self) -> str:
        """'ragged': merge any lengths by padding the time axis; 'equal': merge requests whose
        non-batch dims all agree (Triton's rule); 'none': each request runs alone (also where the
        load-time check, server/invariance.py, found answers that depend on batch-mates)."""
        if not self.batchable or not self.merge:
            return "none"
        return "ragged" if self.ragged is not None else "equal"

    @property
    def stateful(self) -> bool:
        """A sequence model: state the server keeps, or control inputs it feeds per sequence."""
        return bool(self.states or self.controls)

    def state_input_names(self) -> list[str]:
        return [s.input for s in self.states]

    def roles_json(self) -> dict:
        """What a client needs to call the model without knowing its names: the ragged input, its
        lengths input, and the state pairs it may send ("implicit": kept by the server only)."""
        return {
            "ragged": self.ragged,
            "lengths": self.lengths,
            "states": [{"input": p.input, "output": p.output, "implicit": p.implicit} for p in self.states],
        }

    def axes_json(self) -> dict[str, dict[str, int]]:
        """{tensor: {"batch": axis, "time": axis}}: what a client needs to split a batched answer."""
        out: dict[str, dict[str, int]] = {}
        for t in self.inputs + self.outputs:
            dims = {k: v for k, v in (("batch", t.batch_axis), ("time", t.time_axis)) if v is not None}
            if dims:
                out[t.name] = dims
        return out


class SignatureError(ValueError):
    """The file and its config disagree, or the file is not servable: the message says why."""


def _ok_axis(axis, rank: int) -> int | None:
    return axis if isinstance(axis, int) and not isinstance(axis, bool) and 0 <= axis < rank else None


def _spec(node, recorded: dict) -> TensorSpec:
    shape = list(node.shape)
    names = [d if isinstance(d, str) else None for d in shape]
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    named = {d: i for i, d in reversed(list(enumerate(shape))) if isinstance(d, str)}
    mine = recorded.get(node.name) if isinstance(recorded.get(node.name), dict) else {}
    batch = _ok_axis(named.get("batch", mine.get("batch")), len(shape))
    time = _ok_axis(named.get("time", mine.get("time")), len(shape))
    datatype = ONNX_TO_OIP.get(node.type, node.type)
    return TensorSpec(node.name, datatype, dims, batch, time, dim_names=names)


def _roles_from_export(meta: dict, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict:
    """This project's exports (`lstm.*` metadata): x [batch, time, features] is ragged with
    `lengths`; h0 -> h_n and c0 -> c_n are state pairs the client may send."""
    names = [t.name for t in inputs]
    roles: dict = {}
    if names[:2] == ["x", "lengths"]:
        roles["ragged"], roles["lengths"] = "x", "lengths"
    out_names = {t.name for t in outputs}
    roles["states"] = [(i, i[0] + "_n") for i in ("h0", "c0") if i in names and i[0] + "_n" in out_names]
    vocab = meta.get(metadata.VOCAB_SIZE) or ""
    if meta.get(metadata.INPUT) == "tokens" and vocab.isdigit() and names[:1] == ["x"]:
        inputs[0].value_range = (0, int(vocab) - 1)  # ORT refuses ids >= vocab but reads negative ones
    static = meta.get(metadata.STATIC_LENGTH) or ""
    if static.isdigit():
        roles["static_length"] = int(static)
    try:
        roles["bidirectional"] = bool(json.loads(meta.get(metadata.CONFIG) or "{}").get("bidirectional", False))
    except (ValueError, AttributeError):
        roles["bidirectional"] = False
    return roles


def _export_time_axes(meta: dict, inputs: list[TensorSpec], outputs: list[TensorSpec], unnamed: bool) -> None:
    """Time axes this project's exports have by convention where the file does not name them: in a
    file that names no axis (`unnamed`) x is (batch, time, features), and in exports before
    `lstm.axes` existed y is (batch, time, D*H)."""
    for t in inputs if unnamed else ():
        if t.name == "x" and t.rank >= 2 and t.shape[1] < 0 and t.time_axis is None:
            t.time_axis = 1
    if metadata.AXES not in meta:
        for t in outputs:
            if t.name == "y" and t.rank == 3 and t.time_axis is None:
                t.time_axis = 1


def _check_dims(what: str, file_shape: list[int], config_shape: list[int]) -> None:
    if len(file_shape) != len(config_shape):
        raise SignatureError(
            f"{what}: config.pbtxt gives rank {len(config_shape)} {config_shape}, model.onnx has rank "
            f"{len(file_shape)} {file_shape}"
        )
    for i, (f, c) in enumerate(zip(file_shape, config_shape)):
        if f >= 0 and c >= 0 and f != c:
            raise SignatureError(
                f"{what}: dim {i} is {c} in config.pbtxt but {f} in model.onnx (config {config_shape}, "
                f"model {file_shape})"
            )


def _with_batch(dims: tuple[int, ...], axis: int) -> list[int]:
    out = list(dims)
    out.insert(axis, -1)
    return out


def build(session, meta: dict, triton: TritonConfig | None, path_label: str = "model.onnx") -> Signature:
    """The signature of a loaded session; SignatureError (naming the tensor and both values) when
    config.pbtxt and the file disagree."""
    try:
        recorded = json.loads(meta.get(metadata.AXES) or "{}")
    except ValueError:
        recorded = {}
    recorded = recorded if isinstance(recorded, dict) else {}
    inputs = [_spec(n, recorded) for n in session.get_inputs()]
    outputs = [_spec(n, recorded) for n in session.get_outputs()]
    project = metadata.EXPORT_MODE in meta or metadata.CONFIG in meta
    triton = triton or TritonConfig()
    named = any(t.batch_axis is not None for t in inputs + outputs)
    guessed = False
    if not named and triton.max_batch_size == 0 and not triton.batch_declared:
        # No axis named anywhere (nor a max_batch_size): a free axis 0 is taken as the batch for
        # splitting results per sequence; merging requests needs the file's word for it, so none
        # are merged. An explicit `max_batch_size: 0` is Triton's "no batch axis": nothing guessed.
        for t in inputs + outputs:
            if t.shape and t.shape[0] < 0:
                t.batch_axis, guessed = 0, True
    if project:
        _export_time_axes(meta, inputs, outputs, unnamed=not named and triton.max_batch_size == 0)
    if triton.max_batch_size > 0 and not named:
        for t in inputs + outputs:  # Triton's rule: axis 0 of every tensor is the batch
            if not t.shape:
                raise SignatureError(
                    f"{t.name}: a scalar in model.onnx, but max_batch_size > 0 makes axis 0 of every tensor the batch"
                )
            t.batch_axis = 0
    roles = _roles_from_export(meta, inputs, outputs) if project else {"states": []}
    lengths_input = triton.parameters.get("lengths_input")
    if lengths_input:
        roles["lengths"] = lengths_input
        candidates = [t.name for t in inputs if t.time_axis is not None and t.name != lengths_input]
        if len(candidates) != 1:
            raise SignatureError(
                f"parameters.lengths_input '{lengths_input}': exactly one other input must have an axis named "
                f"'time' (found {candidates})"
            )
        roles["ragged"] = candidates[0]
    by_name = {t.name: t for t in inputs}
    out_by_name = {t.name: t for t in outputs}

    # config.pbtxt input/output entries: checked against the file
    config_optional: list[str] = []
    for kind, entries, table in (("input", triton.inputs, by_name), ("output", triton.outputs, out_by_name)):
        for c in entries:
            t = table.get(c.name)
            if t is None:
                raise SignatureError(f"config.pbtxt {kind} '{c.name}': {path_label} has no such {kind} (it has "
                                     f"{sorted(table)})")  # fmt: skip
            if c.datatype != t.datatype:
                raise SignatureError(
                    f"{kind} '{c.name}': data_type {c.datatype} in config.pbtxt, {t.datatype} in {path_label}"
                )
            batch = t.batch_axis if triton.max_batch_size > 0 else None
            client = _with_batch(c.dims, batch) if batch is not None else list(c.dims)
            model = _with_batch(c.reshape, batch) if c.reshape is not None and batch is not None else (
                list(c.reshape) if c.reshape is not None else client)  # fmt: skip
            _check_dims(f"{kind} '{c.name}'" + (" (reshape)" if c.reshape is not None else ""), t.shape, model)
            if c.reshape is not None:
                dims, shape = list(c.dims), list(c.reshape)  # without the batch axis (both have it alike)
                if -1 not in dims and -1 not in shape and math.prod(dims) != math.prod(shape):
                    raise SignatureError(f"{kind} '{c.name}': dims {list(c.dims)} and reshape {list(c.reshape)} "
                                         "hold different element counts")  # fmt: skip
                t.model_shape = [m if m >= 0 else f for m, f in zip(model, t.shape)]
                t.shape = client
                t.time_axis = None  # a reshaped tensor's axes are the config's, not the file's names
                if batch is None:
                    t.batch_axis = None
            else:
                t.shape = [f if f >= 0 else c_ for f, c_ in zip(t.shape, client)]
            if kind == "input" and c.optional:
                config_optional.append(c.name)

    states: list[StatePair] = []
    hidden_in: list[TensorSpec] = []
    hidden_out: list[TensorSpec] = []
    for i, o in roles.get("states", []):
        states.append(StatePair(i, o, implicit=False))
        by_name[i].optional = True
    for s in triton.states:
        t_in, t_out = by_name.get(s.input_name), out_by_name.get(s.output_name)
        for what, t, name in (("input_name", t_in, s.input_name), ("output_name", t_out, s.output_name)):
            if t is None:
                raise SignatureError(f"sequence_batching.state {what} '{name}': {path_label} has no such tensor")
        for t in (t_in, t_out):
            if t.datatype != s.datatype:
                raise SignatureError(
                    f"state '{t.name}': data_type {s.datatype} in config.pbtxt, {t.datatype} in {path_label}"
                )
            batch = t.batch_axis if triton.max_batch_size > 0 else None
            full = _with_batch(s.dims, batch) if batch is not None else list(s.dims)
            _check_dims(f"state '{t.name}'", t.shape, full)
            t.shape = [f if f >= 0 else c for f, c in zip(t.shape, full)]
        one = [1 if d < 0 else d for d in t_in.shape]
        if t_in.batch_axis is not None:
            one[t_in.batch_axis] = 1
        initial = None
        if s.initial_file is not None:
            dtype = numpy_dtype(s.datatype)
            with s.initial_file.open("rb") as f:  # its size was checked when the config was read: read no more
                raw = f.read(math.prod(one) * dtype.itemsize + 1)
            if len(raw) != math.prod(one) * dtype.itemsize:
                raise SignatureError(
                    f"state '{s.input_name}': initial_state data_file is {len(raw)} bytes, expected "
                    f"{math.prod(one) * dtype.itemsize} ({s.datatype} {one})"
                )
            initial = np.frombuffer(raw, dtype).reshape(one).copy()
        states.append(StatePair(s.input_name, s.output_name, implicit=True, initial=initial))
        t_in.optional = True
        hidden_in.append(t_in)
        hidden_out.append(t_out)
    control_shapes: dict[str, list[int]] = {}
    state_names = {s.input_name for s in triton.states}
    for c in triton.controls:
        t = by_name.get(c.input)
        if t is None or c.input in state_names:
            raise SignatureError(
                f"sequence_batching.control_input '{c.input}': "
                + (f"{path_label} has no such input (it has {sorted(by_name)})" if t is None else "also a state input")
            )
        if t.datatype != c.datatype:
            raise SignatureError(
                f"control input '{c.input}': the control feeds {c.datatype}, {path_label} takes {t.datatype}"
            )
        one = [1 if d < 0 else d for d in t.shape]
        if t.batch_axis is not None:
            one[t.batch_axis] = 1
        control_shapes[c.input] = one
        t.optional = True
        hidden_in.append(t)
    visible_in = [t for t in inputs if t not in hidden_in]
    visible_out = [t for t in outputs if t not in hidden_out]

    ragged, lengths = roles.get("ragged"), roles.get("lengths")
    if lengths is not None:
        lt, rt = by_name.get(lengths), by_name.get(ragged) if ragged else None
        if lt is None:
            raise SignatureError(f"lengths input '{lengths}': {path_label} has no such input")
        if lt.datatype not in ("INT32", "INT64") or lt.rank != 1:
            raise SignatureError(f"lengths input '{lengths}': must be INT32 or INT64 [batch], got {lt.datatype} "
                                 f"{lt.shape}")  # fmt: skip
        if rt is None or rt.batch_axis is None or rt.time_axis is None:
            raise SignatureError(f"lengths input '{lengths}': the ragged input needs named batch and time axes")
        lt.optional = True
        lt.batch_axis = 0
    for name in config_optional:  # the server fills lengths and states; anything else the graph needs
        if not by_name[name].optional:
            raise SignatureError(
                f"input '{name}': optional in config.pbtxt, but {path_label} requires it (only an input the server can "
                "fill in, a lengths or state input, may be optional)"
            )
    sig = Signature(
        inputs=visible_in,
        outputs=visible_out,
        hidden_inputs=hidden_in,
        hidden_outputs=hidden_out,
        ragged=ragged if lengths is not None else None,
        lengths=lengths if ragged is not None else None,
        states=states,
        static_length=roles.get("static_length"),
        bidirectional=roles.get("bidirectional", False),
        max_batch_size=triton.max_batch_size,
        merge=not guessed,
        controls=list(triton.controls),
        control_shapes=control_shapes,
    )
    if sig.ragged is not None and sig.static_length is None:
        rt = sig.input(sig.ragged)
        if rt.shape[rt.time_axis] > 0:  # an unrolled file from elsewhere: its fixed T is the limit
            sig.static_length = rt.shape[rt.time_axis]
    return sig
