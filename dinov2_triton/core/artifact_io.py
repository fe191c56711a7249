"""The one place that writes files other stages read, and stamps where they came from.

Every artifact that crosses a stage boundary (checkpoints, data manifests,
export manifests, perf results, config.pbtxt, API-key and pid files) is
written here:

* **atomic**: a temp file in the destination folder, flushed and fsync'd,
  then ``os.replace`` (and the folder fsync'd), so a reader never sees a
  half-written file and an interrupted writer leaves the old file intact;
* **one permission policy**: the usual umask permissions (as ``open()``
  would give; ``mkstemp``'s 0600 would hide a checkpoint from a serving
  container), or an explicit ``mode`` for secrets (0600 API keys);
* **strict JSON**: :func:`jsonable` turns numpy scalars/arrays, Paths,
  dataclasses and pydantic models into plain JSON, and NaN/inf into the
  strings ``"nan"``/``"inf"``/``"-inf"`` (strict JSON has no such numbers).

Provenance: :func:`git_revision`, :func:`library_versions`, :func:`new_run_id`,
:func:`sha256_file`, :func:`utc_now`.

Standard library only at import time: the TensorRT-container worker
(export/trt_build_main.py) imports it without torch or numpy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

#: distributions whose versions shape a model's numbers or a measurement
TRACKED_DISTRIBUTIONS = (
    "torch", "torchvision", "timm", "numpy", "pillow", "onnx", "onnxruntime", "onnxruntime-gpu",
    "onnxscript", "nvidia-modelopt", "openvino", "nncf", "peft", "scikit-learn", "tensorrt",
    "tritonclient", "nvidia-pytriton", "transformers",
)


# ----------------------------------------------------------------------------- atomic writes
def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file (before a rename publishes it) or a folder (so a rename
    inside it survives a power cut); best effort: a no-op where the OS does
    not allow opening the path read-only."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


fsync_dir = fsync_path  # the name the folder callers use


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *,
                 mode: int | None = None) -> Path:
    """Call ``write(binary_file)`` on a temp file beside ``path``, fsync it,
    set its permissions (``mode``, default the umask's), then rename it over
    ``path``. On any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def dumps_json(obj: Any) -> str:
    """Strict, indented JSON text of ``jsonable(obj)`` with a final newline."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, *, mode: int | None = None) -> Path:
    return atomic_write_text(path, dumps_json(obj), mode=mode)


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    import yaml

    return atomic_write_text(path, yaml.safe_dump(jsonable(obj), sort_keys=False))


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` through :func:`atomic_write` (checkpoints)."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


# ----------------------------------------------------------------------------- JSON
def jsonable(obj: Any) -> Any:
    """Plain, strict-JSON-able data: mappings/sequences recursively; numpy
    scalars and arrays, torch scalars, pydantic models and dataclasses to
    Python; Paths to str; NaN/inf to "nan"/"inf"/"-inf"; anything else str()."""
    if hasattr(obj, "model_dump") and callable(obj.model_dump):  # pydantic record
        return jsonable(obj.model_dump(mode="python"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # ndarray and numpy scalars
        return jsonable(obj.tolist())
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Parse a JSON file; a missing or malformed file raises ValueError /
    FileNotFoundError naming the file (and the line for a syntax error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
                         ) from None


# ----------------------------------------------------------------------------- provenance
def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_revision(root: str | os.PathLike | None = None) -> str:
    """Short commit of the checkout this code runs from, ``-dirty`` when
    tracked files changed, ``"unknown"`` outside a git checkout."""
    import subprocess

    cwd = root or Path(__file__).parent  # inside a checkout: its revision; installed: "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Python and the installed versions of TRACKED_DISTRIBUTIONS (+ ``extra``);
    distributions that are not installed are left out."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in (*TRACKED_DISTRIBUTIONS, *extra):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds, e.g. 2026-12-01T09:30:00+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """Sortable, unique run id: ``20261201T093000Z-1a2b3c``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
