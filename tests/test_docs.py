"""The docs against the code: the settings page lists exactly the flags `python -m server --help` has,
the performance page is rendered from docs/bench.json, the README stays short, and a fresh clone's
`make -n serve-ray` exports the models it serves. The site itself is built by `make docs` (--strict)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"--[a-z][a-z0-9-]*")
ENV = re.compile(r"LSTM_SERVE_[A-Z0-9_]+")


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_page_has_exactly_the_flags_of_server_help():
    """Every flag and variable `python -m server --help` prints is on the generated page, and no other."""
    hooks = _hooks()
    table = hooks.settings_table()
    res = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "1000"},  # argparse wraps at the terminal's width: no flag cut in two
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    help_flags = set(FLAG.findall(res.stdout)) - {"--help", "--version"}
    assert len(help_flags) > 30, help_flags
    assert set(FLAG.findall(table)) == help_flags
    assert set(ENV.findall(table.replace("\\", ""))) == set(ENV.findall(res.stdout))
    page = (ROOT / "docs" / "settings.md").read_text()
    assert hooks.SETTINGS_MARKER in page


def test_settings_rows_show_the_defaults_help_prints():
    """Each row's default is the one `--help` states for that flag (same field, same rendering)."""
    hooks = _hooks()
    from server.config import build_parser

    rows = {}
    for line in hooks.settings_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[FLAG.findall(cells[0])[0]] = cells[1].strip("`")
    for action in build_parser()._actions:
        if action.dest in ("help", "version"):
            continue
        shown = re.search(r"default (.*)\)$", action.help).group(1)
        assert rows[action.option_strings[0]] == {"''": "empty", "None": "unset"}.get(shown, shown), action.dest


def test_performance_page_is_rendered_from_bench_json():
    """The page's generated part names the run's date, machine and every target of docs/bench.json."""
    data = json.loads((ROOT / "docs" / "bench.json").read_text())
    body = _hooks().performance_body()
    assert data["info"]["date"] in body and data["info"]["machine"] in body
    for target in data["targets"]:
        assert target["target"] in body
    assert _hooks().BENCH_MARKER in (ROOT / "docs" / "performance.md").read_text()


def test_precision_page_is_rendered_from_bench_int8_json():
    """The precision page's served run is docs/bench_int8.json, targets and all."""
    data = json.loads((ROOT / "docs" / "bench_int8.json").read_text())
    body = _hooks().precision_body()
    assert data["info"]["date"] in body and all(t["target"] in body for t in data["targets"])
    assert _hooks().INT8_MARKER in (ROOT / "docs" / "precision.md").read_text()


def test_every_page_is_in_the_nav():
    """mkdocs --strict warns about a page left out of the nav; this says which one, without mkdocs."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and all(f" {name}" in nav for name in pages), sorted(p for p in pages if f" {p}" not in nav)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", ["serve", "serve-envoy", "serve-ray", "bench", "soak"])
def test_fresh_clone_targets_export_the_models_first(tmp_path, target):
    """On a fresh clone (no models/, no venvs) the serving targets export the default models before they
    start: `make -n` prints the export command, then the target's own command."""
    for name in ["Makefile", "pyproject.toml", *(p.name for p in ROOT.glob("requirements*.txt"))]:
        shutil.copy(ROOT / name, tmp_path / name)
    res = subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    exports = [i for i, line in enumerate(lines) if "-m export --out models --no-report" in line]
    assert exports, res.stdout
    assert exports[0] < len(lines) - 1, res.stdout  # something runs after the export: the target itself
