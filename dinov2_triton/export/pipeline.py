"""run_export: checkpoint -> verified, measured variants -> Triton repository.

For every requested variant, in registry order (parents first):
build into a staging version folder -> load an in-process runner -> verify
against eager FP32 at batch 1 and max_batch_size on held-out images -> gate
-> benchmark -> config.pbtxt -> atomic publish as the next version. Then the
`dinov2_preprocess` Python model and the `dinov2` ensemble are published, and
export_manifest.json (dinov2_triton.export.manifest.ExportManifest) records everything,
also the failures, with reasons."""
from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dinov2_triton.export.triton_config import (
    DEFAULT_INSTANCES,
    DEFAULT_PREFERRED_BATCH_SIZES,
    DEFAULT_QUEUE_TIMEOUT_MS,
)

log = logging.getLogger(__name__)

DEFAULT_OPTIONS: dict[str, Any] = {
    "max_batch_size": 8,
    "opset": 18,
    "instances": DEFAULT_INSTANCES,   # x the host's cores shared among them as threads (triton_config)
    "device": "cpu",
    "preferred_batch_sizes": DEFAULT_PREFERRED_BATCH_SIZES,
    "max_queue_delay_us": 2000,
    # queue policy of every batching model (dinov2_triton.export.triton_config): None =
    # default_max_queue_size(max_batch_size, instances); 0 = no limit
    "max_queue_size": None,
    "queue_timeout_ms": DEFAULT_QUEUE_TIMEOUT_MS,
    # hostile-image limits of dinov2_preprocess (None: dinov2_triton.core.image_limits defaults)
    "max_image_bytes": None,
    "max_image_pixels": None,
    "gates": (),                # --gates SCOPE.FIELD=VALUE entries (dinov2_triton.export.gates)
    "allow_failed_gates": False,
    "default_variant": None,    # None: the registry's preferred ensemble variant (registry.ensemble_candidates)
    "bench_seconds": 4.0,
    "keep_versions": 2,
    "eval_size": 256,
    "calib_size": 512,          # capped at the train split's size
    "calib_method": "entropy",  # beat "max" on ViT activations in our measurements
    "accuracy_budget": 0.01,
    "onnx_exporter": "dynamo",
    "preprocess_instances": DEFAULT_INSTANCES,
    "log_dir": None,
    "work_dir": None,
    "keep_work_dir": False,
}


class ExportInputError(ValueError):
    """Bad input (checkpoint, data folder, flags): nothing was built; CLI exit 2."""


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def resolve_variants(requested: Iterable[str] | str | None) -> tuple[list[str], list[str], dict[str, Any]]:
    """Requested names (None or "auto": every variant this host can run, the
    ensemble calling the fastest gated one, dinov2_triton.export.auto; "all":
    every registered variant) -> (build order, parents added for them, export
    options that the choice implies)."""
    from dinov2_triton.export.auto import AUTO, expand
    from dinov2_triton.export.registry import build_order, variant_names

    names = variant_names()
    if requested is None:
        requested = [AUTO]
    elif isinstance(requested, str):
        requested = [v for v in requested.replace(" ", "").split(",") if v]
    requested = list(requested)
    if not requested:
        raise ExportInputError("--variants: give at least one variant")
    if "all" in requested:
        requested = names
    requested, implied = expand(requested)
    unknown = [v for v in requested if v not in names]
    if unknown:
        raise ExportInputError(f"--variants: unknown {unknown}; choose from {names}, '{AUTO}' or 'all'")
    try:
        order = build_order(requested)
    except ValueError as exc:
        raise ExportInputError(f"--variants: {exc}") from None
    return order, [n for n in order if n not in requested], implied


def _int_list(value, flag: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ExportInputError(f"{flag} {value!r}: expected integers such as 4,8") from None


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    if "thresholds" in options:
        raise ExportInputError("option 'thresholds' is now 'gates' (CLI: --gates SCOPE.FIELD=VALUE)")
    unknown = set(options) - set(DEFAULT_OPTIONS)
    opts = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None or k in ("log_dir", "work_dir")}}
    # Unknown keys are variant options (e.g. trt_workspace_gb): kept, passed on.
    for k in unknown:
        opts[k] = options[k]
    checks = [
        (int(opts["max_batch_size"]) >= 1, f"--max-batch-size {opts['max_batch_size']}: must be >= 1"),
        (int(opts["opset"]) >= 17, f"--opset {opts['opset']}: must be >= 17 (LayerNormalization)"),
        (int(opts["instances"]) >= 1, f"--instances {opts['instances']}: must be >= 1"),
        (int(opts["preprocess_instances"]) >= 1,
         f"--preprocess-instances {opts['preprocess_instances']}: must be >= 1"),
        (opts["device"] in ("cpu", "gpu"), f"--device {opts['device']!r}: choose cpu or gpu"),
        (int(opts["max_queue_delay_us"]) >= 0, f"--max-queue-delay-us {opts['max_queue_delay_us']}: must be >= 0"),
        (opts["max_queue_size"] is None or int(opts["max_queue_size"]) >= 0,
         f"--max-queue-size {opts['max_queue_size']}: must be >= 0 (0: no limit)"),
        (float(opts["queue_timeout_ms"]) >= 0,
         f"--queue-timeout-ms {opts['queue_timeout_ms']}: must be >= 0 (0: none)"),
        (opts["max_image_bytes"] is None or int(opts["max_image_bytes"]) >= 1,
         f"--max-image-bytes {opts['max_image_bytes']}: must be >= 1"),
        (opts["max_image_pixels"] is None or int(opts["max_image_pixels"]) >= 1,
         f"--max-image-pixels {opts['max_image_pixels']}: must be >= 1"),
        (int(opts["keep_versions"]) >= 1, f"--keep-versions {opts['keep_versions']}: must be >= 1"),
        (float(opts["bench_seconds"]) >= 0, f"--bench-seconds {opts['bench_seconds']}: must be >= 0 (0 disables)"),
        (int(opts["eval_size"]) >= 1, f"--eval-size {opts['eval_size']}: must be >= 1"),
        (int(opts["calib_size"]) >= 1, f"--calib-size {opts['calib_size']}: must be >= 1"),
        (opts["onnx_exporter"] in ("dynamo", "legacy"),
         f"--onnx-exporter {opts['onnx_exporter']!r}: choose dynamo or legacy"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ExportInputError(msg)
    for key in ("max_batch_size", "opset", "instances", "preprocess_instances", "max_queue_delay_us",
                "keep_versions", "eval_size", "calib_size"):
        opts[key] = int(opts[key])
    opts["bench_seconds"] = float(opts["bench_seconds"])
    pref = _int_list(opts["preferred_batch_sizes"], "--preferred-batch-sizes")
    bad = [b for b in pref if not 1 <= b <= opts["max_batch_size"]]
    if bad:
        raise ExportInputError(f"--preferred-batch-sizes {bad}: must be between 1 and --max-batch-size "
                               f"{opts['max_batch_size']}")
    opts["preferred_batch_sizes"] = pref
    gates = opts["gates"]
    opts["gates"] = [gates] if isinstance(gates, str) else list(gates or ())
    return opts


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
def run_export(model_path: str | os.PathLike, repository: str | os.PathLike, *,
               data_path: str | os.PathLike | None = None,
               variants: Sequence[str] | str | None = None, **options: Any):
    """Export `model_path` into `repository`; returns the ExportManifest (also
    written to <repository>/export_manifest.json). Raises ExportInputError for
    bad input before anything is built. `variants`: names, "auto" (None: the same)
    or "all". Options: see DEFAULT_OPTIONS (unknown keys are
    passed to the variant builders through ExportContext.options)."""
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.export.gates import GateError, parse_gate_overrides, with_accuracy_budget
    from dinov2_triton.export.registry import gate_scopes, variant_names
    from dinov2_triton.export.repository import RepositoryError, RepositoryLock, clean_stale_staging
    from dinov2_triton.train.model import WeightsError, load_classifier

    t_start = time.perf_counter()
    opts = validate_options(options)
    order, added, implied = resolve_variants(variants)
    opts.update({k: v for k, v in implied.items() if k not in options})
    if opts["default_variant"] is not None and opts["default_variant"] not in variant_names():
        raise ExportInputError(f"--default-variant {opts['default_variant']!r}: choose from {variant_names()}")
    # --accuracy-budget is the INT8/FP8 gates' allowed accuracy drop unless
    # --gates sets it explicitly; the mixed-precision search aims at the same gate.
    try:
        gates = with_accuracy_budget(parse_gate_overrides(opts["gates"], scopes=gate_scopes()),
                                     opts["accuracy_budget"])
    except GateError as exc:
        raise ExportInputError(str(exc)) from None
    model_path = Path(model_path)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportInputError(f"--repository {repository}: exists and is not a folder")
    if data_path is not None:
        data_path = Path(data_path)
        if not data_path.is_dir():
            raise ExportInputError(f"--data-path {data_path}: not a folder (prepare it with "
                                   f"dinov2-triton data --data-path {data_path})")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        model, record = load_classifier(model_path)
    except (WeightsError, RecordError) as exc:
        raise ExportInputError(f"--model-path: {exc}") from None
    timings["load_checkpoint_s"] = time.perf_counter() - t

    repository.mkdir(parents=True, exist_ok=True)
    try:
        lock = RepositoryLock(repository).__enter__()
    except RepositoryError as exc:
        raise ExportInputError(str(exc)) from None
    work_dir = Path(opts["work_dir"]) if opts["work_dir"] else Path(tempfile.mkdtemp(prefix="dinov2-export-"))
    try:
        clean_stale_staging(repository)
        return _run(model, record, model_path, repository, data_path, order, added, opts, gates,
                    work_dir, timings, t_start)
    finally:
        lock.__exit__(None, None, None)
        if not opts["keep_work_dir"] and not opts["work_dir"]:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run(model, record, model_path: Path, repository: Path, data_path, order, added, opts, gates,
         work_dir: Path, timings, t_start):
    from dinov2_triton.core.artifact_io import git_revision, library_versions, new_run_id, sha256_file, utc_now
    from dinov2_triton.data.datasets import ManifestError
    from dinov2_triton.export.benchmark import benchmark_runner
    from dinov2_triton.export.context import DataUnavailable, ExportContext, eager_runner
    from dinov2_triton.export.manifest import ExportManifest, write_export_manifest
    from dinov2_triton.export.serving_models import publish_serving_models
    from dinov2_triton.train.metrics import classification_metrics

    run_id = new_run_id()
    created = utc_now()
    ckpt_sha = sha256_file(model_path)
    ctx = ExportContext(model, record, data_path=data_path, work_dir=work_dir, options=opts)
    warnings: list[str] = []

    t = time.perf_counter()
    try:
        es = ctx.eval_set()
    except (ManifestError, DataUnavailable) as exc:
        raise ExportInputError(f"--data-path: {exc}") from None
    warnings += es.notes if es.synthetic or es.split != "test" else []
    timings["eval_set_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ref_logits, _ = ctx.reference_outputs()
    timings["reference_s"] = time.perf_counter() - t
    reference = None
    if es.labels is not None:
        m = classification_metrics(es.labels, ref_logits, ctx.class_names)
        reference = {k: m[k] for k in ("n", "accuracy", "precision_macro", "recall_macro", "f1_macro",
                                       "auc_roc_macro")}
    log.info("eval set: %d %s images%s; eager FP32 reference%s", len(es), es.split,
             " (SYNTHETIC)" if es.synthetic else "",
             f" accuracy {reference['accuracy']:.4f}" if reference else " (no labels)")

    t = time.perf_counter()
    baseline = benchmark_runner(eager_runner(model), es.pixel_values, seconds=opts["bench_seconds"])
    timings["baseline_benchmark_s"] = time.perf_counter() - t
    if baseline and baseline.get("busy_host"):
        msg = (f"the host is busy (1-min load {max(x for x in baseline['host_load_1min'] if x is not None):.1f} "
               f"on {os.cpu_count()} cores): benchmark numbers and slower-than-parent flags are unreliable")
        log.warning(msg)
        warnings.append(msg)
    if baseline:
        log.info("eager PyTorch baseline: batch 1 %.2f ms (p50), batch %d %.1f img/s",
                 baseline["batch1"]["median_ms"], baseline["throughput_batch"],
                 baseline[f"batch{baseline['throughput_batch']}"]["img_per_s"])

    manifest = ExportManifest.new(
        run_id=run_id, created=created, repository=str(repository.resolve()),
        source_checkpoint={"path": str(model_path.resolve()), "sha256": ckpt_sha,
                           "size_bytes": model_path.stat().st_size},
        weights_source=record.weights_source, pretrained=record.pretrained, arch=record.arch,
        img_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim,
        class_names=ctx.class_names, preprocessing=ctx.preprocessing.to_dict(),
        checkpoint_metrics=record.metrics, checkpoint_git_revision=record.git_revision,
        versions=library_versions(), git_revision=git_revision(), options=dict(opts),
        requested_variants=[v for v in order if v not in added], added_as_parents=list(added),
        data_path=str(data_path.resolve()) if data_path else None, eval_set=es.describe(),
        reference=reference, baseline={"name": "eager pytorch fp32", "benchmark": baseline},
        warnings=warnings)
    for name in order:
        manifest.variants[name] = export_variant(ctx, name, repository, opts, gates, manifest,
                                                 ckpt_sha, run_id, baseline)
        gc.collect()

    t = time.perf_counter()
    manifest.preprocess, manifest.ensemble = publish_serving_models(ctx, repository, opts, manifest,
                                                                    ckpt_sha, run_id)
    timings["preprocess_ensemble_s"] = time.perf_counter() - t
    if ctx.calibration_files:
        manifest.calibration = {"n_files": len(ctx.calibration_files), "splits": sorted(ctx.calibration_splits),
                                "files_sample": ctx.calibration_files[:20]}
    manifest.exit_code = exit_code(manifest)
    manifest.finished = utc_now()
    timings["total_s"] = time.perf_counter() - t_start
    manifest.timings = {k: round(v, 3) for k, v in timings.items()}
    write_export_manifest(manifest, repository)
    if opts.get("log_dir"):
        write_export_manifest(manifest, Path(opts["log_dir"]) / f"export_manifest-{run_id}.json")
    return manifest


def export_variant(ctx, name: str, repository: Path, opts, gates, manifest, ckpt_sha: str,
                   run_id: str, baseline):
    """Build, verify, gate, benchmark and publish one variant; returns its
    manifest VariantEntry (every outcome, with the reason)."""
    from dinov2_triton.core.artifact_io import sha256_file
    from dinov2_triton.export.benchmark import benchmark_runner, compare
    from dinov2_triton.export.manifest import VariantEntry
    from dinov2_triton.export.registry import SkipVariant, get_variant
    from dinov2_triton.export.repository import StagedVersion
    from dinov2_triton.export.serving_models import error_tail, labels_bytes
    from dinov2_triton.export.triton_config import classifier_config, validate_config
    from dinov2_triton.export.verify import headline, verify_variant

    variant = get_variant(name)
    entry: dict[str, Any] = {**variant.describe(), "status": None, "reason": None, "published": False,
                             "version": None, "requested": name in manifest.requested_variants}
    done = manifest.variants

    def finish(status: str, reason: str | None = None) -> VariantEntry:
        entry["status"], entry["reason"] = status, reason
        level = logging.INFO if status == "OK" else logging.WARNING
        log.log(level, "%-12s %s%s", name, status, f": {reason}" if reason else "")
        return VariantEntry.model_validate(entry)

    if variant.parent is not None:
        p = done.get(variant.parent)
        if p is None or not p.published:
            why = (f"parent {variant.parent} was not built in this run" if p is None
                   else f"parent {variant.parent} {p.status}: {p.reason or 'not published'}")
            return finish("SKIPPED", why)
    log.info("%-12s building (%s, %s)...", name, variant.platform, variant.precision)
    n_calib_before = len(ctx.calibration_files)
    with StagedVersion(repository, variant.model_name) as staged:
        artifact = staged.path / variant.filename
        t = time.perf_counter()
        try:
            info = variant.build(ctx, artifact) or {}
        except SkipVariant as exc:
            return finish("SKIPPED", str(exc))
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not stop the others
            entry["error"] = error_tail(exc)
            return finish("FAILED", f"build failed: {type(exc).__name__}: {exc}")
        entry["build_seconds"] = round(time.perf_counter() - t, 3)
        entry["build_info"] = info
        if len(ctx.calibration_files) > n_calib_before:
            used = ctx.calibration_files[n_calib_before:]
            entry["calibration_files"] = {"n": len(used), "splits": sorted(ctx.calibration_splits)}
        if not artifact.is_file():
            return finish("FAILED", f"build returned without writing {variant.filename}")
        files = [f for f in staged.path.rglob("*") if f.is_file()]
        entry["size_bytes"] = sum(f.stat().st_size for f in files)
        entry["files"] = sorted(str(f.relative_to(staged.path)) for f in files)
        entry["sha256"] = sha256_file(artifact)

        try:
            runner = variant.load_runner(artifact)
        except SkipVariant as exc:
            return finish("SKIPPED", f"built, but it cannot run on this host to be verified ({exc}); "
                                     f"not published unverified")
        except Exception as exc:  # noqa: BLE001
            entry["error"] = error_tail(exc)
            return finish("FAILED", f"built, but loading it failed: {type(exc).__name__}: {exc}")
        try:
            verification = verify_variant(ctx, variant, runner, gates=gates)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = error_tail(exc)
            return finish("FAILED", f"verification could not run: {type(exc).__name__}: {exc}")
        entry["verification"] = verification
        entry["headline"] = headline(verification)
        entry["gate"] = verification["gate"]["name"]
        entry["gate_passed"] = verification["passed"]
        entry["gate_failures"] = verification["failures"]
        entry["arithmetic"] = _arithmetic(variant, runner, artifact,
                                          ctx.eval_set().pixel_values[:opts["max_batch_size"]])
        if not verification["passed"]:
            for f in verification["failures"]:
                log.warning("%-12s gate %s: %s", name, variant.gate, f)
            if not opts["allow_failed_gates"]:
                return finish("GATE_FAILED", "failed its accuracy gate, not published: "
                                             + "; ".join(verification["failures"]))

        t = time.perf_counter()
        bench = benchmark_runner(runner, ctx.eval_set().pixel_values, seconds=opts["bench_seconds"])
        entry["benchmark_seconds"] = round(time.perf_counter() - t, 3)
        entry["benchmark"] = bench
        if variant.parent is not None:
            parent_bench, base_name = done[variant.parent].benchmark, variant.parent
        else:
            parent_bench, base_name = baseline, "eager pytorch"
        speed = compare(bench, parent_bench, baseline_name=base_name)
        entry["speed"] = speed
        entry["slower_than_parent"] = bool(speed and speed["slower_than_parent"])
        if entry["slower_than_parent"]:
            log.warning("%-12s is SLOWER than %s on this host: %s", name, base_name, speed["detail"])
        del runner

        device = "gpu" if variant.platform == "tensorrt_plan" else opts["device"]  # TensorRT needs a GPU
        config = classifier_config(
            variant, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim,
            max_batch_size=opts["max_batch_size"], instances=opts["instances"], device=device,
            preferred_batch_sizes=opts["preferred_batch_sizes"], max_queue_delay_us=opts["max_queue_delay_us"],
            max_queue_size=opts["max_queue_size"], queue_timeout_ms=opts["queue_timeout_ms"],
            parameters={"source_checkpoint_sha256": ckpt_sha, "export_run_id": run_id,
                        "image_size": ctx.image_size,
                        # build-time facts, e.g. TensorRT version / GPU / compute capability
                        **(info.get("config_parameters") or {})})
        # A TensorRT plan runs only on the GPU architecture it was built for:
        # instances go on those GPUs only (build info "instance_gpus").
        for group in config.instance_group:
            group.gpus.extend(int(g) for g in info.get("instance_gpus") or ())
        text = validate_config(config)
        target = staged.publish(config_text=text, files={"labels.txt": labels_bytes(ctx.class_names)},
                                keep=opts["keep_versions"])
    entry["published"] = True
    entry["version"] = staged.version
    entry["path"] = str(target)
    ctx.artifacts[name] = target / variant.filename
    log.info("%-12s published %s version %d", name, variant.model_name, staged.version)
    if verification["passed"]:
        return finish("OK")
    return finish("GATE_FAILED", "failed its accuracy gate; published anyway (--allow-failed-gates): "
                                 + "; ".join(verification["failures"]))


def _arithmetic(variant, runner, artifact: Path, sample) -> dict[str, Any] | None:
    """What the variant's layers compute in, on which unit (manifest
    ``arithmetic``); None, with a warning, where the engine cannot be read."""
    from dinov2_triton.export.arithmetic import describe_arithmetic

    try:
        info = describe_arithmetic(variant, runner, artifact, sample)
    except Exception as exc:  # noqa: BLE001 - informative only: never fails a variant
        log.warning("%-12s arithmetic not read: %s: %s", variant.name, type(exc).__name__, exc)
        return None
    log.info("%-12s runs %s on %s (%s)", variant.name, info["arithmetic"], info["unit"], info["source"])
    return info


def exit_code(manifest) -> int:
    """0: every variant OK or SKIPPED with a reason (or GATE_FAILED accepted
    with --allow-failed-gates); 1: a variant FAILED or failed its gate, or the
    preprocess/ensemble models failed."""
    allow = bool(manifest.options.get("allow_failed_gates"))
    for v in manifest.variants.values():
        if v.status == "FAILED":
            return 1
        if v.status == "GATE_FAILED" and not allow:
            return 1
        if v.status == "SKIPPED" and not v.reason:
            return 1
    for entry in (manifest.preprocess, manifest.ensemble):
        if entry is not None and entry.status == "FAILED":
            return 1
    return 0
