"""Checks every export runs before its file is written: the graph really loops natively, and ONNX
Runtime agrees with eager PyTorch.

`check_native_recurrence` refuses a dynamic graph without an ONNX `LSTM`, `GRU` or `RNN` node fed by
`sequence_lens` (without it, padding would change results). `check_parity` runs the file in ONNX
Runtime (CPU) on seeded ragged batches — unsorted lengths, batch 1, T = 1, a time size not used at
export, every length shorter than T; random features, or random valid token ids, past each length
too — and compares each output with the eager module:
shapes must match and every value must satisfy |onnx - eager| <= TOLERANCE * max(1, |eager|)
(1e-5 absolute for values up to 1, relative beyond; float32 recurrences agree to ~1e-7 here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

TOLERANCE = 1e-5
RECURRENT_OPS = ("LSTM", "GRU", "RNN")


class ExportError(Exception):
    """An export refused, with one line that says what and what was expected."""


@dataclass
class Parity:
    max_abs: float  # largest |onnx - eager| over every output and batch
    max_scaled: float  # largest |onnx - eager| / max(1, |eager|): the checked quantity
    batches: int
    outputs: list[str]

    def line(self) -> str:
        return (
            f"parity vs eager PyTorch: max abs error {self.max_abs:.2e} "
            f"({self.batches} ragged batches, outputs {', '.join(self.outputs)}; tolerance {TOLERANCE:g})"
        )


def recurrent_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in RECURRENT_OPS]


def check_native_recurrence(model: onnx.ModelProto) -> list[str]:
    """The op types of the native recurrent nodes; ExportError if none reads sequence_lens."""
    nodes = recurrent_nodes(model)
    if not nodes:
        ops = sorted({n.op_type for n in model.graph.node})
        raise ExportError(
            "the exported graph has no native ONNX LSTM, GRU or RNN node (ops: "
            f"{', '.join(ops[:12])}{' ...' if len(ops) > 12 else ''}): the recurrent layer must be an "
            "nn.LSTM, nn.GRU or nn.RNN fed a pack_padded_sequence"
        )
    unfed = [n.name or n.op_type for n in nodes if len(n.input) < 5 or not n.input[4]]
    if unfed:
        raise ExportError(
            f"recurrent node(s) {unfed} have no sequence_lens input, so padding would change results: wrap the "
            "layer's input in pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)"
        )
    return [n.op_type for n in nodes]


def ragged_batches(
    input_size: int, steps: int | None, seed: int = 1234, vocab_size: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded (x, lengths) pairs; `steps` fixes T (static models), None varies it. With `vocab_size`,
    x is token ids (batch, time) int64 drawn below it, past each length too: valid ids, so only the
    lengths keep padding out of a result."""
    rng = np.random.default_rng(seed)
    if steps is None:
        shapes = [(4, 9, [3, 9, 1, 6]), (1, 1, [1]), (1, 6, [6]), (3, 13, [13, 2, 7]), (2, 8, [5, 3])]
    else:
        t = steps
        shapes = [
            (4, t, [max(1, t // 3), t, 1, max(1, t - 1)]),
            (1, t, [1]),
            (3, t, [t, max(1, t // 2), 2 if t > 1 else 1]),
        ]
    out = []
    for batch, time, lengths in shapes:
        if vocab_size is not None:
            x = rng.integers(0, vocab_size, size=(batch, time), dtype=np.int64)
        else:
            x = rng.standard_normal((batch, time, input_size)).astype(np.float32)
        out.append((x, np.array(lengths, np.int64)))
    return out


def check_parity(
    path: Path,
    reference: Callable[..., dict[str, np.ndarray]],
    input_size: int,
    steps: int | None = None,
    state_shapes: dict[str, tuple[int, int]] | None = None,
    optimization: str = "all",
    vocab_size: int | None = None,
) -> Parity:
    """Run `path` in ONNX Runtime and `reference(x, lengths, **states)` on the same batches.

    `state_shapes`: initial-state inputs {name: (L*D, H)}, fed random values (batch on axis 1).
    `vocab_size`: x is token ids (batch, time) below it (`input_size` is then unused)."""
    import onnxruntime as ort

    from contract.graphs import memory_reuse
    from contract.onnxfile import graph_nodes

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    so.enable_mem_reuse = memory_reuse("auto", graph_nodes(Path(path)))  # as the server: unrolled graphs load fast
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(99)
    max_abs = max_scaled = 0.0
    batches = ragged_batches(input_size, steps, vocab_size=vocab_size)
    for x, lengths in batches:
        feeds = {"x": x, "lengths": lengths}
        for name, (ld, hidden) in (state_shapes or {}).items():
            feeds[name] = (0.5 * rng.standard_normal((ld, x.shape[0], hidden))).astype(np.float32)
        got = dict(zip(names, session.run(names, feeds)))
        want = reference(**feeds)
        for name in names:
            a, b = got[name], want[name]
            where = f"output '{name}' for x{list(x.shape)}, lengths {lengths.tolist()}"
            if a.shape != b.shape:
                raise ExportError(
                    f"{where}: ONNX Runtime gives shape {list(a.shape)}, eager PyTorch {list(b.shape)} "
                    "(a padded output needs pad_packed_sequence(..., total_length=x.shape[1]))"
                )
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if not np.isfinite(diff).all():
                both_nan = np.isnan(a) & np.isnan(b)
                if not (np.isfinite(diff) | both_nan).all():
                    raise ExportError(f"{where}: ONNX Runtime and eager PyTorch disagree on non-finite values")
                diff = np.where(both_nan, 0.0, diff)
            scaled = diff / np.maximum(1.0, np.abs(b.astype(np.float64)))
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            worst = float(scaled.max(initial=0.0))
            max_scaled = max(max_scaled, worst)
            if worst > TOLERANCE:
                raise ExportError(
                    f"{where}: ONNX Runtime differs from eager PyTorch by {float(diff.max()):.3g} "
                    f"(tolerance {TOLERANCE:g}); the file was not written"
                )
    return Parity(max_abs, max_scaled, len(batches), names)
