"""The one way this project opens an image: EXIF orientation applied, any mode
converted to 8-bit RGB. Training, calibration, clients and the Triton
preprocessing model all call `open_rgb`, so a served image is decoded exactly
as a training image was."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, bytearray, memoryview]

# Refuse decompression bombs with a clear error instead of PIL's warning.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


class ImageDecodeError(ValueError):
    """Raised when bytes or a file are not a usable image; names the source."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clip (PIL's convert clips).
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        arr = (arr * (255.0 / hi)) if hi > 255 else arr
        img = Image.fromarray(arr.clip(0, 255).astype("uint8"), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels carry arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(source: ImageSource, *, name: str | None = None) -> Image.Image:
    """Decode `source` (a path or encoded bytes) fully into an RGB image.

    Raises ImageDecodeError naming the file (or `name`) when the data is not a
    complete, decodable image.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    try:
        if isinstance(source, (str, Path)):
            fh = open(source, "rb")
        else:
            data = bytes(source)
            if not data:
                raise ImageDecodeError(f"{label}: empty image data (0 bytes)")
            fh = io.BytesIO(data)
        with fh:
            img = Image.open(fh)
            img.load()  # decode now: truncated files fail here, not later
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{label}: file not found") from exc
    except UnidentifiedImageError as exc:
        # PIL's own message embeds the repr of the file object; say what matters.
        raise ImageDecodeError(f"{label}: not a decodable image (unrecognised image format)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{label}: not a decodable image ({exc})") from exc
