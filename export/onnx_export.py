"""Export a `RecurrentEncoder` (LSTM, GRU or RNN) to ONNX, dynamically (native nodes) or statically (unrolled).

Both paths go through `torch.onnx.export` with the TorchScript exporter (`dynamo=False`): it is
the one exporter in torch 2.13 that turns pack_padded_sequence -> nn.LSTM -> pad_packed_sequence
into native ONNX `LSTM` nodes fed by `sequence_lens` (see docs/export.md); the same
holds for nn.GRU (ONNX `GRU`, linear_before_reset=1) and nn.RNN (ONNX `RNN`, Tanh or Relu).
Files are written atomically: a temporary file in the target folder, checked (`export.verify`:
native recurrent nodes with sequence_lens, parity with eager PyTorch), then `os.replace`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from contract import metadata as keys
from contract.graphs import MAX_STATIC_T
from export.model import ExportView, RecurrentConfig, RecurrentEncoder, StatefulExportView, StaticUnrolledRNN
from export.verify import ExportError, Parity, check_native_recurrence, check_parity

OPSET = 17  # ORT's CUDA LSTM kernel covers LSTM-14..21; 17 is widely supported
IR_VERSION = 8  # what opset 17 needs; onnxruntime 1.31 loads up to IR 13
__all__ = ["ExportError", "ExportResult", "export_dynamic", "export_static", "export_classifier", "write_model"]
INPUT_NAMES = ["x", "lengths"]
OUTPUT_NAMES = ["y", "h_n", "c_n"]  # LSTM; GRU and RNN have no c_n (RecurrentConfig.output_names)
STATE_NAMES = ["h0", "c0"]  # LSTM's initial-state inputs; GRU/RNN take h0 only (RecurrentConfig.state_names)
# Named dims, the same names in code comments, ONNX files and server metadata.
BATCH, TIME = "batch", "time"


@dataclass
class ExportResult:
    path: Path
    seconds: float  # wall time of torch.onnx.export (+ checks and metadata)
    mode: str  # "dynamic" or "static"
    steps: int | None  # static T, None for dynamic
    parity: Parity | None = None  # what the pre-write check measured


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
    config: RecurrentConfig,
    mode: str,
    steps: int | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """`module` is what the parameter count and weights hash cover (encoder or whole classifier)."""
    meta = {
        keys.CONFIG: config.to_json(),
        keys.PARAM_COUNT: str(sum(p.numel() for p in module.parameters())),
        keys.EXPORT_MODE: mode,
        keys.PRECISION: "fp32",  # export.precision writes the int8/fp16 twins, with keys.TWIN_OF
        keys.STATIC_LENGTH: str(steps) if steps is not None else "",
        keys.TORCH_VERSION: torch.__version__,
        keys.ONNX_VERSION: onnx.__version__,
        keys.OPSET: str(OPSET),
        keys.WEIGHTS_SHA256: weights_sha256(module),
        keys.SEMANTICS: "dynamic_rnn: y zero past lengths; h_n/c_n at last valid step",
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
        # mkstemp creates the file 0600; a served file must be readable as any file this user
        # writes is (a server or an image build running as another user): 0666 minus the umask.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without setting it where Linux shows it (os.umask both sets and
    returns, which would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def axes_of(dynamic_axes: dict, time_axes: dict[str, int] | None = None) -> dict:
    """{tensor: {"batch": axis, "time": axis}} from torch's dynamic_axes, plus a static model's fixed
    time axes. Stored as `lstm.axes` so the server knows which axis to merge and trim even where a
    dim has a fixed size (the named symbolic dims say the same for dynamic files)."""
    axes: dict[str, dict[str, int]] = {}
    for tensor, dims in dynamic_axes.items():
        for axis, name in sorted(dims.items()):
            axes.setdefault(tensor, {}).setdefault(name, axis)
    for tensor, axis in (time_axes or {}).items():
        axes.setdefault(tensor, {})[TIME] = axis
    return axes


def _prune(model: onnx.ModelProto, keep: list[str]) -> None:
    """Keep only the graph outputs `keep` and the nodes they need (drop export-only outputs)."""
    outputs = [o for o in model.graph.output if o.name in keep]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    needed = set(keep)
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def _finish(tmp: Path, metadata: dict[str, str], keep_outputs: list[str] | None = None) -> onnx.ModelProto:
    model = onnx.load(str(tmp))
    if keep_outputs is not None:
        _prune(model, keep_outputs)
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.ir_version = IR_VERSION
    model.producer_name = "lstm-serve"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp))
    return model


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
        warnings.filterwarnings("ignore", message=".*variable length with (LSTM|GRU|RNN).*")
        # pad_packed_sequence checks `total_length < max_seq_length` in Python; the tracer
        # freezes it as False, which holds for every valid input (lengths <= T).
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        # nn.GRU/nn.RNN read the first batch size as a Python int (the hidden-state check); the
        # tracer records a constant that is never used by the ONNX graph. Whatever the tracer
        # freezes, the parity gate (export.verify) runs the file on other shapes before it is kept.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with _no_onnx_log():
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


@contextlib.contextmanager
def _no_onnx_log():
    """torch 2.13's TorchScript exporter turns its ONNX log on for every export, verbose or not
    (`setup_onnx_logging` tests the function `_jit_is_onnx_log_enabled`, which is always true), so
    a failing pass prints the whole TorchScript graph ("Torch IR graph at exception: ...", hundreds
    of lines) to stderr, even where the failure is handled (a module that uses only the final
    state, `export.user`). We export with verbose=False: that log is never wanted."""
    real = torch._C._jit_onnx_log
    torch._C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        torch._C._jit_onnx_log = real


def write_model(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    axes: dict,
    source: torch.nn.Module,
    config: RecurrentConfig,
    steps: int | None,
    extra: dict[str, str] | None,
    input_names: list[str] = INPUT_NAMES,
    output_names: list[str] = OUTPUT_NAMES,
    verify: Callable[[Path], Parity] | None = None,
    time_axes: dict[str, int] | None = None,
    keep_outputs: list[str] | None = None,
) -> ExportResult:
    """Export `module` to `path` atomically, with the metadata of `source` (whose weights it runs);
    `verify(tmp_path)` runs before the file is moved into place (ExportError: nothing written).
    The seconds cover the export, the checks and the metadata."""
    mode = "dynamic" if steps is None else "static"
    start = time.perf_counter()
    parity = None
    meta = build_metadata(source, config, mode, steps, extra)
    if steps is not None and time_axes is None:  # the encoders' layout: x and y are (batch, time, ...)
        time_axes = {n: 1 for n in ("x", "y") if n in input_names + output_names}
    kept = axes if keep_outputs is None else {k: v for k, v in axes.items() if k in input_names + keep_outputs}
    meta[keys.AXES] = json.dumps(axes_of(kept, time_axes), sort_keys=True)  # of the file's own tensors
    with _atomic_path(path) as tmp, torch.no_grad():
        _export(module, args, tmp, axes, output_names, input_names)
        model = _finish(tmp, meta, keep_outputs)
        if mode == "dynamic":
            check_native_recurrence(model)
        if verify is not None:
            parity = verify(tmp)
    return ExportResult(path, time.perf_counter() - start, mode, steps, parity)


def encoder_reference(encoder: RecurrentEncoder) -> Callable[..., dict[str, np.ndarray]]:
    """Eager PyTorch as a function of numpy feeds (x, lengths[, h0[, c0]]) -> {output: array}."""
    names = encoder.config.output_names

    def run(x, lengths, h0=None, c0=None):
        tensors = [None if a is None else torch.from_numpy(a) for a in (x, lengths, h0, c0)]
        with torch.no_grad():
            out = encoder(*tensors)
        return {n: o.numpy() for n, o in zip(names, out)}

    return run


def export_dynamic(
    encoder: RecurrentEncoder,
    path: Path,
    extra_metadata: dict[str, str] | None = None,
    initial_state: bool = False,
    verify: bool = True,
) -> ExportResult:
    """One native ONNX LSTM/GRU/RNN node per layer; symbolic batch and time; lengths -> sequence_lens.

    `initial_state`: add inputs h0 (and c0 for LSTM) (L*D, batch, H) wired to every node's
    initial_h (initial_c) (the server feeds zeros when a client sends none). `verify`: check parity
    with the eager encoder before the file is written."""
    cfg = encoder.config
    encoder = encoder.eval()
    batch, steps = 3, 5
    x = torch.zeros(batch, steps, cfg.input_size)
    lengths = torch.tensor([5, 4, 2], dtype=torch.int64)  # sorted: see ExportView
    outputs = cfg.output_names
    axes = {"x": {0: BATCH, 1: TIME}, "lengths": {0: BATCH}, "y": {0: BATCH, 1: TIME}}
    axes.update({name: {1: BATCH} for name in outputs[1:]})
    args: tuple = (x, lengths)
    module: torch.nn.Module = ExportView(encoder)
    input_names = INPUT_NAMES
    states: dict[str, tuple[int, int]] = {}
    if initial_state:
        ld = cfg.num_layers * cfg.num_directions
        states = {name: (ld, cfg.hidden_size) for name in cfg.state_names}
        args = (x, lengths, *(torch.zeros(ld, batch, cfg.hidden_size) for _ in states))
        module = StatefulExportView(encoder)
        axes.update({name: {1: BATCH} for name in states})
        input_names = INPUT_NAMES + list(states)
    extra = {keys.INITIAL_STATE: ",".join(states), **(extra_metadata or {})}
    check = (
        (lambda tmp: check_parity(tmp, encoder_reference(encoder), cfg.input_size, None, states)) if verify else None
    )
    return write_model(
        module, args, path, axes, encoder, cfg, None, extra, input_names, outputs, check if verify else None
    )


def check_static_length(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STATIC_T:
        raise ExportError(
            f"static length T must be an integer 1..{MAX_STATIC_T}, got {steps!r} (an unrolled graph holds T cells "
            "per layer and direction; the dynamic model serves any length)"
        )
    return steps


def export_static(
    encoder: RecurrentEncoder,
    steps: int,
    path: Path,
    extra_metadata: dict[str, str] | None = None,
    verify: bool = True,
) -> ExportResult:
    """One cell per step per layer per direction over a fixed time axis of `steps`."""
    check_static_length(steps)
    cfg = encoder.config
    static = StaticUnrolledRNN(encoder.eval(), steps).eval()
    x = torch.zeros(2, steps, cfg.input_size)
    lengths = torch.tensor([steps, 1], dtype=torch.int64)
    outputs = cfg.output_names
    axes = {"x": {0: BATCH}, "lengths": {0: BATCH}, "y": {0: BATCH}}
    axes.update({name: {1: BATCH} for name in outputs[1:]})
    # ORT's graph optimisation of an unrolled graph is what makes it slow to load; the check
    # compares the arithmetic, so it loads the file unoptimised.
    check = (
        (lambda tmp: check_parity(tmp, encoder_reference(encoder), cfg.input_size, steps, optimization="disable"))
        if verify
        else None
    )
    return write_model(
        static, (x, lengths), path, axes, encoder, cfg, steps, extra_metadata, INPUT_NAMES, outputs, check
    )


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

    def reference(x, lengths):
        with torch.no_grad():
            out = classifier(torch.from_numpy(x), torch.from_numpy(lengths))
        return {n: o.numpy() for n, o in zip(CLASSIFIER_OUTPUTS, out)}

    opt = "all" if steps is None else "disable"
    check = lambda tmp: check_parity(tmp, reference, cfg.input_size, steps, optimization=opt)  # noqa: E731
    return write_model(
        module, (x, lengths), path, axes, classifier, cfg, steps, extra, INPUT_NAMES, CLASSIFIER_OUTPUTS, check
    )


def read_metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def config_from_metadata(meta: dict[str, str]) -> RecurrentConfig:
    return RecurrentConfig.from_json(meta[keys.CONFIG])


def _graphs(graph: onnx.GraphProto):
    """A graph and every subgraph inside it (Loop/If/Scan bodies: an int8 twin runs row by row in a Loop)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def describe(path: Path) -> dict[str, object]:
    """Node counts and byte split of an exported file (weights = initializers + constants), subgraphs
    included."""
    model = onnx.load(str(path), load_external_data=True)
    weight_bytes, nodes = 0, 0
    ops: dict[str, int] = {}
    for graph in _graphs(model.graph):
        weight_bytes += sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)
        for node in graph.node:
            nodes += 1
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        weight_bytes += onnx.numpy_helper.to_array(attr.t).nbytes
    folder_bytes = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    return {
        "bytes_total": folder_bytes,
        "bytes_weights": weight_bytes,
        "bytes_graph": folder_bytes - weight_bytes,
        "nodes": nodes,
        "ops": json.dumps(dict(sorted(ops.items()))),
    }
