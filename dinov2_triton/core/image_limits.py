"""What counts as an acceptable image, before anything is decoded: at most
``max_bytes`` encoded bytes and ``max_pixels`` decoded pixels (width x height
read from the header).

One definition for both sides: the data stage (dinov2_triton.data.validate) leaves
out files over the limits, and the served ``dinov2_preprocess`` model refuses
them (export copies this file beside its model.py, limits from its
config.pbtxt parameters), so training and serving agree on what an image is.

Why before decoding: a 438 KB PNG can declare 20000 x 20000 pixels; decoding
it costs seconds of CPU and gigabytes of memory (1.2 GB as RGB). PIL's
``Image.open`` reads only the header, so the size is known in microseconds.

Copied into the served model: stdlib and Pillow only, no project imports.
"""
from __future__ import annotations

import io
import warnings

#: 20 MB: a 24-megapixel JPEG at high quality is 10-15 MB
DEFAULT_MAX_IMAGE_BYTES = 20_000_000
#: 40 megapixels (e.g. 8000 x 5000); well below PIL's own bomb limit
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class ImageLimitError(ValueError):
    """An image over a limit; the message names the image, its size and the limit."""


def check_image_limits(data: bytes, *, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
                       max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                       name: str = "image") -> tuple[int, int] | None:
    """Raise ImageLimitError if ``data`` (encoded image bytes) is over
    ``max_bytes`` or declares more than ``max_pixels`` pixels; ``None`` turns
    a limit off. Returns the declared (width, height), or None when the
    header cannot be read (the decoder then reports the image as undecodable)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageLimitError(f"{name}: {len(data)} bytes exceeds the limit of {max_bytes} "
                              f"encoded bytes (max_image_bytes)")
    from PIL import Image

    try:
        with warnings.catch_warnings():   # PIL's DecompressionBombWarning: this function decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:   # header only: no pixel is decoded here
                width, height = img.size
    except Image.DecompressionBombError as exc:
        # PIL's own check (2 x Image.MAX_IMAGE_PIXELS) fired while reading the
        # header: far over any sane limit; its message carries the pixel count
        import re

        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0)}"
        raise ImageLimitError(f"{name}: {pixels} pixels exceeds the limit of "
                              f"{max_pixels if max_pixels is not None else 'PIL'} pixels "
                              f"(max_image_pixels)") from None
    except Exception:  # noqa: BLE001 - not an image header: the full decode names the problem
        return None
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLimitError(f"{name}: {width} x {height} = {width * height} pixels exceeds the "
                              f"limit of {max_pixels} pixels (max_image_pixels)")
    return width, height
