"""TensorRT engine building, usable on its own inside the NVIDIA TensorRT
container: `python -m export.trt_build_main --onnx model.onnx --plan model.plan
--precision fp16 --max-batch 8` (scripts/build_engines.sh runs it there).

Imports only the standard library at module level (the container has
TensorRT's Python bindings, not this project's dependencies). The export
variants (`export.tensorrt_engine`) call the same functions.

- `build_engine(..., trt_module=...)` takes the `tensorrt` module as a
  parameter, so its logic (profile, precision flags, FP32-pinned layers,
  timing cache) is unit-tested against a recording fake where TensorRT
  cannot be installed (tests/test_tensorrt_build.py).
- One optimization profile for `pixel_values`: min batch 1, opt, and max =
  max_batch_size exactly; a larger max wastes memory, a smaller one makes
  Triton fail with "expected the shape of dimension 0 to be between 1 and 1"
  (FIELD_NOTES 7).
- LayerNorm (normalization layers), Softmax, reductions and the final head
  are pinned to FP32 with OBEY_PRECISION_CONSTRAINTS (FIELD_NOTES 3, 5).
- The installed TensorRT must equal the TensorRT of the pinned Triton
  container (scripts/triton_version.sh): a plan only loads in the version
  that built it, on the GPU architecture it was built for (FIELD_NOTES 2).
  The version, GPU name and compute capability are stamped into the info.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
VERSIONS_FILE = ROOT / "scripts" / "triton_version.sh"
INPUT_NAME = "pixel_values"
HEAD_OUTPUT = "logits"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
# Layer kinds pinned to FP32 by default. Names are trt.LayerType members
# (lower case) plus "head" (the layers from the last matrix multiply to `logits`).
DEFAULT_FP32_LAYERS = ("normalization", "softmax", "reduce", "head")
NEEDS_GPU = "not built: needs an NVIDIA GPU and TensorRT"
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing here; str() is the skip reason."""


class EngineBuildError(RuntimeError):
    """The ONNX graph could not be parsed or the engine could not be built."""


class VersionMismatch(RuntimeError):
    """Installed TensorRT differs from the pinned Triton container's."""


# ---------------------------------------------------------------------------
# environment: TensorRT, GPU, version pin
# ---------------------------------------------------------------------------
def import_tensorrt():
    """The `tensorrt` module, or TensorRTUnavailable with the exact reason."""
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (missing libnvinfer)
        raise TensorRTUnavailable(f"{NEEDS_GPU} (tensorrt not importable: {type(exc).__name__}: {exc})") from None
    return trt


def gpu_info(device: int = 0) -> dict[str, Any]:
    """{"gpu_name", "compute_capability" ("9.0"), "cc": (9, 0), "source"}; tries
    torch, then cuda-python. TensorRTUnavailable when no CUDA GPU is visible."""
    problems = []
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > device:
            p = torch.cuda.get_device_properties(device)
            return {"gpu_name": p.name, "compute_capability": f"{p.major}.{p.minor}", "cc": (p.major, p.minor),
                    "total_memory_bytes": int(p.total_memory), "source": "torch.cuda"}
        problems.append("torch.cuda sees no GPU")
    except ImportError:
        problems.append("torch not installed")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError:
            cudart = None
            problems.append("cuda-python not installed")
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) == 0 and count > device:
            err, props = cudart.cudaGetDeviceProperties(device)
            if int(err) == 0:
                name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
                return {"gpu_name": name, "compute_capability": f"{props.major}.{props.minor}",
                        "cc": (props.major, props.minor), "total_memory_bytes": int(props.totalGlobalMem),
                        "source": "cuda-python"}
        problems.append(f"CUDA runtime reports no GPU ({err})")
    raise TensorRTUnavailable(f"{NEEDS_GPU} (no CUDA GPU visible: {'; '.join(problems)})")


def read_versions_file(path: str | os.PathLike = VERSIONS_FILE) -> dict[str, str]:
    """KEY=VALUE lines of scripts/triton_version.sh (comments, `export` and
    ${VAR} references handled); {} when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("#") else ""
        line = line.removeprefix("export ").strip()
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if not m:
            continue
        value = m.group(2).strip().strip('"').strip("'")
        value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: values.get(g.group(1) or g.group(2), ""), value)
        values[m.group(1)] = value
    return values


def pinned_versions(path: str | os.PathLike = VERSIONS_FILE) -> dict[str, str | None]:
    v = read_versions_file(path)
    return {"tensorrt": v.get("TRITON_TENSORRT_VERSION"), "container_tag": v.get("TRITON_CONTAINER_TAG"),
            "triton_server": v.get("TRITON_SERVER_VERSION"), "cuda": v.get("TRITON_CUDA_VERSION"),
            "file": str(path), "found": bool(v)}


def versions_match(installed: str, pinned: str) -> bool:
    """Compare the components both give (at least major.minor.patch):
    '10.5.0' matches '10.5.0.18'; '10.5.0.18' does not match '10.5.0.26'."""
    a = [p for p in re.split(r"[.+]", installed.strip()) if p]
    b = [p for p in re.split(r"[.+]", pinned.strip()) if p]
    n = max(3, min(len(a), len(b)))
    return a[:n] == b[:n]


def check_version(installed: str, pins: Mapping[str, Any], *, allow_mismatch: bool = False) -> dict[str, Any]:
    """Raise VersionMismatch (a plan would not load in the pinned Triton) unless
    allowed; returns what was compared, for the build info."""
    pinned = pins.get("tensorrt")
    tag = pins.get("container_tag")
    out = {"installed": installed, "pinned": pinned, "triton_container_tag": tag, "match": None}
    if not pinned:
        out["note"] = (f"no TRITON_TENSORRT_VERSION in {pins.get('file')}: cannot check the plan against the "
                       f"Triton container; it loads only in TensorRT {installed}")
        log.warning("%s", out["note"])
        return out
    out["match"] = versions_match(installed, pinned)
    if not out["match"]:
        msg = (f"installed TensorRT {installed} differs from TensorRT {pinned} in the pinned Triton container "
               f"{tag or '?'} ({pins.get('file')}); a plan only loads in the TensorRT version that built it "
               f"(FIELD_NOTES 2). Build inside nvcr.io/nvidia/tensorrt:{tag or '<YY.MM>'}-py3 "
               f"(scripts/build_engines.sh), install tensorrt=={pinned}, or allow the mismatch "
               f"(--allow-version-mismatch / --set trt_allow_version_mismatch=true)")
        if not allow_mismatch:
            raise VersionMismatch(msg)
        out["note"] = "MISMATCH allowed: " + msg
        log.warning("%s", out["note"])
    return out


def default_timing_cache(trt_version: str, gpu: Mapping[str, Any]) -> Path:
    """One timing cache per TensorRT version and GPU (caches are not portable)."""
    gpu_tag = re.sub(r"[^A-Za-z0-9]+", "-", str(gpu.get("gpu_name", "gpu"))).strip("-").lower()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinov2-triton" / "tensorrt"
    return base / f"timing-trt{trt_version}-{gpu_tag}-cc{gpu.get('compute_capability', '?')}.cache"


# ---------------------------------------------------------------------------
# the engine build (trt injected)
# ---------------------------------------------------------------------------
def parse_fp32_layers(value: str | Iterable[str], trt_module=None) -> tuple[str, ...]:
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if trt_module is not None:
        known = {n.lower() for n in dir(trt_module.LayerType) if not n.startswith("_")} | {"head"}
        bad = [i for i in items if i not in known]
        if bad:
            raise ValueError(f"trt_fp32_layers: unknown layer kind(s) {bad}; use trt.LayerType names "
                             f"(normalization, softmax, reduce, ...) or 'head'")
    return tuple(dict.fromkeys(items))


def _head_layers(network, trt) -> list:
    """Layers from the last matrix multiply up to the `logits` output (the
    head: MatMul + bias add, possibly reshapes)."""
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    out = next((network.get_output(i) for i in range(network.num_outputs)
                if network.get_output(i).name == HEAD_OUTPUT), None)
    if out is None:
        return []
    chain, name = [], out.name
    for _ in range(8):
        layer = producer.get(name)
        if layer is None:
            break
        chain.append(layer)
        if layer.type in (trt.LayerType.MATRIX_MULTIPLY, getattr(trt.LayerType, "FULLY_CONNECTED", None)):
            return chain
        inputs = [layer.get_input(k) for k in range(layer.num_inputs)]
        nxt = [t for t in inputs if t is not None and t.name in producer
               and producer[t.name].type != trt.LayerType.CONSTANT]
        if not nxt:
            break
        name = nxt[0].name
    return chain if any(l.type == trt.LayerType.MATRIX_MULTIPLY for l in chain) else []


def pin_fp32_layers(network, trt, kinds: Sequence[str]) -> list[str]:
    """Set precision and output types to FP32 on the chosen layers; returns
    the pinned layer names. Only floating outputs are constrained."""
    types = {getattr(trt.LayerType, k.upper()) for k in kinds if k != "head" and hasattr(trt.LayerType, k.upper())}
    chosen = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in types:
            chosen[layer.name] = layer
    if "head" in kinds:
        for layer in _head_layers(network, trt):
            chosen[layer.name] = layer
    floats = {trt.float32, trt.float16}
    pinned = []
    for name, layer in chosen.items():
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)
        pinned.append(name)
    return pinned


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, trt_module, precision: str,
                 max_batch: int, opt_batch: int | None = None, min_batch: int = 1,
                 fp32_layers: Sequence[str] = DEFAULT_FP32_LAYERS, workspace_bytes: int | None = None,
                 builder_optimization_level: int | None = None, version_compatible: bool = False,
                 timing_cache: str | os.PathLike | None = None, logger=None) -> dict[str, Any]:
    """Parse `onnx_path`, build a serialized engine with one optimization
    profile for pixel_values (min_batch, opt_batch, max_batch), write it to
    `plan_path` (atomically), and return what was done."""
    trt = trt_module
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {PRECISIONS}")
    if max_batch < 1 or not 1 <= min_batch <= max_batch:
        raise ValueError(f"batch range {min_batch}..{max_batch}: need 1 <= min <= max")
    opt_batch = max_batch if opt_batch is None else int(opt_batch)
    if not min_batch <= opt_batch <= max_batch:
        raise ValueError(f"opt batch {opt_batch}: must be within {min_batch}..{max_batch} (max = max_batch_size)")
    t0 = time.perf_counter()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    if int(str(getattr(trt, "__version__", "10")).split(".")[0]) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
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

    config = builder.create_builder_config()
    flag_names: list[str] = []

    def flag(name: str) -> None:
        config.set_flag(getattr(trt.BuilderFlag, name))
        flag_names.append(name)

    if precision in ("fp16", "int8", "fp8"):
        flag("FP16")          # layers outside the Q/DQ regions run in FP16 rather than FP32
    if precision == "int8":
        flag("INT8")          # explicit quantization: scales come from the Q/DQ nodes
    if precision == "fp8":
        flag("FP8")
    pinned: list[str] = []
    if precision != "fp32" and fp32_layers:
        pinned = pin_fp32_layers(network, trt, fp32_layers)
        if pinned:
            flag("OBEY_PRECISION_CONSTRAINTS")
    if version_compatible:
        flag("VERSION_COMPATIBLE")
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
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, plan_path)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        cache_info["saved_bytes"] = cache_path.stat().st_size
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    return {"tensorrt_version": str(getattr(trt, "__version__", "?")), "precision": precision,
            "builder_flags": flag_names, "input": INPUT_NAME, "outputs": outputs,
            "profile": {k: list(v) for k, v in shapes.items()},
            "fp32_layer_kinds": list(fp32_layers) if precision != "fp32" else [],
            "fp32_pinned_layers": len(pinned), "fp32_pinned_layer_names": pinned[:200],
            "workspace_bytes": workspace_bytes, "builder_optimization_level": builder_optimization_level,
            "version_compatible": bool(version_compatible), "timing_cache": cache_info,
            "network_layers": network.num_layers, "plan_bytes": len(data),
            "build_seconds": round(time.perf_counter() - t0, 2)}


def build_plan(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, precision: str, max_batch: int,
               opt_batch: int | None = None, fp32_layers: Sequence[str] | str = DEFAULT_FP32_LAYERS,
               workspace_gb: float | None = None, builder_optimization_level: int | None = None,
               version_compatible: bool = False, timing_cache: str | os.PathLike | None = "auto",
               allow_version_mismatch: bool = False, versions_file: str | os.PathLike = VERSIONS_FILE,
               import_trt: Callable[[], Any] = import_tensorrt,
               get_gpu: Callable[[], Mapping[str, Any]] = gpu_info) -> dict[str, Any]:
    """Everything around build_engine: import TensorRT, find the GPU, check
    the version pin, build, and stamp version/GPU/compute capability into the
    returned info (also under "config_parameters" for config.pbtxt).
    Raises TensorRTUnavailable (skip), VersionMismatch or EngineBuildError."""
    trt = import_trt()
    gpu = dict(get_gpu())
    if precision == "fp8" and tuple(gpu.get("cc", (0, 0))) < FP8_MIN_COMPUTE_CAPABILITY:
        raise TensorRTUnavailable(
            f"not built: FP8 needs compute capability >= {'.'.join(map(str, FP8_MIN_COMPUTE_CAPABILITY))} "
            f"(Ada/Hopper); this GPU is {gpu.get('gpu_name')} (compute capability {gpu.get('compute_capability')})")
    installed = str(trt.__version__)
    pins = pinned_versions(versions_file)
    version_check = check_version(installed, pins, allow_mismatch=allow_version_mismatch)
    kinds = parse_fp32_layers(fp32_layers, trt)
    cache = default_timing_cache(installed, gpu) if timing_cache == "auto" else timing_cache
    info = build_engine(onnx_path, plan_path, trt_module=trt, precision=precision, max_batch=max_batch,
                        opt_batch=opt_batch, fp32_layers=kinds,
                        workspace_bytes=int(workspace_gb * (1 << 30)) if workspace_gb else None,
                        builder_optimization_level=builder_optimization_level,
                        version_compatible=version_compatible, timing_cache=cache)
    info["gpu_name"] = gpu.get("gpu_name")
    info["compute_capability"] = gpu.get("compute_capability")
    info["gpu_info_source"] = gpu.get("source")
    info["version_check"] = version_check
    info["onnx"] = str(onnx_path)
    info["onnx_sha256"] = _sha256(onnx_path)
    info["config_parameters"] = {
        "tensorrt_version": installed, "gpu_name": str(gpu.get("gpu_name")),
        "compute_capability": str(gpu.get("compute_capability")),
        "version_compatible": str(bool(version_compatible)).lower(),
        **({"triton_container_tag": pins["container_tag"]} if pins.get("container_tag") else {})}
    return info


def _sha256(path) -> str:
    from train.checksums import sha256_file  # stdlib only: fine inside the TensorRT container

    return sha256_file(path)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.trt_build_main",
        description="Build a TensorRT plan from this project's ONNX model (pixel_values -> logits, embedding) "
                    "with one dynamic-batch profile (min 1, max = Triton max_batch_size) and FP32-pinned "
                    "LayerNorm/Softmax/reductions/head. Refuses a TensorRT that differs from the pinned Triton "
                    "container's (scripts/triton_version.sh).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    req = p.add_argument_group("Required")
    req.add_argument("--onnx", required=True, help="input ONNX (FP32 for fp16; the Q/DQ onnx_int8 model for int8)")
    req.add_argument("--plan", required=True, help="engine file to write (model.plan)")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--precision", choices=("fp16", "int8", "fp8", "fp32"), default="fp16")
    opt.add_argument("--max-batch", type=int, default=8, help="profile max = Triton max_batch_size (FIELD_NOTES 7)")
    opt.add_argument("--opt-batch", type=int, default=None, help="profile opt batch (default: --max-batch)")
    opt.add_argument("--fp32-layers", default=",".join(DEFAULT_FP32_LAYERS),
                     help="layer kinds pinned to FP32: trt.LayerType names and/or 'head'; '' pins nothing")
    opt.add_argument("--workspace-gb", type=float, default=None, help="workspace memory pool limit (GiB)")
    opt.add_argument("--builder-optimization-level", type=int, choices=range(6), default=None,
                     help="TensorRT builder optimization level (TensorRT default 3)")
    opt.add_argument("--version-compatible", action="store_true",
                     help="build a version-compatible plan (loads in later TensorRT 10.x; slower)")
    opt.add_argument("--timing-cache", default="auto",
                     help="timing cache file ('auto': per TensorRT version and GPU under ~/.cache; '' disables)")
    opt.add_argument("--allow-version-mismatch", action="store_true",
                     help="build even when TensorRT differs from scripts/triton_version.sh")
    opt.add_argument("--versions-file", default=str(VERSIONS_FILE), help="the Triton version pin")
    opt.add_argument("--info-json", default=None, help="also write the build info here (default: <plan>.json)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
                          opt_batch=args.opt_batch, fp32_layers=args.fp32_layers, workspace_gb=args.workspace_gb,
                          builder_optimization_level=args.builder_optimization_level,
                          version_compatible=args.version_compatible, timing_cache=args.timing_cache or None,
                          allow_version_mismatch=args.allow_version_mismatch, versions_file=args.versions_file)
    except (TensorRTUnavailable, VersionMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.info_json or f"{args.plan}.json")
    out.write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(f"{args.plan}: TensorRT {info['tensorrt_version']} {args.precision} engine for {info['gpu_name']} "
          f"(compute capability {info['compute_capability']}), profile {info['profile']}, "
          f"{info['fp32_pinned_layers']} layers pinned FP32, {info['plan_bytes'] / 1e6:.1f} MB, "
          f"{info['build_seconds']:.0f} s; info: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
