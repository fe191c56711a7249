"""The architectures this project builds: one table for DINOv2 and DINOv3.

Cheap to import (no torch): the fine-tuning configuration, the checkpoint
record and the CLIs validate `--arch` and the image size against it before
anything heavy is loaded; `dinov2_triton.train.model` builds from it.

* DINOv2 (facebookresearch/dinov2, 2023): 14 px patches, a learned absolute
  position embedding (resampled once to the fixed input size,
  train/pos_embed.py), with or without 4 registers.
* DINOv3 (facebookresearch/dinov3, 2025): 16 px patches, 4 registers
  ("storage tokens") and rotary position encoding (RoPE) in every attention
  layer, no learned position embedding. timm builds them as `Eva` models
  (`vit_*_patch16_dinov3`); the `_qkvb` variants keep the query/value biases
  the official checkpoints carry (timm's plain variants drop them; the key
  bias is masked to zero in the official model and cancels in the softmax
  anyway). The 7B has no qkv bias at all.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("dinov2", "dinov3")
#: how messages and reports write the family
FAMILY_NAMES = {"dinov2": "DINOv2", "dinov3": "DINOv3"}
#: how a family encodes positions (the checkpoint record's `position_encoding`)
POSITION_ENCODINGS = {"dinov2": "learned", "dinov3": "rope"}


@dataclass(frozen=True)
class ArchSpec:
    name: str               # what users type (--arch), e.g. "vits14", "dinov3_vits16"
    timm_name: str          # the timm architecture it is built as
    family: str             # "dinov2" | "dinov3"
    patch_size: int
    registers: int
    # where the official checkpoint comes from (for the "how to get weights" message)
    weights_hint: str
    hf_repo: str | None = None   # the Hugging Face transformers model of the official weights

    @property
    def position_encoding(self) -> str:
        return POSITION_ENCODINGS[self.family]

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]

    @property
    def weights_file_glob(self) -> str:
        """The official checkpoint's file name as released (DINOv3 files carry
        the data set and a hash: dinov3_vits16_pretrain_lvd1689m-08c60483.pth)."""
        if self.family == "dinov2":
            return f"dinov2_{self.name}_pretrain.pth"
        return f"{self.name}_pretrain_*.pth"


def _v2(name: str, size: str) -> ArchSpec:
    reg = name.endswith("_reg4")
    base = name.removesuffix("_reg4")
    return ArchSpec(name, f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2", "dinov2", 14, 4 if reg else 0,
                    f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{base}/dinov2_{name}_pretrain.pth",
                    f"facebook/dinov2{'-with-registers' if reg else ''}-{size}")


def _v3(name: str, timm_name: str) -> ArchSpec:
    short = name.removeprefix("dinov3_")
    return ArchSpec(name, timm_name, "dinov3", 16, 4, f"dinov3_{short}_pretrain_lvd1689m-<hash>.pth "
                    "(facebookresearch/dinov3 README: the download links are granted on request)",
                    f"facebook/dinov3-{short}-pretrain-lvd1689m")


SPECS: dict[str, ArchSpec] = {s.name: s for s in (
    _v2("vits14", "small"), _v2("vitb14", "base"), _v2("vitl14", "large"), _v2("vitg14", "giant"),
    _v2("vits14_reg4", "small"), _v2("vitb14_reg4", "base"), _v2("vitl14_reg4", "large"),
    _v2("vitg14_reg4", "giant"),
    _v3("dinov3_vits16", "vit_small_patch16_dinov3_qkvb"),
    _v3("dinov3_vits16plus", "vit_small_plus_patch16_dinov3_qkvb"),
    _v3("dinov3_vitb16", "vit_base_patch16_dinov3_qkvb"),
    _v3("dinov3_vitl16", "vit_large_patch16_dinov3_qkvb"),
    _v3("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3_qkvb"),
    _v3("dinov3_vit7b16", "vit_7b_patch16_dinov3"),
)}
ARCH_NAMES = tuple(SPECS)


def arch_spec(arch: str, flag: str = "--arch") -> ArchSpec:
    """The spec of a short name (or of the timm name it is built as)."""
    if arch in SPECS:
        return SPECS[arch]
    for spec in SPECS.values():
        if spec.timm_name == arch:
            return spec
    raise ValueError(f"{flag} {arch!r}: choose one of {', '.join(ARCH_NAMES)}")


def family_of(arch: str) -> str:
    """'dinov2' or 'dinov3' for a short or timm arch name."""
    return arch_spec(arch).family


def check_image_size(arch: str, img_size: object, flag: str = "--img-size") -> int:
    """The input size must be a positive multiple of the arch's patch size
    (14 for DINOv2, 16 for DINOv3); returns it, or raises ValueError naming
    `flag`, the arch and sizes that work."""
    spec = arch_spec(arch)
    p = spec.patch_size
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % p:
        near = [s for s in (p * max(1, round(img_size / p)) if isinstance(img_size, (int, float)) else 0,
                            p * 8, p * 14, p * 16) if s > 0]
        raise ValueError(f"{flag} {img_size!r}: must be a positive multiple of the patch size {p} of "
                         f"{spec.name} ({spec.family}; e.g. {', '.join(str(s) for s in sorted(set(near)))})")
    return img_size


def parameter_count(arch: str, img_size: int, **overrides: object) -> int:
    """The backbone's parameters as this project builds it (timm, the position
    embedding sized for ``img_size``; ``overrides`` as in build_model's
    backbone_overrides), counted on torch's meta device: no memory, no
    weights, seconds even for the 7B. The classification head is not counted."""
    import timm
    import torch

    spec = arch_spec(arch)
    check_image_size(spec.name, img_size, flag="img_size")
    with torch.device("meta"):
        backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                                     dynamic_img_size=False, **overrides)
    return sum(p.numel() for p in backbone.parameters())
