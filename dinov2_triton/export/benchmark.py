"""In-process speed of a runner: batch-1 latency and batch-8 throughput.

Measured, not assumed (docs/field-notes.md #6): every variant is timed on this host
next to its parent (eager PyTorch for the root variants), warm-up excluded,
and a variant slower than its parent is flagged. These are single-process
numbers; the perf stage measures the served models through Triton."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import numpy as np

THROUGHPUT_BATCH = 8
# Differences under 5% are within the run-to-run noise measured on 2 cores.
NOISE_MARGIN = 0.05


def _time_calls(runner: Callable, x: np.ndarray, seconds: float, *, warmup: int, min_iters: int) -> list[float]:
    for _ in range(warmup):
        runner(x)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < deadline:
        t = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t)
    return times


def _stats(times: list[float], batch: int) -> dict[str, Any]:
    ms = np.asarray(times) * 1000.0
    total = float(np.sum(times))
    return {"batch_size": batch, "iterations": len(times), "median_ms": round(float(np.median(ms)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "mean_ms": round(float(ms.mean()), 3),
            "min_ms": round(float(ms.min()), 3),
            "img_per_s": round(batch * len(times) / total, 2) if total > 0 else None}


def benchmark_runner(runner: Callable, images: np.ndarray, *, seconds: float = 4.0,
                     throughput_batch: int = THROUGHPUT_BATCH, warmup: int = 2, min_iters: int = 3
                     ) -> dict[str, Any] | None:
    """Time `runner` at batch 1 and at `throughput_batch` (half the budget
    each) on real images (tiled when fewer). None when seconds <= 0."""
    if seconds <= 0:
        return None
    images = np.asarray(images, dtype=np.float32)
    reps = -(-throughput_batch // len(images))
    batch = np.ascontiguousarray(np.concatenate([images] * reps)[:throughput_batch])
    one = np.ascontiguousarray(images[:1])
    load_before = _load()
    t1 = _time_calls(runner, one, seconds / 2, warmup=warmup, min_iters=min_iters)
    tn = _time_calls(runner, batch, seconds / 2, warmup=warmup, min_iters=min_iters)
    load = [load_before, _load()]
    busy = busy_host(load)
    return {"batch1": _stats(t1, 1), f"batch{throughput_batch}": _stats(tn, throughput_batch),
            "throughput_batch": throughput_batch, "seconds_budget": seconds,
            "warmup_calls": warmup, "threads": thread_info(), "host_load_1min": load, "busy_host": busy}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def busy_host(load: list) -> bool:
    """Other processes competed for the CPU: the 1-minute load exceeded what
    this benchmark's own threads explain (cpu_count) by half the cores. With
    OpenMP thread pools, contention inflates latencies by 10-50x (measured
    here), so such numbers must not be trusted."""
    cpus = os.cpu_count() or 1
    return any(x is not None and x > 1.5 * cpus for x in load)


def thread_info() -> dict[str, Any]:
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def compare(current: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None, *,
            baseline_name: str, margin: float = NOISE_MARGIN) -> dict[str, Any] | None:
    """Speed of `current` relative to `baseline`: ratios > 1 mean faster.
    slower_than_parent is True when either batch-1 latency or batch-N
    throughput is worse by more than the noise margin."""
    if not current or not baseline:
        return None
    tb = current["throughput_batch"]
    key = f"batch{tb}"
    if key not in baseline:
        return None
    lat = baseline["batch1"]["median_ms"] / current["batch1"]["median_ms"]
    thr = current[key]["img_per_s"] / baseline[key]["img_per_s"]
    slower = []
    if lat < 1 - margin:
        slower.append(f"batch-1 latency {current['batch1']['median_ms']:.2f} ms vs "
                      f"{baseline['batch1']['median_ms']:.2f} ms")
    if thr < 1 - margin:
        slower.append(f"batch-{tb} throughput {current[key]['img_per_s']:.1f} vs "
                      f"{baseline[key]['img_per_s']:.1f} img/s")
    detail = (f"slower than {baseline_name}: " + "; ".join(slower)) if slower else None
    busy = bool(current.get("busy_host") or baseline.get("busy_host"))
    if detail and busy:
        loads = [x for x in (current.get("host_load_1min") or []) + (baseline.get("host_load_1min") or [])
                 if x is not None]
        detail += (f" (UNRELIABLE: the host was busy, 1-min load up to {max(loads):.1f} on "
                   f"{os.cpu_count()} cores; rerun on an idle machine)")
    return {"baseline": baseline_name, "batch1_speedup": round(lat, 3), f"batch{tb}_speedup": round(thr, 3),
            "slower_than_parent": bool(slower), "busy_host": busy, "detail": detail}
