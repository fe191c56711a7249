"""The project's structure, checked: no import circle anywhere, stages import
only downwards (train <- serve <- export <- perf), modules stay small, and
one implementation of each shared concept."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "serve", "export", "perf")
#: a package may import only the packages before it
LAYER = {name: i for i, name in enumerate(PACKAGES)}
MAX_LINES = 650  # "about 600": a module past this is doing two jobs


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "backends" in path.parts or "preprocess_model" in path.parts:
                continue  # loaded by Triton by path, never imported as project modules
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules a file imports (at any depth: function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n.split(".")[0] in LAYER:
                found.add(n)
    return found


def _graph():
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_no_import_circle_anywhere():
    graph = _graph()
    # Only module-level imports make a circle at import time, but a
    # function-level one is the same design knot: both count.
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    cycles = []

    def visit(node, stack):
        color[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package's __init__ and its own submodules
            if color[nxt] == GREY:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif color[nxt] == WHITE:
                visit(nxt, stack)
        stack.pop()
        color[node] = BLACK

    for node in sorted(graph):
        if color[node] == WHITE:
            visit(node, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_stages_import_only_downwards():
    bad = [f"{m} imports {dep}" for m, deps in _graph().items() for dep in deps
           if LAYER[dep.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert not bad, "layering (train <- serve <- export <- perf) broken: " + "; ".join(sorted(bad))


def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _modules().values()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not big, f"split these modules along their jobs (> {MAX_LINES} lines): {big}"


@pytest.mark.parametrize("pattern,home", [
    (r"^\s*def (jsonable|_jsonable)\(", "train/artifact_io.py"),
    (r"^\s*def (git_revision|_git_revision)\(", "train/artifact_io.py"),
    (r"^\s*def (library_versions|_versions)\(", "train/artifact_io.py"),
    (r"^\s*def (atomic_write\w*|save_atomic|_write_json)\(", "train/artifact_io.py"),
    (r"^\s*def (read_api_key|_read_api_key)\(", "serve/triton_access.py"),
    (r"^\s*def (normalise_config|_normalise_config|_normalize_config)\(", "serve/triton_access.py"),
    (r"^\s*def (parse_gate_overrides|parse_thresholds)\(", "export/gates.py"),
    (r"^API_KEY_HEADER\s*=", "serve/triton_access.py"),
])
def test_one_implementation_of_each_shared_concept(pattern, home):
    rx = re.compile(pattern, re.M)
    where = sorted(str(p.relative_to(ROOT)) for p in _modules().values() if rx.search(p.read_text("utf-8")))
    assert where == [home], f"{pattern!r} should be defined only in {home}, found in {where}"


def test_os_replace_only_in_the_io_module():
    """Every atomic write goes through train/artifact_io (one permission and
    fsync policy); folder swaps (a rename of a whole directory) are the
    exception and say so."""
    offenders = []
    for p in _modules().values():
        for i, line in enumerate(p.read_text("utf-8").splitlines(), 1):
            if "os.replace(" in line and p.name != "artifact_io.py" and "folder swap" not in line:
                offenders.append(f"{p.relative_to(ROOT)}:{i}")
    assert not offenders, f"hand-written temp-file writers: {offenders}"
