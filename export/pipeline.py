"""run_export: checkpoint -> verified, measured variants -> Triton repository.

For every requested variant, in registry order (parents first):
build into a staging version folder -> load an in-process runner -> verify
against eager FP32 at batch 1 and max_batch_size on held-out images -> gate
-> benchmark -> config.pbtxt -> atomic publish as the next version. Then the
`dinov2_preprocess` Python model and the `dinov2` ensemble are published, and
export_manifest.json records everything (also the failures, with reasons)."""
from __future__ import annotations

import gc
import logging
import os
import secrets
import shutil
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("torchscript", "onnx")
DEFAULT_OPTIONS: dict[str, Any] = {
    "max_batch_size": 8,
    "opset": 18,
    "instances": 1,
    "device": "cpu",
    "preferred_batch_sizes": (4, 8),
    "max_queue_delay_us": 2000,
    "thresholds": (),
    "allow_failed_gates": False,
    "default_variant": "onnx",
    "bench_seconds": 4.0,
    "keep_versions": 2,
    "eval_size": 256,
    "calib_size": 512,          # capped at the train split's size
    "calib_method": "entropy",  # beat "max" on ViT activations in our measurements
    "accuracy_budget": 0.01,
    "onnx_exporter": "dynamo",
    "preprocess_instances": 1,
    "log_dir": None,
    "work_dir": None,
    "keep_work_dir": False,
}
# Published variants the ensemble may fall back to, best first, when the
# --default-variant was not published by this run.
ENSEMBLE_FALLBACK = ("onnx", "torchscript")


class ExportInputError(ValueError):
    """Bad input (checkpoint, data folder, flags): nothing was built; CLI exit 2."""


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def resolve_variants(requested: Iterable[str] | str) -> tuple[list[str], list[str]]:
    """Requested names (or "all") -> (build order, parents added for them)."""
    from export.registry import REGISTRY, load_builtin_variants

    load_builtin_variants()
    if isinstance(requested, str):
        requested = [v for v in requested.replace(" ", "").split(",") if v]
    requested = list(requested)
    if not requested:
        raise ExportInputError("--variants: give at least one variant")
    if requested == ["all"] or "all" in requested:
        return list(REGISTRY), []
    unknown = [v for v in requested if v not in REGISTRY]
    if unknown:
        raise ExportInputError(f"--variants: unknown {unknown}; choose from {list(REGISTRY)} or 'all'")
    wanted = set(requested)
    added = []
    for name in list(requested):
        parent = REGISTRY[name].parent
        while parent is not None and parent not in wanted:
            wanted.add(parent)
            added.append(parent)
            parent = REGISTRY[parent].parent
    return [n for n in REGISTRY if n in wanted], added


def _int_list(value, flag: str) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ExportInputError(f"{flag} {value!r}: expected integers such as 4,8") from None


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(DEFAULT_OPTIONS)
    opts = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None or k in ("log_dir", "work_dir")}}
    # Unknown keys are variant options (e.g. trt_workspace_gb): kept, passed on.
    for k in unknown:
        opts[k] = options[k]
    checks = [
        (int(opts["max_batch_size"]) >= 1, f"--max-batch-size {opts['max_batch_size']}: must be >= 1"),
        (int(opts["opset"]) >= 17, f"--opset {opts['opset']}: must be >= 17 (LayerNormalization)"),
        (int(opts["instances"]) >= 1, f"--instances {opts['instances']}: must be >= 1"),
        (int(opts["preprocess_instances"]) >= 1, f"--preprocess-instances {opts['preprocess_instances']}: must be >= 1"),
        (opts["device"] in ("cpu", "gpu"), f"--device {opts['device']!r}: choose cpu or gpu"),
        (int(opts["max_queue_delay_us"]) >= 0, f"--max-queue-delay-us {opts['max_queue_delay_us']}: must be >= 0"),
        (int(opts["keep_versions"]) >= 1, f"--keep-versions {opts['keep_versions']}: must be >= 1"),
        (float(opts["bench_seconds"]) >= 0, f"--bench-seconds {opts['bench_seconds']}: must be >= 0 (0 disables)"),
        (int(opts["eval_size"]) >= 1, f"--eval-size {opts['eval_size']}: must be >= 1"),
        (int(opts["calib_size"]) >= 1, f"--calib-size {opts['calib_size']}: must be >= 1"),
        (opts["onnx_exporter"] in ("dynamo", "legacy"), f"--onnx-exporter {opts['onnx_exporter']!r}: choose dynamo or legacy"),
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
    th = opts["thresholds"]
    opts["thresholds"] = [th] if isinstance(th, str) else list(th or ())
    return opts


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
def run_export(model_path: str | os.PathLike, repository: str | os.PathLike, *,
               data_path: str | os.PathLike | None = None,
               variants: Sequence[str] | str = DEFAULT_VARIANTS, **options: Any) -> dict[str, Any]:
    """Export `model_path` into `repository`; returns the manifest (also
    written to <repository>/export_manifest.json). Raises ExportInputError for
    bad input before anything is built. Options: see DEFAULT_OPTIONS (unknown
    keys are passed to the variant builders through ExportContext.options)."""
    from export.registry import REGISTRY
    from export.repository import RepositoryError, RepositoryLock, clean_stale_staging
    from export.verify import ThresholdError, parse_thresholds
    from train.checkpoint import git_revision, library_versions
    from train.model import WeightsError, load_classifier

    t_start = time.perf_counter()
    opts = validate_options(options)
    order, added = resolve_variants(variants)
    if opts["default_variant"] not in REGISTRY:
        raise ExportInputError(f"--default-variant {opts['default_variant']!r}: choose from {list(REGISTRY)}")
    try:
        thresholds = parse_thresholds(opts["thresholds"], scopes=set(REGISTRY) | _gate_names())
    except ThresholdError as exc:
        raise ExportInputError(str(exc)) from None
    # --accuracy-budget is the INT8/FP8 gate's allowed accuracy drop unless
    # --thresholds sets it explicitly; the mixed-precision search aims at it.
    if opts["accuracy_budget"] is not None:
        if float(opts["accuracy_budget"]) < 0:
            raise ExportInputError(f"--accuracy-budget {opts['accuracy_budget']}: must be >= 0 (0.01 = 1 point)")
        from train.metrics import GATES

        for gate_name in ("int8", "fp8"):
            if float(opts["accuracy_budget"]) != GATES[gate_name].max_accuracy_drop:
                thresholds.setdefault(gate_name, {}).setdefault("max_accuracy_drop", float(opts["accuracy_budget"]))
    model_path = Path(model_path)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportInputError(f"--repository {repository}: exists and is not a folder")
    if data_path is not None:
        data_path = Path(data_path)
        if not data_path.is_dir():
            raise ExportInputError(f"--data_path {data_path}: not a folder (prepare it with "
                                   f"python -m train.load_data --data_path {data_path})")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    try:
        model, record = load_classifier(model_path)
    except WeightsError as exc:
        raise ExportInputError(f"--model_path: {exc}") from None
    timings["load_checkpoint_s"] = time.perf_counter() - t

    repository.mkdir(parents=True, exist_ok=True)
    try:
        lock = RepositoryLock(repository).__enter__()
    except RepositoryError as exc:
        raise ExportInputError(str(exc)) from None
    work_dir = Path(opts["work_dir"]) if opts["work_dir"] else Path(tempfile.mkdtemp(prefix="dinov2-export-"))
    try:
        clean_stale_staging(repository)
        return _run(model, record, model_path, repository, data_path, order, added, opts, thresholds,
                    work_dir, timings, t_start, library_versions(), git_revision())
    finally:
        lock.__exit__(None, None, None)
        if not opts["keep_work_dir"] and not opts["work_dir"]:
            shutil.rmtree(work_dir, ignore_errors=True)


def _gate_names() -> set[str]:
    from train.metrics import GATES

    return set(GATES)


def _run(model, record, model_path: Path, repository: Path, data_path, order, added, opts, thresholds,
         work_dir: Path, timings, t_start, versions, git_rev) -> dict[str, Any]:
    from export.benchmark import benchmark_runner
    from export.context import DataUnavailable, ExportContext, eager_runner
    from export.manifest import MANIFEST_FILE, write_manifest
    from train.checksums import sha256_file
    from train.datasets import ManifestError
    from train.metrics import classification_metrics

    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
    ckpt_sha = sha256_file(model_path)
    ctx = ExportContext(model, record, data_path=data_path, work_dir=work_dir, options=opts)
    warnings: list[str] = []

    t = time.perf_counter()
    try:
        es = ctx.eval_set()
    except (ManifestError, DataUnavailable) as exc:
        raise ExportInputError(f"--data_path: {exc}") from None
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

    manifest: dict[str, Any] = {
        "format_version": 1,
        "tool": "export",
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "repository": str(repository.resolve()),
        "source_checkpoint": {"path": str(model_path.resolve()), "sha256": ckpt_sha,
                              "size_bytes": model_path.stat().st_size},
        "weights_source": record.get("weights_source"),
        "arch": record.get("arch"),
        "img_size": ctx.image_size,
        "num_classes": ctx.num_classes,
        "embed_dim": ctx.embed_dim,
        "class_names": ctx.class_names,
        "preprocessing": ctx.preprocessing.to_dict(),
        "checkpoint_metrics": record.get("metrics") or {},
        "checkpoint_git_revision": record.get("git_revision"),
        "versions": versions,
        "git_revision": git_rev,
        "options": {k: v for k, v in opts.items()},
        "requested_variants": [v for v in order if v not in added],
        "added_as_parents": list(added),
        "data_path": str(data_path.resolve()) if data_path else None,
        "eval_set": es.describe(),
        "reference": reference,
        "baseline": {"name": "eager pytorch fp32", "benchmark": baseline},
        "variants": {},
        "preprocess": None,
        "ensemble": None,
        "calibration": None,
        "warnings": warnings,
        "timings": timings,
    }
    for name in order:
        manifest["variants"][name] = _export_variant(ctx, name, repository, opts, thresholds, manifest,
                                                     ckpt_sha, run_id, baseline)
        gc.collect()

    t = time.perf_counter()
    manifest["preprocess"], manifest["ensemble"] = _publish_serving_models(ctx, repository, opts, manifest,
                                                                          ckpt_sha, run_id)
    timings["preprocess_ensemble_s"] = time.perf_counter() - t
    if ctx.calibration_files:
        manifest["calibration"] = {"n_files": len(ctx.calibration_files), "splits": sorted(ctx.calibration_splits),
                                   "files_sample": ctx.calibration_files[:20]}
    manifest["exit_code"] = exit_code(manifest)
    manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    timings["total_s"] = time.perf_counter() - t_start
    manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_manifest(manifest, repository / MANIFEST_FILE)
    if opts.get("log_dir"):
        write_manifest(manifest, Path(opts["log_dir"]) / f"export_manifest-{run_id}.json")
    return manifest


def _tail(exc: BaseException, lines: int = 6) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-lines:])


def _export_variant(ctx, name: str, repository: Path, opts, thresholds, manifest, ckpt_sha: str,
                    run_id: str, baseline) -> dict[str, Any]:
    from export.benchmark import benchmark_runner, compare
    from train.checksums import sha256_file
    from export.registry import REGISTRY, SkipVariant, describe
    from export.repository import StagedVersion
    from export.triton_config import classifier_config, validate_config
    from export.verify import headline, verify_variant

    variant = REGISTRY[name]
    entry: dict[str, Any] = {**describe(variant), "status": None, "reason": None, "published": False,
                             "version": None, "requested": name in manifest["requested_variants"]}
    done = manifest["variants"]

    def finish(status: str, reason: str | None = None) -> dict[str, Any]:
        entry["status"], entry["reason"] = status, reason
        level = logging.INFO if status == "OK" else logging.WARNING
        log.log(level, "%-12s %s%s", name, status, f": {reason}" if reason else "")
        return entry

    if variant.parent is not None:
        p = done.get(variant.parent)
        if p is None or not p.get("published"):
            why = (f"parent {variant.parent} was not built in this run" if p is None
                   else f"parent {variant.parent} {p['status']}: {p.get('reason') or 'not published'}")
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
            entry["error"] = _tail(exc)
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
            entry["error"] = _tail(exc)
            return finish("FAILED", f"built, but loading it failed: {type(exc).__name__}: {exc}")
        try:
            verification = verify_variant(ctx, variant, runner, thresholds=thresholds)
        except Exception as exc:  # noqa: BLE001
            entry["error"] = _tail(exc)
            return finish("FAILED", f"verification could not run: {type(exc).__name__}: {exc}")
        entry["verification"] = verification
        entry["headline"] = headline(verification)
        entry["gate"] = verification["gate"]["name"]
        entry["gate_passed"] = verification["passed"]
        entry["gate_failures"] = verification["failures"]
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
            parent_bench, base_name = done[variant.parent].get("benchmark"), variant.parent
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
            parameters={"source_checkpoint_sha256": ckpt_sha, "export_run_id": run_id,
                        "image_size": ctx.image_size,
                        # build-time facts, e.g. TensorRT version / GPU / compute capability
                        **(info.get("config_parameters") or {})})
        text = validate_config(config)
        target = staged.publish(config_text=text, files={"labels.txt": _labels_bytes(ctx)},
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


def _labels_bytes(ctx) -> bytes:
    return ("\n".join(ctx.class_names) + "\n").encode("utf-8")


def sample_png(size: int) -> bytes:
    """A deterministic RGB test image (for warm-up and the preprocess self-check)."""
    import io

    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size + 20, 0:size + 36]
    rgb = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _publish_serving_models(ctx, repository: Path, opts, manifest, ckpt_sha: str, run_id: str):
    """dinov2_preprocess (Python backend) and the dinov2 ensemble."""
    published = [n for n, v in manifest["variants"].items() if v.get("published")]
    default = opts["default_variant"]
    if default in published:
        classifier, why = default, f"--default-variant {default}"
    else:
        classifier = next((n for n in ENSEMBLE_FALLBACK if n in published), published[0] if published else None)
        why = (f"--default-variant {default} was not published by this run; using {classifier}"
               if classifier else None)
        if classifier:
            log.warning("ensemble: %s", why)
            manifest["warnings"].append(f"ensemble: {why}")
    if classifier is None:
        reason = "no classifier variant was published by this run; the previous ensemble (if any) is unchanged"
        log.warning("ensemble/preprocess: %s", reason)
        return ({"status": "SKIPPED", "reason": reason}, {"status": "SKIPPED", "reason": reason})
    try:
        pre = _publish_preprocess(ctx, repository, opts, ckpt_sha, run_id)
    except Exception as exc:  # noqa: BLE001
        pre = {"status": "FAILED", "reason": f"{type(exc).__name__}: {exc}", "error": _tail(exc)}
        log.error("dinov2_preprocess FAILED: %s", pre["reason"])
        return pre, {"status": "SKIPPED", "reason": "dinov2_preprocess was not published"}
    try:
        ens = _publish_ensemble(ctx, repository, opts, classifier, ckpt_sha, run_id)
        ens["classifier_reason"] = why
    except Exception as exc:  # noqa: BLE001
        ens = {"status": "FAILED", "reason": f"{type(exc).__name__}: {exc}", "error": _tail(exc)}
        log.error("dinov2 ensemble FAILED: %s", ens["reason"])
    return pre, ens


def _publish_preprocess(ctx, repository: Path, opts, ckpt_sha: str, run_id: str) -> dict[str, Any]:
    import importlib.util
    import json
    import sys

    import numpy as np

    import train.images
    import train.preprocessing
    from export.repository import StagedVersion
    from export.triton_config import PREPROCESS_MODEL, WARMUP_IMAGE_FILE, preprocess_config, validate_config
    from train.preprocessing import preprocess_source

    template = Path(__file__).with_name("preprocess_model") / "model.py"
    sample = sample_png(ctx.image_size)
    with StagedVersion(repository, PREPROCESS_MODEL) as staged:
        shutil.copyfile(template, staged.path / "model.py")
        shutil.copyfile(train.images.__file__, staged.path / "dinov2_images.py")
        shutil.copyfile(train.preprocessing.__file__, staged.path / "dinov2_preprocessing.py")
        (staged.path / "preprocessing.json").write_text(
            json.dumps(ctx.preprocessing.to_dict(), indent=2) + "\n", encoding="utf-8")
        # Self-check of the staged, self-contained copy: it must reproduce the
        # project's reference preprocessing bit for bit.
        spec = importlib.util.spec_from_file_location(f"_staged_preprocess_{os.getpid()}", staged.path / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = mod.load_record(str(staged.path))
        samples = [sample]
        es = ctx.eval_set()
        if not es.synthetic and ctx.data_path is not None:
            samples.append((ctx.data_path / es.names[0]).read_bytes())
        got = mod.preprocess_images(np.array([[s] for s in samples], dtype=object), cfg)
        want = np.stack([preprocess_source(s, ctx.preprocessing) for s in samples])
        if got.shape != want.shape or not np.array_equal(got, want):
            raise RuntimeError("the staged preprocessing model does not reproduce train.preprocessing "
                               f"(max abs diff {np.abs(got - want).max() if got.shape == want.shape else got.shape})")
        for key in ("dinov2_images", "dinov2_preprocessing"):
            sys.modules.pop(key, None)   # the staged copies, imported by the self-check
        config = preprocess_config(image_size=ctx.image_size, max_batch_size=opts["max_batch_size"],
                                   instances=opts["preprocess_instances"],
                                   preferred_batch_sizes=opts["preferred_batch_sizes"],
                                   max_queue_delay_us=opts["max_queue_delay_us"],
                                   parameters={"source_checkpoint_sha256": ckpt_sha, "export_run_id": run_id})
        text = validate_config(config)
        warm = len(sample).to_bytes(4, "little") + sample   # TYPE_STRING element: 4-byte length + bytes
        target = staged.publish(config_text=text, files={f"warmup/{WARMUP_IMAGE_FILE}": warm},
                                keep=opts["keep_versions"])
    log.info("%-12s published %s version %d", "preprocess", PREPROCESS_MODEL, staged.version)
    return {"status": "OK", "model_name": PREPROCESS_MODEL, "version": staged.version, "path": str(target),
            "self_check": {"images": len(samples), "identical_to_reference": True}}


def _publish_ensemble(ctx, repository: Path, opts, classifier: str, ckpt_sha: str, run_id: str) -> dict[str, Any]:
    from export.registry import REGISTRY
    from export.repository import StagedVersion
    from export.triton_config import ENSEMBLE_MODEL, ensemble_config, validate_config

    model_name = REGISTRY[classifier].model_name
    with StagedVersion(repository, ENSEMBLE_MODEL) as staged:
        config = ensemble_config(model_name, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim,
                                 image_size=ctx.image_size, max_batch_size=opts["max_batch_size"],
                                 parameters={"source_checkpoint_sha256": ckpt_sha, "export_run_id": run_id})
        text = validate_config(config)
        # An ensemble's version folder is empty; Triton still requires it.
        target = staged.publish(config_text=text, files={"labels.txt": _labels_bytes(ctx)},
                                keep=opts["keep_versions"])
    log.info("%-12s published %s version %d -> %s", "ensemble", ENSEMBLE_MODEL, staged.version, model_name)
    return {"status": "OK", "model_name": ENSEMBLE_MODEL, "version": staged.version, "path": str(target),
            "classifier": model_name}


def exit_code(manifest: Mapping[str, Any]) -> int:
    """0: every variant OK or SKIPPED with a reason (or GATE_FAILED accepted
    with --allow-failed-gates); 1: a variant FAILED or failed its gate, or the
    preprocess/ensemble models failed."""
    allow = bool((manifest.get("options") or {}).get("allow_failed_gates"))
    for v in (manifest.get("variants") or {}).values():
        if v.get("status") == "FAILED":
            return 1
        if v.get("status") == "GATE_FAILED" and not allow:
            return 1
        if v.get("status") == "SKIPPED" and not v.get("reason"):
            return 1
    for key in ("preprocess", "ensemble"):
        if (manifest.get(key) or {}).get("status") == "FAILED":
            return 1
    return 0
