"""What a measurement ran on: the machine, the versions, the matrix
multiply peak of this machine for each arithmetic, and the model's FLOPs
per image.

The peaks and the FLOPs let the report say how close each variant comes to
the hardware limit of the arithmetic it runs (images/s x FLOPs/image vs the
GFLOP/s of a large matrix multiply in that arithmetic, same thread count):

* FP32 and BF16: torch.matmul (oneDNN / MKL); BF16 only on a CPU with BF16
  arithmetic (avx512_bf16, amx_bf16), elsewhere torch would emulate it;
* INT8: ONNX Runtime's integer GEMM (MatMulInteger, uint8 x int8 -> int32,
  MLAS: AMX, VNNI or AVX2/AVX-512 multiply-add sequences, the kernels its
  INT8 variants run), counted as 2 operations per multiply-accumulate.

docs/environment.md measured ~270 GFLOP/s FP32 on 2 cores and 12.25 GFLOP
per ViT-S/14 image at 224 px, so FP32 tops out near 22 img/s.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The instruction-set extensions that decide CPU inference speed."""
    from dinov2_triton.core.cpu_features import read_cpu_flags

    flags = read_cpu_flags()
    interesting = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                   "amx_tile", "amx_int8", "amx_bf16", "avx_vnni")
    return [f for f in interesting if f in flags]


def gpu_info() -> list[dict[str, Any]]:
    """GPUs seen by nvidia-smi (name, memory, driver); [] when there are none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    if out.returncode == 0:
        for line in out.stdout.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 3:
                gpus.append({"name": parts[0], "memory_mib": float(parts[1]) if parts[1] else None,
                             "driver": parts[2]})
    return gpus


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPUs, OS. Cheap (no torch)."""
    import psutil

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": affinity,
        "memory_total_bytes": psutil.virtual_memory().total,
        "gpus": gpu_info(),
        "os": f"{platform.system()} {platform.release()}",
        "libc": " ".join(platform.libc_ver()).strip(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Library versions (dinov2_triton.core.artifact_io's list, which the checkpoints and the
    export manifest record too, plus the report's own matplotlib and psutil)
    and ``extra`` (e.g. the perf_analyzer version)."""
    from dinov2_triton.core.artifact_io import library_versions

    return {**library_versions(extra=("matplotlib", "psutil")), **(extra or {})}


#: the arithmetics whose peak can be measured here, and torch's dtype for the torch ones
PEAK_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PEAK_ARITHMETICS = ("fp32", "bf16", "int8")


class PeakUnavailable(Exception):
    """No peak can be measured for that arithmetic on this CPU; str(exc) says why."""


def _best_of(run, seconds: float) -> tuple[float, list[float]]:
    """(best, all) wall times of `run()` repeated for `seconds` (at least 3 times), after one warm-up."""
    run()  # warm-up: thread pool, allocator, kernel selection
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times), times


def matmul_peak(threads: int | None = None, *, size: int = 2048, seconds: float = 1.5,
                dtype: str = "float32") -> dict[str, Any]:
    """Measured GFLOP/s of a size x size torch.matmul in `dtype` (float32 or
    bfloat16) with `threads` intra-op threads (the best of repeated timings:
    the peak, not the mean).

    A square matmul of this size is the most favourable kernel there is, so
    this is the practical ceiling of dense math in that dtype on this machine."""
    import torch

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        dt = getattr(torch, dtype)
        g = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=g).to(dt)
        b = torch.randn(size, size, generator=g).to(dt)
        flops = 2.0 * size ** 3
        best, times = _best_of(lambda: torch.matmul(a, b), seconds)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
    arithmetic = {v: k for k, v in PEAK_DTYPES.items()}.get(dtype, dtype)
    return {"gflops": flops / best / 1e9, "gflops_median": flops / sorted(times)[len(times) // 2] / 1e9,
            "threads": used, "size": size, "dtype": dtype, "repeats": len(times), "arithmetic": arithmetic,
            "method": f"torch.matmul {dtype} {size}x{size}"}


def int8_gemm_peak(threads: int | None = None, *, size: int = 2048, seconds: float = 1.5) -> dict[str, Any]:
    """Measured integer GOP/s (2 per multiply-accumulate, like FLOPs) of a
    size x size ONNX Runtime MatMulInteger, uint8 activations x int8 weights
    -> int32, on `threads` intra-op threads: the integer GEMM the INT8
    variants' kernels (DynamicQuantizeMatMul, MatMulIntegerToFloat,
    QLinearMatMul) run, on the unit MLAS picks for this CPU."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "b")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm_peak",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {"a": rng.integers(0, 256, (size, size), dtype=np.uint8)}
    best, times = _best_of(lambda: session.run(None, feed), seconds)
    ops = 2.0 * size ** 3
    return {"gflops": ops / best / 1e9, "gflops_median": ops / sorted(times)[len(times) // 2] / 1e9,
            "threads": int(opts.intra_op_num_threads or os.cpu_count() or 1), "size": size,
            "dtype": "uint8 x int8 -> int32", "repeats": len(times), "arithmetic": "int8",
            "method": f"onnxruntime {ort.__version__} MatMulInteger uint8 x int8 {size}x{size} (MLAS integer GEMM)"}


def arithmetic_peak(arithmetic: str, threads: int | None = None, *, flags=None, **kwargs) -> dict[str, Any]:
    """The measured peak of one arithmetic (fp32, bf16, int8) on this CPU;
    raises PeakUnavailable where it cannot be measured (BF16 without BF16
    arithmetic: torch would emulate it; FP16/FP8: no CPU peak here)."""
    from dinov2_triton.core.cpu_features import bf16_support, read_cpu_flags

    arithmetic = arithmetic.lower()
    if arithmetic == "int8":
        return int8_gemm_peak(threads, **kwargs)
    if arithmetic == "bf16":
        ok, why = bf16_support(read_cpu_flags() if flags is None else flags)
        if not ok:
            raise PeakUnavailable(why)
    if arithmetic not in PEAK_DTYPES:
        raise PeakUnavailable(f"no {arithmetic.upper()} matrix multiply peak is measured on a CPU")
    return matmul_peak(threads, dtype=PEAK_DTYPES[arithmetic], **kwargs)


def flops_per_image(model, image_size: int, *, channels: int = 3) -> dict[str, Any]:
    """FLOPs of one forward pass per image, counted by
    torch.utils.flop_counter.FlopCounterMode on the eager model (2 FLOPs per
    multiply-accumulate; matmuls, convolutions and attention are counted,
    element-wise ops are not). Counted at batch 1.

    Attention runs through the MATH scaled-dot-product kernel while counting:
    the fused CPU kernel is invisible to the counter (ViT-S/14 would lose its
    1.2 GFLOP of attention), the math path is two counted bmm's."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, channels, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        fwd = getattr(model, "forward_with_embedding", model)
        fwd(x)
    total = counter.get_total_flops()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(total), "gflops": total / 1e9, "image_size": image_size,
            "method": "torch.utils.flop_counter.FlopCounterMode, math attention (2 x MACs, batch 1)", "by_op": by_op}
