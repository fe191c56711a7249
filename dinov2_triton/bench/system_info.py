"""What a measurement ran on: the machine, the versions, the FP32 matrix
multiply peak of this machine, and the model's FLOPs per image.

The peak and the FLOPs let the report say how close each variant comes to
the hardware limit (images/s x FLOPs/image vs GFLOP/s of a large matmul with
the same thread count). docs/environment.md measured ~270 GFLOP/s on 2 cores and
12.25 GFLOP per ViT-S/14 image at 224 px, so FP32 tops out near 22 img/s.
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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                interesting = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                               "amx_tile", "amx_int8", "amx_bf16", "avx_vnni")
                return [f for f in interesting if f in flags]
    except OSError:
        pass
    return []


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


def matmul_peak(threads: int | None = None, *, size: int = 2048, seconds: float = 1.5,
                dtype: str = "float32") -> dict[str, Any]:
    """Measured FP32 GFLOP/s of a size x size torch.matmul with `threads`
    intra-op threads (the best of repeated timings: the peak, not the mean).

    A square matmul of this size is the most favourable kernel there is, so
    this is the practical ceiling of dense FP32 math on this machine."""
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
        torch.matmul(a, b)  # warm-up: thread pool, allocator
        best, times, t_end = float("inf"), [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 3:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            dt_s = time.perf_counter() - t0
            times.append(dt_s)
            best = min(best, dt_s)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev)
    return {"gflops": flops / best / 1e9, "gflops_median": flops / sorted(times)[len(times) // 2] / 1e9,
            "threads": used, "size": size, "dtype": dtype, "repeats": len(times)}


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
