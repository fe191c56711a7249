"""The installable package: what pyproject.toml declares, and a wheel that works outside the checkout.

- the exact pins of ``dependencies`` and the ``cpu`` / ``dev`` extras are
  requirements/lock-cpu.txt's (the gpu extra against lock-gpu.txt:
  tests/test_gpu_stack.py);
- every third-party package the code imports is declared;
- (slow) ``pip wheel`` gives a wheel with all package data; installed with
  no index into a new venv that sees .venv's packages, ``dinov2-triton``
  runs from a folder outside the checkout and exports a tiny checkpoint.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinov2_triton"
LOCK_CPU = ROOT / "requirements" / "lock-cpu.txt"
#: imported only on GPU hosts: module -> the gpu extra's distribution
GPU_ONLY = {"tensorrt": "tensorrt-cu13", "cuda": "cuda-bindings"}
#: imported when present, declared nowhere on purpose: module -> why
OPTIONAL = {"xformers": "--attention xformers on GPU hosts; its wheels pin their own torch (environment.yml)"}
#: modules Triton's Python backend provides to the stand-in backends and the preprocessing model
TRITON_PROVIDED = {"triton_python_backend_utils", "c_python_backend_utils"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(reqs) -> dict[str, str | None]:
    out = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(?:==\s*([^\s;]+))?.*", req)
        assert m, f"pyproject.toml: cannot read requirement {req!r}"
        out[_norm(m.group(1))] = m.group(3)
    return out


def _lock(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)", line)
        if m:
            out[_norm(m.group(1))] = m.group(3)
    return out


def test_declared_pins_are_the_cpu_locks():
    project, lock = _project(), _lock(LOCK_CPU)
    declared = _pins(project["dependencies"])
    for extra in ("cpu", "dev"):
        declared.update(_pins(project["optional-dependencies"][extra]))
    bad = [f"{name}: pyproject {'==' + v if v else 'unpinned'}, {LOCK_CPU.name} "
           f"{'==' + lock[name] if name in lock else 'nothing'}"
           for name, v in sorted(declared.items()) if v is None or lock.get(name) != v]
    assert not bad, "pyproject.toml and requirements/lock-cpu.txt disagree:\n" + "\n".join(bad)
    assert project["dynamic"] == ["version"] and "version" not in project


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files that import it, over every .py file the package ships."""
    # files that Triton loads by path import their siblings by name (standin_common, ...)
    local = {p.stem for p in PACKAGE.rglob("resources/**/*.py")}
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if (top in sys.stdlib_module_names or top in ("__future__", "dinov2_triton") or top in local
                        or top in TRITON_PROVIDED):
                    continue
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    project = _project()
    base = set(_pins(project["dependencies"]))
    cpu = base | set(_pins(project["optional-dependencies"]["cpu"]))
    gpu = base | set(_pins(project["optional-dependencies"]["gpu"]))
    providers = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "numpy", "pydantic", "onnx", "tritonclient"} <= set(imports)   # the walk sees the code
    bad = []
    for module, files in sorted(imports.items()):
        where = ", ".join(sorted(files)[:3])
        if module in OPTIONAL:
            continue
        if module in GPU_ONLY:
            if _norm(GPU_ONLY[module]) not in gpu:
                bad.append(f"{module} ({where}): {GPU_ONLY[module]} is not in the gpu extra")
            continue
        dists = {_norm(d) for d in providers.get(module, ())}
        if not dists:
            bad.append(f"{module} ({where}): no installed distribution provides it")
        elif not dists & cpu:
            bad.append(f"{module} ({where}): its distribution {sorted(dists)} is not declared in "
                       "dependencies or the cpu extra")
    assert not bad, "undeclared imports:\n" + "\n".join(bad)


def test_the_installed_metadata_is_this_version():
    import dinov2_triton

    assert importlib.metadata.version("dinov2-triton") == dinov2_triton.__version__ == "0.2.0"


# --------------------------------------------------------------------------- the wheel, installed
def _package_data() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*")
            if p.is_file() and "resources" in p.relative_to(PACKAGE).parts[:-1] and "__pycache__" not in p.parts
            and p.suffix != ".pyc"}


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path, tiny_checkpoint):
    # Build from a copy (pyproject.toml, README.md, the package with any __pycache__), so the shared
    # checkout gets no build/ or *.egg-info; pip wheel --no-build-isolation uses .venv's setuptools.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / PACKAGE.name)
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = wheels.glob("dinov2_triton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _package_data() <= names, f"package data missing from the wheel: {sorted(_package_data() - names)}"
    assert "dinov2_triton/serve/resources/backends/onnxruntime/model.py" in names
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "dinov2-triton = dinov2_triton.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # A new venv that sees .venv's packages through a .pth line (no index, nothing downloaded). A path
    # line does not run .venv's own .pth files, so the editable install of the checkout stays out.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dinov2_triton_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="2", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def run(*cmd, timeout=120):
        return subprocess.run([str(c) for c in cmd], cwd=outside, env=env, capture_output=True, text=True,
                              timeout=timeout)

    res = run(python, "-c", "import dinov2_triton, importlib.metadata as m; "
                            "print(dinov2_triton.__file__); print(m.version('dinov2-triton'))")
    assert res.returncode == 0, res.stderr
    where, version = res.stdout.split()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT), where
    assert version == "0.2.0"
    command = venv / "bin" / "dinov2-triton"
    res = run(command, "--help")
    assert res.returncode == 0 and "export" in res.stdout and "pipeline" in res.stdout, res.stderr
    res = run(command, "export", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: dinov2-triton export "), res.stderr

    repo = tmp_path / "repository"
    res = run(command, "export", "--model-path", tiny_checkpoint, "--repository", repo, "--variants", "onnx",
              "--bench-seconds", "0", "-q", timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for rel in ("export_manifest.json", "dinov2_onnx/config.pbtxt", "dinov2_onnx/1/model.onnx",
                "dinov2_preprocess/config.pbtxt", "dinov2_preprocess/1/preprocessing.json", "dinov2/config.pbtxt"):
        assert (repo / rel).is_file(), rel
    # the preprocessing model was copied from the installed package's data, not from the checkout
    installed = Path(where).parent / "serve" / "resources" / "preprocess_model" / "model.py"
    assert (repo / "dinov2_preprocess" / "1" / "model.py").read_bytes() == installed.read_bytes()
