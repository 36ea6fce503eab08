"""Precision twins: `NAME_int8` and `NAME_fp16`, copies of an exported float32 model in lower
precision, each checked against that float model (the reference) before it is written.

int8: ONNX Runtime's dynamic quantization (`quantize_dynamic`, QInt8 weights per tensor, uint8
activations quantized on every run): each `LSTM` becomes `com.microsoft.DynamicQuantizeLSTM`
(`sequence_lens` kept). A sequence's int8 answer must be bit-identical alone or merged with others,
and ORT takes each activation range from the whole run, so the twin is written in one of two forms
(FORMS): `pinned` where calibration data for the first layer's input is given (export.pinned: the
ranges fixed in the graph, the whole batch in one run; only the LSTMs int8), else `row_loop`: each
MatMul with a constant weight (and each Gemm, rewritten as MatMul + Add first) dynamically quantized
too, and the graph wrapped in an ONNX Loop over the batch, each row cut to its length, so every
activation range comes from one row. ONNX Runtime has no quantized GRU or RNN kernel, so a model
with a GRU or RNN layer is refused rather than written as a float copy named `_int8`.

fp16: float16 weights and activations (`onnxruntime.transformers.float16`, ONNX Runtime's copy of
onnxconverter-common's converter, so no extra package), float32 `x` and outputs at the boundary
unless `io_float16`. It is meant for the CUDA provider; without a usable GPU it is checked on the
CPU provider, which runs float16 LSTM/GRU/RNN nodes by casting them back to float32, and says so.

The gate: the twin and the float model run on the same seeded ragged batches and every output
must satisfy max |twin - float| <= TOLERANCE[precision] * max(1, max |float|), per output and
batch (see TOLERANCE for the measure and why these numbers); for a classifier with labelled
data, the accuracy of both is measured and a drop of more than MAX_ACCURACY_DROP points refuses
the twin. The measured figures are printed either way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract import metadata
from contract.cuda import cuda_usable
from export import pinned
from export.pinned import Calibration
from export.verify import ExportError, ragged_batches

PRECISIONS = ("fp32", "int8", "fp16")
TWINS = ("int8", "fp16")
# The gate's measure: |twin - float| / max(1, max |float|), the max taken over that output in that
# batch (int8 steps are per tensor, so the error follows the tensor's range, not each value).
# Measured before choosing (ORT 1.31, this machine): int8 twins of 9 LSTM encoder shapes (3-512
# units, 1-3 layers, uni/bi, with and without bias, 5-512 inputs; two seeds each) on
# standard-normal ragged batches up to T = 200: 0.005-0.018 (the family encoder 0.008; it grows
# with the input width, 0.018 at 512 inputs; per-channel weights did no better); the speaker
# classifier's logits, whose head multiplies the LSTM's error: 0.033 on those batches and 0.022
# on its real test data (0.23 of max |logit| 10.4), where its accuracy is unchanged. 0.1 leaves room
# above that while a twin with two gate blocks or the two directions of a layer swapped (the
# encoder: 0.28 and 0.39) still fails; a classifier's accuracy gate is the finer check.
# fp16: float16 rounds each value by up to 2^-11 (4.9e-4 relative); the CPU provider's run of the
# family models measured 2.6e-4 to 9.4e-4 (encoder, gru_encoder, the report's small model,
# speaker_id), and 1e-2 allows the half arithmetic of CUDA's kernels to accumulate ~20 such
# roundings over a sequence (not measured on a GPU here).
TOLERANCE = {"int8": 1e-1, "fp16": 1e-2}
MAX_ACCURACY_DROP = 0.5  # accuracy points (percent) a twin may lose on labelled data
QUANTIZED_OPS = ("LSTM", "MatMul")  # op types handed to quantize_dynamic (Gemm is rewritten first)
# The int8 twin's two forms, both batch-invariant (bit-identical alone or merged): in the export's
# report line and, in other words, in the twin's lstm.precision_method.
FORMS = {
    "pinned": "pinned (activation ranges fixed in the graph from calibration data; the whole batch in one run)",
    "row_loop": "row_loop (the graph runs once per row of the batch: {why})",
}
METHODS = {
    "pinned": (
        "uint8 activations quantized with ranges pinned in the graph (a sequence's result does not depend on the "
        "batch it runs in; an input beyond the calibrated range is clipped, moving that sequence's own result)"
    ),
    "row_loop": (
        "uint8 activations quantized per row (the graph runs each row of a batch on its own, so a sequence's "
        "result does not depend on the batch it runs in)"
    ),
}


def twin_name(name: str, precision: str) -> str:
    return f"{name}_{precision}"


def parse_precisions(text: str) -> list[str]:
    """'fp32,int8' -> ['fp32', 'int8']; ValueError naming an unknown one."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part not in PRECISIONS:
            raise ValueError(f"precision {part!r}: expected {', '.join(PRECISIONS)} (comma-separated, e.g. fp32,int8)")
        if part not in out:
            out.append(part)
    if not out:
        raise ValueError(f"no precision given: expected {', '.join(PRECISIONS)}")
    return out


# -- providers ---------------------------------------------------------------------------------
def check_provider(precision: str) -> tuple[list, str]:
    """(providers, note) the gate runs `precision` on: int8 on the CPU provider (its only kernels);
    fp16 on CUDA where usable, else on the CPU provider with a note that says what that measures."""
    if precision == "fp16":
        ok, why = cuda_usable()
        if ok:
            return [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"], ""
        return ["CPUExecutionProvider"], (
            f"fp16 is for ONNX Runtime's CUDA provider, and {why}: checked on the CPU provider, which runs "
            "float16 LSTM/GRU/RNN nodes by casting to float32 (this measures float16 weights and the float16 "
            "values between nodes, not CUDA's half kernels)"
        )
    return ["CPUExecutionProvider"], ""


def _session(path: Path, providers: list):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=providers)


# -- conversions ------------------------------------------------------------------------------------
def _weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}


def _gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm(A, B const, C) with alpha = beta = 1 and no transA as MatMul(A, B') + C, which
    dynamic quantization covers (its Gemm kernel is static-only). Returns the nodes rewritten."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.domain or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        weight = weight.T if attrs.get("transB", 0) else weight  # (K, N)
        name = f"{node.input[1]}_as_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return rewritten


def _int8_refusal(model: onnx.ModelProto, name: str) -> str | None:
    """Why `model` gets no int8 twin (a GRU or RNN layer: no quantized kernel), or None."""
    other = [n.op_type for n in model.graph.node if n.op_type in ("GRU", "RNN")]
    if not other:
        return None
    sizes = _weight_bytes(model)
    total = sum(sizes.values()) or 1
    dense = sum(
        sizes.get(n.input[1], 0) for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
    )
    kinds = ", ".join(f"{other.count(k)} {k}" for k in sorted(set(other)))
    return (
        f"{name}: int8 refused: ONNX Runtime quantizes no GRU or RNN (its one quantized recurrent kernel is "
        f"DynamicQuantizeLSTM), so the recurrence ({kinds} node(s)) would stay float32 and only the MatMul/Gemm "
        f"weights ({100 * dense / total:.1f}% of the weight bytes) could be int8: {twin_name(name, 'int8')} would "
        f"be a float copy in all but name. Serve {name} (float32), or --precision fp16 for a GPU"
    )


@contextlib.contextmanager
def _tool(name: str, what: str) -> Iterator[None]:
    """An ONNX Runtime or onnx tool failing on a graph it does not handle: one ExportError line."""
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the tool raises, the export is refused in one line
        detail = " ".join(str(exc).split())[:240]
        raise ExportError(f"{name}: {what} failed ({type(exc).__name__}: {detail}); nothing written") from None


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic logs "Please consider to run pre-processing" on the root logger every
    time; pre-processing (symbolic shape inference, ORT graph fusion) is for static quantization of
    CNNs and changes nothing here. Errors still show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(src: Path, dst: Path, name: str, calibration: Calibration | None = None) -> tuple[str, list[str]]:
    """Write the int8 twin of `src` to `dst`; return its form (FORMS) and what was done, in words.
    Pinned (export.pinned) where `calibration` is given and the LSTMs allow it, else row by row.
    ExportError (nothing written) where it cannot be done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    why = _int8_refusal(model, name)
    if why:
        raise ExportError(why)
    why_not = "no calibration data for the first layer's input" if calibration is None else pinned.unsupported(model)
    why_not = why_not and (why_not if calibration is None else f"not pinned: {why_not}")
    form = "row_loop" if why_not else "pinned"
    gemms = _gemm_to_matmul(model) if form == "row_loop" else 0
    ranges = pinned.input_ranges(src, calibration, name) if form == "pinned" else {}
    with _quiet_root_logger(), _tool(name, "int8: onnxruntime quantize_dynamic"):
        quantize_dynamic(
            model,
            str(dst),
            # pinned: only the LSTMs (a dynamically quantized MatMul takes its batch's range)
            op_types_to_quantize=list(QUANTIZED_OPS) if form == "row_loop" else ["LSTM"],
            weight_type=QuantType.QInt8,
            per_channel=False,  # measured: per-channel weights did not reduce the error (TOLERANCE)
            reduce_range=False,
            extra_options={"MatMulConstBOnly": True},  # activation x activation products stay float
        )
    out = onnx.load(str(dst))
    left = [n.name or n.op_type for n in out.graph.node if n.op_type == "LSTM"]
    if left:
        raise ExportError(
            f"{name}: int8: LSTM node(s) {left[:4]} kept float32 weights (not constant initializers?); "
            "refused rather than write a partly quantized twin"
        )
    lstm = [n for n in out.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    unfed = [n.name for n in lstm if len(n.input) < 5 or not n.input[4]]
    if unfed:
        raise ExportError(f"{name}: int8: quantized LSTM node(s) {unfed} lost their sequence_lens input")
    matmuls = sum(1 for n in out.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
    done = [f"{len(lstm)} LSTM -> com.microsoft.DynamicQuantizeLSTM"] if lstm else []
    if matmuls:
        done.append(f"{matmuls} MatMul -> MatMulInteger" + (f" ({gemms} of them Gemm)" if gemms else ""))
    if not done:
        raise ExportError(f"{name}: int8: nothing in the graph could be quantized; refused (it would be a float copy)")
    if form == "pinned":
        with _tool(name, "int8: pinning the activation ranges"):
            wrapped = pinned.pin(out, ranges, name)
            onnx.checker.check_model(wrapped)
        first = {k: v for k, v in ranges.items() if v != 1.0}
        done.append(
            "activation ranges pinned in the graph (two anchor units per direction hold h's range at [-1, 1]; "
            "LSTM inputs clipped to [-R, R] with two constant features +-R: R = 1 where an LSTM feeds the layer, "
            + ", ".join(f"{v:.4g} for {k!r}" for k, v in first.items())
            + f" = {pinned.MARGIN:g} x the largest |x| on {calibration.source}); the rest of the graph float32"
        )
    else:
        with _tool(name, "int8: the per-row Loop"):
            wrapped = row_loop(out, name)
            onnx.checker.check_model(wrapped)
        done.append(f"the graph runs once per row of the batch (an ONNX Loop), each row cut to its length ({why_not})")
        done.append(why_not)
    onnx.save(wrapped, str(dst))
    return form, done


# -- batch invariance: one row at a time ---------------------------------------------------------
# ONNX Runtime's dynamic quantization takes one activation scale per tensor and run: the input
# projection's over all rows and steps, each recurrent step's over all rows. A merged batch would
# quantize a request with its batch-mates' range. Without calibration data (export.pinned needs it
# for the first layer's input) the twin runs its quantized graph in an ONNX Loop over the batch,
# each row cut to its own length: every scale is then that row's alone, and a request's answer is
# the same bits alone or merged. The Loop body is the quantized graph itself (nothing unrolled, the
# file stays the size it was). Measured (ORT 1.31, 1 thread, T = 50, a shared 2-CPU host): the
# encoder's twin 1.9-2.1x the float model's rate at batch 16 and 64, the pinned one 2.4-2.5x, the
# batch-dependent one 2.6-2.7x. docs/precision.md has the figures.
_ROW = "row_loop/"  # prefix of every name the Loop adds


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _rename_inputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Point node inputs (in nested subgraphs too) at the per-row values."""
    for node in graph.node:
        for k, value in enumerate(node.input):
            if value in names:
                node.input[k] = names[value]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_inputs(sub, names)


def row_loop(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """`model` run one batch row at a time: a Loop over the batch whose body is `model`'s graph fed
    with row i of every input (x and its time axis cut to lengths[i]); each output's rows are
    stacked back on its batch axis and time-axis outputs padded with zeros to the batch's T (what
    the float LSTM writes past a sequence's end). Axes are found by the symbolic dim names of x
    (batch, time). ExportError where an input or output has no batch axis by that name."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ExportError(f"{name}: int8: opset {opset}: the per-row Loop needs opset >= 13")
    inputs = {i.name: i for i in graph.input}
    x = inputs.get("x", graph.input[0])
    lengths = inputs.get("lengths")
    batch, time_axis = (_dims(x) + [None, None])[:2]
    if not isinstance(batch, str) or not isinstance(time_axis, str):
        raise ExportError(f"{name}: int8: input {x.name!r} has dims {_dims(x)}: expected named (batch, time, ...)")
    for value in list(graph.input) + list(graph.output):
        if batch not in _dims(value):
            raise ExportError(
                f"{name}: int8: {value.name!r} has dims {_dims(value)}, no {batch!r} axis: its rows cannot be run "
                "one at a time (needed so that a row's answer does not depend on its batch-mates)"
            )

    def ints(key: str, values: list[int], scalar: bool = False) -> str:
        extra.append(helper.make_tensor(_ROW + key, TensorProto.INT64, [] if scalar else [len(values)], values))
        return _ROW + key

    extra: list[onnx.TensorProto] = []
    zero, one = ints("zero", [0]), ints("one", [1])
    outer = [
        helper.make_node("Shape", [x.name], [_ROW + "shape"]),
        helper.make_node("Gather", [_ROW + "shape", ints("zero_s", [0], True)], [_ROW + "rows"]),  # ()
        helper.make_node("Gather", [_ROW + "shape", one], [_ROW + "steps"]),  # (1,)
    ]
    i, i1, i2 = _ROW + "i", _ROW + "i1", _ROW + "i2"
    body = [
        helper.make_node("Identity", [_ROW + "cond"], [_ROW + "cond_out"]),
        helper.make_node("Unsqueeze", [i, zero], [i1]),  # (1,)
        helper.make_node("Add", [i1, one], [i2]),
    ]
    rename = {}
    if lengths is not None:
        rename[lengths.name] = _ROW + lengths.name
        body.append(helper.make_node("Slice", [lengths.name, i1, i2, zero], [rename[lengths.name]]))
        body += [
            helper.make_node("Concat", [i1, zero], [_ROW + "starts"], axis=0),
            helper.make_node("Concat", [i2, rename[lengths.name]], [_ROW + "ends"], axis=0),
        ]
        rename[x.name] = _ROW + x.name
        body.append(helper.make_node("Slice", [x.name, _ROW + "starts", _ROW + "ends", ints("axes01", [0, 1])],
                                     [rename[x.name]]))  # fmt: skip
    for value in graph.input:
        if value.name not in rename:
            rename[value.name] = _ROW + value.name
            axis = ints(f"axis_{value.name}", [_dims(value).index(batch)])
            body.append(helper.make_node("Slice", [value.name, i1, i2, axis], [rename[value.name]]))
    constants = [n for n in graph.node if n.op_type == "Constant"]  # stay outside: made once per run
    inner = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node if n.op_type != "Constant"]
    body_graph = helper.make_graph(inner, "row", [], [])
    _rename_inputs(body_graph, rename)
    body += list(body_graph.node)
    body_outputs, after = [], []
    for out in graph.output:
        dims, current = _dims(out), out.name
        if time_axis in dims:  # pad this row's time axis to the batch's T
            t = dims.index(time_axis)
            pads, have, short = _ROW + f"pads_{out.name}", _ROW + f"have_{out.name}", _ROW + f"short_{out.name}"
            body += [
                helper.make_node("Shape", [current], [_ROW + f"shape_{out.name}"], start=t, end=t + 1),
                helper.make_node("Sub", [_ROW + "steps", _ROW + f"shape_{out.name}"], [short]),
                helper.make_node("Concat", [ints(f"before_{out.name}", [0] * (len(dims) + t)), short,
                                            ints(f"after_{out.name}", [0] * (len(dims) - t - 1))], [pads], axis=0),
                helper.make_node("Pad", [current, pads], [have]),
            ]  # fmt: skip
            current = have
        axis = dims.index(batch)
        row = _ROW + f"row_{out.name}"
        body.append(helper.make_node("Squeeze", [current, ints(f"batch_{out.name}", [axis])], [row]))
        body_outputs.append(helper.make_tensor_value_info(row, out.type.tensor_type.elem_type, None))
        perm = list(range(1, len(dims)))
        perm.insert(axis, 0)  # the Loop stacks rows on a new axis 0: move it to the batch axis
        after.append(helper.make_node("Transpose", [_ROW + f"stack_{out.name}"], [out.name], perm=perm))
    loop_body = helper.make_graph(
        body,
        "one_row",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []),
         helper.make_tensor_value_info(_ROW + "cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(_ROW + "cond_out", TensorProto.BOOL, []), *body_outputs],
    )  # fmt: skip
    loop = helper.make_node(
        "Loop", [_ROW + "rows", ""], [_ROW + f"stack_{o.name}" for o in graph.output], body=loop_body, name="rows"
    )
    wrapped = helper.make_graph(
        constants + outer + [loop] + after, graph.name, list(graph.input), list(graph.output),
        list(graph.initializer) + extra,
    )  # fmt: skip
    result = helper.make_model(wrapped, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.metadata_props.extend(model.metadata_props)
    result.producer_name, result.doc_string = model.producer_name, model.doc_string
    return result


def _topological(graph: onnx.GraphProto) -> None:
    """The converter appends its boundary Casts at the end of the node list; ONNX wants producers first."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"fp16: the converted graph has a cycle or a missing input at {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(src: Path, dst: Path, name: str, io_float16: bool = False) -> list[str]:
    """Write the float16 twin of `src` to `dst` (float32 x and outputs unless `io_float16`)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    meta = list(model.metadata_props)
    with _quiet_root_logger(), _tool(name, "fp16: the float16 conversion"):
        half = convert_float_to_float16(model, keep_io_types=not io_float16)
        _topological(half.graph)
        del half.metadata_props[:]
        half.metadata_props.extend(meta)
        onnx.checker.check_model(half, full_check=True)
    onnx.save(half, str(dst))
    halves = sum(1 for t in half.graph.initializer if t.data_type == TensorProto.FLOAT16)
    boundary = "float16 x and outputs" if io_float16 else "float32 x and outputs (Cast at the boundary)"
    return [f"{halves} float16 weight tensor(s), {boundary}"]


# -- the gate ---------------------------------------------------------------------------------------
@dataclass
class TwinParity:
    max_abs: float  # largest |twin - float| over every output and batch
    max_scaled: float  # largest max|twin - float| / max(1, max|float|) per output and batch: the checked quantity
    tolerance: float
    batches: int
    longest: int  # the longest T among the batches
    outputs: list[str]
    provider: str  # what ran the twin
    source: str = ""  # the batches' inputs where not the gate's own seeded ones

    def line(self, reference: str) -> str:
        of = f" of {self.source}" if self.source else ""
        return (
            f"parity vs {reference} (float32): max abs error {self.max_abs:.2e}, {self.max_scaled:.2e} of the "
            f"output's range ({self.batches} ragged batches{of} up to T={self.longest}, outputs "
            f"{', '.join(self.outputs)}; "
            f"tolerance {self.tolerance:g}) on {self.provider}"
        )


def twin_batches(features: int, seed: int = 1234, vocab_size: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The float gate's ragged batches (verify.ragged_batches) and two long ones: a lower precision's
    error builds up over time steps, and the float gate's longest T is 13. With `vocab_size`, x is
    token ids (batch, time) below it."""
    batches = ragged_batches(features, None, seed, vocab_size=vocab_size)
    rng = np.random.default_rng(seed + 1)
    for batch, steps in ((8, 50), (2, 200)):
        lengths = rng.integers(1, steps + 1, size=batch).astype(np.int64)
        lengths[0] = steps
        if vocab_size is not None:
            x = rng.integers(0, vocab_size, size=(batch, steps), dtype=np.int64)
        else:
            x = rng.standard_normal((batch, steps, features)).astype(np.float32)
        batches.append((x, lengths))
    return batches


def _feeds(session, x: np.ndarray, lengths: np.ndarray, states: dict[str, np.ndarray]) -> dict:
    out = {}
    for inp in session.get_inputs():
        value = {"x": x, "lengths": lengths}.get(inp.name, states.get(inp.name))
        if value is None:
            raise ExportError(f"input {inp.name!r}: the precision gate feeds x, lengths and initial states only")
        out[inp.name] = value.astype(np.float16) if inp.type == "tensor(float16)" else value
    return out


def _state_values(session, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random initial states (L*D, batch, H) for every input after x and lengths, as the float gate feeds."""
    states = {}
    for inp in session.get_inputs()[2:]:
        ld, _, hidden = inp.shape
        states[inp.name] = (0.5 * rng.standard_normal((ld, batch, hidden))).astype(np.float32)
    return states


def check_twin(
    reference: Path, twin: Path, precision: str, name: str, providers: list, given: Calibration | None = None
) -> TwinParity:
    """Run the float model and its twin on the same batches (twin_batches, or `given.check` where a
    pinned twin's inputs are not the gate's standard-normal ones); ExportError past TOLERANCE[precision]."""
    ref = _session(reference, ["CPUExecutionProvider"])
    with _tool(name, f"ONNX Runtime loading the {precision} twin"):
        got = _session(twin, providers)
    names = [o.name for o in ref.get_outputs()]
    vocab = ref.get_modelmeta().custom_metadata_map.get(metadata.VOCAB_SIZE)  # token ids (export.user)
    features = 0 if vocab else ref.get_inputs()[0].shape[2]
    tolerance = TOLERANCE[precision]
    axes = [d if isinstance(d, str) else None for d in ref.get_inputs()[0].shape[:2]]  # (batch, time) names
    rng = np.random.default_rng(99)
    max_abs = max_scaled = 0.0
    if given is not None and given.check is not None:
        batches = list(given.check)
    else:
        batches = twin_batches(features, vocab_size=int(vocab) if vocab else None)
    for x, lengths in batches:
        states = _state_values(ref, x.shape[0], rng)
        if given is not None:  # a pinned twin clips h0 to [-1, 1], where every state an LSTM returns lies
            states = {k: np.clip(v, -1.0, 1.0) for k, v in states.items()}
        want = dict(zip(names, ref.run(names, _feeds(ref, x, lengths, states))))
        have = dict(zip(names, got.run(names, _feeds(got, x, lengths, states))))
        for out in names:
            a, b = have[out].astype(np.float64), want[out].astype(np.float64)
            where = f"output '{out}' for x{list(x.shape)}, lengths {lengths.tolist()[:8]}"
            if a.shape != b.shape:
                raise ExportError(f"{name}: {where}: shape {list(a.shape)}, the float32 model's {list(b.shape)}")
            if not np.isfinite(a).all() and np.isfinite(b).all():
                raise ExportError(
                    f"{name}: {where}: non-finite values where the float32 model has none (float16 overflow?); "
                    "the file was not written"
                )
            diff = np.abs(a - b)
            diff = np.where(np.isnan(a) & np.isnan(b), 0.0, diff)
            if precision == "int8":  # its rows are cut to their lengths: past a sequence's end it writes zeros
                diff = np.where(_within_lengths(ref, out, axes, lengths, diff.shape), diff, 0.0)
            largest = float(diff.max(initial=0.0))
            scale = max(1.0, float(np.abs(b[np.isfinite(b)]).max(initial=0.0)))  # the output's range
            max_abs, worst = max(max_abs, largest), largest / scale
            max_scaled = max(max_scaled, worst)
            if worst > tolerance:
                raise ExportError(
                    f"{name}: {where}: the {precision} twin differs from the float32 model by {largest:.3g} "
                    f"({worst:.3g} of max(1, max |output|); tolerance {tolerance:g} for {precision}); "
                    "the file was not written"
                )
    longest = max(x.shape[1] for x, _ in batches)
    source = given.check_source if given is not None and given.check is not None else ""
    return TwinParity(max_abs, max_scaled, tolerance, len(batches), longest, names, got.get_providers()[0], source)


def _within_lengths(session, output: str, axes: list, lengths: np.ndarray, shape: tuple) -> np.ndarray | bool:
    """Where `output` (of `shape`) holds a step within its sequence's length: a mask over its batch
    and time axes (found by x's dim names), or True for an output without a time axis."""
    dims = next(o.shape for o in session.get_outputs() if o.name == output)
    batch, time_axis = axes
    if time_axis is None or batch is None or time_axis not in dims or batch not in dims:
        return True
    b, t = dims.index(batch), dims.index(time_axis)
    steps = np.arange(shape[t]).reshape([-1 if k == t else 1 for k in range(len(shape))])
    ends = lengths.reshape([-1 if k == b else 1 for k in range(len(shape))])
    return np.broadcast_to(steps < ends, shape)


@dataclass
class LabelledData:
    """Sequences with class labels, for the accuracy gate of a classifier twin."""

    name: str  # e.g. "Japanese Vowels test split"
    sequences: Sequence[np.ndarray]  # each (T_i, features) float32
    labels: np.ndarray  # (N,) int64
    output: str = "logits"  # the output whose argmax is the predicted class


def japanese_vowels_test() -> LabelledData | None:
    """The speaker model's held-out data, or None where sktime (which ships it) is not installed."""
    from export import japanese_vowels

    try:
        sequences, labels = japanese_vowels.load("test")
    except RuntimeError:
        return None
    return LabelledData("Japanese Vowels test split", sequences, labels)


def japanese_vowels_calibration() -> Calibration | None:
    """The speaker model's training split (its first layer's range) and held-out split (the parity
    gate's inputs: the gate's standard-normal x is far outside what the model normalises), or None
    where sktime is not installed."""
    from export import japanese_vowels

    try:
        train, _ = japanese_vowels.load("train")
        test, _ = japanese_vowels.load("test")
    except RuntimeError:
        return None
    return Calibration(
        f"the Japanese Vowels training split ({len(train)} sequences)", pinned.batches_of(train),
        pinned.batches_of(test, 16), "the Japanese Vowels test split",
    )  # fmt: skip


def scores(path: Path, data: LabelledData, providers: list | None = None) -> np.ndarray:
    """`data.output` (N, classes) for every sequence of `data`: one padded batch, in-process."""
    session = _session(path, providers or ["CPUExecutionProvider"])
    ((x, lengths),) = pinned.batches_of(data.sequences, len(data.sequences))  # (N, T, F), zero-padded
    (out,) = session.run([data.output], _feeds(session, x.astype(np.float32, copy=False), lengths, {}))
    return out.astype(np.float32)


def accuracy(path: Path, data: LabelledData, providers: list | None = None) -> float:
    """Fraction of `data` whose argmax of `data.output` is the label."""
    return float((scores(path, data, providers).argmax(axis=1) == data.labels).mean())


@dataclass
class Accuracy:
    data: str
    count: int
    reference: float  # the float32 model's accuracy
    twin: float
    output: str = "logits"
    max_abs: float = 0.0  # max |twin - float| of that output on the data
    max_output: float = 0.0  # max |float| of that output on the data

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.reference - self.twin)

    def line(self, reference: str, precision: str) -> str:
        return (
            f"accuracy on the {self.data} ({self.count} sequences): {reference} (float32) {self.reference:.4f}, "
            f"{precision} {self.twin:.4f} (drop {self.drop_points:+.2f} points; at most {MAX_ACCURACY_DROP:g} "
            f"allowed); max |{self.output}| error {self.max_abs:.3g} (max |{self.output}| {self.max_output:.3g})"
        )


def check_accuracy(
    reference: Path, twin: Path, data: LabelledData, twin_of: str, precision: str, providers: list
) -> Accuracy:
    """Accuracy of both on `data`; ExportError when the twin loses more than MAX_ACCURACY_DROP points."""
    want, have = scores(reference, data), scores(twin, data, providers)
    right = lambda s: float((s.argmax(axis=1) == data.labels).mean())  # noqa: E731
    result = Accuracy(
        data.name, len(data.labels), right(want), right(have), data.output,
        float(np.abs(have - want).max()), float(np.abs(want).max()),
    )  # fmt: skip
    if result.drop_points > MAX_ACCURACY_DROP:
        raise ExportError(
            f"{twin_name(twin_of, precision)}: {result.line(twin_of, precision)}: refused; the file was not written"
        )
    return result


# -- one twin, end to end ---------------------------------------------------------------------------
@dataclass
class TwinResult:
    name: str
    path: Path
    precision: str
    twin_of: str
    seconds: float
    parity: TwinParity
    accuracy: Accuracy | None = None
    notes: list[str] = field(default_factory=list)

    def lines(self, reference_bytes: int | None = None) -> list[str]:
        size = self.path.stat().st_size
        ratio = f", {size / reference_bytes:.2f}x {self.twin_of}" if reference_bytes else ""
        out = [
            f"{self.name}: {self.precision} twin of {self.twin_of} -> {self.path} ({self.seconds:.2f} s; "
            f"{size:,} bytes{ratio})",
            f"  {self.parity.line(self.twin_of)}",
        ]
        if self.accuracy is not None:
            out.append(f"  {self.accuracy.line(self.twin_of, self.precision)}")
        out += [f"  {note}" for note in self.notes]
        return out


def _set_metadata(path: Path, values: dict[str, str]) -> None:
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "lstm-serve"
    onnx.save(model, str(path))


def make_twin(
    reference: Path,
    precision: str,
    path: Path,
    twin_of: str,
    data: LabelledData | None = None,
    io_float16: bool = False,
    calibration: Calibration | None = None,
) -> TwinResult:
    """Write the `precision` twin of the float32 file `reference` (model `twin_of`) to `path`,
    atomically, after the parity gate (and the accuracy gate where `data` is given) pass. An int8
    twin is pinned where `calibration` (inputs like the model's real ones) is given, else row by row."""
    from export.onnx_export import _atomic_path

    if precision not in TWINS:
        raise ExportError(f"precision {precision!r}: twins are {', '.join(TWINS)}")
    name = twin_name(twin_of, precision)
    start = time.perf_counter()
    providers, note = check_provider(precision)
    notes = [note] if note else []
    form = ""
    with _atomic_path(path) as tmp:
        if precision == "int8":
            form, done = quantize_int8(reference, tmp, twin_of, calibration)
            if form == "pinned":
                notes.append(f"int8 form: {FORMS[form]}; {done[-1]}")
            else:
                notes.append(f"int8 form: {FORMS[form].format(why=done.pop())}")
            notes.append(
                "DynamicQuantizeLSTM has CPU kernels only: a server on --device cuda runs these nodes on its CPU"
            )
            method = f"onnxruntime quantize_dynamic: QInt8 weights per tensor, {METHODS[form]}; " + "; ".join(done)
        else:
            done = convert_fp16(reference, tmp, twin_of, io_float16)
            method = "onnxruntime.transformers.float16: " + "; ".join(done)
            if io_float16:
                notes.append("x and outputs are float16: clients send FP16 and get FP16 back")
        pinned_by = calibration if precision == "int8" and form == "pinned" else None
        parity = check_twin(reference, tmp, precision, name, providers, pinned_by)
        result = TwinResult(name, path, precision, twin_of, 0.0, parity, notes=notes)
        if data is not None:
            result.accuracy = check_accuracy(reference, tmp, data, twin_of, precision, providers)
        meta = {
            metadata.PRECISION: precision,
            metadata.TWIN_OF: twin_of,
            metadata.PRECISION_METHOD: method,
            metadata.PRECISION_TOLERANCE: f"{parity.tolerance:g}",
            metadata.PRECISION_MAX_ABS_ERROR: f"{parity.max_abs:.3e}",
            metadata.PRECISION_CHECKED_ON: parity.provider,
        }
        if result.accuracy is not None:
            acc = result.accuracy
            meta[metadata.PRECISION_ACCURACY] = (
                f"{acc.data}: float32 {acc.reference:.4f}, {precision} {acc.twin:.4f} ({acc.count} sequences)"
            )
        _set_metadata(tmp, meta)
    result.seconds = time.perf_counter() - start
    return result
