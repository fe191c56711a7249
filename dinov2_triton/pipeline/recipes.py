"""Recipe files: what ``dinov2-triton pipeline`` runs, as one validated record.

A recipe is YAML; :class:`Recipe` is its one typed record (pydantic,
``extra="forbid"``, strict types), with one section per stage::

    description: ...
    workdir: runs/bench-224          # optional; --workdir wins, default: the current folder
    stages: [data, train, export, serve, bench, tune, classify]
    data:     {images: null, per_class: 300, test_per_class: 100, ...}
    train:    {arch: vits14, img_size: 56, mode: full, epochs: 5, ...}
    export:   {variants: [...], max_batch_size: 8, ...}
    serve:    {ready_timeout_s: 300}
    tune:     {slo_p99_ms: 100, space: joint, budget_min: 3, ...}
    classify: {protocols: [grpc, http], ...}
    bench:    {protocols: [grpc], concurrency: [1, 4], ...}
    capacity: {slo_p99_ms: 100, models: [...], search: {...}}
    sweep:    [{name: 56px, overlay: {train: {img_size: 56}}}, ...]

The shipped recipes live in ``dinov2_triton/pipeline/resources/recipes/``
(read with importlib.resources): ``demo``, ``images``, ``bench-224``,
``cpu-sweep``, ``capacity``. Layers, later ones win (:func:`resolve`):

1. the record's defaults (they are the ``demo`` recipe's values);
2. the recipe file, after the chain of files its ``base:`` key names
   (a shipped recipe's name, or a file relative to the one naming it);
3. ``--config FILE.yaml`` (an overlay: any subset of the keys, no ``base``);
4. ``--images DIR`` (= ``data.images``);
5. ``--set KEY=VALUE`` (dotted key, YAML value: ``--set train.epochs=1``).

A ``sweep`` runs the pipeline once per entry, the entry's ``overlay`` put
between the recipe file and ``--config``, each in ``<workdir>/<name>/``.

Bad input raises :class:`RecipeError`, one line naming the layer that set the
offending value (the file, or the flag) and the key path, in the house style
of dinov2_triton.core.records, e.g.
``.../my.yaml: field 'train.epochs': Input should be a valid integer (got 'five')``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dinov2_triton.core.records import format_validation_error
from dinov2_triton.train.archs import check_image_size
from dinov2_triton.train.finetune_config import AMPS, ARCH_NAMES, ATTENTIONS, DEVICES, HEADS, MODES

RECIPES_PACKAGE = "dinov2_triton.pipeline"
#: the stages in the order they run; a recipe's ``stages`` picks among them
STAGES = ("data", "train", "export", "serve", "bench", "tune", "classify", "capacity")
#: the stages that skip by content fingerprint (dinov2_triton.core.stage_stamp)
STAMPED = ("data", "train", "export")
#: stages that talk to the local server the serve stage starts
NEEDS_SERVER = ("tune", "classify", "bench", "capacity")
#: the export's default (dinov2_triton.export.auto): every variant this host can run, the ensemble on the fastest gated
DEFAULT_VARIANTS = ["auto"]
#: export.variants words besides the registry's names
VARIANT_WORDS = ("auto", "all")

Stage = Literal[STAGES]  # type: ignore[valid-type]
Protocol = Literal["grpc", "http"]


class RecipeError(ValueError):
    """A recipe (file, overlay or flag) is invalid; str(exc) is one line naming
    the file or flag and the key path. The pipeline exits 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


# --------------------------------------------------------------------------- sections
class DataSection(Section):
    """Stage 1 (dinov2_triton.data.load.prepare_dataset)."""
    source: Literal["fashion-mnist", "image-folder"] = "fashion-mnist"
    images: str | None = None            # the ImageFolder tree of source image-folder (--images DIR)
    per_class: int | None = Field(300, ge=1)   # train+val images per class (None: all)
    test_per_class: int | None = Field(100, ge=0)
    seed: int = Field(0, ge=0)
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)

    @model_validator(mode="after")
    def _source(self) -> "DataSection":
        if self.source == "image-folder" and not self.images:
            raise ValueError("source image-folder needs data.images: the ImageFolder tree (--images DIR)")
        if self.source == "fashion-mnist" and self.images:
            raise ValueError(f"images {self.images!r} with source fashion-mnist: set source: image-folder "
                             "(--images DIR does both)")
        return self


class TrainSection(Section):
    """Stage 2 (dinov2_triton.train, one FinetuneConfig). ``None`` in lr,
    lp_epochs, layer_decay, warmup_epochs and augment: chosen by the weights
    (see :func:`train_settings`)."""
    arch: Literal[ARCH_NAMES] = "vits14"  # type: ignore[valid-type]
    weights: str = "auto"                # auto | random | hub | a hub id | a checkpoint file
    img_size: int = Field(56, ge=14)
    head: Literal[HEADS] = "cls_mean"  # type: ignore[valid-type]
    mode: Literal[MODES] = "full"  # type: ignore[valid-type]
    cache_features: bool = False
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float | None = Field(None, gt=0)
    lp_epochs: int | None = Field(None, ge=0)
    lp_lr: float = Field(1e-3, gt=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    warmup_epochs: float | None = Field(None, ge=0)
    augment: bool | None = None
    min_lr: float = Field(1e-6, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    accum_steps: int = Field(1, ge=1)
    clip_grad: float = Field(0.0, ge=0)
    amp: Literal[AMPS] = "none"  # type: ignore[valid-type]
    grad_checkpointing: bool = False
    attention: Literal[ATTENTIONS] = "sdpa"  # type: ignore[valid-type]
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = 16.0
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    unfreeze_blocks: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    device: Literal[DEVICES] = "auto"  # type: ignore[valid-type]
    num_workers: int = Field(-1, ge=-1)
    max_train_batches: int = Field(0, ge=0)
    save_every_steps: int = Field(0, ge=0)
    backbone_overrides: dict[str, Any] = {}

    @field_validator("img_size")
    @classmethod
    def _patch_multiple(cls, v: int, info: ValidationInfo) -> int:
        # 14 px patches for DINOv2, 16 px for DINOv3 (dinov2_triton.train.archs); arch is validated first
        return check_image_size(info.data.get("arch", "vits14"), v, flag="img_size")


class ExportSection(Section):
    """Stage 3 (dinov2_triton.export.pipeline.run_export). ``None``: the export's own default."""
    variants: list[str] = Field(default_factory=lambda: list(DEFAULT_VARIANTS), min_length=1)
    max_batch_size: int = Field(8, ge=1)
    allow_failed_gates: bool = False
    calib_size: int | None = Field(None, ge=1)
    calib_method: str | None = None
    eval_size: int | None = Field(None, ge=1)
    bench_seconds: float | None = Field(None, ge=0)
    accuracy_budget: float | None = Field(None, ge=0)
    gates: list[str] = []                # SCOPE.FIELD=VALUE entries (dinov2_triton.export.gates)
    instances: int | None = Field(None, ge=1)
    preferred_batch_sizes: list[int] | None = None
    max_queue_delay_us: int | None = Field(None, ge=0)
    queue_timeout_ms: float | None = Field(None, ge=0)
    max_queue_size: int | None = Field(None, ge=0)
    default_variant: str | None = None
    opset: int | None = Field(None, ge=17)
    onnx_exporter: Literal["dynamo", "legacy"] | None = None
    options: dict[str, str | int | float | bool] = {}   # variant builder options (e.g. trt_workspace_gb: 4)

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: list[str]) -> list[str]:
        from dinov2_triton.export.registry import variant_names

        names = variant_names()
        unknown = [x for x in v if x not in names and x not in VARIANT_WORDS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {names} or {list(VARIANT_WORDS)}")
        return v


class ServeSection(Section):
    """Stage 4: the local Triton server (dinov2_triton.serve.local_server), on free loopback ports."""
    ready_timeout_s: float = Field(300.0, gt=0)


class ClassifySection(Section):
    """Classify a data split through the served ensemble (dinov2_triton.client.classifier)."""
    protocols: list[Protocol] = Field(default_factory=lambda: ["grpc", "http"], min_length=1)
    model: str = "dinov2"
    split: Literal["train", "val", "test"] = "test"
    retries: int = Field(3, ge=0)


class ThreadStudy(Section):
    """How to spend the cores on one model (dinov2_triton.bench.cpu_threads), in process."""
    variants: list[str] = Field(default_factory=lambda: ["onnx_int8_dynamic", "openvino_int8"], min_length=1)
    batch_size: int = Field(8, ge=1)
    seconds: float = Field(4.0, gt=0)


class OverloadSection(Section):
    """The bench stage's overload check, last (dinov2_triton.qa.overload): a bounded open-loop
    burst at ``factor`` x the measured capacity against the ensemble and its classifier."""
    enabled: bool = True
    factor: float = Field(3.0, gt=1)
    seconds: float = Field(5.0, gt=0)
    max_requests: int = Field(2000, ge=1)      # the burst never sends more
    protocol: Protocol = "grpc"
    strict: bool = False                       # True: a FAIL or a config without a queue policy fails the bench


class BenchSection(Section):
    """Stage 5 (dinov2_triton.pipeline.bench_stage.run_perf): in-process benchmark,
    perf_analyzer sweep, live parity, the report. ``None``: run_perf's default."""
    protocols: list[Protocol] = Field(default_factory=lambda: ["grpc"], min_length=1)
    concurrency: list[int] = Field(default_factory=lambda: [1, 4], min_length=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    window_ms: int = Field(4000, ge=100)
    stability_pct: float | None = Field(None, gt=0)
    max_trials: int | None = Field(None, ge=1)
    fixed_requests: int | None = Field(None, ge=1)   # smoke mode: no stability check (not a measurement)
    samples: int | None = Field(None, ge=1)
    models: list[str] | None = None      # None: every ready model of the repository
    in_process: bool = True
    variants: list[str] | None = None    # in-process variants (None: all; pytorch = eager)
    threads: list[int] | None = None     # in-process client threads
    seconds: float | None = Field(None, gt=0)
    parity: bool = True
    parity_max_images: int | None = Field(None, ge=1)
    gates: list[str] | None = None
    op_batch_size: int | None = Field(None, ge=1)
    op_concurrency: int | None = Field(None, ge=1)
    max_p99_ms: float | None = Field(None, gt=0)
    strict: bool = True                  # False: a measurement error is only reported (the run passes)
    allow_unstable: bool = True          # a sweep point that did not stabilise (busy host) is a warning
    thread_study: ThreadStudy | None = None
    overload: OverloadSection = OverloadSection()

    @field_validator("concurrency", "batch_sizes", "threads")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(x < 1 for x in v):
            raise ValueError(f"every entry must be >= 1, got {v}")
        return v


class SearchSection(Section):
    """The configuration search before the capacity measurement (dinov2_triton.tune.search)."""
    enabled: bool = True
    variants: list[str] = Field(default_factory=lambda: ["onnx_int8"], min_length=1)
    budget_min: float = Field(10.0, gt=0)
    point_budget_s: float = Field(75.0, gt=0)
    strategy: Literal["auto", "grid", "coordinate"] = "coordinate"
    instances: list[int] = Field(default_factory=lambda: [1, 2])
    threads: list[int] = Field(default_factory=lambda: [1, 2])
    queue_delays_us: list[int] = Field(default_factory=lambda: [0, 2000])
    preferred: list[list[int]] = Field(default_factory=lambda: [[], [4, 8]])
    max_batch_sizes: list[int] = Field(default_factory=lambda: [8, 16])
    queue_policies: list[bool] = []
    rate_precision: float = Field(0.1, gt=0, lt=1)
    start_rate: float = Field(40.0, gt=0)
    min_throughput: float | None = Field(None, gt=0)
    max_memory_mb: float | None = Field(None, gt=0)
    apply: bool = True                   # the winner becomes config.pbtxt; the server restarts and is checked


class TuneSection(Section):
    """The tune stage (dinov2_triton.pipeline.capacity_stage.run_tune): the serving configuration
    of the model the dinov2 ensemble calls, searched on this host with the queue policy on
    (``joint``: instances x threads; ``full``: capacity.search's space and strategy), applied,
    and the policy's A/B (capacity at the SLO with and without it) in the chosen configuration."""
    slo_p99_ms: float = Field(100.0, gt=0)
    space: Literal["joint", "full"] = "joint"
    instances: list[int] = Field(default_factory=lambda: [1, 2])
    threads: list[int] = Field(default_factory=lambda: [1, 2])
    budget_min: float = Field(3.0, gt=0)          # the search (the A/B comes after it)
    point_budget_s: float = Field(40.0, gt=0)     # one configuration's capacity
    ab_budget_s: float = Field(60.0, gt=0)        # each side of the A/B
    rate_window_ms: int = Field(1500, ge=500)
    rate_precision: float = Field(0.1, gt=0, lt=1)
    start_rate: float = Field(80.0, gt=0)
    ab_tolerance: float = Field(0.2, gt=0, lt=1)  # the policy costs capacity below (1 - this) x without it
    alternatives: int = Field(2, ge=0)            # next configurations tried where the policy costs capacity


class CapacitySection(Section):
    """Capacity at a p99 SLO under open-loop load (dinov2_triton.bench.capacity), after the search."""
    slo_p99_ms: float = Field(100.0, gt=0)
    models: list[str] = Field(default_factory=lambda: ["dinov2_onnx", "dinov2_onnx_int8"], min_length=1)
    repeats: int = Field(2, ge=1)
    budget_s: float = Field(240.0, gt=0)
    concurrency: list[int] = Field(default_factory=lambda: [4], min_length=1)   # the closed-loop sweep first
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    window_ms: int = Field(3000, ge=100)
    rate_window_ms: int | None = Field(None, ge=500)
    precision: float | None = Field(None, gt=0, lt=1)
    start_rate: float | None = Field(None, gt=0)
    max_rate: float | None = Field(None, gt=0)
    recheck_margin: float | None = Field(None, ge=0, lt=1)
    search: SearchSection = SearchSection()


class SweepRun(Section):
    """One run of a sweep: ``overlay`` (any recipe keys but ``sweep``) in ``<workdir>/<name>/``."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    overlay: dict[str, Any] = {}

    @field_validator("overlay")
    @classmethod
    def _no_nested_sweep(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "sweep" in v or "workdir" in v:
            raise ValueError("an overlay cannot set 'sweep' or 'workdir'")
        return v


class Recipe(Section):
    """The whole recipe (its defaults are the ``demo`` recipe)."""
    description: str = ""
    workdir: str | None = None
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES[:-1]), min_length=1)
    omp_num_threads: int = Field(2, ge=1)   # OMP_NUM_THREADS when the environment sets none
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    serve: ServeSection = ServeSection()
    tune: TuneSection = TuneSection()
    classify: ClassifySection = ClassifySection()
    bench: BenchSection = BenchSection()
    capacity: CapacitySection = CapacitySection()
    sweep: list[SweepRun] = []

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a stage is listed twice in {v}")
        needing = [s for s in v if s in NEEDS_SERVER]
        if needing and "serve" not in v:
            raise ValueError(f"{', '.join(needing)} need(s) the local server: add serve to {v}")
        return v

    @field_validator("sweep")
    @classmethod
    def _sweep_names(cls, v: list[SweepRun]) -> list[SweepRun]:
        names = [r.name for r in v]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must differ, got {names}")
        return v

    def ordered_stages(self) -> list[str]:
        """The recipe's stages in the order they run."""
        return [s for s in STAGES if s in self.stages]


# --------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class Layer:
    """One source of recipe values: ``source`` names it in messages."""
    source: str
    values: dict[str, Any]


@dataclass(frozen=True)
class ResolvedRecipe:
    """A validated recipe and where its values came from."""
    name: str
    recipe: Recipe
    layers: tuple[Layer, ...]
    runs: tuple[tuple[str, Recipe], ...] = field(default=())   # the sweep's runs (name, recipe), if any

    def to_yaml(self, recipe: Recipe | None = None) -> str:
        """The resolved recipe as a YAML recipe file (reusable with --recipe FILE)."""
        r = recipe or self.recipe
        head = [f"# dinov2-triton pipeline: the resolved recipe '{self.name}'", "# layers, later ones win:"]
        head += [f"#   {layer.source}" for layer in self.layers]
        return "\n".join(head) + "\n" + yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False)


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    from importlib import resources

    folder = resources.files(RECIPES_PACKAGE).joinpath("resources", "recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_path(name_or_file: str | os.PathLike, *, relative_to: Path | None = None) -> Path:
    """A shipped recipe's file (by name) or a recipe file (a path ending in .yaml/.yml)."""
    text = str(name_or_file)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise RecipeError(f"recipe file {path}: not found")
        return path
    from dinov2_triton.core.resources import resource_path

    names = shipped_recipes()
    if text not in names:
        raise RecipeError(f"recipe {text!r}: no such recipe; shipped: {', '.join(names)} (or give a FILE.yaml)")
    return resource_path(RECIPES_PACKAGE, "recipes", f"{text}.yaml")


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{what} {path}: not found") from None
    except OSError as exc:
        raise RecipeError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe keys, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"{path}: keys must be strings, got {bad[0]!r}")
    return data


def recipe_layers(name_or_file: str | os.PathLike, *, relative_to: Path | None = None,
                  _seen: tuple[Path, ...] = ()) -> list[Layer]:
    """The layers of a recipe file: its ``base`` chain first, then the file itself."""
    path = recipe_path(name_or_file, relative_to=relative_to).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError(f"{path}: field 'base': the base chain loops ({chain})")
    data = read_yaml_mapping(path, "recipe file")
    base = data.pop("base", None)
    layers: list[Layer] = []
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: field 'base': expected a recipe name or a file, got {base!r}")
        try:
            layers = recipe_layers(base, relative_to=path.parent, _seen=(*_seen, path))
        except RecipeError as exc:
            if _seen or "field 'base'" in str(exc):
                raise
            raise RecipeError(f"{path}: field 'base': {exc}") from None
    return layers + [Layer(str(path), data)]


def config_layer(path: str | os.PathLike) -> Layer:
    """``--config FILE.yaml``: an overlay of any recipe keys."""
    path = Path(path).expanduser()
    data = read_yaml_mapping(path, "--config")
    if "base" in data:
        raise RecipeError(f"{path}: field 'base': not allowed in a --config overlay (it overlays the --recipe); "
                          f"use --recipe {path} for a recipe file with a base")
    return Layer(str(path), data)


def set_layer(entry: str) -> Layer:
    """``--set KEY=VALUE``: a dotted key path and a YAML value (``train.epochs=1``,
    ``export.variants=[onnx]``, ``data.images=null``)."""
    key, sep, text = entry.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {entry!r}: expected KEY=VALUE, e.g. train.epochs=1")
    parts = key.split(".")
    if any(not p for p in parts):
        raise RecipeError(f"--set {entry!r}: bad key path {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {entry!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
    for p in reversed(parts):
        value = {p: value}
    return Layer(f"--set {entry}", value)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _source_of(loc: Sequence[Any], layers: Sequence[Layer]) -> str:
    """The last layer that set the value at ``loc`` (or a mapping above it)."""
    keys = [k for k in loc if isinstance(k, str)]
    for layer in reversed(layers):
        node: Any = layer.values
        found = False
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                break
            node, found = node[k], True
            if not isinstance(node, Mapping):
                break
        if found:
            return layer.source
    return layers[-1].source if layers else "recipe"


def _field_path(loc: Sequence[Any]) -> str:
    """('bench', 'protocols', 1) -> 'bench.protocols[1]' (the style of dinov2_triton.core.records)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(recipe)"


def validate(layers: Sequence[Layer], *, context: str = "") -> Recipe:
    """Merge ``layers`` and validate the result; RecipeError names the layer and key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer.values)
    try:
        return Recipe.model_validate(merged)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        loc = tuple(errors[0].get("loc", ()))
        source = _source_of(loc, layers) + (f" ({context})" if context else "")
        if errors[0].get("type") == "value_error":   # our own checks: their message says it all
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            msg = str(errors[0].get("msg", "")).removeprefix("Value error, ")
            raise RecipeError(f"{source}: field '{_field_path(loc)}': {msg}{more}") from None
        raise RecipeError(format_validation_error(exc, source)) from None


def resolve(recipe: str | os.PathLike | None = None, *, config: str | os.PathLike | None = None,
            images: str | os.PathLike | None = None, sets: Sequence[str] = ()) -> ResolvedRecipe:
    """The layered recipe (see the module docstring), validated; with a sweep,
    every run's recipe too. ``recipe`` None: ``images`` when images are given, else ``demo``."""
    name = str(recipe) if recipe is not None else ("images" if images is not None else "demo")
    base_layers = recipe_layers(name)
    later: list[Layer] = []
    if config is not None:
        later.append(config_layer(config))
    if images is not None:
        later.append(Layer("--images", {"data": {"source": "image-folder",
                                                "images": str(Path(images).expanduser().resolve())}}))
    later += [set_layer(s) for s in sets]
    layers = (*base_layers, *later)
    top = validate(layers)
    runs = []
    for i, run in enumerate(top.sweep):
        overlay = Layer(f"{_source_of(('sweep',), layers)}: sweep[{i}] '{run.name}'", run.overlay)
        runs.append((run.name, validate((*base_layers, overlay, *later), context=f"sweep run '{run.name}'")))
    return ResolvedRecipe(name=name, recipe=top, layers=layers, runs=tuple(runs))


def params_json(section: BaseModel | Mapping[str, Any]) -> str:
    """A section's values as one canonical JSON string (a stage stamp parameter)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else dict(section)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- train settings
#: FinetuneConfig fields the pipeline sets itself (not recipe keys)
PIPELINE_TRAIN_FIELDS = ("data_path", "output_path", "resume", "progress")
#: what the weights choose when the recipe leaves it to them (measured: README "Fine-tuning").
#: A randomly initialised ViT learns from scratch: high lr, no layer-wise decay (it only
#: protects pretrained features), no augmentation (a few epochs are too few to profit).
#: Pretrained DINOv2 weights: small lr, layer decay 0.75, a linear-probe warm start so the
#: random head does not wreck the features.
BY_WEIGHTS = {
    "random": {"lr": 1e-3, "layer_decay": 1.0, "warmup_epochs": 0.5, "augment": False, "lp_epochs": 0},
    "pretrained": {"lr": 1e-4, "layer_decay": 0.75, "warmup_epochs": 1.0, "augment": True, "lp_epochs": 1},
}


def train_settings(train: TrainSection, *, weights: str, pretrained: bool) -> dict[str, Any]:
    """The FinetuneConfig values (without the PIPELINE_TRAIN_FIELDS) for this
    section and resolved ``weights``; validated by the train stage's own checks
    (ConfigError -> RecipeError naming ``train``)."""
    from dinov2_triton.train.finetune_config import ConfigError, resolve_config

    chosen = BY_WEIGHTS["pretrained" if pretrained else "random"]
    values = train.model_dump()
    for key, default in chosen.items():
        if values[key] is None:
            values[key] = default
    if train.mode == "linear" and train.lp_epochs is None:
        values["lp_epochs"] = 0          # a linear probe has no warm start
    values["no_augment"] = not values.pop("augment")
    values["weights"] = weights
    try:
        cfg = resolve_config(values)
    except ConfigError as exc:
        raise RecipeError(f"train: {exc}") from None
    out = cfg.to_dict()
    for k in PIPELINE_TRAIN_FIELDS:
        out.pop(k, None)
    return out

