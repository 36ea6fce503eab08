"""Triton's sequence control inputs (`sequence_batching.control_input`): tensors the server feeds
a stateful model on every request of a sequence; clients never send them.

- CONTROL_SEQUENCE_START: true on a sequence's first request;
- CONTROL_SEQUENCE_END: true on its last;
- CONTROL_SEQUENCE_READY: true on a row that carries a request (every row this server feeds,
  see the strategies below);
- CONTROL_SEQUENCE_CORRID: the sequence's id, as the control's `data_type` (UINT64, INT64,
  UINT32, INT32 or STRING).

"false" and "true" are the two values of the control's `int32_false_true`, `fp32_false_true` or
`bool_false_true` (INT32, FP32, BOOL). Each control tensor has the model's shape for it with the
batch axis (when max_batch_size > 0) of size 1 per request and every other free dim 1: Triton's
[1] (or [batch, 1]). Concurrent sequences' requests merge along the batch axis like any other
input, so a row's controls travel with its data.

Strategies. `oldest`: merged runs of the oldest sequences' next requests, waiting at most
`oldest.max_queue_delay_microseconds` for company and aiming for `preferred_batch_size`; at most
`max_candidate_sequences` sequences are live at once (a start beyond that is refused with
RESOURCE_EXHAUSTED rather than held in a backlog; a slot frees when its sequence ends or is freed
after max_sequence_idle_microseconds). `direct` (Triton's default): the same merged runs,
waiting up to `direct.max_queue_delay_microseconds` only while fewer than
`minimum_slot_utilization` x max_batch_size rows are ready (server/model_config.py). Triton's
direct strategy pins each sequence to a batch slot so that a backend can keep per-slot state
inside the model; an ONNX model keeps nothing between runs (its state is the `state` the server
keeps per sequence), so a run here holds only rows that carry a request, READY is true on each,
and no row is an empty slot fed READY false.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from server.dtypes import TRITON_TO_OIP, numpy_dtype, triton_type
from server.errors import InvalidArgument, ResourceExhausted, clip
from server.proto import grpc_service_pb2 as pb

START, READY, END, CORRID = "start", "ready", "end", "corrid"
_KIND = {
    pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START: START,
    pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY: READY,
    pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END: END,
    pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID: CORRID,
}
_CORRID_TYPES = ("UINT64", "INT64", "UINT32", "INT32", "BYTES")


@dataclass(frozen=True)
class Control:
    """One control input: the tensor, what it says, its datatype and its false/true values."""

    input: str
    kind: str  # START | READY | END | CORRID
    datatype: str  # OIP datatype
    false_true: tuple = (0, 1)  # values for false and true (not used by CORRID)


def parse(where: str, seq) -> list[Control]:
    """`sequence_batching.control_input` -> Controls; InvalidArgument naming the entry when it is
    not what Triton accepts (one control per input, each kind once, two false/true values of one
    kind, CORRID with an id datatype)."""
    out: list[Control] = []
    kinds: set[str] = set()
    names: set[str] = set()
    for i, entry in enumerate(seq.control_input):
        label = f"{where}: sequence_batching.control_input[{i}]"
        if not entry.name:
            raise InvalidArgument(f"{label} has no name")
        if entry.name in names:
            raise InvalidArgument(f"{label}: input '{entry.name}' is listed twice")
        names.add(entry.name)
        if len(entry.control) != 1:
            raise InvalidArgument(f"{label} '{entry.name}': exactly one control per input, got {len(entry.control)}")
        c = entry.control[0]
        kind = _KIND[c.kind]
        name = pb.ModelSequenceBatching.Control.Kind.Name(c.kind)
        if kind in kinds:
            raise InvalidArgument(f"{label} '{entry.name}': {name} is given to two inputs")
        kinds.add(kind)
        given = [
            (field, values)
            for field, values in (
                ("int32_false_true", c.int32_false_true),
                ("fp32_false_true", c.fp32_false_true),
                ("bool_false_true", c.bool_false_true),
            )
            if len(values)
        ]
        if kind == CORRID:
            type_name = pb.DataType.Name(c.data_type)
            datatype = TRITON_TO_OIP.get(type_name, "")
            if given or datatype not in _CORRID_TYPES:
                raise InvalidArgument(
                    f"{label} '{entry.name}': {name} takes data_type TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 "
                    f"or TYPE_STRING and no false/true values, got {type_name}"
                    + (f" and {given[0][0]}" if given else "")
                )
            out.append(Control(entry.name, kind, datatype))
            continue
        if len(given) != 1 or len(given[0][1]) != 2 or c.data_type:
            raise InvalidArgument(
                f"{label} '{entry.name}': {name} takes exactly one of int32_false_true, fp32_false_true or "
                "bool_false_true, with two values (false, true), and no data_type"
            )
        field, values = given[0]
        datatype = {"int32_false_true": "INT32", "fp32_false_true": "FP32", "bool_false_true": "BOOL"}[field]
        out.append(Control(entry.name, kind, datatype, tuple(values)))
    return out


def feeds(controls: list[Control], shapes: dict[str, list[int]], seq_id, start: bool, end: bool) -> dict:
    """The control tensors of one request of sequence `seq_id`: `shapes` gives each control
    input's shape for one row (from the signature: batch 1, other free dims 1)."""
    out = {}
    for c in controls:
        dtype = numpy_dtype(c.datatype)
        if c.kind == CORRID:
            if c.datatype == "BYTES":
                value: object = str(seq_id)
            elif isinstance(seq_id, str):
                raise InvalidArgument(
                    f"parameter 'sequence_id': {clip(seq_id)} is a string, but the model's CONTROL_SEQUENCE_CORRID "
                    f"input '{c.input}' is {c.datatype}: send an integer sequence_id"
                )
            else:
                info = np.iinfo(dtype)
                if not info.min <= seq_id <= info.max:
                    raise InvalidArgument(
                        f"parameter 'sequence_id': {seq_id} does not fit the model's CONTROL_SEQUENCE_CORRID input "
                        f"'{c.input}' ({c.datatype})"
                    )
                value = seq_id
            out[c.input] = np.full(shapes[c.input], value, dtype=object if c.datatype == "BYTES" else dtype)
            continue
        flag = {START: start, END: end, READY: True}[c.kind]
        out[c.input] = np.full(shapes[c.input], c.false_true[1 if flag else 0], dtype)
    return out


def config_entry(c: Control) -> dict:
    """One control input as Triton's ModelConfig (JSON form) writes it."""
    kind = {START: "CONTROL_SEQUENCE_START", END: "CONTROL_SEQUENCE_END", READY: "CONTROL_SEQUENCE_READY",
            CORRID: "CONTROL_SEQUENCE_CORRID"}[c.kind]  # fmt: skip
    entry: dict = {"kind": kind}
    if c.kind == CORRID:
        entry["data_type"] = triton_type(c.datatype)
    else:
        field = {"INT32": "int32_false_true", "FP32": "fp32_false_true", "BOOL": "bool_false_true"}[c.datatype]
        entry[field] = list(c.false_true)
    return {"name": c.input, "control": [entry]}


class Slots:
    """Live sequences per model version, bounded (see the module's docstring). `live(seq_id)`
    tells whether a sequence still holds its slot (the sequence store frees idle ones)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, int], set] = {}

    def take(self, model: str, version: int, seq_id, capacity: int, live, why: str, sweep=lambda: 0) -> None:
        """On a sequence's start: RESOURCE_EXHAUSTED when `capacity` other live sequences hold
        the model's slots; `why` names the setting that sets the capacity; `sweep()` frees the
        store's idle sequences (called when the slots look full)."""
        with self._lock:
            held = self._held.setdefault((model, version), set())
            if seq_id in held or capacity <= 0:
                held.add(seq_id)
                return
            for attempt in (0, 1):
                for other in [s for s in held if not live(s)]:
                    held.discard(other)
                if len(held) < capacity or attempt:
                    break
                sweep()
            if len(held) >= capacity:
                raise ResourceExhausted(
                    f"model '{model}' has {len(held)} live sequences, all its sequence slots ({why} = {capacity}); "
                    "end one with sequence_end, or wait for an idle one to be freed"
                )
            held.add(seq_id)

    def free(self, model: str, version: int, seq_id) -> None:
        with self._lock:
            held = self._held.get((model, version))
            if held is not None:
                held.discard(seq_id)


_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SLOTS_LOCK = threading.Lock()


def slots_for(store) -> Slots:
    """The slot table that goes with a sequence store (one per server)."""
    with _SLOTS_LOCK:
        slots = _SLOTS.get(store)
        if slots is None:
            slots = _SLOTS[store] = Slots()
        return slots
