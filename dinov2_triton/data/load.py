"""Stage 1: build the validated data folder that training, export calibration
and evaluation read (contract: dinov2_triton/data/folder.py, docs/architecture.md).

    dinov2-triton data --data-path ./data/ [--dataset fashion-mnist | --image-folder PATH] [flags]

Sources and split rules: dinov2_triton/data/sources.py (Fashion-MNIST written
as grey PNG files; an ImageFolder tree linked with symbolic links, the source
tree is only read). Every image is decoded in full (data/validate.py); files
that fail, and files whose content does not match their extension, are left
out and listed with the reason in summary.json and in a printed table.

The output is built in a hidden sibling folder and moved into place only
when complete, so a failed run never leaves a half-written data folder and
never removes the previous one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from dinov2_triton.data.folder import FASHION_MNIST, LABELS_FILE, MANIFEST_FILE, SPLITS, SUMMARY_FILE, DataSummary
from dinov2_triton.data.sources import (  # noqa: F401
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DatasetError,
    Log,
    assign_image_folder_splits,
    check_fractions,
    class_dir_names,
    default_test_per_class,
    fashion_mnist_items,
    link_image_folder,
    load_fashion_mnist,
    require_usable,
    scan_image_folder,
    write_fashion_mnist,
)


# ----------------------------------------------------------------------------
# destination checks and the atomic folder swap
# ----------------------------------------------------------------------------
def _is_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_destination(data_path: Path, force: bool, source: Path | None) -> None:
    data_abs = data_path.resolve()
    if source is not None:
        src = source.resolve()
        if _is_inside(src, data_abs) or _is_inside(data_abs, src):
            raise DatasetError(f"--data-path {data_path} and --image-folder {source} overlap; "
                               "write the data folder outside the source tree (the source is "
                               "never modified) and do not put the source inside the data folder")
    if os.path.lexists(data_path) and not data_path.is_dir():
        raise DatasetError(f"--data-path {data_path} exists and is not a folder")
    if data_path.is_dir() and any(data_path.iterdir()):
        if not force:
            raise DatasetError(
                f"--data-path {data_path} already exists and is not empty; pass --force to "
                "replace it (the new data set is built beside it and swapped in only when "
                "complete)")
        if not (data_path / SUMMARY_FILE).is_file() and not (data_path / MANIFEST_FILE).is_file():
            raise DatasetError(
                f"--force: refusing to replace {data_path}: it holds no {SUMMARY_FILE} or "
                f"{MANIFEST_FILE}, so it does not look like a data folder written by "
                "dinov2-triton data. Choose another --data-path or empty it yourself.")


def _publish(tmp: Path, data_path: Path) -> None:
    """Move the finished tmp folder to data_path; the old one is removed only
    after the new one is in place."""
    import shutil
    import uuid

    from dinov2_triton.core.artifact_io import fsync_dir

    if data_path.is_dir() and not data_path.is_symlink() and not any(data_path.iterdir()):
        data_path.rmdir()
    if not os.path.lexists(data_path):
        os.replace(tmp, data_path)   # folder swap
        fsync_dir(data_path.parent)
        return
    old = data_path.with_name(f".{data_path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(data_path, old)   # folder swap
    try:
        os.replace(tmp, data_path)   # folder swap
    except BaseException:
        os.replace(old, data_path)   # folder swap
        raise
    fsync_dir(data_path.parent)   # the swap survives a power cut before the old copy goes
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------
def prepare_dataset(
    data_path: str | Path = "data",
    *,
    dataset: str | None = None,
    image_folder: str | Path | None = None,
    per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    force: bool = False,
    skip_empty_classes: bool = False,
    workers: int | None = None,
    fashion_mnist_dir: str | Path = FASHION_MNIST_DIR,
    progress: bool = True,
    log: Log | None = print,
) -> DataSummary:
    """Build the data folder at `data_path` and return its summary (the
    DataSummary written to summary.json). Raises DatasetError with a message that says
    what to change. `dataset` defaults to Fashion-MNIST when no image_folder
    is given."""
    import shutil
    import tempfile
    import time

    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    if dataset is not None and image_folder is not None:
        raise DatasetError("give either --dataset or --image-folder, not both")
    if image_folder is None:
        dataset = dataset or FASHION_MNIST
        if dataset != FASHION_MNIST:
            raise DatasetError(f"--dataset {dataset!r}: the only embedded data set is "
                               f"{FASHION_MNIST!r}; use --image-folder PATH for your own images")
    check_fractions(val_fraction, test_fraction)
    if seed < 0:
        raise DatasetError(f"--seed {seed}: must be >= 0")
    for flag, v, low in (("--per-class", per_class, 2 if val_fraction > 0 else 1),
                         ("--test-per-class", test_per_class, 0)):
        if v is not None and v < low:
            raise DatasetError(f"{flag} {v}: must be at least {low}")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    data_path = Path(data_path)
    source = Path(image_folder) if image_folder is not None else None
    _check_destination(data_path, force, source)

    arguments = {"data_path": str(data_path), "dataset": dataset,
                 "image_folder": str(source) if source else None, "per_class": per_class,
                 "test_per_class": test_per_class, "seed": seed, "val_fraction": val_fraction,
                 "test_fraction": test_fraction, "force": force, "skip_empty_classes": skip_empty_classes}
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_path.name}.partial-", dir=data_path.parent))
    try:
        notes: list[str] = []
        skipped: list[dict] = []
        if source is None:
            log(f"reading Fashion-MNIST from {fashion_mnist_dir}")
            fm = load_fashion_mnist(fashion_mnist_dir)
            class_names = list(FASHION_MNIST_CLASSES)
            items = fashion_mnist_items(fm, per_class=per_class, test_per_class=test_per_class,
                                        seed=seed, val_fraction=val_fraction,
                                        test_fraction=test_fraction)
            class_dirs = class_dir_names(class_names)
            rows, rejected = write_fashion_mnist(tmp, fm, items, class_dirs, progress=progress)
            src_info = {"type": FASHION_MNIST, "path": str(Path(fashion_mnist_dir).resolve()),
                        "files": fm["files"], "layout": "train file -> train+val, t10k -> test",
                        "stored_as": "grey PNG files"}
            if per_class is not None:
                tpc = (test_per_class if test_per_class is not None
                       else default_test_per_class(per_class, test_fraction))
                notes.append(f"{per_class} images per class from the train file "
                             f"(val share {val_fraction / (1 - test_fraction):.4f}), "
                             f"{tpc} per class from the t10k file")
        else:
            root = source.resolve()
            scan = scan_image_folder(root, workers=workers, progress=progress, log=log)
            rejected, skipped = scan["rejected"], scan["skipped"]
            require_usable(scan, root, skip_empty_classes=skip_empty_classes)
            class_names = scan["classes"]
            class_dirs = class_dir_names(class_names)
            assigned, notes = assign_image_folder_splits(
                scan, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                per_class=per_class, test_per_class=test_per_class)
            rows = link_image_folder(tmp, scan, assigned, class_dirs, root)
            src_info = {"type": "image_folder", "path": str(root), "layout": scan["layout"],
                        "given_splits": scan["given_splits"],
                        "stored_as": "symbolic links to the source files"}
        from dinov2_triton.core.artifact_io import git_revision, library_versions, utc_now
        from dinov2_triton.data.folder import count_images, write_data_folder_files

        counts = count_images(rows, class_names)
        summary = DataSummary.new(
            source=src_info, seed=seed, arguments=arguments, classes=class_names,
            class_dirs=dict(zip(class_names, class_dirs)), num_images=len(rows),
            split_sizes={s: sum(counts[s].values()) for s in SPLITS}, counts=counts, notes=notes,
            rejected=rejected, skipped=skipped, created=utc_now(),
            elapsed_s=round(time.perf_counter() - t0, 2), git_revision=git_revision(),
            versions=library_versions())
        write_data_folder_files(tmp, rows, class_names, summary)
        os.chmod(tmp, 0o755)
        _publish(tmp, data_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ----------------------------------------------------------------------------
# reporting and CLI
# ----------------------------------------------------------------------------
def format_file_table(title: str, entries: Sequence, limit: int = 50) -> str:
    """entries: FileIssue records (path, reason)."""
    if not entries:
        return ""
    width = min(60, max(len("path"), *(len(e.path) for e in entries[:limit])))
    lines = [f"{title} ({len(entries)}):", f"  {'path':<{width}}  reason"]
    lines += [f"  {e.path:<{width}}  {e.reason}" for e in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"  ... {len(entries) - limit} more in summary.json")
    return "\n".join(lines)


def format_counts_table(summary: DataSummary) -> str:
    counts, classes = summary.counts, summary.classes
    width = max(len("class"), len("total"), *(len(c) for c in classes))
    head = f"{'label':>5}  {'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'total':>8}"
    lines = [head, "-" * len(head)]
    for i, c in enumerate(classes):
        per = [counts[s][c] for s in SPLITS]
        lines.append(f"{i:>5}  {c:<{width}}" + "".join(f"{n:>8}" for n in per) + f"{sum(per):>8}")
    lines.append("-" * len(head))
    tot = [summary.split_sizes[s] for s in SPLITS]
    lines.append(f"{'':>5}  {'total':<{width}}" + "".join(f"{n:>8}" for n in tot) + f"{sum(tot):>8}")
    return "\n".join(lines)


def format_report(summary: DataSummary) -> str:
    parts = [format_file_table("rejected files (left out)", summary.rejected),
             format_file_table("skipped entries", summary.skipped),
             "\n".join(f"note: {n}" for n in summary.notes),
             format_counts_table(summary)]
    return "\n\n".join(p for p in parts if p)


PROG = "dinov2-triton data"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or PROG,
        description="Stage 1: validate images and write the data folder "
                    "(images/<split>/<class>/, manifest.csv, labels.txt, summary.json).",
        epilog="Without --image-folder the embedded Fashion-MNIST is used "
               "(apt-get install dataset-fashion-mnist). Split rules: see the module docstring "
               "of dinov2_triton/data/sources.py and docs/architecture.md.")
    p.add_argument("--data-path", default="./data/",
                   help="output data folder (default: ./data/)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=[FASHION_MNIST], default=None,
                     help="embedded data set (default when --image-folder is not given)")
    src.add_argument("--image-folder", default=None, metavar="PATH",
                     help="ImageFolder tree: PATH/<class>/<images> or "
                          "PATH/{train,val,test}/<class>/<images>")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="seeded, stratified subset: N train+val images per class")
    p.add_argument("--test-per-class", type=int, default=None, metavar="M",
                   help="test images per class with --per-class (default: "
                        "max(1, round(N * test_fraction / (1 - test_fraction))))")
    p.add_argument("--seed", type=int, default=0, help="split/subset seed (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of the images for val (default: 0.15)")
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="share of the images for test (default: 0.15)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads used to check images (default: CPU count, at most 8)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing data folder written by this tool")
    p.add_argument("--skip-empty-classes", action="store_true",
                   help="leave out class folders with no usable image (listed as skipped) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        summary = prepare_dataset(
            args.data_path, dataset=args.dataset, image_folder=args.image_folder,
            per_class=args.per_class, test_per_class=args.test_per_class, seed=args.seed,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, force=args.force,
            skip_empty_classes=args.skip_empty_classes, workers=args.workers, progress=not args.no_progress)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no permission to write --data-path; nothing half-written is left
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the previous data folder (if any) is unchanged", file=sys.stderr)
        return 130
    print()
    print(format_report(summary))
    print(f"\nwrote {summary.num_images} images to {args.data_path} "
          f"({summary.elapsed_s} s): {MANIFEST_FILE}, {LABELS_FILE}, {SUMMARY_FILE}")
    return 0
