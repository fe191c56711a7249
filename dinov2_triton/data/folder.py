"""The data folder contract (stage 1 -> train, export, perf): file names, the
manifest columns, the `summary.json` record (`DataSummary`), the one writer
of manifest.csv + labels.txt + summary.json and the one reader of summary.json.

    <data>/images/<split>/<class>/<name>
    <data>/manifest.csv    path,label,class_name,split,sha256 (read by dinov2_triton.data.datasets.read_manifest)
    <data>/labels.txt      class names in label order (read by dinov2_triton.data.datasets.read_labels)
    <data>/summary.json    DataSummary (read_summary)

Schema history of summary.json: 1 = ``format_version: 1`` without
``schema_version`` (still read, same fields); 2 = this module.
Cheap to import (pydantic, no torch/numpy)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dinov2_triton.core.records import Record, RecordError

SPLITS = ("train", "val", "test")
SUMMARY_FILE, MANIFEST_FILE, LABELS_FILE, IMAGES_DIR = "summary.json", "manifest.csv", "labels.txt", "images"
MANIFEST_COLUMNS = ("path", "label", "class_name", "split", "sha256")
FASHION_MNIST = "fashion-mnist"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataSource(_Part):
    """Where the images came from."""

    type: Literal["fashion-mnist", "image_folder"]
    path: str                                   # resolved source folder
    layout: str                                 # e.g. "single", "pre-split", "train file -> train+val, t10k -> test"
    stored_as: str                              # "grey PNG files" | "symbolic links to the source files"
    files: dict[str, str] | None = None         # fashion-mnist: the IDX files read
    given_splits: list[str] | None = None       # image_folder: split folders found in the tree


class LoadArguments(_Part):
    """The options dinov2_triton.data.load ran with (reproduce with the same values)."""

    data_path: str
    dataset: str | None
    image_folder: str | None
    per_class: int | None
    test_per_class: int | None
    seed: int
    val_fraction: float
    test_fraction: float
    force: bool
    skip_empty_classes: bool = False  # written since 0.2; older summaries read as False


class FileIssue(_Part):
    """A source file that was left out (rejected) or an entry that was skipped, and why."""

    path: str
    reason: str


class DataSummary(Record):
    """`<data>/summary.json`: what the data stage built and from what."""

    SCHEMA_VERSION: ClassVar[int] = 2
    KIND: ClassVar[str] = "data summary"
    REGENERATE: ClassVar[str] = "dinov2-triton data --data-path DATA --force ..."

    tool: Literal["dinov2_triton.data.load"] = "dinov2_triton.data.load"
    source: DataSource
    seed: int
    arguments: LoadArguments
    classes: list[str] = Field(min_length=2)    # = labels.txt, label index order
    class_dirs: dict[str, str]                  # class name -> folder name under images/<split>/
    num_images: int
    split_sizes: dict[str, int]                 # split -> images
    counts: dict[str, dict[str, int]]           # split -> class -> images
    notes: list[str] = Field(default_factory=list)
    rejected: list[FileIssue] = Field(default_factory=list)
    skipped: list[FileIssue] = Field(default_factory=list)
    created: str
    elapsed_s: float | None = None
    git_revision: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "DataSummary":
        if set(self.split_sizes) != set(SPLITS) or set(self.counts) != set(SPLITS):
            raise ValueError(f"split_sizes and counts must list the splits {list(SPLITS)}")
        for split in SPLITS:
            if set(self.counts[split]) != set(self.classes):
                raise ValueError(f"counts.{split} lists other classes than 'classes'")
            if sum(self.counts[split].values()) != self.split_sizes[split]:
                raise ValueError(f"counts.{split} adds up to {sum(self.counts[split].values())}, "
                                 f"split_sizes.{split} says {self.split_sizes[split]}")
        if sum(self.split_sizes.values()) != self.num_images:
            raise ValueError(f"num_images {self.num_images} is not the sum of split_sizes")
        if set(self.class_dirs) != set(self.classes):
            raise ValueError("class_dirs must map every class to its folder")
        return self

    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version == 0 and data.get("format_version") == 1:
            data = {k: v for k, v in data.items() if k != "format_version"}
            data["schema_version"] = cls.SCHEMA_VERSION
            return data
        raise RecordError("not a summary written by dinov2_triton.data.load (no schema_version, no format_version 1)")


def count_images(rows: Sequence[dict], class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """split -> class -> number of manifest rows."""
    counts = {s: {c: 0 for c in class_names} for s in SPLITS}
    for r in rows:
        counts[r["split"]][r["class_name"]] += 1
    return counts


# ----------------------------------------------------------------------------- writer
def write_data_folder_files(out_dir: str | Path, rows: Sequence[dict], class_names: Sequence[str],
                            summary: DataSummary) -> None:
    """manifest.csv (rows sorted by split, label, path), labels.txt and
    summary.json, each written atomically. `rows` are dicts with the
    MANIFEST_COLUMNS keys; they must agree with `summary`."""
    from dinov2_triton.core.artifact_io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    if list(summary.classes) != list(class_names):
        raise ValueError(f"summary classes {summary.classes} differ from the labels {list(class_names)}")
    if count_images(rows, class_names) != summary.counts:
        raise ValueError("summary counts differ from the manifest rows")
    order = {s: i for i, s in enumerate(SPLITS)}
    rows = sorted(rows, key=lambda r: (order[r["split"]], r["label"], r["path"]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / MANIFEST_FILE, buf.getvalue())
    atomic_write_text(out_dir / LABELS_FILE, "".join(f"{c}\n" for c in class_names))
    atomic_write_json(out_dir / SUMMARY_FILE, summary)


# ----------------------------------------------------------------------------- reader
def read_summary(data_path: str | Path) -> DataSummary:
    """`<data_path>/summary.json` as a DataSummary; RecordError naming the
    file (and field) when it is missing, malformed or of an unknown schema."""
    from dinov2_triton.core.artifact_io import read_json

    f = Path(data_path) / SUMMARY_FILE
    try:
        data = read_json(f, what="data summary")
    except FileNotFoundError:
        raise RecordError(f"{f}: not found; run `dinov2-triton data --data-path {data_path}` "
                          "first") from None
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    return DataSummary.from_dict(data, source=f)
