"""Triton's per-model `config.pbtxt`, parsed with protobuf's text format against Triton's own
ModelConfig messages (copied into protos/grpc_service.proto), so any file Triton reads parses here.

Every field set in the file is in exactly one of three lists:

- READ (acts on it): `name`, `platform`, `backend`, `default_model_filename` ("model.onnx" only),
  `max_batch_size`, `input` / `output` (`name`, `data_type`, `dims`, `optional`, `reshape`;
  `input.format`, kept and echoed for clients that read it; `output.label_filename`, the labels
  of Triton's classification extension, read when the model loads),
  `dynamic_batching` (`max_queue_delay_microseconds`, `preferred_batch_size`),
  `sequence_batching` (`max_sequence_idle_microseconds`, `state` with `initial_state`
  `zero_data` / `data_file`, `control_input` (server/control.py), the `direct` / `oldest`
  strategies with their `max_queue_delay_microseconds`, `direct.minimum_slot_utilization` (the
  wait ends once that share of max_batch_size rows is queued; 0: no wait, as in Triton),
  `oldest.max_candidate_sequences` and `oldest.preferred_batch_size`), `instance_group`
  (`count`, Triton's default when left out: 2 for a CPU group of an onnxruntime model, 1 for a
  GPU group; `kind`, `name`), `version_policy`, `parameters`;
- IGNORED (nothing would change a result; logged once at load): `model_warmup`, the
  `optimization` hints (`graph`, `priority`, `cuda`, pinned memory, ...),
  `dynamic_batching.preserve_ordering` and `oldest.preserve_ordering` (each call
  gets its own answer anyway), `instance_group.rate_limiter` / `profile` / `host_policy`,
  `state.use_same_buffer_for_input_output` / `use_growable_memory`, `response_cache`,
  `metric_tags`, `model_metrics`, `runtime`;
- REFUSED (the model does not load; the message names the field): everything else, e.g.
  `batch_input`, `input.allow_ragged_batch`, `sequence_batching.iterative_sequence`,
  `ensemble_scheduling`, `model_transaction_policy` (decoupled), `optimization.
  execution_accelerators`, `instance_group.gpus`, queue policies. A setting that would change what
  a model computes must not look as if it took effect.

`max_batch_size > 0` is Triton's rule: axis 0 of every tensor is the batch, and `dims` leave it
out. It also caps the sequences of one merged run (`batching.max_batch`), and, with
`dynamic_batching` and `instance_group`, turns batching on for the model (even under
`--no-batching`; merged runs give the same results as single ones). An explicit
`max_batch_size: 0` means no tensor has a batch axis (nothing guessed, nothing merged; zero-size
dims are fine where the model takes them); a file that leaves the field out keeps the server's
own reading of the ONNX file (a free axis 0 splits results, never merged). The tensors' names,
types and shapes are checked against model.onnx when the model loads (server/signature.py).

Files the config names (label files, initial_state data files) must lie inside the model's
folder once links are resolved, and are size-checked before they are read: a file that is
missing, outside, or too large makes the model fail to load, never a later request.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from server import control
from server.control import Control
from server.dtypes import TRITON_TO_OIP, numpy_dtype
from server.errors import InvalidArgument
from server.proto import grpc_service_pb2 as pb

FILENAME = "config.pbtxt"
MAX_BYTES = 1 << 20  # a config.pbtxt larger than this is refused before it is read
MAX_LABEL_BYTES = 1 << 20  # a label file larger than this is refused (ImageNet's 1000 labels: 21 KB)
MODEL_FILENAME = "model.onnx"
MAX_INSTANCES = 64  # concurrent runs of one model (each a thread): more only oversubscribes the CPUs
MAX_DELAY_US = 10_000_000  # a longer wait for company would outlast any client's deadline

# Paths of field names; a message path covers only itself (its fields are listed one by one).
_READ = {
    ("name",), ("platform",), ("backend",), ("default_model_filename",), ("max_batch_size",),
    ("input",), ("input", "name"), ("input", "data_type"), ("input", "dims"), ("input", "optional"),
    ("input", "reshape"), ("input", "reshape", "shape"), ("input", "format"),
    ("output",), ("output", "name"), ("output", "data_type"), ("output", "dims"), ("output", "label_filename"),
    ("output", "reshape"), ("output", "reshape", "shape"),
    ("dynamic_batching",), ("dynamic_batching", "max_queue_delay_microseconds"),
    ("dynamic_batching", "preferred_batch_size"),
    ("sequence_batching",), ("sequence_batching", "max_sequence_idle_microseconds"),
    ("sequence_batching", "state"), ("sequence_batching", "state", "input_name"),
    ("sequence_batching", "state", "output_name"), ("sequence_batching", "state", "data_type"),
    ("sequence_batching", "state", "dims"), ("sequence_batching", "state", "initial_state"),
    ("sequence_batching", "state", "initial_state", "data_type"),
    ("sequence_batching", "state", "initial_state", "dims"),
    ("sequence_batching", "state", "initial_state", "zero_data"),
    ("sequence_batching", "state", "initial_state", "data_file"),
    ("sequence_batching", "state", "initial_state", "name"),
    ("sequence_batching", "direct"), ("sequence_batching", "oldest"),
    ("sequence_batching", "control_input"), ("sequence_batching", "control_input", "name"),
    ("sequence_batching", "control_input", "control"), ("sequence_batching", "control_input", "control", "kind"),
    ("sequence_batching", "control_input", "control", "int32_false_true"),
    ("sequence_batching", "control_input", "control", "fp32_false_true"),
    ("sequence_batching", "control_input", "control", "bool_false_true"),
    ("sequence_batching", "control_input", "control", "data_type"),
    ("sequence_batching", "direct", "max_queue_delay_microseconds"),
    ("sequence_batching", "direct", "minimum_slot_utilization"),
    ("sequence_batching", "oldest", "max_candidate_sequences"),
    ("sequence_batching", "oldest", "preferred_batch_size"),
    ("sequence_batching", "oldest", "max_queue_delay_microseconds"),
    ("optimization",),  # a container: what is set inside it is ignored or refused field by field
    ("instance_group",), ("instance_group", "name"), ("instance_group", "count"), ("instance_group", "kind"),
    ("version_policy",), ("version_policy", "latest"), ("version_policy", "latest", "num_versions"),
    ("version_policy", "all"), ("version_policy", "specific"), ("version_policy", "specific", "versions"),
    ("parameters",),
}  # fmt: skip
# A prefix here covers the field and everything inside it.
_IGNORED = {
    ("model_warmup",), ("optimization", "graph"), ("optimization", "priority"),
    ("optimization", "cuda"), ("optimization", "input_pinned_memory"), ("optimization", "output_pinned_memory"),
    ("optimization", "gather_kernel_buffer_threshold"), ("optimization", "eager_batching"),
    ("dynamic_batching", "preserve_ordering"),
    ("sequence_batching", "oldest", "preserve_ordering"),
    ("instance_group", "rate_limiter"), ("instance_group", "profile"), ("instance_group", "host_policy"),
    ("sequence_batching", "state", "use_same_buffer_for_input_output"),
    ("sequence_batching", "state", "use_growable_memory"),
    ("response_cache",), ("metric_tags",), ("model_metrics",), ("runtime",),
}  # fmt: skip
_SUPPORTED = "supported: see server/model_config.py (input, output, max_batch_size, dynamic_batching, "
_SUPPORTED += "sequence_batching with state and control_input, instance_group, version_policy, parameters)"
_KINDS = {
    "CPUExecutionProvider": pb.ModelInstanceGroup.KIND_CPU,
    "CUDAExecutionProvider": pb.ModelInstanceGroup.KIND_GPU,
}


@dataclass(frozen=True)
class TensorConfig:
    """One `input` / `output` entry: `dims` without the batch axis when max_batch_size > 0."""

    name: str
    datatype: str  # OIP name
    dims: tuple[int, ...]
    optional: bool = False
    reshape: tuple[int, ...] | None = None  # the shape the model sees (batch left out likewise)
    format: str = "FORMAT_NONE"  # input.format (FORMAT_NCHW / FORMAT_NHWC): echoed, image clients read it
    label_filename: str = ""  # output.label_filename, relative to the model's folder
    labels: tuple[str, ...] | None = None  # its lines, read at load (None: no label file, or no folder given)


@dataclass(frozen=True)
class StateConfig:
    """One `sequence_batching.state`: the server feeds `input_name` and keeps `output_name`."""

    input_name: str
    output_name: str
    datatype: str
    dims: tuple[int, ...]
    initial_file: Path | None = None  # initial_state.data_file (raw bytes); None: zeros


@dataclass
class TritonConfig:
    max_batch_size: int = 0
    batch_declared: bool = False  # max_batch_size is written in the file (an explicit 0: no batch axis)
    inputs: list[TensorConfig] = field(default_factory=list)
    outputs: list[TensorConfig] = field(default_factory=list)
    sequence: bool = False  # sequence_batching given
    idle_us: int = 0  # max_sequence_idle_microseconds (0: the server's --sequence-idle-s)
    states: list[StateConfig] = field(default_factory=list)
    controls: list[Control] = field(default_factory=list)  # sequence_batching.control_input
    strategy: str = ""  # "direct" | "oldest" ("": none given; Triton's default is direct)
    max_sequences: int = 0  # live sequences at most (oldest.max_candidate_sequences; 0: not set)
    version_policy: tuple = ("all",)  # ("all",) | ("latest", n) | ("specific", (v, ...))
    parameters: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # field paths set but without effect


def _set_fields(message, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every field the text set to a non-default value (a message counts once set)."""
    paths = []
    for descriptor, value in message.ListFields():
        path = (*prefix, descriptor.name)
        paths.append(path)
        if descriptor.message_type is not None and not descriptor.message_type.GetOptions().map_entry:
            items = value if descriptor.is_repeated else [value]
            for item in items:
                paths += _set_fields(item, path)
    return list(dict.fromkeys(paths))


def _oip(where: str, label: str, value: int) -> str:
    name = pb.DataType.Name(value)
    if name not in TRITON_TO_OIP:
        raise InvalidArgument(f"{where}: {label} {name} is not a datatype this server serves")
    return TRITON_TO_OIP[name]


def _dims(where: str, label: str, dims) -> tuple[int, ...]:
    out = tuple(int(d) for d in dims)
    if any(d < -1 for d in out):
        raise InvalidArgument(f"{where}: {label} {list(out)}: a dim is a size >= 0 or -1 (variable)")
    return out


def parse(text: str, model: str, provider: str = "", folder: Path | None = None, source: str = FILENAME) -> dict:
    """config.pbtxt text -> {"triton": TritonConfig, "batching": {...} (when any batching field is
    set)}; InvalidArgument naming the model, the source and the field when a field is unknown,
    refused or out of range. `provider`: the execution provider the server runs models on ("" =
    do not check instance_group kind); `folder`: the model's folder (label and state data files
    are checked and read from it; None: not checked); `source`: where the text came from, for
    messages (the file's name, or e.g. "load parameter 'config'")."""
    where = f"model '{model}' {source}"
    config = pb.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        detail = re.sub(r"^\d+:\d+ : ", "", str(exc)).rstrip(".")
        unknown = re.fullmatch(r'Message type "inference\.(\w+)" has no field named "(\w+)"', detail)
        if unknown:
            inside = "" if unknown.group(1) == "ModelConfig" else f" in {unknown.group(1)}"
            detail = f"unknown field '{unknown.group(2)}'{inside} (not in Triton's ModelConfig)"
        line = f"line {exc.GetLine()}: " if exc.GetLine() else ""
        if len(detail) > 300:  # protobuf quotes the offending text: bounded
            detail = f"{detail[:300]}...(+{len(detail) - 300} chars)"
        raise InvalidArgument(f"{where}: {line}{detail}") from None
    paths = _set_fields(config)
    ignored = [p for p in paths if any(p[: len(i)] == i for i in _IGNORED)]
    refused = [p for p in paths if p not in _READ and p not in ignored]
    top = [p for p in refused if not any(p[:n] in refused for n in range(1, len(p)))]
    if top:
        raise InvalidArgument(
            f"{where}: unsupported field(s) {', '.join('.'.join(p) for p in top)} (they would change what the "
            f"model computes or how it is scheduled, and this server does not implement them); {_SUPPORTED}"
        )
    ignored_top = [p for p in ignored if not any(p[:n] in ignored for n in range(1, len(p)))]
    if config.name and config.name != model:
        raise InvalidArgument(f"{where}: name '{config.name}' is not the model's folder name '{model}'")
    if config.platform not in ("", "onnxruntime_onnx"):
        raise InvalidArgument(f"{where}: platform '{config.platform}': this server runs onnxruntime_onnx only")
    if config.backend not in ("", "onnxruntime"):
        raise InvalidArgument(f"{where}: backend '{config.backend}': this server runs onnxruntime only")
    if config.default_model_filename not in ("", MODEL_FILENAME):
        raise InvalidArgument(
            f"{where}: default_model_filename '{config.default_model_filename}': each version's file must be "
            f"<version>/{MODEL_FILENAME}"
        )
    triton = TritonConfig(ignored=sorted(".".join(p) for p in ignored_top))
    if config.max_batch_size < 0:
        raise InvalidArgument(f"{where}: max_batch_size must be >= 0, got {config.max_batch_size}")
    triton.max_batch_size = config.max_batch_size
    # proto3 cannot tell an explicit 0 from a field left out: the text can
    triton.batch_declared = re.search(r"(?m)^[^#\n]*\bmax_batch_size\s*:", text) is not None
    for kind, entries, target in (("input", config.input, triton.inputs), ("output", config.output, triton.outputs)):
        seen = set()
        for i, t in enumerate(entries):
            label = f"{kind}[{i}]"
            if not t.name:
                raise InvalidArgument(f"{where}: {label} has no name")
            if t.name in seen:
                raise InvalidArgument(f"{where}: {kind} '{t.name}' is listed twice")
            seen.add(t.name)
            datatype = _oip(where, f"{kind} '{t.name}' data_type", t.data_type)
            dims = _dims(where, f"{kind} '{t.name}' dims", t.dims)
            reshape = _dims(where, f"{kind} '{t.name}' reshape", t.reshape.shape) if t.HasField("reshape") else None
            extra: dict = {}
            if kind == "input":
                extra["format"] = pb.ModelInput.Format.Name(t.format)
                if t.format != pb.ModelInput.FORMAT_NONE and len(dims) != 3:
                    raise InvalidArgument(  # Triton's rule: an image is 3 dims (C, H, W or H, W, C)
                        f"{where}: input '{t.name}' format {extra['format']} needs 3 dims (batch left out), got "
                        f"{list(dims)}"
                    )
            elif t.label_filename:
                extra["label_filename"] = t.label_filename
                if folder is not None:
                    extra["labels"] = _labels(where, t.name, folder, t.label_filename)
            target.append(TensorConfig(t.name, datatype, dims, getattr(t, "optional", False), reshape, **extra))
    batching: dict = {}
    if config.max_batch_size > 0:
        batching["max_batch"] = config.max_batch_size
    if config.HasField("dynamic_batching"):
        dyn = config.dynamic_batching
        if dyn.max_queue_delay_microseconds > MAX_DELAY_US:
            raise InvalidArgument(
                f"{where}: dynamic_batching.max_queue_delay_microseconds {dyn.max_queue_delay_microseconds}: "
                f"at most {MAX_DELAY_US} (10 s)"
            )
        if dyn.max_queue_delay_microseconds > 0:
            batching["max_queue_delay_us"] = dyn.max_queue_delay_microseconds
        _preferred(where, "dynamic_batching", dyn.preferred_batch_size, config.max_batch_size, batching)
    if config.HasField("sequence_batching"):
        seq = config.sequence_batching
        triton.sequence = True
        triton.idle_us = seq.max_sequence_idle_microseconds
        triton.controls = control.parse(where, seq)
        triton.strategy = seq.WhichOneof("strategy_choice") or ""
        strategy = getattr(seq, triton.strategy) if triton.strategy else None
        if strategy is not None:
            delay = strategy.max_queue_delay_microseconds
            if delay > MAX_DELAY_US:
                raise InvalidArgument(
                    f"{where}: sequence_batching.{triton.strategy}.max_queue_delay_microseconds {delay}: at most "
                    f"{MAX_DELAY_US} (10 s)"
                )
            if triton.strategy == "direct":
                # Triton: a run waits (up to the delay) only while fewer than this share of the slots
                # (max_batch_size rows) are ready; 0, the default, runs as soon as one is
                share = seq.direct.minimum_slot_utilization
                if not 0 <= share <= 1:
                    raise InvalidArgument(
                        f"{where}: sequence_batching.direct.minimum_slot_utilization {share:g}: must be in 0..1"
                    )
                rows = math.ceil(share * max(1, config.max_batch_size))
                if share > 0 and delay > 0:
                    batching["max_queue_delay_us"] = delay
                    batching["ready_rows"] = max(1, rows)
            elif delay > 0:
                batching["max_queue_delay_us"] = delay
        if triton.strategy == "oldest":
            if seq.oldest.max_candidate_sequences < 0:
                raise InvalidArgument(
                    f"{where}: sequence_batching.oldest.max_candidate_sequences must be >= 1, got "
                    f"{seq.oldest.max_candidate_sequences}"
                )
            triton.max_sequences = seq.oldest.max_candidate_sequences
            label = "sequence_batching.oldest"
            _preferred(where, label, seq.oldest.preferred_batch_size, config.max_batch_size, batching)
        names: set[str] = set()
        for i, s in enumerate(seq.state):
            label = f"sequence_batching.state[{i}]"
            if not s.input_name or not s.output_name:
                raise InvalidArgument(f"{where}: {label} needs input_name and output_name")
            if s.input_name in names or s.output_name in names:
                raise InvalidArgument(f"{where}: {label}: a state tensor may appear in one state only")
            names |= {s.input_name, s.output_name}
            datatype = _oip(where, f"{label}.data_type", s.data_type)
            dims = _dims(where, f"{label}.dims", s.dims)
            if len(s.initial_state) > 1:
                raise InvalidArgument(f"{where}: {label}: at most one initial_state")
            data_file = None
            for init in s.initial_state:
                given = tuple(int(d) for d in init.dims) or dims
                fits = len(given) == len(dims) and all(d == g or d == -1 for d, g in zip(dims, given))
                if not fits or any(g < 0 for g in given) or init.data_type not in (0, s.data_type):
                    raise InvalidArgument(
                        f"{where}: {label}.initial_state: data_type must be the state's and dims fixed sizes "
                        f"within the state's ({pb.DataType.Name(s.data_type)} {list(dims)}), got "
                        f"{pb.DataType.Name(init.data_type)} {list(given)}"
                    )
                dims = given  # Triton: the initial state's dims make a variable state dim concrete
                if init.WhichOneof("state_data") == "data_file":
                    nbytes = math.prod(dims) * numpy_dtype(datatype).itemsize
                    data_file = _initial_file(where, label, folder, init.data_file, nbytes)
            if any(d < 0 for d in dims):
                raise InvalidArgument(
                    f"{where}: {label}.dims {list(dims)}: a variable dim needs an initial_state with fixed dims "
                    "(the shape a sequence starts with)"
                )
            triton.states.append(StateConfig(s.input_name, s.output_name, datatype, dims, data_file))
    if config.instance_group:
        count = 0
        for i, group in enumerate(config.instance_group):
            label = f"instance_group[{i}]"
            if group.count < 0:
                raise InvalidArgument(f"{where}: {label}.count must be >= 1, got {group.count}")
            count += group.count or _default_count(group.kind, provider)
            kind = pb.ModelInstanceGroup.Kind.Name(group.kind)
            if group.kind == pb.ModelInstanceGroup.KIND_MODEL:
                raise InvalidArgument(f"{where}: {label}.kind {kind} is not supported (KIND_AUTO, KIND_CPU, KIND_GPU)")
            if group.kind != pb.ModelInstanceGroup.KIND_AUTO and provider and _KINDS.get(provider) != group.kind:
                raise InvalidArgument(
                    f"{where}: {label}.kind {kind}, but this server runs every model on {provider} "
                    "(chosen by --device); use KIND_AUTO or leave kind out"
                )
        if count > MAX_INSTANCES:
            raise InvalidArgument(f"{where}: instance_group counts add up to {count}; at most {MAX_INSTANCES}")
        batching["instances"] = count
    if config.HasField("version_policy"):
        choice = config.version_policy.WhichOneof("policy_choice")
        if choice == "latest":
            n = config.version_policy.latest.num_versions
            if n < 1:
                raise InvalidArgument(f"{where}: version_policy.latest.num_versions must be >= 1, got {n}")
            triton.version_policy = ("latest", n)
        elif choice == "specific":
            versions = tuple(int(v) for v in config.version_policy.specific.versions)
            if not versions or any(v < 1 for v in versions):
                raise InvalidArgument(f"{where}: version_policy.specific.versions must list versions >= 1")
            triton.version_policy = ("specific", versions)
    triton.parameters = {k: v.string_value for k, v in config.parameters.items()}
    if batching or config.HasField("dynamic_batching") or config.HasField("sequence_batching"):
        batching["enabled"] = True
    out: dict = {"triton": triton}
    if batching:
        out["batching"] = batching
    return out


def _preferred(where: str, label: str, sizes, max_batch_size: int, batching: dict) -> None:
    """`preferred_batch_size`: batch sizes (rows) a merged run aims for, each 1..max_batch_size."""
    preferred = sorted({int(v) for v in sizes})
    if not preferred:
        return
    if max_batch_size < 1 or preferred[0] < 1 or preferred[-1] > max_batch_size:
        raise InvalidArgument(
            f"{where}: {label}.preferred_batch_size {list(sizes)}: each size must be in 1..max_batch_size "
            f"({max_batch_size}; a model without max_batch_size is never batched by size)"
        )
    batching["preferred_batch_size"] = preferred


def _default_count(kind: int, provider: str) -> int:
    """Triton's instance count when a group leaves `count` out: 2 for a CPU group of an
    onnxruntime model, 1 per GPU (this server drives one device) for a GPU group; KIND_AUTO is
    the GPU when the server runs on one, else the CPU."""
    gpu = kind == pb.ModelInstanceGroup.KIND_GPU or (
        kind == pb.ModelInstanceGroup.KIND_AUTO and provider == "CUDAExecutionProvider"
    )
    return 1 if gpu else 2


def _inside(where: str, what: str, folder: Path, relative: str, max_bytes: int, exact: bool = False) -> Path:
    """`folder`/`relative` resolved (links followed): a regular file inside `folder` of at most
    `max_bytes` (exactly, with `exact`), checked with stat before anything reads it; else
    InvalidArgument naming `what` (the model then fails to load)."""
    root = folder.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError):  # a loop of links
        raise InvalidArgument(f"{where}: {what} cannot be resolved (a loop of links?)") from None
    if not path.is_relative_to(root) or path == root:
        raise InvalidArgument(f"{where}: {what} must name a file inside the model's folder")
    try:
        stat = path.stat()
    except OSError:
        raise InvalidArgument(f"{where}: {what} not found in the model's folder") from None
    if not path.is_file():
        raise InvalidArgument(f"{where}: {what} is not a regular file")
    if exact and stat.st_size != max_bytes:
        raise InvalidArgument(f"{where}: {what} is {stat.st_size} bytes, expected {max_bytes}")
    if stat.st_size > max_bytes:
        raise InvalidArgument(f"{where}: {what} is larger than {max_bytes} bytes")
    return path


def _labels(where: str, output: str, folder: Path, filename: str) -> tuple[str, ...]:
    """The lines of `output`'s label file (Triton's classification labels: line i names class i)."""
    what = f"output '{output}' label_filename {filename!r}"
    path = _inside(where, what, folder, filename, MAX_LABEL_BYTES)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_LABEL_BYTES + 1)
    except OSError:
        raise InvalidArgument(f"{where}: {what} cannot be read") from None
    if len(raw) > MAX_LABEL_BYTES:  # grew after the check
        raise InvalidArgument(f"{where}: {what} is larger than {MAX_LABEL_BYTES} bytes")
    lines = raw.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return tuple(line.rstrip("\r") for line in lines)


def _initial_file(where: str, label: str, folder: Path | None, name: str, nbytes: int) -> Path:
    """Triton reads initial_state.data_file from <model>/initial_state/<name>: raw values of the
    state's dims, so exactly `nbytes` long (checked before it is read, when the model loads)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidArgument(f"{where}: {label}.initial_state.data_file must be a file name, got {name!r}")
    if folder is None:
        return Path("initial_state") / name
    what = f"{label}.initial_state.data_file initial_state/{name}"
    return _inside(where, what, folder, os.path.join("initial_state", name), nbytes, exact=True)


def read(folder: Path, model: str, provider: str = "") -> dict | None:
    """The parsed <folder>/config.pbtxt (see `parse`), None when there is no such file."""
    path = folder / FILENAME
    if not path.is_file():
        return None
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise InvalidArgument(f"model '{model}' {FILENAME}: a link to a file outside the model's folder")
    try:
        if path.stat().st_size > MAX_BYTES:  # before reading it
            raise InvalidArgument(f"model '{model}' {FILENAME}: larger than {MAX_BYTES} bytes")
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
        if len(raw) > MAX_BYTES:  # grew after the check
            raise InvalidArgument(f"model '{model}' {FILENAME}: larger than {MAX_BYTES} bytes")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"model '{model}' {FILENAME}: cannot be read as UTF-8 text ({type(exc).__name__})"
        ) from None
    return parse(text, model, provider, folder)
