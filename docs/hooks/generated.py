"""mkdocs hook: the two pages that are generated, never written by hand.

- settings.md: the table of every server setting, from the fields and help text of
  `server.config.Settings` and the flags of `server.config.build_parser` (what `python -m server
  --help` prints), so the page cannot drift from the code;
- performance.md: the last `make bench` run, from docs/bench.json (`bench.report.page`);
- precision.md: the served int8 run, from docs/bench_int8.json (`python -m bench --lines i`).

Each page holds a marker comment that is replaced here; a page without its marker fails the build.
Standard library only (plus the repository's own stdlib-only modules): it runs in the docs venv.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS_MARKER = "<!-- generated: settings table (docs/hooks/generated.py) -->"
BENCH_MARKER = "<!-- generated: benchmark (docs/hooks/generated.py, from docs/bench.json) -->"
INT8_MARKER = "<!-- generated: int8 benchmark (docs/hooks/generated.py, from docs/bench_int8.json) -->"


def _cell(text: str) -> str:
    """Help text as one table cell: no HTML tags, emphasis or column breaks out of it."""
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*"), ("|", "\\|")):
        text = text.replace(char, escaped)
    return text.replace("\n", " ")


def _default(f: dataclasses.Field) -> str:
    value = f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    return f"`{value}`"


def _accepts(config, name: str) -> str:
    """The range or choices `server.config` checks, where it states them as data."""
    choices = getattr(config, "_CHOICES", {}).get(name)
    if choices:
        return ", ".join(f"`{c}`" for c in choices)
    lo, hi = getattr(config, "_BOUNDS", {}).get(name, (None, None))
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    if lo is not None:
        return f">= {lo}"
    return ""


def settings_table() -> str:
    """One row per setting: its flag(s), environment variable, default, accepted values and help."""
    from server import config

    flags = {}
    for action in config.build_parser()._actions:
        if action.dest in ("help", "version"):
            continue
        flags[action.dest] = action.option_strings
    rows = [
        "| flag and environment variable | default | what |",
        "|---|---|---|",
    ]
    for f in dataclasses.fields(config.Settings):
        names = " / ".join(f'<code class="nowrap">{o}</code>' for o in flags[f.name])
        env = f'<code class="nowrap">{config.ENV_PREFIX}{f.name.upper()}</code>'
        accepts = _accepts(config, f.name)
        what = _cell(f.metadata["help"]) + (f" (accepts {_cell(accepts)})" if accepts else "")
        rows.append(f"| {names}<br>{env} | {_default(f)} | {what} |")
    return "\n".join(rows)


def performance_body() -> str:
    from bench.report import page

    return page(json.loads((ROOT / "docs" / "bench.json").read_text()))


def precision_body() -> str:
    from bench.report import page

    return page(json.loads((ROOT / "docs" / "bench_int8.json").read_text()), plot=None, heading="###")


def _replace(markdown: str, marker: str, content: str, name: str) -> str:
    if marker not in markdown:
        raise ValueError(f"docs/{name} lost its marker {marker!r}: the generated part has nowhere to go")
    return markdown.replace(marker, content)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - mkdocs' hook signature
    name = page.file.src_uri
    if name == "settings.md":
        return _replace(markdown, SETTINGS_MARKER, settings_table(), name)
    if name == "performance.md":
        return _replace(markdown, BENCH_MARKER, performance_body(), name)
    if name == "precision.md":
        return _replace(markdown, INT8_MARKER, precision_body(), name)
    return markdown
