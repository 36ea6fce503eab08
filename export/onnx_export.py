"""Export an `LSTMEncoder` to ONNX, dynamically (native LSTM nodes) or statically (unrolled).

Both paths go through `torch.onnx.export` with the TorchScript exporter (`dynamo=False`): it is
the one exporter in torch 2.13 that turns pack_padded_sequence -> nn.LSTM -> pad_packed_sequence
into native ONNX `LSTM` nodes fed by `sequence_lens` (see README, "Why this exporter").
Files are written atomically: a temporary file in the target folder, then `os.replace`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from export.model import ExportView, LSTMConfig, LSTMEncoder, StatefulExportView, StaticUnrolledLSTM

OPSET = 17  # ORT's CUDA LSTM kernel covers LSTM-14..21; 17 is widely supported
IR_VERSION = 8  # what opset 17 needs; onnxruntime 1.31 loads up to IR 13
INPUT_NAMES = ["x", "lengths"]
OUTPUT_NAMES = ["y", "h_n", "c_n"]
STATE_NAMES = ["h0", "c0"]  # optional initial-state inputs (export_dynamic(initial_state=True))
# Named dims, the same names in code comments, ONNX files and server metadata.
BATCH, TIME = "batch", "time"


@dataclass
class ExportResult:
    path: Path
    seconds: float  # wall time of torch.onnx.export (+ checks and metadata)
    mode: str  # "dynamic" or "static"
    steps: int | None  # static T, None for dynamic


def weights_sha256(model: torch.nn.Module) -> str:
    """A stable hash of the parameters (names, shapes and float32 bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_metadata(
    module: torch.nn.Module,
    config: LSTMConfig,
    mode: str,
    steps: int | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """`module` is what the parameter count and weights hash cover (encoder or whole classifier)."""
    meta = {
        "lstm.config": config.to_json(),
        "lstm.param_count": str(sum(p.numel() for p in module.parameters())),
        "lstm.export_mode": mode,
        "lstm.static_length": str(steps) if steps is not None else "",
        "lstm.torch_version": torch.__version__,
        "lstm.onnx_version": onnx.__version__,
        "lstm.opset": str(OPSET),
        "lstm.weights_sha256": weights_sha256(module),
        "lstm.semantics": "dynamic_rnn: y zero past lengths; h_n/c_n at last valid step",
    }
    meta.update(extra or {})
    return meta


@contextlib.contextmanager
def _atomic_path(final: Path):
    """Yield a temp path next to `final`; move it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def _finish(tmp: Path, metadata: dict[str, str]) -> None:
    model = onnx.load(str(tmp))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.ir_version = IR_VERSION
    model.producer_name = "lstm-serve"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp))


def _export(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    dynamic_axes: dict,
    output_names: list[str] = OUTPUT_NAMES,
    input_names: list[str] = INPUT_NAMES,
) -> None:
    with warnings.catch_warnings():
        # Known, harmless for this model: the deprecation of the TorchScript exporter (we pin
        # torch), and the hint about h0/c0 (our initial states are built from the batch dim).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*variable length with LSTM.*")
        # pad_packed_sequence checks `total_length < max_seq_length` in Python; the tracer
        # freezes it as False, which holds for every valid input (lengths <= T).
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _write(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    axes: dict,
    source: torch.nn.Module,
    config: LSTMConfig,
    steps: int | None,
    extra: dict[str, str] | None,
    input_names: list[str] = INPUT_NAMES,
    output_names: list[str] = OUTPUT_NAMES,
) -> ExportResult:
    """Export `module` to `path` atomically, with the metadata of `source` (whose weights it runs);
    the seconds cover the export, the checks and the metadata."""
    mode = "dynamic" if steps is None else "static"
    start = time.perf_counter()
    with _atomic_path(path) as tmp, torch.no_grad():
        _export(module, args, tmp, axes, output_names, input_names)
        _finish(tmp, build_metadata(source, config, mode, steps, extra))
    return ExportResult(path, time.perf_counter() - start, mode, steps)


def export_dynamic(
    encoder: LSTMEncoder,
    path: Path,
    extra_metadata: dict[str, str] | None = None,
    initial_state: bool = False,
) -> ExportResult:
    """One native ONNX LSTM node per layer; symbolic batch and time; lengths -> sequence_lens.

    `initial_state`: add inputs h0, c0 (L*D, batch, H) wired to every LSTM node's initial_h and
    initial_c (the server feeds zeros when a client sends none)."""
    cfg = encoder.config
    encoder = encoder.eval()
    batch, steps = 3, 5
    x = torch.zeros(batch, steps, cfg.input_size)
    lengths = torch.tensor([5, 4, 2], dtype=torch.int64)  # sorted: see ExportView
    axes = {
        "x": {0: BATCH, 1: TIME},
        "lengths": {0: BATCH},
        "y": {0: BATCH, 1: TIME},
        "h_n": {1: BATCH},
        "c_n": {1: BATCH},
    }
    args: tuple = (x, lengths)
    module: torch.nn.Module = ExportView(encoder)
    input_names = INPUT_NAMES
    if initial_state:
        state = torch.zeros(cfg.num_layers * cfg.num_directions, batch, cfg.hidden_size)
        args = (x, lengths, state, state.clone())
        module = StatefulExportView(encoder)
        axes.update({"h0": {1: BATCH}, "c0": {1: BATCH}})
        input_names = INPUT_NAMES + STATE_NAMES
    extra = {"lstm.initial_state": "h0,c0" if initial_state else "", **(extra_metadata or {})}
    return _write(module, args, path, axes, encoder, cfg, None, extra, input_names=input_names)


def export_static(
    encoder: LSTMEncoder, steps: int, path: Path, extra_metadata: dict[str, str] | None = None
) -> ExportResult:
    """One cell per step per layer per direction over a fixed time axis of `steps`."""
    cfg = encoder.config
    static = StaticUnrolledLSTM(encoder.eval(), steps).eval()
    x = torch.zeros(2, steps, cfg.input_size)
    lengths = torch.tensor([steps, 1], dtype=torch.int64)
    axes = {"x": {0: BATCH}, "lengths": {0: BATCH}, "y": {0: BATCH}, "h_n": {1: BATCH}, "c_n": {1: BATCH}}
    return _write(static, (x, lengths), path, axes, encoder, cfg, steps, extra_metadata)


CLASSIFIER_OUTPUTS = ["logits", "probs"]


def export_classifier(
    classifier: torch.nn.Module,
    path: Path,
    steps: int | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> ExportResult:
    """A SequenceClassifier: dynamic (native LSTM, symbolic batch/time) or static over `steps`."""
    from export.classifier import ClassifierExportView, StaticClassifier

    cfg = classifier.config
    classifier = classifier.eval()
    if steps is None:
        module: torch.nn.Module = ClassifierExportView(classifier)
        x = torch.zeros(3, 5, cfg.input_size)
        lengths = torch.tensor([5, 4, 2], dtype=torch.int64)
        axes = {"x": {0: BATCH, 1: TIME}, "lengths": {0: BATCH}, "logits": {0: BATCH}, "probs": {0: BATCH}}
    else:
        module = StaticClassifier(classifier, steps).eval()
        x = torch.zeros(2, steps, cfg.input_size)
        lengths = torch.tensor([steps, 1], dtype=torch.int64)
        axes = {"x": {0: BATCH}, "lengths": {0: BATCH}, "logits": {0: BATCH}, "probs": {0: BATCH}}
    extra = {
        "classifier.num_classes": str(classifier.num_classes),
        "classifier.normalisation": "inside the graph: (x - mean) / std of the training set",
        **(extra_metadata or {}),
    }
    return _write(module, (x, lengths), path, axes, classifier, cfg, steps, extra, output_names=CLASSIFIER_OUTPUTS)


def read_metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def config_from_metadata(meta: dict[str, str]) -> LSTMConfig:
    return LSTMConfig.from_json(meta["lstm.config"])


def describe(path: Path) -> dict[str, object]:
    """Node counts and byte split of an exported file (weights = initializers + constants)."""
    model = onnx.load(str(path), load_external_data=True)
    weight_bytes = sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    weight_bytes += onnx.numpy_helper.to_array(attr.t).nbytes
    folder_bytes = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "bytes_total": folder_bytes,
        "bytes_weights": weight_bytes,
        "bytes_graph": folder_bytes - weight_bytes,
        "nodes": len(model.graph.node),
        "ops": json.dumps(dict(sorted(ops.items()))),
    }
