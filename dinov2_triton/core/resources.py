"""Package data, read through ``importlib.resources`` (never through the checkout's folders).

Non-Python files that ship with the package: the pinned GPU release
(``core/resources/triton_release.env``), and the serving stage's stand-in
backends, preprocessing model, Dockerfile and Kubernetes templates
(``serve/resources/``). ``resource_dir`` gives a real folder on disk for
tools that need one (tritonserver's ``--backend-directory``, kustomize):
an installed wheel unpacks to a folder, so this is the package's own folder.
And the project's cache folder (``cache_dir``), where what is built once per
machine is kept.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def resource_path(package: str, *parts: str) -> Path:
    """The file or folder ``parts`` under ``package``'s ``resources/`` folder, as a path on disk.

    Raises FileNotFoundError naming the resource when the install lacks it."""
    ref = resources.files(package).joinpath("resources", *parts)
    path = Path(str(ref))
    if not path.exists():
        raise FileNotFoundError(f"package data {package}/resources/{'/'.join(parts)} is missing from this "
                                f"install ({path}): reinstall dinov2-triton")
    return path


#: names the project's cache folder when set (the TensorRT container mounts the host's there)
CACHE_ENV = "DINOV2_TRITON_CACHE"


def cache_dir() -> Path:
    """The project's cache folder: $DINOV2_TRITON_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/dinov2-triton."""
    import os

    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dinov2-triton"
