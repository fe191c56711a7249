"""TensorRT engines built in the pinned NVIDIA TensorRT container, where no matching TensorRT is installed.

A plan loads only in the TensorRT that built it, so the engines are built
with the TensorRT of the pinned release (dinov2_triton.core.release_pin),
inside ``TENSORRT_CONTAINER_IMAGE`` on a GPU host with docker and the NVIDIA
Container Toolkit:

    dinov2-triton export --in-container --variants trt_fp16,trt_int8 --model-path models/model_final.pth \\
        --data-path data --repository model_repository
        the whole export (build, verify against eager FP32 on the GPU, gate,
        publish with config.pbtxt; the ONNX parents are rebuilt in the same
        run). The packages of requirements/lock-gpu.txt (--lock-file), except
        TensorRT (the container's own is used), are installed once into the
        cache (network needed the first time; pip's own PIP_* settings, e.g.
        PIP_INDEX_URL, are passed in).
    python -m dinov2_triton.export.trt_build_main --in-container --onnx model.onnx --plan model.plan
        only the plan (TensorRT's Python bindings and the standard library:
        nothing is installed); neither verified nor published.

Where a matching TensorRT is installed, ``dinov2-triton export`` builds the
same variants in process, without this module.

The current folder is mounted at the same path and is the working folder:
give paths inside it. This package is mounted read-only and put on the
container's PYTHONPATH (a checkout and an installed wheel alike). The cache
(``$DINOV2_TRITON_CACHE``, default ``~/.cache/dinov2-triton``) is mounted at
the same path, so pip's cache, the installed packages (one folder per
lock-file hash) and the TensorRT timing caches survive ``docker run --rm``.
The container runs as the calling user: the files it writes stay theirs.

Inside, :func:`boot` (standard library only) checks that the container's
Python is the pin's, installs the lock when asked, and replaces itself with
the requested module.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from dinov2_triton.core.release_pin import ReleasePin, load_pin
from dinov2_triton.core.resources import cache_dir

DEFAULT_LOCK_FILE = "requirements/lock-gpu.txt"
#: where this package is mounted inside the container (read-only), put on PYTHONPATH
PACKAGE_MOUNT = "/opt/dinov2-triton"
MODES = ("export", "plans")
#: what runs in the container, per mode: ``python3 -m <these> ARGS``
MODULES = {"export": ("dinov2_triton.cli", "export"), "plans": ("dinov2_triton.export.trt_build_main",)}
#: lines of the lock that are not installed in the container: its own TensorRT and NVIDIA's index
_NOT_IN_CONTAINER = re.compile(r"^\s*(tensorrt[\w.-]*\s*(\[|==)|--extra-index-url\b)", re.I)


class ContainerBuildError(RuntimeError):
    """The container cannot be run here, or its inputs are wrong; str() says what to do."""


def lock_id(lock_text: str) -> str:
    return hashlib.sha256(lock_text.encode()).hexdigest()[:12]


def requirements_without_tensorrt(lock_text: str) -> str:
    """The lock's pins minus TensorRT and NVIDIA's index (the container ships its TensorRT)."""
    return "".join(line + "\n" for line in lock_text.splitlines() if not _NOT_IN_CONTAINER.match(line))


def docker_argv(args: Sequence[str], *, mode: str, pin: ReleasePin, workdir: str | os.PathLike,
                cache: str | os.PathLike, package_dir: str | os.PathLike, lock_file: str | os.PathLike | None,
                user: str, environ: dict | None = None) -> list[str]:
    """The ``docker run`` argv that runs ``python3 -m <module of mode> ARGS`` in the pinned
    TensorRT container (export mode: with the lock installed first)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    workdir, cache, package_dir = (str(Path(p).resolve()) for p in (workdir, cache, package_dir))
    env = dict(os.environ if environ is None else environ)
    boot = ["python3", "-m", "dinov2_triton.export.container", "--boot", "--mode", mode, "--python", pin.python,
            "--cache", cache, "--image", pin.tensorrt_image]
    mounts = ["-v", f"{workdir}:{workdir}", "-v", f"{cache}:{cache}",
              "-v", f"{package_dir}:{PACKAGE_MOUNT}/dinov2_triton:ro"]
    if mode == "export":
        if lock_file is None:
            raise ContainerBuildError("the export runs with the packages of the GPU lock: give --lock-file")
        lock = str(Path(lock_file).resolve())
        mounts += ["-v", f"{lock}:{lock}:ro"]
        boot += ["--lock-file", lock]
    passed = sorted(k for k in env if k.startswith("PIP_") and k != "PIP_TARGET")
    return ["docker", "run", "--rm", "--gpus", "all", "--ipc=host", "--user", user, *mounts, "-w", workdir,
            "-e", "HOME=/tmp", "-e", f"DINOV2_TRITON_CACHE={cache}", "-e", f"PYTHONPATH={PACKAGE_MOUNT}",
            *[w for k in passed for w in ("-e", k)],
            pin.tensorrt_image, *boot, "--", *args]


def run_in_container(args: Sequence[str], *, mode: str, lock_file: str | os.PathLike | None = DEFAULT_LOCK_FILE,
                     pin: ReleasePin | None = None) -> int:
    """Run ``dinov2-triton export ARGS`` (mode export) or the plan builder (mode plans)
    inside the pinned TensorRT container; returns its exit code."""
    from dinov2_triton.serve.container import check_host

    pin = pin or load_pin()
    if mode == "export":
        path = Path(lock_file or DEFAULT_LOCK_FILE)
        if not path.is_file():
            raise ContainerBuildError(f"--lock-file {path}: not found; the container installs the GPU lock "
                                      f"(requirements/lock-gpu.txt of the dinov2-triton source) from it")
        head = re.search(r"^#\s*python:\s*(\S+)", path.read_text(), re.M)
        if head and head.group(1) != pin.python:
            raise ContainerBuildError(f"{path} is for Python {head.group(1)}, the pinned containers have Python "
                                      f"{pin.python} (TRITON_PYTHON_VERSION of {pin.file})")
    outside = paths_outside(args, Path.cwd())
    if outside:
        raise ContainerBuildError(f"{outside[0]} is outside the current folder {Path.cwd()}, the only folder the "
                                  f"container sees: run from a folder that holds it, or copy it in")
    check_host(image=pin.tensorrt_image)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    import dinov2_triton

    argv = docker_argv(args, mode=mode, pin=pin, workdir=Path.cwd(), cache=cache,
                       package_dir=Path(dinov2_triton.__file__).parent,
                       lock_file=lock_file if mode == "export" else None, user=f"{os.getuid()}:{os.getgid()}")
    print(f"[in-container] {pin.tensorrt_image} (TensorRT {pin.tensorrt}, Python {pin.python}), cache {cache}: "
          f"python3 -m {' '.join((*MODULES[mode], *args))}", file=sys.stderr, flush=True)
    return subprocess.run(argv).returncode


def main_in_container(argv: Sequence[str] | None, *, mode: str) -> int:
    """What a command's ``main`` calls when its arguments hold ``--in-container``: the same
    command line, minus the container flags, run in the pinned TensorRT container."""
    from dinov2_triton.core.release_pin import PinError

    known, rest = split_container_flags(sys.argv[1:] if argv is None else argv, lock=mode == "export")
    try:
        return run_in_container(rest, mode=mode, lock_file=getattr(known, "lock_file", None))
    except (ContainerBuildError, PinError, RuntimeError) as exc:  # serve.container.ContainerError included
        print(f"error: {exc}", file=sys.stderr)
        return 2


def paths_outside(args: Sequence[str], folder: Path) -> list[str]:
    """The arguments (or ``--flag=`` values) that name an existing file or folder outside ``folder``."""
    folder = folder.resolve()
    out = []
    for arg in args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value or value.startswith("-") or not os.path.exists(value):
            continue
        path = Path(value).resolve()
        if path != folder and folder not in path.parents:
            out.append(value)
    return out


def split_container_flags(argv: Sequence[str], *, lock: bool = True) -> tuple[argparse.Namespace, list[str]]:
    """``(--in-container / --lock-file values, the other arguments)`` of a command line."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--in-container", action="store_true")
    if lock:
        p.add_argument("--lock-file", default=DEFAULT_LOCK_FILE)
    known, rest = p.parse_known_args(list(argv))
    return known, rest


def add_container_flags(parser: argparse.ArgumentParser, *, lock: bool = True) -> None:
    """The flags that send a command into the pinned TensorRT container (for --help)."""
    group = parser.add_argument_group("TensorRT container (GPU host with docker, no matching TensorRT here)")
    group.add_argument("--in-container", action="store_true",
                       help="run this command inside the pinned NVIDIA TensorRT container (the current folder "
                            "is mounted: give paths inside it), so the plans are built by the TensorRT the "
                            "pinned Triton loads")
    if lock:
        group.add_argument("--lock-file", default=DEFAULT_LOCK_FILE,
                           help="with --in-container: the GPU lock whose packages (except TensorRT) are "
                                "installed in the container, once per lock into the cache")


# --------------------------------------------------------------------------- inside the container
def _install_lock(lock_file: str, cache: Path, py: str) -> Path:
    """The lock's packages (without TensorRT) in ``cache/pydeps-py<py>-<lock id>``, installed once:
    into a sibling folder, renamed into place only when pip succeeded."""
    text = Path(lock_file).read_text()
    deps = cache / f"pydeps-py{py}-{lock_id(text)}"
    if (deps / ".complete").is_file():
        return deps
    print(f"[in-container] installing {lock_file} (without TensorRT) into {deps}", file=sys.stderr, flush=True)
    req = cache / f"lock-{lock_id(text)}-without-tensorrt.txt"
    req.write_text(requirements_without_tensorrt(text))
    partial = deps.with_name(deps.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                    "--target", str(partial), "--cache-dir", str(cache / "pip"), "-r", str(req)], check=True)
    (partial / ".complete").touch()
    shutil.rmtree(deps, ignore_errors=True)
    partial.rename(deps)
    return deps


def boot(argv: Sequence[str]) -> int:
    """The container's entry: check its Python against the pin, install the lock (export),
    then replace this process with the module of the mode."""
    p = argparse.ArgumentParser(prog="dinov2_triton.export.container --boot")
    p.add_argument("--boot", action="store_true")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--python", required=True, help="the pin's TRITON_PYTHON_VERSION")
    p.add_argument("--cache", required=True)
    p.add_argument("--image", default="the container")
    p.add_argument("--lock-file", default=None)
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = a.args[1:] if a.args[:1] == ["--"] else a.args
    py = "%d.%d" % sys.version_info[:2]
    if py != a.python:
        print(f"[in-container] {a.image} has Python {py}; the lock is for Python {a.python} (TRITON_PYTHON_VERSION "
              f"of the release pin): correct the pin and regenerate the lock", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if a.mode == "export":
        if not a.lock_file:
            print("[in-container] export mode needs --lock-file", file=sys.stderr)
            return 2
        deps = _install_lock(a.lock_file, Path(a.cache), py)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(deps), env.get("PYTHONPATH", "")) if x)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", *MODULES[a.mode], *rest], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(boot(sys.argv[1:]))
