"""Checkpoint records: what `model_final.pth` holds and how it is written.

Writes are atomic (temp file in the same folder, fsync, os.replace) so an
interrupted run never leaves a truncated checkpoint behind, and every value is
a plain type or a tensor so `torch.load(weights_only=True)` can read it."""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from train.model import CHECKPOINT_FORMAT_VERSION, DinoV2Classifier


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model's numbers (for manifests)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "timm", "torchvision", "numpy", "onnx", "onnxruntime",
                 "nvidia-modelopt", "peft", "scikit-learn", "tensorrt", "tritonclient"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def git_revision(root: str | os.PathLike | None = None) -> str:
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root or Path(__file__).parent, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def make_record(model: DinoV2Classifier, *, arch: str, img_size: int, class_names: Sequence[str],
                preprocessing: Mapping[str, Any], weights_source: str,
                metrics: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                backbone_overrides: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The weights-only record of a trained classifier (see docs/architecture.md)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "arch": arch,
        "img_size": int(img_size),
        "num_classes": len(class_names),
        "head": model.head_type,
        "class_names": list(class_names),
        "preprocessing": dict(preprocessing),
        "weights_source": weights_source,
        "backbone_overrides": dict(backbone_overrides or {}),
        "state_dict": state,
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "versions": library_versions(),
        "git_revision": git_revision(),
        **extra,
    }


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside `path`, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; a checkpoint must stay readable by other users
        # (a serving container, a colleague) like any file written with open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
