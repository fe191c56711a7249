"""Where the tritonserver binary is, and the backend directory it runs with.

nvidia-pytriton 0.7.0 carries a tritonserver 2.51.0 binary (the server of
the NVIDIA container of the release pin, dinov2_triton.core.release_pin) with only the
``python`` backend. To serve the project's model repository UNCHANGED,
:func:`build_backend_dir` builds a backend directory::

    <backend_dir>/python/       libtriton_python.so, triton_python_backend_utils.py,
                                triton_python_backend_stub (this Python version)
    <backend_dir>/onnxruntime/model.py   <- serve/backends/onnxruntime/model.py
    <backend_dir>/pytorch/model.py       <- serve/backends/pytorch/model.py
    <backend_dir>/openvino/model.py      <- serve/backends/openvino/model.py
    <backend_dir>/standin_common.py      <- serve/backends/standin_common.py
                                            (each model.py loads it from one folder up)

Triton maps ``platform: "onnxruntime_onnx"`` to the backend ``onnxruntime``
and ``pytorch_libtorch`` to ``pytorch`` (an OpenVINO model names its backend,
``backend: "openvino"``, directly); finding no ``libtriton_<name>.so``
but a ``model.py`` in ``<backend_dir>/<name>/``, it runs that file through
the Python backend ("Python-based backends").
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dinov2_triton.core.resources import resource_path
from dinov2_triton.serve.errors import ServeError

STANDIN_BACKENDS = resource_path("dinov2_triton.serve", "backends")


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    lib_dir: Path
    python_backend: Path  # folder with libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version


def find_triton() -> TritonInstall:
    """Locate tritonserver and its Python backend inside the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("nvidia-pytriton is not installed in this environment; "
                         "run scripts/setup_env.sh (it ships the tritonserver binary)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    ts = pkg / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=ts / "bin" / "tritonserver",
        lib_dir=pkg.parent / "nvidia_pytriton.libs",
        python_backend=ts / "backends" / "python",
        stub=ts / "python_backend_stubs" / py / "triton_python_backend_stub",
    )
    for path in (install.binary, install.lib_dir, install.python_backend / "libtriton_python.so",
                 install.stub):
        if not path.exists():
            raise ServeError(f"incomplete nvidia-pytriton install: {path} is missing")
    return install


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dinov2-triton"


def build_backend_dir(cache_dir: str | os.PathLike | None = None,
                      install: TritonInstall | None = None) -> Path:
    """Create (once) and return the backend directory described in the module doc.

    It lives under ``cache_dir`` (default ``$XDG_CACHE_HOME/dinov2-triton`` or
    ``~/.cache/dinov2-triton``, never inside the repository) in a folder named
    after a hash of its sources, so editing a stand-in makes a fresh copy.
    """
    install = install or find_triton()
    sources = {
        "python/libtriton_python.so": install.python_backend / "libtriton_python.so",
        "python/triton_python_backend_utils.py":
            install.python_backend / "triton_python_backend_utils.py",
        "python/triton_python_backend_stub": install.stub,
        "onnxruntime/model.py": STANDIN_BACKENDS / "onnxruntime" / "model.py",
        "pytorch/model.py": STANDIN_BACKENDS / "pytorch" / "model.py",
        "openvino/model.py": STANDIN_BACKENDS / "openvino" / "model.py",
        "standin_common.py": STANDIN_BACKENDS / "standin_common.py",
    }
    digest = hashlib.sha256()
    for rel, src in sorted(sources.items()):
        digest.update(rel.encode())
        digest.update(src.read_bytes())
    root = Path(cache_dir) if cache_dir else _cache_root()
    target = root / f"backends-{digest.hexdigest()[:16]}"
    if (target / "python" / "libtriton_python.so").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # a whole folder is staged and renamed into place (os.rename of a folder is
    # atomic): a concurrent server never sees a half-copied backend
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=root))
    try:
        for rel, src in sources.items():
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        os.chmod(staging, 0o755)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "python" / "libtriton_python.so").exists():  # lost a race: fine
            raise
    return target


def _venv_bin() -> Path:
    return Path(sys.prefix) / "bin"


def server_env(install: TritonInstall | None = None) -> dict:
    """Environment for tritonserver: its libraries, and this venv first on PATH.

    The Python stub embeds libpython in isolated mode (PYTHONPATH is ignored);
    it finds the venv's packages through the ``python3`` first on PATH.
    """
    install = install or find_triton()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(_venv_bin()), env.get("PATH", "")]).rstrip(os.pathsep)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(install.lib_dir), env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env
