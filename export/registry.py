"""The variant registry: every export format is one `Variant` entry.

A variant knows how to build its artifact (`build`) and how to run it in
this process (`load_runner`, for verification and the benchmark). The
pipeline (export/pipeline.py) does everything else the same way for all of
them: staging, verification against eager FP32, the accuracy gate, the speed
measurement, the config.pbtxt and the atomic publish.

Builders live in their own modules and call `register(...)` at import time;
`load_builtin_variants()` imports them. Insertion order of REGISTRY is the
build order, so a variant is registered after its `parent`.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # numpy/context only for type hints: keep `--help` instant
    import numpy as np

    from export.context import ExportContext

log = logging.getLogger(__name__)

PLATFORMS = ("pytorch_libtorch", "onnxruntime_onnx", "tensorrt_plan")
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
MODEL_PREFIX = "dinov2_"

Runner = Callable[["np.ndarray"], "tuple[np.ndarray, np.ndarray]"]


class SkipVariant(Exception):
    """Raised by `Variant.build` (or `load_runner`) when the variant cannot be
    built or run on this host; str(exc) is the reason shown to the user, e.g.
    "not built: needs an NVIDIA GPU and TensorRT"."""


@dataclass(frozen=True)
class Variant:
    name: str                 # "torchscript", "onnx", "onnx_fp16", "onnx_int8", "trt_fp16", "trt_int8", "fp8"
    platform: str             # "pytorch_libtorch" | "onnxruntime_onnx" | "tensorrt_plan"
    filename: str             # "model.pt" | "model.onnx" | "model.plan" (Triton's default file names)
    precision: str            # "fp32" | "fp16" | "int8" | "fp8"
    # Writes the artifact to the given path (inside the staging version
    # folder); returns extra manifest info (a JSON-able dict); raises SkipVariant.
    build: Callable[["ExportContext", Path], dict]
    # In-process runner: float32 pixel_values [N,3,H,W] -> (logits, embedding)
    # float32; may raise SkipVariant when the artifact cannot run here.
    load_runner: Callable[[Path], Runner]
    parent: str | None = None  # variant whose artifact it is built from (built first)
    gate: str = "fp32"         # key into train.metrics.GATES
    description: str = ""
    config_parameters: dict[str, str] = field(default_factory=dict)  # extra config.pbtxt `parameters`

    @property
    def model_name(self) -> str:
        return f"{MODEL_PREFIX}{self.name}"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"variant name {self.name!r}: use lowercase letters, digits and '_'")
        if self.platform not in PLATFORMS:
            raise ValueError(f"variant {self.name}: platform {self.platform!r} not in {PLATFORMS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"variant {self.name}: precision {self.precision!r} not in {PRECISIONS}")
        if self.parent == self.name:
            raise ValueError(f"variant {self.name}: cannot be its own parent")


REGISTRY: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add (or, when a module is re-imported, replace) a variant. A parent must
    be registered first so that REGISTRY order is a valid build order."""
    if variant.parent is not None and variant.parent not in REGISTRY:
        raise ValueError(f"variant {variant.name}: parent {variant.parent!r} is not registered yet "
                         f"(registered: {list(REGISTRY)}); register the parent first")
    from train.metrics import GATES

    if variant.gate not in GATES:
        raise ValueError(f"variant {variant.name}: gate {variant.gate!r} not in train.metrics.GATES "
                         f"({sorted(GATES)})")
    REGISTRY[variant.name] = variant
    return variant


def get_variant(name: str) -> Variant:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; choose from {list(REGISTRY) or '(none registered)'}"
                       ) from None


# Built-in modules in build order. The first two ship with this stage; the
# others are optional (a checkout may not have them yet).
BUILTIN_MODULES = ("export.torchscript_variant", "export.onnx_variant")
OPTIONAL_MODULES = ("export.onnx_fp16", "export.onnx_int8", "export.tensorrt_engine")


def load_builtin_variants() -> dict[str, Variant]:
    """Import the variant modules (each registers its variants). A missing
    optional MODULE is tolerated; an ImportError raised inside an existing
    module (a missing dependency, a bug) is not hidden."""
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for mod in OPTIONAL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            log.debug("optional variant module %s is not present", mod)
    return REGISTRY


def describe(variant: Variant) -> dict[str, Any]:
    """The static facts of a variant, for the manifest."""
    return {"name": variant.name, "model_name": variant.model_name, "platform": variant.platform,
            "filename": variant.filename, "precision": variant.precision, "parent": variant.parent,
            "gate": variant.gate, "description": variant.description}
