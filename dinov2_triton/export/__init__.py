"""Export stage: checkpoint -> verified, benchmarked Triton model repository.

`dinov2-triton export --model-path models/model_final.pth --repository model_repository/`
builds every requested variant (TorchScript, ONNX, and the FP16/INT8/TensorRT
variants registered in `dinov2_triton.export.registry`), verifies each one against the eager
FP32 model on held-out images before it is published, measures its speed, and
publishes it atomically as a new version of `dinov2_<variant>` plus the
`dinov2_preprocess` + `dinov2` ensemble. See docs/architecture.md and
model_repository/README.md.

Importing this package is cheap (no torch): heavy imports live inside functions.
"""
from dinov2_triton.export.registry import (
    SkipVariant,
    Variant,
    build_order,
    get_variant,
    model_name,
    register,
    variant_names,
)

__all__ = ["SkipVariant", "Variant", "build_order", "get_variant", "model_name", "register", "run_export",
           "variant_names"]


def run_export(*args, **kwargs):
    """See dinov2_triton.export.pipeline.run_export (imported lazily)."""
    from dinov2_triton.export.pipeline import run_export as _run_export

    return _run_export(*args, **kwargs)
