"""ONNX Runtime sessions: execution-provider choice and one loaded model version.

Provider choice is deliberate: onnxruntime-gpu lists CUDAExecutionProvider even where no GPU
exists and then falls back to CPU with an error log. `auto` first checks that the CUDA driver
library loads at all, then creates a real CUDA session and keeps CUDA only if the session
reports it in `get_providers()`.
"""

from __future__ import annotations

import base64
import ctypes
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.codec import ONNX_TO_OIP
from server.errors import InvalidArgument, StartupError
from server.onnxfile import graph_nodes

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
    intra_op_threads: int = 0  # 0 = the CPUs this process may use (affinity mask and cgroup quota)
    inter_op_threads: int = 0  # 0 = 1 (the graphs here are sequential)
    graph_optimization: str = "all"
    spinning: bool = False  # ORT's busy-wait between ops: off, the transport shares these cores
    memory_reuse: str = "auto"  # auto | on | off: ORT's memory-reuse planner (see memory_reuse())

    def threads(self) -> tuple[int, int]:
        """(intra, inter) op threads per session, always explicit: ORT's own default (0) sizes
        its pool from the machine's physical cores and pins threads itself, outside the
        process's affinity mask and cgroup quota."""
        return self.intra_op_threads or available_cpus()[0], self.inter_op_threads or 1


def _cgroup_cpus() -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max, or v1 cfs quota/period); None: no quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> tuple[int, str]:
    """How many CPUs this process may really use, and why: the smaller of its affinity mask and
    its cgroup CPU quota (rounded up), at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = _cgroup_cpus()
    count = affinity if quota is None else max(1, min(affinity, math.ceil(quota)))
    why = f"affinity mask {affinity} CPU(s), cgroup quota {'none' if quota is None else f'{quota:g} CPU(s)'}"
    return max(1, count), why


# ORT's memory-reuse planner (SessionOptions.enable_mem_reuse) is super-linear in graph size: on this
# project's static T=50 encoder (8,327 nodes) it is 24 of the 26 s the session takes to create
# (2.0 s with it off), on the T=29 classifier (4,825 nodes) 9 of 10 s; run time and peak memory
# were the same either way (README, "Loading an unrolled graph"). The native-LSTM models have
# under 100 nodes. Above this many nodes `auto` turns the planner off.
LARGE_GRAPH_NODES = 1000


def memory_reuse(mode: str, nodes: int | None) -> bool:
    """Whether a session gets ORT's memory-reuse planner: on|off, or auto = on unless the file's
    top-level graph has more than LARGE_GRAPH_NODES nodes (`nodes`: None when unknown)."""
    if mode in ("on", "off"):
        return mode == "on"
    return nodes is None or nodes <= LARGE_GRAPH_NODES


def describe_threads(options: RuntimeOptions) -> str:
    intra, inter = options.threads()
    source = "--intra-op-threads" if options.intra_op_threads else available_cpus()[1]
    spin = "on" if options.spinning else "off"
    reuse = options.memory_reuse
    if reuse == "auto":
        reuse = f"auto (off for graphs over {LARGE_GRAPH_NODES} nodes)"
    return (
        f"ONNX Runtime threads per session: {intra} intra-op, {inter} inter-op ({source}); spinning {spin}; "
        f"memory-reuse planner {reuse}"
    )


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
    log.info("%s", describe_threads(options))
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
    batch_axis: int | None = None  # the axis named `batch` in the file (or in its lstm.axes metadata)
    time_axis: int | None = None  # the axis named `time`: cut back to each request's T


def _axes_from(shape: list, name: str, recorded: dict) -> tuple[int | None, int | None]:
    """Batch and time axes of one tensor: named symbolic dims first, then the export's `lstm.axes`
    metadata (a static model's time axis has a fixed size, so only the metadata can say)."""
    named = {d: i for i, d in reversed(list(enumerate(shape))) if isinstance(d, str)}
    mine = recorded.get(name, {}) if isinstance(recorded.get(name), dict) else {}
    batch = named.get("batch", mine.get("batch"))
    time = named.get("time", mine.get("time"))
    ok = lambda a: a if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(shape) else None  # noqa: E731
    return ok(batch), ok(time)


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
    state_shape: tuple[int, int] | None = None  # (L*D, H) when the model takes initial-state inputs
    bidirectional: bool = False
    batcher: object | None = None  # set by the data plane when batching is on
    named_axes: bool = True  # False: the file names no axis (batch assumed at 0, served unbatched)
    state_names: tuple[str, ...] = ()  # ("h0", "c0") for an LSTM, ("h0",) for GRU/RNN, () without state

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def output_axes(self) -> dict[str, tuple[int | None, int | None]]:
        """{output: (batch axis, time axis)}, as the file names them."""
        return {o.name: (o.batch_axis, o.time_axis) for o in self.outputs}

    @property
    def batchable(self) -> bool:
        """Requests can be merged only where the file says which axis of every tensor is the batch."""
        return self.named_axes and all(t.batch_axis is not None for t in self.inputs + self.outputs)

    @property
    def state_outputs(self) -> list[str]:
        """The final-state outputs matching the initial-state inputs (h0 -> h_n, c0 -> c_n)."""
        return [n[0] + "_n" for n in self.state_names]

    def run(
        self,
        x: np.ndarray,
        lengths: np.ndarray,
        outputs: list[str],
        h0: np.ndarray | None = None,
        c0: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Run on a padded batch. Static models get x padded to their T; outputs with a time axis
        are cut back to x's T. Models with initial-state inputs get h0 (and c0) (L*D, B, H), zeros
        where not given."""
        steps = x.shape[1]
        if self.static_length is not None and steps != self.static_length:
            pad = np.zeros((x.shape[0], self.static_length - steps, x.shape[2]), np.float32)
            x = np.concatenate([x, pad], axis=1)
        feeds = {"x": x, "lengths": lengths}
        if self.state_shape is not None:
            zeros = np.zeros((self.state_shape[0], x.shape[0], self.state_shape[1]), np.float32)
            given = {"h0": h0, "c0": c0}
            for name in self.state_names:
                feeds[name] = zeros if given[name] is None else given[name]
        results = self.session.run(outputs, feeds)
        out = dict(zip(outputs, results))
        axes = self.output_axes
        for name, value in out.items():
            t = axes[name][1]
            if t is not None and value.shape[t] != steps:
                out[name] = value[(slice(None),) * t + (slice(0, steps),)]
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
    nodes: int | None = None,
) -> ModelRuntime:
    """Create the session; raise with a clear message if the file is not a usable LSTM model."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = options.threads()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if options.spinning else "0")
    so.graph_optimization_level = OPT_LEVELS[options.graph_optimization]
    if nodes is None:  # not read by the caller (or unreadable: ORT will say why)
        nodes = graph_nodes(Path(path))
    so.enable_mem_reuse = memory_reuse(options.memory_reuse, nodes)
    if not so.enable_mem_reuse and options.memory_reuse == "auto":
        log.info(
            "%s: more than %d graph nodes, ONNX Runtime memory-reuse planner off (its cost grows "
            "super-linearly with nodes; --ort-memory-reuse on keeps it)",
            name,
            LARGE_GRAPH_NODES,
        )
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=list(providers.providers))
    meta = dict(session.get_modelmeta().custom_metadata_map)
    try:
        recorded = json.loads(meta.get("lstm.axes") or "{}")
    except ValueError:
        recorded = {}
    recorded = recorded if isinstance(recorded, dict) else {}

    def info(t) -> TensorInfo:
        return TensorInfo(
            t.name, ONNX_TO_OIP.get(t.type, t.type), _dims(t.shape), *_axes_from(t.shape, t.name, recorded)
        )

    inputs = [info(i) for i in session.get_inputs()]
    outputs = [info(o) for o in session.get_outputs()]
    if "lstm.axes" not in meta:  # files exported before lstm.axes existed: y is (batch, time, D*H)
        for t in outputs:
            if t.name == "y" and len(t.shape) == 3 and t.time_axis is None:
                t.time_axis = 1
    named = any(isinstance(d, str) for t in session.get_inputs() + session.get_outputs() for d in t.shape)
    if not named and not recorded:
        # No named dims at all (a file from elsewhere): batch is axis 0 of every tensor, for
        # splitting results; merging requests needs the file's word for it, so it is served unbatched.
        for t in inputs + outputs:
            t.batch_axis = 0 if t.shape else None
    names = [i.name for i in inputs]
    if names[:2] != ["x", "lengths"] or inputs[0].datatype != "FP32" or len(inputs[0].shape) != 3:
        raise ValueError(f"{path}: expected inputs x (FP32, rank 3) and lengths (INT64), got {names}")
    if inputs[1].datatype != "INT64" or len(inputs[1].shape) != 1:
        raise ValueError(
            f"{path}: input lengths must be INT64 of shape [batch], got {inputs[1].datatype} {inputs[1].shape}"
        )
    features = inputs[0].shape[2]
    if features < 1:
        raise ValueError(f"{path}: the feature dim of x must be fixed, got {inputs[0].shape}")
    static = meta.get("lstm.static_length") or ""
    static_length = int(static) if static else (inputs[0].shape[1] if inputs[0].shape[1] > 0 else None)
    in_use = session.get_providers()[0]
    state_shape = None
    state_names: tuple[str, ...] = ()
    if names[2:] in (["h0", "c0"], ["h0"]):
        state_names = tuple(names[2:])
        dims = inputs[2].shape
        if len(dims) != 3 or dims[0] < 1 or dims[2] < 1 or any(i.shape != dims for i in inputs[2:]):
            raise ValueError(
                f"{path}: {'/'.join(state_names)} must be (L*D, batch, H) with fixed L*D and H, got {dims}"
            )
        missing = [n[0] + "_n" for n in state_names if n[0] + "_n" not in [o.name for o in outputs]]
        if missing:
            raise ValueError(f"{path}: a model with inputs {list(state_names)} must output {missing} (the final state)")
        state_shape = (dims[0], dims[2])
    elif len(names) > 2:
        raise ValueError(f"{path}: unexpected inputs {names[2:]} (only h0, or h0 and c0, may follow x, lengths)")
    try:
        bidirectional = bool(json.loads(meta.get("lstm.config") or "{}").get("bidirectional", False))
    except (ValueError, AttributeError):
        bidirectional = False
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
        state_names=state_names,
        named_axes=named or bool(recorded),
    )
