"""What a Triton client needs besides the server: the image files, the
stored preprocessing record and the class names.

Used by the client CLI (perf/client.py), the classifier (perf/classifier.py)
and parity (perf/parity.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from dinov2_triton.export.triton_config import LABELS_FILE, PREPROCESS_MODEL

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm"})


def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively, image suffixes only, sorted).

    Returns (files, problems): a path that does not exist, or a folder with no
    image, becomes a ``(path, reason)`` problem. A file named explicitly is
    kept whatever its suffix (the server judges its content).
    """
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((str(p), f"folder has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append((str(p), "no such file or folder"))
    return files, problems


def load_preprocessing(*, model_path: str | os.PathLike | None = None,
                       preprocessing: str | os.PathLike | None = None,
                       repository: str | os.PathLike | None = None,
                       preprocess_model: str = PREPROCESS_MODEL):
    """The stored preprocessing record as a ``PreprocessConfig``, chosen by
    dinov2_triton.train.preprocessing_source.resolve_preprocessing (one documented order; a
    repository whose record differs from the checkpoint's is an error).
    Raises ValueError naming the file(s) at fault."""
    from dinov2_triton.train.preprocessing_source import resolve_preprocessing

    cfg, _source = resolve_preprocessing(preprocessing=preprocessing, model_path=model_path,
                                         repository=repository, model=preprocess_model)
    return cfg


def read_repository_labels(repository: str | os.PathLike, model: str) -> list[str] | None:
    """labels.txt of ``model`` in a local repository (None when it has none)."""
    f = Path(repository) / model / LABELS_FILE
    if f.is_file():
        return [line for line in f.read_text(encoding="utf-8").split("\n") if line]
    return None
