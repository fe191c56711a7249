"""The preprocessing record: defined once, stored with the weights, read by
training, export, the Triton preprocessing model and every client.

The reference implementation uses PIL + numpy only (no torch), so the server's
Python model and thin clients can import it cheaply. This file is copied into
the preprocess model's version folder as `dinov2_preprocessing.py` (the
Triton container has numpy and Pillow, not this project), so it imports
nothing of the project but dinov2_triton.core.images (copied beside it).

Which record a consumer uses is decided in one place,
dinov2_triton.train.preprocessing_source.resolve_preprocessing."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: patch sizes of the model families (DINOv2 14 px, DINOv3 16 px); the model
#: factory checks the exact one of the arch (dinov2_triton.train.archs)
PATCH_SIZES = (14, 16)
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224          # square crop fed to the network; multiple of the patch size (14 or 16)
    resize_size: int = 256         # shorter side is resized to this before the crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop: str = "center"
    layout: str = field(default="NCHW")  # what the graph's `pixel_values` expects

    def __post_init__(self) -> None:
        if self.image_size <= 0 or all(self.image_size % p for p in PATCH_SIZES):
            raise ValueError(
                f"preprocessing.image_size={self.image_size}: must be a positive multiple of "
                f"a patch size (14 for DINOv2, 16 for DINOv3; e.g. 112, 224, 518)")
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
                         "open images with dinov2_triton.core.images.open_rgb")
    return normalize(resize_and_crop(img, cfg), cfg)


def preprocess_source(source, cfg: PreprocessConfig, *, name: str | None = None) -> np.ndarray:
    """Path or encoded bytes -> float32 [3,H,W] via open_rgb + preprocess_pil."""
    from dinov2_triton.core.images import open_rgb

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
