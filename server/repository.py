"""The model repository: which models and versions exist on disk, which are loaded, and their state.

Layout (Triton's): <root>/<model>/<version>/model.onnx with integer versions. Loading or
unloading one model swaps its entry under a lock; requests already running keep the runtime
object they started with, so they finish normally.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import InvalidArgument, NotFound, Unavailable
from server.runtime import ModelRuntime, Providers, RuntimeOptions, load_model

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelEntry:
    name: str
    state: str = UNAVAILABLE
    reason: str = ""
    versions: dict[int, ModelRuntime] = field(default_factory=dict)
    signature: dict = field(default_factory=dict)  # what was on disk when loaded (for polling)
    failed_signature: dict | None = None

    def latest(self) -> ModelRuntime:
        return self.versions[max(self.versions)]


def _signature(folder: Path) -> dict:
    sig = {}
    for version, path in _versions_on_disk(folder).items():
        st = path.stat()
        sig[version] = (st.st_mtime_ns, st.st_size)
    cfg = folder / "config.json"
    if cfg.is_file():
        sig["config"] = cfg.stat().st_mtime_ns
    return sig


def _versions_on_disk(folder: Path) -> dict[int, Path]:
    found = {}
    if folder.is_dir():
        for sub in folder.iterdir():
            if sub.is_dir() and sub.name.isdigit() and (sub / "model.onnx").is_file():
                found[int(sub.name)] = sub / "model.onnx"
    return found


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise InvalidArgument(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path}: expected a JSON object")
    return config


class ModelRepository:
    def __init__(self, root: Path, providers: Providers, options: RuntimeOptions) -> None:
        self.root = root
        self.providers = providers
        self.options = options
        self._lock = threading.Lock()  # guards _models
        self._load_lock = threading.Lock()  # one load/unload at a time
        self._models: dict[str, ModelEntry] = {}
        self.on_change = lambda name, ready: None  # set by the server (health status)
        self.on_retire = lambda runtimes: None  # versions replaced or unloaded (close their batchers)
        self.config_check = lambda name, config: None  # raises on a bad config.json (data plane)

    def model_names_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _versions_on_disk(p))

    def load_all(self) -> None:
        for name in self.model_names_on_disk():
            try:
                self.load(name)
            except Exception as exc:  # noqa: BLE001 - one bad model must not stop the others
                log.error("model %s failed to load: %s", name, exc)

    def load(self, name: str) -> ModelEntry:
        """(Re)load every version of a model from disk; the old versions serve until the swap."""
        if not name or "/" in name or name.startswith("."):
            raise InvalidArgument(f"model name {name!r} is not a folder name in the repository")
        with self._load_lock:
            versions = _versions_on_disk(self.root / name)
            if not versions:
                raise NotFound(f"model '{name}' has no <version>/model.onnx under {self.root}")
            loaded = {}
            start = time.perf_counter()
            signature = _signature(self.root / name)
            with self._lock:
                previous = self._models.get(name)
            try:
                model_config = _read_config(self.root / name)
                self.config_check(name, model_config)
            except InvalidArgument as exc:
                with self._lock:
                    if previous is None or not previous.versions:
                        self._models[name] = ModelEntry(name, UNAVAILABLE, exc.message, failed_signature=signature)
                    else:
                        previous.failed_signature = signature
                raise
            for version, path in sorted(versions.items()):
                if (
                    previous is not None
                    and version in previous.versions
                    and previous.signature.get(version) == signature.get(version)
                    and previous.signature.get("config") == signature.get("config")
                ):
                    loaded[version] = previous.versions[version]  # unchanged: keep the live session
                    continue
                try:
                    loaded[version] = load_model(name, version, path, self.providers, self.options, model_config)
                except Exception as exc:  # noqa: BLE001
                    msg = f"model '{name}' version {version} ({path}) failed to load: {exc}"
                    with self._lock:
                        entry = self._models.get(name)
                        if entry is None or not entry.versions:
                            self._models[name] = ModelEntry(name, UNAVAILABLE, msg, failed_signature=signature)
                    raise InvalidArgument(msg) from exc
            entry = ModelEntry(name, READY, "", loaded, signature)
            with self._lock:
                old = self._models.get(name)
                self._models[name] = entry
            if old is not None:
                kept = {id(rt) for rt in loaded.values()}
                self.on_retire([rt for rt in old.versions.values() if id(rt) not in kept])
            log.info(
                "loaded model %s versions %s on %s in %.2f s",
                name,
                sorted(loaded),
                entry.latest().provider,
                time.perf_counter() - start,
            )
            self.on_change(name, True)
            return entry

    def sync(self) -> list[str]:
        """Bring the loaded models in line with the disk; returns the models (re)loaded or unloaded."""
        changed = []
        on_disk = set(self.model_names_on_disk())
        for name in sorted(on_disk):
            signature = _signature(self.root / name)
            entry = self.entry(name)
            if entry is not None and entry.signature == signature:
                continue
            if entry is not None and entry.failed_signature == signature:
                continue  # already refused this exact content; do not retry in a loop
            try:
                self.load(name)
            except Exception as exc:  # noqa: BLE001
                log.error("poll: %s", exc)
                with self._lock:
                    current = self._models.get(name)
                    if current is not None:
                        current.failed_signature = signature
            changed.append(name)
        for name in self.ready_models():
            if name not in on_disk:
                self.unload(name)
                changed.append(name)
        return changed

    def unload(self, name: str) -> None:
        with self._load_lock:
            with self._lock:
                entry = self._models.get(name)
                if entry is None or entry.state != READY:
                    raise NotFound(f"model '{name}' is not loaded")
                self._models[name] = ModelEntry(name, UNAVAILABLE, "unloaded", signature=entry.signature)
            self.on_retire(list(entry.versions.values()))
            log.info("unloaded model %s", name)
            self.on_change(name, False)

    def get(self, name: str, version: str = "") -> ModelRuntime:
        with self._lock:
            entry = self._models.get(name)
        if entry is None:
            raise NotFound(f"unknown model '{name}'")
        if entry.state != READY or not entry.versions:
            raise Unavailable(
                f"model '{name}' is not ready ({entry.state}{': ' + entry.reason if entry.reason else ''})"
            )
        if not version:
            return entry.latest()
        if not (version.isascii() and version.isdigit()) or int(version) not in entry.versions:
            raise NotFound(f"model '{name}' has no version {version!r}; loaded: {sorted(entry.versions)}")
        return entry.versions[int(version)]

    def entry(self, name: str) -> ModelEntry | None:
        with self._lock:
            return self._models.get(name)

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model on disk or known, like Triton's index."""
        with self._lock:
            models = dict(self._models)
        rows = []
        for name in sorted(set(models) | set(self.model_names_on_disk())):
            entry = models.get(name)
            if entry is not None and entry.versions:
                rows += [(name, str(v), entry.state, entry.reason) for v in sorted(entry.versions)]
            elif entry is not None:
                rows.append((name, "", entry.state, entry.reason))
            else:
                rows.append((name, "", UNAVAILABLE, "not loaded"))
        return rows

    def ready_models(self) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self._models.items() if e.state == READY)
