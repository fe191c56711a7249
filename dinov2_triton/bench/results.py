"""``PerfResults``: the perf stage's ``results.json``, its one writer and its one reader.

    write_results(path, results)  -> path       (dinov2_triton.pipeline.bench_stage, dinov2_triton.report.report)
    read_results(path)            -> PerfResults (dinov2_triton.report.report --results, anyone else)

``dinov2_triton.pipeline.bench_stage`` fills the measured sections; ``dinov2_triton.report.report`` derives ``rows``
(one per variant) and the ``recommendation`` from them and writes the file
back with both. A missing field, a wrong type or an unknown
``schema_version`` fails with one line naming the file and the field
(:class:`dinov2_triton.core.records.RecordError`).

Two kinds of sections:

* :class:`Section`: what perf itself writes (machine, in-process benchmark,
  server memory, operating point, rows, recommendation): every field is
  declared, an unknown one is an error.
* :class:`Copied`: what perf copies from another module's output (the
  perf_analyzer CSV row and sweep, the live parity, the export manifest's
  verdicts): the fields perf reads are declared and typed, the rest is kept
  as written, so those modules can add detail without a schema change here.

Schema history: version 1 is the layout dinov2_triton.pipeline.bench_stage has written since its first
version (``model.pretrained`` included); version 2 adds the optional
``capacity`` (dinov2_triton.bench.capacity: capacity at a p99 SLO under open-loop load) and
``search`` (dinov2_triton.tune.search: the configuration search) sections and the
recommendation's capacity fields; version 3 adds the capacity rates'
``rechecked``/``mean_p99_ms`` and the settings' ``recheck_margin`` (a
marginal verdict measured again); version 4 measures a matrix multiply peak
per arithmetic (``in_process.matmul_peaks``: fp32, bf16, int8) and divides
each variant by the peak of the arithmetic it runs (its ``arithmetic``,
from the export manifest): ``efficiency.arithmetic``/``peak_gflops``/
``fraction_of_peak`` replace the FP32-only ``fp32_peak_gflops``/
``fraction_of_fp32_peak``; version 5 adds the optional ``overload`` section
(dinov2_triton.qa.overload: the overload check of the served deployment,
bench/overload_records.py); version 6 adds the optional ``serving`` section
(the pipeline's tune stage: the configuration served and the queue policy's
A/B in it, bench/capacity_records.py ServingChoice); version 7 adds the
optional ``deployment`` section (the `dinov2` ensemble pointed at the
fastest gated variant served in the run, dinov2_triton.pipeline.bench_stage
follow_fastest). Older files read as version 7 (a version-2 capacity run measured every rate once:
``recheck_margin`` 0; a version-3 efficiency was against the FP32 peak:
``arithmetic`` fp32; before version 5 no overload check ran: ``overload``
None; before version 6 no tune stage ran: ``serving`` None; before version 7
the ensemble was never pointed by the bench: ``deployment`` None).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from dinov2_triton.bench.capacity_records import CapacityRun, SearchRun, ServingChoice, ServingConfig
from dinov2_triton.bench.overload_records import OverloadCheck
from dinov2_triton.core.records import Record, RecordError

RESULTS_FILE = "results.json"
#: key of the eager PyTorch FP32 baseline in ``in_process.variants`` and ``rows``
EAGER = "pytorch"
Status = Literal["OK", "SKIPPED", "FAILED"]


class Section(BaseModel):
    """A section perf writes itself: every field declared."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class Copied(BaseModel):
    """A section copied from another module's output: the fields perf reads
    are typed, the others are kept as they were written."""
    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())


class Skipped(Section):
    what: str
    reason: str


# ----------------------------------------------------------------------------- what ran where
class Gpu(Section):
    name: str
    memory_mib: float | None = None
    driver: str | None = None


class Machine(Section):
    """dinov2_triton.bench.system_info.machine_info()."""
    cpu_model: str
    cpu_flags: list[str] = []
    logical_cores: int | None
    physical_cores: int | None = None
    usable_cores: int | None
    memory_total_bytes: int
    gpus: list[Gpu] = []
    os: str
    libc: str = ""
    python: str
    load_average: list[float] | None = None


class ModelInfo(Section):
    """The checkpoint that is the FP32 reference (or, without --model-path,
    what the export manifest says about it). ``pretrained`` is the
    checkpoint's own boolean; None when the source does not record it."""
    checkpoint: str | None
    arch: str | None
    img_size: int | None
    num_classes: int | None
    class_names: list[str] | None = None
    weights_source: str | None
    pretrained: bool | None
    preprocessing: dict[str, Any] | None = None
    embed_dim: int | None = None
    checkpoint_metrics: dict[str, Any] = {}


class Flops(Section):
    """dinov2_triton.bench.system_info.flops_per_image()."""
    flops: int
    gflops: float
    image_size: int
    method: str
    by_op: dict[str, int] | None = None


class MatmulPeak(Section):
    """dinov2_triton.bench.system_info.arithmetic_peak(); ``measurements_gflops`` when measured
    before and after the variants (the higher one is kept). INT8: integer
    GOP/s, 2 per multiply-accumulate."""
    gflops: float
    gflops_median: float
    threads: int
    size: int
    dtype: str
    repeats: int
    measurements_gflops: list[float] | None = None
    arithmetic: str = "fp32"          # fp32 | bf16 | int8
    method: str | None = None         # what was timed, e.g. "torch.matmul float32 2048x2048"


class OperatingPoint(Section):
    """Where the recommendation is decided; None = completed from what was measured."""
    batch_size: int | None = None
    concurrency: int | None = None
    protocol: Literal["grpc", "http"] | None = None
    max_p99_ms: float | None = None


class InputData(Copied):
    """perf_analyzer.Samples.describe(): what the inputs were."""
    source: str
    n: int
    synthetic: bool


# ----------------------------------------------------------------------------- in process
class LoadCell(Section):
    """dinov2_triton.bench.inprocess.measure_load(): ``threads`` clients sharing one model.
    In ``benchmark.latency`` (one client) ``threads`` is left out."""
    threads: int | None = None
    batch_size: int
    requests: int
    wall_s: float
    images_per_s: float | None
    requests_per_s: float | None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None


class BenchmarkSettings(Section):
    batch_sizes: list[int]
    threads: list[int]
    seconds: float
    warmup: int
    min_requests: int


class Benchmark(Section):
    """dinov2_triton.bench.inprocess.benchmark_runner(): latency per batch size, then the grid."""
    latency: dict[str, LoadCell]
    grid: list[LoadCell]
    settings: BenchmarkSettings


class ProcessMemory(Section):
    """Resident memory of the (fresh) benchmark process around loading one variant."""
    baseline_rss_bytes: int
    after_load_rss_bytes: int
    loaded_model_bytes: int
    peak_rss_bytes: int
    peak_over_baseline_bytes: int


class EfficiencyCell(Section):
    batch_size: int
    threads: int
    achieved_gflops: float
    fraction_of_peak: float | None


class Efficiency(Section):
    """images/s x GFLOP per image against the measured matrix multiply peak
    of the arithmetic the variant runs (``arithmetic``)."""
    gflops_per_image: float
    arithmetic: str = "fp32"                  # whose peak: fp32 | bf16 | int8 ...
    peak_gflops: float | None
    peak_method: str | None = None
    best: EfficiencyCell
    cells: list[EfficiencyCell]
    max_images_per_s_at_peak: float | None
    caveat: str | None = None


class BatchBytes(Section):
    weight_bytes_per_image: float | None
    total_bytes_per_image: float
    flops_per_byte: float | None


class BytesMoved(Section):
    input_bytes_per_image: int
    output_bytes_per_image: int
    weight_bytes_per_batch: int | None
    per_batch_size: dict[str, BatchBytes]


class ExportVerdict(Copied):
    """One variant's entry of the export manifest, as perf keeps it."""
    model_name: str | None = None
    precision: str | None = None
    parent: str | None = None
    size_bytes: int | None = None
    status: str | None = None
    reason: str | None = None
    published: bool | None = None
    headline: dict[str, Any] = {}
    gate_passed: bool | None = None
    gate_failures: list[str] = []
    arithmetic: dict[str, Any] | None = None     # dinov2_triton.export.manifest.Arithmetic


class InProcessVariant(Section):
    """One variant of the in-process benchmark: what it is (dinov2_triton.bench.inprocess.VariantSpec)
    and, when it ran, its numbers."""
    name: str
    label: str
    precision: str
    platform: str
    parent: str | None
    model_name: str | None
    gate: str
    artifact: str | None
    file_bytes: int | None
    status: Status
    reason: str | None
    export: ExportVerdict = ExportVerdict()
    benchmark: Benchmark | None = None
    memory: ProcessMemory | None = None
    load_s: float | None = None
    torch_threads: int | None = None
    ort_threads: dict[str, Any] | None = None
    isolated: bool | None = None
    traceback: str | None = None
    efficiency: Efficiency | None = None
    bytes_moved: BytesMoved | None = None
    #: the arithmetic its efficiency is measured against (fp32 | bf16 | int8 ...)
    arithmetic: str | None = None


class InProcessSettings(Section):
    batch_sizes: list[int]
    threads: list[int]
    seconds: float
    warmup: int
    torch_threads: int
    isolated_processes: bool
    n_samples: int
    repository: str | None
    data_path: str | None


class InProcess(Section):
    """dinov2_triton.bench.inprocess.run_inprocess_benchmark(): every variant in process."""
    settings: InProcessSettings
    model: ModelInfo
    flops: Flops
    matmul_peak: MatmulPeak | None               # the FP32 one
    #: arithmetic -> its measured peak (the ones the variants run)
    matmul_peaks: dict[str, MatmulPeak] = {}
    #: arithmetic -> why no peak was measured for it on this host
    peaks_not_measured: dict[str, str] = {}
    input_data: InputData
    variants: dict[str, InProcessVariant]
    skipped: list[Skipped] = []


# ----------------------------------------------------------------------------- through the server
class SweepSettings(Copied):
    """dinov2_triton.bench.perf_analyzer.run_sweep()'s settings (MeasurementSettings + the grid)."""
    window_ms: int
    stability_pct: float
    max_trials: int
    measurement_mode: str
    protocols: list[str]
    concurrency: list[int]
    batch_sizes: list[int]


class SweepPoint(Copied):
    """One perf_analyzer run; ``metrics`` is its parsed CSV row (throughput_infer_per_s, *_us ...)."""
    model: str
    protocol: str
    batch_size: int
    concurrency: int
    status: str
    metrics: dict[str, Any]
    command: str
    csv: str | None = None


class SweepFailure(Copied):
    model: str | None
    reason: str


class PerfAnalyzer(Copied):
    settings: SweepSettings
    input_data: InputData
    model_configs: dict[str, dict[str, Any]] = {}
    points: list[SweepPoint] = []
    failures: list[SweepFailure] = []
    skipped: list[Skipped] = []


class ServerMemory(Section):
    """dinov2_triton.bench.memory.MemorySampler.result(): peaks seen while the sweep ran."""
    pid: int | None = None
    metrics_url: str | None = None
    samples: int = 0
    peak_process_tree: dict[str, Any] | None = None
    peak_per_model_rss_bytes: dict[str, float] = {}
    peak_host_used_bytes: float | None = None
    peak_gpu_used_bytes: dict[str, float] = {}
    metrics: dict[str, Any] | None = None
    errors: list[str] = []


class Server(Section):
    url: str
    http_url: str | None = None
    metrics_url: str | None = None
    metadata: dict[str, Any] = {}
    memory: ServerMemory | None = None


class ParityVariant(Copied):
    """One served model of dinov2_triton.qa.parity.run_parity()."""
    model: str
    gate: dict[str, Any] = {}
    parity: dict[str, Any] | None = None
    passed: bool
    failures: list[str] = []
    error: str | None = None
    default_variant: str | None = None


class Parity(Copied):
    """dinov2_triton.qa.parity.run_parity(): the live-endpoint parity."""
    url: str
    protocol: str
    split: str
    n_images: int
    reference: dict[str, Any] = {}
    variants: list[ParityVariant] = []


class ExportSummary(Section):
    """The export manifest's verdicts (dinov2_triton.bench.targets.export_summary)."""
    run_id: str | None = None
    created: str | None = None
    weights_source: str | None = None
    img_size: int | None = None
    eval_set: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    variants: dict[str, ExportVerdict] = {}
    preprocess: dict[str, Any] | None = None
    ensemble: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- derived by dinov2_triton.report.report
class RowInProcess(Section):
    b1_p50_ms: float | None = None
    b1_p99_ms: float | None = None
    op_images_per_s: float | None = None
    op_p99_ms: float | None = None
    best_images_per_s: float | None = None
    peak_rss_bytes: int | None = None
    loaded_model_bytes: int | None = None
    efficiency: float | None = None
    efficiency_peak: str | None = None           # whose peak efficiency is a fraction of (FP32, INT8 ...)
    efficiency_caveat: str | None = None


class RowServer(Section):
    batch_size: int | None = None
    concurrency: int | None = None
    protocol: str | None = None
    op_images_per_s: float | None = None
    op_p50_ms: float | None = None
    op_p99_ms: float | None = None
    breakdown_ms: dict[str, float | None] = {}
    best_images_per_s: float | None = None
    rss_bytes: float | None = None


class GateVerdict(Section):
    passed: bool | None = None
    failures: list[str] = []
    source: str | None = None
    name: str | None = None


class RowAccuracy(Section):
    top1_agreement: float | None = None
    flipped: int | None = None
    n: int | None = None
    accuracy: float | None = None
    accuracy_delta: float | None = None
    logit_max_abs_diff: float | None = None
    embedding_cosine_mean: float | None = None
    embedding_cosine_min: float | None = None


class VariantRow(Section):
    """One row of the report: a variant (keyed by its Triton model name), the
    eager baseline, the ensemble or the preprocessing model."""
    key: str
    label: str
    kind: Literal["baseline", "variant", "ensemble", "preprocess"] = "variant"
    model_name: str | None = None
    in_process_name: str | None = None
    precision: str = "fp32"
    arithmetic: str | None = None                # what it runs, on which unit ("INT8 on VNNI")
    parent: str | None = None
    status: str = "OK"
    reasons: list[str] = []
    served: bool = False
    file_bytes: int | None = None
    platform: str | None = None
    gate_name: str | None = None
    in_process: RowInProcess = RowInProcess()
    server: RowServer = RowServer()
    gate: GateVerdict = GateVerdict()
    accuracy: RowAccuracy = RowAccuracy()
    slower_than_parent: list[str] = []


class Deployment(Section):
    """What the `dinov2` ensemble calls after the bench's served ranking (run_perf(deploy_fastest=True))."""
    ensemble: str
    before: str | None = None     # the classifier it called when the bench started
    after: str | None = None      # the classifier it calls now (the report's recommendation)
    reason: str


class Rejected(Section):
    variant: str
    reason: str


class Ranked(Section):
    variant: str
    images_per_s: float


class Recommendation(Section):
    """The deployable variant that passes all its gates with the most capacity
    at the SLO (search or capacity run), else the fastest at the operating
    point (dinov2_triton.report.ranking.recommend)."""
    source: Literal["export", "server", "in_process", "capacity", "search"]   # export: the ensemble's choice
    operating_point: OperatingPoint
    rejected: list[Rejected] = []
    ranking: list[Ranked] = []
    variant: str | None = None
    reason: str
    label: str | None = None
    images_per_s: float | None = None
    p99_ms: float | None = None
    gate_source: str | None = None
    warnings: list[str] = []
    configuration: ServingConfig | None = None
    capacity_img_s: float | None = None
    slo_p99_ms: float | None = None
    top1_agreement: float | None = None


# ----------------------------------------------------------------------------- the record
class PerfResults(Record):
    """``perf/reports/<run-id>/results.json``: written by dinov2_triton.pipeline.bench_stage (and again by
    dinov2_triton.report.report with ``rows`` and ``recommendation``), read by dinov2_triton.report.report."""

    SCHEMA_VERSION: ClassVar[int] = 7
    KIND: ClassVar[str] = "perf results.json"
    REGENERATE: ClassVar[str] = "dinov2-triton bench --model-path ... (see dinov2-triton bench --help)"

    run_id: str
    created: str
    finished: str | None = None
    git_revision: str
    machine: Machine
    versions: dict[str, str]
    #: the dinov2_triton.pipeline.bench_stage command-line flags as given (API keys left out)
    settings: dict[str, Any] = {}
    operating_point: OperatingPoint = OperatingPoint()
    model: ModelInfo | None = None
    flops: Flops | None = None
    matmul_peak: MatmulPeak | None = None
    in_process: InProcess | None = None
    perf_analyzer: PerfAnalyzer | None = None
    server: Server | None = None
    parity: Parity | None = None
    export: ExportSummary | None = None
    skipped: list[Skipped] = []
    errors: list[str] = []
    capacity: CapacityRun | None = None
    search: SearchRun | None = None
    overload: OverloadCheck | None = None
    #: the pipeline's tune stage: the configuration served, and the queue policy's A/B in it
    serving: ServingChoice | None = None
    #: the bench's served ranking pointed the dinov2 ensemble at its fastest gated variant
    deployment: Deployment | None = None
    rows: list[VariantRow] | None = None
    recommendation: Recommendation | None = None

    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version == 0:
            raise RecordError("not a results.json written by dinov2_triton.pipeline.bench_stage")
        if version == 1:   # 2 added the optional capacity and search sections
            return cls._migrate({**data, "schema_version": 2}, 2)
        if version == 2:   # 3: marginal verdicts rechecked; 2 measured each rate once
            import copy

            data = copy.deepcopy(data)
            capacity_settings = [(data.get("capacity") or {}).get("settings"),
                                 ((data.get("search") or {}).get("settings") or {}).get("capacity")]
            for settings in capacity_settings:
                if isinstance(settings, dict):
                    settings.setdefault("recheck_margin", 0.0)
            return cls._migrate({**data, "schema_version": 3}, 3)
        if version == 3:   # 4: efficiency per arithmetic; 3 divided every variant by the FP32 peak
            import copy

            data = copy.deepcopy(data)
            ip = data.get("in_process")
            if isinstance(ip, dict):
                if isinstance(ip.get("matmul_peak"), dict):
                    ip.setdefault("matmul_peaks", {"fp32": ip["matmul_peak"]})
                for v in (ip.get("variants") or {}).values():
                    eff = v.get("efficiency") if isinstance(v, dict) else None
                    if isinstance(eff, dict):
                        v["efficiency"] = _efficiency_v4(eff)
            return cls._migrate({**data, "schema_version": 4}, 4)
        if version == 4:   # 5 added the optional overload section (no check ran before)
            return cls._migrate({**data, "schema_version": 5}, 5)
        if version == 5:   # 6 added the optional serving section (no tune stage ran before)
            return cls._migrate({**data, "schema_version": 6}, 6)
        if version == 6:   # 7 added the optional deployment section (the bench never moved the ensemble)
            return {**data, "schema_version": 7}
        raise RecordError(f"schema_version {version} is no longer supported")


def _efficiency_v4(eff: dict[str, Any]) -> dict[str, Any]:
    """A version-3 efficiency (against the FP32 peak, whatever the variant ran) in version 4's names."""
    renames = {"fp32_peak_gflops": "peak_gflops", "max_images_per_s_at_fp32_peak": "max_images_per_s_at_peak",
               "fraction_of_fp32_peak": "fraction_of_peak"}

    def renamed(d: dict[str, Any]) -> dict[str, Any]:
        return {renames.get(k, k): v for k, v in d.items()}
    out = renamed(eff)
    out.setdefault("arithmetic", "fp32")
    if isinstance(out.get("best"), dict):
        out["best"] = renamed(out["best"])
    out["cells"] = [renamed(c) if isinstance(c, dict) else c for c in out.get("cells") or []]
    return out


def write_results(path: str | os.PathLike, results: PerfResults) -> Path:
    """The one writer: strict JSON (NaN/inf as strings), atomic."""
    from dinov2_triton.core.artifact_io import atomic_write_json

    if not isinstance(results, PerfResults):
        raise TypeError(f"write_results({path}): expected PerfResults, got {type(results).__name__}")
    return atomic_write_json(path, results)


def read_results(path: str | os.PathLike) -> PerfResults:
    """The one reader: a missing/unreadable file, bad JSON, a missing field, a
    wrong type or an unknown schema_version raise RecordError naming the
    file (and the field)."""
    from dinov2_triton.core.artifact_io import read_json

    try:
        data = read_json(path, what="perf results.json (dinov2-triton bench writes it)")
    except (OSError, ValueError) as exc:
        raise RecordError(str(exc)) from None
    return PerfResults.from_dict(data, source=path)
