"""Stage 1 (data): dinov2_triton.data.load and dinov2_triton.data.datasets on tiny generated trees."""
from __future__ import annotations

import csv
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.core.images import ImageDecodeError, open_rgb
from dinov2_triton.data.datasets import ManifestDataset, ManifestError, read_labels, read_manifest, verify_checksums
from dinov2_triton.data.load import prepare_dataset
from dinov2_triton.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DatasetError,
    class_dir_names,
    default_test_per_class,
    read_idx,
    safe_dir_name,
    split_counts,
)
from tests.fixtures.images import (
    cmyk_jpeg_bytes,
    exif_rotated_jpeg_bytes,
    grey_png_bytes,
    jpeg_bytes,
    make_class_tree,
    palette_png_bytes,
    png16_bytes,
    png_bytes,
    rgba_png_bytes,
    tree_digest,
    truncated_jpeg_bytes,
    write,
)

ROOT = Path(__file__).resolve().parents[1]
HAVE_FMNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
@pytest.fixture
def fmnist_installed():
    # The embedded default data set is installed by scripts/setup_env.sh; a missing
    # one is a broken environment, not a reason to skip.
    if not HAVE_FMNIST:
        pytest.fail(f"{FASHION_MNIST_DIR} absent: run scripts/setup_env.sh (apt-get install dataset-fashion-mnist)")


needs_fmnist = pytest.mark.usefixtures("fmnist_installed")


def run(data_path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    return prepare_dataset(data_path, **kw)


def manifest_rows(data_path) -> list[dict]:
    with open(Path(data_path) / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("maker", [cmyk_jpeg_bytes, png16_bytes, palette_png_bytes,
                                   rgba_png_bytes, grey_png_bytes])
def test_open_rgb_accepts_every_mode(maker):
    img = open_rgb(maker(size=(16, 12)))
    assert img.mode == "RGB" and img.size == (16, 12)


def test_open_rgb_applies_exif_orientation():
    img = open_rgb(exif_rotated_jpeg_bytes(size=(40, 20), orientation=6))
    assert img.size == (20, 40)


@pytest.mark.parametrize("data", [b"", truncated_jpeg_bytes(), b"hello, not an image\n"])
def test_open_rgb_rejects_broken(data):
    with pytest.raises(ImageDecodeError):
        open_rgb(data, name="x")


# --------------------------------------------------------------------------- units
def test_split_counts_rule():
    assert split_counts(20, 0.15, 0.15, what="c") == (14, 3, 3)
    assert split_counts(3, 0.15, 0.15, what="c") == (1, 1, 1)
    assert split_counts(2, 0.0, 0.15, what="c") == (1, 0, 1)
    assert split_counts(4, 0.49, 0.49, what="c")[0] == 1
    with pytest.raises(DatasetError, match="at least 3 per class"):
        split_counts(2, 0.15, 0.15, what="class 'x'")
    assert default_test_per_class(50, 0.15) == 9
    assert default_test_per_class(1, 0.15) == 1
    assert default_test_per_class(50, 0.0) == 0


def test_safe_dir_names():
    assert safe_dir_name("T-shirt/top") == "T-shirt_top"
    assert safe_dir_name(".hidden") == "_hidden"
    assert safe_dir_name("a:b*c?") == "a_b_c_"
    assert safe_dir_name("Ankle boot") == "Ankle boot"
    assert class_dir_names(["a/b", "a_b", "A_B"]) == ["a_b", "a_b-1", "A_B-2"]


def test_read_idx(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    f = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(f, "wb") as fh:
        fh.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes())
    np.testing.assert_array_equal(read_idx(f), arr)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x12\x34\x08\x01" + struct.pack(">I", 5))
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(bad)


# --------------------------------------------------------------------------- ImageFolder
def odd_tree(root: Path) -> Path:
    """cat/ and dog/ with good, odd-but-valid, broken, hidden and non-image files."""
    make_class_tree(root, {"cat": 4, "dog": 4})
    write(root / "cat" / "cmyk.jpg", cmyk_jpeg_bytes())
    write(root / "cat" / "deep16.png", png16_bytes())
    write(root / "cat" / "palette.png", palette_png_bytes())
    write(root / "cat" / "alpha.png", rgba_png_bytes())
    write(root / "cat" / "rotated.jpg", exif_rotated_jpeg_bytes(size=(40, 20)))
    write(root / "cat" / "sub" / "nested.png", png_bytes(seed=77))
    write(root / "dog" / "empty.jpg", b"")
    write(root / "dog" / "truncated.jpg", truncated_jpeg_bytes())
    write(root / "dog" / "text.png", b"definitely not a PNG\n")
    write(root / "dog" / "really_png.jpg", png_bytes(seed=99))
    write(root / "dog" / ".DS_Store", b"\x00\x01")
    write(root / "dog" / "notes.txt", b"hello")
    write(root / "stray.jpg", jpeg_bytes())
    return root


def test_image_folder_rejects_broken_files_and_keeps_odd_ones(tmp_path):
    src = odd_tree(tmp_path / "src")
    before = tree_digest(src)
    out = tmp_path / "data"
    summary = run(out, image_folder=src, seed=0)

    assert tree_digest(src) == before, "the source tree must not be modified"
    reasons = {r.path: r.reason for r in summary.rejected}
    assert set(reasons) == {"dog/empty.jpg", "dog/truncated.jpg", "dog/text.png",
                            "dog/really_png.jpg"}
    assert reasons["dog/empty.jpg"] == "empty file (0 bytes)"
    assert "truncated" in reasons["dog/truncated.jpg"]
    assert "not a decodable image" in reasons["dog/text.png"]
    # the rejected entry names the file (its key); the reason carries no file-object repr
    assert "unrecognised image format" in reasons["dog/text.png"] and "<_io" not in reasons["dog/text.png"]
    assert reasons["dog/really_png.jpg"] == "extension .jpg but content is PNG"
    skipped = {s.path: s.reason for s in summary.skipped}
    assert skipped["dog/.DS_Store"] == "macOS Finder metadata"
    assert "not an image extension" in skipped["dog/notes.txt"]
    assert skipped["stray.jpg"] == "not inside a class folder"

    # everything is in summary.json too
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rejected"] == [r.model_dump() for r in summary.rejected]
    assert on_disk["source"]["layout"] == "single"

    rows = manifest_rows(out)
    names = {Path(r["path"]).name for r in rows}
    assert {"cmyk.jpg", "deep16.png", "palette.png", "alpha.png", "rotated.jpg",
            "sub__nested.png"} <= names
    assert not names & {"empty.jpg", "truncated.jpg", "text.png", "really_png.jpg"}
    assert sum(summary.split_sizes.values()) == len(rows) == 10 + 4
    for r in rows:
        link = out / r["path"]
        assert link.is_symlink() and os.path.isabs(os.readlink(link))
        assert Path(os.readlink(link)).is_relative_to(src.resolve())
        assert r["split"] in ("train", "val", "test")
    # EXIF orientation is applied at load time, through the link
    rotated = next(r for r in rows if r["path"].endswith("rotated.jpg"))
    assert open_rgb(out / rotated["path"]).size == (20, 40)
    assert verify_checksums(out) == []
    assert leftovers(tmp_path) == []


def test_class_with_no_usable_image_is_an_error(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cat": 3})
    write(src / "dog" / "broken.jpg", truncated_jpeg_bytes())
    write(src / "dog" / "empty.png", b"")
    with pytest.raises(DatasetError, match=r"no usable image.*dog.*2 rejected"):
        run(tmp_path / "data", image_folder=src)
    assert not (tmp_path / "data").exists()
    assert leftovers(tmp_path) == []


def test_single_class_and_empty_tree_are_errors(tmp_path):
    src = make_class_tree(tmp_path / "one", {"cat": 5})
    with pytest.raises(DatasetError, match="at least 2 classes"):
        run(tmp_path / "data", image_folder=src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        run(tmp_path / "data", image_folder=tmp_path / "empty")
    with pytest.raises(DatasetError, match="not a folder"):
        run(tmp_path / "data", image_folder=tmp_path / "missing")


def test_too_few_images_for_a_split_is_an_error(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cat": 5, "dog": 2})
    with pytest.raises(DatasetError, match=r"class 'dog' has only 2 usable"):
        run(tmp_path / "data", image_folder=src)
    summary = run(tmp_path / "data", image_folder=src, val_fraction=0.0)
    assert summary.counts["val"] == {"cat": 0, "dog": 0}
    assert summary.counts["test"]["dog"] == 1


def test_stratified_split_is_deterministic(tmp_path):
    classes = {"a": 20, "b": 20, "c": 13}
    src = make_class_tree(tmp_path / "src", classes)
    # the same files created in the opposite order (listing order may differ)
    src2 = tmp_path / "src2"
    for f in sorted(src.rglob("*.png"), reverse=True):
        write(src2 / f.relative_to(src), f.read_bytes())
    s1 = run(tmp_path / "d1", image_folder=src, seed=0)
    run(tmp_path / "d2", image_folder=src, seed=0)
    run(tmp_path / "d3", image_folder=src2, seed=0)
    s4 = run(tmp_path / "d4", image_folder=src, seed=1)
    m1, m2, m3, m4 = ((tmp_path / d / "manifest.csv").read_text() for d in ("d1", "d2", "d3", "d4"))
    assert m1 == m2 == m3
    assert m1 != m4
    for s in (s1, s4):
        assert s.counts["train"] == {"a": 14, "b": 14, "c": 9}
        assert s.counts["val"] == {"a": 3, "b": 3, "c": 2}
        assert s.counts["test"] == {"a": 3, "b": 3, "c": 2}
    # every usable file in exactly one split
    paths = [Path(r["path"]).name + r["class_name"] for r in manifest_rows(tmp_path / "d1")]
    assert len(paths) == len(set(paths)) == sum(classes.values())


def test_per_class_subset_of_image_folder(tmp_path):
    src = make_class_tree(tmp_path / "src", {"a": 30, "b": 30})
    s = run(tmp_path / "data", image_folder=src, per_class=10)
    for c in ("a", "b"):
        assert sum(s.counts[sp][c] for sp in ("train", "val", "test")) == 10


def test_labels_order_is_sorted_folder_names(tmp_path):
    src = make_class_tree(tmp_path / "src", {"zebra": 3, "Apple": 3, "mango": 3})
    run(tmp_path / "data", image_folder=src)
    assert (tmp_path / "data" / "labels.txt").read_text() == "Apple\nmango\nzebra\n"
    labels = read_labels(tmp_path / "data")
    for r in read_manifest(tmp_path / "data"):
        assert labels[r.label] == r.class_name
        assert f"/{r.class_name}/" in r.path


def test_pre_split_tree_is_detected_and_kept(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 5, "dog": 4})
    make_class_tree(src / "val", {"cat": 2, "dog": 2}, seed=1)
    make_class_tree(src / "test", {"cat": 1, "dog": 3}, seed=2)
    before = tree_digest(src)
    s = run(tmp_path / "data", image_folder=src)
    assert tree_digest(src) == before
    assert s.source.layout == "pre-split"
    assert s.counts == {"train": {"cat": 5, "dog": 4}, "val": {"cat": 2, "dog": 2},
                           "test": {"cat": 1, "dog": 3}}
    for r in manifest_rows(tmp_path / "data"):
        assert f"/{r['split']}/" in os.readlink(tmp_path / "data" / r["path"])


def test_pre_split_tree_without_val_carves_it_from_train(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 10, "dog": 10})
    make_class_tree(src / "test", {"cat": 2, "dog": 2}, seed=2)
    s = run(tmp_path / "data", image_folder=src)
    assert s.counts["val"] == {"cat": 2, "dog": 2}   # round(10 * 0.15)
    assert s.counts["train"] == {"cat": 8, "dog": 8}
    assert s.counts["test"] == {"cat": 2, "dog": 2}
    assert any("carved" in n for n in s.notes)


def test_pre_split_class_mismatch_and_mixed_layout_are_errors(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src / "train", {"cat": 3, "dog": 3})
    make_class_tree(src / "val", {"cat": 1, "bird": 1})
    with pytest.raises(DatasetError, match="class folders differ between splits"):
        run(tmp_path / "data", image_folder=src)
    mixed = tmp_path / "mixed"
    make_class_tree(mixed / "train", {"cat": 3, "dog": 3})
    make_class_tree(mixed, {"cat": 3})
    with pytest.raises(DatasetError, match="mixes split folders"):
        run(tmp_path / "data", image_folder=mixed)


def test_rerun_needs_force_and_a_failed_run_keeps_the_old_data(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cat": 4, "dog": 4})
    out = tmp_path / "data"
    run(out, image_folder=src, seed=0)
    first = (out / "manifest.csv").read_text()
    with pytest.raises(DatasetError, match="--force"):
        run(out, image_folder=src, seed=1)
    bad = make_class_tree(tmp_path / "bad", {"only": 4})
    with pytest.raises(DatasetError):
        run(out, image_folder=bad, force=True)
    assert (out / "manifest.csv").read_text() == first
    run(out, image_folder=src, seed=1, force=True)
    assert (out / "manifest.csv").read_text() != first
    assert leftovers(tmp_path) == []
    # --force never replaces a folder this tool did not write, nor overlaps the source
    other = tmp_path / "other"
    write(other / "precious.txt", b"keep me")
    with pytest.raises(DatasetError, match="does not look like a data folder"):
        run(other, image_folder=src, force=True)
    assert (other / "precious.txt").read_bytes() == b"keep me"
    with pytest.raises(DatasetError, match="overlap"):
        run(src / "data", image_folder=src)
    with pytest.raises(DatasetError, match="overlap"):
        run(tmp_path, image_folder=src, force=True)


# --------------------------------------------------------------------------- datasets.py
def test_manifest_dataset_and_checksums(tmp_path):
    import torch

    src = make_class_tree(tmp_path / "src", {"cat": 4, "dog": 4})
    write(src / "cat" / "rotated.jpg", exif_rotated_jpeg_bytes(size=(40, 20)))
    out = tmp_path / "data"
    run(out, image_folder=src, val_fraction=0.0, test_fraction=0.0)
    ds = ManifestDataset(out, "train", transform=lambda img: torch.tensor(img.size))
    assert len(ds) == 9 and ds.classes == ["cat", "dog"]
    sizes = {ds.records[i].path.rsplit("/", 1)[1]: tuple(ds[i][0].tolist()) for i in range(len(ds))}
    assert sizes["rotated.jpg"] == (20, 40)
    x, y = ManifestDataset(out, "train")[0]          # reference preprocessing by default
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    with pytest.raises(ManifestError, match="no rows for split 'val'"):
        ManifestDataset(out, "val")
    # a source file changed after load_data: the checksum check says which
    write(src / "dog" / "img_00.png", png_bytes(seed=12345))
    with pytest.raises(ManifestError, match=r"dog/img_00.png: sha256 .* differs"):
        ManifestDataset(out, "train", verify=True)


@pytest.mark.parametrize("row, message", [
    ("images/train/cat/a.png,7,cat,train," + "0" * 64, "label 7 out of range"),
    ("images/train/cat/a.png,x,cat,train," + "0" * 64, "not an integer"),
    ("images/train/cat/a.png,1,cat,train," + "0" * 64, "does not match label 1"),
    ("images/train/cat/a.png,0,cat,dev," + "0" * 64, "split 'dev'"),
    ("images/train/cat/a.png,0,cat,train,abc", "sha256 'abc'"),
    ("/etc/passwd,0,cat,train," + "0" * 64, "must be relative"),
    ("images/train/cat/a.png,0,cat", "3 fields"),
])
def test_read_manifest_names_file_and_line(tmp_path, row, message):
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    good = "images/train/dog/b.png,1,dog,train," + "1" * 64
    (tmp_path / "manifest.csv").write_text(f"path,label,class_name,split,sha256\n{good}\n{row}\n")
    with pytest.raises(ManifestError, match=rf"manifest.csv:3: .*{message}"):
        read_manifest(tmp_path)


def test_read_manifest_header_and_missing_files(tmp_path):
    with pytest.raises(ManifestError, match="labels.txt: not found"):
        read_manifest(tmp_path)
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    (tmp_path / "manifest.csv").write_text("file,label\n")
    with pytest.raises(ManifestError, match="manifest.csv:1: header"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fmnist_small(tmp_path_factory):
    if not HAVE_FMNIST:
        pytest.fail(f"{FASHION_MNIST_DIR} absent: run scripts/setup_env.sh (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fm") / "data"
    return out, run(out, dataset="fashion-mnist", per_class=6, seed=0)


@needs_fmnist
def test_fashion_mnist_per_class_subset(fmnist_small):
    from PIL import Image

    out, s = fmnist_small
    assert s.source.type == "fashion-mnist" and s.rejected == []
    # 6 per class from the train file: val = round(6 * 0.15 / 0.85) = 1, train 5;
    # test from t10k: max(1, round(6 * 0.15 / 0.85)) = 1
    for c in FASHION_MNIST_CLASSES:
        assert (s.counts["train"][c], s.counts["val"][c], s.counts["test"][c]) == (5, 1, 1)
    assert read_labels(out) == list(FASHION_MNIST_CLASSES)
    assert (out / "images" / "train" / "T-shirt_top").is_dir()
    records = read_manifest(out)
    assert len(records) == 70
    tshirt = [r for r in records if r.label == 0]
    assert all(r.class_name == "T-shirt/top" and "/T-shirt_top/" in r.path for r in tshirt)
    assert {r.path.rsplit("/", 1)[1].split("-")[1] for r in records if r.split == "test"} == {"t10k"}
    assert {r.path.rsplit("/", 1)[1].split("-")[1] for r in records if r.split != "test"} == {"train"}
    with Image.open(out / records[0].path) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (28, 28)
    assert verify_checksums(out) == []


@needs_fmnist
def test_fashion_mnist_is_deterministic_and_seeded(fmnist_small, tmp_path):
    out, _ = fmnist_small
    run(tmp_path / "same", dataset="fashion-mnist", per_class=6, seed=0)
    run(tmp_path / "other", dataset="fashion-mnist", per_class=6, seed=1)
    m = (out / "manifest.csv").read_text()
    assert (tmp_path / "same" / "manifest.csv").read_text() == m
    assert (tmp_path / "other" / "manifest.csv").read_text() != m


def test_fashion_mnist_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        run(tmp_path / "data", fashion_mnist_dir=tmp_path / "nowhere")
    assert not (tmp_path / "data").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- CLI
def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dinov2_triton", "data", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_help():
    p = cli("--help")
    assert p.returncode == 0
    for flag in ("--data-path", "--dataset", "--image-folder", "--per-class", "--seed",
                 "--val-fraction", "--test-fraction", "--force"):
        assert flag in p.stdout


def test_cli_run_and_errors(tmp_path):
    src = odd_tree(tmp_path / "src")
    p = cli("--data-path", tmp_path / "data", "--image-folder", src, "--seed", "3")
    assert p.returncode == 0, p.stderr
    assert "extension .jpg but content is PNG" in p.stdout      # rejected table
    assert "total" in p.stdout and "cat" in p.stdout            # counts table
    assert json.loads((tmp_path / "data" / "summary.json").read_text())["seed"] == 3
    p = cli("--data-path", tmp_path / "data", "--image-folder", src)
    assert p.returncode == 2 and "--force" in p.stderr and "Traceback" not in p.stderr
    one = make_class_tree(tmp_path / "one", {"cat": 3})
    p = cli("--data-path", tmp_path / "d2", "--image-folder", one)
    assert p.returncode == 2 and "at least 2 classes" in p.stderr
    assert "Traceback" not in p.stderr
