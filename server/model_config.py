"""Triton's per-model `config.pbtxt`, read with protobuf's text format against the project's own
ModelConfig (protos/grpc_service.proto, a subset of Triton's), and mapped onto what a per-model
`config.json` says: `{"batching": {...}}` (the fields of server.batcher.BatchPolicy).

What is read, and what it means here:

- `max_batch_size: N` (N >= 1): at most N sequences in one merged run (`batching.max_batch`);
  0 or absent: the server's `--max-batch`.
- `dynamic_batching { max_queue_delay_microseconds: D }`: the oldest request waits at most D µs
  for company (`batching.max_queue_delay_us`; 0 or absent: the server's `--max-queue-delay-us`).
  `preferred_batch_size` is accepted only as `[max_batch_size]`: the batcher always aims for
  max_batch_size (what Triton does with no preferred size); other sizes are refused, not ignored.
- `instance_group [{ count: C kind: ... }]`: C concurrent runs (`batching.instances`; counts of
  several groups add up). `kind` KIND_AUTO, or KIND_CPU/KIND_GPU when it is the device the server
  runs every model on (`--device`); `gpus` is refused (one device per server).
- `name` (must be the folder's name), `platform: "onnxruntime_onnx"`, `backend: "onnxruntime"`:
  checked, nothing else to do.

The first three are the batcher's settings, so a file that sets any of them turns batching on for its model
(`batching.enabled`), even under `--no-batching` (merged runs give the same results as single ones;
only the scheduling differs). A file with none of them leaves the model on `--batching`. Unlike
Triton, `max_batch_size` without `dynamic_batching` therefore still merges requests.

Every other field, and any field this proto does not have (`input`, `output`, `optimization`,
`sequence_batching`, `version_policy`, ...), refuses the model with a message naming it: a setting
that does nothing must not look as if it did. Tensor names, types and shapes come from model.onnx.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from server.errors import InvalidArgument
from server.proto import grpc_service_pb2 as pb

FILENAME = "config.pbtxt"
MAX_BYTES = 1 << 20

# Fields that are read (each a path of field names); everything else set in the file is refused.
_READ = {
    ("name",),
    ("platform",),
    ("backend",),
    ("max_batch_size",),
    ("dynamic_batching",),
    ("dynamic_batching", "max_queue_delay_microseconds"),
    ("dynamic_batching", "preferred_batch_size"),
    ("instance_group",),
    ("instance_group", "name"),
    ("instance_group", "count"),
    ("instance_group", "kind"),
}
_SUPPORTED = (
    "this server reads max_batch_size, dynamic_batching { max_queue_delay_microseconds, preferred_batch_size }, "
    "instance_group { count, kind }, name, platform and backend (tensors come from model.onnx)"
)
_KINDS = {
    "CPUExecutionProvider": pb.ModelInstanceGroup.KIND_CPU,
    "CUDAExecutionProvider": pb.ModelInstanceGroup.KIND_GPU,
}


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


def parse(text: str, model: str, provider: str = "") -> dict:
    """config.pbtxt text -> {"batching": {...}} (empty when nothing is set); InvalidArgument naming the
    model, the file and the field when a field is unknown, unsupported or out of range. `provider`:
    the execution provider the server runs models on ("" = do not check instance_group kind)."""
    where = f"model '{model}' {FILENAME}"
    config = pb.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        detail = re.sub(r"^\d+:\d+ : ", "", str(exc)).rstrip(".")
        unknown = re.fullmatch(r'Message type "inference\.(\w+)" has no field named "(\w+)"', detail)
        if unknown:
            inside = "" if unknown.group(1) == "ModelConfig" else f" in {unknown.group(1)}"
            detail = f"unsupported field '{unknown.group(2)}'{inside}"
        line = f"line {exc.GetLine()}: " if exc.GetLine() else ""
        raise InvalidArgument(f"{where}: {line}{detail}; {_SUPPORTED}") from None
    paths = _set_fields(config)
    refused = [p for p in paths if p not in _READ]
    # name the outermost refused field only (input, not also input.name, input.dims)
    top = [p for p in refused if not any(p[:n] in refused for n in range(1, len(p)))]
    if top:
        raise InvalidArgument(f"{where}: unsupported field(s) {', '.join('.'.join(p) for p in top)}; {_SUPPORTED}")
    if config.name and config.name != model:
        raise InvalidArgument(f"{where}: name '{config.name}' is not the model's folder name '{model}'")
    if config.platform not in ("", "onnxruntime_onnx"):
        raise InvalidArgument(f"{where}: platform '{config.platform}': this server runs onnxruntime_onnx only")
    if config.backend not in ("", "onnxruntime"):
        raise InvalidArgument(f"{where}: backend '{config.backend}': this server runs onnxruntime only")

    batching: dict = {}
    if config.max_batch_size < 0:
        raise InvalidArgument(f"{where}: max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.max_batch_size > 0:
        batching["max_batch"] = config.max_batch_size
    if config.HasField("dynamic_batching"):
        dyn = config.dynamic_batching
        if dyn.max_queue_delay_microseconds > 0:
            batching["max_queue_delay_us"] = dyn.max_queue_delay_microseconds
        preferred = list(dyn.preferred_batch_size)
        if preferred and (config.max_batch_size < 1 or preferred != [config.max_batch_size]):
            raise InvalidArgument(
                f"{where}: dynamic_batching.preferred_batch_size {preferred} is not supported: the batcher "
                "always aims for max_batch_size (leave preferred_batch_size out, or set it to "
                "[max_batch_size] with max_batch_size set)"
            )
    if config.instance_group:
        count = 0
        for i, group in enumerate(config.instance_group):
            label = f"instance_group[{i}]"
            if group.count < 1:
                raise InvalidArgument(f"{where}: {label}.count must be >= 1, got {group.count}")
            count += group.count
            kind = pb.ModelInstanceGroup.Kind.Name(group.kind)
            if group.kind == pb.ModelInstanceGroup.KIND_MODEL:
                raise InvalidArgument(f"{where}: {label}.kind {kind} is not supported (KIND_AUTO, KIND_CPU, KIND_GPU)")
            if group.kind != pb.ModelInstanceGroup.KIND_AUTO and provider and _KINDS.get(provider) != group.kind:
                raise InvalidArgument(
                    f"{where}: {label}.kind {kind}, but this server runs every model on {provider} "
                    "(chosen by --device); use KIND_AUTO or leave kind out"
                )
        batching["instances"] = count
    if batching or config.HasField("dynamic_batching"):
        batching["enabled"] = True
    return {"batching": batching} if batching else {}


def read(folder: Path, model: str, provider: str = "") -> dict | None:
    """The mapped config of <folder>/config.pbtxt, None when there is no such file."""
    path = folder / FILENAME
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_BYTES:
            raise InvalidArgument(f"model '{model}' {FILENAME}: larger than {MAX_BYTES} bytes")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"model '{model}' {FILENAME}: cannot be read as UTF-8 text ({type(exc).__name__})"
        ) from None
    return parse(text, model, provider)
