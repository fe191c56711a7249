"""The package's structure, checked by walking it.

The import graph of ``dinov2_triton`` (the AST of every module; imports inside
functions and under TYPE_CHECKING count): a subpackage imports only itself, the packages
``dinov2_triton.LAYERS`` allows it and the package root (no upward import),
no circle between packages or between modules; no checkout lookups
(``Path(__file__).parents[N]`` and kin); one ``__main__.py``, the command's;
every subpackage says what it owns; modules stay small; one implementation of
each shared concept; atomic writes in one place."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

import dinov2_triton

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "dinov2_triton"
LAYERS = dinov2_triton.LAYERS
MAX_LINES = 650  # "about 600": a module past this is doing two jobs


def _is_resource(path: Path) -> bool:
    # files under */resources/ are data (the stand-in backends Triton loads by path), never imported as modules
    return "resources" in path.relative_to(PACKAGE_DIR).parts


def _modules() -> dict[str, Path]:
    """dotted module name -> file, for every module of the package (resources excluded)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if _is_resource(path):
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def package_of(module: str) -> str | None:
    """The subpackage a module belongs to (``export`` for dinov2_triton.export.variants.onnx); None for the
    package root's own modules (dinov2_triton, .cli, .__main__, .seed_commands: the top, above every layer)."""
    parts = module.split(".")
    if len(parts) > 1 and (PACKAGE_DIR / parts[1]).is_dir():
        return parts[1]
    return None


def _resolve(name: str) -> str | None:
    """The longest known module a dotted name starts with (``a.b.func`` -> ``a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@functools.lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[tuple[int, str, str], ...]:
    """(line, imported module, how) for every import of a package module in ``module``, at any depth."""
    path = MODULES[module]
    return tuple(imports_in(path.read_text(encoding="utf-8"), module, is_package=path.name == "__init__.py"))


def imports_in(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str, str]]:
    tree = ast.parse(source)
    here = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            target = _resolve(n) if n.startswith("dinov2_triton") else None
            if target and target != module:
                found.append((node.lineno, target, f"imports {n}"))
    return found


def _rel(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT))


# --------------------------------------------------------------------------- layering
def test_layers_name_every_subpackage_and_only_lower_ones():
    subpackages = sorted(p.name for p in PACKAGE_DIR.iterdir() if (p / "__init__.py").is_file())
    assert sorted(LAYERS) == subpackages, "dinov2_triton.LAYERS must list every subpackage (and only those)"
    order = list(LAYERS)
    bad = [f"{pkg} may import {dep}, which is not listed before it" for pkg, deps in LAYERS.items()
           for dep in deps if dep not in order[: order.index(pkg)]]
    assert not bad, bad


def test_no_upward_import():
    """A subpackage imports only itself, what LAYERS allows and the package root (dinov2_triton/__init__.py,
    standard-library only); never the command (cli, __main__, seed_commands) or a higher package."""
    bad = []
    for module in MODULES:
        pkg = package_of(module)
        if pkg is None:
            continue  # the package root's modules are the top
        allowed = {pkg, *LAYERS[pkg]}
        for line, target, how in imports_of(module):
            dep = package_of(target)
            if target != "dinov2_triton" and dep not in allowed:
                bad.append(f"{_rel(module)}:{line} {how} ({pkg} -> {dep or target})")
    assert not bad, "upward imports (see dinov2_triton.LAYERS):\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    cycles = []

    def visit(node, stack):
        color[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color[nxt] == GREY:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif color[nxt] == WHITE:
                visit(nxt, stack)
        stack.pop()
        color[node] = BLACK

    for node in sorted(graph):
        if color[node] == WHITE:
            visit(node, [])
    return cycles


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {pkg: set() for pkg in LAYERS}
    for module in MODULES:
        pkg = package_of(module)
        for _, target, _ in imports_of(module) if pkg else ():
            dep = package_of(target)
            if dep and dep != pkg:
                graph[pkg].add(dep)
    cycles = _cycles(graph)
    assert not cycles, "package circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_circle_between_modules():
    # Only module-level imports make a circle at import time, but a function-level one is the
    # same design knot: both count. A package's __init__ and its own submodules are exempt.
    graph = {}
    for module in MODULES:
        graph[module] = {t for _, t, _ in imports_of(module)
                         if not (t.startswith(module + ".") or module.startswith(t + "."))}
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_imports_in_functions_relative_and_type_checking_ones():
    """The checks above can fail: an import hidden in a function, a relative one and one under
    TYPE_CHECKING are all found (a module named in a string, e.g. run as a child process, is not an import)."""
    source = ("from typing import TYPE_CHECKING\n"
              "def f():\n    from dinov2_triton.serve import balancer\n"
              "from ..export import registry\n"
              "if TYPE_CHECKING:\n    import dinov2_triton.tune.search\n"
              "CHILD = ['python', '-m', 'dinov2_triton.cli']\n")
    found = sorted((line, target) for line, target, _ in imports_in(source, "dinov2_triton.core.probe"))
    assert found == [(3, "dinov2_triton.serve"), (3, "dinov2_triton.serve.balancer"), (4, "dinov2_triton.export"),
                     (4, "dinov2_triton.export.registry"), (6, "dinov2_triton.tune.search")]


# --------------------------------------------------------------------------- entry points and lookups
def _file_lookups(tree: ast.AST) -> list[int]:
    """Lines that climb from ``__file__`` to a folder above the module's own: ``.parents``, two or more
    ``.parent``, ``os.path.dirname`` twice."""
    def uses_file(node) -> bool:
        return any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node))

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "parents" and uses_file(node.value):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Attribute) and node.attr == "parent" and isinstance(node.value, ast.Attribute)
              and node.value.attr == "parent" and uses_file(node.value)):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "dirname" and node.args
              and isinstance(node.args[0], ast.Call) and getattr(node.args[0].func, "attr", "") == "dirname"
              and uses_file(node.args[0])):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_checkout_lookups_in_the_package():
    """Package data is read with dinov2_triton.core.resources.resource_path, never through the checkout."""
    bad = [f"{_rel(m)}:{line}" for m, p in MODULES.items()
           for line in _file_lookups(ast.parse(p.read_text(encoding="utf-8")))]
    assert not bad, f"checkout lookups through __file__ (use resource_path): {bad}"
    probe = ast.parse("from pathlib import Path\nA = Path(__file__).parents[1]\nB = Path(__file__).parent.parent\n"
                      "import os\nC = os.path.dirname(os.path.dirname(__file__))\nD = Path(__file__).parent\n")
    assert _file_lookups(probe) == [2, 3, 5]


def test_one_main_py_the_commands():
    mains = sorted(str(p.relative_to(ROOT)) for p in PACKAGE_DIR.rglob("__main__.py") if not _is_resource(p))
    assert mains == ["dinov2_triton/__main__.py"], f"other entry points than dinov2-triton: {mains}"
    targets = {t for _, t, _ in imports_of("dinov2_triton.__main__")}
    assert targets == {"dinov2_triton.cli"}, "python -m dinov2_triton must be the dinov2-triton command"


#: modules that a child process runs with ``python -m`` (a worker, a container step, torchrun, a benchmark
#: script): the only ones besides the command with an ``if __name__ == "__main__"`` block
CHILD_PROCESS_MODULES = {
    "dinov2_triton/cli.py", "dinov2_triton/export/container.py", "dinov2_triton/export/modelopt_worker.py",
    "dinov2_triton/export/trt_build_main.py", "dinov2_triton/export/variants/onnx_fp16.py",
    "dinov2_triton/export/variants/onnx_int8_dynamic.py", "dinov2_triton/train/finetune.py",
    "dinov2_triton/train/benchmark.py", "dinov2_triton/pipeline/bench_stage.py",
    "dinov2_triton/bench/standin_overhead.py",
}


def test_subcommands_run_only_through_the_command():
    """One way in: a subcommand's module has no ``python -m`` entry of its own (its main is reached
    through dinov2-triton); only the modules a child process runs keep one."""
    found = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        if _is_resource(path) or path.name == "__main__.py":
            continue
        if re.search(r'^if __name__ == ["\']__main__["\']:', path.read_text(encoding="utf-8"), re.M):
            found.add(str(path.relative_to(ROOT)))
    assert "dinov2_triton/cli.py" in found                  # the search sees a block where there is one
    extra = sorted(found - CHILD_PROCESS_MODULES)
    assert not extra, f"python -m entry points besides the command: {extra}"


@pytest.mark.parametrize("pkg", sorted(LAYERS))
def test_every_subpackage_says_what_it_owns(pkg):
    for init in sorted((PACKAGE_DIR / pkg).rglob("__init__.py")):
        if _is_resource(init):
            continue
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        words = re.findall(r"[A-Za-z]{3,}", doc)
        assert len(words) >= 8 and "TODO" not in doc, (
            f"{init.relative_to(ROOT)}: its docstring should say what the package owns (found {doc!r})")


# --------------------------------------------------------------------------- size and single homes
def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in MODULES.values()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not big, f"split these modules along their jobs (> {MAX_LINES} lines): {big}"


@pytest.mark.parametrize("pattern,home", [
    (r"^\s*def (jsonable|_jsonable)\(", "dinov2_triton/core/artifact_io.py"),
    (r"^\s*def (git_revision|_git_revision)\(", "dinov2_triton/core/artifact_io.py"),
    (r"^\s*def (library_versions|_versions)\(", "dinov2_triton/core/artifact_io.py"),
    (r"^\s*def (atomic_write\w*|save_atomic|_write_json)\(", "dinov2_triton/core/artifact_io.py"),
    (r"^\s*def (read_api_key|_read_api_key)\(", "dinov2_triton/serve/triton_access.py"),
    (r"^\s*def (normalise_config|_normalise_config|_normalize_config)\(", "dinov2_triton/serve/triton_access.py"),
    (r"^\s*def (parse_gate_overrides|parse_thresholds)\(", "dinov2_triton/export/gates.py"),
    (r"^API_KEY_HEADER\s*=", "dinov2_triton/serve/triton_access.py"),
    (r"^\s*def resource_path\(", "dinov2_triton/core/resources.py"),
])
def test_one_implementation_of_each_shared_concept(pattern, home):
    rx = re.compile(pattern, re.M)
    where = sorted(str(p.relative_to(ROOT)) for p in MODULES.values() if rx.search(p.read_text("utf-8")))
    assert where == [home], f"{pattern!r} should be defined only in {home}, found in {where}"


def test_os_replace_only_in_the_io_module():
    """Every atomic write goes through dinov2_triton.core.artifact_io (one permission and fsync policy);
    folder swaps (a rename of a whole directory) are the exception and say so."""
    offenders = []
    for p in MODULES.values():
        for i, line in enumerate(p.read_text("utf-8").splitlines(), 1):
            if "os.replace(" in line and p.name != "artifact_io.py" and "folder swap" not in line:
                offenders.append(f"{p.relative_to(ROOT)}:{i}")
    assert not offenders, f"hand-written temp-file writers: {offenders}"
