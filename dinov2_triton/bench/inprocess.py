"""In-process benchmark of the fine-tuned model and every exported variant
(the library behind ``python production_benchmarking.py`` and step 1 of
``dinov2-triton bench``).

    run_inprocess_benchmark(model_path, repository=..., data_path=...) -> dinov2_triton.bench.results.InProcess

For each variant (PyTorch eager FP32 from the checkpoint, then every variant
of ``<repository>/export_manifest.json``, then every registered variant the
manifest does not have, SKIPPED with the reason):

- latency distribution (p50/p90/p95/p99 ms) per batch size, one client;
- throughput under several loads: N client threads sharing ONE loaded
  model/session, each sending batches back to back for ``seconds``;
- warm-up calls excluded; inputs are real test-split images when
  ``data_path`` is given (synthetic tensors otherwise, flagged);
- memory: artifact size, resident memory before/after loading and the peak of
  the run, each variant in a FRESH spawned process so peaks never mix;
- compute efficiency: images/s x FLOPs per image vs this machine's measured
  matrix multiply peak of the arithmetic the variant runs (the export
  manifest's ``arithmetic`` record: FP32, BF16 or INT8; each peak measured
  here on the same threads, dinov2_triton.bench.system_info.arithmetic_peak);
- bytes moved per image: input and output tensors, plus the weights read once
  per batch.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from dinov2_triton.bench.results import EAGER

if TYPE_CHECKING:
    from dinov2_triton.bench.results import InProcess
    from dinov2_triton.export.manifest import VariantEntry
    from dinov2_triton.export.registry import Variant

log = logging.getLogger("dinov2_triton.bench.inprocess")

EAGER_LABEL = "PyTorch eager FP32"
#: how the report names a registry platform's runtime ("ONNX Runtime INT8")
RUNTIME_NAMES = {"pytorch_libtorch": "TorchScript", "onnxruntime_onnx": "ONNX Runtime", "tensorrt_plan": "TensorRT"}
TENSORRT_REASON = "needs an NVIDIA GPU and TensorRT (build the engine on a GPU host: dinov2-triton export)"


class BenchmarkInputError(ValueError):
    """Bad input for the benchmark (flags, files); the CLIs exit 2 with it."""


def parse_int_list(text: str | Sequence[int], flag: str) -> list[int]:
    """"1,2,4" (or a sequence) -> sorted distinct positive ints; the flag is named in the error."""
    if isinstance(text, (list, tuple)):
        vals = [int(v) for v in text]
    else:
        try:
            vals = [int(x) for x in str(text).split(",") if x.strip()]
        except ValueError:
            raise BenchmarkInputError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not vals or any(v < 1 for v in vals):
        raise BenchmarkInputError(f"{flag} {text!r}: every value must be >= 1")
    return sorted(dict.fromkeys(vals))


# ----------------------------------------------------------------------------- the core loop
def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if not len(ms):
        return {}
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "std_ms": float(ms.std()), "min_ms": float(ms.min()),
            "max_ms": float(ms.max())}


def make_batches(pixel_values, batch_size: int, n_batches: int = 4) -> list:
    """Distinct batches of real images (tiled when there are too few), built
    before the clock starts so slicing never counts as inference time."""
    import numpy as np

    x = np.asarray(pixel_values, dtype=np.float32)
    need = batch_size * n_batches
    reps = -(-need // len(x))
    tiled = np.concatenate([x] * reps)[:need] if reps > 1 else x[:need]
    out = [np.ascontiguousarray(tiled[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]
    return [b for b in out if len(b) == batch_size]


def measure_load(runner: Callable, batches: Sequence, *, threads: int, seconds: float,
                 min_requests: int = 3) -> dict[str, Any]:
    """``threads`` clients share ``runner``, each sending batches back to back
    until ``seconds`` pass (and at least ``min_requests`` each). Returns images/s
    over the wall time and the per-request latency percentiles."""
    lat: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    deadline_box: list[float] = []

    def client(i: int) -> None:
        start.wait()
        deadline = deadline_box[0]
        k = i
        try:
            while len(lat[i]) < min_requests or time.perf_counter() < deadline:
                b = batches[k % len(batches)]
                t0 = time.perf_counter()
                runner(b)
                lat[i].append(time.perf_counter() - t0)
                k += threads
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    t_start = time.perf_counter()
    deadline_box.append(t_start + seconds)
    start.wait()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t_start
    if errors:
        raise errors[0]
    all_lat = [x for per in lat for x in per]
    bs = len(batches[0])
    return {"threads": threads, "batch_size": bs, "requests": len(all_lat), "wall_s": wall,
            "images_per_s": bs * len(all_lat) / wall if wall > 0 else None,
            "requests_per_s": len(all_lat) / wall if wall > 0 else None,
            **percentiles_ms(all_lat)}


def benchmark_runner(runner: Callable, pixel_values, *, batch_sizes: Sequence[int] = (1, 8),
                     threads: Sequence[int] = (1, 2, 4), seconds: float = 5.0, warmup: int = 10,
                     min_requests: int = 3) -> dict[str, Any]:
    """Latency per batch size (one client) and throughput under ``threads``
    concurrent clients; warm-up calls (per batch size) are excluded.

    Returns {"latency": {"<bs>": {p50_ms.. p99_ms, images_per_s, requests}},
    "grid": [measure_load() for each batch size x thread count],
    "settings": {...}} (dinov2_triton.bench.results.Benchmark). One client is always
    measured (it is the latency)."""
    if seconds <= 0:
        raise ValueError(f"--seconds {seconds}: must be > 0")
    loads = sorted(set([1, *threads]))
    out: dict[str, Any] = {"latency": {}, "grid": [],
                           "settings": {"batch_sizes": list(batch_sizes), "threads": loads, "seconds": seconds,
                                        "warmup": warmup, "min_requests": min_requests}}
    for bs in batch_sizes:
        batches = make_batches(pixel_values, bs)
        for i in range(warmup):
            runner(batches[i % len(batches)])
        for t in loads:
            cell = measure_load(runner, batches, threads=t, seconds=seconds, min_requests=min_requests)
            out["grid"].append(cell)
            if t == 1:
                out["latency"][str(bs)] = {k: v for k, v in cell.items() if k not in ("threads",)}
    return out


# ----------------------------------------------------------------------------- variants
@dataclass
class VariantSpec:
    """What one benchmarked variant is (dinov2_triton.bench.results.InProcessVariant's first fields)."""
    name: str                      # EAGER or an dinov2_triton.export.registry name
    label: str
    precision: str = "fp32"
    platform: str = "pytorch_eager"
    parent: str | None = None
    model_name: str | None = None  # Triton model name
    gate: str = "fp32"
    artifact: str | None = None
    file_bytes: int | None = None
    status: str = "OK"             # OK | SKIPPED | FAILED (before running)
    reason: str | None = None
    export: dict[str, Any] = field(default_factory=dict)  # the manifest's verdict, for the report
    arithmetic: str = "fp32"       # whose peak its efficiency is a fraction of (variant_arithmetic)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def variant_arithmetic(precision: str, record: Mapping[str, Any] | None = None, flags=None) -> str:
    """The arithmetic a variant runs (fp32, bf16, fp16, int8 ...): the export
    manifest's ``arithmetic`` record (read from the engine) when it has one;
    else its precision, where a CPU without BF16/FP16 arithmetic computes
    BF16/FP16 values in FP32 (manifests written before the record)."""
    from dinov2_triton.core.cpu_features import compute_unit, read_cpu_flags

    if record and record.get("arithmetic"):
        return str(record["arithmetic"]).lower()
    precision = precision.lower()
    if precision in ("bf16", "fp16"):
        flags = read_cpu_flags() if flags is None else flags
        if compute_unit(precision, flags) == compute_unit("fp32", flags):   # no native unit: FP32 math
            return "fp32"
    return precision


def variant_label(variant: "Variant") -> str:
    """e.g. "ONNX Runtime INT8", from the registry's platform and precision."""
    return f"{RUNTIME_NAMES.get(variant.platform, variant.platform)} {variant.precision.upper()}"


def _export_summary(entry: "VariantEntry") -> dict[str, Any]:
    """The manifest entry's verdict, as the report reads it (dinov2_triton.bench.results.ExportVerdict)."""
    out = entry.model_dump(include={"status", "reason", "published", "version", "gate_passed", "gate_failures",
                                    "slower_than_parent", "speed", "size_bytes", "sha256", "build_info",
                                    "arithmetic"})
    out["headline"] = entry.headline.model_dump() if entry.headline else {}
    if entry.verification is not None:
        out["verification_batch_sizes"] = {bs: {k: r.get(k) for k in ("n", "top1_agreement", "flipped", "logits",
                                                                        "embedding", "deltas")}
                                           for bs, r in entry.verification.batch_sizes.items()}
        out["gate"] = entry.verification.gate
    return out


def discover_variants(model_path: str | os.PathLike, repository: str | os.PathLike | None, *,
                      only: Sequence[str] | None = None) -> list[VariantSpec]:
    """The eager model, every variant of the repository's export manifest, then
    every registered variant the manifest does not have.

    Variants the export skipped or failed stay in the list with its reason; a
    published variant whose artifact is missing is FAILED; a registered
    variant missing from the manifest is SKIPPED (TensorRT ones: built on GPU
    hosts only). ``only`` restricts to these names (EAGER = the eager model)."""
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.registry import load_builtin_variants

    registry = load_builtin_variants()
    specs = [VariantSpec(name=EAGER, label=EAGER_LABEL, artifact=str(model_path),
                         file_bytes=Path(model_path).stat().st_size if Path(model_path).is_file() else None)]
    try:  # the one reader of export_manifest.json (RecordError / bad JSON name the file and field)
        manifest = read_export_manifest(repository, missing_ok=True) if repository else None
    except ValueError as exc:
        raise BenchmarkInputError(str(exc)) from None
    entries = manifest.variants if manifest else {}
    for name, e in entries.items():
        spec = VariantSpec(name=name, label=variant_label(registry[name]) if name in registry else name,
                           precision=e.precision, platform=e.platform, parent=e.parent or EAGER,
                           model_name=e.model_name, gate=e.gate, export=_export_summary(e),
                           arithmetic=variant_arithmetic(e.precision, e.arithmetic.model_dump() if e.arithmetic
                                                         else None))
        if not e.published:
            spec.status = "FAILED" if e.status == "FAILED" else "SKIPPED"
            spec.reason = f"export {e.status}: {e.reason or 'not published'}"
        else:
            artifact = _artifact_path(repository, e)
            spec.artifact = str(artifact)
            if not artifact.is_file():
                spec.status, spec.reason = "FAILED", f"{artifact}: published artifact not found"
            else:
                spec.file_bytes = int(e.size_bytes or artifact.stat().st_size)
            if name not in registry:
                spec.status, spec.reason = "SKIPPED", (f"variant {name!r} is not registered in this checkout "
                                                       f"(dinov2_triton.export.registry); cannot load it in process")
        specs.append(spec)
    for name, v in registry.items():
        if name in entries:
            continue
        why = (f"TensorRT {TENSORRT_REASON}" if v.platform == "tensorrt_plan"
               else f"export it with: dinov2-triton export --variants {name}")
        specs.append(VariantSpec(name=name, label=variant_label(v), precision=v.precision, platform=v.platform,
                                 parent=v.parent or EAGER, model_name=v.model_name, gate=v.gate, status="SKIPPED",
                                 reason=f"not in the export manifest: {why}", arithmetic=v.precision))
    if only:
        unknown = [n for n in only if n not in {s.name for s in specs}]
        if unknown:
            raise BenchmarkInputError(f"--variants {','.join(unknown)}: not found; available: "
                                      f"{', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in only]
    return specs


def _artifact_path(repository, entry: "VariantEntry") -> Path:
    """The published file: the manifest's absolute path if it still exists
    (same machine), else <repository>/<model>/<version>/<file> (a copied repo)."""
    if entry.path and (Path(entry.path) / entry.filename).is_file():
        return Path(entry.path) / entry.filename
    return Path(repository) / entry.model_name / str(entry.version) / entry.filename


# ----------------------------------------------------------------------------- worker
def _load_runner(spec: Mapping[str, Any]) -> Callable:
    import numpy as np

    if spec["name"] == EAGER:
        import torch

        from dinov2_triton.train.model import load_classifier

        model, _ = load_classifier(spec["artifact"])

        def run(x):
            with torch.inference_mode():
                lo, em = model.forward_with_embedding(torch.from_numpy(np.ascontiguousarray(x)))
            return lo.numpy(), em.numpy()
        return run
    from dinov2_triton.export.registry import get_variant

    return get_variant(spec["name"]).load_runner(Path(spec["artifact"]))


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Load one variant and benchmark it, in THIS process. The memory numbers
    are only meaningful in a fresh process (see run_variant)."""
    import numpy as np

    from dinov2_triton.bench.memory import peak_rss, reset_peak_rss, rss_now

    result: dict[str, Any] = {"name": job["spec"]["name"], "isolated": bool(job.get("isolated"))}
    try:
        import torch

        if job.get("torch_threads"):
            torch.set_num_threads(int(job["torch_threads"]))
        # The same libraries are imported before the baseline for every variant,
        # so "loaded model" = what loading THIS artifact added, not the imports.
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            pass
        import timm  # noqa: F401

        import dinov2_triton.train.model  # noqa: F401
        from dinov2_triton.export.registry import load_builtin_variants

        load_builtin_variants()
        x = np.load(job["inputs"])
        base = rss_now()
        result["peak_reset"] = reset_peak_rss()
        t0 = time.perf_counter()
        runner = _load_runner(job["spec"])
        result["load_s"] = time.perf_counter() - t0
        after = rss_now()
        bench = benchmark_runner(runner, x, batch_sizes=job["batch_sizes"], threads=job["threads"],
                                 seconds=job["seconds"], warmup=job["warmup"])
        peak = peak_rss()
        result.update(status="OK", benchmark=bench, torch_threads=torch.get_num_threads(),
                      ort_threads=_ort_threads(runner),
                      memory={"baseline_rss_bytes": base, "after_load_rss_bytes": after,
                              "loaded_model_bytes": after - base, "peak_rss_bytes": peak,
                              "peak_over_baseline_bytes": peak - base})
    except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the others
        from dinov2_triton.export.registry import SkipVariant

        if isinstance(exc, SkipVariant):
            result.update(status="SKIPPED", reason=str(exc))
        else:
            result.update(status="FAILED", reason=f"{type(exc).__name__}: {exc}",
                          traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:]))
    return result


def _ort_threads(runner) -> dict[str, Any] | None:
    sess = getattr(runner, "session", None)
    if sess is None:
        return None
    try:
        opts = sess.get_session_options()
        return {"intra_op": opts.intra_op_num_threads or "default (all cores)",
                "inter_op": opts.inter_op_num_threads or "default", "providers": sess.get_providers()}
    except Exception:  # noqa: BLE001 - thread settings are informative only
        return None


def _worker_entry(job: dict, result_path: str) -> None:
    """Spawned-process entry point: run the job, write its JSON result
    (atomically: a worker killed mid-write leaves no half file to misread)."""
    from dinov2_triton.core.artifact_io import atomic_write_json

    logging.basicConfig(level=logging.WARNING)
    atomic_write_json(result_path, run_job({**job, "isolated": True}))


def run_variant(job: Mapping[str, Any], *, isolate: bool = True, timeout_s: float | None = None) -> dict[str, Any]:
    """Run one variant's benchmark in a fresh spawned process (isolate=True,
    the default: peaks of different variants never mix, and a crash of one
    runtime does not take the others down) or in this process."""
    if not isolate:
        return run_job(job)
    import multiprocessing as mp

    from dinov2_triton.core.artifact_io import read_json

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="perf-worker-") as tmp:
        result_path = Path(tmp) / "result.json"
        proc = ctx.Process(target=_worker_entry, args=(dict(job), str(result_path)), daemon=False)
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
            return {"name": job["spec"]["name"], "status": "FAILED", "isolated": True,
                    "reason": f"benchmark worker timed out after {timeout_s:.0f} s"}
        if result_path.is_file():
            return read_json(result_path, what="benchmark worker result")
        code = proc.exitcode
        why = " (killed: out of memory?)" if code in (-9, 137) else ""
        return {"name": job["spec"]["name"], "status": "FAILED", "isolated": True,
                "reason": f"benchmark worker exited with code {code}{why} before writing its result"}


# ----------------------------------------------------------------------------- derived numbers
def efficiency(bench: Mapping[str, Any], gflops_per_image: float | None, peak: Mapping[str, Any] | None,
               arithmetic: str = "fp32", *, unavailable: str | None = None,
               shares: Mapping[str, float] | None = None) -> dict[str, Any] | None:
    """Achieved GFLOP/s (images/s x GFLOP/image) and its fraction of the
    measured peak of the variant's own `arithmetic` (`peak`:
    dinov2_triton.bench.system_info.arithmetic_peak output; None with the
    reason in `unavailable`), for the best cell of the grid and per cell.
    A value above 100 % means the peak measurement is below what the engine
    reached (the caveat says so); `shares` (arithmetic -> fraction of the
    layers) names a mixed-precision variant in the caveat."""
    if not gflops_per_image or not bench or not bench.get("grid"):
        return None
    peak_gflops = float(peak["gflops"]) if peak else None
    name = arithmetic.upper()
    cells = []
    for c in bench["grid"]:
        ach = (c.get("images_per_s") or 0) * gflops_per_image
        cells.append({"batch_size": c["batch_size"], "threads": c["threads"], "achieved_gflops": ach,
                      "fraction_of_peak": ach / peak_gflops if peak_gflops else None})
    best = max(cells, key=lambda c: c["achieved_gflops"])
    out = {"gflops_per_image": gflops_per_image, "arithmetic": arithmetic.lower(), "peak_gflops": peak_gflops,
           "peak_method": (peak or {}).get("method"), "best": best, "cells": cells,
           "max_images_per_s_at_peak": peak_gflops / gflops_per_image if peak_gflops else None}
    notes = []
    if peak_gflops is None:
        notes.append(f"no {name} peak measured on this host" + (f": {unavailable}" if unavailable else ""))
    elif best["fraction_of_peak"] > 1.0:
        notes.append(f"{best['fraction_of_peak']:.0%} of the measured {name} peak ({peak_gflops:.1f} GFLOP/s, "
                     f"{(peak or {}).get('method') or 'matrix multiply'}): that peak measurement is wrong, lower "
                     f"than what this engine's kernels reached, so it is no bound here")
    mixed = {k: v for k, v in (shares or {}).items() if k.lower() != arithmetic.lower() and v}
    if mixed:
        rest = ", ".join(f"{k} {v:.0%}" for k, v in mixed.items())
        notes.append(f"mixed precision: {name} {1 - sum(mixed.values()):.0%} of the matrix multiply layers, "
                     f"{rest}; divided by the {name} peak")
    if notes:
        out["caveat"] = "; ".join(notes)
    return out


def bytes_moved(*, image_size: int, num_classes: int, embed_dim: int, weight_bytes: int | None,
                batch_sizes: Sequence[int], gflops_per_image: float | None = None) -> dict[str, Any]:
    """Bytes per image over the wire and from memory. Input: the FP32
    pixel_values tensor; output: FP32 logits + embedding; weights: read once
    per batch, so per image = weights / batch size (an upper bound: caches
    keep some of it). Arithmetic intensity = FLOPs / bytes."""
    inp = 3 * image_size * image_size * 4
    outp = (num_classes + embed_dim) * 4
    per_bs = {}
    for bs in batch_sizes:
        w = weight_bytes / bs if weight_bytes else None
        total = inp + outp + (w or 0)
        per_bs[str(bs)] = {"weight_bytes_per_image": w, "total_bytes_per_image": total,
                           "flops_per_byte": (gflops_per_image * 1e9 / total) if gflops_per_image else None}
    return {"input_bytes_per_image": inp, "output_bytes_per_image": outp, "weight_bytes_per_batch": weight_bytes,
            "per_batch_size": per_bs}


# ----------------------------------------------------------------------------- the whole benchmark
def run_inprocess_benchmark(model_path: str | os.PathLike, *, repository: str | os.PathLike | None = None,
                            data_path: str | os.PathLike | None = None,
                            batch_sizes: Sequence[int] = (1, 8), threads: Sequence[int] = (1, 2, 4),
                            seconds: float = 5.0, warmup: int = 10, variants: Sequence[str] | None = None,
                            n_samples: int = 32, torch_threads: int | None = None, isolate: bool = True,
                            measure_peak: bool = True, worker_timeout_s: float | None = None,
                            progress: Callable[[str], None] | None = None) -> "InProcess":
    """Benchmark every variant in process: the ``in_process`` section of
    results.json (dinov2_triton.bench.results.InProcess). Raises BenchmarkInputError for bad
    input (flags, files)."""
    import numpy as np

    from dinov2_triton.bench.input_data import load_samples
    from dinov2_triton.bench.results import InProcess
    from dinov2_triton.bench.system_info import flops_per_image
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.train.model import WeightsError, load_classifier
    from dinov2_triton.train.preprocessing_source import resolve_preprocessing

    say = progress or (lambda m: log.info(m))
    batch_sizes = parse_int_list(batch_sizes, "--batch-sizes")
    threads = parse_int_list(threads, "--threads")
    model_path = Path(model_path)
    try:
        model, record = load_classifier(model_path)
    except (WeightsError, RecordError) as exc:
        raise BenchmarkInputError(f"--model-path: {exc}") from None
    if data_path is not None and not Path(data_path).is_dir():
        raise BenchmarkInputError(f"--data-path {data_path}: not a folder (dinov2-triton data first)")
    if repository is not None and not Path(repository).is_dir():
        raise BenchmarkInputError(f"--repository {repository}: not a folder (dinov2-triton export first)")
    specs = discover_variants(model_path, repository, only=variants)
    try:  # the checkpoint's record, which must equal the repository's (dinov2_triton.train.preprocessing_source)
        preprocessing, _ = resolve_preprocessing(model_path=model_path, repository=repository,
                                                 checkpoint=record)
    except ValueError as exc:
        raise BenchmarkInputError(str(exc)) from None
    img = record.image_size
    flops = flops_per_image(model, img)
    embed_dim = int(getattr(model, "embed_dim", 0))
    del model
    samples = load_samples(data_path, preprocessing, n=max(n_samples, max(batch_sizes)))
    import torch

    used_threads = torch_threads or torch.get_num_threads()
    # One peak per arithmetic the variants run (FP32 always: the eager
    # baseline), measured before AND after the variants, the higher one kept:
    # on a shared machine a single snapshot can land in a busy moment.
    arithmetics = sorted({"fp32", *(s.arithmetic for s in specs if s.status == "OK")})
    peaks, not_measured = _measure_peaks(arithmetics, used_threads, say) if measure_peak else ({}, {})
    result: dict[str, Any] = {
        "settings": {"batch_sizes": batch_sizes, "threads": threads, "seconds": seconds, "warmup": warmup,
                     "torch_threads": used_threads, "isolated_processes": isolate, "n_samples": len(samples.names),
                     "repository": str(repository) if repository else None,
                     "data_path": str(data_path) if data_path else None},
        "model": {"checkpoint": str(model_path), "arch": record.arch, "img_size": img,
                  "num_classes": record.num_classes, "embed_dim": embed_dim,
                  "class_names": list(record.class_names),
                  "weights_source": record.weights_source, "pretrained": record.pretrained,
                  "preprocessing": preprocessing.to_dict(), "checkpoint_metrics": record.metrics},
        "flops": flops,
        "matmul_peak": peaks.get("fp32"),
        "matmul_peaks": peaks,
        "peaks_not_measured": not_measured,
        "input_data": samples.describe(),
        "variants": {}, "skipped": [],
    }
    with tempfile.TemporaryDirectory(prefix="perf-inputs-") as tmp:
        inputs = Path(tmp) / "pixel_values.npy"
        np.save(inputs, samples.pixel_values)
        for spec in specs:
            entry = spec.to_dict()
            if spec.status != "OK":
                result["variants"][spec.name] = entry
                result["skipped"].append({"what": f"in-process {spec.label}", "reason": spec.reason})
                say(f"{spec.name}: {spec.status} ({spec.reason})")
                continue
            say(f"{spec.name}: benchmarking ({spec.label}) ...")
            job = {"spec": {"name": spec.name, "artifact": spec.artifact}, "inputs": str(inputs),
                   "batch_sizes": batch_sizes, "threads": threads, "seconds": seconds, "warmup": warmup,
                   "torch_threads": used_threads}
            timeout = worker_timeout_s or (60 + 2.5 * len(batch_sizes) * (len(threads) + 1) * seconds + 30 * warmup)
            res = run_variant(job, isolate=isolate, timeout_s=timeout)
            entry["status"] = res.get("status", "FAILED")
            entry["reason"] = res.get("reason")
            for k in ("benchmark", "memory", "load_s", "torch_threads", "ort_threads", "isolated", "traceback"):
                if k in res:
                    entry[k] = res[k]
            if entry["status"] == "OK":
                best = max(res["benchmark"]["grid"], key=lambda c: c["images_per_s"] or 0)
                say(f"  {spec.name}: batch 1 p50 {res['benchmark']['latency'][str(batch_sizes[0])]['p50_ms']:.2f} ms, "
                    f"best {best['images_per_s']:.1f} img/s (batch {best['batch_size']}, {best['threads']} threads)")
            else:
                result["skipped"].append({"what": f"in-process {spec.label}", "reason": entry["reason"]})
                say(f"  {spec.name}: {entry['status']}: {entry['reason']}")
            entry["bytes_moved"] = bytes_moved(image_size=img, num_classes=record.num_classes,
                                               embed_dim=embed_dim, weight_bytes=spec.file_bytes,
                                               batch_sizes=batch_sizes, gflops_per_image=flops["gflops"])
            result["variants"][spec.name] = entry
    if measure_peak:
        again, _ = _measure_peaks(list(peaks), used_threads, say)
        for arith, first in list(peaks.items()):
            second = again.get(arith) or first
            peaks[arith] = dict(max(first, second, key=lambda p: p["gflops"]),
                                measurements_gflops=[first["gflops"], second["gflops"]])
        result["matmul_peak"], result["matmul_peaks"] = peaks.get("fp32"), peaks
    for spec in specs:
        entry = result["variants"][spec.name]
        entry["arithmetic"] = spec.arithmetic
        if entry.get("status") == "OK" and entry.get("benchmark"):
            entry["efficiency"] = efficiency(entry["benchmark"], flops["gflops"], peaks.get(spec.arithmetic),
                                             spec.arithmetic, unavailable=not_measured.get(spec.arithmetic),
                                             shares=(spec.export.get("arithmetic") or {}).get("shares"))
    return InProcess.model_validate(result)


def _measure_peaks(arithmetics, threads: int, say) -> tuple[dict[str, dict], dict[str, str]]:
    """{arithmetic: its peak} and {arithmetic: why it has none} on `threads` threads."""
    from dinov2_triton.bench.system_info import PeakUnavailable, arithmetic_peak

    peaks, not_measured = {}, {}
    for arith in arithmetics:
        try:
            peaks[arith] = arithmetic_peak(arith, threads)
            say(f"{arith.upper()} matrix multiply peak ({threads} threads): {peaks[arith]['gflops']:.1f} "
                f"G{'OP' if arith == 'int8' else 'FLOP'}/s ({peaks[arith]['method']})")
        except PeakUnavailable as exc:
            not_measured[arith] = str(exc)
            say(f"{arith.upper()} peak not measured: {exc}")
    return peaks, not_measured
