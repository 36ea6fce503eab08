"""ONNX Runtime sessions: execution-provider choice and one loaded model version.

Provider choice is deliberate: onnxruntime-gpu lists CUDAExecutionProvider even where no GPU
exists and then falls back to CPU with an error log. `auto` first checks that the CUDA driver
library loads at all, then creates a real CUDA session and keeps CUDA only if the session
reports it in `get_providers()`.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from contract import metadata
from contract.cuda import cuda_usable
from contract.graphs import LARGE_GRAPH_NODES, memory_reuse
from contract.onnxfile import fields, graph_nodes
from server.arena import released_soon, shared_arena, shared_arena_shrink, shrink_options, uses_shared_arena
from server.dtypes import DATATYPES, to_bytes_array
from server.errors import Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted, StartupError, clip
from server.memory import batch_and_time, run_options, working_bytes
from server.osthread import name_os_thread, named
from server.signature import Signature, SignatureError, TensorSpec
from server.signature import build as build_signature

if TYPE_CHECKING:
    from server.batcher import BatchPolicy

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
    max_run_s: float = 0.0  # a run of ONNX Runtime is stopped after this many seconds (0: no cap)

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


def select_providers(options: RuntimeOptions) -> Providers:
    device = options.device.strip().lower()
    log.info("%s", describe_threads(options))
    if device == "cpu":
        return Providers(("CPUExecutionProvider",), "CPUExecutionProvider")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device != "auto" and not match:
        raise StartupError(f"--device {options.device!r}: expected auto, cpu, cuda or cuda:N")
    device_id = int(match.group(1) or 0) if match else 0
    ok, why = cuda_usable(device_id, options.cuda_tf32)
    if ok:
        cuda = ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": int(options.cuda_tf32)})
        return Providers((cuda, "CPUExecutionProvider"), "CUDAExecutionProvider")
    if device == "auto":
        log.info("device auto: using CPUExecutionProvider (%s)", why)
        return Providers(("CPUExecutionProvider",), "CPUExecutionProvider")
    raise StartupError(f"--device {options.device}: CUDA cannot be used: {why}")


@runtime_checkable
class Runtime(Protocol):
    """What a loaded model version offers the request path: the data plane, validation, the batcher,
    the memory budget, the output-layout probe and the batch-invariance check use nothing else.
    `ModelRuntime` is the implementation (an ONNX Runtime session); a test may pass any object with
    these members (tests/test_dataplane.py runs the data plane on one without ORT)."""

    name: str
    version: int
    signature: Signature
    export_metadata: dict[str, str]  # the file's metadata_props (`lstm.*`: contract.metadata)
    repo_config: dict  # <model>/config.json or config.pbtxt as read ({} when absent)
    policy: BatchPolicy | None  # the model's batching policy, set at load (None: the server's)
    batcher: object | None  # the data plane's Batcher once created; False once retired
    retired: bool  # replaced or unloaded: requests that still hold it run alone
    output_layout: dict  # {output: ['batch'|'time'|size, ...]} probed at load ({} when unknown)
    batch_invariance: str  # alone vs merged, measured at load ("" when not measured)
    bounded: bool  # run time bounded by the inputs' sizes: may run on the event loop
    lock: threading.Lock  # guards `batcher` and `retired`

    @property
    def static_length(self) -> int | None: ...

    @property
    def batchable(self) -> bool: ...

    def run(
        self, feeds: dict[str, np.ndarray], outputs: list[str], control: RunControl | None = None
    ) -> dict[str, np.ndarray]: ...


@dataclass
class ModelRuntime:
    """One loaded model version: its ORT session and its signature (what it takes and returns); the
    `Runtime` the request path uses."""

    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    signature: Signature
    export_metadata: dict[str, str]
    provider: str
    repo_config: dict  # <model>/config.json or config.pbtxt as read ({} when absent)
    policy: BatchPolicy | None = None  # the BatchPolicy (server defaults + this model's config), set at load
    batcher: object | None = None  # created by the data plane on first use when batching is on
    retired: bool = False  # replaced or unloaded: requests that still hold it run alone
    output_layout: dict = field(default_factory=dict)  # {output: ['batch'|'time'|size, ...]} probed at load
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    provider_note: str = ""  # where part of the graph runs elsewhere than `provider` (int8 LSTM on CUDA)
    batch_invariance: str = ""  # alone vs merged, measured at load (server.invariance): ModelConfig says it
    # run time bounded by the inputs' sizes (`bounded_by_input_size`), decided at load: only such a
    # version may run on the event loop; `unbounded_why` says why not
    bounded: bool = False
    unbounded_why: str = ""
    max_run_s: float = 0.0  # --max-run-s: every run of this version is stopped after this long (0: no cap)
    # CPU memory from ONNX Runtime's shared capped arena (`server.arena.uses_shared_arena`), not its own
    shared_arena: bool = False
    # the feeds and one output of this version's first small run (its load probe): rerun to shrink its own
    # arena once a large run's outputs are dropped (`_shrink_own_arena`)
    _small_run: tuple | None = field(default=None, repr=False)

    def retire(self) -> None:
        """This version was replaced or unloaded: close its batcher (queued requests still run, then
        its threads exit); requests that still hold it run alone."""
        with self.lock:
            self.retired = True
            if self.batcher:
                self.batcher.close()
            self.batcher = False

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.signature.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.signature.outputs

    @property
    def output_names(self) -> list[str]:
        return self.signature.output_names

    @property
    def static_length(self) -> int | None:
        return self.signature.static_length

    @property
    def batchable(self) -> bool:
        """Requests to this version may be merged (see Signature.batching_rule)."""
        return self.signature.batching_rule != "none"

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str], control: RunControl | None = None
            ) -> dict[str, np.ndarray]:  # fmt: skip
        """Run once on complete feeds (every input the session needs). A static model's ragged
        input is padded to its fixed T and outputs with a time axis are cut back; config.pbtxt
        `reshape`s are applied both ways; string outputs come back as bytes objects. `control`:
        lets another thread stop the run (a cancelled call) and carries the client's deadline;
        the run is also stopped after `max_run_s`."""
        sig = self.signature
        feeds = dict(feeds)
        steps = None
        if sig.ragged is not None:
            x = feeds[sig.ragged]
            spec = sig.input(sig.ragged)
            steps = x.shape[spec.time_axis]
            if sig.static_length is not None and steps != sig.static_length:
                pad = list(x.shape)
                pad[spec.time_axis] = sig.static_length - steps
                feeds[sig.ragged] = np.concatenate([x, np.zeros(pad, x.dtype)], axis=spec.time_axis)
        for spec in sig.all_inputs if sig.checks_values else ():
            if spec.model_shape is not None and spec.name in feeds:
                feeds[spec.name] = reshape(feeds[spec.name], spec.model_shape, spec.batch_axis)
        options = _run_options(self, feeds)
        shrinks = options is not None  # this run shrinks ONNX Runtime's CPU arena
        watched = None
        if control is not None or self.max_run_s:
            control = control or RunControl()
            options = options or ort.RunOptions()
            control.options = options
            if control.reason is not None:  # stopped before it started
                raise self._stopped(control, 0.0)
            cap = time.monotonic() + self.max_run_s if self.max_run_s else None
            due = [(at, why) for at, why in ((control.deadline, "deadline"), (cap, "cap")) if at is not None]
            if due:
                at, why = min(due)
                watched = (control, at, why)
                WATCHDOG.add(watched)
        started = time.monotonic()
        results = None
        try:
            results = self.session.run(outputs, feeds, options)
        except (OrtFail, OrtInvalidArgument) as exc:  # the model refused these values (a shape it checks)
            if control is not None and control.reason is not None:
                raise self._stopped(control, time.monotonic() - started) from None
            if _ALLOCATION_FAILED.search(str(exc)):
                arena = shared_arena() if self.shared_arena else None
                within = f" within its {arena.describe()}" if arena is not None else ""
                raise ResourceExhausted(
                    f"model '{self.name}': ONNX Runtime could not allocate the memory this run needs{within}; "
                    "send smaller requests (an output sized by input values counts too), or retry later"
                ) from None
            raise InvalidArgument(
                f"model '{self.name}': ONNX Runtime refused this input: {clip(str(exc), 300)}"
            ) from None
        finally:
            if watched is not None:
                WATCHDOG.discard(watched)
            if shrinks:  # and again once its outputs are dropped
                self._shrink_later(results)
        if not shrinks and self.bounded and self._small_run is None:  # small feeds: a small run (bounded)
            self._remember_small_run(feeds, outputs)
        out = {}
        for name, value in zip(outputs, results):
            spec = sig.output(name)
            if spec is not None and spec.model_shape is not None:
                value = reshape(value, spec.shape, spec.batch_axis)
            cut = steps is not None and spec is not None and spec.time_axis is not None
            if cut and value.shape[spec.time_axis] != steps:
                value = value[(slice(None),) * spec.time_axis + (slice(0, steps),)]
            if value.dtype.kind in "OUS":
                value = to_bytes_array(value)
            out[name] = value
        return out

    def _shrink_later(self, results) -> None:
        """After a run that shrank the arena: shrink it again once the run's outputs, which lie in
        it, are dropped (`server.arena.released_soon`). The shared arena shrinks with a run that
        allocates nothing; a session's own arena only with a run of that session: its first small
        run again, whose few bytes land in the arena's first region (never returned anyway)."""
        if self.shared_arena:
            released_soon(results, "shared", shared_arena_shrink())
        elif self._small_run is not None:
            released_soon(results, id(self), self._shrink_own_arena)

    def _remember_small_run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> None:
        if sum(a.nbytes for a in feeds.values()) <= SMALL_RUN_BYTES:
            names = outputs[:1] or self.output_names[:1]
            self._small_run = ({k: np.array(v, copy=True) for k, v in feeds.items()}, names, shrink_options())

    def _shrink_own_arena(self) -> None:
        small = self._small_run
        if small is None:
            return
        feeds, names, options = small
        try:
            self.session.run(names, feeds, options)
        except Exception as exc:  # noqa: BLE001 - never again for this version: the next large run shrinks
            self._small_run = None
            log.warning("%s version %d: rerunning a small run to shrink the arena failed (%s); not tried again",
                        self.name, self.version, clip(str(exc), 200))  # fmt: skip

    def _stopped(self, control: RunControl, elapsed: float) -> Exception:
        if control.reason == "cancelled":
            return Cancelled(f"model '{self.name}': the call was cancelled; its run was stopped after {elapsed:.2f} s")
        if control.reason == "cap":
            return DeadlineExceeded(
                f"model '{self.name}': the run was stopped after {elapsed:.2f} s, the per-run cap "
                f"(--max-run-s {self.max_run_s:g}); send smaller requests"
            )
        return DeadlineExceeded(f"model '{self.name}': the client's deadline passed; its run was stopped after "
                                f"{elapsed:.2f} s")  # fmt: skip


SMALL_RUN_BYTES = 64 << 10  # feeds of at most this many bytes: a run kept to shrink the arena with
_ALLOCATION_FAILED = re.compile(r"Failed to allocate|bad_alloc|Available memory of", re.IGNORECASE)


def _run_options(rt: ModelRuntime, feeds: dict[str, np.ndarray]):
    """RunOptions for one run: a run needing much working memory, and every run of a version whose
    memory is sized by input values, shrinks ONNX Runtime's CPU arena afterwards, so memory a large
    request grew it by is returned (`server.memory.run_options`)."""
    batch, steps = batch_and_time(rt, feeds)
    return run_options(working_bytes(rt, sum(a.nbytes for a in feeds.values()), batch, steps), not rt.bounded)


def reshape(array: np.ndarray, shape: list[int], batch_axis: int | None) -> np.ndarray:
    """`array` to `shape` (-1 at the batch axis: this batch's size)."""
    target = list(shape)
    if batch_axis is not None:
        target[batch_axis] = array.shape[batch_axis] if batch_axis < array.ndim else -1
    return array.reshape(target)


def load_model(
    name: str,
    version: int,
    path: Path,
    providers: Providers,
    options: RuntimeOptions,
    repo_config: dict | None = None,
    nodes: int | None = None,
) -> ModelRuntime:
    """Create the session and its signature; ValueError (starting with the path) when the file
    and its config.pbtxt disagree or the file cannot be served."""
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
    bounded, why = bounded_by_input_size(Path(path))
    shared = uses_shared_arena(bounded)
    if shared:  # CPU allocations from the shared arena with a cap (server.arena.share_ort_arena)
        so.add_session_config_entry("session.use_env_allocators", "1")
    with named(f"ort:{name}:{version}"):  # ONNX Runtime's intra-op threads start now and keep this name
        session = ort.InferenceSession(str(path), so, providers=list(providers.providers))
    meta = dict(session.get_modelmeta().custom_metadata_map)
    config = repo_config or {}
    try:
        signature = build_signature(session, meta, config.get("triton"))
    except SignatureError as exc:
        raise ValueError(f"{path}: {exc}") from None
    unknown = [t.name for t in signature.all_inputs + signature.all_outputs if t.datatype not in DATATYPES]
    if unknown:
        types = {t.name: t.datatype for t in signature.all_inputs + signature.all_outputs}
        raise ValueError(f"{path}: tensor(s) {', '.join(f'{n} ({types[n]})' for n in unknown)} have a type the "
                         f"inference protocol cannot carry (it has {', '.join(DATATYPES)})")  # fmt: skip
    provider = session.get_providers()[0]
    note = ""
    if provider == "CUDAExecutionProvider" and meta.get(metadata.PRECISION) == "int8":
        # ONNX Runtime has no CUDA kernel for com.microsoft.DynamicQuantizeLSTM: those nodes, the bulk
        # of the work, run on the CPU provider (with copies between the two)
        note = "int8 twin: its DynamicQuantizeLSTM nodes run on CPUExecutionProvider (no CUDA kernel)"
        log.info("%s version %d: %s", name, version, note)
    if not bounded:
        arena = shared_arena() if shared else None
        memory = f"; its CPU memory comes from the shared arena, {arena.describe()}" if arena is not None else ""
        log.info("%s version %d: never run on the event loop%s: %s", name, version, memory, why)
    return ModelRuntime(
        shared_arena=shared,
        bounded=bounded,
        unbounded_why=why,
        max_run_s=options.max_run_s,
        name=name,
        version=version,
        path=path,
        session=session,
        signature=signature,
        export_metadata=meta,
        provider=provider,
        repo_config=config,
        provider_note=note,
    )


# -- what a model's run time is bounded by ------------------------------------------------------------
# ONNX operators whose output size or run time is set by the *values* of the listed inputs (not
# their sizes): fed by request data, one small request can ask for any amount of work or memory.
_VALUE_SIZED = {
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Tile": (1,),
    "Expand": (1,),
    "Resize": (2, 3),
    "Upsample": (1,),
    "Pad": (1,),
    "OneHot": (1,),
    "CenterCropPad": (1,),
    "MaxUnpool": (2,),
    "Col2Im": (1, 2),
}
# control flow: a Loop's trip count and condition, a Scan's or an If's subgraphs (which may hold
# any of the above) are not analysed: never treated as bounded
_CONTROL_FLOW = {"Loop", "Scan", "If"}
# ops whose outputs depend on their inputs' shapes only (bounded whatever the values)
_SHAPE_ONLY = {"Shape", "Size"}

_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT = 1, 5, 11
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP, _NODE_DOMAIN = 1, 2, 4, 7
_TENSOR_NAME, _VALUE_INFO_NAME, _MODEL_GRAPH = 8, 1, 7


def _text(buf, start: int, stop: int) -> str:
    return bytes(buf[start:stop]).decode("utf-8", "replace")


def bounded_by_input_size(path: Path) -> tuple[bool, str]:
    """Whether every run of the ONNX file at `path` does work bounded by its inputs' sizes, read
    from the top-level graph: (True, "") or (False, why). Unbounded: control flow (Loop, Scan,
    If), or an operator that sizes its output by an input's values (ConstantOfShape, Range, Tile,
    Expand, Resize, ...) fed by request data rather than by constants or input shapes. A file that
    cannot be read is not bounded. Used for the inline decision (`DataPlane.infer_async`): only a
    bounded model may ever run on the event loop."""
    try:
        with Path(path).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graphs = [(s, e) for n, s, e in fields(buf, 0, len(buf)) if n == _MODEL_GRAPH]
            if len(graphs) != 1:
                return False, "no single top-level graph"
            start, stop = graphs[0]
            initializers, inputs, nodes = set(), [], []
            for number, s, e in fields(buf, start, stop):
                if number == _GRAPH_INITIALIZER:
                    initializers |= {_text(buf, a, b) for k, a, b in fields(buf, s, e) if k == _TENSOR_NAME}
                elif number == _GRAPH_INPUT:
                    inputs += [_text(buf, a, b) for k, a, b in fields(buf, s, e) if k == _VALUE_INFO_NAME]
                elif number == _GRAPH_NODE:
                    node = {"in": [], "out": [], "op": "", "domain": ""}
                    for k, a, b in fields(buf, s, e):
                        if k == _NODE_INPUT:
                            node["in"].append(_text(buf, a, b))
                        elif k == _NODE_OUTPUT:
                            node["out"].append(_text(buf, a, b))
                        elif k == _NODE_OP:
                            node["op"] = _text(buf, a, b)
                        elif k == _NODE_DOMAIN:
                            node["domain"] = _text(buf, a, b)
                    nodes.append(node)
    except (OSError, ValueError, IndexError):
        return False, "the graph could not be read"
    data = {name for name in inputs if name not in initializers}  # values a request sets
    for node in nodes:
        op, standard = node["op"], node["domain"] in ("", "ai.onnx")
        if standard and op in _CONTROL_FLOW:
            return False, f"a {op} node (control flow: its work is not bounded by the input sizes)"
        if standard and op in _VALUE_SIZED:
            fed = [node["in"][i] for i in _VALUE_SIZED[op] if i < len(node["in"]) and node["in"][i] in data]
            if fed:
                return False, f"a {op} node sized by the values of '{fed[0]}', which come from the request"
        if not (standard and op in _SHAPE_ONLY) and any(name in data for name in node["in"]):
            data.update(node["out"])
    return True, ""


# -- stopping a run -----------------------------------------------------------------------------------
class RunControl:
    """One ONNX Runtime run that another thread may stop (`stop`): ORT checks its RunOptions'
    terminate flag between kernels and in every Loop iteration. `deadline` (time.monotonic()): the
    watchdog stops the run then (the client's deadline, or the per-run cap)."""

    __slots__ = ("options", "deadline", "reason")

    def __init__(self, deadline: float | None = None) -> None:
        self.options: ort.RunOptions | None = None
        self.deadline = deadline
        self.reason: str | None = None  # "deadline" | "cancelled" | "cap" once stopped

    def stop(self, reason: str) -> None:
        """Stop the run (now, or as soon as it starts); idempotent, any thread."""
        if self.reason is None:
            self.reason = reason
        if self.options is not None:
            self.options.terminate = True


class _Watchdog:
    """One thread that stops runs past their deadline. Runs register while they run (at most the
    threads that run ONNX Runtime), so a scan every TICK_S costs nothing when idle (it then sleeps)."""

    TICK_S = 0.02

    def __init__(self) -> None:
        self._runs: set[tuple[RunControl, float, str]] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, entry: tuple[RunControl, float, str]) -> None:
        with self._cond:
            self._runs.add(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="run-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, entry) -> None:
        with self._cond:
            self._runs.discard(entry)

    def _loop(self) -> None:
        name_os_thread("watchdog")
        while True:
            with self._cond:
                while not self._runs:
                    self._cond.wait()
                now = time.monotonic()
                due = [e for e in self._runs if e[1] <= now]
                for entry in due:
                    self._runs.discard(entry)
            for control, _, reason in due:
                control.stop(reason)
            time.sleep(self.TICK_S)


WATCHDOG = _Watchdog()
