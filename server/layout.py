"""What a loaded model version's outputs look like, learned by running it once on zeros when it
loads (`probe_output_layout`), and the output sizes that layout predicts (`output_dims`).

A leaf module: it needs a runtime object but imports none, so the repository (which probes),
the data plane and the memory accounting (which size replies) all import it without a cycle.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from server.dtypes import OBJECT, numpy_dtype
from server.errors import clip

if TYPE_CHECKING:
    from server.runtime import ModelRuntime

log = logging.getLogger(__name__)


def feed_shape(sig, spec, rows: int, steps: int | None, free_dim: int | None = None) -> list[int] | None:
    """The shape of input `spec` for `rows` sequences of `steps` steps (its ragged time axis); other
    free dims `free_dim`, or None when there is one and no `free_dim` is given."""
    shape = list(spec.shape)
    for axis, d in enumerate(shape):
        if axis == spec.batch_axis:
            shape[axis] = rows
        elif spec.name == sig.ragged and axis == spec.time_axis:
            shape[axis] = steps
        elif d < 0:
            if free_dim is None:
                return None
            shape[axis] = free_dim
    return shape


def _probe_feeds(rt: ModelRuntime, rows: int, steps: int) -> dict[str, np.ndarray] | None:
    """Zeros ("0" for strings) for every input of `rt` with `rows` sequences of `steps` steps (lengths = steps);
    None when some input has a free dim that is neither the batch nor the ragged time axis
    (then the outputs' sizes may depend on what clients send, and are not predicted)."""
    sig = rt.signature
    feeds = {}
    for spec in sig.all_inputs:
        shape = feed_shape(sig, spec, rows, steps)
        if shape is None:
            return None
        dtype = numpy_dtype(spec.datatype)
        # strings: "0", zero to a model that casts them to numbers (a string CORRID), text to others
        feeds[spec.name] = np.zeros(shape, dtype) if dtype != OBJECT else np.full(shape, "0", OBJECT)
    if sig.lengths is not None:
        feeds[sig.lengths] = np.full((rows,), steps, numpy_dtype(sig.input(sig.lengths).datatype))
    return feeds


def probe_output_layout(rt: ModelRuntime) -> dict[str, list[str | int]]:
    """Each output's axes as 'batch', 'time' or a fixed size, learned by running the model version
    on zeros of (batch, time) = (1, 1), (2, 1) and (1, 2): exact whatever the ONNX file declares (a
    static model's unrolled graph leaves dims unnamed; its padded time axis is cut back by the
    runtime). Run once when the version loads (it also warms the session up) and kept on the
    runtime; {} when it cannot be predicted or the probe fails (responses are then checked after
    they are computed instead of before)."""
    sig = rt.signature
    layout: dict[str, list[str | int]] = {}
    try:
        probes = [(1, 1)]
        if sig.batchable:
            probes.append((2, 1))
        if sig.ragged is not None and (sig.static_length is None or sig.static_length >= 2):
            probes.append((1, 2))
        shapes = {}
        for rows, steps in probes:
            feeds = _probe_feeds(rt, rows, steps)
            if feeds is None:
                _no_layout(rt)
                return {}
            names = [o.name for o in sig.all_outputs]
            out = rt.run(feeds, names)
            shapes[rows, steps] = {name: array.shape for name, array in out.items()}
        for name, base in shapes[1, 1].items():
            wide, long = shapes.get((2, 1), shapes[1, 1])[name], shapes.get((1, 2), shapes[1, 1])[name]
            layout[name] = ["batch" if w != d else "time" if t != d else d for d, w, t in zip(base, wide, long)]
        _axes_from_layout(rt, layout)
    except Exception as exc:  # noqa: BLE001 - a model that cannot run the probe still serves
        log.warning("model %s version %d: output shapes not predicted (%s); responses are sized after they run",
                    rt.name, rt.version, clip(str(exc), 300))  # fmt: skip
        layout = {}
        _no_layout(rt)
    rt.output_layout = layout
    return layout


def _no_layout(rt: ModelRuntime) -> None:
    """Without a probe, an output's time axis that the file does not name is unknown: merging
    requests of different lengths could hand a request outputs padded to another's length."""
    sig = rt.signature
    if sig.ragged is not None and any(o.time_axis is None and o.rank >= 2 for o in sig.all_outputs):
        if sig.merge:
            log.warning("model %s version %d: output time axes not known (no probe); requests are not merged",
                        rt.name, rt.version)  # fmt: skip
        sig.merge = False


def output_dims(rt: ModelRuntime, name: str, rows: int, steps: int) -> list[int] | None:
    """The shape output `name` of `rt` will have for `rows` sequences of `steps` steps, from the
    layout probed when the version loaded; None when the layout does not know it."""
    axes = rt.output_layout.get(name)
    if axes is None:
        return None
    size = {"batch": rows, "time": steps}
    return [size[a] if isinstance(a, str) else a for a in axes]


def _axes_from_layout(rt: ModelRuntime, layout: dict[str, list[str | int]]) -> None:
    """What the probe saw, against what the signature says: an output's time axis the file does
    not name is taken from the probe (so merged ragged runs cut it back per request); an output
    whose declared batch axis did not follow the batch (a config.pbtxt max_batch_size on a model
    that does not batch along axis 0) stops the version from merging requests at all."""
    sig = rt.signature
    for spec in sig.all_outputs:
        axes = layout.get(spec.name)
        if axes is None:
            continue
        if spec.time_axis is None and sig.ragged is not None and "time" in axes:
            spec.time_axis = axes.index("time")
        if sig.batching_rule != "none" and (spec.batch_axis is None or axes[spec.batch_axis] != "batch"):
            log.warning(
                "model %s version %d: output '%s' is %s for 1 and 2 sequences, so axis %s is not its batch axis; "
                "requests to this version are not merged",
                rt.name, rt.version, spec.name, axes, spec.batch_axis,
            )  # fmt: skip
            sig.merge = False
