"""The model repository: which models and versions exist on disk, which are loaded, and their state.

Layout (Triton's): <root>/<model>/<version>/model.onnx with integer versions. Every folder
in <root> is a model (hidden ones, '.'-prefixed, are skipped): one without any
<version>/model.onnx is listed UNAVAILABLE with the reason and fails to load, as in Triton,
rather than being left out silently. Loading or
unloading one model swaps its entry under a lock; requests already running keep the runtime
object they started with, so they finish normally.

Model control (Triton's --model-control-mode): `none` loads every model at start and refuses
load/unload requests; `explicit` also serves them; `poll` follows the disk (the server's poller
calls `sync`) and refuses them. Refusals are `ModelControlDisabled` (UNAVAILABLE, as Triton).

Readiness: the server is ready while no model failed to load (a model unloaded on request does
not count; a failed reload whose previous versions keep serving does not either: the index lists
the refused version with its reason).

Messages a client can see name the model, the version and the file relative to the repository;
absolute paths and exception text go to the log only.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from contract import metadata
from contract.onnxfile import FileSummary, summarize
from server import invariance
from server import model_config as triton_config
from server.batcher import BatchPolicy, policy_from_config
from server.dtypes import numpy_dtype
from server.errors import InvalidArgument, ModelControlDisabled, NotFound, StartupError, Unavailable, clip
from server.layout import probe_output_layout
from server.runtime import ModelRuntime, Providers, RuntimeOptions, load_model

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
CONTROL_MODES = ("none", "explicit", "poll")
MAX_NAME = 128
# A model name is a folder name: ASCII letters, digits, '_', '-', '.'; not starting with '.' or '-'.
NAME_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")
MAX_VERSION_DIGITS = 18  # versions are positive integers below 10**18 (int64)


def valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def valid_version(text: str) -> bool:
    # a positive integer written plainly: "0", "01" are not versions (folders 01 and 1 would both be 1)
    return 0 < len(text) <= MAX_VERSION_DIGITS and text.isascii() and text.isdigit() and text[0] != "0"


@dataclass
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    versions: dict[int, ModelRuntime] = field(default_factory=dict)
    stamp: dict = field(default_factory=dict)  # the files' mtimes and sizes when loaded (for polling)
    failed_stamp: dict | None = None
    failed: bool = False  # the last load failed and no version serves: the server is not ready
    failed_versions: dict[int, str] = field(default_factory=dict)  # refused on reload (old ones serve)

    def latest(self) -> ModelRuntime:
        return self.versions[max(self.versions)]


def _disk_stamp(folder: Path) -> dict:
    """What polling compares: each version file's (mtime, size) and the config files' mtimes."""
    stamp = {}
    for version, path in _versions_on_disk(folder).items():
        st = path.stat()
        stamp[version] = (st.st_mtime_ns, st.st_size)
    cfg = folder / "config.json"
    if cfg.is_file():
        stamp["config"] = cfg.stat().st_mtime_ns
    pbtxt = folder / triton_config.FILENAME
    if pbtxt.is_file():
        stamp["config"] = (stamp.get("config"), pbtxt.stat().st_mtime_ns)
    return stamp


def _versions_on_disk(folder: Path) -> dict[int, Path]:
    found = {}
    if folder.is_dir():
        for sub in folder.iterdir():
            if sub.is_dir() and valid_version(sub.name) and (sub / "model.onnx").is_file():
                found[int(sub.name)] = sub / "model.onnx"
    return found


def _read_config(name: str, folder: Path, provider: str = "") -> dict:
    path = folder / "config.json"
    triton = triton_config.read(folder, name, provider)  # Triton's config.pbtxt, mapped onto the same
    if triton is not None:
        if path.is_file():
            raise InvalidArgument(f"model '{name}' has both config.json and config.pbtxt: keep one")
        return triton
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"model '{name}' config.json: not valid JSON (line {exc.lineno} column {exc.colno})"
        ) from None
    except (OSError, ValueError) as exc:
        log.error("model %s: cannot read %s: %s", name, path, exc)
        raise InvalidArgument(f"model '{name}' config.json: cannot be read as UTF-8 JSON") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"model '{name}' config.json: expected a JSON object")
    return config


def describe_file(path: Path, summary: FileSummary) -> str:
    """'dynamic' | 'static T=N' | 'export mode unknown', the size in MB and the node count, for the log."""
    static = summary.metadata.get(metadata.STATIC_LENGTH, "")
    mode = summary.metadata.get(metadata.EXPORT_MODE, "")
    kind = f"static T={static}" if static else (mode if mode == "dynamic" else "export mode unknown")
    try:
        size = path.stat().st_size / 1e6
    except OSError:
        size = 0.0
    nodes = "" if summary.nodes is None else f", {summary.nodes} nodes"
    return f"{kind}, {size:.1f} MB{nodes}"


_ORT_CODE = re.compile(r"\[ONNXRuntimeError\] : \d+ : ([A-Z_]+)")


def _load_failure(name: str, version: int, path: Path, exc: Exception) -> str:
    """What a client is told when a version fails to load (the full error goes to the log)."""
    where = f"{name}/{version}/model.onnx"
    if isinstance(exc, ValueError) and str(exc).startswith(f"{path}: "):  # load_model's own checks
        return f"model '{name}' version {version} failed to load: {where}: {str(exc)[len(str(path)) + 2 :]}"
    match = _ORT_CODE.search(str(exc))
    why = f" ({match.group(1)})" if match else ""
    return (
        f"model '{name}' version {version} failed to load: ONNX Runtime could not load {where}{why}; "
        "the server log has the details"
    )


def state_bytes(rt: ModelRuntime) -> int | None:
    """Bytes of state one sequence of `rt` keeps between chunks (its state inputs, batch 1); None
    when a state's size depends on what the client sends."""
    sig = rt.signature
    total = 0
    for pair in sig.states:
        if pair.initial is not None:
            total += pair.initial.nbytes
            continue
        spec = sig.input(pair.input)
        dims = [1 if axis == spec.batch_axis else d for axis, d in enumerate(spec.shape)]
        if any(d < 0 for d in dims) or spec.datatype == "BYTES":
            return None
        total += math.prod(dims) * numpy_dtype(spec.datatype).itemsize
    return total


def _keep_versions(versions: dict[int, Path], config: dict) -> dict[int, Path]:
    """Triton's version_policy: all (default), the latest N, or the listed versions."""
    triton = config.get("triton")
    policy = triton.version_policy if triton is not None else ("all",)
    if policy[0] == "latest":
        return {v: versions[v] for v in sorted(versions)[-policy[1] :]}
    if policy[0] == "specific":
        return {v: p for v, p in versions.items() if v in policy[1]}
    return versions


class ModelRepository:
    def __init__(
        self,
        root: Path,
        providers: Providers,
        options: RuntimeOptions,
        control_mode: str = "explicit",
        exit_on_error: bool = False,
        policy: BatchPolicy | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        """`control_mode`: none | explicit | poll (what load/unload requests may do); the server
        passes --model-control-mode (default none) and --exit-on-error (default true, as Triton).
        `policy`: the server's batching defaults, which each model's config may override.
        `max_state_bytes`: the state one sequence may keep (--max-sequence-state-mb; None: no
        cap): a stateful model whose state alone is larger fails to load."""
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {CONTROL_MODES}, got {control_mode!r}")
        self.root = root
        self.providers = providers
        self.options = options
        self.control_mode = control_mode
        self.exit_on_error = exit_on_error
        self._lock = threading.Lock()  # guards _models
        self._load_lock = threading.Lock()  # one load/unload at a time
        self._models: dict[str, ModelEntry] = {}
        self.policy = policy or BatchPolicy(enabled=False)
        self.max_state_bytes = max_state_bytes
        self.on_change = lambda name, ready: None  # set by the server (health status)

    def model_names_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for p in self.root.iterdir():
            if not p.is_dir() or p.name.startswith("."):
                continue
            if valid_name(p.name):
                names.append(p.name)
            else:
                log.warning("model folder %s skipped: a model name is 1-%d ASCII letters, digits, '_', '-', '.'",
                            clip(p.name), MAX_NAME)  # fmt: skip
        return sorted(names)

    # -- readiness --------------------------------------------------------------------------
    def failures(self) -> list[tuple[str, str]]:
        """(model, reason) for every model whose last load failed and that has no serving version."""
        with self._lock:
            return sorted((n, e.reason) for n, e in self._models.items() if e.failed)

    def is_ready(self) -> bool:
        """Server readiness as far as models go: False while any model failed to load."""
        with self._lock:
            return not any(e.failed for e in self._models.values())

    # -- loading ----------------------------------------------------------------------------
    def load_all(self) -> list[tuple[str, str]]:
        """Load every model on disk (at start); returns the failures. With exit_on_error the first
        failure raises StartupError (one line: the model and why) and nothing more is loaded."""
        names = self.model_names_on_disk()
        if not names:
            log.warning(
                "model repository %s holds no model folder (<model>/<version>/model.onnx): run `make export` "
                "to write the default models, or point --model-repository at a folder of models",
                self.root,
            )
        for name in names:
            try:
                self._load(name)
            except Exception as exc:  # noqa: BLE001 - one bad model must not stop the others
                message = exc.message if isinstance(exc, InvalidArgument | NotFound) else str(exc)
                if self.exit_on_error:
                    raise StartupError(
                        f"{message} (--exit-on-error: the server does not start; --no-exit-on-error starts it "
                        "without this model, not ready)"
                    ) from None
                log.error("%s; the server is not ready until it loads or is unloaded", message)
        return self.failures()

    def _check_control(self, action: str) -> None:
        if self.control_mode == "explicit":
            return
        if self.control_mode == "poll":
            raise ModelControlDisabled(
                f"explicit model load / unload is not allowed while the server polls its model repository "
                f"(--model-control-mode poll; {action} refused): change the files on disk, or start the server "
                "with --model-control-mode explicit"
            )
        raise ModelControlDisabled(
            f"explicit model load / unload is not allowed: the server runs with --model-control-mode none "
            f"(models are loaded at start only; {action} refused); start it with --model-control-mode explicit "
            "to load and unload models by request"
        )

    def _check_name(self, name: str) -> None:
        if not valid_name(name):
            raise InvalidArgument(
                f"model name {clip(name)} is not a model folder name: 1-{MAX_NAME} ASCII letters, digits, "
                "'_', '-' or '.', not starting with '.' or '-'"
            )

    def load(self, name: str, config: dict | None = None) -> ModelEntry:
        """RepositoryModelLoad: allowed in explicit mode only (ModelControlDisabled otherwise).
        `config`: a parsed configuration (`model_config.parse`) used for this load instead of the
        model's files (the load request's `config` parameter); every version is then reloaded."""
        self._check_control("load")
        self._check_name(name)
        return self._load(name, config)

    def unload(self, name: str) -> None:
        """RepositoryModelUnload: allowed in explicit mode only (ModelControlDisabled otherwise)."""
        self._check_control("unload")
        self._check_name(name)
        self._unload(name)

    def _fail(self, name: str, previous: ModelEntry | None, stamp: dict, reason: str,
              version: int | None = None) -> None:  # fmt: skip
        """Record a failed load: a model with no serving version becomes failed (server not ready);
        one whose previous versions still serve keeps them and lists the refused version."""
        with self._lock:
            current = self._models.get(name)
            if current is None or not current.versions:
                self._models[name] = ModelEntry(name, UNAVAILABLE, reason, failed_stamp=stamp, failed=True)
                changed = True
            else:
                current.failed_stamp = stamp
                if version is not None:
                    current.failed_versions[version] = reason
                changed = False
        if changed:
            self.on_change(name, False)

    def _load(self, name: str, config: dict | None = None) -> ModelEntry:
        """(Re)load every version of a model from disk; the old versions serve until the swap."""
        with self._load_lock:
            folder = self.root / name
            if not folder.is_dir():
                raise NotFound(f"failed to load '{name}': no such model folder in the model repository")
            versions = _versions_on_disk(folder)
            loaded = {}
            stamp = _disk_stamp(folder)
            if config is not None:  # given with the load request: nothing loaded before ran with it
                stamp["config"] = ("load request", id(config))
            with self._lock:
                previous = self._models.get(name)
            if not versions:  # Triton lists it, UNAVAILABLE, and says why
                reason = (
                    f"failed to load '{name}': its folder holds no version (a folder named by a positive integer "
                    "with a model.onnx inside: <model>/<version>/model.onnx)"
                )
                self._fail(name, previous, stamp, reason)
                raise InvalidArgument(reason)
            try:
                repo_config = config if config is not None else _read_config(name, folder, self.providers.kind)
                policy = policy_from_config(self.policy, name, repo_config)
            except InvalidArgument as exc:
                self._fail(name, previous, stamp, exc.message)
                raise
            triton = repo_config.get("triton")
            if triton is not None and triton.ignored:
                log.info("model %s config.pbtxt: field(s) %s ignored (nothing they set changes a result here)",
                         name, ", ".join(triton.ignored))  # fmt: skip
            kept = _keep_versions(versions, repo_config)
            if not kept:
                reason = f"model '{name}': config.pbtxt version_policy keeps none of the versions {sorted(versions)}"
                self._fail(name, previous, stamp, reason)
                raise InvalidArgument(reason)
            versions = kept
            start = time.perf_counter()
            for version, path in sorted(versions.items()):
                if (
                    previous is not None
                    and version in previous.versions
                    and previous.stamp.get(version) == stamp.get(version)
                    and previous.stamp.get("config") == stamp.get("config")
                ):
                    loaded[version] = previous.versions[version]  # unchanged: keep the live session
                    continue
                t0 = time.perf_counter()
                summary = summarize(path)  # read once: for the log line and the session options
                log.info("loading %s (version %d, %s)", name, version, describe_file(path, summary))
                try:
                    loaded[version] = load_model(
                        name, version, path, self.providers, self.options, repo_config, summary.nodes
                    )
                    loaded[version].policy = policy
                    self._check_state(loaded[version], path)
                    probe_output_layout(loaded[version])  # a first run: warms the session up, sizes responses
                    invariance.check(loaded[version])  # alone vs merged: may turn merging off
                except Exception as exc:  # noqa: BLE001
                    log.error("model %s version %d (%s) failed to load: %s", name, version, path, exc)
                    reason = _load_failure(name, version, path, exc)
                    self._fail(name, previous, stamp, reason, version)
                    raise InvalidArgument(reason) from None
                log.info(
                    "loaded %s in %.2f s (version %d, %s)",
                    name,
                    time.perf_counter() - t0,
                    version,
                    loaded[version].provider,
                )
            entry = ModelEntry(name, READY, "", loaded, stamp)
            with self._lock:
                old = self._models.get(name)
                self._models[name] = entry
            if old is not None:
                live = {id(rt) for rt in loaded.values()}
                for rt in old.versions.values():
                    if id(rt) not in live:
                        rt.retire()
            log.info(
                "model %s ready: versions %s on %s (%.2f s)",
                name,
                sorted(loaded),
                entry.latest().provider,
                time.perf_counter() - start,
            )
            self.on_change(name, True)
            return entry

    def _check_state(self, rt: ModelRuntime, path: Path) -> None:
        """A state larger than one sequence may keep would fail every sequence_start: refused now."""
        nbytes = state_bytes(rt) if self.max_state_bytes is not None else None
        if nbytes is not None and nbytes > self.max_state_bytes:
            mib = 1 << 20
            raise ValueError(
                f"{path}: one sequence's state is {nbytes / mib:,.1f} MiB, more than a sequence may keep "
                f"({self.max_state_bytes / mib:,.0f} MiB, --max-sequence-state-mb): no sequence could start"
            )

    def sync(self) -> list[str]:
        """Bring the loaded models in line with the disk; returns the models (re)loaded or unloaded."""
        changed = []
        on_disk = set(self.model_names_on_disk())
        for name in sorted(on_disk):
            stamp = _disk_stamp(self.root / name)
            entry = self.entry(name)
            if entry is not None and entry.stamp == stamp:
                continue
            if entry is not None and entry.failed_stamp == stamp:
                continue  # already refused this exact content; do not retry in a loop
            try:
                self._load(name)
            except Exception as exc:  # noqa: BLE001
                log.error("poll: %s", exc.message if isinstance(exc, InvalidArgument | NotFound) else exc)
            changed.append(name)
        for name in self.ready_models():
            if name not in on_disk:
                self._unload(name)
                changed.append(name)
        with self._lock:  # a failed model whose folder is gone no longer holds readiness back
            gone = [n for n, e in self._models.items() if e.failed and n not in on_disk]
            for name in gone:
                del self._models[name]
        for name in gone:
            log.info("poll: failed model %s removed from disk", name)
            self.on_change(name, False)
            changed.append(name)
        return changed

    def _unload(self, name: str) -> None:
        with self._load_lock:
            with self._lock:
                entry = self._models.get(name)
                if entry is None or (entry.state != READY and not entry.failed):
                    raise NotFound(f"model '{name}' is not loaded")
                self._models[name] = ModelEntry(name, UNAVAILABLE, "unloaded", stamp=entry.stamp)
            for rt in entry.versions.values():
                rt.retire()
            log.info("unloaded model %s", name)
            self.on_change(name, False)

    # -- lookups ----------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelRuntime:
        with self._lock:
            entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"Request for unknown model: {clip(name)} is not found")
        if entry.state != READY or not entry.versions:
            raise Unavailable(
                f"model '{name}' is not ready ({entry.state}{': ' + entry.reason if entry.reason else ''})"
            )
        if not version:
            return entry.latest()
        if not valid_version(version) or int(version) not in entry.versions:
            raise NotFound(
                f"Request for unknown model: '{name}' version {clip(version)} is not found; loaded: "
                f"{sorted(entry.versions)}"
            )
        return entry.versions[int(version)]

    def entry(self, name: str) -> ModelEntry | None:
        with self._lock:
            return self._models.get(name)

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model on disk or known, like Triton's index;
        versions refused by a reload (the previous ones serving) are listed UNAVAILABLE with why."""
        with self._lock:
            models = {n: (e, dict(e.versions), dict(e.failed_versions)) for n, e in self._models.items()}
        rows = []
        for name in sorted(set(models) | set(self.model_names_on_disk())):
            entry, versions, failed = models.get(name, (None, {}, {}))
            if entry is not None and versions:
                states = {v: (entry.state, entry.reason) for v in versions}
                states.update({v: (UNAVAILABLE, why) for v, why in failed.items() if v not in versions})
                rows += [(name, str(v), *states[v]) for v in sorted(states)]
            elif entry is not None:
                rows.append((name, "", entry.state, entry.reason))
            else:
                rows.append((name, "", UNAVAILABLE, "not loaded"))
        return rows

    def ready_models(self) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self._models.items() if e.state == READY)
