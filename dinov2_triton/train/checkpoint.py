"""The checkpoint record: what `model_final.pth`, `model_best.pth` and
`checkpoint_last.pth` hold, its one writer and its one reader.

    record = make_checkpoint_record(model, arch=..., class_names=..., preprocessing=cfg, ...)
    save_checkpoint(record, "models/model_final.pth")      # atomic, weights_only-loadable
    record = read_checkpoint("models/model_final.pth")     # -> CheckpointRecord

The image size is held once, in ``preprocessing.image_size`` (the record
that every client and the server use); ``num_classes`` is
``len(class_names)``. Both are properties, never separate fields that could
disagree. Every value is a plain type or a tensor, so the reader uses
``torch.load(weights_only=True)`` and a checkpoint can never run code.

Schema history (``schema_version``):

* 1 - written before typed records: no ``schema_version``, a
  ``format_version: 1`` field, ``img_size`` and ``num_classes`` beside
  ``preprocessing`` and ``class_names``, training state at the top level
  under ``kind: "training_state"``. Still read: ``_migrate`` checks that the
  duplicated values agree (and refuses the file when they do not) and derives
  ``pretrained`` from the free-text weights source, which is the only place
  that text is interpreted. Its position embeddings were resized with timm's
  resample (``pos_embed_resampling: "timm_bicubic_antialias"``); the reader
  warns in one line where that differs from the official DINOv2
  interpolation (plain arch, pretrained, not 518 px).
* 2 - typed records; DINOv2 only.
* 3 - this module: adds ``family`` ("dinov2" | "dinov3") and
  ``position_encoding`` ("learned" | "rope"), which must agree with ``arch``
  (dinov2_triton.train.archs). A schema-2 file is a DINOv2 one (family
  "dinov2", a learned position embedding); ``_migrate`` says so.

Importing this module does not import torch (``dinov2_triton.train.model`` imports it)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Sequence

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dinov2_triton.core.preprocessing import PreprocessConfig
from dinov2_triton.core.records import Record, RecordError
from dinov2_triton.train.archs import FAMILIES, POSITION_ENCODINGS, SPECS, check_image_size
from dinov2_triton.train.pos_embed import LEGACY_TIMM, METHODS, OFFICIAL_GRID_PX, ROPE_FIXED_GRID, official_method

log = logging.getLogger(__name__)

#: how the embedding fed to the linear head is made (dinov2_triton.train.model.DinoV2Classifier)
HEADS = ("cls_mean", "cls", "mean")
CHECKPOINT_LAST, MODEL_BEST, MODEL_FINAL = "checkpoint_last.pth", "model_best.pth", "model_final.pth"


def _to_preprocess_config(value: Any) -> PreprocessConfig:
    if isinstance(value, PreprocessConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a preprocessing record (a mapping), got {type(value).__name__}")
    return PreprocessConfig.from_dict(value)   # ValueError names the bad sub-field


#: PreprocessConfig stays a plain dataclass (the server's copy of
#: train/preprocessing.py has no pydantic); stored as its to_dict() form.
PreprocessingField = Annotated[PreprocessConfig, PlainValidator(_to_preprocess_config),
                               PlainSerializer(lambda cfg: cfg.to_dict())]


class TrainingResume(BaseModel):
    """What `checkpoint_last.pth` adds so a run resumes exactly (dinov2_triton.train.trainer)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    optimizer: dict[str, Any]                       # torch optimizer.state_dict()
    scheduler: dict[str, Any]                       # dinov2_triton.train.optim.Schedule.state_dict()
    scaler: dict[str, Any] = Field(default_factory=dict)   # GradScaler state, {} when AMP is off
    rng: dict[str, Any]                             # dinov2_triton.train.engine.rng_state()
    train_state: dict[str, Any]                     # dinov2_triton.train.engine.TrainState.to_dict()

    @field_validator("train_state")
    @classmethod
    def _has_position(cls, value: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in ("epoch", "step", "batch_in_epoch") if k not in value]
        if missing:
            raise ValueError(f"lacks {missing}")
        return value


class CheckpointRecord(Record):
    """A trained DINOv2 or DINOv3 classifier: weights plus everything needed
    to rebuild, preprocess for and describe it (fields: docs/architecture.md)."""

    SCHEMA_VERSION: ClassVar[int] = 3
    KIND: ClassVar[str] = "checkpoint"
    REGENERATE: ClassVar[str] = "dinov2-triton train --data-path DATA --output-path MODELS ..."

    arch: str                                       # short name (dinov2_triton.train.archs.SPECS), e.g. "vits14"
    family: Literal[FAMILIES]                       # "dinov2" | "dinov3" (the arch's)
    position_encoding: Literal[tuple(POSITION_ENCODINGS.values())]   # "learned" (DINOv2) | "rope" (DINOv3)
    head: Literal[HEADS]
    class_names: list[str] = Field(min_length=2)    # label index order (labels.txt)
    preprocessing: PreprocessingField               # the one image size: preprocessing.image_size
    weights_source: str                             # human-readable, for logs and reports
    pretrained: bool                                # False: random init (accuracy says nothing about DINOv2)
    # how pretrained position embeddings were resized to the image size
    # (dinov2_triton.train.pos_embed.METHODS; since schema 2 the official method of the arch)
    pos_embed_resampling: str
    backbone_overrides: dict[str, Any] = Field(default_factory=dict)   # extra timm kwargs (tiny test models)
    state_dict: dict[str, Any]                      # plain model keys -> tensors (no peft wrappers)
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)  # train.finetune_config.FinetuneConfig.to_dict()
    versions: dict[str, str] = Field(default_factory=dict)
    git_revision: str = "unknown"
    mode: str | None = None                         # linear | full | lora | lastn
    lora: dict[str, Any] | None = None              # LoRA settings that were merged into state_dict
    best_epoch: int | None = None                   # model_best.pth: the epoch it is from
    epochs_trained: int | None = None               # model_final.pth
    training: TrainingResume | None = None          # checkpoint_last.pth only

    # ------------------------------------------------------------------ views
    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------------ checks
    @field_validator("state_dict")
    @classmethod
    def _tensors(cls, value: dict[str, Any]) -> dict[str, Any]:
        import torch

        if not value:
            raise ValueError("no tensors")
        bad = [k for k, v in value.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"values must be tensors; not for {bad[:3]}")
        return value

    @field_validator("pos_embed_resampling")
    @classmethod
    def _known_resampling(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"{value!r} is not one of {list(METHODS)}")
        return value

    @model_validator(mode="after")
    def _arch_family_agree(self) -> "CheckpointRecord":
        spec = SPECS.get(self.arch)
        if spec is None:
            raise ValueError(f"arch {self.arch!r} is not one of {list(SPECS)}")
        if self.family != spec.family or self.position_encoding != spec.position_encoding:
            raise ValueError(f"family {self.family!r} / position_encoding {self.position_encoding!r} do not "
                             f"describe arch {self.arch!r} ({spec.family}, {spec.position_encoding})")
        if (self.pos_embed_resampling == ROPE_FIXED_GRID) != (spec.family == "dinov3"):
            raise ValueError(f"pos_embed_resampling {self.pos_embed_resampling!r} is not one of a "
                             f"{spec.family} model")
        try:
            check_image_size(self.arch, self.preprocessing.image_size, flag="preprocessing.image_size")
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    @field_validator("class_names")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dup = sorted({c for c in value if value.count(c) > 1})
        if dup:
            raise ValueError(f"duplicate class names {dup}")
        return value

    @field_validator("config")
    @classmethod
    def _config_agrees(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # config is the run's settings, kept for provenance; a different image
        # size there would mean the record lies about what the weights expect.
        pre = info.data.get("preprocessing")
        size = value.get("img_size")
        if pre is not None and size is not None and size != pre.image_size:
            raise ValueError(f"img_size {size} differs from preprocessing.image_size {pre.image_size}")
        return value

    # ------------------------------------------------------------------ old files
    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version == 0 and data.get("format_version") == 1:
            return _migrate_schema_2(_migrate_format_v1(data))
        if version == 0:
            raise RecordError("no schema_version and no format_version 1: not a checkpoint of dinov2-triton train")
        if version == 2:
            return _migrate_schema_2(data)
        raise RecordError(f"schema_version {version} is not one this code wrote")


def _migrate_schema_2(data: dict[str, Any]) -> dict[str, Any]:
    """schema 2 -> 3: every schema-2 checkpoint is a DINOv2 one (learned position embedding)."""
    data = dict(data)
    for key in ("family", "position_encoding"):
        if key in data:
            raise RecordError(f"schema_version 2 with a {key!r} field: not a file this code wrote")
    data["family"], data["position_encoding"] = "dinov2", POSITION_ENCODINGS["dinov2"]
    data["schema_version"] = CheckpointRecord.SCHEMA_VERSION
    return data


def _migrate_format_v1(data: dict[str, Any]) -> dict[str, Any]:
    """format_version 1 (no schema_version) -> schema 2; see the module docstring."""
    data = dict(data)
    data.pop("format_version")
    pre = data.get("preprocessing")
    img_size = data.pop("img_size", None)
    if isinstance(pre, Mapping) and img_size is not None and pre.get("image_size") != img_size:
        raise RecordError(f"img_size {img_size} and preprocessing.image_size {pre.get('image_size')} "
                          "disagree: the checkpoint does not say which size its weights expect")
    num_classes = data.pop("num_classes", None)
    names = data.get("class_names")
    if num_classes is not None and isinstance(names, list) and num_classes != len(names):
        raise RecordError(f"num_classes {num_classes} but {len(names)} class_names")
    if "pretrained" not in data:
        # The one place the free-text source is interpreted: format 1 wrote
        # "random init (...)" for --weights random and nothing else starts so.
        data["pretrained"] = not str(data.get("weights_source", "")).lower().startswith("random")
    # format 1 was built with timm's load-time resample for every arch
    data.setdefault("pos_embed_resampling", LEGACY_TIMM)
    if data.pop("kind", None) == "training_state":
        data.pop("epoch", None)   # duplicates of train_state's epoch/step
        data.pop("step", None)
        data["training"] = {k: data.pop(k) for k in ("optimizer", "scheduler", "scaler", "rng", "train_state")
                            if k in data}
    data["schema_version"] = 2
    return data


# ----------------------------------------------------------------------------- writer
def make_checkpoint_record(model, *, arch: str, class_names: Sequence[str], preprocessing: PreprocessConfig,
                           weights_source: str, pretrained: bool, metrics: Mapping[str, Any] | None = None,
                           config: Mapping[str, Any] | None = None,
                           backbone_overrides: Mapping[str, Any] | None = None, mode: str | None = None,
                           lora: Mapping[str, Any] | None = None, best_epoch: int | None = None,
                           epochs_trained: int | None = None,
                           training: TrainingResume | Mapping[str, Any] | None = None,
                           pos_embed_resampling: str | None = None) -> CheckpointRecord:
    """The record of a DinoV2Classifier (weights copied to CPU) with the
    versions and git revision of this run; family and position encoding are
    the arch's (dinov2_triton.train.archs).

    pos_embed_resampling: dinov2_triton.train.model.BuildResult.pos_embed_resampling, or
    for a resumed run the resumed record's value; None means the method
    build_model applies now (the official one for the model's arch)."""
    from dinov2_triton.core.artifact_io import git_revision, jsonable, library_versions

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    spec = SPECS.get(arch)
    if spec is None:
        raise ValueError(f"arch {arch!r}: choose one of {list(SPECS)}")
    reg = getattr(model.backbone, "reg_token", None)
    n_reg = int(reg.shape[1]) if reg is not None else 0
    # jsonable: metrics/config must be plain values for torch.load(weights_only=True)
    return CheckpointRecord.new(
        arch=arch, family=spec.family, position_encoding=spec.position_encoding, head=model.head_type,
        class_names=list(class_names), preprocessing=preprocessing,
        weights_source=weights_source, pretrained=bool(pretrained),
        backbone_overrides=jsonable(dict(backbone_overrides or {})), state_dict=state,
        metrics=jsonable(dict(metrics or {})), config=jsonable(dict(config or {})),
        versions=library_versions(), git_revision=git_revision(), mode=mode,
        lora=jsonable(dict(lora)) if lora else None, best_epoch=best_epoch, epochs_trained=epochs_trained,
        training=training,
        pos_embed_resampling=pos_embed_resampling or official_method(n_reg, spec.family))


def save_checkpoint(record: CheckpointRecord, path: str | Path) -> Path:
    """The one checkpoint writer: torch.save of record.to_dict(), atomically
    (temp file beside `path`, fsync, rename; umask permissions)."""
    from dinov2_triton.core.artifact_io import atomic_save_torch

    return atomic_save_torch(path, record.to_dict())


# ----------------------------------------------------------------------------- reader
def read_checkpoint(path: str | Path) -> CheckpointRecord:
    """The one checkpoint reader: torch.load(weights_only=True) (refuses
    pickled code) validated into a CheckpointRecord. Raises RecordError with
    one line naming the file (and the field)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: checkpoint not found (train first: dinov2-triton train ...)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: name the file, one line
        raise RecordError(f"{path}: refused or unreadable checkpoint ({_load_failure(exc)})") from None
    record = CheckpointRecord.from_dict(data, source=path)
    if _old_resampling_differs(record):
        log.warning("%s: made before position embeddings followed the official DINOv2 interpolation; its "
                    "embeddings follow the old resampling (%s), slightly off the official model's at %d px "
                    "(fine-tune again for the official ones)", path, LEGACY_TIMM, record.image_size)
    return record


def _old_resampling_differs(record: CheckpointRecord) -> bool:
    """timm's resample equals the official one for register models, and
    nothing was resampled for random weights or at the checkpoints' own 518 px."""
    return (record.pos_embed_resampling == LEGACY_TIMM and record.pretrained
            and "reg4" not in record.arch and record.image_size != OFFICIAL_GRID_PX)


def _load_failure(exc: Exception) -> str:
    """The informative line of a torch.load error: for a refused pickle the
    'Unsupported global ...' line, not the generic advice that precedes it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported global" in ln or "WeightsUnpickler error" in ln:
            return "not a plain weights file: " + ln.split("error:", 1)[-1].strip()
    return lines[0] if lines else type(exc).__name__
