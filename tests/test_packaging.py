"""The package as a user installs it: `pip install .` must give a working lstm-serve and lstm-client,
`pip install .[export]` a working lstm-export, with nothing but the declared dependencies.

No download: the wheel is built from a copy of the tree with .venv's setuptools, installed with
--no-deps into a fresh venv, and that venv sees only the files of the distributions the wheel's
metadata declares (and theirs, transitively), linked one by one from .venv. A module the server
imports from an undeclared distribution therefore fails here as it would after `pip install .`.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from server.client import LSTMClient
from tests.conftest import TOL, ragged, reference

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DIST = "lstm-serve"


def _pins(lines: list[str], extra: str = "") -> dict[str, str]:
    """requirement lines -> {name: pinned version} of those that apply here (markers evaluated)."""
    env = {**default_environment(), "extra": extra}
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: pin it with =="
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _closure(requires: list[str], extras: set[str]) -> set[str]:
    """Distributions (canonical names) that lstm-serve[extras] pulls in here, transitively, as installed
    in .venv; `requires` is lstm-serve's own list (Requires-Dist lines). Each pin must match .venv."""
    seen: set[str] = set()
    expanded: set[frozenset] = set()
    todo = [(r, frozenset(extras)) for r in requires]
    env = default_environment()
    while todo:
        text, active = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in active | {""}):
            continue
        name = canonicalize_name(req.name)
        if name == DIST:  # a self-reference: lstm-serve[export] in the train extra
            if frozenset(req.extras) not in expanded:
                expanded.add(frozenset(req.extras))
                todo += [(r, frozenset(req.extras)) for r in requires]
            continue
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        assert req.specifier.contains(dist.version, prereleases=True), f"{text}: .venv has {dist.version}"
        todo += [(r, frozenset(req.extras)) for r in dist.requires or []]
    return seen


PROJECT = PYPROJECT["project"]
# pyproject's lists as Requires-Dist lines (the extras carry no markers of their own)
PYPROJECT_REQUIRES = PROJECT["dependencies"] + [
    f'{r}; extra == "{extra}"' for extra, reqs in PROJECT["optional-dependencies"].items() for r in reqs
]


def _ranges(lines: list[str]) -> dict[str, SpecifierSet]:
    """pyproject requirement lines -> {name: its range} of those that apply here (markers evaluated)."""
    env = {**default_environment(), "extra": ""}
    ranges = {}
    for line in lines:
        req = Requirement(line)
        if canonicalize_name(req.name) != DIST and (req.marker is None or req.marker.evaluate(env)):
            ranges[canonicalize_name(req.name)] = req.specifier
    return ranges


def _low(spec: SpecifierSet) -> str:
    (low,) = [s.version for s in spec if s.operator == ">="]
    return low


def test_package_declares_ranges_and_requirements_files_pin_inside_them():
    """pyproject: a range for each library (a lower and an upper bound, so it installs beside other
    services); requirements*.txt: the exact pins `make venv` installs, each inside its range."""
    server_txt = _pins((ROOT / "requirements-server.txt").read_text().splitlines())
    full_txt = _pins((ROOT / "requirements.txt").read_text().splitlines())
    dev_txt = _pins((ROOT / "requirements-dev.txt").read_text().splitlines())
    declared = {
        "": (_ranges(PROJECT["dependencies"]), server_txt),
        "export": (_ranges(PROJECT["optional-dependencies"]["export"]), full_txt),
        "train": (_ranges(PROJECT["optional-dependencies"]["train"]), dev_txt),
    }
    assert set(declared[""][0]) == set(server_txt), "requirements-server.txt pins what the package declares"
    for extra, (ranges, pins) in declared.items():
        assert ranges, extra
        for name, spec in ranges.items():
            assert {s.operator for s in spec} == {">=", "<"}, f"{extra or 'base'}: {name}{spec}: give a range"
            assert name in pins and spec.contains(pins[name]), f"{name}{spec}: pinned {pins.get(name)}"
    assert PROJECT["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()


def test_protobuf_and_grpcio_floors_are_the_stubs_own():
    """The generated stubs refuse an older runtime at import: the declared floors are theirs, no lower
    (pip would install a protobuf the stubs reject) and no higher (the package would refuse hosts it runs in).
    The generator that wrote them is the one requirements-protogen.txt pins, and grpc's own health and
    reflection services go down to the same grpcio release."""
    ranges = _ranges(PROJECT["dependencies"])
    pb2 = (ROOT / "server" / "proto" / "grpc_service_pb2.py").read_text()
    major, minor, patch = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", pb2).groups()
    assert _low(ranges["protobuf"]) == f"{major}.{minor}.{patch}"
    grpc_stub = (ROOT / "server" / "proto" / "grpc_service_pb2_grpc.py").read_text()
    (generated,) = re.findall(r"^GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub, flags=re.M)
    assert _low(ranges["grpcio"]) == generated
    protogen = _pins((ROOT / "requirements-protogen.txt").read_text().splitlines())
    assert protogen["grpcio-tools"] == generated, "make proto-check regenerates with another grpcio-tools"
    assert _low(ranges["grpcio-health-checking"]) == _low(ranges["grpcio-reflection"]) == generated


def _imports(folder: Path, skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """Third-party top-level modules imported anywhere under folder (at any depth) -> the files."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("contract", "server", "export", "__future__"):
                    found.setdefault(top, []).append(path.relative_to(ROOT).as_posix())
    return found


def test_everything_the_code_imports_is_declared():
    """Every third-party import in server/ comes from the base dependencies, in export/ from the extras."""
    providers = metadata.packages_distributions()
    assert not any(";" in r for reqs in PROJECT["optional-dependencies"].values() for r in reqs)
    base = _closure(PYPROJECT_REQUIRES, set())
    with_extras = _closure(PYPROJECT_REQUIRES, {"export", "train"})
    assert "torch" not in base and {"torch", "onnx", "sktime"} <= with_extras
    # the stub generator is a developer tool (make proto): grpcio-tools is in requirements-protogen.txt
    for folder, declared, skip in (
        ("contract", base, set()),
        ("server", base, {"server/proto/generate.py"}),
        ("export", with_extras, set()),
    ):
        for module, files in _imports(ROOT / folder, skip).items():
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            assert dists & declared, f"{module} (imported by {files[0]}) comes from {dists or 'nothing installed'}"


# -- the real thing: build, install, run ------------------------------------------------------------


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("contract", "server", "export"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", out]
    res = subprocess.run([*map(str, cmd), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob("lstm_serve-*.whl")
    return wheel


def _venv_with(
    tmp: Path, wheel: Path, extras: set[str], own: dict[str, str] | None = None, label: str = ""
) -> tuple[Path, set[str]]:
    """A fresh venv with the wheel (no deps) plus links to the files of exactly its declared
    dependencies for `extras`, taken from .venv; `own` {distribution: version}: installed into the
    venv by pip at that version instead (from the index or pip's cache). Returns (its bin folder, the
    distributions it has)."""
    venv = tmp / ("venv-" + (label or "-".join(sorted(extras)) or "base"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    if own:
        specs = [f"{name}=={version}" for name, version in sorted(own.items())]
        res = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", *specs],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, f"pip install {specs}: {res.stdout}{res.stderr}"
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (info,) = site.glob("lstm_serve-*.dist-info")
    dists = _closure(metadata.PathDistribution(info).requires or [], extras)
    deps = tmp / ("deps-" + venv.name)
    deps.mkdir()
    owners = _top_level_owners()
    for name in sorted(dists - set(own or {})):
        dist = metadata.distribution(name)
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}):
            if owners[top] == {name}:  # a folder (or module) of this distribution alone: link it whole
                (deps / top).symlink_to(Path(dist.locate_file(top)).resolve())
        for file in dist.files or []:  # shared folders (namespace packages such as google/): file by file
            if file.parts[0] != ".." and owners[file.parts[0]] != {name}:
                link = deps / file
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(Path(dist.locate_file(file)).resolve())
    (site / "_declared_deps.pth").write_text(f"{deps}\n")
    return venv / "bin", dists


def _top_level_owners() -> dict[str, set[str]]:
    """Top-level entries of .venv's site-packages -> the distributions whose files lie under them."""
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        for top in {f.parts[0] for f in dist.files or []}:
            owners.setdefault(top, set()).add(canonicalize_name(dist.metadata["Name"]))
    return owners


def _run(exe: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd="/", env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_pip_install_gives_working_commands_with_only_declared_dependencies(tmp_path, wheel, repo, encoders):
    names = zipfile.ZipFile(wheel).namelist()
    assert "export/checkpoints/speaker_id.pt" in names and "server/proto/grpc_service_pb2.py" in names
    wheel_meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(wheel_meta).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    bin_dir, dists = _venv_with(tmp_path, wheel, set())
    assert "torch" not in dists and "onnx" not in dists, "the server must install without torch and onnx"
    version = metadata.version(DIST)
    res = _run(bin_dir / "lstm-serve", "--version")
    assert res.returncode == 0 and res.stdout.strip() == f"lstm-serve {version}", res
    res = _run(bin_dir / "lstm-serve", "--help")
    assert res.returncode == 0 and "--model-repository" in res.stdout and "--no-batching" in res.stdout, res
    res = _run(bin_dir / "lstm-client", "--version")
    assert res.returncode == 0 and res.stdout.strip() == f"lstm-client {version}", res
    res = _run(bin_dir / "lstm-serve", "--grace-s", "-5")
    assert res.returncode == 2 and res.stderr == "error: --grace-s must be >= 0, got -5\n", res
    # every server module imports with the declared dependencies only (--help imports few of them)
    walk = (
        "import importlib, pkgutil, server; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(server.__path__, 'server.') "
        "if m.name != 'server.proto.generate']; import server; print(server.__file__)"
    )
    res = _run(bin_dir / "python", "-c", walk)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(tmp_path)), f"imported the checkout, not the wheel: {res.stdout}"

    # and it serves: the installed lstm-serve on a free port, called from here, answers exactly
    with _serving(bin_dir, repo) as port:
        x, lengths = ragged(np.random.default_rng(5), 3, 7, 6)
        with LSTMClient(f"127.0.0.1:{port}", timeout=30) as client:
            got = client.infer_batch("bi", x, lengths)
        want = reference(encoders["bi"], x, lengths)
        assert all(np.abs(got[k] - want[k]).max() <= TOL for k in ("y", "h_n", "c_n"))


@contextlib.contextmanager
def _serving(bin_dir: Path, repo: Path) -> Iterator[int]:
    """The venv's lstm-serve on a free loopback port (yields it); stopped by SIGTERM, which must exit 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    args = ["--model-repository", str(repo), "--port", "0", "--metrics-port", "-1", "--device", "cpu"]
    proc = subprocess.Popen(
        [str(bin_dir / "lstm-serve"), *args, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd="/",
        env=env,
    )
    try:
        lines, match = [], None
        for line in proc.stdout:
            lines.append(line)
            if match := re.match(r"listening on 127\.0\.0\.1:(\d+)", line):
                break
        assert match, "".join(lines)
        yield int(match.group(1))
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _newest_in(ranges: dict[str, SpecifierSet]) -> dict[str, str]:
    """The high end of each range: the release pip installs for it today (from the index or its cache)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "-q"]
    res = subprocess.run(
        [*cmd, "--report", "-", *(f"{name}{spec}" for name, spec in ranges.items())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


# Run by the venv's python: call the venv's lstm-serve with the venv's client, save what it answers and
# print the versions this interpreter really imported.
_CLIENT = """
import json, sys, warnings
from importlib import metadata
import numpy as np
warnings.simplefilter("error")  # protobuf 6.30-6.31 warn at import of gencode a major older than themselves
from server.client import LSTMClient
feeds = np.load(sys.argv[2])
with LSTMClient(sys.argv[1], timeout=30) as client:
    got = client.infer_batch("bi", feeds["x"], feeds["lengths"])
np.savez(sys.argv[3], **got)
print(json.dumps({name: metadata.version(name) for name in sys.argv[4:]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("end", ["low", "high"])
def test_installs_and_serves_at_each_end_of_the_declared_ranges(tmp_path, wheel, repo, encoders, end):
    """The package beside other services: at the low end of every declared range (numpy, grpcio,
    protobuf, onnxruntime, uvicorn, ...), then at the high end (the newest the index offers in range),
    the installed lstm-serve serves and the installed client, in the same venv, gets exact answers."""
    ranges = _ranges(PROJECT["dependencies"])
    versions = {name: _low(spec) for name, spec in ranges.items()} if end == "low" else _newest_in(ranges)
    assert set(versions) == set(ranges) and all(ranges[n].contains(v) for n, v in versions.items()), versions
    # the grpc family at this end is a set pip itself resolves together (the install below is --no-deps):
    # grpcio-health-checking and -reflection ask for their own grpcio and a protobuf of the stubs' major
    family = sorted(f"{n}=={v}" for n, v in versions.items() if n == "protobuf" or n.startswith("grpcio"))
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", *family]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"pip install {family}: {res.stdout}{res.stderr}"
    own = {name: version for name, version in versions.items() if metadata.version(name) != version}
    bin_dir, _ = _venv_with(tmp_path, wheel, set(), own, label=end)
    x, lengths = ragged(np.random.default_rng(6), 4, 9, 6)
    np.savez(tmp_path / "feeds.npz", x=x, lengths=lengths)
    with _serving(bin_dir, repo) as port:
        res = _run(bin_dir / "python", "-c", _CLIENT, f"127.0.0.1:{port}", str(tmp_path / "feeds.npz"),
                   str(tmp_path / "got.npz"), *versions)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == versions, "the venv runs other versions than asked"
    got, want = np.load(tmp_path / "got.npz"), reference(encoders["bi"], x, lengths)
    assert all(np.abs(got[k] - want[k]).max() <= TOL for k in ("y", "h_n", "c_n"))


@pytest.mark.slow
def test_pip_resolves_the_package_beside_tritonclient(wheel):
    """The host the protobuf floor is for: pip installs the package together with tritonclient's gRPC
    client, which asks for protobuf < 7 (the two are importable in one venv, not in one process:
    docs/development.md)."""
    pin = _pins((ROOT / "requirements-triton.txt").read_text().splitlines())["tritonclient"]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", "-"]
    res = subprocess.run([*cmd, str(wheel), f"tritonclient[grpc]=={pin}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)["install"]
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report}
    assert got["tritonclient"] == pin and got["protobuf"].split(".")[0] == "6", got


@pytest.mark.slow
def test_pip_install_export_extra_gives_working_lstm_export(tmp_path, wheel):
    bin_dir, dists = _venv_with(tmp_path, wheel, {"export"})
    assert {"torch", "onnx", "matplotlib"} <= dists and "sktime" not in dists
    start = time.monotonic()
    res = _run(bin_dir / "lstm-export", "--help", timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("usage: "), (res, time.monotonic() - start)
    # `lstm-export` with no --name exports the family, whose speaker-ID model comes from this checkpoint
    code = "import export, pathlib; print((pathlib.Path(export.__file__).parent / 'checkpoints' / 'speaker_id.pt')"
    code += ".stat().st_size)"
    res = _run(bin_dir / "python", "-c", code)
    assert res.returncode == 0 and int(res.stdout) > 100_000, res
