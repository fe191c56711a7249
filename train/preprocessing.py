"""The preprocessing record: defined once, stored with the weights, read by
training, export, the Triton preprocessing model and every client.

The reference implementation uses PIL + numpy only (no torch), so the server's
Python model and thin clients can import it cheaply. This file is copied into
the preprocess model's version folder as `dinov2_preprocessing.py` (the
Triton container has numpy and Pillow, not this project): project imports
stay inside functions.

Which record a consumer uses is decided in one place, `resolve_preprocessing`
(its docstring gives the order)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
#: the Triton model that runs this record server-side, and the record's file in
#: each of its version folders (written by export, read by the server and here)
PREPROCESS_MODEL = "dinov2_preprocess"
PREPROCESSING_FILE = "preprocessing.json"


class PreprocessingError(ValueError):
    """No usable preprocessing record, or two records that disagree; the
    message names the file(s)."""


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224          # square crop fed to the network; multiple of 14
    resize_size: int = 256         # shorter side is resized to this before the crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop: str = "center"
    layout: str = field(default="NCHW")  # what the graph's `pixel_values` expects

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % PATCH_SIZE:
            raise ValueError(
                f"preprocessing.image_size={self.image_size}: must be a positive multiple of "
                f"the DINOv2 patch size {PATCH_SIZE} (e.g. 112, 224, 518)")
        if self.resize_size < self.image_size:
            raise ValueError(
                f"preprocessing.resize_size={self.resize_size} is smaller than "
                f"image_size={self.image_size}; the centre crop would not fit")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"preprocessing.interpolation={self.interpolation!r}: "
                             f"choose one of {_INTERPOLATIONS}")
        if self.crop != "center":
            raise ValueError(f"preprocessing.crop={self.crop!r}: only 'center' is supported")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("preprocessing.mean/std: need three values each, std > 0")

    @classmethod
    def for_image_size(cls, image_size: int, **kw: Any) -> "PreprocessConfig":
        """timm/DINOv2 evaluation convention: resize to size/0.875, centre crop."""
        return cls(image_size=image_size, resize_size=int(round(image_size / 0.875)), **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"preprocessing record has unknown fields {sorted(unknown)}")
        kw = dict(d)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)


def _pil_resample(name: str):
    from PIL import Image

    return {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
            "nearest": Image.NEAREST}[name]


def resize_and_crop(img, cfg: PreprocessConfig):
    """Resize the shorter side to cfg.resize_size, then centre crop image_size."""
    w, h = img.size
    scale = cfg.resize_size / min(w, h)
    new_w, new_h = max(cfg.resize_size, round(w * scale)), max(cfg.resize_size, round(h * scale))
    img = img.resize((new_w, new_h), resample=_pil_resample(cfg.interpolation))
    left = (new_w - cfg.image_size) // 2
    top = (new_h - cfg.image_size) // 2
    return img.crop((left, top, left + cfg.image_size, top + cfg.image_size))


def normalize(img, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> float32 [3,H,W], scaled to [0,1] and normalised."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_pil(img, cfg: PreprocessConfig) -> np.ndarray:
    """The evaluation transform: RGB PIL image -> float32 array [3,H,W]."""
    if img.mode != "RGB":
        raise ValueError(f"preprocess_pil expects an RGB image, got mode {img.mode}; "
                         "open images with train.images.open_rgb")
    return normalize(resize_and_crop(img, cfg), cfg)


def preprocess_source(source, cfg: PreprocessConfig, *, name: str | None = None) -> np.ndarray:
    """Path or encoded bytes -> float32 [3,H,W] via open_rgb + preprocess_pil."""
    from train.images import open_rgb

    return preprocess_pil(open_rgb(source, name=name), cfg)


def train_transform(cfg: PreprocessConfig, *, augment: bool = True):
    """torchvision transform for training: light augmentation that ends in the
    same resize/normalise as evaluation (so train and serve see the same scale)."""
    import torch
    from torchvision import transforms as T

    if not augment:
        return eval_transform(cfg)

    def to_tensor(img):
        return torch.from_numpy(normalize(img, cfg))

    return T.Compose([
        T.RandomResizedCrop(cfg.image_size, scale=(0.6, 1.0),
                            interpolation=getattr(T.InterpolationMode, cfg.interpolation.upper())),
        T.RandomHorizontalFlip(),
        T.Lambda(to_tensor),
    ])


def eval_transform(cfg: PreprocessConfig):
    import torch

    return lambda img: torch.from_numpy(preprocess_pil(img, cfg))


# ----------------------------------------------------------------------------
# Which record to use
# ----------------------------------------------------------------------------
def read_preprocessing_file(path) -> PreprocessConfig:
    """A JSON file holding the record (``preprocessing.json``) or a JSON object
    with a ``"preprocessing"`` entry (``export_manifest.json``)."""
    from pathlib import Path

    from train.artifact_io import read_json

    path = Path(path)
    try:
        data = read_json(path, what="preprocessing file")
    except (OSError, ValueError) as exc:
        raise PreprocessingError(str(exc)) from None
    if isinstance(data, Mapping) and isinstance(data.get("preprocessing"), Mapping):
        data = data["preprocessing"]
    if not isinstance(data, Mapping):
        raise PreprocessingError(f"{path}: expected a preprocessing record (a JSON object)")
    try:
        return PreprocessConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise PreprocessingError(f"{path}: {exc}") from None


def repository_preprocessing_file(repository, model: str = PREPROCESS_MODEL):
    """The record a model repository serves: the newest numbered version of
    ``<model>/<version>/preprocessing.json``, else ``<model>/preprocessing.json``,
    else the ``preprocessing`` entry of ``export_manifest.json``."""
    from pathlib import Path

    repo = Path(repository)
    if not repo.is_dir():
        raise PreprocessingError(f"--repository {repo}: not a folder")
    model_dir = repo / model
    versions = sorted((p for p in model_dir.glob(f"*/{PREPROCESSING_FILE}") if p.parent.name.isdigit()),
                      key=lambda p: -int(p.parent.name))
    for cand in [*versions, model_dir / PREPROCESSING_FILE, repo / "export_manifest.json"]:
        if cand.is_file():
            return cand
    raise PreprocessingError(f"--repository {repo}: neither {model_dir}/<version>/{PREPROCESSING_FILE} "
                             f"nor {repo / 'export_manifest.json'} exists; was it written by `python -m export`?")


def _differences(a: PreprocessConfig, b: PreprocessConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])


def resolve_preprocessing(*, preprocessing=None, model_path=None, repository=None,
                          model: str = PREPROCESS_MODEL, checkpoint=None) -> tuple[PreprocessConfig, str]:
    """The preprocessing record a consumer (client, parity, perf.run, the
    in-process benchmark) must use, and where it came from. One order:

    1. ``preprocessing``: a file the user named explicitly (``--preprocessing``)
       is used as given; nothing else is read.
    2. ``repository`` (``--repository``): the record the server runs
       (:func:`repository_preprocessing_file`). When ``model_path`` is given
       too, the checkpoint's record must be identical: a difference means the
       repository was exported from another checkpoint (or another record) and
       is a PreprocessingError naming both files, never a silent choice. A
       repository without any record is an error, unless ``model_path`` is
       given (then its record is the only one, and the source says so).
    3. ``model_path`` alone: the checkpoint's ``preprocessing`` (train.checkpoint).

    ``checkpoint``: the CheckpointRecord of ``model_path`` when the caller has
    already read it (saves a second torch.load). Raises PreprocessingError (or
    train.records.RecordError for a bad checkpoint), both ValueErrors naming
    the file at fault."""
    if preprocessing is not None:
        return read_preprocessing_file(preprocessing), f"{preprocessing} (given explicitly)"
    ckpt = None
    if checkpoint is not None:
        ckpt = checkpoint.preprocessing
    elif model_path is not None:
        from train.checkpoint import read_checkpoint

        ckpt = read_checkpoint(model_path).preprocessing
    if repository is not None:
        try:
            repo_file = repository_preprocessing_file(repository, model)
        except PreprocessingError as exc:
            if ckpt is None:
                raise
            return ckpt, f"{model_path} (the repository holds no record: {exc})"
        served = read_preprocessing_file(repo_file)
        if ckpt is not None and served != ckpt:
            raise PreprocessingError(
                f"{repo_file} and {model_path} hold different preprocessing records "
                f"({_differences(served, ckpt)}): the repository was exported from another checkpoint. "
                f"Re-export it (python -m export --model_path {model_path} ...) or pass the checkpoint "
                "it was exported from")
        return served, (f"{repo_file} (= {model_path})" if ckpt is not None else str(repo_file))
    if ckpt is not None:
        return ckpt, str(model_path)
    raise PreprocessingError("no preprocessing record: pass --model-path model_final.pth, --preprocessing "
                             "preprocessing.json or --repository ./model_repository")
