"""TensorRT variants: `trt_fp16` (from the FP32 ONNX graph), `trt_int8`
(explicit quantization from the onnx_int8 Q/DQ graph) and `trt_fp8`
(ModelOpt FP8 Q/DQ + TensorRT, Ada/Hopper only).

The engine build itself is export/trt_build_main.py (standard library only,
so it also runs alone inside the NVIDIA TensorRT container): one profile
with max = max_batch_size (FIELD_NOTES 7), LayerNorm/Softmax/reductions/head
pinned FP32, the installed TensorRT checked against the pinned Triton
container's (FIELD_NOTES 2), and the version, GPU name and compute capability
stamped into the build info and config.pbtxt parameters.

Without TensorRT or a CUDA GPU (this CPU machine) build() raises SkipVariant
"not built: needs an NVIDIA GPU and TensorRT (...)": no file is written,
never a placeholder. The runner deserializes the plan with trt.Runtime and
runs it on torch CUDA tensors, so the pipeline verifies every engine against
eager FP32 on the GPU before publishing it (FIELD_NOTES 4).

Options (ExportContext.options, `--set KEY=VALUE`): trt_opt_batch (default:
max_batch_size), trt_workspace_gb, trt_builder_optimization_level,
trt_version_compatible, trt_fp32_layers ("normalization,softmax,reduce,head"),
trt_timing_cache ("auto" | path | ""), trt_allow_version_mismatch,
trt_versions_file.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import export.onnx_int8  # noqa: F401 - registers the parents `onnx` and `onnx_int8` first
from export.registry import SkipVariant, Variant, register
from export.trt_build_main import (DEFAULT_FP32_LAYERS, FP8_MIN_COMPUTE_CAPABILITY, NEEDS_GPU, VERSIONS_FILE,
                                   EngineBuildError, TensorRTUnavailable, VersionMismatch, build_engine,
                                   build_plan, check_version, gpu_info, import_tensorrt, pinned_versions,
                                   read_versions_file, versions_match)

log = logging.getLogger(__name__)

__all__ = ["build_engine", "build_plan", "check_version", "gpu_info", "import_tensorrt", "pinned_versions",
           "read_versions_file", "versions_match", "engine_runner", "TRT_DEFAULTS"]

TRT_DEFAULTS: dict[str, Any] = {
    "trt_opt_batch": None,                       # None: max_batch_size
    "trt_workspace_gb": None,                    # None: TensorRT's default (the device memory)
    "trt_builder_optimization_level": None,      # None: TensorRT's default (3)
    "trt_version_compatible": False,
    "trt_fp32_layers": ",".join(DEFAULT_FP32_LAYERS),
    "trt_timing_cache": "auto",
    "trt_allow_version_mismatch": False,
    "trt_versions_file": str(VERSIONS_FILE),
}


def _opt(options: Mapping[str, Any], key: str):
    value = options.get(key)
    return TRT_DEFAULTS[key] if value is None else value


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _build(ctx, path: Path, *, precision: str, source: str, onnx_path: Path | None = None) -> dict:
    """Shared build of the TensorRT variants from the artifact of variant
    `source` (or from `onnx_path` when given)."""
    o = ctx.options
    max_batch = ctx.max_batch_size
    opt_batch = _opt(o, "trt_opt_batch")
    try:
        # Check TensorRT and the GPU before touching the parent artifact.
        import_tensorrt()
        gpu_info()
    except TensorRTUnavailable as exc:
        raise SkipVariant(str(exc)) from None
    onnx_path = onnx_path or ctx.artifacts.get(source)
    if onnx_path is None or not Path(onnx_path).is_file():
        raise EngineBuildError(f"the `{source}` artifact is missing: build the {source} variant first")
    workspace = _opt(o, "trt_workspace_gb")
    level = _opt(o, "trt_builder_optimization_level")
    cache = _opt(o, "trt_timing_cache")
    # Build into the work dir and move: a failed build leaves nothing in the staging folder.
    tmp_plan = Path(ctx.work_dir) / f"{precision}_engine" / "model.plan"
    try:
        info = build_plan(onnx_path, tmp_plan, precision=precision, max_batch=max_batch,
                          opt_batch=None if opt_batch is None else int(opt_batch),
                          fp32_layers=str(_opt(o, "trt_fp32_layers")),
                          workspace_gb=None if workspace is None else float(workspace),
                          builder_optimization_level=None if level is None else int(level),
                          version_compatible=_bool(_opt(o, "trt_version_compatible")),
                          timing_cache=(cache or None),
                          allow_version_mismatch=_bool(_opt(o, "trt_allow_version_mismatch")),
                          versions_file=_opt(o, "trt_versions_file"))
    except (TensorRTUnavailable, VersionMismatch) as exc:
        raise SkipVariant(str(exc) if str(exc).startswith("not built") else f"not built: {exc}") from None
    shutil.move(str(tmp_plan), str(path))
    info["source_variant"] = source
    info["max_batch_size"] = max_batch
    return info


def build_trt_fp16(ctx, path: Path) -> dict:
    return _build(ctx, path, precision="fp16", source="onnx")


def build_trt_int8(ctx, path: Path) -> dict:
    return _build(ctx, path, precision="int8", source="onnx_int8")


def build_trt_fp8(ctx, path: Path) -> dict:
    """ModelOpt FP8 Q/DQ (train-split calibration, same node selection as
    INT8) then a TensorRT FP8 engine. Skipped below compute capability 8.9."""
    import numpy as np

    from export.onnx_int8 import (DEFAULT_ROLES, link_or_copy, node_roles, option, run_modelopt_quantize,
                                  select_nodes)

    # The same check _build makes, first: no calibration work on a host that cannot build.

    try:
        import_tensorrt()
        gpu = gpu_info()
    except TensorRTUnavailable as exc:
        raise SkipVariant(str(exc)) from None
    if tuple(gpu["cc"]) < FP8_MIN_COMPUTE_CAPABILITY:
        raise SkipVariant(f"not built: FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is "
                          f"{gpu['gpu_name']} (compute capability {gpu['compute_capability']})")
    import onnx

    work = Path(ctx.work_dir) / "trt_fp8"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fp32 = work / "fp32.onnx"
    link_or_copy(Path(ctx.artifacts["onnx"]), fp32)
    nodes = select_nodes(node_roles(onnx.load(str(fp32), load_external_data=False)), DEFAULT_ROLES)
    calib = ctx.calibration_images(int(option(ctx.options, "calib_size")), seed=0)
    np.save(work / "calib.npy", np.ascontiguousarray(calib, dtype=np.float32))
    q_path = work / "model_fp8.onnx"
    t = time.perf_counter()
    run = run_modelopt_quantize(fp32, q_path, work / "calib.npy", nodes, calib_method="max", dq_only=False,
                                calib_eps=str(option(ctx.options, "int8_calib_eps")), mode="fp8",
                                timeout_s=float(option(ctx.options, "int8_timeout_s")))
    info = _build(ctx, path, precision="fp8", source="onnx (ModelOpt FP8 Q/DQ)", onnx_path=q_path)
    info["fp8_quantization"] = {"tool": "nvidia-modelopt", "nodes": len(nodes), "calibration_images": len(calib),
                                "seconds": round(time.perf_counter() - t, 2), **run}
    return info


# ---------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------
def engine_runner(path: Path):
    """Deserialize a plan with trt.Runtime and run it on torch CUDA tensors.
    SkipVariant where TensorRT or a CUDA GPU is missing."""
    try:
        trt = import_tensorrt()
        gpu_info()
        import torch
    except TensorRTUnavailable as exc:
        raise SkipVariant(str(exc).replace("not built", "cannot run")) from None
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise EngineBuildError(f"{path}: TensorRT {trt.__version__} could not deserialize this plan (built with "
                               f"another TensorRT version or for another GPU? FIELD_NOTES 2)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    max_batch = int(engine.get_tensor_profile_shape("pixel_values", 0)[2][0])
    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    device = torch.device("cuda", torch.cuda.current_device())

    def run_chunk(x):
        inp = torch.from_numpy(x).to(device)
        context.set_input_shape("pixel_values", tuple(inp.shape))
        context.set_tensor_address("pixel_values", inp.data_ptr())
        outs = {}
        for name in names:
            if name == "pixel_values":
                continue
            shape = tuple(context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=torch_dtype[engine.get_tensor_dtype(name)], device=device)
            context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{path}: TensorRT execution failed")
        stream.synchronize()
        return (outs["logits"].float().cpu().numpy(), outs["embedding"].float().cpu().numpy())

    def run(x):
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [run_chunk(x[i:i + max_batch]) for i in range(0, len(x), max_batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    run.engine = engine
    return run


TRT_FP16 = register(Variant(
    name="trt_fp16", platform="tensorrt_plan", filename="model.plan", precision="fp16",
    build=build_trt_fp16, load_runner=engine_runner, parent="onnx", gate="fp16",
    description="TensorRT FP16 engine (LayerNorm/Softmax/reductions/head FP32), built with the TensorRT of "
                "the pinned Triton container; GPU hosts only"))
TRT_INT8 = register(Variant(
    name="trt_int8", platform="tensorrt_plan", filename="model.plan", precision="int8",
    build=build_trt_int8, load_runner=engine_runner, parent="onnx_int8", gate="int8",
    description="TensorRT INT8 engine, explicit quantization from the onnx_int8 Q/DQ graph (FP16 elsewhere, "
                "LayerNorm/Softmax/head FP32); GPU hosts only"))
TRT_FP8 = register(Variant(
    name="trt_fp8", platform="tensorrt_plan", filename="model.plan", precision="fp8",
    build=build_trt_fp8, load_runner=engine_runner, parent="onnx", gate="fp8",
    description="TensorRT FP8 engine from a ModelOpt FP8 Q/DQ graph; Ada/Hopper GPUs only"))
