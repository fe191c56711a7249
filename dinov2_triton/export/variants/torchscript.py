"""`torchscript`: torch.jit.trace of the (logits, embedding) wrapper, served by
Triton's libtorch backend (`pytorch_libtorch`, model.pt).

Traced, not scripted: the timm ViT is traceable and the position embedding is
already resampled (DINOv2) or the RoPE table computed (DINOv3) for the fixed
input size, so the trace has no data-dependent control flow. DINOv3 traces
too: the wrapper calls the backbone with timm's Python defaults, so
`is_causal` reaches scaled_dot_product_attention as a constant bool (the
TorchScript-based ONNX exporter is what fails on it, see variants/onnx.py);
verify.py checks the traced file at batch 1 and max_batch_size like any other.
Not frozen: a frozen module inlines weights as constants, which the libtorch
backend cannot move to the GPU of a KIND_GPU instance."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dinov2_triton.export.registry import Variant, register


def build(ctx, path: Path) -> dict:
    import torch

    module = ctx.export_module()
    example = ctx.example_input(2)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace is deprecated upstream, but Triton's libtorch backend
        # serves TorchScript only; the TracerWarnings are timm's shape asserts,
        # constant for a fixed input size.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # check_trace=False: verify.py runs the saved file at batch 1 and
        # max_batch_size on real images, a stricter check than the tracer's.
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))
    return {"method": "torch.jit.trace", "torch": torch.__version__, "example_batch": 2,
            "output_order": ["logits", "embedding"]}


def load_runner(path: Path):
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # "torch.jit.load is deprecated"
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            logits, embedding = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return logits.numpy(), embedding.numpy()
    return run


TORCHSCRIPT = register(Variant(
    name="torchscript", platform="pytorch_libtorch", filename="model.pt", precision="fp32",
    build=build, load_runner=load_runner, gate="fp32", ensemble_rank=1,
    description="TorchScript trace, FP32 (libtorch backend; outputs bound by order)"))
