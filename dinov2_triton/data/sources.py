"""The two sources of the data stage and their split rules: Fashion-MNIST
(IDX files from the Debian package `dataset-fashion-mnist`) and ImageFolder
trees (scanned, validated with dinov2_triton.data.validate, split, linked).

Split rules (all stratified per class, seeded, independent of listing order):

* single ImageFolder: per class of n usable images, test = round(n *
  test_fraction) and val = round(n * val_fraction), each at least 1 when its
  fraction is > 0; train keeps the rest and must keep at least 1, so a class
  needs 1 + (val_fraction > 0) + (test_fraction > 0) images, else an error.
  `--per-class N` first keeps a seeded random N of each class's usable images.
* pre-split ImageFolder: the given splits are kept; every split must hold
  the same class folders and every class at least one usable image in each
  given split. A missing val or test split is carved from train with the
  same rule (fractions of the train folder). `--per-class N` keeps at most N
  train images per class and at most `--test-per-class` (default as for
  Fashion-MNIST below) val and test images per class.
* ImageFolder class index = position in the sorted class folder names
  (as torchvision's ImageFolder); files are processed in sorted relative-path
  order, and sub-folders of a class folder are flattened into the link name
  (a/b.jpg -> a__b.jpg).
* Fashion-MNIST: val comes from the train file, test from the t10k file.
  Val is val_fraction / (1 - test_fraction) of the train-file images taken,
  so that with --per-class the three splits keep the requested proportions
  of the total. Without --per-class every train-file image is used and the
  whole t10k file is the test split. With `--per-class N`, N images per class
  are drawn from the train file (then split into train and val) and
  `--test-per-class M` from the t10k file, M defaulting to
  max(1, round(N * test_fraction / (1 - test_fraction))) (0 when
  test_fraction is 0). Example, defaults and N=50: 41 train, 9 val, 9 test
  per class (69.5% / 15.3% / 15.3%).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from dinov2_triton.data.folder import IMAGES_DIR, SPLITS
from dinov2_triton.data.validate import (
    check_files,
    outside_link_reason,
    progress_bar,
    system_entry_reason,
    walk_class_folder,
)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

Log = Callable[[str], None]


class DatasetError(ValueError):
    """The source or the options cannot give a usable data set; the message says why."""


# ----------------------------------------------------------------------------
# split rules
# ----------------------------------------------------------------------------
def _round_half_up(x: float) -> int:
    import math

    return int(math.floor(x + 0.5))


def _class_rng(seed: int, class_name: str):
    """A generator per class, so adding a class never reshuffles the others."""
    import hashlib

    import numpy as np

    key = int.from_bytes(hashlib.sha256(class_name.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, key])


def safe_dir_name(name: str) -> str:
    """A file-system-safe folder name for a class (the real name stays in
    labels.txt and the manifest): path separators and characters Windows
    refuses become '_', and a leading dot is replaced so it is not hidden."""
    import re

    out = re.sub(r'[/\\:*?"<>|\x00-\x1f\x7f]', "_", name).strip()
    out = out.rstrip(".")
    if out.startswith("."):
        out = "_" + out[1:]
    return out or "_"


def class_dir_names(class_names: Sequence[str]) -> list[str]:
    """safe_dir_name for each class, made unique (case-insensitively, for
    case-insensitive file systems) by appending -<label> on a clash."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(class_names):
        d = safe_dir_name(name)
        if d.lower() in used:
            d = f"{d}-{i}"
        used.add(d.lower())
        out.append(d)
    return out


def split_counts(n: int, val_fraction: float, test_fraction: float, *, what: str) -> tuple[int, int, int]:
    """(train, val, test) sizes for one class of n images (rule in the module docstring)."""
    need = 1 + (val_fraction > 0) + (test_fraction > 0)
    if n < need:
        raise DatasetError(
            f"{what} has only {n} usable image(s); a train/val/test split with "
            f"--val-fraction {val_fraction} --test-fraction {test_fraction} needs at least "
            f"{need} per class (1 train + 1 per non-zero fraction). Add images, or set the "
            f"fraction to 0, or provide {{train,val,test}} folders yourself.")
    n_val = max(1, _round_half_up(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, _round_half_up(n * test_fraction)) if test_fraction > 0 else 0
    while n - n_val - n_test < 1:  # keep one train image: shrink the larger held-out split
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for flag, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise DatasetError(f"{flag} {f}: must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction} "
                           "must be below 1 (train needs images too)")


def default_test_per_class(per_class: int, test_fraction: float) -> int:
    """Test images per class that go with `per_class` train+val images, so that
    test is `test_fraction` of the total (at least 1 when the fraction is > 0)."""
    if test_fraction <= 0:
        return 0
    return max(1, _round_half_up(per_class * test_fraction / (1.0 - test_fraction)))


# ----------------------------------------------------------------------------
# Fashion-MNIST (IDX files from the Debian package)
# ----------------------------------------------------------------------------
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path):
    """Parse a (gzipped) IDX file into a numpy array."""
    import gzip
    import struct

    import numpy as np

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(f"{path}: IDX header says shape {shape} ({expected} bytes) but "
                           f"the file holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> dict[str, Any]:
    """{'train': (images uint8 [N,28,28], labels [N]), 'test': (...), 'files': {...}}."""
    root = Path(root)
    files = {(part, kind): root / f"{part}-{kind}-ubyte.gz"
             for part in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install the Debian "
            f"package: apt-get install dataset-fashion-mnist (or pass --image-folder PATH)")
    out: dict[str, Any] = {"files": {f"{p}-{k}": str(v) for (p, k), v in files.items()}}
    for part, split in (("train", "train"), ("t10k", "test")):
        images = read_idx(files[(part, "images-idx3")])
        labels = read_idx(files[(part, "labels-idx1")])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"{root}: {part} images {images.shape} and labels "
                               f"{labels.shape} do not match")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{root}: {part} labels go up to {int(labels.max())}, "
                               f"expected < {len(FASHION_MNIST_CLASSES)}")
        out[split] = (images, labels)
    return out


def fashion_mnist_items(fm: dict[str, Any], *, per_class: int | None, test_per_class: int | None,
                        seed: int, val_fraction: float, test_fraction: float) -> list[dict]:
    """Choose (split, label, source part, index) for every image to write."""
    import numpy as np

    train_labels = fm["train"][1]
    test_labels = fm["test"][1]
    val_share = val_fraction / (1.0 - test_fraction)
    if per_class is not None and test_per_class is None:
        test_per_class = default_test_per_class(per_class, test_fraction)
    items = []
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        idx = np.flatnonzero(train_labels == label)
        if per_class is not None and per_class > len(idx):
            raise DatasetError(f"--per-class {per_class}: the Fashion-MNIST train file has "
                               f"only {len(idx)} images of class {name!r}")
        rng = _class_rng(seed, name)
        idx = idx[rng.permutation(len(idx))]
        if per_class is not None:
            idx = idx[:per_class]
        n = len(idx)
        n_val = max(1, _round_half_up(n * val_share)) if val_fraction > 0 else 0
        if n - n_val < 1:
            raise DatasetError(f"--per-class {n}: too few to keep a train image after taking "
                               f"{n_val} for val; use --per-class {n_val + 1} or more")
        for pos, i in enumerate(idx):
            items.append({"split": "val" if pos < n_val else "train", "label": label,
                          "part": "train", "index": int(i)})
        tidx = np.flatnonzero(test_labels == label)
        if test_per_class is not None:
            if test_per_class > len(tidx):
                raise DatasetError(f"--test-per-class {test_per_class}: the Fashion-MNIST t10k "
                                   f"file has only {len(tidx)} images of class {name!r}")
            tidx = np.sort(tidx[_class_rng(seed + 1, name).permutation(len(tidx))][:test_per_class])
        items.extend({"split": "test", "label": label, "part": "t10k", "index": int(i)}
                     for i in tidx)
    return items


def _encode_png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_fashion_mnist(out_dir: Path, fm, items, class_dirs, *, progress: bool) -> tuple[list[dict], list[dict]]:
    from dinov2_triton.core.artifact_io import sha256_bytes
    from dinov2_triton.core.images import ImageDecodeError, open_rgb

    arrays = {"train": fm["train"][0], "t10k": fm["test"][0]}
    rows, rejected = [], []
    made: set[Path] = set()
    for item in progress_bar(items, total=len(items), desc="writing Fashion-MNIST PNGs", enabled=progress):
        name = f"fmnist-{item['part']}-{item['index']:05d}.png"
        rel = Path(IMAGES_DIR, item["split"], class_dirs[item["label"]], name)
        data = _encode_png(arrays[item["part"]][item["index"]])
        try:
            img = open_rgb(data, name=name)  # same check as any other source
            if img.size != (28, 28):
                raise ImageDecodeError(f"{name}: decoded to {img.size}, expected 28x28")
        except ImageDecodeError as exc:
            rejected.append({"path": f"{item['part']}[{item['index']}]", "reason": str(exc)})
            continue
        if rel.parent not in made:
            (out_dir / rel.parent).mkdir(parents=True, exist_ok=True)
            made.add(rel.parent)
        (out_dir / rel).write_bytes(data)
        rows.append({"path": rel.as_posix(), "label": item["label"],
                     "class_name": FASHION_MNIST_CLASSES[item["label"]], "split": item["split"],
                     "sha256": sha256_bytes(data)})
    return rows, rejected


# ----------------------------------------------------------------------------
# ImageFolder trees
# ----------------------------------------------------------------------------
def _not_data(entry: Path, root: Path) -> str | None:
    """Why an entry above the images (a split or class folder's level) is no data, or None."""
    return system_entry_reason(entry.name) or outside_link_reason(entry, root)


def _visible_dirs(path: Path, root: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not _not_data(p, root)), key=lambda p: p.name)


def _entries_above_classes(parts: dict[str, Path], root: Path) -> list[dict]:
    """The skipped entries beside the split and class folders: system files and folders
    (``__MACOSX``, ``.DS_Store``, ``Thumbs.db``, ...), links that leave the tree, loose files."""
    levels = [root] + [p for p in parts.values() if p != root]
    skipped = []
    for level in levels:
        for f in sorted(level.iterdir(), key=lambda q: q.name):
            if level == root and f in parts.values():
                continue
            reason = _not_data(f, root)
            if reason is None and not f.is_dir():
                reason = "not inside a class folder"
            if reason:
                skipped.append({"path": f.relative_to(root).as_posix(), "reason": reason})
    return skipped


def detect_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """('single', {'all': root}) or ('pre-split', {'train': root/'train', ...})."""
    if not root.is_dir():
        raise DatasetError(f"--image-folder {root}: not a folder")
    subdirs = _visible_dirs(root, root)
    names = {d.name for d in subdirs}
    split_names = names & set(SPLITS)
    if not split_names:
        return "single", {"all": root}
    others = sorted(names - set(SPLITS))
    if others:
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(sorted(split_names))}) with other folders "
            f"({', '.join(others)}). Use either <root>/<class>/<images> or "
            f"<root>/{{train,val,test}}/<class>/<images> (a class may not be named "
            f"train, val or test).")
    if "train" not in split_names:
        raise DatasetError(f"{root} has split folders ({', '.join(sorted(split_names))}) but no "
                           f"train folder; a pre-split tree needs <root>/train/<class>/...")
    return "pre-split", {s: root / s for s in SPLITS if s in split_names}


def scan_image_folder(root: Path, *, workers: int, progress: bool, log: Log) -> dict[str, Any]:
    """Find, validate and group the images of an ImageFolder tree.

    Returns {'layout', 'given_splits', 'classes', 'good': {split: {class: [(path, sha)]}},
    'rejected': [...], 'skipped': [...]} where split is 'all' for a single tree."""
    layout, parts = detect_layout(root)
    class_sets = {part: [d.name for d in _visible_dirs(p, root)] for part, p in parts.items()}
    skipped = _entries_above_classes(parts, root)
    if layout == "pre-split":
        all_classes = sorted(set().union(*map(set, class_sets.values())))
        problems = []
        for part, names in class_sets.items():
            lacks = sorted(set(all_classes) - set(names))
            if lacks:
                problems.append(f"{part}/ lacks {lacks}")
        if problems:
            raise DatasetError(f"{root}: class folders differ between splits: "
                               f"{'; '.join(problems)}. Every split needs the same class folders.")
    classes = sorted(next(iter(class_sets.values())))
    if not classes:
        where = " / ".join(str(p) for p in parts.values())
        raise DatasetError(f"no class folders found in {where}; expected <root>/<class>/<images> "
                           f"or <root>/{{train,val,test}}/<class>/<images>")
    if len(classes) < 2:
        raise DatasetError(f"found a single class folder ({classes[0]!r}) in {root}; a "
                           f"classifier needs at least 2 classes")
    candidates: list[tuple[str, str, Path]] = []
    for part, p in parts.items():
        for c in classes:
            files, skip = walk_class_folder(p / c, root)
            skipped.extend(skip)
            candidates.extend((part, c, f) for f in files)
    log(f"checking {len(candidates)} image file(s) in {root} ({layout} layout, "
        f"{len(classes)} classes)")
    results = check_files([f for _, _, f in candidates], workers=workers, progress=progress,
                          desc="checking images")
    good: dict[str, dict[str, list]] = {part: {c: [] for c in classes} for part in parts}
    rejected = []
    for (part, c, f), (sha, reason) in zip(candidates, results):
        if reason is None:
            good[part][c].append((f, sha))
        else:
            rejected.append({"path": f.relative_to(root).as_posix(), "reason": reason})
    return {"layout": layout, "parts": parts, "given_splits": [p for p in parts if p != "all"],
            "classes": classes,
            "good": good, "rejected": rejected, "skipped": skipped}


def require_usable(scan: dict[str, Any], root: Path, *, skip_empty_classes: bool = False) -> None:
    """Every class folder has a usable image in every split folder, or DatasetError naming the
    empty ones and the flag that drops them. With `skip_empty_classes` those classes are dropped
    from `scan` (every split) and listed in its skipped entries instead; at least 2 must remain."""
    if skip_empty_classes:
        empty_classes = sorted({c for by_class in scan["good"].values() for c, files in by_class.items() if not files})
        for c in empty_classes:
            for part, by_class in scan["good"].items():
                del by_class[c]
                where = c if part == "all" else f"{part}/{c}"
                scan["skipped"].append({"path": where, "reason": "class folder with no usable image, dropped "
                                                                 "(--skip-empty-classes)"})
        scan["classes"] = [c for c in scan["classes"] if c not in empty_classes]
        if len(scan["classes"]) < 2:
            raise DatasetError(f"{root}: {len(scan['classes'])} class folder(s) with usable images left after "
                               f"dropping the empty ones ({', '.join(empty_classes)}); a classifier needs at least 2")
        return
    empty = []
    for part, by_class in scan["good"].items():
        for c, files in by_class.items():
            if not files:
                where = c if part == "all" else f"{part}/{c}"
                bad = [r for r in scan["rejected"] if r["path"].startswith(where + "/")]
                listed = "; ".join(f"{r['path']}: {r['reason']}" for r in bad[:3])
                detail = (f" ({len(bad)} rejected: {listed}{' ...' if len(bad) > 3 else ''})" if bad
                          else " (no image files)")
                empty.append(f"{where}{detail}")
    if empty:
        raise DatasetError(f"{root}: class folder(s) with no usable image: " + ", ".join(empty)
                           + ". Add images, remove the folder, or pass --skip-empty-classes to leave it out.")


def _take(files: list, n: int | None, rng) -> list:
    """A seeded random subset of at most n items (all when n is None), in input order."""
    if n is None or len(files) <= n:
        return list(files)
    keep = sorted(rng.permutation(len(files))[:n].tolist())
    return [files[i] for i in keep]


def assign_image_folder_splits(scan, *, seed, val_fraction, test_fraction, per_class,
                               test_per_class) -> tuple[dict[str, dict[str, list]], list[str]]:
    """{split: {class: [(path, sha)]}} plus notes describing what was carved."""
    notes: list[str] = []
    out: dict[str, dict[str, list]] = {s: {} for s in SPLITS}
    classes = scan["classes"]
    if scan["layout"] == "single":
        for c in classes:
            rng = _class_rng(seed, c)
            files = _take(scan["good"]["all"][c], per_class, rng)
            n_train, n_val, n_test = split_counts(len(files), val_fraction, test_fraction,
                                                  what=f"class {c!r}")
            order = rng.permutation(len(files)).tolist()
            pick = [files[i] for i in order]
            out["test"][c] = sorted(pick[:n_test], key=lambda t: str(t[0]))
            out["val"][c] = sorted(pick[n_test:n_test + n_val], key=lambda t: str(t[0]))
            out["train"][c] = sorted(pick[n_test + n_val:], key=lambda t: str(t[0]))
        return out, notes
    given = scan["given_splits"]
    held_out = None  # cap on val/test images per class for a given split
    if test_per_class is not None:
        held_out = test_per_class
    elif per_class is not None:
        held_out = max(1, default_test_per_class(per_class, test_fraction))
    carve_val = "val" not in given and val_fraction > 0
    carve_test = "test" not in given and test_fraction > 0
    for c in classes:
        rng = _class_rng(seed, c)
        train = list(scan["good"]["train"][c])
        if carve_val or carve_test:
            vf, tf = (val_fraction if carve_val else 0.0), (test_fraction if carve_test else 0.0)
            n_train, n_val, n_test = split_counts(len(train), vf, tf, what=f"train/{c!r}")
            order = rng.permutation(len(train)).tolist()
            pick = [train[i] for i in order]
            if carve_test:
                out["test"][c] = sorted(pick[:n_test], key=lambda t: str(t[0]))
            if carve_val:
                out["val"][c] = sorted(pick[n_test:n_test + n_val], key=lambda t: str(t[0]))
            train = sorted(pick[n_test + n_val:], key=lambda t: str(t[0]))
        out["train"][c] = _take(train, per_class, rng)
        for s in ("val", "test"):
            if s in given:
                out[s][c] = _take(scan["good"][s][c], held_out, rng)
            out[s].setdefault(c, [])
    if carve_val:
        notes.append(f"val split carved from train/ (val_fraction {val_fraction} of its images)")
    if carve_test:
        notes.append(f"test split carved from train/ (test_fraction {test_fraction} of its images)")
    return out, notes


def _link_name(path: Path, class_root: Path) -> str:
    """Flatten sub-folders of a class folder into the link name: a/b.jpg -> a__b.jpg."""
    return "__".join(path.relative_to(class_root).parts)


def link_image_folder(out_dir: Path, scan, assigned, class_dirs, root: Path) -> list[dict]:
    rows = []
    parts = scan["parts"]
    for split in SPLITS:
        for label, c in enumerate(scan["classes"]):
            files = assigned[split].get(c, [])
            if not files:
                continue
            dest_dir = out_dir / IMAGES_DIR / split / class_dirs[label]
            dest_dir.mkdir(parents=True, exist_ok=True)
            used: set[str] = set()
            for src, sha in files:
                class_root = next(p / c for p in parts.values() if src.is_relative_to(p / c))
                name = _link_name(src, class_root)
                stem, suffix, k = Path(name).stem, Path(name).suffix, 1
                while name.lower() in used:
                    name, k = f"{stem}-{k}{suffix}", k + 1
                used.add(name.lower())
                os.symlink(os.path.abspath(src), dest_dir / name)
                rows.append({"path": (Path(IMAGES_DIR, split, class_dirs[label], name)).as_posix(),
                             "label": label, "class_name": c, "split": split, "sha256": sha})
    return rows
