"""Skip a pipeline stage whose inputs have not changed (what ``make`` does, by content).

``scripts/pipeline.sh`` wraps every stage in::

    python -m dinov2_triton.core.stage_stamp check  --state DIR --stage train --input data/manifest.csv \
        --param "lr=1e-3" ... --output models/model_final.pth
    python -m dinov2_triton.core.stage_stamp start  ...same arguments...   # before running it
    python -m dinov2_triton.core.stage_stamp finish ...same arguments...   # after it succeeded

The fingerprint of a stage is the SHA-256 of its inputs' content (a folder:
every file's relative path and checksum, links followed, so an ImageFolder
tree's listing *and* its bytes count; ``__pycache__`` is left out, so a
stage's own source package can be an input: new code reruns the stage), its parameters (flags, weights) and
the stage name. ``check`` exits 0 ("up to date": the last finished run had
the same fingerprint and its outputs still hold the bytes it wrote) or 1,
and prints one line saying why. ``start`` records the fingerprint of a run
that has begun: ``check --print-resume`` then tells the pipeline whether an
unfinished run with the *same* inputs may resume (training resumes exactly
inside its stage) or must start over.

Stamps are small JSON files under ``--state`` (the pipeline uses
``runs/pipeline/``), written atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
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
    return state / f"{stage}.{kind}.json"


def check(state: Path, stage: str, inputs: Sequence[str], params: Sequence[str],
          outputs: Sequence[str]) -> tuple[bool, str]:
    """(up_to_date, one-line reason)."""
    want = fingerprint(stage, inputs, params)
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
    now = _outputs_digest(outputs)
    for out, digest in now.items():
        if digest is None:
            return False, f"output {out} is missing"
        if done.get("outputs", {}).get(out) != digest:
            return False, f"output {out} changed since it was written"
    return True, f"inputs unchanged since {done.get('finished', '?')}"


def may_resume(state: Path, stage: str, inputs: Sequence[str], params: Sequence[str]) -> bool:
    """True when the last *started* run had the same fingerprint (it may
    continue from its own checkpoint); False when inputs changed."""
    path = _stamp_path(state, stage, "started")
    if not path.is_file():
        return False
    try:
        return read_json(path).get("fingerprint") == fingerprint(stage, inputs, params)
    except ValueError:
        return False


def record(state: Path, stage: str, kind: str, inputs: Sequence[str], params: Sequence[str],
           outputs: Sequence[str]) -> Path:
    doc = {"schema_version": SCHEMA_VERSION, "stage": stage,
           "fingerprint": fingerprint(stage, inputs, params),
           "inputs": list(inputs), "params": sorted(params)}
    if kind == "done":
        doc.update(finished=utc_now(), outputs=_outputs_digest(outputs))
    else:
        doc.update(started=utc_now())
    return atomic_write_json(_stamp_path(state, stage, kind), doc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinov2_triton.core.stage_stamp", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("check", "start", "finish", "resume"),
                   help="check: exit 0 if up to date; start/finish: record a run; "
                        "resume: exit 0 if an unfinished run with the same inputs may resume")
    p.add_argument("--state", required=True, type=Path, help="folder holding the stamps")
    p.add_argument("--stage", required=True)
    p.add_argument("--input", action="append", default=[], help="file or folder whose content counts")
    p.add_argument("--param", action="append", default=[], help="KEY=VALUE that counts (flags, weights)")
    p.add_argument("--output", action="append", default=[], help="file the stage produces")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.action == "check":
        ok, why = check(a.state, a.stage, a.input, a.param, a.output)
        print(f"[pipeline] {a.stage}: {'up to date, skipped' if ok else 'runs'} ({why})", flush=True)
        return 0 if ok else 1
    if a.action == "resume":
        return 0 if may_resume(a.state, a.stage, a.input, a.param) else 1
    record(a.state, a.stage, "done" if a.action == "finish" else "started", a.input, a.param, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
