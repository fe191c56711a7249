"""Stage 1: build the validated data folder that training, export calibration
and evaluation read (contract: docs/architecture.md, "Stage 1").

Two sources:

* the embedded default, Fashion-MNIST from the Debian package
  `dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist),
  written as grey PNG files;
* an ImageFolder tree, `<root>/<class>/<images>` (split here, stratified and
  seeded) or `<root>/{train,val,test}/<class>/<images>` (splits kept), linked
  into the data folder with symbolic links. The source tree is only read.

Every image is decoded in full with `train.images.open_rgb`; files that fail,
and files whose content does not match their extension, are left out and
listed with the reason in summary.json and in a printed table.

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

The output is built in a hidden sibling folder and moved into place only
when complete, so a failed run never leaves a half-written data folder and
never removes the previous one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

SPLITS = ("train", "val", "test")
FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# extension -> formats PIL may report for a correctly named file
IMAGE_EXTENSIONS = {
    ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",),
    ".bmp": ("BMP", "DIB"), ".webp": ("WEBP",), ".tif": ("TIFF",),
    ".tiff": ("TIFF",), ".gif": ("GIF",),
}
SUMMARY_FILE, MANIFEST_FILE, LABELS_FILE, IMAGES_DIR = (
    "summary.json", "manifest.csv", "labels.txt", "images")
MANIFEST_COLUMNS = ("path", "label", "class_name", "split", "sha256")
FORMAT_VERSION = 1

Log = Callable[[str], None]


class DatasetError(ValueError):
    """The source or the options cannot give a usable data set; the message says why."""


# ----------------------------------------------------------------------------
# small helpers
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


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
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


def _progress(iterable: Iterable, *, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs stay clean)
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=None, leave=False)


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
            f"package: apt-get install dataset-fashion-mnist (or pass --image_folder PATH)")
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


def _fashion_mnist_items(fm: dict[str, Any], *, per_class: int | None, test_per_class: int | None,
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


def _write_fashion_mnist(out_dir: Path, fm, items, class_dirs, *, progress: bool) -> tuple[list[dict], list[dict]]:
    import hashlib

    from train.images import ImageDecodeError, open_rgb

    arrays = {"train": fm["train"][0], "t10k": fm["test"][0]}
    rows, rejected = [], []
    made: set[Path] = set()
    for item in _progress(items, total=len(items), desc="writing Fashion-MNIST PNGs", enabled=progress):
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
                     "sha256": hashlib.sha256(data).hexdigest()})
    return rows, rejected


# ----------------------------------------------------------------------------
# ImageFolder trees
# ----------------------------------------------------------------------------
def _visible_dirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _walk_class_folder(class_dir: Path, root: Path) -> tuple[list[Path], list[dict]]:
    """Candidate image files (sorted) and skipped entries under one class folder."""
    candidates, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        base = Path(dirpath)
        for d in list(dirnames):
            if d.startswith("."):
                skipped.append({"path": (base / d).relative_to(root).as_posix(),
                                "reason": "hidden folder"})
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            p = base / f
            rel = p.relative_to(root).as_posix()
            if f.startswith("."):
                skipped.append({"path": rel, "reason": "hidden file"})
            elif p.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append({"path": rel, "reason": f"extension {p.suffix or '(none)'!s} is not "
                                f"an image extension ({' '.join(sorted(IMAGE_EXTENSIONS))})"})
            elif not p.is_file():
                skipped.append({"path": rel, "reason": "not a regular file"})
            else:
                candidates.append(p)
    candidates.sort(key=lambda p: p.relative_to(root).as_posix())
    return candidates, skipped


def check_image_file(path: Path) -> tuple[str | None, str | None]:
    """(sha256, None) for a usable image, (None, reason) otherwise.

    Usable = non-empty, fully decodable by open_rgb, and PIL's detected format
    agrees with the extension."""
    import hashlib
    import re

    from PIL import Image

    from train.images import ImageDecodeError, open_rgb

    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read ({exc.strerror or exc})"
    if not data:
        return None, "empty file (0 bytes)"
    try:
        open_rgb(path)
    except ImageDecodeError as exc:
        msg = str(exc)
        prefix = f"{path}: "
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        return None, msg.replace(str(path), path.name)
    try:
        with Image.open(path) as im:
            fmt = im.format or "unknown"
    except Exception as exc:  # decoded above, so this is unexpected; still report it
        return None, f"cannot detect the image format ({exc})"
    ext = path.suffix.lower()
    if fmt not in IMAGE_EXTENSIONS[ext]:
        return None, f"extension {ext} but content is {fmt}"
    return hashlib.sha256(data).hexdigest(), None


def _check_files(paths: list[Path], *, workers: int, progress: bool, desc: str) -> list[tuple]:
    """check_image_file over paths, in order; threads (PIL decoding and sha256
    release the GIL)."""
    if workers <= 1 or len(paths) < 8:
        return [check_image_file(p) for p in _progress(paths, total=len(paths), desc=desc,
                                                        enabled=progress)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(_progress(pool.map(check_image_file, paths), total=len(paths), desc=desc,
                              enabled=progress))


def detect_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """('single', {'all': root}) or ('pre-split', {'train': root/'train', ...})."""
    if not root.is_dir():
        raise DatasetError(f"--image_folder {root}: not a folder")
    subdirs = _visible_dirs(root)
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


def _scan_image_folder(root: Path, *, workers: int, progress: bool, log: Log) -> dict[str, Any]:
    """Find, validate and group the images of an ImageFolder tree.

    Returns {'layout', 'given_splits', 'classes', 'good': {split: {class: [(path, sha)]}},
    'rejected': [...], 'skipped': [...]} where split is 'all' for a single tree."""
    layout, parts = detect_layout(root)
    class_sets = {part: [d.name for d in _visible_dirs(p)] for part, p in parts.items()}
    skipped: list[dict] = []
    for part, p in parts.items():
        for f in sorted(p.iterdir(), key=lambda q: q.name):
            if not f.is_dir():
                skipped.append({"path": f.relative_to(root).as_posix(),
                                "reason": "not inside a class folder"})
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
            files, skip = _walk_class_folder(p / c, root)
            skipped.extend(skip)
            candidates.extend((part, c, f) for f in files)
    log(f"checking {len(candidates)} image file(s) in {root} ({layout} layout, "
        f"{len(classes)} classes)")
    results = _check_files([f for _, _, f in candidates], workers=workers, progress=progress,
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


def _require_usable(scan: dict[str, Any], root: Path) -> None:
    empty = []
    for part, by_class in scan["good"].items():
        for c, files in by_class.items():
            if not files:
                where = c if part == "all" else f"{part}/{c}"
                bad = [r for r in scan["rejected"] if r["path"].startswith(where + "/")]
                detail = f" ({len(bad)} rejected: " + "; ".join(
                    f"{r['path']}: {r['reason']}" for r in bad[:3]) + (" ..." if len(bad) > 3 else "") + ")" if bad else " (no image files)"
                empty.append(f"{where}{detail}")
    if empty:
        raise DatasetError(f"{root}: class folder(s) with no usable image: " + ", ".join(empty))


def _take(files: list, n: int | None, rng) -> list:
    """A seeded random subset of at most n items (all when n is None), in input order."""
    if n is None or len(files) <= n:
        return list(files)
    keep = sorted(rng.permutation(len(files))[:n].tolist())
    return [files[i] for i in keep]


def _assign_image_folder_splits(scan, *, seed, val_fraction, test_fraction, per_class,
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


def _link_image_folder(out_dir: Path, scan, assigned, class_dirs, root: Path) -> list[dict]:
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


# ----------------------------------------------------------------------------
# output: manifest, labels, summary, atomic publish
# ----------------------------------------------------------------------------
def _write_outputs(out_dir: Path, rows: list[dict], class_names: Sequence[str], summary: dict) -> None:
    import csv
    import json

    order = {s: i for i, s in enumerate(SPLITS)}
    rows = sorted(rows, key=lambda r: (order[r["split"]], r["label"], r["path"]))
    with open(out_dir / MANIFEST_FILE, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    (out_dir / LABELS_FILE).write_text("".join(f"{c}\n" for c in class_names), encoding="utf-8")
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")


def _counts(rows: list[dict], class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    counts = {s: {c: 0 for c in class_names} for s in SPLITS}
    for r in rows:
        counts[r["split"]][r["class_name"]] += 1
    return counts


def _is_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _check_destination(data_path: Path, force: bool, source: Path | None) -> None:
    data_abs = data_path.resolve()
    if source is not None:
        src = source.resolve()
        if _is_inside(src, data_abs) or _is_inside(data_abs, src):
            raise DatasetError(f"--data_path {data_path} and --image_folder {source} overlap; "
                               "write the data folder outside the source tree (the source is "
                               "never modified) and do not put the source inside the data folder")
    if os.path.lexists(data_path) and not data_path.is_dir():
        raise DatasetError(f"--data_path {data_path} exists and is not a folder")
    if data_path.is_dir() and any(data_path.iterdir()):
        if not force:
            raise DatasetError(
                f"--data_path {data_path} already exists and is not empty; pass --force to "
                "replace it (the new data set is built beside it and swapped in only when "
                "complete)")
        if not (data_path / SUMMARY_FILE).is_file() and not (data_path / MANIFEST_FILE).is_file():
            raise DatasetError(
                f"--force: refusing to replace {data_path}: it holds no {SUMMARY_FILE} or "
                f"{MANIFEST_FILE}, so it does not look like a data folder written by "
                "train.load_data. Choose another --data_path or empty it yourself.")


def _publish(tmp: Path, data_path: Path) -> None:
    """Move the finished tmp folder to data_path; the old one is removed only
    after the new one is in place."""
    import shutil
    import uuid

    if data_path.is_dir() and not data_path.is_symlink() and not any(data_path.iterdir()):
        data_path.rmdir()
    if not os.path.lexists(data_path):
        os.replace(tmp, data_path)
        return
    old = data_path.with_name(f".{data_path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(data_path, old)
    try:
        os.replace(tmp, data_path)
    except BaseException:
        os.replace(old, data_path)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _git_revision() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import platform

    import numpy
    import PIL

    return {"python": platform.python_version(), "numpy": numpy.__version__,
            "pillow": PIL.__version__}


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
    workers: int | None = None,
    fashion_mnist_dir: str | Path = FASHION_MNIST_DIR,
    progress: bool = True,
    log: Log | None = print,
) -> dict[str, Any]:
    """Build the data folder at `data_path` and return the summary (also
    written to summary.json). Raises DatasetError with a message that says
    what to change. `dataset` defaults to Fashion-MNIST when no image_folder
    is given."""
    import shutil
    import tempfile
    import time
    from datetime import datetime, timezone

    log = log or (lambda _msg: None)
    t0 = time.perf_counter()
    if dataset is not None and image_folder is not None:
        raise DatasetError("give either --dataset or --image_folder, not both")
    if image_folder is None:
        dataset = dataset or FASHION_MNIST
        if dataset != FASHION_MNIST:
            raise DatasetError(f"--dataset {dataset!r}: the only embedded data set is "
                               f"{FASHION_MNIST!r}; use --image_folder PATH for your own images")
    _check_fractions(val_fraction, test_fraction)
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
                 "test_fraction": test_fraction, "force": force}
    data_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_path.name}.partial-", dir=data_path.parent))
    try:
        notes: list[str] = []
        skipped: list[dict] = []
        if source is None:
            log(f"reading Fashion-MNIST from {fashion_mnist_dir}")
            fm = load_fashion_mnist(fashion_mnist_dir)
            class_names = list(FASHION_MNIST_CLASSES)
            items = _fashion_mnist_items(fm, per_class=per_class, test_per_class=test_per_class,
                                         seed=seed, val_fraction=val_fraction,
                                         test_fraction=test_fraction)
            class_dirs = class_dir_names(class_names)
            rows, rejected = _write_fashion_mnist(tmp, fm, items, class_dirs, progress=progress)
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
            scan = _scan_image_folder(root, workers=workers, progress=progress, log=log)
            rejected, skipped = scan["rejected"], scan["skipped"]
            _require_usable(scan, root)
            class_names = scan["classes"]
            class_dirs = class_dir_names(class_names)
            assigned, notes = _assign_image_folder_splits(
                scan, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                per_class=per_class, test_per_class=test_per_class)
            rows = _link_image_folder(tmp, scan, assigned, class_dirs, root)
            src_info = {"type": "image_folder", "path": str(root), "layout": scan["layout"],
                        "given_splits": scan["given_splits"],
                        "stored_as": "symbolic links to the source files"}
        counts = _counts(rows, class_names)
        summary = {
            "tool": "train.load_data",
            "format_version": FORMAT_VERSION,
            "source": src_info,
            "seed": seed,
            "arguments": arguments,
            "classes": class_names,
            "class_dirs": dict(zip(class_names, class_dirs)),
            "num_images": len(rows),
            "split_sizes": {s: sum(counts[s].values()) for s in SPLITS},
            "counts": counts,
            "notes": notes,
            "rejected": rejected,
            "skipped": skipped,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": None,
            "git_revision": _git_revision(),
            "versions": _versions(),
        }
        summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
        _write_outputs(tmp, rows, class_names, summary)
        os.chmod(tmp, 0o755)
        _publish(tmp, data_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ----------------------------------------------------------------------------
# reporting and CLI
# ----------------------------------------------------------------------------
def format_file_table(title: str, entries: list[dict], limit: int = 50) -> str:
    if not entries:
        return ""
    width = min(60, max(len("path"), *(len(e["path"]) for e in entries[:limit])))
    lines = [f"{title} ({len(entries)}):", f"  {'path':<{width}}  reason"]
    lines += [f"  {e['path']:<{width}}  {e['reason']}" for e in entries[:limit]]
    if len(entries) > limit:
        lines.append(f"  ... {len(entries) - limit} more in summary.json")
    return "\n".join(lines)


def format_counts_table(summary: dict[str, Any]) -> str:
    counts, classes = summary["counts"], summary["classes"]
    width = max(len("class"), len("total"), *(len(c) for c in classes))
    head = f"{'label':>5}  {'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'total':>8}"
    lines = [head, "-" * len(head)]
    for i, c in enumerate(classes):
        per = [counts[s][c] for s in SPLITS]
        lines.append(f"{i:>5}  {c:<{width}}" + "".join(f"{n:>8}" for n in per) + f"{sum(per):>8}")
    lines.append("-" * len(head))
    tot = [summary["split_sizes"][s] for s in SPLITS]
    lines.append(f"{'':>5}  {'total':<{width}}" + "".join(f"{n:>8}" for n in tot) + f"{sum(tot):>8}")
    return "\n".join(lines)


def format_report(summary: dict[str, Any]) -> str:
    parts = [format_file_table("rejected files (left out)", summary["rejected"]),
             format_file_table("skipped entries", summary["skipped"]),
             "\n".join(f"note: {n}" for n in summary["notes"]),
             format_counts_table(summary)]
    return "\n\n".join(p for p in parts if p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.load_data",
        description="Stage 1: validate images and write the data folder "
                    "(images/<split>/<class>/, manifest.csv, labels.txt, summary.json).",
        epilog="Without --image_folder the embedded Fashion-MNIST is used "
               "(apt-get install dataset-fashion-mnist). Split rules: see the module docstring "
               "of train/load_data.py and docs/architecture.md.")
    p.add_argument("--data_path", "--data-path", default="./data/",
                   help="output data folder (default: ./data/)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=[FASHION_MNIST], default=None,
                     help="embedded data set (default when --image_folder is not given)")
    src.add_argument("--image_folder", "--image-folder", default=None, metavar="PATH",
                     help="ImageFolder tree: PATH/<class>/<images> or "
                          "PATH/{train,val,test}/<class>/<images>")
    p.add_argument("--per-class", "--per_class", type=int, default=None, metavar="N",
                   help="seeded, stratified subset: N train+val images per class")
    p.add_argument("--test-per-class", "--test_per_class", type=int, default=None, metavar="M",
                   help="test images per class with --per-class (default: "
                        "max(1, round(N * test_fraction / (1 - test_fraction))))")
    p.add_argument("--seed", type=int, default=0, help="split/subset seed (default: 0)")
    p.add_argument("--val-fraction", "--val_fraction", type=float, default=0.15,
                   help="share of the images for val (default: 0.15)")
    p.add_argument("--test-fraction", "--test_fraction", type=float, default=0.15,
                   help="share of the images for test (default: 0.15)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads used to check images (default: CPU count, at most 8)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing data folder written by this tool")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare_dataset(
            args.data_path, dataset=args.dataset, image_folder=args.image_folder,
            per_class=args.per_class, test_per_class=args.test_per_class, seed=args.seed,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, force=args.force,
            workers=args.workers, progress=not args.no_progress)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no permission to write --data_path; nothing half-written is left
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the previous data folder (if any) is unchanged", file=sys.stderr)
        return 130
    print()
    print(format_report(summary))
    print(f"\nwrote {summary['num_images']} images to {args.data_path} "
          f"({summary['elapsed_s']} s): {MANIFEST_FILE}, {LABELS_FILE}, {SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
