"""Read the data folder written by `dinov2-triton data` (contract:
train/data_folder.py, docs/architecture.md "Stage 1"): the manifest, the
labels and a map-style dataset for torch's DataLoader.

Importing this module is cheap (no torch): `read_labels` and `read_manifest`
are also used by export and serving code. `ManifestDataset` imports torch
when it is created."""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

from dinov2_triton.core.artifact_io import sha256_file
from dinov2_triton.data.folder import LABELS_FILE, MANIFEST_COLUMNS, MANIFEST_FILE, SPLITS

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """The data folder's manifest or labels are missing or malformed; the
    message names the file (and line)."""


@dataclass(frozen=True)
class ManifestRow:
    path: str          # relative to the data folder, POSIX separators
    label: int
    class_name: str
    split: str
    sha256: str

    def file(self, data_path: str | Path) -> Path:
        return Path(data_path) / self.path


def read_labels(data_path: str | Path) -> list[str]:
    """Class names in label order (labels.txt, one per line)."""
    f = Path(data_path) / LABELS_FILE
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{f}: not found; run `dinov2-triton data --data-path "
                            f"{data_path}` first") from exc
    names = text.split("\n")
    if names and names[-1] == "":
        names.pop()
    for i, n in enumerate(names, 1):
        if not n.strip():
            raise ManifestError(f"{f}:{i}: empty class name")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ManifestError(f"{f}: duplicate class names {dup}")
    if len(names) < 2:
        raise ManifestError(f"{f}: {len(names)} class(es); a classifier needs at least 2")
    return names


def read_manifest(data_path: str | Path, split: str | Iterable[str] | None = None) -> list[ManifestRow]:
    """All rows of manifest.csv (or those of `split`), validated against
    labels.txt. Raises ManifestError naming the file and line of a bad row."""
    data_path = Path(data_path)
    f = data_path / MANIFEST_FILE
    labels = read_labels(data_path)
    wanted = None
    if split is not None:
        wanted = {split} if isinstance(split, str) else set(split)
        unknown = wanted - set(SPLITS)
        if unknown:
            raise ValueError(f"split {sorted(unknown)}: choose from {SPLITS}")
    records: list[ManifestRow] = []
    seen: dict[str, int] = {}
    try:
        fh = open(f, newline="", encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{f}: not found; run `dinov2-triton data --data-path "
                            f"{data_path}` first") from exc
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != MANIFEST_COLUMNS:
            raise ManifestError(f"{f}:1: header is {header}, expected {','.join(MANIFEST_COLUMNS)}")
        for row in reader:
            line = reader.line_num
            where = f"{f}:{line}"
            if not row:
                continue
            if len(row) != len(MANIFEST_COLUMNS):
                raise ManifestError(f"{where}: {len(row)} fields, expected {len(MANIFEST_COLUMNS)} "
                                    f"({','.join(MANIFEST_COLUMNS)})")
            path, label_s, class_name, row_split, sha = row
            p = PurePosixPath(path)
            if not path or p.is_absolute() or ".." in p.parts or "\\" in path:
                raise ManifestError(f"{where}: path {path!r} must be relative to the data folder")
            try:
                label = int(label_s)
            except ValueError:
                raise ManifestError(f"{where}: label {label_s!r} is not an integer") from None
            if not 0 <= label < len(labels):
                raise ManifestError(f"{where}: label {label} out of range 0..{len(labels) - 1} "
                                    f"({LABELS_FILE} has {len(labels)} classes)")
            if class_name != labels[label]:
                raise ManifestError(f"{where}: class_name {class_name!r} does not match label "
                                    f"{label} ({labels[label]!r} in {LABELS_FILE})")
            if row_split not in SPLITS:
                raise ManifestError(f"{where}: split {row_split!r} is not one of {SPLITS}")
            if not _SHA256.match(sha):
                raise ManifestError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits")
            if path in seen:
                raise ManifestError(f"{where}: path {path!r} already listed on line {seen[path]}")
            seen[path] = line
            if wanted is None or row_split in wanted:
                records.append(ManifestRow(path, label, class_name, row_split, sha))
    return records


def verify_checksums(data_path: str | Path, records: Sequence[ManifestRow] | None = None, *,
                     split: str | None = None, raise_on_error: bool = True) -> list[str]:
    """Hash every listed file and compare with the manifest. Returns the list of
    problems (missing file, dangling link, changed content); raises
    ManifestError listing them when raise_on_error."""
    data_path = Path(data_path)
    if records is None:
        records = read_manifest(data_path, split)
    problems = []
    for r in records:
        f = r.file(data_path)
        try:
            digest = sha256_file(f)
        except OSError as exc:
            problems.append(f"{r.path}: cannot read ({exc.strerror or exc})")
            continue
        if digest != r.sha256:
            problems.append(f"{r.path}: sha256 {digest} differs from the manifest "
                            f"({r.sha256}); the source file changed since load_data ran")
    if problems and raise_on_error:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"{data_path}: {len(problems)} of {len(records)} files fail the "
                            f"checksum check:\n  {shown}{more}")
    return problems


class ManifestDataset:
    """Map-style dataset over one split of a data folder: item i is
    (transform(open_rgb(file)), label).

    `transform` maps an RGB PIL image to a tensor (or a numpy array, which is
    converted). None means the reference evaluation preprocessing
    `preprocess_pil(img, PreprocessConfig())`. Works with
    torch.utils.data.DataLoader (which needs only __len__ and __getitem__).
    """

    def __init__(self, data_path: str | Path, split: str = "train",
                 transform: Callable[[Any], Any] | None = None, *, verify: bool = False) -> None:
        import torch  # noqa: F401  (fail here, not in a worker, when torch is missing)

        if split not in SPLITS:
            raise ValueError(f"split {split!r}: choose from {SPLITS}")
        self.data_path = Path(data_path)
        self.split = split
        self.classes = read_labels(self.data_path)
        self.records = read_manifest(self.data_path, split)
        if not self.records:
            raise ManifestError(f"{self.data_path / MANIFEST_FILE}: no rows for split {split!r}")
        if verify:
            verify_checksums(self.data_path, self.records)
        if transform is None:
            from dinov2_triton.core.preprocessing import PreprocessConfig, preprocess_pil

            cfg = PreprocessConfig()
            transform = lambda img: preprocess_pil(img, cfg)  # noqa: E731
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [r.label for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        import numpy as np
        import torch

        from dinov2_triton.core.images import open_rgb

        rec = self.records[index]
        img = open_rgb(rec.file(self.data_path), name=rec.path)
        x = self.transform(img)
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        return x, rec.label

    def __repr__(self) -> str:
        return (f"ManifestDataset({str(self.data_path)!r}, split={self.split!r}, "
                f"{len(self)} images, {len(self.classes)} classes)")
