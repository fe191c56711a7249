"""The pipeline's stages, each a function of one :class:`Context`.

    data -> train -> export -> serve -> classify -> bench | capacity (capacity_stage.py)

Each stage calls the importable function of the package that owns it
(dinov2_triton.data.load.prepare_dataset, export.pipeline.run_export,
serve.local_server.start_server, client.classifier.TritonClassifier,
pipeline.bench_stage.run_perf, tune.search.run_search). Training is the one
stage run as a child process (``python -m dinov2_triton.cli train``): torch
training and the OpenVINO runtime (which export and bench load) crash when
they share a process (scripts/test.sh keeps their tests apart for the same
reason), and a child also keeps the trainer's memory out of the long-lived
runner. The export's ModelOpt and ONNX Runtime quantizers, which cannot
share a process either, already run in children of the export stage
(dinov2_triton.export.worker).

data, train and export skip when their inputs are unchanged
(dinov2_triton.core.stage_stamp: the inputs' content, the code of the stage's
package and of the packages it may import, the recipe section); an
interrupted train stage with the same inputs resumes exactly from
checkpoint_last.pth. A stage raises :class:`PipelineInputError` for bad input
(the pipeline exits 2) and :class:`StageError` when it fails (exit 1).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dinov2_triton.pipeline.recipes import Recipe, params_json, train_settings

if TYPE_CHECKING:
    from dinov2_triton.serve.local_server import ServerHandle

def random_weights_banner(arch: str) -> str:
    """The banner of a run without pretrained weights, naming the arch's family
    and the file name ``train.weights: auto`` looks for (dinov2_triton.train.archs)."""
    from dinov2_triton.train.archs import arch_spec

    spec = arch_spec(arch, flag="train.arch")
    lines = [f"NO PRETRAINED {spec.family_name} WEIGHTS AVAILABLE for {spec.name} (offline machine).",
             "This run fine-tunes a RANDOMLY INITIALISED ViT: the pipeline, export,",
             f"serving and measurements are real, the accuracy is NOT what a {spec.family_name}",
             f"fine-tune reaches. Put {spec.weights_file_glob} under weights/",
             "(in the workdir) or set train.weights: /path/to/checkpoint.pth."]
    width = max(len(line) for line in lines) + 6
    return "\n".join(["#" * width, *(f"#  {line:<{width - 6}}  #" for line in lines), "#" * width])


WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")


class PipelineInputError(ValueError):
    """Bad input found by a stage (a file, a folder, a setting): exit 2."""


class StageError(RuntimeError):
    """A stage failed; ``code`` is the pipeline's exit code (1, or the child's)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Layout:
    """Where one pipeline run keeps its files: <root>/{data,models,model_repository,logs,reports,state}."""
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def repository(self) -> Path:
        return self.root / "model_repository"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def checkpoint(self) -> Path:
        return self.models / "model_final.pth"

    @property
    def manifest(self) -> Path:
        return self.repository / "export_manifest.json"

    @property
    def pid_file(self) -> Path:
        return self.logs / "triton.pid"


@dataclass
class StageResult:
    """One line of the stage-times table."""
    stage: str
    status: str          # ran | skipped | warning | failed
    seconds: float
    note: str = ""


@dataclass
class Context:
    """What the stages of one run share."""
    recipe: Recipe
    layout: Layout
    force: frozenset[str] = frozenset()
    say: Callable[[str], None] = print
    weights: str = "random"
    pretrained: bool = False
    train_config: dict[str, Any] = field(default_factory=dict)
    variants: list[str] = field(default_factory=list)
    export_options: dict[str, Any] = field(default_factory=dict)
    server: "ServerHandle | None" = None
    server_pids: list[int] = field(default_factory=list)   # every server this run started
    bench_results: Path | None = None       # results.json of this run's bench stage
    thread_study: str | None = None         # markdown of the thread-settings study
    serving: Any = None                     # the tune stage's ServingChoice (bench_stage results' ``serving``)
    export_stamp: Any = None                # the export stage's Stamp when its output is up to date
    warnings: list[str] = field(default_factory=list)

    def forced(self, stage: str) -> bool:
        return stage in self.force


# --------------------------------------------------------------------------- planning
def code_dirs(package: str) -> list[Path]:
    """The source folders of ``dinov2_triton.<package>`` and of every package it
    may import (dinov2_triton.LAYERS): new code there reruns the stage."""
    from dinov2_triton import LAYERS

    return [Path(str(resources.files(f"dinov2_triton.{p}"))) for p in (*LAYERS[package], package)]


def resolve_weights(spec: str, arch: str, layout: Layout) -> tuple[str, bool]:
    """(weights for the train stage, pretrained?). ``auto``: the official
    checkpoint under weights/ in the workdir or the current folder, by the
    arch's released file name (ArchSpec.weights_file_glob: DINOv2
    dinov2_<arch>_pretrain.pth, DINOv3 <arch>_pretrain_<data>-<hash>.pth),
    else random init."""
    if spec == "auto":
        from dinov2_triton.train.archs import arch_spec

        pattern = arch_spec(arch, flag="train.arch").weights_file_glob
        for folder in dict.fromkeys((layout.root, Path.cwd())):
            found = sorted(p for p in (folder / "weights").glob(pattern) if p.is_file())
            if len(found) > 1:
                raise PipelineInputError(f"train.weights auto: {len(found)} files match {folder / 'weights' / pattern} "
                                         f"({', '.join(p.name for p in found)}); set train.weights to the one to use")
            if found:
                return str(found[0].resolve()), True
        return "random", False
    if spec == "random":
        return "random", False
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve()), True
    if spec.endswith(WEIGHT_SUFFIXES) or spec.startswith(("/", "./", "../", "~")):
        raise PipelineInputError(f"train.weights {spec}: file not found")
    return spec, True            # hub, or a hub id such as timm/vit_small_patch14_dinov2.lvd142m


def export_options(recipe: Recipe) -> tuple[list[str], dict[str, Any]]:
    """(variants, run_export options) of the export section, checked by the
    export stage's own validation (ExportInputError -> PipelineInputError)."""
    from dinov2_triton.export.auto import expand
    from dinov2_triton.export.pipeline import ExportInputError, resolve_variants, validate_options

    e = recipe.export
    variants, extra = expand(e.variants)   # auto: this host's candidates, the ensemble on the fastest gated
    opts: dict[str, Any] = {"max_batch_size": e.max_batch_size, "allow_failed_gates": e.allow_failed_gates,
                            "gates": list(e.gates)}
    for key in ("calib_size", "calib_method", "eval_size", "bench_seconds", "accuracy_budget", "instances",
                "max_queue_delay_us", "queue_timeout_ms", "max_queue_size", "default_variant", "opset",
                "onnx_exporter"):
        value = getattr(e, key)
        if value is not None:
            opts[key] = value
    if e.preferred_batch_sizes is not None:
        opts["preferred_batch_sizes"] = tuple(e.preferred_batch_sizes)
    opts.update(extra)
    opts.update(e.options)
    try:
        resolve_variants(variants)
        validate_options(opts)
    except ExportInputError as exc:
        raise PipelineInputError(f"export: {exc}") from None
    return variants, opts


def plan(ctx: Context) -> None:
    """Check and resolve everything the stages need before the first one runs,
    so bad input fails in seconds, not after training."""
    r, lay = ctx.recipe, ctx.layout
    stages = r.ordered_stages()
    if "data" in stages and r.data.source == "image-folder":
        src = Path(r.data.images or "")
        if not src.is_dir():
            raise PipelineInputError(f"data.images {src}: no such folder (an ImageFolder tree: DIR/<class>/<images>)")
    if "train" in stages:
        ctx.weights, ctx.pretrained = resolve_weights(r.train.weights, r.train.arch, lay)
        ctx.train_config = train_settings(r.train, weights=ctx.weights, pretrained=ctx.pretrained)
    if "export" in stages:
        ctx.variants, ctx.export_options = export_options(r)
    data = lay.data / "manifest.csv"
    needs = {"train": [("data", data)], "export": [("train", lay.checkpoint), ("data", data)],
             "serve": [("export", lay.manifest)], "tune": [("data", data)], "classify": [("data", data)],
             "bench": [("data", data)],
             "capacity": [("data", data)]}
    for stage in stages:
        for producer, path in needs.get(stage, []):
            if producer not in stages and not path.exists():
                raise PipelineInputError(
                    f"stage {stage} needs {path}, which the {producer} stage writes; {producer} is not among "
                    f"this recipe's stages {stages}: run a pipeline with it into this workdir first "
                    f"(dinov2-triton pipeline --workdir {lay.root})")


# --------------------------------------------------------------------------- data
def run_data(ctx: Context) -> str | StageResult:
    from dinov2_triton.core.stage_stamp import Stamp
    from dinov2_triton.data.load import format_report, prepare_dataset
    from dinov2_triton.data.sources import FASHION_MNIST_DIR, DatasetError

    d, lay = ctx.recipe.data, ctx.layout
    source = Path(d.images).resolve() if d.source == "image-folder" else None
    kwargs = {"image_folder": str(source) if source else None, "per_class": d.per_class,
              "test_per_class": d.test_per_class, "seed": d.seed, "val_fraction": d.val_fraction,
              "test_fraction": d.test_fraction}
    stamp = Stamp(lay.state, "data", inputs=[source or FASHION_MNIST_DIR, *code_dirs("data")],
                  params=[f"data={params_json(kwargs)}"],
                  outputs=[lay.data / "manifest.csv", lay.data / "summary.json"])
    skipped = _skip(ctx, "data", stamp)
    if skipped:
        return skipped
    ctx.say(f"data: {source or 'Fashion-MNIST'} -> {lay.data}")
    try:
        summary = prepare_dataset(lay.data, force=True, progress=sys.stderr.isatty(), **kwargs)
    except DatasetError as exc:
        raise PipelineInputError(f"data: {exc}") from None
    ctx.say(format_report(summary))
    stamp.finish()
    return f"{summary.num_images} images: " + ", ".join(f"{k} {v}" for k, v in summary.split_sizes.items())


def _skip(ctx: Context, stage: str, stamp) -> StageResult | None:
    """A 'skipped' result when the stamp says the stage is up to date and it is not forced."""
    if ctx.forced(stage):
        ctx.say(f"{stage}: runs (--force)")
        return None
    ok, why = stamp.check()
    ctx.say(f"{stage}: {'up to date, skipped' if ok else 'runs'} ({why})")
    return StageResult(stage, "skipped", 0.0, why) if ok else None


# --------------------------------------------------------------------------- train
def run_train(ctx: Context) -> str | StageResult:
    import yaml

    from dinov2_triton.core.artifact_io import atomic_write_text
    from dinov2_triton.core.stage_stamp import Stamp

    lay, cfg = ctx.layout, ctx.train_config
    inputs: list[Any] = [lay.data / "manifest.csv", lay.data / "labels.txt", *code_dirs("train")]
    if Path(ctx.weights).exists():
        inputs.append(ctx.weights)
    stamp = Stamp(lay.state, "train", inputs=inputs, params=[f"train={params_json(cfg)}"],
                  outputs=[lay.checkpoint])
    if not ctx.pretrained:
        ctx.say(random_weights_banner(cfg['arch']))
    ctx.say(f"train: {cfg['arch']}, mode={cfg['mode']}, {cfg['epochs']} epochs, {cfg['img_size']} px, "
            f"weights={ctx.weights}, lr {cfg['lr']:g}, layer decay {cfg['layer_decay']:g}, "
            f"warm-up {cfg['warmup_epochs']:g}, linear-probe epochs {cfg['lp_epochs']}, "
            f"augment {not cfg['no_augment']}")
    skipped = _skip(ctx, "train", stamp)
    if skipped:
        return skipped
    # Same inputs as an unfinished run: continue from its checkpoint_last.pth (exact resume);
    # otherwise start over.
    resume = (not ctx.forced("train") and stamp.may_resume() and (lay.models / "checkpoint_last.pth").is_file())
    if resume:
        ctx.say(f"train: resuming the unfinished run from {lay.models / 'checkpoint_last.pth'}")
    config_file = lay.state / "train_config.yaml"
    full = {**cfg, "data_path": str(lay.data), "output_path": str(lay.models), "resume": resume,
            "progress": sys.stderr.isatty()}
    atomic_write_text(config_file, "# written by dinov2-triton pipeline for its train stage\n"
                      + yaml.safe_dump(full, sort_keys=False))
    stamp.start()
    # A child process: torch training and the OpenVINO runtime (export, bench) crash in one
    # process (see the module docstring); the child's exit codes are the train command's.
    cmd = [sys.executable, "-m", "dinov2_triton.cli", "train", "--config", str(config_file)]
    ctx.say(f"train: {' '.join(cmd)}")
    sys.stdout.flush()
    sys.stderr.flush()
    code = subprocess.run(cmd, check=False).returncode
    if code == 2:
        raise PipelineInputError(f"train: bad input (the message above; settings in {config_file})")
    if code != 0:
        raise StageError(f"train exited with code {code} (rerun the pipeline to resume from checkpoint_last.pth)",
                         code=130 if code == 130 else 1)
    stamp.finish()
    return "resumed and finished" if resume else "trained"


# --------------------------------------------------------------------------- export
def run_export_stage(ctx: Context) -> str | StageResult:
    from dinov2_triton.core.artifact_io import jsonable
    from dinov2_triton.core.stage_stamp import Stamp
    from dinov2_triton.export.manifest import format_summary
    from dinov2_triton.export.pipeline import ExportInputError, run_export

    lay = ctx.layout
    stamp = Stamp(lay.state, "export",
                  inputs=[lay.checkpoint, lay.data / "manifest.csv", *code_dirs("export")],
                  params=[f"export={params_json({'variants': ctx.variants, **jsonable(ctx.export_options)})}"],
                  outputs=[lay.manifest])
    ctx.say(f"export: {', '.join(ctx.variants)}")
    skipped = _skip(ctx, "export", stamp)
    if skipped:
        ctx.export_stamp = stamp
        return skipped
    try:
        manifest = run_export(lay.checkpoint, lay.repository, data_path=lay.data, variants=ctx.variants,
                              **ctx.export_options)
    except ExportInputError as exc:
        raise PipelineInputError(f"export: {exc}") from None
    ctx.say(format_summary(manifest))
    code = int(manifest.exit_code)
    counts: dict[str, int] = {}
    for v in manifest.variants.values():
        counts[v.status] = counts.get(v.status, 0) + 1
    note = ", ".join(f"{n} {s}" for s, n in counts.items())
    if code == 0:
        stamp.finish()
        ctx.export_stamp = stamp
        return note
    msg = (f"some variants failed their gates or their build (see {lay.manifest}); continuing with the "
           f"published ones (the export stage reruns next time)")
    ctx.say(f"WARNING: {msg}")
    ctx.warnings.append(f"export: {msg}")
    return StageResult("export", "warning", 0.0, note)


# --------------------------------------------------------------------------- serve
def start_local_server(ctx: Context) -> "ServerHandle":
    """Start the local Triton server on free loopback ports and wait until it is ready."""
    from dinov2_triton.serve.errors import ServeError
    from dinov2_triton.serve.local_server import find_free_ports, read_pid_file, start_server, stop_server

    lay = ctx.layout
    if read_pid_file(lay.pid_file) is not None and stop_server(lay.pid_file):
        ctx.say(f"serve: stopped the server an earlier run left running ({lay.pid_file})")
    http, grpc, metrics = find_free_ports(3)
    try:
        handle = start_server(lay.repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                              log_file=lay.logs / "triton.log", pid_file=lay.pid_file,
                              api_key_file=lay.logs / "triton.api_key")
    except (ServeError, OSError, ValueError) as exc:
        raise StageError(f"serve: {exc}") from None
    ctx.server = handle
    ctx.server_pids.append(handle.pid)
    try:
        handle.wait_ready(timeout=ctx.recipe.serve.ready_timeout_s)
    except ServeError as exc:
        stop_local_server(ctx)
        raise StageError(f"serve: {exc}") from None
    return handle


def stop_local_server(ctx: Context) -> None:
    if ctx.server is not None:
        handle, ctx.server = ctx.server, None
        handle.stop()


def run_serve(ctx: Context) -> str:
    handle = start_local_server(ctx)
    states = handle.model_states()
    ready = [m for m, s in states.items() if s == "READY"]
    skipped = len(handle.plan.skipped)
    return (f"{len(ready)}/{len(states)} models ready (grpc {handle.url_grpc}, http {handle.url_http})"
            + (f", {skipped} not loadable here" if skipped else ""))


# --------------------------------------------------------------------------- classify
def run_classify(ctx: Context) -> str:
    from dinov2_triton.client.classifier import TritonClassifier
    from dinov2_triton.data.datasets import read_manifest
    from dinov2_triton.serve.triton_access import TritonError

    c, lay, handle = ctx.recipe.classify, ctx.layout, ctx.server
    assert handle is not None, "the serve stage starts the server first"
    try:
        rows = read_manifest(lay.data, split=c.split)
    except ValueError as exc:
        raise PipelineInputError(f"classify: {exc}") from None
    paths = [str(r.file(lay.data)) for r in rows]
    truth = {p: r.label for p, r in zip(paths, rows)}
    notes = []
    for protocol in c.protocols:
        url = handle.url(protocol)
        try:
            with TritonClassifier(url, protocol, c.model, api_key=handle.api_key, retries=c.retries) as clf:
                preds = clf.classify_paths(paths, top_k=1)
        except (TritonError, ValueError) as exc:
            raise StageError(f"classify over {protocol}: {exc}") from None
        failed = [p for p in preds if not p.ok]
        for p in failed[:5]:
            ctx.say(f"error: {p.path}: {p.error}")
        scored = [p for p in preds if p.ok and p.path in truth]
        correct = sum(p.top[0][1] == truth[p.path] for p in scored)
        acc = correct / len(scored) if scored else float("nan")
        ctx.say(f"classify: {c.model} over {protocol} at {url}: accuracy {acc:.2%} ({correct}/{len(scored)}) on "
                f"the {c.split} split of {lay.data}")
        if failed:
            raise StageError(f"classify over {protocol}: {len(failed)} of {len(preds)} image(s) failed")
        notes.append(f"{protocol} {acc:.1%}")
    return f"{c.split} split ({len(paths)} images): " + ", ".join(notes)


# --------------------------------------------------------------------------- bench
def measurement_settings(window_ms: int, *, stability_pct=None, max_trials=None, fixed_requests=None):
    from dinov2_triton.bench.perf_analyzer import MeasurementSettings

    kwargs = {k: v for k, v in (("stability_pct", stability_pct), ("max_trials", max_trials),
                                ("fixed_requests", fixed_requests)) if v is not None}
    try:
        return MeasurementSettings(window_ms=window_ms, **kwargs)
    except ValueError as exc:
        raise PipelineInputError(f"bench: {exc}") from None


def run_bench(ctx: Context) -> str | StageResult:
    from dinov2_triton.pipeline.bench_stage import PerfInputError, print_run, run_perf

    b, lay, handle = ctx.recipe.bench, ctx.layout, ctx.server
    assert handle is not None, "the serve stage starts the server first"
    settings = measurement_settings(b.window_ms, stability_pct=b.stability_pct, max_trials=b.max_trials,
                                    fixed_requests=b.fixed_requests)
    optional = {k: getattr(b, k) for k in ("threads", "seconds", "samples", "parity_max_images", "gates")
                if getattr(b, k) is not None}
    if "samples" in optional:
        optional["n_samples"] = optional.pop("samples")
    ctx.say(f"bench: {'in-process benchmark, ' if b.in_process else ''}perf_analyzer sweeps"
            f"{', live parity' if b.parity else ''}, report -> {lay.reports}")
    try:
        run = run_perf(model_path=lay.checkpoint if lay.checkpoint.is_file() else None,
                       repository=lay.repository, data_path=lay.data, url=handle.url_grpc,
                       http_url=handle.url_http, metrics_url=handle.url_metrics, models=b.models,
                       protocols=list(b.protocols), concurrency=list(b.concurrency), batch_sizes=list(b.batch_sizes),
                       settings=settings, keep_going=True, variants=b.variants, in_process=b.in_process,
                       parity=b.parity, api_key=handle.api_key, server_pid=handle.pid,
                       operating_point={"batch_size": b.op_batch_size, "concurrency": b.op_concurrency,
                                        "protocol": None, "max_p99_ms": b.max_p99_ms},
                       out=lay.reports, cli_settings={"pipeline_recipe": ctx.recipe.model_dump(mode="json")},
                       overload=overload_settings(ctx) if "tune" not in ctx.recipe.stages else None,
                       deploy_fastest=deploys_fastest(ctx), progress=ctx.say, **optional)
    except (PerfInputError, ValueError) as exc:
        raise PipelineInputError(f"bench: {exc}") from None
    keep_export_current(ctx, run.results)
    code = print_run(run)
    ctx.bench_results = Path(run.report.json)
    note = f"report {run.report.md}"
    if b.thread_study is not None:
        note += "; " + _thread_study(ctx)
    if code == 0:
        return note
    errors = list(run.results.errors)
    unstable = unstable_points(run.results) if b.allow_unstable else set()
    failed = [e for e in errors if e not in unstable]
    if failed and b.strict:
        raise StageError(f"bench: the report lists errors ({len(failed)}): {run.report.md}")
    msg = (f"{len(unstable)} perf_analyzer point(s) did not stabilise (a busy host: the load average is in "
           f"the report); " if unstable else "") + (f"{len(failed)} error(s) " if failed else "")
    ctx.warnings.append(f"bench: {msg}recorded in {run.report.md}")
    return StageResult("bench", "warning", 0.0, note)


def keep_export_current(ctx: Context, results) -> bool:
    """After the bench pointed the ensemble (``results.deployment``): the manifest as
    the bench left it is the up-to-date export's output, stamped again, so that an
    unchanged export is skipped next time rather than redone for the bench's own
    edit. Returns whether it stamped (not when the export was not up to date)."""
    if results.deployment is None or ctx.export_stamp is None:
        return False
    ctx.export_stamp.finish()
    return True


def deploys_fastest(ctx: Context) -> bool:
    """Whether the bench points the `dinov2` ensemble at the fastest gated variant it
    served: the export chose by measurement (``auto``, no ``default_variant``)."""
    e = ctx.recipe.export
    return "auto" in e.variants and e.default_variant is None


def overload_settings(ctx: Context) -> dict | None:
    """The recipe's overload check (run_perf's ``overload``), None when off. It runs
    against the final deployment: at the end of the bench stage, or of the tune
    stage when the recipe tunes (dinov2_triton.pipeline.capacity_stage)."""
    o = ctx.recipe.bench.overload
    return o.model_dump(exclude={"enabled"}) if o.enabled else None


def unstable_points(results) -> set[str]:
    """The errors of a bench run that are perf_analyzer points which only failed to
    stabilise (the measurement, not the server, gave up: a busy host)."""
    sweep = results.perf_analyzer
    return {f"perf_analyzer: {f.reason}" for f in (sweep.failures if sweep else [])
            if getattr(f, "kind", None) == "unstable"}


def _thread_study(ctx: Context) -> str:
    """bench.thread_study: one instance with every core vs several with fewer threads, in process."""
    from dinov2_triton.bench.cpu_threads import render, run_study
    from dinov2_triton.core.artifact_io import atomic_write_json, atomic_write_text
    from dinov2_triton.core.records import RecordError

    t, lay = ctx.recipe.bench.thread_study, ctx.layout
    assert t is not None
    ctx.say(f"bench: thread settings of {', '.join(t.variants)} (1 instance x all cores vs instances x 1 thread)")
    try:
        study = run_study(lay.repository, list(t.variants), batch_size=t.batch_size, seconds=t.seconds)
    except (ValueError, RecordError) as exc:
        ctx.warnings.append(f"thread study: {exc}")
        ctx.say(f"WARNING: thread study: {exc}")
        return "thread study not run"
    ctx.thread_study = render(study)
    ctx.say(ctx.thread_study)
    atomic_write_json(lay.reports / "threads.json", study)
    atomic_write_text(lay.reports / "threads.md", ctx.thread_study + "\n")
    return f"thread study {lay.reports / 'threads.md'}"


STAGE_FUNCTIONS: dict[str, Callable[[Context], "str | StageResult"]] = {
    "data": run_data, "train": run_train, "export": run_export_stage, "serve": run_serve,
    "classify": run_classify, "bench": run_bench,
}   # + capacity: dinov2_triton.pipeline.capacity_stage

