"""Which preprocessing record a consumer uses, and where it came from: one
rule, :func:`resolve_preprocessing`, for the client, parity, dinov2_triton.pipeline.bench_stage and
the in-process benchmark.

Kept apart from train/preprocessing.py because that file is copied into the
served preprocess model (no project imports there); this module reads
checkpoints and repositories."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from dinov2_triton.core.artifact_io import read_json
from dinov2_triton.core.preprocessing import PreprocessConfig
from dinov2_triton.train.checkpoint import read_checkpoint

#: the Triton model that runs the record server-side, and the record's file in
#: each of its version folders (written by export, read by the server and here)
PREPROCESS_MODEL = "dinov2_preprocess"
PREPROCESSING_FILE = "preprocessing.json"


class PreprocessingError(ValueError):
    """No usable preprocessing record, or two records that disagree; the
    message names the file(s)."""


def read_preprocessing_file(path: str | Path) -> PreprocessConfig:
    """A JSON file holding the record (``preprocessing.json``) or a JSON object
    with a ``"preprocessing"`` entry (``export_manifest.json``)."""
    path = Path(path)
    try:
        data = read_json(path, what="preprocessing file")
    except (OSError, ValueError) as exc:
        raise PreprocessingError(str(exc)) from None
    if isinstance(data, Mapping) and isinstance(data.get("preprocessing"), Mapping):
        data = data["preprocessing"]
    if not isinstance(data, Mapping):
        raise PreprocessingError(f"{path}: expected a preprocessing record (a JSON object)")
    try:
        return PreprocessConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(f"{path}: {exc}") from None


def repository_preprocessing_file(repository: str | Path, model: str = PREPROCESS_MODEL) -> Path:
    """The record a model repository serves: the newest numbered version of
    ``<model>/<version>/preprocessing.json``, else ``<model>/preprocessing.json``,
    else the ``preprocessing`` entry of ``export_manifest.json``."""
    repo = Path(repository)
    if not repo.is_dir():
        raise PreprocessingError(f"--repository {repo}: not a folder")
    model_dir = repo / model
    versions = sorted((p for p in model_dir.glob(f"*/{PREPROCESSING_FILE}") if p.parent.name.isdigit()),
                      key=lambda p: -int(p.parent.name))
    for cand in [*versions, model_dir / PREPROCESSING_FILE, repo / "export_manifest.json"]:
        if cand.is_file():
            return cand
    raise PreprocessingError(f"--repository {repo}: neither {model_dir}/<version>/{PREPROCESSING_FILE} "
                             f"nor {repo / 'export_manifest.json'} exists; was it written by `dinov2-triton export`?")


def _differences(a: PreprocessConfig, b: PreprocessConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])


def resolve_preprocessing(*, preprocessing=None, model_path=None, repository=None,
                          model: str = PREPROCESS_MODEL, checkpoint=None) -> tuple[PreprocessConfig, str]:
    """The preprocessing record a consumer (client, parity, dinov2_triton.pipeline.bench_stage, the
    in-process benchmark) must use, and where it came from. One order:

    1. ``preprocessing``: a file the user named explicitly (``--preprocessing``)
       is used as given; nothing else is read.
    2. ``repository`` (``--repository``): the record the server runs
       (:func:`repository_preprocessing_file`). When ``model_path`` is given
       too, the checkpoint's record must be identical: a difference means the
       repository was exported from another checkpoint (or another record) and
       is a PreprocessingError naming both files, never a silent choice. A
       repository without any record is an error, unless ``model_path`` is
       given (then its record is the only one, and the source says so).
    3. ``model_path`` alone: the checkpoint's ``preprocessing`` (dinov2_triton.train.checkpoint).

    ``checkpoint``: the CheckpointRecord of ``model_path`` when the caller has
    already read it (saves a second torch.load). Raises PreprocessingError (or
    dinov2_triton.core.records.RecordError for a bad checkpoint), both ValueErrors naming
    the file at fault."""
    if preprocessing is not None:
        return read_preprocessing_file(preprocessing), f"{preprocessing} (given explicitly)"
    ckpt = None
    if checkpoint is not None:
        ckpt = checkpoint.preprocessing
    elif model_path is not None:
        ckpt = read_checkpoint(model_path).preprocessing
    if repository is not None:
        try:
            repo_file = repository_preprocessing_file(repository, model)
        except PreprocessingError as exc:
            if ckpt is None:
                raise
            return ckpt, f"{model_path} (the repository holds no record: {exc})"
        served = read_preprocessing_file(repo_file)
        if ckpt is not None and served != ckpt:
            raise PreprocessingError(
                f"{repo_file} and {model_path} hold different preprocessing records "
                f"({_differences(served, ckpt)}): the repository was exported from another checkpoint. "
                f"Re-export it (dinov2-triton export --model-path {model_path} ...) or pass the checkpoint "
                "it was exported from")
        return served, (f"{repo_file} (= {model_path})" if ckpt is not None else str(repo_file))
    if ckpt is not None:
        return ckpt, str(model_path)
    raise PreprocessingError("no preprocessing record: pass --model-path model_final.pth, --preprocessing "
                             "preprocessing.json or --repository ./model_repository")
