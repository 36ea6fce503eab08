"""The pinned-range int8 twin: ONNX Runtime's `DynamicQuantizeLSTM` with every activation range
fixed by the graph itself, so that a row's int8 answer never depends on its batch-mates and the
twin still runs the whole batch in one call.

`DynamicQuantizeLSTM` quantizes two things per run with the range of the tensor at hand: the
layer's whole input X [T, B, I] once ([min(0, min X), max(0, max X)]), and the state h [B, H]
before each step's recurrent product (the range of every row's h). Both ranges are pinned here:

- X: clipped to [-R, R] and given two constant features +R and -R (zero weights), so every batch's
  range is exactly [-R, R]. For a layer fed by an LSTM below (through Transpose/Reshape and the
  like), R = 1: |h| <= 1 by construction, so the clip changes nothing. For any other layer (the
  first) R comes from calibration data: MARGIN x the largest |x| the float model feeds that layer
  on it. An input beyond R is clipped: that row's own answer moves, no other row's.
- h: two anchor hidden units per direction whose gates are held by their biases (input gate shut,
  forget and output gates open; zero weights in and out, so they feed nothing) and whose cell
  starts at +HOLD and -HOLD: their h is exactly +1 and -1 on every row and step, so each step's
  range is [-1, 1] whatever the batch. They are added to the initial states inside the graph (h0
  clipped to [-1, 1], the range a state from an earlier chunk has) and sliced off every output, so
  the twin's inputs and outputs are the float model's.

The weights are the quantized ones `quantize_dynamic` wrote, widened with zero-point entries (zero
after the zero point is taken off), so the products are those of the batch-dependent twin with
fixed activation scales. Anything else in the graph (a MatMul head) stays float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.verify import ExportError

MARGIN = 1.25  # R = MARGIN x the largest |x| a first layer sees on the calibration data
HOLD = 100.0  # the anchors' gate biases and initial cells: float32 sigmoid(+-100) is 1 or 0, tanh(100) is 1
# ops that only move values: an LSTM input reached from an LSTM's output through these is |x| <= 1
_MOVES = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Slice", "Concat", "Split"}
_PIN = "pinned/"  # prefix of every name the surgery adds


@dataclass
class Calibration:
    """Inputs like the model's real ones, for the first layer's range: (x, lengths) batches."""

    source: str  # in words, e.g. "the Japanese Vowels training split (270 sequences)"
    batches: Sequence[tuple[np.ndarray, np.ndarray]]
    # held-out inputs of the same kind for the parity gate (a trained model's real inputs are not
    # the gate's standard-normal ones); None: the gate's own batches are of this kind
    check: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
    check_source: str = ""


def standard_normal(features: int, seed: int = 4321) -> Calibration:
    """Standard-normal x: the input the family's random-weight encoders are gated and benchmarked on."""
    rng = np.random.default_rng(seed)
    batches = []
    for batch, steps in ((16, 50), (8, 200)):
        x = rng.standard_normal((batch, steps, features)).astype(np.float32)
        batches.append((x, np.full(batch, steps, np.int64)))
    return Calibration(f"standard-normal x ({sum(x.shape[0] * x.shape[1] for x, _ in batches):,} frames)", batches)


def batches_of(seqs: Sequence[np.ndarray], per_batch: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sequences (each (T_i, features)) padded with zeros into (x, lengths) batches of `per_batch`."""
    batches = []
    for start in range(0, len(seqs), per_batch):
        part = seqs[start : start + per_batch]
        lengths = np.array([len(s) for s in part], np.int64)
        x = np.zeros((len(part), int(lengths.max()), *part[0].shape[1:]), part[0].dtype)
        for i, s in enumerate(part):
            x[i, : len(s)] = s
        batches.append((x, lengths))
    return batches


def unsupported(model: onnx.ModelProto) -> str | None:
    """Why the float model's LSTMs cannot be pinned (then the twin runs row by row), or None."""
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    nested = [
        n.name or n.op_type for n in model.graph.node for a in n.attribute if a.type in (a.GRAPH, a.GRAPHS)
    ]  # fmt: skip
    if nested:
        return f"node(s) with subgraphs ({', '.join(nested[:3])})"
    if not lstms:
        return "no LSTM"
    for node in lstms:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        acts = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
        if len(node.input) > 7 and node.input[7]:
            return f"LSTM {node.name!r} has peepholes"
        if "clip" in attrs or attrs.get("input_forget", 0) or attrs.get("layout", 0):
            return f"LSTM {node.name!r} sets clip, input_forget or layout"
        if acts and [a.lower() for a in acts] != ["sigmoid", "tanh", "tanh"] * (len(acts) // 3):
            return f"LSTM {node.name!r} has activations {acts}"
    return None


def _lstm_fed(model: onnx.ModelProto) -> set[str]:
    """Values computed from LSTM outputs by ops that only move values (see _MOVES)."""
    fed = {o for n in model.graph.node if n.op_type in ("LSTM", "DynamicQuantizeLSTM") for o in n.output[:1] if o}
    consts = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    for node in model.graph.node:  # topological order
        data = node.input[:1] if node.op_type in ("Reshape", "Slice", "Squeeze", "Unsqueeze", "Split") else node.input
        data = [i for i in data if i and i not in consts]
        if node.op_type in _MOVES and data and all(i in fed for i in data):
            fed.update(node.output)
    return fed


def input_ranges(src: Path, calibration: Calibration, name: str) -> dict[str, float]:
    """{LSTM input name: R}: 1.0 for an input fed by an LSTM below, else MARGIN x the largest |x| over
    the valid steps of the calibration batches, run through the float model `src`."""
    import onnxruntime as ort

    model = onnx.load(str(src))
    fed = _lstm_fed(model)
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    out = {n.input[0]: 1.0 for n in lstms if n.input[0] in fed}
    wanted = [n for n in lstms if n.input[0] not in fed]
    if not wanted:
        return out
    lens = {n.input[0]: n.input[4] if len(n.input) > 4 and n.input[4] else "" for n in wanted}
    fetch = list(dict.fromkeys(v for pair in lens.items() for v in pair if v))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.ValueInfoProto(name=v) for v in fetch if v not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    largest = dict.fromkeys(lens, 0.0)
    for x, lengths in calibration.batches:
        feeds = {}
        for inp in sess.get_inputs():  # x, lengths; initial states zero (it is x's range that is calibrated)
            shape = [d if isinstance(d, int) else len(lengths) for d in inp.shape]
            feeds[inp.name] = {"x": x, "lengths": lengths}.get(inp.name, np.zeros(shape, np.float32))
        fetched = dict(zip(fetch, sess.run(fetch, feeds)))
        for key, seq in lens.items():
            value = fetched[key].astype(np.float64)  # (T, B, I)
            if seq:  # the valid steps only: padding never reaches an output
                valid = np.arange(value.shape[0])[:, None] < np.asarray(fetched[seq]).reshape(1, -1)
                value = np.where(valid[:, :, None], value, 0.0)
            largest[key] = max(largest[key], float(np.abs(value).max(initial=0.0)))
    for key, top in largest.items():
        if not np.isfinite(top) or top <= 0.0:
            raise ExportError(f"{name}: int8: the calibration data ({calibration.source}) gives LSTM input {key!r} "
                              f"the range {top}: nothing to calibrate on")  # fmt: skip
        out[key] = float(np.float32(MARGIN * top))
    return out


def pin(model: onnx.ModelProto, ranges: dict[str, float], name: str) -> onnx.ModelProto:
    """Widen every DynamicQuantizeLSTM of `model` (written by quantize_dynamic) with the input
    features and anchor units that fix its activation ranges; the graph's inputs and outputs stay."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    extra: list[onnx.TensorProto] = []

    def const(key: str, value: np.ndarray) -> str:
        extra.append(numpy_helper.from_array(value, _PIN + key))
        return _PIN + key

    nodes: list[onnx.NodeProto] = []
    two, zero1, one1, two1, last = (const(k, np.array(v, np.int64)) for k, v in
                                    (("two", [2]), ("0", [0]), ("1", [1]), ("2", [2]), ("last", [-1])))  # fmt: skip
    for k, node in enumerate(graph.node):
        if node.op_type != "DynamicQuantizeLSTM":
            nodes.append(node)
            continue
        p = f"{k}_"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        hidden = int(attrs["hidden_size"])
        wide = hidden + 2
        ins = list(node.input) + [""] * (12 - len(node.input))
        x_name = ins[0]
        if x_name not in ranges:
            raise ExportError(f"{name}: int8: no calibrated range for LSTM input {x_name!r}")
        r = np.float32(ranges[x_name])
        w, rec = (numpy_helper.to_array(inits[ins[i]]) for i in (1, 2))  # (D, I, 4H), (D, H, 4H)
        w_zp, r_zp = (numpy_helper.to_array(inits[ins[i]]).reshape(-1) for i in (9, 11))
        dirs, features = w.shape[0], w.shape[1]
        w2 = np.empty((dirs, features + 2, 4 * wide), w.dtype)
        r2 = np.empty((dirs, wide, 4 * wide), rec.dtype)
        for d in range(dirs):  # the zero point everywhere: a zero weight once it is taken off
            w2[d] = w_zp[d if len(w_zp) > 1 else 0]
            r2[d] = r_zp[d if len(r_zp) > 1 else 0]
        bias = numpy_helper.to_array(inits[ins[3]]) if ins[3] else np.zeros((dirs, 8 * hidden), np.float32)
        b2 = np.zeros((dirs, 8 * wide), np.float32)
        for gate in range(4):  # ONNX gate order i, o, f, c
            w2[:, :features, gate * wide : gate * wide + hidden] = w[:, :, gate * hidden : (gate + 1) * hidden]
            r2[:, :hidden, gate * wide : gate * wide + hidden] = rec[:, :, gate * hidden : (gate + 1) * hidden]
        for block in range(8):  # W's biases then R's
            b2[:, block * wide : block * wide + hidden] = bias[:, block * hidden : (block + 1) * hidden]
        b2[:, 0 * wide + hidden : 1 * wide] = -HOLD  # input gate shut: the cell keeps its start
        b2[:, 1 * wide + hidden : 2 * wide] = HOLD  # output gate open: h = tanh(+-HOLD) = +-1
        b2[:, 2 * wide + hidden : 3 * wide] = HOLD  # forget gate open
        shape = _PIN + p + "xshape"
        anchors = _PIN + p + "state_shape"  # (D, B, 2)
        new = [
            helper.make_node("Shape", [x_name], [shape]),
            helper.make_node("Slice", [shape, zero1, two], [_PIN + p + "tb"]),
            helper.make_node("Concat", [_PIN + p + "tb", two1], [_PIN + p + "x_anchor_shape"], axis=0),
            helper.make_node("Expand", [const(p + "x_anchor", np.array([r, -r], np.float32)),
                                        _PIN + p + "x_anchor_shape"], [_PIN + p + "x_anchors"]),
            helper.make_node("Clip", [x_name, const(p + "lo", np.array(-r, np.float32)),
                                      const(p + "hi", np.array(r, np.float32))], [_PIN + p + "x_clipped"]),
            helper.make_node("Concat", [_PIN + p + "x_clipped", _PIN + p + "x_anchors"], [_PIN + p + "x"], axis=2),
            helper.make_node("Slice", [shape, one1, two], [_PIN + p + "b"]),
            helper.make_node("Concat", [const(p + "d", np.array([dirs], np.int64)), _PIN + p + "b", two1], [anchors],
                             axis=0),
        ]  # fmt: skip
        states = []
        for which, (lo, hi) in (("h", (1.0, -1.0)), ("c", (HOLD, -HOLD))):
            given = ins[5] if which == "h" else ins[6]
            values = const(p + f"{which}_anchor", np.array([lo, hi], np.float32))
            new.append(helper.make_node("Expand", [values, anchors], [_PIN + p + f"{which}_anchors"]))
            if given:
                if which == "h":  # a state from an earlier chunk is within [-1, 1]; pin anything else there
                    new.append(helper.make_node("Clip", [given, const(p + "m1", np.array(-1.0, np.float32)),
                                                         const(p + "p1", np.array(1.0, np.float32))],
                                                [_PIN + p + "h_clipped"]))  # fmt: skip
                    given = _PIN + p + "h_clipped"
                real = given
            else:
                real = _PIN + p + f"{which}_zeros"
                full = _PIN + p + f"{which}_zeros_shape"
                new.append(helper.make_node("Concat", [const(p + f"{which}_dh", np.array([dirs], np.int64)),
                                                       _PIN + p + "b", const(p + f"{which}_h",
                                                                             np.array([hidden], np.int64))],
                                            [full], axis=0))  # fmt: skip
                new.append(helper.make_node("ConstantOfShape", [full], [real],
                                            value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])))  # fmt: skip
            new.append(helper.make_node("Concat", [real, _PIN + p + f"{which}_anchors"], [_PIN + p + f"{which}0"],
                                        axis=2))  # fmt: skip
            states.append(_PIN + p + f"{which}0")
        ins[0] = _PIN + p + "x"
        ins[1], ins[2], ins[3] = const(p + "W", w2), const(p + "R", r2), const(p + "B", b2)
        ins[5], ins[6] = states
        outs = [(_PIN + p + f"out{i}" if o else "") for i, o in enumerate(node.output)]
        lstm = helper.make_node("DynamicQuantizeLSTM", ins, outs, name=node.name, domain=node.domain)
        lstm.attribute.extend(a for a in node.attribute if a.name != "hidden_size")
        lstm.attribute.append(helper.make_attribute("hidden_size", wide))
        new.append(lstm)
        hid = const(p + "hidden", np.array([hidden], np.int64))
        for wide_out, out in zip(outs, node.output):
            if out:  # the anchors sliced off: Y (T, D, B, H), Y_h and Y_c (D, B, H)
                new.append(helper.make_node("Slice", [wide_out, zero1, hid, last], [out]))
        nodes += new
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def from_npy(path: Path, reference: Path) -> Calibration:
    """--int8-calibration FILE.npy: x like the model's real inputs, (N, T, features) or (T, features)
    (token ids: (N, T) or (T,)), every sequence T steps long; checked against the float model's x.
    Also the parity gate's inputs (a model's real inputs need not be the gate's standard-normal ones)."""
    import onnxruntime as ort

    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"--int8-calibration {path}: not a readable .npy array ({exc})") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    spec = ort.InferenceSession(str(reference), so, providers=["CPUExecutionProvider"]).get_inputs()[0]
    tokens = spec.type == "tensor(int64)"
    rank = len(spec.shape)  # (batch, time) ids or (batch, time, features)
    if x.ndim == rank - 1:
        x = x[None]
    want = "(N, T) or (T,) token ids" if tokens else f"(N, T, {spec.shape[-1]}) or (T, {spec.shape[-1]}) float32"
    numeric = np.issubdtype(x.dtype, np.integer) if tokens else np.issubdtype(x.dtype, np.floating)
    if x.ndim != rank or not numeric or x.size == 0 or (not tokens and x.shape[-1] != spec.shape[-1]):
        raise ExportError(f"--int8-calibration {path}: array {x.dtype}{list(x.shape)}; expected {want}")
    x = x.astype(np.int64 if tokens else np.float32)
    if not tokens and not np.isfinite(x).all():
        raise ExportError(f"--int8-calibration {path}: non-finite values; expected finite {want}")
    batches = [(x[i : i + 64], np.full(len(x[i : i + 64]), x.shape[1], np.int64)) for i in range(0, len(x), 64)]
    source = f"{path.name} ({x.shape[0]} sequences of {x.shape[1]} steps)"
    return Calibration(source, batches, batches, f"the calibration inputs {path.name}")
