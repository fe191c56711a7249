"""DINOv2 and DINOv3 weights in the layouts users have them -> this project's timm backbone.

One reader (`read_weights`: a .pth/.pt/.bin/.safetensors file or a Hugging
Face model folder) and one conversion (`to_backbone_state_dict`) for the
three layouts in circulation, per family. DINOv2:

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
uses, and a classification head).

DINOv3 (`dinov3_*` archs, timm `Eva` with RoPE; the family of the weights
must be the family of `--arch`, or the error says which it is):

* ``official``: facebookresearch/dinov3 (`dinov3_vits16_pretrain_lvd1689m-*.pth`;
  `storage_tokens`, fused `attn.qkv` with `bias_mask`, `ls1.gamma`, SwiGLU
  `w1/w2/w3`, `rope_embed.periods`);
* ``transformers``: a Hugging Face `DINOv3ViTModel` folder
  (`facebook/dinov3-*`: `embeddings.*`, `layer.<i>.attention.q_proj`, ...;
  transformers 5's in-memory `model.layer.<i>` too), config.json checked;
* ``timm``: timm's `vit_*_patch16_dinov3[_qkvb]` keys (`reg_token`,
  `gamma_1`, `q_bias`/`v_bias`).

The key bias is dropped: the official model masks it to zero and a bias
added to every key cancels in the attention softmax, so no layout's numbers
depend on it. Weights without query/value biases (timm's plain variants)
get zero biases, which is the same function. The RoPE periods stored in an
official checkpoint are kept (train/pos_embed.py); the other layouts store
none and get the float32 periods transformers and timm compute."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dinov2_triton.train.archs import FAMILY_NAMES
from dinov2_triton.train.pos_embed import check_rope_periods, official_method, resample_grid

#: files a Hugging Face model folder may hold its weights in, in preference order
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
#: transformers model_type -> the family it is
HF_MODEL_FAMILIES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "dinov3_vit": "dinov3"}
HF_MODEL_TYPES = tuple(HF_MODEL_FAMILIES)
# transformers' Dinov2Config / Dinov2WithRegistersConfig defaults: what
# transformers itself assumes for a field that a config.json leaves out
HF_CONFIG_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                      "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-6, "use_swiglu_ffn": False,
                      "qkv_bias": True, "hidden_act": "gelu"}
# transformers' DINOv3ViTConfig defaults (transformers 5.24)
HF_DINOV3_CONFIG_DEFAULTS = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                             "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-5, "rope_theta": 100.0,
                             "use_gated_mlp": False, "num_register_tokens": 0, "proj_bias": True,
                             "mlp_bias": True, "hidden_act": "gelu"}


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
                           f"{sorted(HF_MODEL_TYPES)} (a transformers DINOv2 or DINOv3 ViT model)")
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
    """'transformers', 'official' (facebookresearch/dinov2 or dinov3) or 'timm'."""
    if any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.embeddings.")) for k in sd):
        return "transformers"
    if any(k in ("mask_token", "register_tokens", "storage_tokens", "rope_embed.periods") for k in sd) \
            or any(".mlp.w12." in k or ".attn.qkv.bias_mask" in k for k in sd):
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


def backbone_family(backbone) -> str:
    """'dinov3' for a RoPE backbone (timm Eva), else 'dinov2'."""
    return "dinov3" if getattr(backbone, "rope", None) is not None else "dinov2"


def family_of_weights(sd: Mapping[str, Any]) -> str:
    """'dinov2' when the weights hold a learned position embedding (every
    DINOv2 layout does), 'dinov3' when they hold RoPE-model keys instead."""
    if any(k in ("pos_embed", "embeddings.position_embeddings", "dinov2.embeddings.position_embeddings")
           for k in sd):
        return "dinov2"
    if any(k in ("storage_tokens", "rope_embed.periods", "embeddings.register_tokens")
           or k.startswith(("layer.", "model.layer.", "rope.")) or ".gamma_1" in k or ".attn.q_bias" in k
           for k in sd):
        return "dinov3"
    return "unknown"


def _check_family(raw: RawWeights, backbone) -> None:
    want = backbone_family(backbone)
    got = family_of_weights(raw.state_dict)
    if raw.hf_config is not None:
        got = HF_MODEL_FAMILIES.get(raw.hf_config.get("model_type"), got)
    if got not in ("unknown", want):
        hint = ("a DINOv2 --arch such as vits14 or vits14_reg4" if got == "dinov2"
                else "a DINOv3 --arch such as dinov3_vits16")
        names = FAMILY_NAMES
        raise WeightsError(f"{raw.path}: these are {names[got]} weights, but the architecture built (--arch) is "
                           f"a {names[want]} model; pass {hint}")


def _convert(raw: RawWeights, backbone) -> tuple[dict[str, Any], str]:
    layout = layout_of(raw.state_dict)
    sd = {k: v for k, v in raw.state_dict.items() if k not in ("head.weight", "head.bias")}
    _check_family(raw, backbone)
    if raw.hf_config is not None and layout != "transformers":
        raise WeightsError(f"{raw.hf_config_path}: a transformers config.json, but the weights in "
                           f"{raw.path} are in the {layout} layout")
    if backbone_family(backbone) == "dinov3":
        if raw.hf_config is not None:
            check_hf_config_dinov3(raw.hf_config, backbone, str(raw.hf_config_path))
        return _dinov3_to_timm(sd, layout, backbone, str(raw.path)), layout
    if raw.hf_config is not None:
        check_hf_config(raw.hf_config, backbone, str(raw.hf_config_path))
    if layout == "transformers":
        sd = _official_to_timm(_transformers_to_official(sd, str(raw.path)), backbone)
    elif layout == "official":
        sd = _official_to_timm(sd, backbone)
    else:
        sd = _timm_resample(sd, backbone)
    return sd, layout


# ----------------------------------------------------------------------------- DINOv3
def check_hf_config_dinov3(config: Mapping[str, Any], backbone, source: str) -> None:
    """The fields of a DINOv3ViTConfig that the tensors' shapes do not pin
    down must match the backbone (heads, registers, norm epsilon, activation,
    RoPE base), or a strict load would succeed with wrong numbers. The
    query/value bias flags need not match: absent biases load as zeros."""
    from torch import nn

    block = backbone.blocks[0]
    gated = hasattr(block.mlp, "fc1_g")
    act = getattr(block.mlp, "act", None)
    got = {**HF_DINOV3_CONFIG_DEFAULTS, **config}
    expected = {
        "hidden_size": backbone.embed_dim,
        "num_hidden_layers": len(backbone.blocks),
        "num_attention_heads": block.attn.num_heads,
        "patch_size": backbone.patch_embed.patch_size[0],
        "num_channels": 3,
        "layer_norm_eps": backbone.norm.eps,
        "use_gated_mlp": gated,
        "num_register_tokens": _num_registers(backbone),
        "rope_theta": float(backbone.rope.temperature),
        "proj_bias": block.attn.proj.bias is not None,
        "hidden_act": "silu" if isinstance(act, nn.SiLU) else "gelu",
    }
    for field, want in expected.items():
        have = got[field]
        if isinstance(have, (list, tuple)) and field == "patch_size":
            have = have[0] if len(set(have)) == 1 else have
        if field == "hidden_act" and have in ("gelu_pytorch_tanh", "gelu_new"):
            have = "gelu (tanh approximation)"
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float))
                                 and abs(have - want) <= 1e-12 * max(1.0, abs(want))):
            raise WeightsError(f"{source}: field '{field}' is {have!r} but the architecture built "
                               f"(--arch) has {want!r}. Check --arch (size, S/16 or S+/16, H+/16).")


def _num_registers(backbone) -> int:
    reg = getattr(backbone, "reg_token", None)
    return int(reg.shape[1]) if reg is not None else int(getattr(backbone, "num_reg_tokens", 0))


_V3_HF_BLOCK = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
_V3_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    # transformers' first DINOv3 converter kept the official Conv2d name
    "embeddings.patch_embeddings.proj.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.proj.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_V3_HF_DROP = ("embeddings.mask_token",)     # masked training only
_V3_HF_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "attention.proj.weight": "attn.proj.weight", "attention.proj.bias": "attn.proj.bias",
}
# (query, key, value) names of the attention projections, newest first
_V3_HF_QKV = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
              ("attention.query", "attention.key", "attention.value"))


def _v3_hf_block(i: int, block: dict[str, Any], source: str, out: dict[str, Any], unknown: list[str]) -> None:
    import torch

    for q, k, v in _V3_HF_QKV:
        names = [f"{n}.weight" for n in (q, k, v)]
        present = [n for n in names if n in block]
        if not present:
            continue
        if len(present) != 3:
            raise WeightsError(f"{source}: layer.{i} has {present} but not all of {names}")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([block.pop(n) for n in names], dim=0)
        if f"{q}.bias" in block:
            out[f"blocks.{i}.attn.q_bias"] = block.pop(f"{q}.bias")
        if f"{v}.bias" in block:
            out[f"blocks.{i}.attn.v_bias"] = block.pop(f"{v}.bias")
        block.pop(f"{k}.bias", None)    # cancels in the softmax (see the module docstring)
    gated = any(n.startswith("mlp.gate_proj.") for n in block)
    mlp = ({"mlp.gate_proj": "mlp.fc1_g", "mlp.up_proj": "mlp.fc1_x", "mlp.down_proj": "mlp.fc2"} if gated
           else {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})
    mlp.update({"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                "mlp.w1": "mlp.fc1_g", "mlp.w2": "mlp.fc1_x", "mlp.w3": "mlp.fc2"})
    for name, value in block.items():
        stem, _, kind = name.rpartition(".")
        if name in _V3_HF_BLOCK_RENAMES:
            out[f"blocks.{i}.{_V3_HF_BLOCK_RENAMES[name]}"] = value
        elif stem in mlp and kind in ("weight", "bias"):
            out[f"blocks.{i}.{mlp[stem]}.{kind}"] = value
        else:
            unknown.append(f"layer.{i}.{name}")


def _v3_transformers(sd: Mapping[str, Any], source: str) -> tuple[dict[str, Any], Any]:
    out: dict[str, Any] = {}
    periods = None
    unknown: list[str] = []
    blocks: dict[int, dict[str, Any]] = {}
    for key, value in sd.items():
        if key in _V3_HF_TOP:
            out[_V3_HF_TOP[key]] = value
        elif key in _V3_HF_DROP:
            continue
        elif key in ("rope_embeddings.periods", "rope_embed.periods"):
            periods = value
        elif key == "rope_embeddings.inv_freq":    # non-persistent in transformers; present if saved by hand
            periods = 1.0 / value.float()
        elif (m := _V3_HF_BLOCK.match(key)) is not None:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            unknown.append(key)
    for i, block in sorted(blocks.items()):
        _v3_hf_block(i, block, source, out, unknown)
    if unknown:
        raise WeightsError(f"{source}: {len(unknown)} keys of the transformers layout are not part of a DINOv3 "
                           f"ViT backbone (e.g. {unknown[:5]}); is this a DINOv3ViTModel?")
    return out, periods


def _v3_official(sd: Mapping[str, Any], source: str) -> tuple[dict[str, Any], Any]:
    sd = dict(sd)
    if any(_CHUNKED_BLOCK.match(k) for k in sd):     # FSDP-chunked training checkpoints
        sd = {(f"blocks.{m.group(1)}.{m.group(2)}" if (m := _CHUNKED_BLOCK.match(k)) else k): v
              for k, v in sd.items()}
    untied = sorted(k for k in sd if k.startswith("cls_norm."))
    if untied:
        raise WeightsError(f"{source}: holds {untied} (a model trained with untie_cls_and_patch_norms: its class "
                           "token has its own final norm); no released DINOv3 backbone has it and this project "
                           "does not build it")
    out: dict[str, Any] = {}
    periods = None
    for key, value in sd.items():
        if key == "mask_token" or key.startswith("local_cls_norm.") or key.endswith(".attn.qkv.bias_mask"):
            # masked training / the local-crop class norm of training only / the
            # k-bias mask (the k bias is dropped below)
            continue
        if key == "rope_embed.periods":
            periods = value
            continue
        if key == "storage_tokens":
            out["reg_token"] = value
            continue
        if key.endswith(".attn.qkv.bias"):
            q, _k, v = value.chunk(3, dim=0)
            out[key.replace(".attn.qkv.bias", ".attn.q_bias")] = q
            out[key.replace(".attn.qkv.bias", ".attn.v_bias")] = v
            continue
        for old, new in ((".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"), (".mlp.w1.", ".mlp.fc1_g."),
                         (".mlp.w2.", ".mlp.fc1_x."), (".mlp.w3.", ".mlp.fc2.")):
            key = key.replace(old, new)
        out[key] = value
    return out, periods


def _dinov3_to_timm(sd: Mapping[str, Any], layout: str, backbone, source: str) -> dict[str, Any]:
    """Any DINOv3 layout -> the timm Eva backbone's keys, `rope.periods` included."""
    import torch

    if layout == "transformers":
        out, periods = _v3_transformers(sd, source)
    elif layout == "official":
        out, periods = _v3_official(sd, source)
    else:
        out = dict(sd)
        periods = out.pop("rope.periods", None)
    # query/value biases: zeros when the weights have none (the same function);
    # refused when the architecture has none and the weights' are not zero
    for i, block in enumerate(backbone.blocks):
        names = (f"blocks.{i}.attn.q_bias", f"blocks.{i}.attn.v_bias")
        if block.attn.q_bias is not None:
            for name, param in zip(names, (block.attn.q_bias, block.attn.v_bias)):
                out.setdefault(name, torch.zeros_like(param, device="cpu"))
        else:
            for name in names:
                bias = out.pop(name, None)
                if bias is not None and bias.abs().max().item() != 0:
                    raise WeightsError(f"{source}: {name} is not zero, but the architecture built (--arch) has no "
                                       f"query/value bias (dinov3_vit7b16 has none; the others have one)")
    head_dim = backbone.embed_dim // backbone.blocks[0].attn.num_heads
    if periods is None:
        periods = backbone.rope.periods.detach().clone().cpu()
    try:
        check_rope_periods(periods, head_dim, f"{source}: RoPE periods")
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    out["rope.periods"] = periods.float()
    return out
