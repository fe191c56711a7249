"""``dinov2-triton cpu-threads``: how to spend this host's cores on one model,
measured, not assumed: one instance with every core as intra-op threads
(or, for OpenVINO, as streams) versus several instances with fewer threads
each, at one batch size, in this process.

An "instance" is what a Triton model instance is: its own ONNX Runtime
session / OpenVINO compiled model with its own thread pool; "clients" send
batches back to back, client i to instance i mod n (Triton's instances take
work from one queue the same way). Settings for C usable cores:

  ONNX Runtime: 1 x C threads, 1 client | 1 x C threads, 2 clients (one
                session, concurrent runs) | C x 1 thread, C clients
  OpenVINO:     1 x LATENCY (1 stream, C threads), 1 client | 1 x THROUGHPUT
                (C streams, 1 thread each), C clients | C x LATENCY (1 stream,
                1 thread), C clients

The served equivalents are --instances N and the backend parameters
(ONNX Runtime intra_op_thread_count, OpenVINO INFERENCE_NUM_THREADS /
NUM_STREAMS / PERFORMANCE_HINT). Writes a markdown table to stdout and,
with --out, the numbers as JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure(runners: Sequence[Callable], clients: int, batch, *, seconds: float, warmup: int = 3) -> dict[str, Any]:
    """``clients`` threads, client i calling runners[i % len(runners)] back to
    back for ``seconds``; images/s over the wall time."""
    for r in runners:
        for _ in range(warmup):
            r(batch)
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client(i: int) -> None:
        run = runners[i % len(runners)]
        start.wait()
        try:
            while time.perf_counter() < stop_at[0]:
                run(batch)
                counts[i] += 1
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at.append(t0 + seconds)
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    n = sum(counts)
    return {"requests": n, "wall_s": round(wall, 3), "images_per_s": round(n * len(batch) / wall, 2)}


def ort_settings(path: Path, cores: int) -> list[tuple[str, Callable[[], list], int]]:
    from dinov2_triton.export.variants.onnx import ort_runner

    return [
        (f"1 instance x {cores} intra-op threads, 1 client", lambda: [ort_runner(path, intra_op_threads=cores)], 1),
        (f"1 instance x {cores} intra-op threads, {cores} clients",
         lambda: [ort_runner(path, intra_op_threads=cores)], cores),
        (f"{cores} instances x 1 intra-op thread, {cores} clients",
         lambda: [ort_runner(path, intra_op_threads=1) for _ in range(cores)], cores),
    ]


def ov_settings(path: Path, cores: int) -> list[tuple[str, Callable[[], list], int]]:
    from dinov2_triton.export.variants.openvino import ov_runner

    def params(hint: str, streams: int, threads: int) -> dict[str, str]:
        return {"PERFORMANCE_HINT": hint, "NUM_STREAMS": str(streams), "INFERENCE_NUM_THREADS": str(threads)}

    return [
        (f"1 instance, LATENCY: 1 stream x {cores} threads, 1 client",
         lambda: [ov_runner(path, params("LATENCY", 1, cores))], 1),
        (f"1 instance, THROUGHPUT: {cores} streams x 1 thread, {cores} clients",
         lambda: [ov_runner(path, params("THROUGHPUT", cores, cores))], cores),
        (f"{cores} instances, LATENCY: 1 stream x 1 thread each, {cores} clients",
         lambda: [ov_runner(path, params("LATENCY", 1, 1)) for _ in range(cores)], cores),
    ]


def run_study(repository: Path, variants: Sequence[str], *, batch_size: int, seconds: float) -> dict[str, Any]:
    import numpy as np

    from dinov2_triton.bench.system_info import machine_info
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.registry import get_variant

    manifest = read_export_manifest(repository)
    cores = usable_cores()
    shape = (batch_size, 3, manifest.img_size, manifest.img_size)
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out: dict[str, Any] = {"machine": machine_info(), "cores": cores, "batch_size": batch_size, "seconds": seconds,
                           "image_size": manifest.img_size, "variants": {}}
    for name in variants:
        entry = manifest.variants.get(name)
        if entry is None or not entry.published:
            raise ValueError(f"--variants {name}: not published in {repository} "
                             f"({entry.status + ': ' + (entry.reason or '') if entry else 'not in the manifest'})")
        v = get_variant(name)
        artifact = Path(entry.path) / v.filename
        if v.platform == "onnxruntime_onnx":
            settings = ort_settings(artifact, cores)
        elif v.platform == "openvino":
            settings = ov_settings(artifact, cores)
        else:
            raise ValueError(f"--variants {name}: platform {v.platform} has no thread study (ONNX Runtime and "
                             f"OpenVINO only)")
        rows = []
        for label, make, clients in settings:
            runners = make()
            rows.append({"setting": label, "instances": len(runners), "clients": clients,
                         **measure(runners, clients, batch, seconds=seconds)})
            del runners
            print(f"[cpu_threads] {name}: {label}: {rows[-1]['images_per_s']} img/s", file=sys.stderr)
        out["variants"][name] = rows
    return out


def render(study: dict[str, Any]) -> str:
    m = study["machine"]
    lines = [f"Thread settings at {study.get('image_size')} px, batch {study['batch_size']}, {study['cores']} usable "
             f"cores, {m['cpu_model']} "
             f"({', '.join(m['cpu_flags'])}), {study['seconds']} s each, in process:", "",
             "| variant | setting | img/s | vs best |", "|---|---|---|---|"]
    for name, rows in study["variants"].items():
        best = max(r["images_per_s"] for r in rows)
        for r in rows:
            lines.append(f"| {name} | {r['setting']} | {r['images_per_s']:.1f} | {r['images_per_s'] / best:.0%} |")
    return "\n".join(lines)


PROG = "dinov2-triton cpu-threads"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or PROG,
                                description="Measure one instance with every core vs several instances with fewer "
                                            "threads (ONNX Runtime and OpenVINO variants of an exported repository).")
    p.add_argument("--repository", required=True, help="model repository with export_manifest.json")
    p.add_argument("--variants", default="onnx_int8_dynamic,openvino_int8", help="comma-separated variant names")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0, help="per setting")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.batch_size < 1 or args.seconds <= 0:
        print(f"error: --batch-size {args.batch_size} must be >= 1 and --seconds {args.seconds} > 0", file=sys.stderr)
        return 2
    from dinov2_triton.core.records import RecordError

    try:
        study = run_study(Path(args.repository), [v for v in args.variants.split(",") if v],
                          batch_size=args.batch_size, seconds=args.seconds)
    except (ValueError, RecordError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(study))
    if args.out:
        from dinov2_triton.core.artifact_io import atomic_write_json

        atomic_write_json(Path(args.out), study)
    return 0
