"""ONNX Runtime sessions: execution-provider choice and one loaded model version.

Provider choice is deliberate: onnxruntime-gpu lists CUDAExecutionProvider even where no GPU
exists and then falls back to CPU with an error log. `auto` first checks that the CUDA driver
library loads at all, then creates a real CUDA session and keeps CUDA only if the session
reports it in `get_providers()`.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.codec import ONNX_TO_OIP
from server.errors import InvalidArgument, StartupError

log = logging.getLogger(__name__)

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cuda_tf32: bool = False  # TF32 moves LSTM outputs by ~3e-4 on an H100; exact fp32 by default
    intra_op_threads: int = 0  # 0 = ORT default (one per core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"


@dataclass(frozen=True)
class Providers:
    """The provider list handed to every session, and what it means in words."""

    providers: tuple
    kind: str  # "CPUExecutionProvider" or "CUDAExecutionProvider"


# A one-node model (b = a + a, float[1], opset 17, IR 8) used to check that a CUDA session can
# really be created. Stored serialized so that the server needs no `onnx` package at run time;
# tests/test_server.py rebuilds it with onnx.helper and compares.
PROBE_MODEL_B64 = "CAg6OQoOCgFhCgFhEgFiIgNBZGQSBXByb2JlWg8KAWESCgoICAESBAoCCAFiDwoBYhIKCggIARIECgIIAUIECgAQEQ=="


def _probe_model_bytes() -> bytes:
    return base64.b64decode(PROBE_MODEL_B64)


def _cuda_driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _try_cuda(device_id: int, tf32: bool) -> tuple[bool, str]:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDAExecutionProvider"
    if not _cuda_driver_loads():
        return False, "no CUDA driver (libcuda.so.1 does not load): no usable GPU on this machine"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    cuda = ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": int(tf32)})
    try:
        session = ort.InferenceSession(_probe_model_bytes(), opts, providers=[cuda, "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return False, f"CUDA session failed: {exc}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return False, f"CUDA device {device_id} not usable (session fell back to {session.get_providers()})"
    return True, "ok"


def select_providers(options: RuntimeOptions) -> Providers:
    device = options.device.strip().lower()
    if device == "cpu":
        return Providers(("CPUExecutionProvider",), "CPUExecutionProvider")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device != "auto" and not match:
        raise StartupError(f"--device {options.device!r}: expected auto, cpu, cuda or cuda:N")
    device_id = int(match.group(1) or 0) if match else 0
    ok, why = _try_cuda(device_id, options.cuda_tf32)
    if ok:
        cuda = ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": int(options.cuda_tf32)})
        return Providers((cuda, "CPUExecutionProvider"), "CUDAExecutionProvider")
    if device == "auto":
        log.info("device auto: using CPUExecutionProvider (%s)", why)
        return Providers(("CPUExecutionProvider",), "CPUExecutionProvider")
    raise StartupError(f"--device {options.device}: CUDA cannot be used: {why}")


@dataclass
class TensorInfo:
    name: str
    datatype: str  # OIP datatype
    shape: list[int]  # -1 for symbolic dims


@dataclass
class ModelRuntime:
    """One loaded model version: its ORT session and what clients need to know about it."""

    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    export_metadata: dict[str, str]
    static_length: int | None  # T of a statically unrolled model, None when dynamic
    features: int
    provider: str
    model_config: dict  # <model>/config.json (e.g. per-model batching), {} when absent
    state_shape: tuple[int, int] | None = None  # (L*D, H) when the model takes h0/c0 inputs
    bidirectional: bool = False
    batcher: object | None = None  # set by the data plane when batching is on

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def run(
        self,
        x: np.ndarray,
        lengths: np.ndarray,
        outputs: list[str],
        h0: np.ndarray | None = None,
        c0: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Run on a padded batch. Static models get x padded to their T; y is cut back to x's T.
        Models with initial-state inputs get h0/c0 (L*D, B, H), zeros where not given."""
        steps = x.shape[1]
        if self.static_length is not None and steps != self.static_length:
            pad = np.zeros((x.shape[0], self.static_length - steps, x.shape[2]), np.float32)
            x = np.concatenate([x, pad], axis=1)
        feeds = {"x": x, "lengths": lengths}
        if self.state_shape is not None:
            zeros = np.zeros((self.state_shape[0], x.shape[0], self.state_shape[1]), np.float32)
            feeds["h0"] = zeros if h0 is None else h0
            feeds["c0"] = zeros if c0 is None else c0
        results = self.session.run(outputs, feeds)
        out = dict(zip(outputs, results))
        if "y" in out and out["y"].shape[1] != steps:
            out["y"] = out["y"][:, :steps]
        return out

    def check_lengths(self, steps: int) -> None:
        if self.static_length is not None and steps > self.static_length:
            raise InvalidArgument(
                f"input 'x': {steps} time steps, but static model '{self.name}' takes at most "
                f"{self.static_length} (its fixed T); use the dynamic model for longer sequences"
            )


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def load_model(
    name: str,
    version: int,
    path: Path,
    providers: Providers,
    options: RuntimeOptions,
    model_config: dict | None = None,
) -> ModelRuntime:
    """Create the session; raise with a clear message if the file is not a usable LSTM model."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = OPT_LEVELS[options.graph_optimization]
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=list(providers.providers))
    meta = dict(session.get_modelmeta().custom_metadata_map)
    inputs = [TensorInfo(i.name, ONNX_TO_OIP.get(i.type, i.type), _dims(i.shape)) for i in session.get_inputs()]
    outputs = [TensorInfo(o.name, ONNX_TO_OIP.get(o.type, o.type), _dims(o.shape)) for o in session.get_outputs()]
    names = [i.name for i in inputs]
    if names[:2] != ["x", "lengths"] or inputs[0].datatype != "FP32" or len(inputs[0].shape) != 3:
        raise ValueError(f"{path}: expected inputs x (FP32, rank 3) and lengths (INT64), got {names}")
    features = inputs[0].shape[2]
    if features < 1:
        raise ValueError(f"{path}: the feature dim of x must be fixed, got {inputs[0].shape}")
    static = meta.get("lstm.static_length") or ""
    static_length = int(static) if static else (inputs[0].shape[1] if inputs[0].shape[1] > 0 else None)
    in_use = session.get_providers()[0]
    state_shape = None
    if names[2:4] == ["h0", "c0"]:
        dims = inputs[2].shape
        if len(dims) != 3 or dims[0] < 1 or dims[2] < 1 or inputs[3].shape != dims:
            raise ValueError(f"{path}: h0/c0 must be (L*D, batch, H) with fixed L*D and H, got {dims}")
        state_shape = (dims[0], dims[2])
    elif len(names) > 2 and not meta.get("classifier.num_classes"):
        raise ValueError(f"{path}: unexpected inputs {names[2:]} (only h0, c0 may follow x, lengths)")
    bidirectional = '"bidirectional": true' in meta.get("lstm.config", "")
    return ModelRuntime(
        name=name,
        version=version,
        path=path,
        session=session,
        inputs=inputs,
        outputs=outputs,
        export_metadata=meta,
        static_length=static_length,
        features=features,
        provider=in_use,
        model_config=model_config or {},
        state_shape=state_shape,
        bidirectional=bidirectional,
    )
