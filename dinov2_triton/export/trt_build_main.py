"""TensorRT engine building, usable on its own inside the NVIDIA TensorRT
container: `python -m dinov2_triton.export.trt_build_main --onnx dinov2_onnx_fp16/1/model.onnx
--plan model.plan --precision fp16 --max-batch 8`; with `--in-container` it runs itself inside the
pinned TensorRT container (dinov2_triton.export.container).

Imports only the standard library and this project's stdlib-only helpers
(dinov2_triton.core.release_pin, dinov2_triton.core.artifact_io) at module level: the container has
TensorRT's Python bindings, not this project's dependencies. The export
variants (`dinov2_triton.export.variants.tensorrt`) call the same functions.

- `build_engine(..., trt_module=...)` takes the `tensorrt` module as a
  parameter, so its logic (network flags, the graph's types, profile,
  timing cache) is unit-tested against a fake where TensorRT cannot be
  installed (tests/test_tensorrt_build.py).
- Strongly typed networks only (NetworkDefinitionCreationFlag.STRONGLY_TYPED;
  TensorRT 11 builds nothing else and ignores the flag), one code path for
  TensorRT 10 and 11: the precision is the ONNX graph's types, never a
  builder flag (BuilderFlag.FP16/INT8/FP8, layer precisions and
  OBEY_PRECISION_CONSTRAINTS are gone in TensorRT 11). trt_fp16 builds from
  the onnx_fp16 graph (ModelOpt AutoCast: LayerNorm, Softmax, patch
  embedding and head FP32 in the graph itself), trt_int8 from the Q/DQ
  onnx_int8 graph, trt_fp8 from a ModelOpt FP8 Q/DQ graph. The build checks
  the parsed types against the precision asked for, so an FP32 graph is
  never built under an fp16 name.
- One optimization profile for `pixel_values`: min batch 1, opt, and max =
  max_batch_size exactly; a larger max wastes memory, a smaller one makes
  Triton fail with "expected the shape of dimension 0 to be between 1 and 1".
- Versions: a standard plan loads only in the exact TensorRT (all four
  version parts) that built it, on the GPU architecture it was built for. The
  installed TensorRT must therefore equal the pinned container's
  (dinov2_triton/core/resources/triton_release.env). A version-compatible plan (VERSION_COMPATIBLE,
  it embeds a lean runtime) loads in the same or a later TensorRT of the same
  major version, but only where the runtime allows host code:
  `IRuntime.engine_host_code_allowed = True` here, and
  `--backend-config=tensorrt,version-compatible=true` in Triton
  (`dinov2-triton serve container` passes it when the repository holds such plans).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dinov2_triton.core.artifact_io import atomic_write_bytes, atomic_write_text, dumps_json, sha256_file
from dinov2_triton.core.release_pin import PIN_FILE, PinError, ReleasePin, load_pin
from dinov2_triton.core.resources import CACHE_ENV, cache_dir

log = logging.getLogger(__name__)

VERSIONS_FILE = PIN_FILE
INPUT_NAME = "pixel_values"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
NEEDS_GPU = "not built: needs an NVIDIA GPU and TensorRT"
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
# First TensorRT major without weakly typed networks (BuilderFlag.FP16/INT8 removed;
# NetworkDefinitionCreationFlag.STRONGLY_TYPED accepted and ignored).
STRONGLY_TYPED_ONLY_MAJOR = 11
# Oldest TensorRT this builder supports: 10 (strongly typed networks, explicit batch by default).
MIN_TENSORRT_MAJOR = 10
NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version,memory.total",
                    "--format=csv,noheader,nounits")


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing here; str() is the skip reason."""


class EngineBuildError(RuntimeError):
    """The ONNX graph could not be parsed or the engine could not be built."""


class VersionMismatch(RuntimeError):
    """Installed TensorRT cannot build a plan that the pinned Triton container loads."""


# ---------------------------------------------------------------------------
# environment: TensorRT, GPU
# ---------------------------------------------------------------------------
def import_tensorrt():
    """The `tensorrt` module, or TensorRTUnavailable with the exact reason."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        raise TensorRTUnavailable(f"{NEEDS_GPU} (tensorrt not importable: {type(exc).__name__}: {exc})") from None
    return trt


def _gpu_record(index: int, name: str, major: int, minor: int, memory_bytes: int | None) -> dict[str, Any]:
    return {"index": index, "name": name, "compute_capability": f"{major}.{minor}", "cc": (major, minor),
            "total_memory_bytes": memory_bytes}


def _gpus_from_torch(problems: list[str]) -> list[dict] | None:
    try:
        import torch
    except ImportError:
        problems.append("torch not installed")
        return None
    if not torch.cuda.is_available():
        problems.append("torch.cuda sees no GPU")
        return None
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(_gpu_record(i, p.name, p.major, p.minor, int(p.total_memory)))
    return out


def _gpus_from_cuda_python(problems: list[str]) -> list[dict] | None:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError:
            problems.append("cuda-python not installed")
            return None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        problems.append(f"CUDA runtime reports no GPU ({err})")
        return None
    out = []
    for i in range(count):
        err, props = cudart.cudaGetDeviceProperties(i)
        if int(err) != 0:
            problems.append(f"cudaGetDeviceProperties({i}) failed ({err})")
            return None
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        out.append(_gpu_record(i, name, props.major, props.minor, int(props.totalGlobalMem)))
    return out


def nvidia_smi_gpus(run: Callable = subprocess.run) -> tuple[list[dict], str | None]:
    """GPUs and the driver version from `nvidia-smi` (present wherever the
    NVIDIA driver is, including containers started with --gpus). Raises
    TensorRTUnavailable with nvidia-smi's own message when it fails."""
    if shutil.which(NVIDIA_SMI_QUERY[0]) is None:
        raise TensorRTUnavailable(f"{NEEDS_GPU} (nvidia-smi not found)")
    try:
        proc = run(list(NVIDIA_SMI_QUERY), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TensorRTUnavailable(f"{NEEDS_GPU} (nvidia-smi failed: {exc})") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise TensorRTUnavailable(f"{NEEDS_GPU} (nvidia-smi exit {proc.returncode}: {msg[0] if msg else ''})")
    gpus, driver = [], None
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            raise TensorRTUnavailable(f"{NEEDS_GPU} (unexpected nvidia-smi line {line!r})")
        index, name, cap, driver, mem = parts
        m = re.fullmatch(r"(\d+)\.(\d+)", cap)
        if not m:
            raise TensorRTUnavailable(f"{NEEDS_GPU} (nvidia-smi compute_cap {cap!r}: driver too old to report it?)")
        mem_bytes = int(float(mem) * (1 << 20)) if re.fullmatch(r"[\d.]+", mem) else None
        gpus.append(_gpu_record(int(index), name, int(m.group(1)), int(m.group(2)), mem_bytes))
    if not gpus:
        raise TensorRTUnavailable(f"{NEEDS_GPU} (nvidia-smi lists no GPU)")
    return gpus, driver


def gpu_info(device: int = 0, *, run: Callable = subprocess.run) -> dict[str, Any]:
    """{"gpu_name", "compute_capability" ("9.0"), "cc": (9, 0), "total_memory_bytes",
    "driver_version", "source", "gpus": [...], "compatible_gpu_ids": [...]}.

    Tries torch, then cuda-python, then nvidia-smi (the TensorRT container may
    have neither Python package). compatible_gpu_ids are the visible GPUs of
    the same name and compute capability as `device`: the ones a plan built
    on `device` can run on. TensorRTUnavailable when no CUDA GPU is visible."""
    problems: list[str] = []
    driver = None
    source = "torch.cuda"
    gpus = _gpus_from_torch(problems)
    if gpus is None:
        source = "cuda-python"
        gpus = _gpus_from_cuda_python(problems)
    if gpus is None:
        source = "nvidia-smi"
        try:
            gpus, driver = nvidia_smi_gpus(run)
        except TensorRTUnavailable as exc:
            problems.append(str(exc).replace(f"{NEEDS_GPU} ", "").strip("()"))
            raise TensorRTUnavailable(f"{NEEDS_GPU} (no CUDA GPU visible: {'; '.join(problems)})") from None
    elif shutil.which(NVIDIA_SMI_QUERY[0]):
        try:  # the driver version only: it decides which CUDA runtimes can load
            driver = nvidia_smi_gpus(run)[1]
        except TensorRTUnavailable as exc:
            log.warning("driver version unknown: %s", exc)
    if not 0 <= device < len(gpus):
        raise TensorRTUnavailable(f"{NEEDS_GPU} (GPU {device} requested, {len(gpus)} visible)")
    me = gpus[device]
    return {"gpu_name": me["name"], "compute_capability": me["compute_capability"], "cc": me["cc"],
            "total_memory_bytes": me["total_memory_bytes"], "driver_version": driver, "source": source,
            "device": device, "gpus": gpus,
            "compatible_gpu_ids": [g["index"] for g in gpus if g["name"] == me["name"] and g["cc"] == me["cc"]]}


# ---------------------------------------------------------------------------
# the version pin
# ---------------------------------------------------------------------------
def _numeric_parts(version: str) -> list[int] | None:
    parts = version.strip().split(".")
    if len(parts) < 4 or not all(p.isdigit() for p in parts[:4]):
        return None
    return [int(p) for p in parts[:4]]


def versions_match(installed: str, pinned: str, *, version_compatible: bool = False) -> bool:
    """Can a plan built by TensorRT `installed` load in TensorRT `pinned`?

    Standard plan: only when all four version parts are equal ('10.13.3' does
    not prove it is '10.13.3.9'). Version-compatible plan: when the major
    versions are equal and `installed` is not newer than `pinned`."""
    a, b = _numeric_parts(installed), _numeric_parts(pinned)
    if a is None or b is None:
        return False
    if version_compatible:
        return a[0] == b[0] and a <= b
    return a == b


def check_version(installed: str, pin: ReleasePin, *, version_compatible: bool = False,
                  allow_mismatch: bool = False) -> dict[str, Any]:
    """Raise VersionMismatch (the plan would not load in the pinned Triton)
    unless allowed; returns what was compared, for the build info."""
    ok = versions_match(installed, pin.tensorrt, version_compatible=version_compatible)
    out = {"installed": installed, "pinned": pin.tensorrt, "triton_container_tag": pin.container_tag,
           "version_compatible": version_compatible, "match": ok,
           "pinned_unverified": pin.is_unverified("TRITON_TENSORRT_VERSION")}
    if not ok:
        rule = ("a version-compatible plan loads only in the same TensorRT major, same or later version"
                if version_compatible else "a standard plan loads only in the exact TensorRT (all four version "
                                           "parts) that built it")
        msg = (f"installed TensorRT {installed} cannot build a plan for TensorRT {pin.tensorrt} of the pinned "
               f"Triton container {pin.container_tag} ({pin.file}): {rule}. Build inside "
               f"{pin.tensorrt_image} (dinov2-triton export --in-container), install TensorRT {pin.tensorrt}, or "
               f"allow the mismatch (--allow-version-mismatch / --set trt_allow_version_mismatch=true)")
        if not allow_mismatch:
            raise VersionMismatch(msg)
        out["note"] = "MISMATCH allowed: " + msg
        log.warning("%s", out["note"])
    return out


def default_timing_cache(trt_version: str, gpu: Mapping[str, Any]) -> Path:
    """One timing cache per TensorRT version and GPU (caches are not portable)."""
    gpu_tag = re.sub(r"[^A-Za-z0-9]+", "-", str(gpu.get("gpu_name", "gpu"))).strip("-").lower()
    return cache_dir() / "tensorrt" / f"timing-trt{trt_version}-{gpu_tag}-cc{gpu.get('compute_capability', '?')}.cache"


# ---------------------------------------------------------------------------
# the engine build (trt injected)
# ---------------------------------------------------------------------------
def trt_major(trt_module) -> int:
    try:
        return int(str(getattr(trt_module, "__version__", "0")).split(".")[0])
    except ValueError:
        return 0


# What each precision's graph must hold: a strongly typed network runs every
# tensor in the type the ONNX graph gives it, so a graph without these types
# would silently build an FP32 plan under a reduced-precision name.
REDUCED_TYPES = ("float16", "bfloat16", "int8", "fp8")
PRECISION_GRAPH_TYPE = {"fp16": "float16", "int8": "int8", "fp8": "fp8"}
PRECISION_SOURCE = {"fp16": "the onnx_fp16 graph (ModelOpt AutoCast, FP32 kept where its types say)",
                    "int8": "the Q/DQ onnx_int8 graph (ModelOpt INT8 PTQ)",
                    "fp8": "a ModelOpt FP8 Q/DQ graph",
                    "fp32": "the FP32 onnx graph"}


def dtype_name(dtype, trt) -> str:
    """'float32', 'float16', 'int8', 'fp8', ... for a trt.DataType."""
    names = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int8": "int8", "fp8": "fp8",
             "int32": "int32", "int64": "int64", "bool": "bool", "uint8": "uint8"}
    for alias, name in names.items():
        if hasattr(trt, alias) and dtype == getattr(trt, alias):
            return name
    return str(getattr(dtype, "name", dtype)).lower()


def network_types(network, trt) -> dict[str, int]:
    """How many layer outputs of each data type the parsed network has. In a
    strongly typed network these are final: the ONNX graph's types, then
    TensorRT's type inference; the builder changes none of them."""
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            name = dtype_name(layer.get_output(j).dtype, trt)
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def check_graph_precision(types: Mapping[str, int], precision: str, onnx_path) -> None:
    """EngineBuildError unless the graph's types are those of `precision`
    (fp16: some float16; int8: int8 Q/DQ; fp8: FP8 Q/DQ; fp32: none reduced)."""
    want = PRECISION_GRAPH_TYPE.get(precision)
    if want is not None and not types.get(want):
        raise EngineBuildError(
            f"{onnx_path}: no {want} tensor in the graph ({types_text(types)}), so the strongly typed build would "
            f"not be {precision}: build it from {PRECISION_SOURCE[precision]}")
    if precision == "fp32":
        reduced = [t for t in REDUCED_TYPES if types.get(t)]
        if reduced:
            raise EngineBuildError(f"{onnx_path}: the graph holds {', '.join(reduced)} tensors "
                                   f"({types_text(types)}); an fp32 plan needs {PRECISION_SOURCE['fp32']}")


def types_text(types: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in types.items()) or "no layers"


def _create_strongly_typed_network(builder, trt, major: int):
    """A strongly typed network: NetworkDefinitionCreationFlag.STRONGLY_TYPED
    (TensorRT 10; accepted and ignored by TensorRT 11, where every network is
    strongly typed). Returns (network, flag names)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if major >= STRONGLY_TYPED_ONLY_MAJOR:
            return builder.create_network(0), []
        raise EngineBuildError(f"TensorRT {getattr(trt, '__version__', '?')} has no "
                               f"NetworkDefinitionCreationFlag.STRONGLY_TYPED: this builder needs TensorRT >= "
                               f"{MIN_TENSORRT_MAJOR}")
    return builder.create_network(1 << int(flag)), ["STRONGLY_TYPED"]


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, trt_module, precision: str,
                 max_batch: int, opt_batch: int | None = None, min_batch: int = 1,
                 workspace_bytes: int | None = None, builder_optimization_level: int | None = None,
                 version_compatible: bool = False, timing_cache: str | os.PathLike | None = None,
                 logger=None) -> dict[str, Any]:
    """Parse `onnx_path` into a strongly typed network, check that its types
    are those of `precision`, build a serialized engine with one optimization
    profile for pixel_values (min_batch, opt_batch, max_batch), write it to
    `plan_path` (atomically), and return what was done. No precision builder
    flag is set: the graph's types are the precision."""
    trt = trt_module
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {PRECISIONS}")
    if max_batch < 1 or not 1 <= min_batch <= max_batch:
        raise ValueError(f"batch range {min_batch}..{max_batch}: need 1 <= min <= max")
    opt_batch = max_batch if opt_batch is None else int(opt_batch)
    if not min_batch <= opt_batch <= max_batch:
        raise ValueError(f"opt batch {opt_batch}: must be within {min_batch}..{max_batch} (max = max_batch_size)")
    major = trt_major(trt)
    if major < MIN_TENSORRT_MAJOR:
        raise EngineBuildError(f"TensorRT {getattr(trt, '__version__', '?')}: this builder builds strongly typed "
                               f"networks with TensorRT >= {MIN_TENSORRT_MAJOR} (the pin: {PIN_FILE.name})")
    t0 = time.perf_counter()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, network_flags = _create_strongly_typed_network(builder, trt, major)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors[:5]))

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if [t.name for t in inputs] != [INPUT_NAME]:
        raise EngineBuildError(f"{onnx_path}: inputs are {[t.name for t in inputs]}, expected [{INPUT_NAME!r}]")
    dims = tuple(inputs[0].shape)
    if len(dims) != 4 or any(int(d) < 1 for d in dims[1:]):
        raise EngineBuildError(f"{onnx_path}: {INPUT_NAME} has dims {dims}, expected [batch, 3, H, W] "
                               f"with only the batch dynamic")
    chw = tuple(int(d) for d in dims[1:])
    types = network_types(network, trt)
    check_graph_precision(types, precision, onnx_path)

    config = builder.create_builder_config()
    flag_names: list[str] = []
    if version_compatible:
        # The plan embeds a lean runtime (host code): it loads in later runtimes
        # of the same TensorRT major that allow host code (engine_runner,
        # Triton's --backend-config=tensorrt,version-compatible=true).
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        flag_names.append("VERSION_COMPATIBLE")
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if builder_optimization_level is not None:
        if not 0 <= int(builder_optimization_level) <= 5:
            raise ValueError(f"builder_optimization_level {builder_optimization_level}: 0..5")
        config.builder_optimization_level = int(builder_optimization_level)

    profile = builder.create_optimization_profile()
    shapes = {"min": (min_batch, *chw), "opt": (opt_batch, *chw), "max": (max_batch, *chw)}
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_info = None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
        cache_info = {"path": str(cache_path), "loaded_bytes": len(blob)}

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build the {precision} engine for {onnx_path} "
                               f"(see the TensorRT log above)")
    data = bytes(serialized)
    atomic_write_bytes(plan_path, data)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
        cache_info["saved_bytes"] = cache_path.stat().st_size
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    return {"tensorrt_version": str(getattr(trt, "__version__", "?")), "precision": precision,
            "strongly_typed": True, "network_flags": network_flags, "builder_flags": flag_names,
            "input": INPUT_NAME, "outputs": outputs, "profile": {k: list(v) for k, v in shapes.items()},
            "tensor_types": types, "workspace_bytes": workspace_bytes,
            "builder_optimization_level": builder_optimization_level,
            "version_compatible": bool(version_compatible), "timing_cache": cache_info,
            "network_layers": network.num_layers, "plan_bytes": len(data),
            "build_seconds": round(time.perf_counter() - t0, 2)}


def build_plan(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, precision: str, max_batch: int,
               opt_batch: int | None = None, workspace_gb: float | None = None,
               builder_optimization_level: int | None = None, version_compatible: bool = False,
               timing_cache: str | os.PathLike | None = "auto",
               allow_version_mismatch: bool = False, versions_file: str | os.PathLike = VERSIONS_FILE,
               import_trt: Callable[[], Any] = import_tensorrt,
               get_gpu: Callable[[], Mapping[str, Any]] = gpu_info) -> dict[str, Any]:
    """Everything around build_engine: import TensorRT, find the GPU, check
    the version pin, build, and stamp version/GPU/compute capability into the
    returned info (also under "config_parameters" for config.pbtxt, and the
    GPUs the plan can run on under "instance_gpus").
    Raises TensorRTUnavailable (skip), VersionMismatch, PinError or EngineBuildError."""
    trt = import_trt()
    gpu = dict(get_gpu())
    if precision == "fp8" and tuple(gpu.get("cc", (0, 0))) < FP8_MIN_COMPUTE_CAPABILITY:
        raise TensorRTUnavailable(
            f"not built: FP8 needs compute capability >= {'.'.join(map(str, FP8_MIN_COMPUTE_CAPABILITY))} "
            f"(Ada/Hopper); this GPU is {gpu.get('gpu_name')} (compute capability {gpu.get('compute_capability')})")
    installed = str(trt.__version__)
    pin = load_pin(versions_file)
    version_check = check_version(installed, pin, version_compatible=version_compatible,
                                  allow_mismatch=allow_version_mismatch)
    cache = default_timing_cache(installed, gpu) if timing_cache == "auto" else timing_cache
    info = build_engine(onnx_path, plan_path, trt_module=trt, precision=precision, max_batch=max_batch,
                        opt_batch=opt_batch, workspace_bytes=int(workspace_gb * (1 << 30)) if workspace_gb else None,
                        builder_optimization_level=builder_optimization_level,
                        version_compatible=version_compatible, timing_cache=cache)
    info["gpu_name"] = gpu.get("gpu_name")
    info["compute_capability"] = gpu.get("compute_capability")
    info["gpu_info_source"] = gpu.get("source")
    info["driver_version"] = gpu.get("driver_version")
    info["version_check"] = version_check
    info["onnx"] = str(onnx_path)
    info["onnx_sha256"] = sha256_file(onnx_path)
    # A plan runs only on the GPU architecture it was built for: Triton places
    # instances on these GPUs only (config.pbtxt instance_group.gpus).
    info["instance_gpus"] = list(gpu.get("compatible_gpu_ids") or [gpu.get("device", 0)])
    info["config_parameters"] = {
        "tensorrt_version": installed, "gpu_name": str(gpu.get("gpu_name")),
        "compute_capability": str(gpu.get("compute_capability")),
        "version_compatible": str(bool(version_compatible)).lower(),
        "triton_container_tag": pin.container_tag}
    return info


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m dinov2_triton.export.trt_build_main",
        description="Build a TensorRT plan from this project's ONNX model (pixel_values -> logits, embedding) "
                    "as a strongly typed network (TensorRT 10 or 11: the precision is the graph's types) with "
                    "one dynamic-batch profile (min 1, max = Triton max_batch_size). Refuses a TensorRT whose "
                    "plans the pinned Triton container cannot load (the release pin), and a graph whose types "
                    "are not those of --precision.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    req = p.add_argument_group("Required")
    req.add_argument("--onnx", required=True,
                     help="input ONNX: the onnx_fp16 model (ModelOpt AutoCast) for fp16, the Q/DQ onnx_int8 "
                          "model for int8, a ModelOpt FP8 Q/DQ model for fp8, the FP32 onnx model for fp32")
    req.add_argument("--plan", required=True, help="engine file to write (model.plan)")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--precision", choices=("fp16", "int8", "fp8", "fp32"), default="fp16")
    opt.add_argument("--max-batch", type=int, default=8, help="profile max = Triton max_batch_size")
    opt.add_argument("--opt-batch", type=int, default=None, help="profile opt batch (default: --max-batch)")
    opt.add_argument("--workspace-gb", type=float, default=None, help="workspace memory pool limit (GiB)")
    opt.add_argument("--builder-optimization-level", type=int, choices=range(6), default=None,
                     help="TensorRT builder optimization level (TensorRT default 3)")
    opt.add_argument("--version-compatible", action="store_true",
                     help="build a version-compatible plan (loads in later TensorRT of the same major that allow "
                          "host code; Triton needs --backend-config=tensorrt,version-compatible=true)")
    opt.add_argument("--timing-cache", default="auto",
                     help=f"timing cache file ('auto': per TensorRT version and GPU under ${CACHE_ENV} or "
                          f"~/.cache/dinov2-triton; '' disables)")
    opt.add_argument("--allow-version-mismatch", action="store_true",
                     help="build even when the pinned Triton container could not load the plan")
    opt.add_argument("--versions-file", default=str(VERSIONS_FILE), help="the release pin")
    opt.add_argument("--info-json", default=None, help="also write the build info here (default: <plan>.json)")
    from dinov2_triton.export.container import add_container_flags

    add_container_flags(p, lock=False)
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.in_container:
        from dinov2_triton.export.container import main_in_container

        return main_in_container(argv, mode="plans")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not Path(args.onnx).is_file():
        print(f"error: --onnx {args.onnx}: file not found", file=sys.stderr)
        return 2
    if args.max_batch < 1 or (args.opt_batch is not None and not 1 <= args.opt_batch <= args.max_batch):
        print(f"error: --opt-batch {args.opt_batch} / --max-batch {args.max_batch}: need 1 <= opt <= max",
              file=sys.stderr)
        return 2
    try:
        info = build_plan(args.onnx, args.plan, precision=args.precision, max_batch=args.max_batch,
                          opt_batch=args.opt_batch, workspace_gb=args.workspace_gb,
                          builder_optimization_level=args.builder_optimization_level,
                          version_compatible=args.version_compatible, timing_cache=args.timing_cache or None,
                          allow_version_mismatch=args.allow_version_mismatch, versions_file=args.versions_file)
    except (TensorRTUnavailable, VersionMismatch, PinError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.info_json or f"{args.plan}.json")
    atomic_write_text(out, dumps_json(info))
    print(f"{args.plan}: TensorRT {info['tensorrt_version']} {args.precision} engine for {info['gpu_name']} "
          f"(compute capability {info['compute_capability']}), profile {info['profile']}, "
          f"layer outputs {types_text(info['tensor_types'])}, {info['plan_bytes'] / 1e6:.1f} MB, "
          f"{info['build_seconds']:.0f} s; info: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
