"""The two models around the classifiers: `dinov2_preprocess` (Triton Python
backend: encoded image bytes -> pixel_values, with a self-contained copy of
the project's preprocessing) and the `dinov2` ensemble (bytes ->
dinov2_preprocess -> one classifier variant). Published by dinov2_triton.export.pipeline
after the variants, each as a new atomic version."""
from __future__ import annotations

import logging
import os
import shutil
import traceback
from pathlib import Path
from typing import Any, Mapping

from dinov2_triton.core.resources import resource_path
from dinov2_triton.export.manifest import ServingModelEntry

log = logging.getLogger(__name__)


def error_tail(exc: BaseException, lines: int = 6) -> str:
    """The last lines of a traceback, for the manifest's `error` fields."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-lines:])


def labels_bytes(class_names) -> bytes:
    """labels.txt: class names in label-index order, one per line."""
    return ("\n".join(class_names) + "\n").encode("utf-8")


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


def choose_classifier(published: list[str], requested: str | None) -> tuple[str | None, str | None, bool]:
    """(variant the ensemble calls, why, whether that is a fallback the user
    should hear about). `requested` is --default-variant (None: the
    registry's preferred ensemble variant that was published)."""
    from dinov2_triton.export.registry import ensemble_candidates

    if requested is not None and requested in published:
        return requested, f"--default-variant {requested}", False
    preferred = [n for n in ensemble_candidates() if n in published] + published
    classifier = preferred[0] if preferred else None
    if classifier is None:
        return None, None, False
    if requested is not None:
        return classifier, (f"--default-variant {requested} was not published by this run; "
                            f"using {classifier}"), True
    return classifier, f"the preferred ensemble variant published by this run ({classifier})", False


def publish_serving_models(ctx, repository: Path, opts: Mapping[str, Any], manifest, ckpt_sha: str,
                           run_id: str) -> tuple[ServingModelEntry, ServingModelEntry]:
    """Publish dinov2_preprocess and the dinov2 ensemble; returns their manifest entries."""
    published = list(manifest.published())
    classifier, why, fallback = choose_classifier(published, opts["default_variant"])
    chosen_by, ranking = ("--default-variant" if opts["default_variant"] is not None else "registry preference"), []
    if opts.get("ensemble_choice") == "fastest" and opts["default_variant"] is None:
        from dinov2_triton.export.auto import CHOSEN_FASTEST, deployment_choice

        choice = deployment_choice(manifest)   # --variants auto: measured in this run, on this host
        if choice is not None:
            classifier, why, fallback = choice.variant, choice.why, False
            chosen_by, ranking = CHOSEN_FASTEST, choice.ranking
        else:
            why, fallback = (f"auto: no published variant passed its gate with a measured throughput "
                             f"(--bench-seconds 0?); using {classifier}"), True
    if fallback:
        log.warning("ensemble: %s", why)
        manifest.warnings.append(f"ensemble: {why}")
    if classifier is None:
        reason = "no classifier variant was published by this run; the previous ensemble (if any) is unchanged"
        log.warning("ensemble/preprocess: %s", reason)
        return (ServingModelEntry(status="SKIPPED", reason=reason),
                ServingModelEntry(status="SKIPPED", reason=reason))
    try:
        pre = publish_preprocess(ctx, repository, opts, ckpt_sha, run_id)
    except Exception as exc:  # noqa: BLE001 - reported in the manifest, the run goes on
        pre = ServingModelEntry(status="FAILED", reason=f"{type(exc).__name__}: {exc}", error=error_tail(exc))
        log.error("dinov2_preprocess FAILED: %s", pre.reason)
        return pre, ServingModelEntry(status="SKIPPED", reason="dinov2_preprocess was not published")
    try:
        ens = publish_ensemble(ctx, repository, opts, classifier, ckpt_sha, run_id)
        ens.classifier_reason, ens.classifier_choice, ens.classifier_ranking = why, chosen_by, ranking
    except Exception as exc:  # noqa: BLE001
        ens = ServingModelEntry(status="FAILED", reason=f"{type(exc).__name__}: {exc}", error=error_tail(exc))
        log.error("dinov2 ensemble FAILED: %s", ens.reason)
    return pre, ens


def publish_preprocess(ctx, repository: Path, opts: Mapping[str, Any], ckpt_sha: str,
                       run_id: str) -> ServingModelEntry:
    import importlib.util
    import sys

    import numpy as np

    import dinov2_triton.core.image_limits
    import dinov2_triton.core.images
    import dinov2_triton.core.preprocessing
    from dinov2_triton.core.artifact_io import dumps_json
    from dinov2_triton.core.preprocessing import preprocess_source
    from dinov2_triton.export.repository import StagedVersion
    from dinov2_triton.export.triton_config import (
        PREPROCESS_MODEL,
        WARMUP_IMAGE_FILE,
        preprocess_config,
        validate_config,
    )

    template = resource_path("dinov2_triton.serve", "preprocess_model", "model.py")
    sample = sample_png(ctx.image_size)
    with StagedVersion(repository, PREPROCESS_MODEL) as staged:
        shutil.copyfile(template, staged.path / "model.py")
        shutil.copyfile(dinov2_triton.core.images.__file__, staged.path / "dinov2_images.py")
        shutil.copyfile(dinov2_triton.core.preprocessing.__file__, staged.path / "dinov2_preprocessing.py")
        shutil.copyfile(dinov2_triton.core.image_limits.__file__, staged.path / "dinov2_image_limits.py")
        # inside the staging folder: the version's rename makes it appear atomically
        (staged.path / "preprocessing.json").write_text(dumps_json(ctx.preprocessing.to_dict()), encoding="utf-8")
        config = preprocess_config(image_size=ctx.image_size, max_batch_size=opts["max_batch_size"],
                                   instances=opts["preprocess_instances"],
                                   preferred_batch_sizes=opts["preferred_batch_sizes"],
                                   max_queue_delay_us=opts["max_queue_delay_us"],
                                   max_queue_size=opts["max_queue_size"],
                                   queue_timeout_ms=opts["queue_timeout_ms"],
                                   max_image_bytes=opts["max_image_bytes"],
                                   max_image_pixels=opts["max_image_pixels"],
                                   parameters={"source_checkpoint_sha256": ckpt_sha, "export_run_id": run_id})
        # Self-check of the staged, self-contained copy, under the limits of its
        # config: it must accept the warm-up image (or the model would not
        # load) and the held-out sample, and reproduce the project's
        # reference preprocessing bit for bit.
        spec = importlib.util.spec_from_file_location(f"_staged_preprocess_{os.getpid()}", staged.path / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = mod.load_record(str(staged.path))
        samples = [sample]
        es = ctx.eval_set()
        if not es.synthetic and ctx.data_path is not None:
            samples.append((ctx.data_path / es.names[0]).read_bytes())
        limits = mod.read_limits({"parameters": {k: {"string_value": v.string_value}
                                                 for k, v in config.parameters.items()}})
        try:
            got = mod.preprocess_images(np.array([[s] for s in samples], dtype=object), cfg, limits)
        except mod.ImageError as exc:
            raise RuntimeError(f"--max-image-bytes/--max-image-pixels refuse the warm-up or a held-out "
                               f"image: {exc}") from None
        want = np.stack([preprocess_source(s, ctx.preprocessing) for s in samples])
        if got.shape != want.shape or not np.array_equal(got, want):
            raise RuntimeError("the staged preprocessing model does not reproduce dinov2_triton.core.preprocessing "
                               f"(max abs diff {np.abs(got - want).max() if got.shape == want.shape else got.shape})")
        for key in ("dinov2_images", "dinov2_preprocessing", "dinov2_image_limits"):
            sys.modules.pop(key, None)   # the staged copies, imported by the self-check
        text = validate_config(config)
        warm = len(sample).to_bytes(4, "little") + sample   # TYPE_STRING element: 4-byte length + bytes
        target = staged.publish(config_text=text, files={f"warmup/{WARMUP_IMAGE_FILE}": warm},
                                keep=opts["keep_versions"])
    log.info("%-12s published %s version %d", "preprocess", PREPROCESS_MODEL, staged.version)
    return ServingModelEntry(status="OK", model_name=PREPROCESS_MODEL, version=staged.version, path=str(target),
                             self_check={"images": len(samples), "identical_to_reference": True})


def publish_ensemble(ctx, repository: Path, opts: Mapping[str, Any], classifier: str, ckpt_sha: str,
                     run_id: str) -> ServingModelEntry:
    from dinov2_triton.export.registry import model_name
    from dinov2_triton.export.repository import StagedVersion
    from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, ensemble_config, validate_config

    classifier_model = model_name(classifier)
    with StagedVersion(repository, ENSEMBLE_MODEL) as staged:
        config = ensemble_config(classifier_model, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim,
                                 image_size=ctx.image_size, max_batch_size=opts["max_batch_size"],
                                 parameters={"source_checkpoint_sha256": ckpt_sha, "export_run_id": run_id})
        text = validate_config(config)
        # An ensemble's version folder is empty; Triton still requires it.
        target = staged.publish(config_text=text, files={"labels.txt": labels_bytes(ctx.class_names)},
                                keep=opts["keep_versions"])
    log.info("%-12s published %s version %d -> %s", "ensemble", ENSEMBLE_MODEL, staged.version, classifier_model)
    return ServingModelEntry(status="OK", model_name=ENSEMBLE_MODEL, version=staged.version, path=str(target),
                             classifier=classifier_model)


class RepointError(ValueError):
    """The ensemble cannot be pointed at that variant (names the variant and why)."""


def repoint_ensemble(repository: str | os.PathLike, model: str, *, why: str, ranking: list[dict[str, Any]],
                     choice: str) -> ServingModelEntry:
    """Point the published `dinov2` ensemble at the classifier ``model`` (a
    published variant that passed its gate) as a new atomic version of the
    ensemble, and record it, ``why`` and the ``ranking`` it was chosen from in
    the export manifest's ensemble entry (written atomically after the
    version). Nothing else changes: the preprocessing model, the variants and
    their configs stay as they are. The caller reloads the ensemble on a
    running server. Raises RepointError naming the variant, or RepositoryError."""
    from dinov2_triton.export.manifest import read_export_manifest, write_export_manifest
    from dinov2_triton.export.repository import RepositoryLock, StagedVersion, version_dirs
    from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, PREPROCESS_MODEL, parse_config, validate_config

    repository = Path(repository)
    with RepositoryLock(repository):
        manifest = read_export_manifest(repository)
        variant = next((n for n, e in manifest.variants.items() if e.model_name == model), None)
        entry = manifest.variants.get(variant) if variant else None
        if entry is None:
            raise RepointError(f"{model}: not a variant of {repository / 'export_manifest.json'}")
        if not entry.published or entry.status != "OK" or entry.gate_passed is not True:
            raise RepointError(f"{model}: may not be deployed (status {entry.status}, published {entry.published}, "
                               f"gate passed {entry.gate_passed})")
        ens = manifest.ensemble
        if ens is None or ens.status != "OK":
            raise RepointError(f"{ENSEMBLE_MODEL}: not published by the export ({ens.reason if ens else 'no entry'})")
        if ens.classifier == model:
            ens.classifier_reason, ens.classifier_choice, ens.classifier_ranking = why, choice, list(ranking)
            write_export_manifest(manifest, repository)
            return ens
        model_dir = repository / ENSEMBLE_MODEL
        config = parse_config((model_dir / "config.pbtxt").read_text(encoding="utf-8"))
        steps = [s for s in config.ensemble_scheduling.step if s.model_name != PREPROCESS_MODEL]
        if len(steps) != 1:
            raise RepointError(f"{model_dir / 'config.pbtxt'}: expected {PREPROCESS_MODEL} and one classifier step, "
                               f"found {[s.model_name for s in config.ensemble_scheduling.step]}")
        steps[0].model_name = model
        config.parameters["classifier_model"].string_value = model
        text = validate_config(config)
        keep = max(2, len(version_dirs(model_dir)))
        with StagedVersion(repository, ENSEMBLE_MODEL) as staged:
            target = staged.publish(config_text=text, files={"labels.txt": (model_dir / "labels.txt").read_bytes()},
                                    keep=keep)
        log.info("%-12s published %s version %d -> %s (%s)", "ensemble", ENSEMBLE_MODEL, staged.version, model, why)
        manifest.ensemble = ens.model_copy(update={
            "version": staged.version, "path": str(target), "classifier": model, "classifier_reason": why,
            "classifier_choice": choice, "classifier_ranking": list(ranking)})
        write_export_manifest(manifest, repository)
        return manifest.ensemble
