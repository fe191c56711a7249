"""Skip a pipeline stage whose inputs have not changed (what ``make`` does, by content).

The pipeline runner (dinov2_triton.pipeline.runner) wraps every stage that
builds something (data, train, export) in a :class:`Stamp`::

    stamp = Stamp(state_dir, "train", inputs=[data / "manifest.csv", train_code_dir],
                  params=["train={...}"], outputs=[models / "model_final.pth"])
    up_to_date, why = stamp.check()        # skip the stage when True
    stamp.start()                          # before running it
    ...
    stamp.finish()                         # after it succeeded

The fingerprint of a stage is the SHA-256 of its inputs' content (a folder:
every file's relative path and checksum, links followed, so an ImageFolder
tree's listing *and* its bytes count; ``__pycache__`` is left out, so a
stage's own source package can be an input: new code reruns the stage), its
parameters (settings, weights) and the stage name. ``check`` says "up to
date" when the last finished run had the same fingerprint and its outputs
still hold the bytes it wrote. ``start`` records the fingerprint of a run that
has begun: ``may_resume`` then tells whether an unfinished run with the *same*
inputs may resume (training resumes exactly inside its stage) or must start
over.

Stamps are small JSON files (``<stage>.started.json``, ``<stage>.done.json``)
in the state folder (the pipeline's ``<workdir>/state/``), written atomically.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from dinov2_triton.core.artifact_io import atomic_write_json, read_json, sha256_file, utc_now

SCHEMA_VERSION = 1


def _hash_path(h: "hashlib._Hash", path: Path) -> None:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        h.update(f"dir:{len(files)}\n".encode())
        for p in files:
            rel = p.relative_to(path).as_posix()
            h.update(f"{rel}\0{sha256_file(p)}\n".encode())
    elif path.is_file():
        h.update(f"file:{sha256_file(path)}\n".encode())
    else:
        h.update(b"missing\n")


def fingerprint(stage: str, inputs: Iterable[str | os.PathLike], params: Iterable[str]) -> str:
    """SHA-256 over the stage name, every input's content and the parameters."""
    h = hashlib.sha256(f"stage:{stage}\n".encode())
    for item in inputs:
        h.update(f"input:{item}\n".encode())
        _hash_path(h, Path(item))
    for p in sorted(params):
        h.update(f"param:{p}\n".encode())
    return h.hexdigest()


def _outputs_digest(outputs: Iterable[str | os.PathLike]) -> dict[str, str | None]:
    return {str(o): (sha256_file(o) if Path(o).is_file() else ("dir" if Path(o).is_dir() else None))
            for o in outputs}


def _stamp_path(state: Path, stage: str, kind: str) -> Path:
    return Path(state) / f"{stage}.{kind}.json"


def _check(state: Path, stage: str, want: str, outputs: Sequence[str | os.PathLike]) -> tuple[bool, str]:
    path = _stamp_path(state, stage, "done")
    if not path.is_file():
        return False, "no finished run recorded"
    try:
        done = read_json(path, what="stage stamp")
    except ValueError as exc:
        return False, f"unreadable stamp ({exc})"
    if done.get("schema_version") != SCHEMA_VERSION:
        return False, f"{path}: stamp of another schema"
    if done.get("fingerprint") != want:
        return False, "inputs or parameters changed since the last run"
    for out, digest in _outputs_digest(outputs).items():
        if digest is None:
            return False, f"output {out} is missing"
        if done.get("outputs", {}).get(out) != digest:
            return False, f"output {out} changed since it was written"
    return True, f"inputs unchanged since {done.get('finished', '?')}"


def _may_resume(state: Path, stage: str, want: str) -> bool:
    path = _stamp_path(state, stage, "started")
    if not path.is_file():
        return False
    try:
        return read_json(path).get("fingerprint") == want
    except ValueError:
        return False


def _record(state: Path, stage: str, kind: str, want: str, inputs: Sequence[str | os.PathLike],
            params: Sequence[str], outputs: Sequence[str | os.PathLike]) -> Path:
    doc = {"schema_version": SCHEMA_VERSION, "stage": stage, "fingerprint": want,
           "inputs": [str(i) for i in inputs], "params": sorted(params)}
    if kind == "done":
        doc.update(finished=utc_now(), outputs=_outputs_digest(outputs))
    else:
        doc.update(started=utc_now())
    return atomic_write_json(_stamp_path(state, stage, kind), doc)


def check(state: Path, stage: str, inputs: Sequence[str | os.PathLike], params: Sequence[str],
          outputs: Sequence[str | os.PathLike]) -> tuple[bool, str]:
    """(up_to_date, one-line reason)."""
    return _check(state, stage, fingerprint(stage, inputs, params), outputs)


def may_resume(state: Path, stage: str, inputs: Sequence[str | os.PathLike], params: Sequence[str]) -> bool:
    """True when the last *started* run had the same fingerprint (it may
    continue from its own checkpoint); False when inputs changed."""
    return _may_resume(state, stage, fingerprint(stage, inputs, params))


def record(state: Path, stage: str, kind: str, inputs: Sequence[str | os.PathLike], params: Sequence[str],
           outputs: Sequence[str | os.PathLike]) -> Path:
    """Write the ``started`` or ``done`` stamp of a run."""
    if kind not in ("started", "done"):
        raise ValueError(f"stamp kind {kind!r}: choose started or done")
    return _record(state, stage, kind, fingerprint(stage, inputs, params), inputs, params, outputs)


class Stamp:
    """One stage's stamps: its inputs are hashed once, when first needed, so
    ``check``, ``start`` and ``finish`` agree on what the run was made from
    (an input the stage itself rewrites does not make its own run look stale)."""

    def __init__(self, state: str | os.PathLike, stage: str, *, inputs: Sequence[str | os.PathLike] = (),
                 params: Sequence[str] = (), outputs: Sequence[str | os.PathLike] = ()) -> None:
        self.state, self.stage = Path(state), stage
        self.inputs, self.params, self.outputs = list(inputs), list(params), list(outputs)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.stage, self.inputs, self.params)
        return self._fingerprint

    def check(self) -> tuple[bool, str]:
        """(up_to_date, one-line reason)."""
        return _check(self.state, self.stage, self.fingerprint, self.outputs)

    def may_resume(self) -> bool:
        """An unfinished run with the same fingerprint was started: it may continue."""
        return _may_resume(self.state, self.stage, self.fingerprint)

    def start(self) -> Path:
        return _record(self.state, self.stage, "started", self.fingerprint, self.inputs, self.params, self.outputs)

    def finish(self) -> Path:
        return _record(self.state, self.stage, "done", self.fingerprint, self.inputs, self.params, self.outputs)
