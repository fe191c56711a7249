"""Image trees as they come off real disks: archive and file-manager litter, an empty class
folder, a link that leaves the tree, and class names as people write them.

The data stage must skip (and list, with the reason) what is not data, stop on an empty
class folder unless told to drop it, and write the manifest it writes for the clean tree."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dinov2_triton.data.load import prepare_dataset
from dinov2_triton.data.sources import DatasetError
from tests.fixtures.images import make_class_tree, png_bytes, write

CLASSES = {"cat": 6, "dog": 6, "fox": 6}


def run(src: Path, out: Path, **kw) -> dict:
    prepare_dataset(out, image_folder=src, progress=False, log=None, workers=1, **kw)
    return json.loads((out / "summary.json").read_text())


def skipped_by_path(summary: dict) -> dict[str, str]:
    return {s["path"]: s["reason"] for s in summary["skipped"]}


def litter(tree: Path, outside: Path) -> None:
    """What a Mac zip, a Windows explorer and a Synology share leave behind, plus an empty
    class folder and links that leave the tree."""
    write(tree / "__MACOSX" / "cat" / "._img_00.png", b"\x00\x05\x16\x07AppleDouble")
    write(tree / "__MACOSX" / "._cat", b"\x00\x05\x16\x07")
    write(tree / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(tree / "cat" / ".DS_Store", b"\x00\x00\x00\x01Bud1")
    write(tree / "cat" / "._img_00.png", b"\x00\x05\x16\x07AppleDouble")
    write(tree / "dog" / "Thumbs.db", b"\xd0\xcf\x11\xe0")
    write(tree / "dog" / "desktop.ini", b"[.ShellClassInfo]\n")
    write(tree / "fox" / "@eaDir" / "img_00.png" / "SYNOFILE_THUMB_M.jpg", png_bytes(seed=99))
    (tree / "empty class").mkdir()
    write(outside / "stray.png", png_bytes(seed=123))
    os.symlink(outside / "stray.png", tree / "cat" / "stray.png")
    os.symlink(outside, tree / "dog" / "linked_folder")


def test_litter_is_skipped_and_listed_and_the_manifest_is_the_clean_trees(tmp_path):
    clean, messy, outside = tmp_path / "clean", tmp_path / "messy", tmp_path / "outside"
    make_class_tree(clean, CLASSES)
    shutil.copytree(clean, messy)
    litter(messy, outside)

    want = run(clean, tmp_path / "d_clean")
    got = run(messy, tmp_path / "d_messy", skip_empty_classes=True)

    assert (tmp_path / "d_messy" / "manifest.csv").read_text() == (tmp_path / "d_clean" / "manifest.csv").read_text()
    assert (tmp_path / "d_messy" / "labels.txt").read_text() == "cat\ndog\nfox\n"
    assert got["classes"] == want["classes"] and got["counts"] == want["counts"]
    skipped = skipped_by_path(got)
    assert skipped["__MACOSX"].startswith("macOS archive metadata")
    assert skipped[".DS_Store"] == skipped["cat/.DS_Store"] == "macOS Finder metadata"
    assert skipped["cat/._img_00.png"] == "macOS AppleDouble resource fork"
    assert skipped["dog/Thumbs.db"] == "Windows thumbnail cache"
    assert skipped["dog/desktop.ini"] == "Windows folder settings"
    assert skipped["fox/@eaDir"] == "Synology NAS thumbnail folder"
    assert skipped["cat/stray.png"].startswith("symbolic link that leaves the tree")
    assert skipped["dog/linked_folder"].startswith("symbolic link that leaves the tree")
    assert skipped["empty class"] == "class folder with no usable image, dropped (--skip-empty-classes)"
    assert not got["rejected"], got["rejected"]   # nothing of the litter was taken for a bad image
    assert got["arguments"]["skip_empty_classes"] is True


def test_an_empty_class_folder_stops_the_run_naming_it_and_the_flag(tmp_path):
    src = make_class_tree(tmp_path / "src", CLASSES)
    (src / "empty class").mkdir()
    with pytest.raises(DatasetError, match=r"empty class \(no image files\).*--skip-empty-classes"):
        run(src, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_macosx_beside_split_folders_is_not_a_split_or_a_class(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val", "test"):
        make_class_tree(src / split, {"cat": 3, "dog": 3}, seed=hash(split) % 97)
    write(src / "__MACOSX" / "train" / "._cat", b"\x00\x05\x16\x07")
    write(src / "train" / ".DS_Store", b"Bud1")
    summary = run(src, tmp_path / "d")
    assert summary["source"]["layout"] == "pre-split" and summary["classes"] == ["cat", "dog"]
    assert set(skipped_by_path(summary)) == {"__MACOSX", "train/.DS_Store"}


def test_dropping_empty_classes_still_needs_two_classes(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cat": 4})
    (src / "dog").mkdir()
    with pytest.raises(DatasetError, match="1 class folder.*left.*dog.*at least 2"):
        run(src, tmp_path / "d", skip_empty_classes=True)


def test_class_names_as_people_write_them_survive_every_file(tmp_path):
    """Spaces, unicode, parentheses and dashes: labels.txt of the data folder, the checkpoint
    record, the Triton labels.txt the export writes and what the client reads back."""
    from dinov2_triton.client.inputs import read_repository_labels
    from dinov2_triton.export.serving_models import labels_bytes
    from dinov2_triton.train.checkpoint import read_checkpoint
    from tests.fixtures.models import write_tiny_checkpoint

    names = ["café-crème", "red fox (Vulpes)", "T-shirt top", "日本 cat"]
    src = make_class_tree(tmp_path / "src", {n: 3 for n in names})
    summary = run(src, tmp_path / "d")
    assert summary["classes"] == sorted(names)
    assert (tmp_path / "d" / "labels.txt").read_text(encoding="utf-8") == "".join(f"{n}\n" for n in sorted(names))

    ckpt = write_tiny_checkpoint(tmp_path / "model_final.pth", class_names=summary["classes"])
    assert read_checkpoint(ckpt).class_names == sorted(names)

    model_dir = tmp_path / "repo" / "dinov2_onnx"
    model_dir.mkdir(parents=True)
    (model_dir / "labels.txt").write_bytes(labels_bytes(summary["classes"]))
    assert read_repository_labels(tmp_path / "repo", "dinov2_onnx") == sorted(names)
