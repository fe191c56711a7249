"""The variant registry: every export format is one `Variant` entry.

A variant knows how to build its artifact (`build`) and how to run it in
this process (`load_runner`, for verification and the benchmark). The
pipeline (export/pipeline.py) does everything else the same way for all of
them: staging, verification against eager FP32, the accuracy gate, the speed
measurement, the config.pbtxt and the atomic publish.

Where variants come from: the modules in VARIANT_MODULES (the one table),
each of which declares its variants with `register(Variant(...))`.
`load_builtin_variants()` imports them. The build order is computed from the
declared parents (`build_order`), never from the order modules happened to
be imported in, so a module may register a child before its parent.

Public API for the other stages: `variant_names()`, `get_variant(name)`,
`model_name(variant_or_name)` (= `Variant.model_name`), `build_order(names)`,
`ensemble_candidates()`, `gate_scopes()`.

Light at import (standard library + dinov2_triton.export.gates): `dinov2-triton export --help`
lists the registered variants without importing torch.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from dinov2_triton.export.gates import GATES

log = logging.getLogger(__name__)

# "openvino" is a Triton backend name, not a platform string: its config.pbtxt
# says backend: "openvino" (dinov2_triton.export.triton_config.BACKEND_PLATFORMS).
PLATFORMS = ("pytorch_libtorch", "onnxruntime_onnx", "tensorrt_plan", "openvino")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
MODEL_PREFIX = "dinov2_"

# The modules that declare variants, in the order their variants are listed
# (help text, "all", ties in the build order). Optional ones may be missing
# from a checkout; an ImportError raised INSIDE an existing module is not hidden.
VARIANT_MODULES: tuple[tuple[str, bool], ...] = (
    ("dinov2_triton.export.variants.torchscript", True),
    ("dinov2_triton.export.variants.onnx", True),
    ("dinov2_triton.export.variants.onnx_fp16", False),
    ("dinov2_triton.export.variants.onnx_int8", False),
    ("dinov2_triton.export.variants.onnx_int8_dynamic", False),
    ("dinov2_triton.export.variants.openvino", False),
    ("dinov2_triton.export.variants.tensorrt", False),
)

# (np.ndarray float32 [N,3,H,W]) -> (logits, embedding) float32
Runner = Callable[[Any], "tuple[Any, Any]"]


class SkipVariant(Exception):
    """Raised by `Variant.build` (or `load_runner`) when the variant cannot be
    built or run on this host; str(exc) is the reason shown to the user, e.g.
    "not built: needs an NVIDIA GPU and TensorRT"."""


@dataclass(frozen=True)
class Variant:
    name: str                 # lowercase letters, digits, '_' (the model is MODEL_PREFIX + name)
    platform: str             # one of PLATFORMS
    filename: str             # "model.pt" | "model.onnx" | "model.plan" (Triton's default file names)
    precision: str            # one of PRECISIONS
    # build(ctx: dinov2_triton.export.context.ExportContext, path) writes the artifact to
    # `path` (inside the staging version folder); returns extra manifest info
    # (a JSON-able dict); raises SkipVariant.
    build: Callable[[Any, Path], dict]
    # In-process runner: float32 pixel_values [N,3,H,W] -> (logits, embedding)
    # float32; may raise SkipVariant when the artifact cannot run here.
    load_runner: Callable[[Path], Runner]
    parent: str | None = None  # variant whose artifact it is built from (built first)
    gate: str = "fp32"         # key into dinov2_triton.export.gates.GATES
    description: str = ""
    config_parameters: dict[str, str] = field(default_factory=dict)  # extra config.pbtxt `parameters`
    # Variants the `dinov2` ensemble may call when --default-variant is not
    # given (or was not published): the lowest rank that was published wins.
    ensemble_rank: int | None = None

    @property
    def model_name(self) -> str:
        return model_name(self.name)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"variant name {self.name!r}: use lowercase letters, digits and '_'")
        if self.platform not in PLATFORMS:
            raise ValueError(f"variant {self.name}: platform {self.platform!r} not in {PLATFORMS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"variant {self.name}: precision {self.precision!r} not in {PRECISIONS}")
        if self.parent == self.name:
            raise ValueError(f"variant {self.name}: cannot be its own parent")
        if self.gate not in GATES:
            raise ValueError(f"variant {self.name}: gate {self.gate!r} not in dinov2_triton.export.gates.GATES "
                             f"({sorted(GATES)})")

    def describe(self) -> dict[str, Any]:
        """The static facts of a variant, for the manifest."""
        return {"name": self.name, "model_name": self.model_name, "platform": self.platform,
                "filename": self.filename, "precision": self.precision, "parent": self.parent,
                "gate": self.gate, "description": self.description}


REGISTRY: dict[str, Variant] = {}
_loaded = False


def model_name(variant: "Variant | str") -> str:
    """The Triton model name of a variant (or variant name): dinov2_<name>."""
    return MODEL_PREFIX + (variant if isinstance(variant, str) else variant.name)


def register(variant: Variant) -> Variant:
    """Add (or, when a module is re-imported, replace) a variant. Parents are
    checked when the build order is computed, so declaration order is free."""
    REGISTRY[variant.name] = variant
    return variant


def load_builtin_variants() -> dict[str, Variant]:
    """Import the modules of VARIANT_MODULES (each registers its variants),
    once. A missing optional module is tolerated (logged); an ImportError
    raised inside an existing module (a missing dependency, a bug) is not."""
    global _loaded
    if _loaded:
        return REGISTRY
    for module, required in VARIANT_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if required or exc.name != module:
                raise
            log.debug("optional variant module %s is not present", module)
    _loaded = True
    build_order(REGISTRY)   # every declared parent exists and there is no cycle
    return REGISTRY


def variant_names() -> list[str]:
    """Every registered variant, in the table's order."""
    return list(load_builtin_variants())


def get_variant(name: str) -> Variant:
    load_builtin_variants()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; choose from {list(REGISTRY) or '(none registered)'}"
                       ) from None


def ensemble_candidates() -> list[str]:
    """Variants the ensemble may call by default, preferred first."""
    ranked = [v for v in load_builtin_variants().values() if v.ensemble_rank is not None]
    return [v.name for v in sorted(ranked, key=lambda v: v.ensemble_rank)]


def gate_scopes() -> set[str]:
    """Every SCOPE a gate override may name here: gate keys, variant names and
    their model names."""
    names = load_builtin_variants()
    return set(GATES) | set(names) | {v.model_name for v in names.values()}


def build_order(names: Iterable[str]) -> list[str]:
    """`names` plus every ancestor they need, parents before children; ties
    keep the registry's order. Raises ValueError for an unknown variant, an
    undeclared parent or a parent cycle (naming the variants)."""
    names = list(names)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(REGISTRY)}")
    wanted: set[str] = set()
    for name in names:
        chain = [name]
        parent = REGISTRY[name].parent
        while parent is not None and parent not in wanted:
            if parent not in REGISTRY:
                raise ValueError(f"variant {chain[-1]}: parent {parent!r} is not registered "
                                 f"(registered: {list(REGISTRY)})")
            if parent in chain:
                raise ValueError(f"variants {' -> '.join(chain + [parent])}: the parents form a cycle")
            chain.append(parent)
            parent = REGISTRY[parent].parent
        wanted.update(chain)
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        parent = REGISTRY[name].parent
        if parent is not None:
            visit(parent)
        order.append(name)
    for name in REGISTRY:   # registry order, each parent placed just before its first child
        if name in wanted:
            visit(name)
    return order


def as_bool(value, key: str) -> bool:
    """A variant builder option as a boolean: true/false words in strings (--set KEY=VALUE), else bool()."""
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={value!r}: expected true or false")
    return bool(value)
