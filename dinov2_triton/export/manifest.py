"""export_manifest.json: what one export run produced, from what, with which
versions, and the numbers that justify each published variant.

:class:`ExportManifest` is the one record of this file (fields below); it has
one writer, :func:`write_export_manifest` (called by dinov2_triton.export.pipeline after
every run, also when variants failed) and one reader,
:func:`read_export_manifest`, used by every stage that reads the file
(dinov2_triton.pipeline.bench_stage, dinov2_triton.pipeline.production_benchmarking, the clients). A missing field, a
wrong type or an unknown ``schema_version`` fails with one line naming the
file and the field. Files written before ``schema_version`` existed
(``format_version: 1``, same fields) are read as schema 1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from dinov2_triton.core.records import Record, RecordError

MANIFEST_FILE = "export_manifest.json"
STATUSES = ("OK", "FAILED", "SKIPPED", "GATE_FAILED")
Status = Literal["OK", "FAILED", "SKIPPED", "GATE_FAILED"]


class _Part(BaseModel):
    """A typed part of the manifest (unknown fields are errors, as in Record)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SourceCheckpoint(_Part):
    path: str
    sha256: str
    size_bytes: int


class EvalSetInfo(_Part):
    split: str                   # "test", "val" or "random"
    n: int
    synthetic: bool
    labelled: bool
    notes: list[str] = []


class CalibrationUse(_Part):
    n: int
    splits: list[str]


class CalibrationSummary(_Part):
    n_files: int
    splits: list[str]
    files_sample: list[str]


class Baseline(_Part):
    name: str
    benchmark: dict[str, Any] | None = None   # dinov2_triton.export.benchmark.benchmark_runner output


class Headline(_Part):
    """The few numbers a summary row shows: worst case over batch sizes."""
    top1_agreement: float | None = None
    embedding_cosine_min: float | None = None
    logits_max_abs_diff: float | None = None
    accuracy_drop: float | None = None
    accuracy: float | None = None


class Verification(_Part):
    """dinov2_triton.export.verify.verify_variant output."""
    passed: bool
    failures: list[str]
    gate: dict[str, Any]                       # dinov2_triton.export.gates.Gate.to_dict()
    eval_set: EvalSetInfo
    batch_sizes: dict[str, dict[str, Any]]     # "1", "<max>" -> dinov2_triton.train.metrics.parity_metrics
    batch_consistency: dict[str, Any] | None = None
    seconds: float


class Arithmetic(_Part):
    """What a variant's matrix multiplies and convolutions actually compute
    in, and on which unit (dinov2_triton.export.arithmetic.describe_arithmetic):
    read from the engine where it can tell (OpenVINO's compiled runtime
    model, ONNX Runtime's profile of one batch), from the CPU flags otherwise."""
    arithmetic: str                            # FP32 | BF16 | FP16 | INT8 | FP8 (the largest share)
    unit: str                                  # AMX | VNNI | AVX-512 | AVX2 | SSE | GPU
    instructions: list[str] = []               # the CPU flags that give that unit (avx512_vnni, amx_bf16 ...)
    shares: dict[str, float] = {}              # arithmetic -> fraction of the matmul/convolution layers
    kernels: list[str] = []                    # the engine's kernel names for them (OpenVINO primitive types)
    source: str                                # how it was found
    note: str | None = None

    def label(self) -> str:
        """e.g. "INT8 on VNNI (INT8 67%, FP32 33%)"."""
        mix = ", ".join(f"{k} {v:.0%}" for k, v in sorted(self.shares.items(), key=lambda kv: -kv[1]))
        return f"{self.arithmetic} on {self.unit}" + (f" ({mix})" if len(self.shares) > 1 else "")


class VariantEntry(_Part):
    """One requested (or parent) variant: what happened to it and why."""
    # static facts (registry.Variant.describe)
    name: str
    model_name: str
    platform: str
    filename: str
    precision: str
    parent: str | None = None
    gate: str                                  # the gate's name (with "+overrides" when overridden)
    description: str = ""
    # outcome
    status: Status
    reason: str | None = None                  # why it was SKIPPED / FAILED / GATE_FAILED
    published: bool = False
    version: int | None = None
    path: str | None = None                    # the published version folder
    requested: bool
    error: str | None = None                   # traceback tail of a FAILED step
    # build
    build_seconds: float | None = None
    build_info: dict[str, Any] | None = None   # what the builder reports (tool versions, search, ...)
    calibration_files: CalibrationUse | None = None
    size_bytes: int | None = None
    files: list[str] | None = None
    sha256: str | None = None
    # verification and gate
    verification: Verification | None = None
    headline: Headline | None = None
    gate_passed: bool | None = None
    gate_failures: list[str] = []
    # speed
    benchmark_seconds: float | None = None
    benchmark: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None        # dinov2_triton.export.benchmark.compare vs the parent
    slower_than_parent: bool | None = None
    # what it computes in, on which unit (None in manifests written before the field)
    arithmetic: Arithmetic | None = None


class ServingModelEntry(_Part):
    """dinov2_preprocess or the dinov2 ensemble."""
    status: Status
    reason: str | None = None
    error: str | None = None
    model_name: str | None = None
    version: int | None = None
    path: str | None = None
    self_check: dict[str, Any] | None = None   # preprocess: the staged copy reproduced the reference
    classifier: str | None = None              # ensemble: the classifier model it calls
    classifier_reason: str | None = None
    #: ensemble: how the classifier was chosen (dinov2_triton.export.auto.CHOSEN_FASTEST, "--default-variant",
    #: "registry preference") and, for auto, every gated variant it was chosen from, fastest first
    classifier_choice: str | None = None
    classifier_ranking: list[dict[str, Any]] = []


class ExportManifest(Record):
    SCHEMA_VERSION = 1
    KIND = "export manifest"
    REGENERATE = "dinov2-triton export --model-path <checkpoint> --repository <repository>"

    tool: Literal["export"] = "export"
    run_id: str
    created: str
    finished: str | None = None
    repository: str
    source_checkpoint: SourceCheckpoint
    weights_source: str | None = None
    pretrained: bool | None = None             # the checkpoint's; None in files written before the field
    arch: str | None = None
    img_size: int
    num_classes: int
    embed_dim: int
    class_names: list[str]
    preprocessing: dict[str, Any]              # dinov2_triton.core.preprocessing.PreprocessConfig.to_dict()
    checkpoint_metrics: dict[str, Any] = {}
    checkpoint_git_revision: str | None = None
    versions: dict[str, str]
    git_revision: str
    options: dict[str, Any]                    # every resolved run_export option
    requested_variants: list[str]
    added_as_parents: list[str] = []
    data_path: str | None = None
    eval_set: EvalSetInfo
    reference: dict[str, Any] | None = None    # eager FP32 metrics on the eval set (labelled sets)
    baseline: Baseline
    variants: dict[str, VariantEntry] = {}
    preprocess: ServingModelEntry | None = None
    ensemble: ServingModelEntry | None = None
    calibration: CalibrationSummary | None = None
    warnings: list[str] = []
    timings: dict[str, float] = {}
    exit_code: int | None = None               # the CLI's exit code (set when the run finishes)

    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        # Before schema_version the same fields carried "format_version": 1.
        if version == 0 and data.get("format_version") == 1:
            data = {k: v for k, v in data.items() if k != "format_version"}
            data["schema_version"] = 1
            return data
        raise RecordError(f"schema_version {version} (format_version {data.get('format_version')!r}) "
                          f"is not an export manifest this code reads")

    @field_validator("preprocessing")
    @classmethod
    def _preprocessing_record(cls, value: dict[str, Any]) -> dict[str, Any]:
        from dinov2_triton.core.preprocessing import PreprocessConfig

        try:
            PreprocessConfig.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a preprocessing record ({exc})") from None
        return value

    @model_validator(mode="after")
    def _one_image_size(self) -> "ExportManifest":
        if self.preprocessing.get("image_size") != self.img_size:
            raise ValueError(f"img_size {self.img_size} differs from preprocessing.image_size "
                             f"{self.preprocessing.get('image_size')}")
        return self

    def preprocess_config(self):
        """The stored preprocessing record as a dinov2_triton.core.preprocessing.PreprocessConfig."""
        from dinov2_triton.core.preprocessing import PreprocessConfig

        return PreprocessConfig.from_dict(self.preprocessing)

    def published(self) -> dict[str, VariantEntry]:
        return {n: v for n, v in self.variants.items() if v.published}


def manifest_path(path_or_repository: str | os.PathLike) -> Path:
    """<repository>/export_manifest.json for a folder, else the path itself."""
    path = Path(path_or_repository)
    return path / MANIFEST_FILE if path.is_dir() else path


def read_export_manifest(path_or_repository: str | os.PathLike, *, missing_ok: bool = False
                         ) -> ExportManifest | None:
    """The export manifest of a repository (or at a file path), validated.
    Raises FileNotFoundError (None with missing_ok) or RecordError, each
    naming the file."""
    from dinov2_triton.core.artifact_io import read_json

    path = manifest_path(path_or_repository)
    if missing_ok and not path.is_file():
        return None
    data = read_json(path, what="export manifest (run dinov2-triton export first)")
    return ExportManifest.from_dict(data, source=path)


def write_export_manifest(manifest: ExportManifest, path: str | os.PathLike) -> Path:
    """Write atomically (strict JSON; NaN/inf as strings); returns the path."""
    from dinov2_triton.core.artifact_io import atomic_write_json

    return atomic_write_json(manifest_path(path), manifest.to_dict())


# ----------------------------------------------------------------------------- summary table
def summary_rows(manifest: ExportManifest) -> list[dict[str, str]]:
    """One row per variant (plus the eager baseline) for the printed table."""
    rows = []
    eager = manifest.baseline.benchmark
    if eager:
        acc = (manifest.reference or {}).get("accuracy")
        rows.append({"variant": "eager (pytorch)", "status": "baseline", "model": "-", "version": "-",
                     "size_mb": "-", "top1": "100%", "cos": "1", "acc": _num(acc, ".3f"),
                     "lat": f"{eager['batch1']['median_ms']:.2f}", "thr": _thr(eager), "secs": "-",
                     "arith": "FP32", "note": ""})
    for name, v in manifest.variants.items():
        h = v.headline or Headline()
        bench = v.benchmark
        notes = []
        if v.status in ("SKIPPED", "FAILED"):
            notes.append(v.reason or "")
        if v.status == "GATE_FAILED":
            notes.append("; ".join(v.gate_failures)[:160])
            notes.append("published anyway (--allow-failed-gates)" if v.published else "not published")
        if (v.speed or {}).get("slower_than_parent"):
            notes.append("SLOWER than " + v.speed["baseline"])
        secs = "-"
        if v.build_seconds is not None:
            secs = "/".join(_num(x, ".1f") for x in (
                v.build_seconds, v.verification.seconds if v.verification else None, v.benchmark_seconds))
        rows.append({
            "variant": name, "status": v.status, "model": v.model_name, "version": str(v.version or "-"),
            "size_mb": f"{v.size_bytes / 1e6:.1f}" if v.size_bytes else "-",
            "top1": _num(h.top1_agreement, ".2%"), "cos": _num(h.embedding_cosine_min, ".6f"),
            "acc": _num(h.accuracy, ".3f"),
            "lat": f"{bench['batch1']['median_ms']:.2f}" if bench else "-",
            "thr": _thr(bench) if bench else "-", "secs": secs,
            "arith": v.arithmetic.label() if v.arithmetic else "-",
            "note": " | ".join(n for n in notes if n),
        })
    return rows


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _thr(bench: Mapping[str, Any]) -> str:
    return f"{bench['batch' + str(bench['throughput_batch'])]['img_per_s']:.1f}"


COLUMNS = [("variant", "variant"), ("status", "status"), ("version", "ver"), ("size_mb", "MB"),
           ("arith", "arithmetic"), ("top1", "top-1 agree"), ("cos", "emb cos min"), ("acc", "accuracy"),
           ("lat", "b1 ms (p50)"), ("thr", "b8 img/s"),
           ("secs", "build/verify/bench s"), ("note", "note")]


def format_summary(manifest: ExportManifest, *, rich: bool | None = None) -> str:
    """The summary table as text (rich when available and asked for)."""
    rows = summary_rows(manifest)
    title = (f"export {manifest.run_id}: {manifest.repository} "
             f"(eval: {manifest.eval_set.split}, n={manifest.eval_set.n})")
    if rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title, show_lines=False)
            for _, head in COLUMNS:
                table.add_column(head, overflow="fold", max_width=60 if head == "note" else None)
            for r in rows:
                table.add_row(*[str(r[k]) for k, _ in COLUMNS])
            console = Console(record=True, width=160)
            with console.capture() as cap:
                console.print(table)
            return cap.get()
        except ImportError:
            if rich:
                raise
    widths = {k: max(len(h), *(len(str(r[k])) for r in rows)) if rows else len(h) for k, h in COLUMNS}
    lines = [title, "  ".join(h.ljust(widths[k]) for k, h in COLUMNS)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k, _ in COLUMNS) for r in rows]
    return "\n".join(lines)
