"""TensorRT variants: `trt_fp16` (from the onnx_fp16 graph), `trt_int8`
(explicit quantization from the onnx_int8 Q/DQ graph) and `trt_fp8`
(ModelOpt FP8 Q/DQ + TensorRT, Ada/Hopper only).

The engine build itself is export/trt_build_main.py (standard library only,
so it also runs alone inside the NVIDIA TensorRT container): a strongly
typed network (TensorRT 10 and 11 alike; TensorRT 11 builds nothing else),
so the precision is the parent graph's types: the onnx_fp16 graph keeps
LayerNorm, Softmax, the patch embedding and the head FP32 (ModelOpt
AutoCast), the Q/DQ graphs say what runs in INT8 / FP8, and everything else
runs in the type the graph gives it (FP32 outside the Q/DQ regions of the
onnx_int8 and FP8 graphs). One profile with max = max_batch_size, the
installed TensorRT checked against the pinned Triton container's, and the
version, GPU name and compute capability stamped into the build info and
config.pbtxt parameters.

Without TensorRT or a CUDA GPU (this CPU machine) build() raises SkipVariant
"not built: needs an NVIDIA GPU and TensorRT (...)": no file is written,
never a placeholder. The runner deserializes the plan with trt.Runtime and
runs it on CUDA buffers on a stream of its own, so the pipeline verifies
every engine against eager FP32 on the GPU before publishing it.

Options (ExportContext.options, `--set KEY=VALUE`): trt_opt_batch (default:
max_batch_size), trt_workspace_gb, trt_builder_optimization_level,
trt_version_compatible, trt_timing_cache ("auto" | path | ""),
trt_allow_version_mismatch, trt_versions_file. Which layers stay FP32 is an
option of onnx_fp16 (fp16_keep_fp32), not of the engine build.
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import dinov2_triton.export.variants.onnx_fp16  # noqa: F401 - registers the parents `onnx` and `onnx_fp16` first
import dinov2_triton.export.variants.onnx_int8  # noqa: F401 - registers the parent `onnx_int8` first
from dinov2_triton.export.registry import SkipVariant, Variant, register
from dinov2_triton.export.trt_build_main import (
    FP8_MIN_COMPUTE_CAPABILITY,
    INPUT_NAME,
    VERSIONS_FILE,
    EngineBuildError,
    TensorRTUnavailable,
    VersionMismatch,
    build_engine,
    build_plan,
    check_version,
    gpu_info,
    import_tensorrt,
    versions_match,
)

log = logging.getLogger(__name__)

__all__ = ["build_engine", "build_plan", "check_version", "gpu_info", "import_tensorrt", "versions_match",
           "engine_runner", "plan_is_version_compatible", "TRT_DEFAULTS"]

OUTPUT_NAMES = ("logits", "embedding")
TRT_DEFAULTS: dict[str, Any] = {
    "trt_opt_batch": None,                       # None: max_batch_size
    "trt_workspace_gb": None,                    # None: TensorRT's default (the device memory)
    "trt_builder_optimization_level": None,      # None: TensorRT's default (3)
    "trt_version_compatible": False,
    "trt_timing_cache": "auto",
    "trt_allow_version_mismatch": False,
    "trt_versions_file": str(VERSIONS_FILE),
}
# Plans built in this process -> were they built version-compatible? The
# runner that verifies them right after the build needs to know (a
# version-compatible plan deserializes only with host code allowed).
_BUILT_VERSION_COMPATIBLE: dict[str, bool] = {}
_VC_PARAM = re.compile(r'key:\s*"version_compatible"\s*value\s*\{\s*string_value:\s*"(true|false)"')


def _opt(options: Mapping[str, Any], key: str):
    value = options.get(key)
    return TRT_DEFAULTS[key] if value is None else value


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _parent_onnx(ctx, source: str) -> Path:
    path = ctx.artifacts.get(source)
    if path is None or not Path(path).is_file():
        raise EngineBuildError(f"the `{source}` artifact is missing: build the {source} variant first "
                               f"(dinov2-triton export --variants {source},...)")
    return Path(path)


# Options of the weakly typed builds before TensorRT 11, refused with what replaces them.
REMOVED_OPTIONS = {"trt_fp32_layers": "TensorRT plans are strongly typed: the layers kept FP32 are those the "
                                      "onnx_fp16 graph keeps FP32; set fp16_keep_fp32 (the onnx_fp16 option) instead"}


def _build(ctx, path: Path, *, precision: str, source: str, onnx_path: Path | None = None) -> dict:
    """Shared build of the TensorRT variants from the artifact of variant
    `source` (or from `onnx_path` when given)."""
    o = ctx.options
    removed = [k for k in REMOVED_OPTIONS if o.get(k) is not None]
    if removed:
        raise EngineBuildError("; ".join(f"--set {k}: no longer an option ({REMOVED_OPTIONS[k]})" for k in removed))
    max_batch = ctx.max_batch_size
    opt_batch = _opt(o, "trt_opt_batch")
    try:
        # Check TensorRT and the GPU before touching the parent artifact.
        import_tensorrt()
        gpu_info()
    except TensorRTUnavailable as exc:
        raise SkipVariant(str(exc)) from None
    onnx_path = onnx_path or _parent_onnx(ctx, source)
    workspace = _opt(o, "trt_workspace_gb")
    level = _opt(o, "trt_builder_optimization_level")
    cache = _opt(o, "trt_timing_cache")
    version_compatible = _bool(_opt(o, "trt_version_compatible"))
    # Build into the work dir and move: a failed build leaves nothing in the staging folder.
    tmp_plan = Path(ctx.work_dir) / f"{precision}_engine" / "model.plan"
    try:
        info = build_plan(onnx_path, tmp_plan, precision=precision, max_batch=max_batch,
                          opt_batch=None if opt_batch is None else int(opt_batch),
                          workspace_gb=None if workspace is None else float(workspace),
                          builder_optimization_level=None if level is None else int(level),
                          version_compatible=version_compatible,
                          timing_cache=(cache or None),
                          allow_version_mismatch=_bool(_opt(o, "trt_allow_version_mismatch")),
                          versions_file=_opt(o, "trt_versions_file"))
    except (TensorRTUnavailable, VersionMismatch) as exc:
        raise SkipVariant(str(exc) if str(exc).startswith("not built") else f"not built: {exc}") from None
    shutil.move(str(tmp_plan), str(path))
    _BUILT_VERSION_COMPATIBLE[str(Path(path).resolve())] = version_compatible
    info["source_variant"] = source
    info["max_batch_size"] = max_batch
    return info


def build_trt_fp16(ctx, path: Path) -> dict:
    return _build(ctx, path, precision="fp16", source="onnx_fp16")


def build_trt_int8(ctx, path: Path) -> dict:
    return _build(ctx, path, precision="int8", source="onnx_int8")


def build_trt_fp8(ctx, path: Path) -> dict:
    """ModelOpt FP8 Q/DQ (train-split calibration, same node selection as
    INT8) then a TensorRT FP8 engine. Skipped below compute capability 8.9."""
    import numpy as np

    from dinov2_triton.export.modelopt_worker import run_modelopt_quantize
    from dinov2_triton.export.quant_graph import DEFAULT_ROLES, node_roles, select_nodes
    from dinov2_triton.export.variants.onnx import fp32_work_copy
    from dinov2_triton.export.variants.onnx_int8 import option

    # The same check _build makes, first: no calibration work on a host that cannot build.
    try:
        import_tensorrt()
        gpu = gpu_info()
    except TensorRTUnavailable as exc:
        raise SkipVariant(str(exc)) from None
    if tuple(gpu["cc"]) < FP8_MIN_COMPUTE_CAPABILITY:
        raise SkipVariant(f"not built: FP8 needs compute capability >= 8.9 (Ada/Hopper); this GPU is "
                          f"{gpu['gpu_name']} (compute capability {gpu['compute_capability']})")
    work, fp32 = fp32_work_copy(ctx, TRT_FP8, EngineBuildError)
    import onnx

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
def plan_is_version_compatible(path: Path) -> bool:
    """Whether the plan at `path` was built version-compatible: known for
    plans built in this process; for a published plan
    (<model>/<version>/model.plan) read from the model's config.pbtxt
    parameter `version_compatible` (stamped at export). Otherwise False: a
    standard plan, deserialized without host code."""
    path = Path(path)
    known = _BUILT_VERSION_COMPATIBLE.get(str(path.resolve()))
    if known is not None:
        return known
    config = path.parent.parent / "config.pbtxt"
    if config.is_file():
        m = _VC_PARAM.search(config.read_text(errors="replace"))
        if m:
            return m.group(1) == "true"
    return False


class TorchCudaDevice:
    """CUDA buffers and a stream of the runner's own, through torch.

    Why not torch's current stream: that is the legacy default stream
    (handle 0) unless someone changed it, and enqueueV3 on the legacy
    default stream makes TensorRT add device-wide synchronisation around
    every execution."""

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise SkipVariant("cannot run: needs an NVIDIA GPU and TensorRT (torch.cuda sees no GPU)")
        self.torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def upload(self, array):
        with self.torch.cuda.stream(self.stream):
            return self.torch.from_numpy(array).to(self.device, non_blocking=True)

    def empty(self, shape, dtype: str):
        with self.torch.cuda.stream(self.stream):
            return self.torch.empty(tuple(shape), dtype=getattr(self.torch, dtype), device=self.device)

    def pointer(self, buffer) -> int:
        return int(buffer.data_ptr())

    def synchronize(self) -> None:
        self.stream.synchronize()

    def download(self, buffer):
        return buffer.float().cpu().numpy()


class EngineRunner:
    """float32 pixel_values [N,3,H,W] -> (logits, embedding) through a
    deserialized engine; inputs larger than the profile max run in chunks."""

    def __init__(self, engine, trt, device, path: Path):
        self.engine, self.trt, self.device, self.path = engine, trt, device, Path(path)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted((INPUT_NAME, *OUTPUT_NAMES)):
            raise EngineBuildError(f"{path}: engine tensors {names}, expected {[INPUT_NAME, *OUTPUT_NAMES]}")
        if engine.get_tensor_dtype(INPUT_NAME) != trt.float32:
            raise EngineBuildError(f"{path}: {INPUT_NAME} is {engine.get_tensor_dtype(INPUT_NAME)}, expected float32")
        lo, _opt_shape, hi = engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.dtypes = {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32"}

    def _run_chunk(self, x):
        ctx, dev = self.context, self.device
        shape = tuple(int(d) for d in x.shape)
        inp = dev.upload(x)
        # set_input_shape returns False for a shape outside the profile; going
        # on would run the engine on stale shapes.
        if not ctx.set_input_shape(INPUT_NAME, shape):
            raise RuntimeError(f"{self.path}: TensorRT rejected input shape {shape} for {INPUT_NAME} "
                               f"(profile batch {self.min_batch}..{self.max_batch})")
        unresolved = list(ctx.infer_shapes() or [])
        if unresolved:
            raise RuntimeError(f"{self.path}: TensorRT cannot infer the shapes of {unresolved} for input {shape}")
        ctx.set_tensor_address(INPUT_NAME, dev.pointer(inp))
        outs = {}
        for name in OUTPUT_NAMES:
            out_shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            dtype = self.engine.get_tensor_dtype(name)
            if any(d < 0 for d in out_shape) or dtype not in self.dtypes:
                raise RuntimeError(f"{self.path}: output {name} has shape {out_shape} / dtype {dtype}")
            outs[name] = dev.empty(out_shape, self.dtypes[dtype])
            ctx.set_tensor_address(name, dev.pointer(outs[name]))
        if not ctx.execute_async_v3(dev.stream_handle):
            raise RuntimeError(f"{self.path}: TensorRT execution failed for input {shape}")
        dev.synchronize()
        return dev.download(outs["logits"]), dev.download(outs["embedding"])

    def __call__(self, x):
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [self._run_chunk(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def engine_runner(path: Path, *, allow_host_code: bool | None = None, trt_module=None, device=None) -> EngineRunner:
    """Deserialize a plan with trt.Runtime and return a runner on CUDA
    buffers (`device`: TorchCudaDevice unless given). Host code is allowed
    only for version-compatible plans (`allow_host_code`, default:
    plan_is_version_compatible). SkipVariant where TensorRT or a CUDA GPU is missing."""
    path = Path(path)
    try:
        trt = trt_module or import_tensorrt()
        if device is None:
            gpu_info()
    except TensorRTUnavailable as exc:
        raise SkipVariant(str(exc).replace("not built", "cannot run")) from None
    device = device if device is not None else TorchCudaDevice()
    host_code = plan_is_version_compatible(path) if allow_host_code is None else bool(allow_host_code)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if host_code:
        # A version-compatible plan carries a lean runtime (host code); trust it
        # only because this project built it.
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        hint = ("" if host_code else "; if it was built version-compatible, its config.pbtxt parameter "
                                     "version_compatible must say \"true\"")
        raise EngineBuildError(f"{path}: TensorRT {trt.__version__} could not deserialize this plan (built with "
                               f"another TensorRT version or for another GPU architecture?{hint})")
    return EngineRunner(engine, trt, device, path)


TRT_FP16 = register(Variant(
    name="trt_fp16", platform="tensorrt_plan", filename="model.plan", precision="fp16",
    build=build_trt_fp16, load_runner=engine_runner, parent="onnx_fp16", gate="fp16",
    description="TensorRT FP16 engine, strongly typed from the onnx_fp16 graph (LayerNorm/Softmax/patch "
                "embedding/head FP32 as that graph has them), built with the TensorRT of the pinned Triton "
                "container; GPU hosts only"))
TRT_INT8 = register(Variant(
    name="trt_int8", platform="tensorrt_plan", filename="model.plan", precision="int8",
    build=build_trt_int8, load_runner=engine_runner, parent="onnx_int8", gate="int8",
    description="TensorRT INT8 engine, strongly typed from the onnx_int8 Q/DQ graph (INT8 where it has Q/DQ, "
                "FP32 elsewhere, as that graph has it); GPU hosts only"))
TRT_FP8 = register(Variant(
    name="trt_fp8", platform="tensorrt_plan", filename="model.plan", precision="fp8",
    build=build_trt_fp8, load_runner=engine_runner, parent="onnx", gate="fp8",
    description="TensorRT FP8 engine, strongly typed from a ModelOpt FP8 Q/DQ graph of onnx (FP32 outside "
                "the Q/DQ); Ada/Hopper GPUs only"))
