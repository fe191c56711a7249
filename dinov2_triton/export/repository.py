"""Atomic publishing into the Triton model repository.

Per model, a new version is assembled in a staging folder INSIDE the model
folder (`<repo>/<model>/.staging-<pid>-<random>/`) and, once verified,
renamed to the next integer version (`<repo>/<model>/<N+1>/`) with one
os.rename. Why inside the model folder: Triton ignores a model's
non-numeric sub-folders, whereas any folder at the repository's top level is
taken for a model (a stale top-level staging folder would make the server
fail to start); and the rename stays on one filesystem, so it is atomic.

config.pbtxt and labels.txt are replaced (dinov2_triton.core.artifact_io's atomic writes)
only after the version folder is in place; old versions beyond `keep` are
removed only after that. An interrupted export leaves at most a staging folder, which the
next run removes (`clean_stale_staging`); the version being served is never
modified. One export at a time per repository (`RepositoryLock`)."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from dinov2_triton.core.artifact_io import atomic_write_bytes, atomic_write_text, fsync_dir, fsync_path

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
LOCK_FILE = ".export.lock"


class RepositoryError(RuntimeError):
    """The repository cannot be written as asked; the message names the path."""


def version_dirs(model_dir: str | os.PathLike) -> list[int]:
    """Published versions of a model (Triton's rule: positive integer names
    without a leading zero), ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    out = []
    for p in model_dir.iterdir():
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0"):
            out.append(int(p.name))
    return sorted(out)


def latest_version(model_dir: str | os.PathLike) -> int | None:
    versions = version_dirs(model_dir)
    return versions[-1] if versions else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def clean_stale_staging(repository: str | os.PathLike) -> list[Path]:
    """Remove staging folders left by interrupted exports (their process is
    gone, or it is this process's leftover). Call with the repository lock held."""
    repository = Path(repository)
    removed = []
    if not repository.is_dir():
        return removed
    for model_dir in repository.iterdir():
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for p in model_dir.iterdir():
            if not (p.is_dir() and p.name.startswith(STAGING_PREFIX)):
                continue
            pid_s = p.name[len(STAGING_PREFIX):].split("-", 1)[0]
            if pid_s.isdigit() and int(pid_s) != os.getpid() and _pid_alive(int(pid_s)):
                continue  # another live process (should not happen under the lock)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.warning("removed a staging folder left by an interrupted export: %s", p)
    return removed


class RepositoryLock:
    """An exclusive, non-blocking flock on <repo>/.export.lock (a file: Triton
    ignores files at the repository's top level)."""

    def __init__(self, repository: str | os.PathLike) -> None:
        self.path = Path(repository) / LOCK_FILE
        self._fh = None

    def __enter__(self) -> "RepositoryLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "unknown"
            self._fh.close()
            self._fh = None
            raise RepositoryError(f"{self.path}: another export is writing this repository "
                                  f"(pid {holder}); wait for it to finish") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class StagedVersion:
    """A version being assembled for `model_name`. Use as a context manager:
    leaving the block without `publish()` (an exception, KeyboardInterrupt,
    a failed gate) removes the staging folder and publishes nothing."""

    def __init__(self, repository: str | os.PathLike, model_name: str) -> None:
        self.repository = Path(repository)
        self.model_name = model_name
        self.model_dir = self.repository / model_name
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.model_dir))
        os.chmod(self.path, 0o755)
        self.version: int | None = None
        self.published_path: Path | None = None

    def __enter__(self) -> "StagedVersion":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def discard(self) -> None:
        if self.published_path is None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            # A model folder with no version and no config (a first export that
            # failed) would make Triton report a broken model: remove it.
            try:
                self.model_dir.rmdir()
            except OSError:
                pass  # not empty: earlier versions live there

    def publish(self, *, config_text: str, files: Mapping[str, bytes] | None = None, keep: int = 2) -> Path:
        """Rename the staging folder to the next version, then update the
        model-level files (config.pbtxt and `files`, e.g. labels.txt) and
        prune old versions. Returns the version folder."""
        if self.published_path is not None:
            raise RepositoryError(f"{self.path}: already published as {self.published_path}")
        if keep < 1:
            raise ValueError(f"keep={keep}: must keep at least the new version")
        for f in self.path.rglob("*"):
            if f.is_file():
                fsync_path(f)
        version = (latest_version(self.model_dir) or 0) + 1
        target = self.model_dir / str(version)
        try:
            os.rename(self.path, target)   # atomic: the version appears complete or not at all
        except OSError as exc:
            raise RepositoryError(f"cannot publish {self.path} as {target}: {exc}") from exc
        fsync_dir(self.model_dir)
        self.version, self.published_path = version, target
        for name, data in (files or {}).items():
            atomic_write_bytes(self.model_dir / name, data)
        atomic_write_text(self.model_dir / "config.pbtxt", config_text)
        prune_versions(self.model_dir, keep=keep)
        return target


def prune_versions(model_dir: str | os.PathLike, *, keep: int) -> list[int]:
    """Remove all but the newest `keep` versions; returns the removed ones."""
    versions = version_dirs(model_dir)
    old = versions[:-keep] if keep > 0 else []
    for v in old:
        # Rename first (not a version name any more), then delete: a crash
        # mid-delete never leaves a half-removed folder that looks like a version.
        doomed = Path(model_dir) / f"{STAGING_PREFIX}{os.getpid()}-old-{v}"
        os.rename(Path(model_dir) / str(v), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return old
