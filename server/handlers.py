"""What both frontends do alike: the gRPC servicer and the HTTP/REST app are peers that each
turn these into their wire format; neither imports the other.

- `error_status` (from `server.status`, the one mapping): an exception as (gRPC status, HTTP status,
  message);
- `Admission`: inference calls in progress (bounded, refused once a drain starts, awaited by it);
- loading and unloading models (the repository extension's parameters checked once).

What both answer about the server and its models (metadata, config, readiness, statistics, the
repository index) is `server.describe`, in Triton's JSON shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re

from google.protobuf import json_format, text_format

from server import model_config as triton_config
from server.dataplane import DataPlane
from server.errors import InvalidArgument, ResourceExhausted, Unavailable, clip
from server.proto import grpc_service_pb2 as pb
from server.repository import valid_name
from server.status import HTTP_STATUS, error_status  # noqa: F401 - the frontends import them from here

log = logging.getLogger(__name__)
EXTENSIONS = ["classification", "model_repository", "statistics", "binary_tensor_data", "sequence_lens"]
SHARED_MEMORY_EXTENSION = "system_shared_memory"  # listed too while it is on (`extensions`)


class Admission:
    """Inference calls in progress, counted on the event loop (both frontends run there).

    Beyond `limit` calls at once a new one gets RESOURCE_EXHAUSTED (idle or half-open
    connections are not calls: they cost nothing here). Once `refuse()` is called (a drain) new
    calls get UNAVAILABLE with a message, and `wait_idle` waits for the running ones."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refusing = False
        self._idle: asyncio.Event | None = None
        self._refused: asyncio.Event | None = None

    @contextlib.contextmanager
    def call(self):
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """A call starts (refused while draining or at the limit); `leave()` once it ended."""
        if self.refusing:
            raise Unavailable("server is shutting down and takes no new requests; retry (another replica)")
        if self.limit is not None and self.in_flight >= self.limit:
            raise ResourceExhausted(f"{self.in_flight} inference calls in progress: the limit; retry later")
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def refuse(self) -> None:
        """From now on new calls are refused (call on the event loop)."""
        self.refusing = True
        self.refused_event().set()

    def refused_event(self) -> asyncio.Event:
        """Set once calls are refused: streams waiting for their next request end on it."""
        if self._refused is None:
            self._refused = asyncio.Event()
            if self.refusing:
                self._refused.set()
        return self._refused

    async def wait_idle(self, timeout: float) -> int:
        """Wait up to `timeout` s for the calls in progress; returns how many still run."""
        if self.in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        return self.in_flight


def extensions(shared_memory: bool = False) -> list[str]:
    """The protocol extensions served (`system_shared_memory` while it is on)."""
    return EXTENSIONS + [SHARED_MEMORY_EXTENSION] if shared_memory else list(EXTENSIONS)


async def load_model(plane: DataPlane, name: str, parameters: dict | None = None) -> None:
    """(Re)load a model; ONNX Runtime sessions are built on an executor thread, not the loop.

    `parameters`: the load request's, as plain values (both frontends hand them over unchanged).
    `config`: a JSON ModelConfig used for this load instead of the model's config.pbtxt, checked
    exactly as a config.pbtxt is (JSON -> Triton's ModelConfig message -> `model_config.parse`);
    its outputs' label_filename must name files in the model's folder. `file:<path>` (model files
    sent with the request) is refused, as is any other key: nothing may look as if it took effect."""
    parameters = parameters or {}
    for key in parameters:
        if key.startswith("file:"):
            raise InvalidArgument(
                f"load parameter {clip(key)}: 'file:' parameters (model files sent with the load request) are not "
                "supported; put the files in the model repository and load without them"
            )
        if key != "config":
            raise InvalidArgument(
                f"unknown load parameter {clip(key)}; supported: 'config' (a JSON model configuration)"
            )
    config = None
    if "config" in parameters:
        if not valid_name(name):
            raise InvalidArgument(f"model name {clip(name)} is not a model folder name")
        try:
            config = _load_config(plane, name, parameters["config"])
        except InvalidArgument as exc:  # Triton's leading words: its model-control examples match them
            raise InvalidArgument(f"failed to load: {exc.message}") from None
    load = functools.partial(plane.repository.load, name, config)
    await asyncio.get_running_loop().run_in_executor(plane.executor, load)


def _load_config(plane: DataPlane, name: str, text: object) -> dict:
    """The load request's `config` (JSON ModelConfig), parsed as a config.pbtxt is."""
    source = "load parameter 'config'"
    where = f"model '{name}' {source}"
    if not isinstance(text, str):
        raise InvalidArgument(f"{where} must be a string holding a JSON model configuration, got {clip(text)}")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{where} is not valid JSON (line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{where} is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{where} must be a JSON object (Triton's ModelConfig), got {type(document).__name__}")
    message = pb.ModelConfig()
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as exc:
        detail = str(exc)
        unknown = re.search(r'Message type "inference\.(\w+)" has no field named "([^"]{0,64})"', detail)
        bad = re.search(r"Failed to parse (\w+) field", detail)
        if unknown:
            inside = "" if unknown.group(1) == "ModelConfig" else f" in {unknown.group(1)}"
            detail = f"unknown field {clip(unknown.group(2))}{inside} (not in Triton's ModelConfig)"
        elif bad:
            detail = f"field '{bad.group(1)}' has a value of the wrong type or out of range"
        else:
            detail = "not a valid Triton ModelConfig"
        raise InvalidArgument(f"{where}: {detail}") from None
    folder = plane.repository.root / name
    text = text_format.MessageToString(message)
    return triton_config.parse(text, name, plane.repository.providers.kind, folder, source=source)


async def unload_model(plane: DataPlane, name: str, parameters: dict | None = None) -> None:
    """Unload a model. `parameters`: tritonclient's `unload_dependents` is accepted (no model here has
    dependents: no ensembles); any other key is refused, on both frontends alike."""
    parameters = dict(parameters or {})
    if not isinstance(parameters.pop("unload_dependents", False), bool):
        raise InvalidArgument("unload parameter 'unload_dependents' must be true or false")
    if parameters:
        raise InvalidArgument(f"unload parameter(s) {clip(sorted(parameters))} are not supported")
    await asyncio.get_running_loop().run_in_executor(plane.executor, plane.repository.unload, name)
