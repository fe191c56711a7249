"""Is a file a usable image? Full decode with dinov2_triton.core.images.open_rgb plus an
extension-vs-content check, over many files in threads (PIL decoding and
sha256 release the GIL). Used by the data stage for ImageFolder trees.

A file over the limits of dinov2_triton.core.image_limits (encoded bytes, decoded pixels
read from the header, checked before decoding) is left out with the reason:
the served dinov2_preprocess model refuses the same images, so nothing the
data stage accepts is refused by the server (with the default limits)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

# extension -> formats PIL may report for a correctly named file
IMAGE_EXTENSIONS = {
    ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",),
    ".bmp": ("BMP", "DIB"), ".webp": ("WEBP",), ".tif": ("TIFF",),
    ".tiff": ("TIFF",), ".gif": ("GIF",),
}

#: entries that file managers, archivers and NAS boxes leave in image trees: never a class, never an image
SYSTEM_ENTRIES = {
    "__MACOSX": "macOS archive metadata (Archive Utility)",
    ".DS_Store": "macOS Finder metadata",
    ".Spotlight-V100": "macOS Spotlight index",
    ".Trashes": "macOS trash",
    ".fseventsd": "macOS file-system events log",
    "Thumbs.db": "Windows thumbnail cache",
    "ehthumbs.db": "Windows thumbnail cache",
    "desktop.ini": "Windows folder settings",
    "$RECYCLE.BIN": "Windows recycle bin",
    "System Volume Information": "Windows volume metadata",
    "@eaDir": "Synology NAS thumbnail folder",
    "lost+found": "file-system recovery folder",
}


def system_entry_reason(name: str) -> str | None:
    """Why an entry of an image tree is not data (a file manager's, an archiver's or a
    hidden entry), or None when it may be a class folder or an image."""
    if name in SYSTEM_ENTRIES:
        return SYSTEM_ENTRIES[name]
    if name.startswith("._"):
        return "macOS AppleDouble resource fork"
    if name.startswith("."):
        return "hidden entry"
    return None


def outside_link_reason(path: Path, root: Path) -> str | None:
    """For a symbolic link whose target lies outside `root` (or dangles): the reason to skip it."""
    if not path.is_symlink():
        return None
    target = Path(os.path.realpath(path))
    if not target.exists():
        return f"symbolic link to a missing target ({os.readlink(path)})"
    if not target.is_relative_to(Path(os.path.realpath(root))):
        return f"symbolic link that leaves the tree (to {target})"
    return None


def progress_bar(iterable: Iterable, *, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs stay clean)
    return tqdm(iterable, total=total, desc=desc, unit="img", disable=None, leave=False)


def walk_class_folder(class_dir: Path, root: Path) -> tuple[list[Path], list[dict]]:
    """Candidate image files (sorted) and skipped entries under one class folder."""
    candidates, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        base = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            reason = system_entry_reason(d) or outside_link_reason(base / d, root)
            if reason:
                skipped.append({"path": (base / d).relative_to(root).as_posix(), "reason": reason})
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            p = base / f
            rel = p.relative_to(root).as_posix()
            reason = system_entry_reason(f) or outside_link_reason(p, root)
            if reason:
                skipped.append({"path": rel, "reason": reason})
            elif p.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append({"path": rel, "reason": f"extension {p.suffix or '(none)'!s} is not "
                                f"an image extension ({' '.join(sorted(IMAGE_EXTENSIONS))})"})
            elif not p.is_file():
                skipped.append({"path": rel, "reason": "not a regular file"})
            else:
                candidates.append(p)
    candidates.sort(key=lambda p: p.relative_to(root).as_posix())
    return candidates, skipped


def check_image_file(path: Path, *, max_bytes: int | None = None,
                     max_pixels: int | None = None) -> tuple[str | None, str | None]:
    """(sha256, None) for a usable image, (None, reason) otherwise.

    Usable = non-empty, within the size limits (None: the defaults of
    dinov2_triton.core.image_limits, the served model's defaults too), fully decodable by
    open_rgb, and PIL's detected format agrees with the extension."""
    from PIL import Image

    from dinov2_triton.core.artifact_io import sha256_bytes
    from dinov2_triton.core.image_limits import (
        DEFAULT_MAX_IMAGE_BYTES,
        DEFAULT_MAX_IMAGE_PIXELS,
        ImageLimitError,
        check_image_limits,
    )
    from dinov2_triton.core.images import ImageDecodeError, open_rgb

    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot read ({exc.strerror or exc})"
    if not data:
        return None, "empty file (0 bytes)"
    try:
        check_image_limits(data, name=path.name,
                           max_bytes=DEFAULT_MAX_IMAGE_BYTES if max_bytes is None else max_bytes,
                           max_pixels=DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    except ImageLimitError as exc:
        return None, str(exc).removeprefix(f"{path.name}: ")
    try:
        open_rgb(data, name=str(path))
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
    return sha256_bytes(data), None


def check_files(paths: list[Path], *, workers: int, progress: bool, desc: str) -> list[tuple]:
    """check_image_file over paths, in order; threads (PIL decoding and sha256
    release the GIL)."""
    if workers <= 1 or len(paths) < 8:
        return [check_image_file(p) for p in progress_bar(paths, total=len(paths), desc=desc,
                                                          enabled=progress)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(progress_bar(pool.map(check_image_file, paths), total=len(paths), desc=desc,
                                 enabled=progress))
