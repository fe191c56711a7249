"""The fine-tuning configuration: one dataclass, layered defaults < `--config`
YAML < command-line flags, validated with messages that name the flag.

`resolve_config(cli, config_file)` is what `python -m dinov2_triton.train.finetune` calls;
the resolved configuration is saved as `<output_path>/config.yaml` (a valid
`--config` file itself). Cheap to import (no torch), so `--help` is instant."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from dinov2_triton.train.archs import ARCH_NAMES, check_image_size
from dinov2_triton.train.checkpoint import HEADS

log = logging.getLogger("dinov2_triton.train.finetune")

MODES = ("linear", "full", "lora", "lastn")
AMPS = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTIONS = ("sdpa", "xformers")
# ARCH_NAMES: dinov2_triton.train.archs (no torch), the table dinov2_triton.train.model.ARCHS is built from
# Learning rate when --lr is not given: a linear probe wants a large step,
# a full fine-tune of a pretrained backbone a small one.
DEFAULT_LR = {"linear": 1e-3, "full": 1e-4, "lora": 5e-4, "lastn": 2e-4}
# Keys that shape the model or its parameters: a checkpoint with other values
# cannot be resumed. The other keys only warn (the run will differ from an
# uninterrupted one).
RESUME_MUST_MATCH = ("arch", "img_size", "head", "mode", "lora_rank", "lora_alpha", "unfreeze_blocks",
                     "backbone_overrides", "cache_features")
RESUME_SHOULD_MATCH = ("batch_size", "accum_steps", "epochs", "lp_epochs", "lr", "lp_lr", "min_lr",
                       "warmup_epochs", "weight_decay", "layer_decay", "seed", "max_train_batches",
                       "label_smoothing", "no_augment", "amp", "clip_grad")


class ConfigError(ValueError):
    """A configuration value (flag or YAML key) is invalid; names it."""


@dataclass
class FinetuneConfig:
    data_path: str = "./data/"
    output_path: str = "./models/"
    arch: str = "vits14"
    weights: str = "hub"
    img_size: int = 224
    head: str = "cls_mean"
    mode: str = "full"
    cache_features: bool = False
    layer_decay: float = 0.75
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    unfreeze_blocks: int = 2
    lp_epochs: int = 0
    lp_lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None          # None: DEFAULT_LR[mode]
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    accum_steps: int = 1
    clip_grad: float = 0.0           # 0: no clipping (the norm is still checked for NaN/Inf)
    amp: str = "none"
    grad_checkpointing: bool = False
    attention: str = "sdpa"
    no_augment: bool = False
    seed: int = 0
    num_workers: int = -1            # -1: min(8, CPUs - 1)
    device: str = "auto"
    resume: bool = True
    max_train_batches: int = 0       # 0: the whole epoch
    save_every_steps: int = 0        # 0: only at the end of each epoch
    progress: bool = True
    backbone_overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEFAULTS = FinetuneConfig()
_FIELD_TYPES = {f.name: f.type for f in fields(FinetuneConfig)}


# ----------------------------------------------------------------------------
# Configuration: defaults < YAML < flags
# ----------------------------------------------------------------------------
def _coerce(key: str, value: Any, where: str) -> Any:
    default = getattr(_DEFAULTS, key)
    kind = _FIELD_TYPES[key]
    if value is None and "None" in str(kind):
        return None
    if isinstance(default, bool) or kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if isinstance(default, float) or "float" in str(kind):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: {key} must be a string, got {value!r}")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config (keys = FinetuneConfig fields, dashes or underscores).
    A `run:` section (what config.yaml records about a run) is ignored."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    data.pop("run", None)
    out = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in _FIELD_TYPES:
            raise ConfigError(f"--config {path}: unknown key {key!r}; valid keys: {', '.join(sorted(_FIELD_TYPES))}")
        out[k] = _coerce(k, value, f"--config {path}")
    return out


def resolve_config(cli: Mapping[str, Any] | None = None, config_file: str | None = None) -> FinetuneConfig:
    """defaults < YAML file < CLI values (only those given), then validated."""
    values = _DEFAULTS.to_dict()
    if config_file:
        values.update(load_config_file(config_file))
    for k, v in (cli or {}).items():
        values[k] = _coerce(k, v, f"--{k.replace('_', '-')}")
    cfg = FinetuneConfig(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: FinetuneConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.arch in ARCH_NAMES, f"--arch {cfg.arch!r}: choose one of {', '.join(ARCH_NAMES)}")
    need(cfg.head in HEADS, f"--head {cfg.head!r}: choose one of {', '.join(HEADS)}")
    need(cfg.mode in MODES, f"--mode {cfg.mode!r}: choose one of {', '.join(MODES)}")
    need(cfg.amp in AMPS, f"--amp {cfg.amp!r}: choose one of {', '.join(AMPS)}")
    need(cfg.device in DEVICES, f"--device {cfg.device!r}: choose one of {', '.join(DEVICES)}")
    need(cfg.attention in ATTENTIONS, f"--attention {cfg.attention!r}: choose one of {', '.join(ATTENTIONS)}")
    try:   # a multiple of the arch's patch size: 14 (DINOv2) or 16 (DINOv3)
        check_image_size(cfg.arch, cfg.img_size, flag="--img-size")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    need(cfg.epochs >= 1, f"--epochs {cfg.epochs}: must be >= 1")
    need(cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be >= 1")
    need(cfg.accum_steps >= 1, f"--accum-steps {cfg.accum_steps}: must be >= 1")
    need(cfg.lr is None or cfg.lr > 0, f"--lr {cfg.lr}: must be > 0")
    need(cfg.min_lr >= 0, f"--min-lr {cfg.min_lr}: must be >= 0")
    need(cfg.lp_lr > 0, f"--lp-lr {cfg.lp_lr}: must be > 0")
    need(cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: must be >= 0")
    need(0 < cfg.layer_decay <= 1, f"--layer-decay {cfg.layer_decay}: must be in (0, 1] (1 = no decay)")
    need(cfg.warmup_epochs >= 0, f"--warmup-epochs {cfg.warmup_epochs}: must be >= 0")
    need(0 <= cfg.label_smoothing < 1, f"--label-smoothing {cfg.label_smoothing}: must be in [0, 1)")
    need(cfg.clip_grad >= 0, f"--clip-grad {cfg.clip_grad}: must be >= 0 (0 = off)")
    need(cfg.lp_epochs >= 0, f"--lp-epochs {cfg.lp_epochs}: must be >= 0")
    need(not (cfg.lp_epochs and cfg.mode == "linear"),
         "--lp-epochs is a linear-probe warm start before --mode full/lora/lastn; "
         "with --mode linear raise --epochs instead")
    need(not (cfg.cache_features and cfg.mode != "linear"),
         "--cache-features needs --mode linear (the backbone must be frozen for its embeddings to be reused)")
    need(cfg.lora_rank >= 1, f"--lora-rank {cfg.lora_rank}: must be >= 1")
    need(cfg.unfreeze_blocks >= 1, f"--unfreeze-blocks {cfg.unfreeze_blocks}: must be >= 1")
    need(cfg.max_train_batches >= 0, f"--max-train-batches {cfg.max_train_batches}: must be >= 0")
    need(cfg.save_every_steps >= 0, f"--save-every-steps {cfg.save_every_steps}: must be >= 0")
    need(cfg.num_workers >= -1, f"--num-workers {cfg.num_workers}: must be >= 0 (or -1 for automatic)")
    need(cfg.seed >= 0, f"--seed {cfg.seed}: must be >= 0")


def effective_lr(cfg: FinetuneConfig) -> float:
    return cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.mode]


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                          "use --device cpu or auto")
    return torch.device(name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the Hugging Face endpoint?"""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def prefer_hub_cache_when_offline(weights: str) -> None:
    """Offline, huggingface_hub retries for about a minute before failing.
    When the endpoint is unreachable, switch it to offline mode (the local
    cache still works) so a missing download fails in seconds with our
    WeightsError message instead."""
    if weights == "random" or Path(weights).suffix in (".pth", ".pt", ".safetensors", ".bin") \
            or Path(weights).exists() or os.environ.get("HF_HUB_OFFLINE"):
        return
    if _hub_reachable():
        return
    log.warning("the Hugging Face hub is unreachable: --weights %s will only use the local cache", weights)
    os.environ["HF_HUB_OFFLINE"] = "1"
    mod = sys.modules.get("huggingface_hub.constants")
    if mod is not None:  # already imported: the constant was read at import time
        mod.HF_HUB_OFFLINE = True


def resolve_workers(n: int) -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1)) if n < 0 else n
