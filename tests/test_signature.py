"""server/signature.py on its own: a Signature built from a real ONNX Runtime session of a tiny
onnx.helper model and a parsed config.pbtxt, with no server.

Batch and time axes (named in the file, Triton's max_batch_size rule, guessed, or none), the
ragged input and its lengths (this project's metadata or config.pbtxt's `lengths_input`), state
pairs (this project's h0 -> h_n, Triton's implicit `state`), control inputs, reshape, and every
disagreement between the file and its config, which must name the tensor and both values.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from server import signature
from server.errors import InvalidArgument
from server.model_config import parse
from server.signature import SignatureError

F, I64, I32, S = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.STRING


def _session(inputs, outputs, nodes) -> ort.InferenceSession:
    """A session of a graph whose tensors are (name, elem type, shape) triples."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _identity(*pairs) -> list:
    return [helper.make_node("Identity", [i], [o]) for i, o in pairs]


def _ragged_session(time_name: str = "time") -> ort.InferenceSession:
    """x [batch, time, 4] + lengths [batch] -> y [batch, time, 4] (y = x; lengths passed through)."""
    return _session(
        [("x", F, ["batch", time_name, 4]), ("lengths", I64, ["batch"])],
        [("y", F, ["batch", time_name, 4]), ("n", I64, ["batch"])],
        _identity(("x", "y"), ("lengths", "n")),
    )


def _unnamed_session() -> ort.InferenceSession:
    """a [?, 4] -> b [?, 4]: no axis named."""
    return _session([("a", F, [None, 4])], [("b", F, [None, 4])], _identity(("a", "b")))


def _triton(text: str, tmp_path=None):
    return parse(text, "m", "", tmp_path)["triton"]


def test_named_axes_come_from_the_file():
    sig = signature.build(_ragged_session(), {}, None)
    x, lengths = sig.input("x"), sig.input("lengths")
    assert (x.shape, x.batch_axis, x.time_axis, x.dim_names) == ([-1, -1, 4], 0, 1, ["batch", "time", None])
    assert (lengths.shape, lengths.batch_axis, lengths.time_axis) == ([-1], 0, None)
    assert (sig.output("y").batch_axis, sig.output("y").time_axis) == (0, 1)
    assert x.datatype == "FP32" and x.dtype == np.float32 and lengths.datatype == "INT64"
    # nobody said which input holds the lengths: merged by equal shapes, nothing optional
    assert sig.ragged is None and sig.lengths is None
    assert sig.batching_rule == "equal" and sig.merge and sig.batchable
    assert [t.name for t in sig.required_inputs] == ["x", "lengths"]
    assert sig.fixed_dims == {"x": [(2, 4)], "lengths": []}
    assert sig.axes_json() == {"x": {"batch": 0, "time": 1}, "lengths": {"batch": 0}, "y": {"batch": 0, "time": 1},
                               "n": {"batch": 0}}  # fmt: skip
    assert sig.max_batch_size == 0 and not sig.stateful


def test_lengths_input_in_config_makes_the_model_ragged():
    triton = _triton('parameters { key: "lengths_input" value { string_value: "lengths" } }')
    sig = signature.build(_ragged_session(), {}, triton)
    assert (sig.ragged, sig.lengths, sig.batching_rule) == ("x", "lengths", "ragged")
    assert sig.input("lengths").optional and not sig.input("x").optional
    assert [t.name for t in sig.required_inputs] == ["x"]
    assert sig.fixed_dims["x"] == [(2, 4)]  # neither the batch nor the ragged time axis is fixed
    assert sig.roles_json() == {"ragged": "x", "lengths": "lengths", "states": []}
    assert sig.static_length is None


def test_a_fixed_time_axis_is_the_static_length():
    triton = _triton('parameters { key: "lengths_input" value { string_value: "lengths" } }')
    session = _session(
        [("x", F, ["batch", 9, 4]), ("lengths", I64, ["batch"])],
        [("y", F, ["batch", 9, 4])],
        _identity(("x", "y")),
    )
    # dim 1 is fixed, so it is not named "time": the config cannot find the ragged input
    with pytest.raises(SignatureError, match=r"lengths_input 'lengths': exactly one other input .* \(found \[\]\)"):
        signature.build(session, {}, triton)
    sig = signature.build(session, {"lstm.axes": json.dumps({"x": {"batch": 0, "time": 1}})}, triton)
    assert (sig.ragged, sig.static_length) == ("x", 9)


def test_lengths_input_must_be_an_int_vector_beside_one_timed_input():
    triton = _triton('parameters { key: "lengths_input" value { string_value: "lengths" } }')
    two = _session(
        [("x", F, ["batch", "time", 4]), ("z", F, ["batch", "time"]), ("lengths", I64, ["batch"])],
        [("y", F, ["batch", "time", 4])],
        _identity(("x", "y")),
    )
    with pytest.raises(
        SignatureError, match=r"exactly one other input must have an axis named 'time' \(found \['x', 'z'\]\)"
    ):
        signature.build(two, {}, triton)
    floats = _session(
        [("x", F, ["batch", "time", 4]), ("lengths", F, ["batch"])],
        [("y", F, ["batch", "time", 4])],
        _identity(("x", "y")),
    )
    with pytest.raises(
        SignatureError, match=r"lengths input 'lengths': must be INT32 or INT64 \[batch\], got FP32 \[-1\]"
    ):
        signature.build(floats, {}, triton)
    missing = _triton('parameters { key: "lengths_input" value { string_value: "len" } }')
    with pytest.raises(SignatureError, match="lengths input 'len': model.onnx has no such input"):
        signature.build(_ragged_session(), {}, missing)


def test_no_named_axis_guesses_a_split_axis_but_never_merges():
    sig = signature.build(_unnamed_session(), {}, None)
    assert sig.input("a").batch_axis == 0 and sig.output("b").batch_axis == 0
    assert not sig.merge and sig.batching_rule == "none"


def test_explicit_max_batch_size_zero_means_no_batch_axis():
    sig = signature.build(_unnamed_session(), {}, _triton("max_batch_size: 0"))
    assert sig.input("a").batch_axis is None and sig.output("b").batch_axis is None
    assert not sig.batchable and sig.batching_rule == "none" and sig.merge
    assert sig.fixed_dims == {"a": [(1, 4)]}
    assert sig.axes_json() == {}


def test_max_batch_size_makes_axis_zero_the_batch_and_dims_leave_it_out():
    triton = _triton(
        "max_batch_size: 8\n"
        'input [{ name: "a" data_type: TYPE_FP32 dims: [4] }]\n'
        'output [{ name: "b" data_type: TYPE_FP32 dims: [-1] }]'
    )
    sig = signature.build(_unnamed_session(), {}, triton)
    assert sig.max_batch_size == 8
    assert (sig.input("a").shape, sig.input("a").batch_axis) == ([-1, 4], 0)
    assert (sig.output("b").shape, sig.output("b").batch_axis) == ([-1, 4], 0)  # the file's 4 fills the config's -1
    assert sig.batching_rule == "equal" and sig.merge


def test_max_batch_size_refuses_a_scalar():
    session = _session([("a", F, [])], [("b", F, [])], _identity(("a", "b")))
    with pytest.raises(SignatureError, match="a: a scalar in model.onnx, but max_batch_size > 0"):
        signature.build(session, {}, _triton("max_batch_size: 2"))


@pytest.mark.parametrize(
    "entry, message",
    [
        ('input [{ name: "a" data_type: TYPE_FP32 dims: [5] }]',
         r"input 'a': dim 1 is 5 in config.pbtxt but 4 in model.onnx \(config \[-1, 5\], model \[-1, 4\]\)"),
        ('input [{ name: "a" data_type: TYPE_FP32 dims: [4, 1] }]',
         r"input 'a': config.pbtxt gives rank 3 \[-1, 4, 1\], model.onnx has rank 2 \[-1, 4\]"),
        ('input [{ name: "a" data_type: TYPE_INT32 dims: [4] }]',
         "input 'a': data_type INT32 in config.pbtxt, FP32 in model.onnx"),
        ('output [{ name: "c" data_type: TYPE_FP32 dims: [4] }]',
         r"config.pbtxt output 'c': model.onnx has no such output \(it has \['b'\]\)"),
        ('input [{ name: "a" data_type: TYPE_FP32 dims: [4] optional: true }]',
         "input 'a': optional in config.pbtxt, but model.onnx requires it"),
        ('input [{ name: "a" data_type: TYPE_FP32 dims: [4] reshape { shape: [3] } }]',
         r"input 'a' \(reshape\): dim 1 is 3 in config.pbtxt but 4 in model.onnx"),
    ],
)  # fmt: skip
def test_config_and_file_disagreements_name_the_tensor_and_both_values(entry, message):
    with pytest.raises(SignatureError, match=message):
        signature.build(_unnamed_session(), {}, _triton("max_batch_size: 2\n" + entry))


def test_reshape_keeps_the_clients_shape_and_the_models():
    session = _session([("a", F, ["batch", 2, 2])], [("b", F, ["batch", 2, 2])], _identity(("a", "b")))
    triton = _triton(
        'max_batch_size: 4\ninput [{ name: "a" data_type: TYPE_FP32 dims: [4] reshape { shape: [2, 2] } }]'
    )
    sig = signature.build(session, {}, triton)
    a = sig.input("a")
    assert (a.shape, a.model_shape, a.batch_axis) == ([-1, 4], [-1, 2, 2], 0)
    assert sig.checks_values


def test_reshape_must_keep_the_element_count_without_a_batch_axis():
    session = _session([("a", F, [2, 2])], [("b", F, [2, 2])], _identity(("a", "b")))
    bad = _triton('max_batch_size: 0\ninput [{ name: "a" data_type: TYPE_FP32 dims: [5] reshape { shape: [2, 2] } }]')
    with pytest.raises(
        SignatureError, match=r"input 'a': dims \[5\] and reshape \[2, 2\] hold different element counts"
    ):
        signature.build(session, {}, bad)


def test_reshape_must_keep_the_element_count_beside_a_batch_axis():
    session = _session([("a", F, ["batch", 2, 2])], [("b", F, ["batch", 2, 2])], _identity(("a", "b")))
    bad = _triton('max_batch_size: 4\ninput [{ name: "a" data_type: TYPE_FP32 dims: [5] reshape { shape: [2, 2] } }]')
    with pytest.raises(
        SignatureError, match=r"input 'a': dims \[5\] and reshape \[2, 2\] hold different element counts"
    ):
        signature.build(session, {}, bad)


def _export_session() -> ort.InferenceSession:
    """This project's export layout: x, lengths, h0, c0 -> y, h_n, c_n (identities)."""
    return _session(
        [("x", F, ["batch", "time", 3]), ("lengths", I64, ["batch"]), ("h0", F, [1, "batch", 2]),
         ("c0", F, [1, "batch", 2])],
        [("y", F, ["batch", "time", 3]), ("h_n", F, [1, "batch", 2]), ("c_n", F, [1, "batch", 2])],
        _identity(("x", "y"), ("h0", "h_n"), ("c0", "c_n")),
    )  # fmt: skip


def test_project_exports_have_ragged_lengths_and_client_state_pairs():
    meta = {"lstm.export_mode": "dynamic", "lstm.config": json.dumps({"bidirectional": True})}
    sig = signature.build(_export_session(), meta, None)
    assert (sig.ragged, sig.lengths, sig.batching_rule) == ("x", "lengths", "ragged")
    assert [(p.input, p.output, p.implicit) for p in sig.states] == [("h0", "h_n", False), ("c0", "c_n", False)]
    assert sig.state_input_names() == ["h0", "c0"]
    assert [t.name for t in sig.inputs] == ["x", "lengths", "h0", "c0"]  # visible: the client may send them
    assert [t.name for t in sig.required_inputs] == ["x"]
    assert sig.input("h0").batch_axis == 1 and sig.bidirectional and sig.stateful
    assert sig.hidden_inputs == [] and sig.hidden_outputs == []


def test_project_metadata_value_range_and_static_length():
    session = _session(
        [("x", I64, ["batch", "time"]), ("lengths", I64, ["batch"])],
        [("y", I64, ["batch", "time"])],
        _identity(("x", "y")),
    )
    meta = {"lstm.export_mode": "static", "lstm.input": "tokens", "lstm.vocab_size": "50", "lstm.static_length": "7"}
    sig = signature.build(session, meta, None)
    assert sig.input("x").value_range == (0, 49) and sig.checks_values
    assert sig.static_length == 7
    assert not sig.bidirectional  # no lstm.config: unidirectional


def test_an_old_export_without_axis_names_gets_its_conventional_time_axes():
    session = _session(
        [("x", F, [None, None, 3]), ("lengths", I64, [None])], [("y", F, [None, None, 3])], _identity(("x", "y"))
    )
    sig = signature.build(session, {"lstm.export_mode": "dynamic"}, None)
    assert sig.input("x").time_axis == 1 and sig.output("y").time_axis == 1
    assert sig.ragged == "x" and not sig.merge  # batch guessed from a free axis 0: never merged


def test_recorded_axes_metadata_names_axes_the_file_leaves_unnamed():
    session = _session([("a", F, [None, 5, None])], [("b", F, [None, 5, None])], _identity(("a", "b")))
    axes = {"a": {"batch": 2, "time": 0}, "b": {"batch": 2}, "junk": 3}
    sig = signature.build(session, {"lstm.axes": json.dumps(axes)}, None)
    assert (sig.input("a").batch_axis, sig.input("a").time_axis) == (2, 0)
    assert (sig.output("b").batch_axis, sig.output("b").time_axis) == (2, None)
    bad = signature.build(session, {"lstm.axes": json.dumps({"a": {"batch": 7}})}, None)  # out of range: ignored
    assert bad.input("a").batch_axis == 0 and not bad.merge  # guessed instead


def _state_session() -> ort.InferenceSession:
    """INPUT, START, ACC_IN -> OUTPUT, ACC_OUT: Triton's implicit-state shape, [batch, 1] each."""
    return _session(
        [("INPUT", I32, [None, 1]), ("START", I32, [None, 1]), ("ACC_IN", I32, [None, 1])],
        [("OUTPUT", I32, [None, 1]), ("ACC_OUT", I32, [None, 1])],
        [
            helper.make_node("Add", ["INPUT", "ACC_IN"], ["OUTPUT"]),
            helper.make_node("Identity", ["OUTPUT"], ["ACC_OUT"]),
        ],
    )


_STATE_CONFIG = """
max_batch_size: 8
input [{ name: "INPUT" data_type: TYPE_INT32 dims: [1] }]
output [{ name: "OUTPUT" data_type: TYPE_INT32 dims: [1] }]
sequence_batching {
  control_input [{ name: "START" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] }]
  state [{ input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [1] %s }]
}
"""


def test_implicit_state_and_controls_are_hidden_from_the_client():
    sig = signature.build(_state_session(), {}, _triton(_STATE_CONFIG % ""))
    assert [t.name for t in sig.inputs] == ["INPUT"] and [t.name for t in sig.outputs] == ["OUTPUT"]
    assert [t.name for t in sig.hidden_inputs] == ["ACC_IN", "START"]
    assert [t.name for t in sig.hidden_outputs] == ["ACC_OUT"]
    (pair,) = sig.states
    assert (pair.input, pair.output, pair.implicit, pair.initial) == ("ACC_IN", "ACC_OUT", True, None)
    assert [(c.input, c.kind, c.datatype, c.false_true) for c in sig.controls] == [("START", "start", "INT32", (0, 1))]
    assert sig.control_shapes == {"START": [1, 1]}
    assert sig.input("ACC_IN").optional and sig.input("START").optional
    assert sig.stateful and sig.batching_rule == "equal"
    assert sig.roles_json()["states"] == [{"input": "ACC_IN", "output": "ACC_OUT", "implicit": True}]


def test_state_initial_data_file_is_read_and_sized(tmp_path):
    (tmp_path / "initial_state").mkdir()
    init = 'initial_state [{ data_type: TYPE_INT32 dims: [1] name: "i" data_file: "acc" }]'
    (tmp_path / "initial_state" / "acc").write_bytes(np.array([41], np.int32).tobytes())
    sig = signature.build(_state_session(), {}, _triton(_STATE_CONFIG % init, tmp_path))
    assert sig.states[0].initial.tolist() == [[41]] and sig.states[0].initial.dtype == np.int32
    (tmp_path / "initial_state" / "acc").write_bytes(b"\0" * 6)
    with pytest.raises(
        SignatureError, match=r"state 'ACC_IN': initial_state data_file is 6 bytes, expected 4 \(INT32 \[1, 1\]\)"
    ):
        signature.build(_state_session(), {}, _triton(_STATE_CONFIG % init, tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        (("ACC_IN", "NOPE"), "sequence_batching.state input_name 'NOPE': model.onnx has no such tensor"),
        (('"ACC_OUT" data_type: TYPE_INT32', '"ACC_OUT" data_type: TYPE_FP32'),
         "state 'ACC_IN': data_type FP32 in config.pbtxt, INT32 in model.onnx"),
        (('name: "START"', 'name: "GO"'), r"control_input 'GO': model.onnx has no such input \(it has"),
        (("int32_false_true", "fp32_false_true"),
         "control input 'START': the control feeds FP32, model.onnx takes INT32"),
    ],
)  # fmt: skip
def test_state_and_control_disagreements_are_named(change, message):
    text = (_STATE_CONFIG % "").replace(*change)
    with pytest.raises(SignatureError, match=message):
        signature.build(_state_session(), {}, _triton(text))


def test_string_tensors_are_bytes_and_unknown_types_keep_their_onnx_name():
    session = _session(
        [("s", S, ["batch"]), ("h", TensorProto.BFLOAT16, ["batch"])],
        [("t", S, ["batch"]), ("g", TensorProto.BFLOAT16, ["batch"])],
        _identity(("s", "t"), ("h", "g")),
    )
    sig = signature.build(session, {}, None)
    assert sig.input("s").datatype == "BYTES" and sig.input("s").dtype == np.dtype(object)
    assert sig.input("h").datatype == "tensor(bfloat16)"


# -- control inputs: what the signature's controls feed (server/control.py) -------------------

_CONTROL_CONFIG = """
max_batch_size: 8
input [{ name: "INPUT" data_type: TYPE_INT32 dims: [1] }]
output [{ name: "OUTPUT" data_type: TYPE_INT32 dims: [1] }]
sequence_batching {
  control_input [
    { name: "START" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] },
    { name: "END" control [{ kind: CONTROL_SEQUENCE_END fp32_false_true: [-1, 2.5] }] },
    { name: "READY" control [{ kind: CONTROL_SEQUENCE_READY bool_false_true: [false, true] }] },
    { name: "CORRID" control [{ kind: CONTROL_SEQUENCE_CORRID data_type: %s }] }
  ]
}
"""


def _control_session(corrid=TensorProto.UINT64) -> ort.InferenceSession:
    return _session(
        [("INPUT", I32, [None, 1]), ("START", I32, [None, 1]), ("END", F, [None, 1]),
         ("READY", TensorProto.BOOL, [None, 1]), ("CORRID", corrid, [None, 1])],
        [("OUTPUT", I32, [None, 1])],
        _identity(("INPUT", "OUTPUT")),
    )  # fmt: skip


def test_control_feeds_follow_the_signature_shapes_and_false_true_values():
    from server import control

    sig = signature.build(_control_session(), {}, _triton(_CONTROL_CONFIG % "TYPE_UINT64"))
    assert [t.name for t in sig.inputs] == ["INPUT"] and sig.stateful and not sig.states
    assert sig.control_shapes == {n: [1, 1] for n in ("START", "END", "READY", "CORRID")}
    first = control.feeds(sig.controls, sig.control_shapes, 2**64 - 1, start=True, end=False)
    assert {k: (v.dtype.name, v.tolist()) for k, v in first.items()} == {
        "START": ("int32", [[1]]),
        "END": ("float32", [[-1.0]]),
        "READY": ("bool", [[True]]),
        "CORRID": ("uint64", [[2**64 - 1]]),
    }
    last = control.feeds(sig.controls, sig.control_shapes, 5, start=False, end=True)
    assert (last["START"].tolist(), last["END"].tolist()) == ([[0]], [[2.5]])
    with pytest.raises(InvalidArgument, match="parameter 'sequence_id': 'abc' is a string, but the model's"):
        control.feeds(sig.controls, sig.control_shapes, "abc", start=True, end=False)
    with pytest.raises(InvalidArgument, match=r"parameter 'sequence_id': -1 does not fit .* 'CORRID' \(UINT64\)"):
        control.feeds(sig.controls, sig.control_shapes, -1, start=True, end=False)
    assert [control.config_entry(c) for c in sig.controls] == [
        {"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]},
        {"name": "END", "control": [{"kind": "CONTROL_SEQUENCE_END", "fp32_false_true": [-1.0, 2.5]}]},
        {"name": "READY", "control": [{"kind": "CONTROL_SEQUENCE_READY", "bool_false_true": [False, True]}]},
        {"name": "CORRID", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_UINT64"}]},
    ]


def test_a_string_corrid_is_fed_as_text():
    from server import control

    sig = signature.build(_control_session(S), {}, _triton(_CONTROL_CONFIG % "TYPE_STRING"))
    fed = control.feeds(sig.controls, sig.control_shapes, 42, start=True, end=False)["CORRID"]
    assert fed.dtype == object and fed.tolist() == [["42"]]
