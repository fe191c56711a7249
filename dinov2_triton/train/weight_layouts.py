"""DINOv2 weights in the layouts users have them -> this project's timm backbone.

One reader (`read_weights`: a .pth/.pt/.bin/.safetensors file or a Hugging
Face model folder) and one conversion (`to_backbone_state_dict`) for the
three layouts in circulation:

* ``official``: facebookresearch/dinov2 (`dinov2_vits14_pretrain.pth`;
  `mask_token`, `register_tokens`, SwiGLU `w12/w3`, optionally chunked
  `blocks.<chunk>.<i>`), the class position inside `pos_embed`;
* ``transformers``: a Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`
  folder (`model.safetensors` + `config.json`, as on the hub:
  `embeddings.*`, `encoder.layer.<i>.attention.attention.query`, ...; the
  renamed in-memory keys of transformers 5, `q_proj`..., are accepted too);
* ``timm``: timm's own DINOv2 keys (what `timm/vit_*_dinov2.lvd142m` ships).

Every layout is first brought to the official keys, then to timm's; the
position grid is resampled to the backbone's grid with the official model's
interpolation for the architecture (train/pos_embed.py). The result is loaded
with `strict=True` by the caller: nothing is dropped silently except the
parts that are not the backbone (`mask_token`, which only masked training
uses, and a classification head)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dinov2_triton.train.pos_embed import official_method, resample_grid

#: files a Hugging Face model folder may hold its weights in, in preference order
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# transformers' Dinov2Config / Dinov2WithRegistersConfig defaults: what
# transformers itself assumes for a field that a config.json leaves out
HF_CONFIG_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6, "use_swiglu_ffn": False,
                      "qkv_bias": True, "hidden_act": "gelu"}


class WeightsError(RuntimeError):
    """Weights could not be found, read or loaded strictly; says how to fix it."""


@dataclass
class RawWeights:
    """A state dict as read, before conversion."""

    state_dict: dict[str, Any]
    path: Path                       # the file (or, for a folder, the folder)
    files: list[Path]                # the files the tensors came from (for the checksum)
    hf_config: dict[str, Any] | None = None
    hf_config_path: Path | None = None


# ----------------------------------------------------------------------------- reading
def _load_tensor_file(path: Path) -> Mapping[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: a checkpoint must never execute code on load.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise WeightsError(f"--weights {path}: cannot be read as weights ({str(exc).splitlines()[0][:300]})") from exc


def _weight_files_of_folder(folder: Path) -> list[Path]:
    for name in HF_WEIGHT_FILES:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if name.endswith(".index.json"):    # sharded: {"weight_map": {key: shard file}}
            try:
                shards = sorted(set(json.loads(candidate.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise WeightsError(f"--weights {candidate}: not a safetensors index ({exc})") from exc
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise WeightsError(f"--weights {folder}: shards {missing} named in {name} are missing")
            return [folder / s for s in shards]
        return [candidate]
    raise WeightsError(f"--weights {folder}: a folder must hold a Hugging Face model "
                       f"({' or '.join(HF_WEIGHT_FILES)} beside config.json); found "
                       f"{sorted(p.name for p in folder.iterdir())[:10]}")


def _read_hf_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not readable as JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("model_type") not in HF_MODEL_TYPES:
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise WeightsError(f"{path}: field 'model_type' is {got!r}; expected one of "
                           f"{sorted(HF_MODEL_TYPES)} (a transformers DINOv2 model)")
    return config


def read_weights(path: str | os.PathLike) -> RawWeights:
    """Read a weights file or a Hugging Face model folder (tensors only,
    wrappers such as {"model": ...} / {"state_dict": ...} and DDP/teacher
    prefixes removed). A `config.json` beside a transformers-layout file is
    read and checked too."""
    import torch

    path = Path(path)
    if path.is_dir():
        files = _weight_files_of_folder(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise WeightsError(f"--weights {path}: config.json missing (a Hugging Face model folder "
                               "holds model.safetensors and config.json)")
    elif path.is_file():
        files = [path]
        config_path = None
    else:
        raise WeightsError(f"--weights {path}: file not found")
    sd: dict[str, Any] = {}
    for file in files:
        sd.update(_unwrap(_load_tensor_file(file), str(file)))
    if path.is_file() and layout_of(sd) == "transformers" and (path.parent / "config.json").is_file():
        # FOLDER/model.safetensors: the config beside it describes it (heads,
        # activation) and is checked like a folder's.
        config_path = path.parent / "config.json"
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"--weights {path}: no tensors found")
    config = _read_hf_config(config_path) if config_path is not None else None
    return RawWeights(sd, path, files, config, config_path)


def _unwrap(obj: Any, source: str) -> dict[str, Any]:
    """Accept a bare state dict or the usual wrappers (model/state_dict/teacher)."""
    import torch

    if not isinstance(obj, Mapping):
        raise WeightsError(f"--weights {source}: expected a state dict, got {type(obj).__name__}")
    for key in ("state_dict", "model", "teacher"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"--weights {source}: no tensors found in the checkpoint")
    for prefix in ("module.", "teacher.", "backbone."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- layouts
def layout_of(sd: Mapping[str, Any]) -> str:
    """'transformers', 'official' (facebookresearch/dinov2) or 'timm'."""
    if any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.embeddings.")) for k in sd):
        return "transformers"
    if "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd):
        return "official"
    return "timm"


_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# transformers name inside a block -> official name (None: handled below)
_HF_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.weights_in.weight": "mlp.w12.weight", "mlp.weights_in.bias": "mlp.w12.bias",
    "mlp.weights_out.weight": "mlp.w3.weight", "mlp.weights_out.bias": "mlp.w3.bias",
    "mlp.down_proj.weight": "mlp.w3.weight", "mlp.down_proj.bias": "mlp.w3.bias",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
# tensors concatenated into one official tensor: (parts in order) -> official name
_HF_FUSED = (
    (("attention.attention.query", "attention.attention.key", "attention.attention.value"), "attn.qkv"),
    (("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attn.qkv"),
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.w12"),   # official SwiGLU: silu(first half) * second half
)


def _transformers_to_official(sd: Mapping[str, Any], source: str) -> dict[str, Any]:
    import torch

    sd = dict(sd)
    if any(k.startswith("dinov2.") for k in sd):        # Dinov2For...Classification
        sd = {k.removeprefix("dinov2."): v for k, v in sd.items() if not k.startswith("classifier.")}
    out: dict[str, Any] = {}
    unknown: list[str] = []
    blocks: dict[int, dict[str, Any]] = {}
    for key, value in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif (m := _HF_BLOCK.match(key)) is not None:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            unknown.append(key)
    for i, block in sorted(blocks.items()):
        for parts, target in _HF_FUSED:
            for kind in ("weight", "bias"):
                names = [f"{p}.{kind}" for p in parts]
                present = [n for n in names if n in block]
                if present and len(present) != len(names):
                    raise WeightsError(f"{source}: encoder.layer.{i} has {present} but not all of {names}")
                if present:
                    out[f"blocks.{i}.{target}.{kind}"] = torch.cat([block.pop(n) for n in names], dim=0)
        for name, value in block.items():
            if name in _HF_BLOCK_RENAMES:
                out[f"blocks.{i}.{_HF_BLOCK_RENAMES[name]}"] = value
            else:
                unknown.append(f"encoder.layer.{i}.{name}")
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} keys of the transformers layout are not part of a "
                           f"DINOv2 backbone (e.g. {unknown[:5]}); is this a Dinov2Model?")
    return out


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")


def _official_to_timm(sd: Mapping[str, Any], backbone) -> dict[str, Any]:
    """Official keys -> timm keys, pos_embed resampled (official method)."""
    import torch

    sd = dict(sd)
    sd.pop("mask_token", None)
    # Training checkpoints of the official code chunk the blocks for FSDP
    # (blocks.<chunk>.<i>.*, the block index i kept global).
    if any(_CHUNKED_BLOCK.match(k) for k in sd):
        sd = {(f"blocks.{m.group(1)}.{m.group(2)}" if (m := _CHUNKED_BLOCK.match(k)) else k): v
              for k, v in sd.items()}
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if ".mlp.w12." in key:
            key = key.replace(".mlp.w12.", ".mlp.fc1.")    # timm SwiGLUPacked: act(first half) * second
        elif ".mlp.w3." in key:
            key = key.replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
    pos = out.get("pos_embed")
    if pos is not None:
        class_pos, grid = pos[:, :1], pos[:, 1:]     # official: one class position, then the grid
        grid = _resample_to(grid, backbone)
        if getattr(backbone, "no_embed_class", False):
            # timm's register models keep no class position: fold it into the
            # class token (the official model adds it to the class token too).
            if "cls_token" in out:
                out["cls_token"] = out["cls_token"] + class_pos
            out["pos_embed"] = grid
        else:
            out["pos_embed"] = torch.cat([class_pos.to(grid.dtype), grid], dim=1)
    return out


def _resample_to(grid, backbone):
    method = official_method(getattr(backbone, "num_reg_tokens", 0))
    try:
        return resample_grid(grid, tuple(backbone.patch_embed.grid_size), method)
    except ValueError as exc:
        raise WeightsError(f"position embedding: {exc}") from exc


def _timm_resample(sd: Mapping[str, Any], backbone) -> dict[str, Any]:
    import torch

    out = dict(sd)
    pos = out.get("pos_embed")
    if pos is not None:
        prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
        grid = _resample_to(pos[:, prefix:], backbone)
        out["pos_embed"] = torch.cat([pos[:, :prefix], grid], dim=1) if prefix else grid
    return out


def check_hf_config(config: Mapping[str, Any], backbone, source: str) -> None:
    """Fields of config.json that the weights' shapes do not pin down (head
    count, activation, norm epsilon) must match the backbone, or the strict
    load would succeed and the numbers would be wrong."""
    from torch import nn

    block = backbone.blocks[0]
    swiglu = not isinstance(getattr(block.mlp, "act", None), nn.GELU)
    got = {**HF_CONFIG_DEFAULTS, **config}
    # Dinov2Model has no registers; Dinov2WithRegistersConfig defaults to 4
    got["num_register_tokens"] = 0 if config["model_type"] == "dinov2" else config.get("num_register_tokens", 4)
    expected = {
        "hidden_size": backbone.embed_dim,
        "num_hidden_layers": len(backbone.blocks),
        "num_attention_heads": block.attn.num_heads,
        "patch_size": backbone.patch_embed.patch_size[0],
        "num_channels": 3,
        "layer_norm_eps": backbone.norm.eps,
        "use_swiglu_ffn": swiglu,
        "num_register_tokens": getattr(backbone, "num_reg_tokens", 0),
        "qkv_bias": block.attn.qkv.bias is not None,
    }
    if not swiglu:   # transformers' SwiGLU ignores hidden_act (always SiLU)
        expected["hidden_act"] = "gelu"
    for field, want in expected.items():
        have = got[field]
        if isinstance(have, (list, tuple)) and field == "patch_size":
            have = have[0] if len(set(have)) == 1 else have
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float))
                                 and abs(have - want) <= 1e-12):
            raise WeightsError(f"{source}: field '{field}' is {have!r} but the architecture built "
                               f"(--arch) has {want!r}. Check --arch (size, with/without registers).")


def to_backbone_state_dict(raw: RawWeights, backbone) -> tuple[dict[str, Any], str]:
    """The one conversion: any layout -> the timm backbone's keys, position
    grid resampled with the official interpolation. Returns (state dict, layout)."""
    try:
        return _convert(raw, backbone)
    except WeightsError as exc:
        if str(raw.path) in str(exc):
            raise
        raise WeightsError(f"{raw.path}: {exc}") from exc


def _convert(raw: RawWeights, backbone) -> tuple[dict[str, Any], str]:
    layout = layout_of(raw.state_dict)
    sd = {k: v for k, v in raw.state_dict.items() if k not in ("head.weight", "head.bias")}
    if raw.hf_config is not None:
        if layout != "transformers":
            raise WeightsError(f"{raw.hf_config_path}: a transformers config.json, but the weights in "
                               f"{raw.path} are in the {layout} layout")
        check_hf_config(raw.hf_config, backbone, str(raw.hf_config_path))
    if layout == "transformers":
        sd = _official_to_timm(_transformers_to_official(sd, str(raw.path)), backbone)
    elif layout == "official":
        sd = _official_to_timm(sd, backbone)
    else:
        sd = _timm_resample(sd, backbone)
    return sd, layout
