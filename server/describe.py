"""What the server and its models are, described once, in Triton's JSON shape (transport-free).

Server metadata, model metadata (and the bounded `lstm-*` headers this server adds), model config,
readiness, statistics and the repository index, as plain data: the shapes Triton's HTTP/REST API
answers (its protobuf messages as JSON with the original field names, every field without presence
written even at its default, 64-bit integers as numbers, enums by name, submessages and oneof
members only when set). REST sends them as they are; gRPC builds its message from them
(`pb.ModelConfig(**config)`: the field names are the message's).
"""

from __future__ import annotations

import dataclasses
import functools
import json

from contract import metadata
from contract.cli import version
from server import control
from server.dataplane import DataPlane
from server.dtypes import triton_type
from server.proto import grpc_service_pb2 as pb  # the message schema only (protobuf, not gRPC)
from server.signature import TensorSpec
from server.stats import VersionStats

SERVER_NAME = "lstm-serve"
SERVER_VERSION = version()  # the installed distribution's (pyproject.toml's in a checkout)
PLATFORM = "onnxruntime_onnx"
HEADER_MAX, HEADERS_MAX = 1024, 4096  # bytes: one `lstm-*` header, all of them


def server_metadata(extensions: list[str]) -> dict:
    """The server's name, version and the protocol extensions it serves (the frontend's list)."""
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(extensions)}


def model_ready(plane: DataPlane, name: str, version: str, server_ready: bool) -> bool:
    """Ready when the server is (not draining) and the model (version) is loaded; raises NOT_FOUND
    for an unknown model or version and UNAVAILABLE for a known one that is not loaded."""
    plane.repository.get(name, version)
    return server_ready


def model_metadata(plane: DataPlane, name: str, version: str = "") -> tuple[dict, dict[str, str]]:
    """Triton's model metadata ({name, versions, platform, inputs, outputs}) and what this server
    adds (export metadata, provider, batching, axes) as headers (gRPC initial metadata).

    gRPC clients refuse response headers over 16 KB in all (some from ~8 KB), so each header
    stays within 1 KB and all within 4 KB: the file's metadata_props go out as JSON with this
    project's `lstm.*` keys first, then the others while they fit, and `"_omitted"` counting
    the keys left out (ModelConfig's `export.<key>` parameters carry them all); any other
    header that would not fit is left out whole (a cut JSON value would not parse; clients
    treat a missing header as "not sent")."""
    rt = plane.repository.get(name, version)
    entry = plane.repository.entry(name)
    versions = sorted(entry.versions) if entry else [rt.version]
    sig = rt.signature

    def tensors(specs: list[TensorSpec]) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    described = {
        "name": rt.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": tensors(sig.inputs),
        "outputs": tensors(sig.outputs),
    }
    policy = plane.policy_for(rt)
    headers = {
        "lstm-export-metadata": _metadata_json(rt.export_metadata),
        "lstm-provider": rt.provider,
        "lstm-provider-note": rt.provider_note,
        "lstm-precision": rt.export_metadata.get(metadata.PRECISION, ""),
        "lstm-static-length": str(sig.static_length or ""),
        "lstm-model-version": str(rt.version),
        "lstm-batching": json.dumps(dataclasses.asdict(policy), sort_keys=True),
        "lstm-batching-rule": sig.batching_rule,
        "lstm-axes": json.dumps(sig.axes_json(), sort_keys=True),
        "lstm-roles": json.dumps(sig.roles_json(), sort_keys=True),
    }
    return described, _bounded(headers)


def _metadata_json(meta: dict[str, str]) -> str:
    """The export metadata as JSON within HEADER_MAX: `lstm.*` keys first, `_omitted` counting the rest."""
    whole = json.dumps(meta, sort_keys=True)
    if len(whole) <= HEADER_MAX:
        return whole
    kept: dict[str, object] = {}
    omitted = 0
    for key in sorted(meta, key=lambda k: (not k.startswith("lstm."), k)):
        trial = {**kept, key: meta[key], "_omitted": len(meta)}
        # the cheap test first: a large value is never serialized
        if len(key) + len(meta[key]) < HEADER_MAX and len(json.dumps(trial, sort_keys=True)) <= HEADER_MAX:
            kept[key] = meta[key]
        else:
            omitted += 1
    kept["_omitted"] = omitted
    return json.dumps(kept, sort_keys=True)


def _bounded(headers: dict[str, str]) -> dict[str, str]:
    """The headers that fit (each within HEADER_MAX, all within HEADERS_MAX), as gRPC sends them (ASCII)."""
    out: dict[str, str] = {}
    total = 0
    for key, value in headers.items():
        value = value.encode("ascii", "backslashreplace").decode("ascii")
        if len(value) <= HEADER_MAX and total + len(key) + len(value) <= HEADERS_MAX:
            out[key] = value
            total += len(key) + len(value)
    return out


def model_config(plane: DataPlane, name: str, version: str = "") -> dict:
    """Triton's ModelConfig of a model version, in its JSON shape.

    Without a config.pbtxt, max_batch_size is 0: the dims are whole shapes, batch included,
    because the batch axis is not first in every tensor (h0/c0/h_n/c_n are [layers*directions,
    batch, hidden]); the server still merges concurrent requests along each tensor's batch
    axis: dynamic_batching says so when it is on (for stateful models sequence_batching takes
    its place, as upstream allows only one). With a config.pbtxt of max_batch_size > 0 the dims
    leave the batch (axis 0) out, as in the file. Everything else this server knows (export
    metadata, execution provider, static length, axes, the full batching policy) is in
    `parameters`, as strings, keys sorted."""
    rt = plane.repository.get(name, version)
    sig = rt.signature
    policy = plane.policy_for(rt)
    triton = rt.repo_config.get("triton")
    mbs = sig.max_batch_size

    def dims(t: TensorSpec) -> list[int]:
        if mbs > 0 and t.batch_axis is not None:
            return [d for i, d in enumerate(t.shape) if i != t.batch_axis]
        return list(t.shape)

    declared = {}  # what the config.pbtxt (or a load request's config) set that the file does not say
    if triton is not None:
        declared = {("input", c.name): c for c in triton.inputs} | {("output", c.name): c for c in triton.outputs}

    def tensor(t: TensorSpec, output: bool = False) -> dict:
        entry = {"name": t.name, "data_type": triton_type(t.datatype), "dims": dims(t)}
        if t.model_shape is not None:
            shape = t.model_shape if not (mbs > 0 and t.batch_axis is not None) else [
                d for i, d in enumerate(t.model_shape) if i != t.batch_axis]  # fmt: skip
            entry["reshape"] = {"shape": shape}
        given = declared.get(("output" if output else "input", t.name))
        if output:
            if given is not None and given.label_filename:
                entry["label_filename"] = given.label_filename
        else:
            entry["format"] = given.format if given is not None else "FORMAT_NONE"  # image clients read it
            entry["optional"] = t.optional
        return entry

    gpu = rt.provider == "CUDAExecutionProvider"
    config: dict = {
        "name": rt.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": mbs,
        "input": [tensor(t) for t in sig.inputs],
        "output": [tensor(t, True) for t in sig.outputs],
        "instance_group": [
            {
                "name": f"{rt.name}_0",
                "count": policy.instances if policy.enabled else 1,
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
            }
        ],  # fmt: skip
    }
    vp = triton.version_policy if triton is not None else ("all",)
    config["version_policy"] = (
        {"latest": {"num_versions": vp[1]}} if vp[0] == "latest"
        else {"specific": {"versions": list(vp[1])}} if vp[0] == "specific" else {"all": {}}
    )  # fmt: skip
    if sig.stateful:  # one of the two (a oneof upstream); batching stays in `parameters`
        idle_us = triton.idle_us if triton is not None and triton.idle_us else int(plane.sequences.idle_s * 1e6)
        seq: dict = {"max_sequence_idle_microseconds": idle_us}
        implicit = [p for p in sig.states if p.implicit]
        if implicit:
            seq["state"] = []
            for p in implicit:
                spec = sig.input(p.input)
                entry = {"input_name": p.input, "output_name": p.output,
                         "data_type": triton_type(spec.datatype), "dims": dims(spec)}  # fmt: skip
                initial = {"data_type": entry["data_type"], "dims": entry["dims"], "name": f"{p.input}_initial"}
                if p.initial is None:
                    initial["zero_data"] = True
                else:
                    initial["data_file"] = f"{p.input}_initial"
                entry["initial_state"] = [initial]
                seq["state"].append(entry)
        if sig.controls:
            seq["control_input"] = [control.config_entry(c) for c in sig.controls]
        if triton is not None and triton.strategy:
            strategy: dict = {"max_queue_delay_microseconds": policy.max_queue_delay_us}
            if triton.strategy == "oldest":
                strategy["max_candidate_sequences"] = triton.max_sequences
                strategy["preferred_batch_size"] = list(policy.preferred_batch_size)
            seq[triton.strategy] = strategy
        config["sequence_batching"] = seq
    elif policy.enabled:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": policy.max_queue_delay_us}
    params = {f"export.{k}": str(v) for k, v in rt.export_metadata.items()}
    if triton is not None:
        params.update(triton.parameters)
    params["execution_provider"] = rt.provider
    if rt.provider_note:
        params["execution_provider_note"] = rt.provider_note
    if metadata.PRECISION in rt.export_metadata:
        params["precision"] = rt.export_metadata[metadata.PRECISION]
    if sig.static_length is not None:
        params["static_length"] = str(sig.static_length)
    params["axes"] = json.dumps(sig.axes_json(), sort_keys=True)
    params["batching_rule"] = sig.batching_rule
    if rt.batch_invariance:
        params["batch_invariance"] = rt.batch_invariance
    params["roles"] = json.dumps(sig.roles_json(), sort_keys=True)
    params["model_version"] = str(rt.version)
    params.update({f"batching.{k}": json.dumps(v) for k, v in dataclasses.asdict(policy).items()})
    config["parameters"] = {k: {"string_value": v} for k, v in sorted(params.items())}
    return triton_json(pb.ModelConfig.DESCRIPTOR, config)


def statistics(plane: DataPlane, name: str = "", version: str = "") -> dict:
    """Triton's ModelStatistics for one model (version) or all ({"model_stats": [...]}); NOT_FOUND
    for an unknown model. Loaded versions that never ran are listed with zeros, as Triton does."""
    snap = plane.stats.snapshot()
    if name:
        plane.repository.get(name, version)  # NOT_FOUND if unknown
    for model in plane.repository.ready_models():
        entry = plane.repository.entry(model)
        for ver in entry.versions if entry is not None else ():
            snap.setdefault((model, ver), VersionStats())
    stats = []
    for (model, ver), s in sorted(snap.items()):
        if (name and model != name) or (version and str(ver) != version):
            continue
        durations = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
        inference = {f: {"count": getattr(s, f).count, "ns": getattr(s, f).ns} for f in durations}
        batches = sorted(s.batches.items())
        one = {
            "name": model,
            "version": str(ver),
            "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "inference_stats": inference,
            "batch_stats": [{"batch_size": n, "compute_infer": {"count": d.count, "ns": d.ns}} for n, d in batches],
        }
        stats.append(triton_json(pb.ModelStatistics.DESCRIPTOR, one))
    return {"model_stats": stats}


def repository_index(plane: DataPlane, ready_only: bool = False) -> list[dict]:
    """Every model on disk or known, with its state, like Triton's repository index (its `models`)."""
    return [
        {"name": model, "version": version, "state": state, "reason": reason}
        for model, version, state, reason in plane.repository.index()
        if not ready_only or state == "READY"
    ]


def triton_json(descriptor, values: dict) -> dict:
    """`values` (a message of type `descriptor` as JSON, the fields it sets) in the full shape Triton's
    JSON has: fields in declaration order, those without presence (scalars, repeated, maps) written
    even when left at their default, submessages and oneof members only when set. Raises KeyError
    for a key that is no field of the message (a bug here, not a client error)."""
    fields = _fields(descriptor)
    unknown = values.keys() - fields.keys()
    if unknown:
        raise KeyError(f"{descriptor.full_name} has no field(s) {sorted(unknown)}")
    out = {}
    for name, (default, message, value_message) in fields.items():
        if name not in values:
            if default is not None:
                out[name] = default() if callable(default) else default
            continue
        value = values[name]
        if value_message is not None:  # a map of messages
            value = {k: triton_json(value_message, v) for k, v in value.items()}
        elif message is not None:
            value = [triton_json(message, v) for v in value] if isinstance(value, list) else triton_json(message, value)
        out[name] = value
    return out


@functools.cache
def _fields(descriptor) -> dict[str, tuple[object, object, object]]:
    """name -> (default when absent: a value, a factory, or None for "absent"; the message type of a
    message field (None otherwise); the value type of a map of messages (None otherwise))."""
    fields = {}
    for f in descriptor.fields:
        message = f.message_type
        if message is not None and message.GetOptions().map_entry:
            value = message.fields_by_name["value"].message_type
            fields[f.name] = (dict, None, value)
        elif f.is_repeated:
            fields[f.name] = (list, message, None)
        elif message is not None or f.containing_oneof is not None:
            fields[f.name] = (None, message, None)
        elif f.enum_type is not None:
            fields[f.name] = (f.enum_type.values_by_number[f.default_value].name, None, None)
        else:
            fields[f.name] = (f.default_value, None, None)
    return fields
