"""dinov2-triton: fine-tune DINOv2, export verified variants, serve them on NVIDIA Triton, measure them.

One package, one command (``dinov2-triton``). Subpackages by concern, each
importing only the ones below it (``LAYERS``; tests/test_structure.py walks
the import graph): core < data, serve < train < export < client < bench <
report < qa < tune < pipeline < cli. This module stays standard-library only:
the seed's root scripts import the package before any dependency is loaded.
"""
from __future__ import annotations

__version__ = "0.2.0"

#: package -> the packages it may import (besides itself). The one statement of the layering.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (),
    "data": ("core",),
    "serve": ("core",),
    "train": ("core", "data"),
    "export": ("core", "data", "serve", "train"),
    "client": ("core", "data", "serve", "train", "export"),
    "bench": ("core", "data", "serve", "train", "export", "client"),
    "report": ("core", "data", "serve", "train", "export", "client", "bench"),
    "qa": ("core", "data", "serve", "train", "export", "client", "bench", "report"),
    "tune": ("core", "data", "serve", "train", "export", "client", "bench", "report", "qa"),
    "pipeline": ("core", "data", "serve", "train", "export", "client", "bench", "report", "qa", "tune"),
}
