"""The module layout: no import cycle among server/, export/ and contract/ (imports inside functions
count), and the transport-free core (errors, data plane, validation, signature, repository) loads
without grpc."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "export", "contract")


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth (imports inside functions count), except under
    `if TYPE_CHECKING:` (never run: annotations only). `from a.b import c` names both a.b and a.b.c."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _modules() -> dict[str, Path]:
    return {
        package if p.stem == "__init__" else f"{package}.{p.stem}": p
        for package in PACKAGES
        for p in sorted((ROOT / package).glob("*.py"))
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            nxt = next(successors, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    """The finder itself: a three-module ring and a two-module ring are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "f"}, "f": set(), "g": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_among_server_export_and_contract_modules():
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    # the walk sees real imports, function-level ones included
    assert {"server.security"} <= graph["server.config"] and "server.app" in graph["server.__main__"]
    assert "server.validate" in graph["server.dataplane"] and "export.verify" in graph["export.user"]
    cycles = _cycles(graph)
    assert not cycles, "; ".join(" <-> ".join(f"{m} (imports {sorted(graph[m] & set(c))})" for m in c) for c in cycles)


def test_transport_free_core_loads_no_grpc():
    """Domain errors carry a neutral status code (`server.status` maps it to gRPC and HTTP), so the data
    plane and what it uses load, in a fresh interpreter, without grpc."""
    core = ["server.errors", "server.dataplane", "server.validate", "server.signature", "server.repository"]
    code = (
        "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc'))"
    )
    res = subprocess.run([sys.executable, "-c", code, *core], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
    # and the frontends' table does load it
    res = subprocess.run(
        [sys.executable, "-c", code, "server.status"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 0 and "'grpc'" in res.stdout, (res.stdout, res.stderr)


def test_no_server_module_over_600_lines():
    """A module that grows past 600 lines holds more than one job: split it (the REST frontend is a
    codec, an app and an HTTP server; the gRPC one a codec and the servicer)."""
    long = {p.name: n for p in sorted((ROOT / "server").glob("*.py")) if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
