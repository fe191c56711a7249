"""DINOv2 and DINOv3 backbones (timm) with a classification head, one weight loader.

The architectures are one table (`dinov2_triton.train.archs`): DINOv2
(`vits14` ... `vitg14_reg4`, 14 px patches, learned position embedding) and
DINOv3 (`dinov3_vits16` ... `dinov3_vit7b16`, 16 px patches, 4 registers,
RoPE). Weights come from exactly one of: a hub id (timm / Hugging Face, needs
a network), a local file or folder in any of the layouts users have (the
official facebookresearch checkpoint, a Hugging Face model folder or its
`model.safetensors`, timm's own keys), or `random`. Every source is converted
in `dinov2_triton.train.weight_layouts.to_backbone_state_dict` and loaded
with `strict=True`: a partial load is an error, never a log line.

Positions are fixed for the input size at build time (train/pos_embed.py),
so the backbone reproduces its reference at that size and exported graphs
contain no run-time interpolation or RoPE construction: DINOv2's position
embedding is resampled once with exactly the official model's interpolation
for the architecture; DINOv3's RoPE sin/cos tables are computed once for the
fixed patch grid from the periods the weights carry.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from dinov2_triton.core.artifact_io import sha256_bytes, sha256_file
from dinov2_triton.train.archs import SPECS, arch_spec, check_image_size
from dinov2_triton.train.checkpoint import HEADS
from dinov2_triton.train.pos_embed import OFFICIAL_GRID_PX, keep_rope_periods, official_method
from dinov2_triton.train.weight_layouts import (
    RawWeights,
    WeightsError,
    backbone_family,
    read_weights,
    to_backbone_state_dict,
)

if TYPE_CHECKING:
    from dinov2_triton.train.checkpoint import CheckpointRecord

log = logging.getLogger(__name__)

# Short names users type -> timm architecture names (the table: dinov2_triton.train.archs).
ARCHS: dict[str, str] = {name: spec.timm_name for name, spec in SPECS.items()}


def resolve_arch(arch: str) -> str:
    """The timm name of a short (or timm) arch name; ValueError naming --arch otherwise."""
    return arch_spec(arch).timm_name


def num_registers(backbone: nn.Module) -> int:
    """Register tokens of a timm DINOv2 (VisionTransformer) or DINOv3 (Eva) backbone."""
    if hasattr(backbone, "num_reg_tokens"):
        return int(backbone.num_reg_tokens)
    reg = getattr(backbone, "reg_token", None)
    return int(reg.shape[1]) if reg is not None else 0


class DinoV2Classifier(nn.Module):
    """A DINOv2 or DINOv3 backbone plus a linear head (`family` says which).

    `cls_mean` (default) concatenates the class token with the mean of the
    patch tokens, as DINOv2's linear evaluation does; `cls` and `mean` use one
    of them. The `embedding` output is exactly what the head sees.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "cls_mean"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r}: choose one of {HEADS}")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        self.backbone = backbone
        self.family = backbone_family(backbone)
        self.head_type = head
        dim = backbone.num_features
        self.embed_dim = 2 * dim if head == "cls_mean" else dim
        self.head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(pixel_values)  # final norm applied
        n_prefix = self.backbone.num_prefix_tokens               # cls (+ registers)
        cls_tok = tokens[:, 0]
        patch_mean = tokens[:, n_prefix:].mean(dim=1)
        if self.head_type == "cls":
            return cls_tok
        if self.head_type == "mean":
            return patch_mean
        return torch.cat([cls_tok, patch_mean], dim=-1)

    def forward_with_embedding(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(pixel_values)
        return self.head(emb), emb

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(pixel_values))


@dataclass
class BuildResult:
    model: DinoV2Classifier
    weights_source: str   # human-readable, recorded in every output and log
    # how pretrained position embeddings are brought to img_size (train/pos_embed.py
    # names; the official method of the arch), recorded in the checkpoint
    pos_embed_resampling: str


def _create_backbone(timm_arch: str, img_size: int, **overrides: Any) -> nn.Module:
    import timm

    # dynamic_img_size=False: the position embedding (DINOv2) or the RoPE
    # table (DINOv3) is stored for img_size; the graph never rebuilds it.
    backbone = timm.create_model(timm_arch, pretrained=False, num_classes=0, img_size=img_size,
                                 dynamic_img_size=False, **overrides)
    _prepare_dinov3(backbone)
    return backbone


def _prepare_dinov3(backbone: nn.Module) -> None:
    """DINOv3 (timm Eva) backbones: the RoPE periods become part of the state
    dict and the table is baked for the grid (train/pos_embed.py); and the
    query/value biases are added after the `qkv` module instead of inside
    one fused F.linear on its weight, so LoRA adapters injected into `qkv`
    take part in the forward pass (the fused path reads `qkv.weight` and
    skips any wrapper)."""
    if backbone_family(backbone) != "dinov3":
        return
    keep_rope_periods(backbone)
    for block in backbone.blocks:
        if getattr(block.attn, "q_bias", None) is not None:
            block.attn.qkv_bias_separate = True


def _load_strict(backbone: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    try:
        result = backbone.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # size mismatch: e.g. a ViT-S checkpoint for --arch vitb14
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:300])
        raise WeightsError(f"{source}: checkpoint does not match the architecture ({first}). "
                           "Check --arch (with/without registers, size).") from exc
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise WeightsError(
            f"{source}: checkpoint does not match the architecture "
            f"(missing {len(missing)} keys, e.g. {missing[:5]}; unexpected {len(unexpected)} keys, "
            f"e.g. {unexpected[:5]}). Check --arch (family, size, with/without registers).")


def build_model(arch: str = "vits14", *, weights: str = "random", num_classes: int,
                img_size: int = 224, head: str = "cls_mean", attention: str = "sdpa",
                backbone_overrides: Mapping[str, Any] | None = None) -> BuildResult:
    """Build a DINOv2 or DINOv3 classifier.

    arch: a dinov2_triton.train.archs name (vits14 ... vitg14_reg4,
    dinov3_vits16 ... dinov3_vit7b16) or the timm name it is built as.
    weights: "random" | a local file (.pth/.pt/.bin/.safetensors) or Hugging
    Face model folder, in the official, transformers or timm layout of the
    arch's family | "hub" (timm's default pretrained tag for the arch) | a
    hub id such as "timm/vit_small_patch14_dinov2.lvd142m" (needs network access).
    img_size: a multiple of the arch's patch size (14 DINOv2, 16 DINOv3);
    DINOv2 position embeddings are resampled to it once, here, with the
    official interpolation of the arch; DINOv3 RoPE tables are computed for it.
    backbone_overrides: extra timm kwargs (tests use depth/embed_dim for tiny models).
    """
    spec = arch_spec(arch)
    timm_arch = spec.timm_name
    check_image_size(spec.name, img_size, flag="img_size")
    overrides = dict(backbone_overrides or {})
    if weights == "random":
        backbone = _create_backbone(timm_arch, img_size, **overrides)
        source = (f"random init (NOT pretrained: accuracy will be far below a {spec.family_name} "
                  f"fine-tune)")
    elif Path(weights).suffix in (".pth", ".pt", ".safetensors", ".bin") or Path(weights).exists():
        backbone = _create_backbone(timm_arch, img_size, **overrides)
        raw = read_weights(weights)
        layout = _load_pretrained(backbone, raw, str(weights))
        what = "folder" if raw.path.is_dir() else "file"
        source = (f"{what} {raw.path.resolve()} ({layout} layout, sha256 {_weights_digest(raw.files)[:16]})")
    else:
        import timm

        hub_id = None if weights == "hub" else weights
        try:
            # DINOv2: built at the checkpoint's own 518 px grid (no timm
            # resampling), then converted like a local file, so the official
            # interpolation applies. DINOv3 weights do not depend on the size.
            native = timm.create_model(
                timm_arch, pretrained=True, num_classes=0,
                img_size=OFFICIAL_GRID_PX if spec.family == "dinov2" else img_size,
                dynamic_img_size=False,
                **({"pretrained_cfg_overlay": {"hf_hub_id": hub_id.removeprefix("hf-hub:")}} if hub_id else {}),
                **overrides)
        except Exception as exc:  # noqa: BLE001 - offline is the common case
            raise WeightsError(
                f"--weights {weights}: could not download pretrained {spec.family_name} weights for "
                f"{timm_arch} ({type(exc).__name__}: {str(exc)[:200]}). Offline? On a connected machine "
                f"download the official checkpoint ({spec.weights_hint}) or the Hugging Face folder "
                f"{spec.hf_repo}, and pass --weights /path/to/file.pth (or the folder), or pass --weights "
                f"random for a smoke test.") from exc
        backbone = _create_backbone(timm_arch, img_size, **overrides)
        raw = RawWeights(dict(native.state_dict()), Path(hub_id or timm_arch), [])
        del native
        _load_pretrained(backbone, raw, f"--weights {weights}")
        source = f"hub {hub_id or timm_arch + ' (timm default pretrained tag)'}"
    if attention == "xformers":
        enable_xformers(backbone)
    elif attention != "sdpa":
        raise ValueError(f"--attention {attention!r}: choose 'sdpa' or 'xformers'")
    model = DinoV2Classifier(backbone, num_classes=num_classes, head=head)
    resampling = official_method(num_registers(backbone), spec.family)   # what weight_layouts applied
    log.info("built %s (%s head, %d classes, %d px) with weights: %s",
             timm_arch, head, num_classes, img_size, source)
    return BuildResult(model=model, weights_source=source, pos_embed_resampling=resampling)


def _load_pretrained(backbone: nn.Module, raw: RawWeights, source: str) -> str:
    """Convert (dinov2_triton.train.weight_layouts) and load strictly; returns the layout."""
    try:
        converted, layout = to_backbone_state_dict(raw, backbone)
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. a position embedding of another width
        if isinstance(exc, WeightsError):
            raise
        raise WeightsError(f"{source}: checkpoint cannot be converted to this architecture "
                           f"({type(exc).__name__}: {str(exc)[:200]}). Check --arch.") from exc
    _load_strict(backbone, converted, source)
    return layout


def _weights_digest(files: list[Path]) -> str:
    """sha256 of the weights file (of the shards' digests for a sharded folder)."""
    if len(files) == 1:
        return sha256_file(files[0])
    return sha256_bytes("".join(sha256_file(f) for f in files).encode())


def enable_xformers(backbone: nn.Module) -> None:
    """Swap each block's attention kernel for xformers' memory-efficient one
    (GPU training only, as the official DINOv2 code does). Weights are
    unchanged, so the checkpoint exports with the default SDPA path."""
    if backbone_family(backbone) == "dinov3":
        raise ValueError("--attention xformers: DINOv2 backbones only (DINOv3's attention applies RoPE to "
                         "the patch tokens inside the block); use --attention sdpa, which PyTorch runs with "
                         "its own memory-efficient kernels on GPUs")
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError as exc:
        raise RuntimeError("--attention xformers: xformers is not installed (GPU hosts: see "
                           "environment.yml); use --attention sdpa") from exc

    def make_forward(attn):
        def forward(x, attn_mask=None, **_):
            b, n, c = x.shape
            qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
            q, k, v = qkv.unbind(2)                # [B, N, H, Dh]: xformers' layout
            q, k = attn.q_norm(q), attn.k_norm(k)
            out = memory_efficient_attention(q, k, v, p=attn.attn_drop.p if attn.training else 0.0)
            out = out.reshape(b, n, c)
            return attn.proj_drop(attn.proj(attn.norm(out) if hasattr(attn, "norm") else out))
        return forward

    for block in backbone.blocks:
        block.attn.forward = make_forward(block.attn)


# ----------------------------------------------------------------------------
# Trained checkpoints (model_final.pth and friends): train/checkpoint.py
# holds the record, its writer and its reader.
# ----------------------------------------------------------------------------
def model_from_record(record: "CheckpointRecord", *, attention: str = "sdpa") -> DinoV2Classifier:
    """Rebuild the classifier a CheckpointRecord describes and load its weights strictly."""
    built = build_model(record.arch, weights="random", num_classes=record.num_classes,
                        img_size=record.image_size, head=record.head, attention=attention,
                        backbone_overrides=record.backbone_overrides or None)
    _load_strict(built.model, record.state_dict, f"checkpoint state_dict ({record.arch})")
    return built.model


def load_classifier(path: str | os.PathLike, *, attention: str = "sdpa"
                    ) -> tuple[DinoV2Classifier, "CheckpointRecord"]:
    """Rebuild a trained classifier from a checkpoint; returns (model in eval
    mode, CheckpointRecord). A bad file raises dinov2_triton.core.records.RecordError, weights
    that do not fit the architecture WeightsError."""
    from dinov2_triton.train.checkpoint import read_checkpoint

    record = read_checkpoint(path)
    model = model_from_record(record, attention=attention).eval()
    return model, record
