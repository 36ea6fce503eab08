"""The server's own ONNX file reader (no `onnx` package at run time) and the memory-reuse policy
it drives: unrolled (static) graphs load with ONNX Runtime's memory-reuse planner off."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

from contract.graphs import LARGE_GRAPH_NODES, memory_reuse
from contract.onnxfile import FileSummary, graph_nodes, summarize, varint, varint_bytes
from tests.conftest import STATIC_T, TOL, ragged, reference


def test_summary_matches_onnx(repo):
    for path in sorted(repo.glob("*/1/model.onnx")):
        model = onnx.load(path)
        summary = summarize(path)
        assert summary.nodes == len(model.graph.node), path
        assert summary.metadata == {p.key: p.value for p in model.metadata_props}, path
        assert summary.metadata["lstm.export_mode"] in ("dynamic", "static"), path
        assert graph_nodes(path) == summary.nodes


def test_a_graph_given_in_two_fields_is_merged(tmp_path, repo):
    """Protobuf merges a message field given twice (ONNX Runtime reads the union): the nodes add
    up, so appending an empty graph field cannot hide a large graph from the `auto` policy."""
    path = repo / f"bi_static_t{STATIC_T}" / "1" / "model.onnx"
    nodes = len(onnx.load(path).graph.node)
    tail = tmp_path / "tail.onnx"
    tail.write_bytes(path.read_bytes() + b"\x3a\x00")  # field 7 (graph), length 0
    assert graph_nodes(tail) == nodes
    model = onnx.load(path)
    second = onnx.ModelProto(graph=onnx.GraphProto(node=model.graph.node[nodes // 2 :]))
    del model.graph.node[nodes // 2 :]
    split = tmp_path / "split.onnx"
    split.write_bytes(model.SerializeToString() + second.SerializeToString())
    assert len(onnx.load(split).graph.node) == nodes  # what onnx (and ORT) read
    assert graph_nodes(split) == nodes


def test_unreadable_files_give_an_empty_summary(tmp_path, repo):
    good = (repo / "bi" / "1" / "model.onnx").read_bytes()
    cases = {
        "missing": None,
        "empty": b"",
        "text": b"not a model at all\n",
        "truncated": good[: len(good) // 3],
        "bad_wire_type": b"\x0f\x00",
        "huge_length": b"\x3a\xff\xff\xff\xff\x0f",  # field 7 claiming 4 GB
        "zeros": bytes(16 << 20),  # field number 0 is refused at once, not scanned 2 bytes at a time
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.onnx"
        if data is not None:
            path.write_bytes(data)
        start = time.perf_counter()
        assert summarize(path) == FileSummary(), name
        assert time.perf_counter() - start < 1.0, name  # 16 MB of zeros took 4.7 s before
        assert graph_nodes(path) is None, name


def test_auto_turns_the_planner_off_only_for_large_graphs(repo):
    static = repo / f"bi_static_t{STATIC_T}" / "1" / "model.onnx"
    dynamic = repo / "bi" / "1" / "model.onnx"
    assert graph_nodes(static) > LARGE_GRAPH_NODES > graph_nodes(dynamic)
    assert memory_reuse("auto", graph_nodes(static)) is False
    assert memory_reuse("auto", graph_nodes(dynamic)) is True
    assert memory_reuse("auto", graph_nodes(repo / "missing.onnx")) is True  # unknown size: ORT's default
    assert memory_reuse("on", graph_nodes(static)) is True and memory_reuse("off", graph_nodes(dynamic)) is False


def test_static_model_is_exact_with_the_planner_off_and_on(repo, encoders):
    """The planner changes where intermediates live, never a result: both settings agree with
    PyTorch to TOL on ragged batches."""
    path = repo / f"bi_static_t{STATIC_T}" / "1" / "model.onnx"
    rng = np.random.default_rng(5)
    x, lengths = ragged(rng, 5, STATIC_T, 6)
    want = reference(encoders["bi"], x, lengths)
    for reuse in (False, True):
        so = ort.SessionOptions()
        so.enable_mem_reuse = reuse
        so.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got = dict(zip(["y", "h_n", "c_n"], session.run(["y", "h_n", "c_n"], {"x": x, "lengths": lengths})))
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=TOL, rtol=0, err_msg=f"{name} reuse={reuse}")


def test_varint_bytes_is_what_varint_reads():
    for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
        data = b"\x01" + varint_bytes(value) + b"\x02"
        assert varint(data, 1) == (value, len(data) - 1), value
    assert varint_bytes(300) == b"\xac\x02"  # protobuf's documented example
