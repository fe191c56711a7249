"""Stage 2: fine-tune a DINOv2 classifier on the data folder from train.load_data.

    python -m train.finetune --data_path ./data/ --output_path ./models/ [flags]
    torchrun --nproc_per_node N -m train.finetune ...        (DDP)

Configuration is layered: defaults < `--config file.yaml` < command-line flags;
the resolved configuration is written to `<output_path>/config.yaml` with the
git revision and library versions. A run resumes from
`<output_path>/checkpoint_last.pth` by default (`--no-resume` starts over).

Outputs (rank 0 only): model_final.pth, model_best.pth, checkpoint_last.pth,
metrics.json, config.yaml, train.log, training_curves.png,
confusion_matrix.png (see docs/architecture.md for the checkpoint fields).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger("train.finetune")

MODES = ("linear", "full", "lora", "lastn")
HEADS = ("cls_mean", "cls", "mean")
AMPS = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTIONS = ("sdpa", "xformers")
# Learning rate when --lr is not given: a linear probe wants a large step,
# a full fine-tune of a pretrained backbone a small one (FIELD_NOTES 12).
DEFAULT_LR = {"linear": 1e-3, "full": 1e-4, "lora": 5e-4, "lastn": 2e-4}
CHECKPOINT_LAST, MODEL_BEST, MODEL_FINAL = "checkpoint_last.pth", "model_best.pth", "model_final.pth"
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
    from train.model import ARCHS

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.arch in ARCHS, f"--arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
    need(cfg.head in HEADS, f"--head {cfg.head!r}: choose one of {', '.join(HEADS)}")
    need(cfg.mode in MODES, f"--mode {cfg.mode!r}: choose one of {', '.join(MODES)}")
    need(cfg.amp in AMPS, f"--amp {cfg.amp!r}: choose one of {', '.join(AMPS)}")
    need(cfg.device in DEVICES, f"--device {cfg.device!r}: choose one of {', '.join(DEVICES)}")
    need(cfg.attention in ATTENTIONS, f"--attention {cfg.attention!r}: choose one of {', '.join(ATTENTIONS)}")
    need(cfg.img_size > 0 and cfg.img_size % 14 == 0,
         f"--img-size {cfg.img_size}: must be a positive multiple of the patch size 14 (e.g. 112, 224, 518)")
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


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------
def _setup_logging(output: Path | None, is_main: bool) -> list[logging.Handler]:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    root = logging.getLogger("train")
    root.setLevel(logging.INFO if is_main else logging.ERROR)  # rank 0 speaks for all
    if not any(getattr(h, "_finetune", False) for h in root.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh._finetune = True  # type: ignore[attr-defined]
        root.addHandler(sh)
        handlers.append(sh)
    if output is not None and is_main:
        fh = logging.FileHandler(output / "train.log", encoding="utf-8")
        fh.setFormatter(fmt)
        fh._finetune = True  # type: ignore[attr-defined]
        root.addHandler(fh)
        handlers.append(fh)
    root.propagate = False
    return handlers


def _log_weights_banner(source: str) -> None:
    if source.startswith("random"):
        bar = "#" * 78
        log.warning(bar)
        log.warning("#  WEIGHTS: %s", source)
        log.warning("#  This backbone is NOT pretrained: accuracy says nothing about DINOv2.")
        log.warning("#  Use --weights hub (online) or --weights /path/dinov2_<arch>_pretrain.pth.")
        log.warning("#  Training from scratch? Layer decay and low lr protect pretrained features;")
        log.warning("#  here --layer-decay 1.0 --lr 1e-3 --no-augment learn faster in short runs.")
        log.warning(bar)
    else:
        log.info("weights: %s", source)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------
def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """checkpoint_last.pth, loaded with weights_only=True (no pickled code)."""
    import torch

    from train.model import WeightsError

    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the file
        raise WeightsError(f"{path}: refused or unreadable training checkpoint "
                           f"({str(exc).splitlines()[0]}); use --no-resume to start over") from exc
    for key in ("state_dict", "optimizer", "train_state", "rng", "config", "class_names"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise WeightsError(f"{path}: not a training checkpoint of train.finetune (no {key!r}); "
                               "use --no-resume to start over")
    return ckpt


def _check_resume_compatible(ckpt: Mapping[str, Any], cfg: FinetuneConfig, class_names: Sequence[str],
                             path: Path) -> None:
    old = ckpt["config"]
    new = cfg.to_dict()
    bad = [f"{k}: checkpoint {old.get(k)!r} vs now {new[k]!r}" for k in RESUME_MUST_MATCH
           if old.get(k) != new[k]]
    if list(ckpt["class_names"]) != list(class_names):
        bad.append(f"class_names: checkpoint {list(ckpt['class_names'])} vs labels.txt {list(class_names)}")
    if bad:
        raise ConfigError(f"{path}: cannot resume, the run differs in: {'; '.join(bad)}. "
                          "Use --no-resume to start over or another --output_path.")
    changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in RESUME_SHOULD_MATCH if old.get(k) != new[k]]
    if changed:
        log.warning("resuming with changed settings (%s): the result will differ from an uninterrupted run",
                    ", ".join(changed))


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------
def _optional_split(data_path: str, split: str):
    from train.datasets import ManifestDataset, read_manifest

    if not read_manifest(data_path, split):
        return None
    from train.engine import identity

    return ManifestDataset(data_path, split, transform=identity)


def _num_batches(n: int, batch_size: int, world: int, max_batches: int) -> int:
    per_rank = -(-n // world)
    nb = -(-per_rank // batch_size)
    return min(nb, max_batches) if max_batches else nb


def finetune(cfg: FinetuneConfig, *, step_callback: Callable[[Any, Any], None] | None = None) -> dict[str, Any]:
    """Train as configured; returns the metrics written to metrics.json (on every rank).

    step_callback(train_state, model) runs after each optimizer step (after
    any mid-epoch checkpoint), e.g. to stop a run or inject a fault in tests."""
    import torch

    from train.distributed import cleanup, init_distributed

    device = resolve_device(cfg.device)
    from train.engine import check_amp

    try:
        check_amp(cfg.amp, device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.attention == "xformers" and device.type != "cuda":
        raise ConfigError("--attention xformers has no CPU kernels; use --attention sdpa on CPU")
    dist = init_distributed(device.type)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    try:
        return _finetune(cfg, device, dist, step_callback)
    finally:
        cleanup(dist)


def _finetune(cfg: FinetuneConfig, device, dist, step_callback) -> dict[str, Any]:
    import torch
    from torch import nn

    from train import engine
    from train.checkpoint import git_revision, library_versions, make_record, save_atomic
    from train.datasets import ManifestDataset, read_labels
    from train.distributed import barrier, broadcast_object
    from train.model import build_model
    from train.optim import Schedule, build_optimizer
    from train.peft_modes import setup_mode
    from train.preprocessing import PreprocessConfig, eval_transform, train_transform

    t_start = time.perf_counter()
    out = Path(cfg.output_path)
    read_labels(cfg.data_path)   # a wrong --data_path fails before anything is written
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(dist)
    handlers = _setup_logging(out, dist.is_main)
    try:
        lr = effective_lr(cfg)
        num_workers = resolve_workers(cfg.num_workers)
        log.info("train.finetune: %s", " ".join(sys.argv))
        log.info("device %s%s, %d process(es), %d data worker(s), amp %s", device,
                 f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
                 dist.world_size, num_workers, cfg.amp)

        # ---- data
        class_names = read_labels(cfg.data_path)
        train_base = ManifestDataset(cfg.data_path, "train", transform=engine.identity)
        val_base = _optional_split(cfg.data_path, "val")
        test_base = _optional_split(cfg.data_path, "test")
        pre = PreprocessConfig.for_image_size(cfg.img_size)
        train_tf = train_transform(pre, augment=not cfg.no_augment)
        eval_tf = eval_transform(pre)
        log.info("data %s: %d train, %d val, %d test images, %d classes; preprocessing %s",
                 cfg.data_path, len(train_base), len(val_base or []), len(test_base or []),
                 len(class_names), pre.to_dict())
        if val_base is None:
            log.warning("no val split in %s: model_best.pth will be the last epoch", cfg.data_path)

        # ---- resume?
        ckpt_path = out / CHECKPOINT_LAST
        ckpt = None
        if cfg.resume and ckpt_path.is_file():
            ckpt = read_training_checkpoint(ckpt_path)
            _check_resume_compatible(ckpt, cfg, class_names, ckpt_path)
            log.info("resuming from %s (epoch %d, step %d, batch %d of the epoch)", ckpt_path,
                     ckpt["train_state"]["epoch"] + 1, ckpt["train_state"]["step"],
                     ckpt["train_state"]["batch_in_epoch"])
        elif not cfg.resume and ckpt_path.is_file():
            log.info("--no-resume: ignoring %s (it is replaced at the end of the first epoch)", ckpt_path)

        # ---- model
        if not ckpt:
            prefer_hub_cache_when_offline(cfg.weights)
        engine.seed_everything(cfg.seed)
        built = build_model(cfg.arch, weights="random" if ckpt else cfg.weights,
                            num_classes=len(class_names), img_size=cfg.img_size, head=cfg.head,
                            attention=cfg.attention, backbone_overrides=cfg.backbone_overrides or None)
        weights_source = ckpt["weights_source"] if ckpt else built.weights_source
        _log_weights_banner(weights_source)
        setup = setup_mode(built.model, cfg.mode, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, unfreeze_blocks=cfg.unfreeze_blocks)
        model = setup.model.to(device)
        if cfg.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        optimizer = build_optimizer(model, lr=lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
        scaler = engine.make_scaler(cfg.amp, device)
        state = engine.TrainState()
        if ckpt:
            model.load_state_dict(ckpt["state_dict"], strict=True)
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            state = engine.TrainState.from_dict(ckpt["train_state"])

        # ---- what the loop trains on
        timing: dict[str, float] = {}
        if cfg.cache_features:
            t0 = time.perf_counter()
            model.eval()
            kw = dict(batch_size=cfg.batch_size, device=device, amp=cfg.amp, num_workers=num_workers,
                      dist=dist, seed=cfg.seed, progress=cfg.progress)

            def cache(base, name):
                if base is None:
                    return None
                feats, labels = engine.predict(model.embed, engine.SeededDataset(base, eval_tf, cfg.seed),
                                               desc=f"features {name}", **kw)
                return engine.FeatureDataset(torch.from_numpy(feats), torch.from_numpy(labels))

            train_ds, val_ds, test_ds = cache(train_base, "train"), cache(val_base, "val"), cache(test_base, "test")
            timing["feature_cache_s"] = time.perf_counter() - t0
            log.info("cached %d-dim embeddings of %d images in %.1f s (eval preprocessing: no augmentation)",
                     train_ds.features.shape[1], len(train_ds) + len(val_ds or []) + len(test_ds or []),
                     timing["feature_cache_s"])
            trained_module: nn.Module = model.head
            eval_fn = model.head
        else:
            train_ds = engine.SeededDataset(train_base, train_tf, cfg.seed)
            val_ds = engine.SeededDataset(val_base, eval_tf, cfg.seed) if val_base is not None else None
            test_ds = engine.SeededDataset(test_base, eval_tf, cfg.seed) if test_base is not None else None
            trained_module = model
            eval_fn = model

        n_batches = _num_batches(len(train_ds), cfg.batch_size, dist.world_size, cfg.max_train_batches)
        steps_per_epoch = -(-n_batches // cfg.accum_steps)
        total_epochs = cfg.lp_epochs + cfg.epochs
        schedule = Schedule(lr=lr, min_lr=cfg.min_lr, total_steps=total_epochs * steps_per_epoch,
                            warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
                            lp_steps=cfg.lp_epochs * steps_per_epoch, lp_lr=cfg.lp_lr)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        sampler = engine.epoch_sampler(len(train_ds), seed=cfg.seed, dist=dist)
        counts = setup.counts()
        log.info("%s: mode %s%s, %s parameters (%s trainable), lr %.3g (layer decay %.2f), %d epoch(s)%s, "
                 "%d step(s)/epoch of batch %d x %d process(es) x %d accumulation",
                 cfg.arch, cfg.mode, " (cached features)" if cfg.cache_features else "",
                 f"{counts['parameters']:,}", f"{counts['trainable']:,}", lr, cfg.layer_decay, cfg.epochs,
                 f" + {cfg.lp_epochs} linear-probe warm-up" if cfg.lp_epochs else "", steps_per_epoch,
                 cfg.batch_size, dist.world_size, cfg.accum_steps)
        eval_kw = dict(batch_size=cfg.batch_size, device=device, amp=cfg.amp,
                       num_workers=0 if cfg.cache_features else num_workers, dist=dist, seed=cfg.seed)

        def record_extra() -> dict[str, Any]:
            return dict(mode=cfg.mode, lora=setup.info or None)

        def save_training_state(reason: str) -> None:
            if not engine.all_finite(model):
                raise engine.NonFiniteError(
                    f"weights became non-finite at epoch {state.epoch + 1}, step {state.step}: not writing "
                    f"{ckpt_path} (the last good one is kept). Lower --lr or set --clip-grad.")
            if not dist.is_main:
                return
            rec = make_record(model, arch=cfg.arch, img_size=cfg.img_size, class_names=class_names,
                              preprocessing=pre.to_dict(), weights_source=weights_source,
                              config=cfg.to_dict(), backbone_overrides=cfg.backbone_overrides,
                              kind="training_state", **record_extra())
            rec.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else {},
                       scheduler=schedule.state_dict(), rng=engine.rng_state(), train_state=state.to_dict(),
                       epoch=state.epoch, step=state.step)
            save_atomic(rec, ckpt_path)
            log.debug("saved %s (%s)", ckpt_path, reason)

        def on_step(st) -> None:
            if cfg.save_every_steps and st.step % cfg.save_every_steps == 0:
                save_training_state(f"step {st.step}")
            if step_callback is not None:
                step_callback(st, model)

        def plain_record(metrics: dict[str, Any], **extra) -> dict[str, Any]:
            return make_record(setup.export_model(), arch=cfg.arch, img_size=cfg.img_size,
                               class_names=class_names, preprocessing=pre.to_dict(),
                               weights_source=weights_source, metrics=metrics, config=cfg.to_dict(),
                               backbone_overrides=cfg.backbone_overrides, **record_extra(), **extra)

        if dist.is_main and not ckpt:
            _write_config_yaml(out / "config.yaml", cfg, weights_source, lr, num_workers, dist.world_size,
                               git_revision(), library_versions())
        if ckpt:
            engine.set_rng_state(ckpt["rng"])   # last: building the model consumed RNG
        wrapped, wrapped_phase = trained_module, None
        last_good = str(ckpt_path) if ckpt_path.is_file() and ckpt else None

        # ---- epochs
        while state.epoch < total_epochs:
            epoch = state.epoch
            lp_phase = schedule.in_linear_probe(epoch * steps_per_epoch)
            if not cfg.cache_features:
                setup.set_phase(linear_probe=lp_phase)
            if dist.enabled and wrapped_phase != lp_phase:
                # DDP records which parameters train when it is built: rebuild it when the phase changes.
                from torch.nn.parallel import DistributedDataParallel as DDP

                wrapped = DDP(trained_module, device_ids=[device.index] if device.type == "cuda" else None)
                wrapped_phase = lp_phase
            sampler.set_epoch(epoch, skip=state.batch_in_epoch * cfg.batch_size)
            loader = engine.make_loader(train_ds, sampler, batch_size=cfg.batch_size,
                                        num_workers=0 if cfg.cache_features else num_workers,
                                        seed=cfg.seed + epoch, device=device)
            phase = "linear-probe warm-up" if lp_phase and cfg.mode != "linear" else cfg.mode
            stats = engine.train_one_epoch(
                model=wrapped, loader=loader, n_batches=n_batches, optimizer=optimizer, schedule=schedule,
                criterion=criterion, device=device, amp=cfg.amp, scaler=scaler, state=state,
                accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, dist=dist, on_step=on_step,
                progress=cfg.progress, last_good=last_good,
                desc=f"epoch {epoch + 1}/{total_epochs} ({phase})")
            t_eval = time.perf_counter()
            if val_ds is not None:
                model.eval()
                val = engine.evaluate(eval_fn, val_ds, class_names, **eval_kw)
            else:
                val = None
            timing["eval_s"] = timing.get("eval_s", 0.0) + time.perf_counter() - t_eval
            entry = {"epoch": epoch + 1, "phase": phase, **{k: stats[k] for k in
                     ("train_loss", "lr", "images_per_s", "epoch_time_s", "train_samples")},
                     "val_loss": val["loss"] if val else None,
                     "val_accuracy": val["accuracy"] if val else None,
                     "val_f1_macro": val["f1_macro"] if val else None,
                     "val_auc_roc_macro": val["auc_roc_macro"] if val else None}
            state.history.append(entry)
            improved = val is None or val["accuracy"] > state.best_val_accuracy
            if improved:
                state.best_val_accuracy = val["accuracy"] if val else -1.0
                state.best_epoch = epoch + 1
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            state.epoch_loss_sum, state.epoch_samples, state.epoch_time_s = 0.0, 0, 0.0
            save_training_state(f"end of epoch {epoch + 1}")
            last_good = str(ckpt_path)
            if improved and dist.is_main:
                save_atomic(plain_record({"val": val, "epoch": epoch + 1}, best_epoch=epoch + 1),
                            out / MODEL_BEST)
            log.info("epoch %d/%d %-8s loss %.4f | val loss %s acc %s F1 %s | lr %.2e | %.1f img/s | %.1f s%s",
                     epoch + 1, total_epochs, phase[:8], stats["train_loss"], _fmt(entry["val_loss"]),
                     _fmt(entry["val_accuracy"]), _fmt(entry["val_f1_macro"]), stats["lr"],
                     stats["images_per_s"], stats["epoch_time_s"], "  *best*" if improved and val else "")

        # ---- final evaluation and outputs
        model.eval()
        t_eval = time.perf_counter()
        test = engine.evaluate(eval_fn, test_ds, class_names, **eval_kw) if test_ds is not None else None
        val_final = engine.evaluate(eval_fn, val_ds, class_names, **eval_kw) if val_ds is not None else None
        timing["eval_s"] = timing.get("eval_s", 0.0) + time.perf_counter() - t_eval
        timing["train_s"] = sum(h["epoch_time_s"] for h in state.history)
        timing["total_s"] = time.perf_counter() - t_start
        metrics = {
            "weights_source": weights_source,
            "arch": cfg.arch, "mode": cfg.mode, "img_size": cfg.img_size,
            "class_names": list(class_names),
            "test": test, "val": val_final,
            "best": {"epoch": state.best_epoch, "val_accuracy": state.best_val_accuracy if val_ds else None},
            "history": state.history,
            "timing": {k: round(v, 3) for k, v in timing.items()},
            "world_size": dist.world_size,
            "device": str(device),
        }
        if dist.is_main:
            save_atomic(plain_record({"test": test, "val": val_final}, epochs_trained=state.epoch),
                        out / MODEL_FINAL)
            _write_json(out / "metrics.json", metrics)
            from train.plots import plot_confusion_matrix, plot_training_curves

            plot_training_curves(state.history, out / "training_curves.png")
            if test is not None:
                plot_confusion_matrix(test["confusion_matrix"], class_names, out / "confusion_matrix.png")
            elif val_final is not None:
                plot_confusion_matrix(val_final["confusion_matrix"], class_names, out / "confusion_matrix.png",
                                      title="confusion matrix (val: no test split)")
            log.info("%s", format_summary(metrics, out))
        barrier(dist)
        return broadcast_object(metrics, dist)
    finally:
        root = logging.getLogger("train")
        for h in handlers:
            root.removeHandler(h)
            h.close()


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _write_config_yaml(path: Path, cfg: FinetuneConfig, weights_source: str, lr: float, num_workers: int,
                       world_size: int, revision: str, versions: dict[str, str]) -> None:
    """The resolved config (re-usable with --config) plus a `run:` record."""
    import yaml

    doc = cfg.to_dict()
    doc["run"] = {"weights_source": weights_source, "effective_lr": lr, "num_workers": num_workers,
                  "world_size": world_size, "git_revision": revision, "versions": versions,
                  "command": " ".join(sys.argv),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def format_summary(metrics: Mapping[str, Any], out: Path) -> str:
    lines = ["", "=" * 72, f"weights: {metrics['weights_source']}"]
    for split in ("val", "test"):
        m = metrics.get(split)
        if m:
            auc = m["auc_roc_macro"]
            lines.append(f"{split:>5}: accuracy {m['accuracy']:.4f}  precision {m['precision_macro']:.4f}  "
                         f"recall {m['recall_macro']:.4f}  F1 {m['f1_macro']:.4f}  "
                         f"AUC {'-' if auc is None else f'{auc:.4f}'}  (n={m['n']})")
    t = metrics["timing"]
    lines.append(f"time: train {t.get('train_s', 0):.1f} s, eval {t.get('eval_s', 0):.1f} s, "
                 f"total {t.get('total_s', 0):.1f} s")
    lines.append(f"outputs in {out}: {MODEL_FINAL}, {MODEL_BEST}, {CHECKPOINT_LAST}, metrics.json, config.yaml, "
                 "training_curves.png, confusion_matrix.png, train.log")
    lines.append("=" * 72)
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    S = argparse.SUPPRESS  # only flags given on the command line override the YAML file
    p = argparse.ArgumentParser(
        prog="python -m train.finetune",
        description="Stage 2: fine-tune a DINOv2 classifier on a data folder written by train.load_data.",
        epilog="Precedence: defaults < --config YAML < flags. Resumes from OUTPUT/checkpoint_last.pth "
               "unless --no-resume. Multi-process: torchrun --nproc_per_node N -m train.finetune ...")
    g = p.add_argument_group("Required (defaults follow the seed contract)")
    g.add_argument("--data_path", "--data-path", default=S, metavar="DIR",
                   help=f"data folder from train.load_data (default: {d.data_path})")
    g.add_argument("--output_path", "--output-path", default=S, metavar="DIR",
                   help=f"where models, metrics and plots go (default: {d.output_path})")
    g = p.add_argument_group("Model")
    from_arch = ("vits14", "vitb14", "vitl14", "vitg14", "vits14_reg4", "vitb14_reg4", "vitl14_reg4",
                 "vitg14_reg4")  # = train.model.ARCHS (kept literal so --help does not import torch)
    g.add_argument("--arch", choices=from_arch, default=S, help=f"backbone (default: {d.arch})")
    g.add_argument("--weights", default=S, metavar="SRC",
                   help="random | hub | a hub id (e.g. timm/vit_small_patch14_dinov2.lvd142m) | a local "
                        f".pth/.safetensors file, official or timm layout (default: {d.weights})")
    g.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=S, metavar="PX",
                   help=f"input size, a multiple of 14 (default: {d.img_size})")
    g.add_argument("--head", choices=HEADS, default=S,
                   help=f"embedding fed to the linear head (default: {d.head})")
    g.add_argument("--attention", choices=ATTENTIONS, default=S,
                   help=f"attention kernel for training; xformers needs a GPU (default: {d.attention})")
    g.add_argument("--backbone-overrides", dest="backbone_overrides", type=json.loads, default=S,
                   metavar="JSON", help='extra timm kwargs, e.g. \'{"depth": 2}\' (tiny test models)')
    g = p.add_argument_group("What trains")
    g.add_argument("--mode", choices=MODES, default=S,
                   help=f"linear probe | full fine-tune | LoRA on attention qkv/proj | last N blocks "
                        f"(default: {d.mode})")
    g.add_argument("--cache-features", dest="cache_features", action="store_true", default=S,
                   help="--mode linear: compute backbone embeddings once (no augmentation) and train the head on them")
    g.add_argument("--layer-decay", dest="layer_decay", type=float, default=S, metavar="X",
                   help=f"layer-wise lr decay per block, 1 = off (default: {d.layer_decay})")
    g.add_argument("--lora-rank", dest="lora_rank", type=int, default=S, metavar="N", help=f"(default: {d.lora_rank})")
    g.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=S, metavar="X", help=f"(default: {d.lora_alpha})")
    g.add_argument("--lora-dropout", dest="lora_dropout", type=float, default=S, metavar="X",
                   help=f"(default: {d.lora_dropout})")
    g.add_argument("--unfreeze-blocks", dest="unfreeze_blocks", type=int, default=S, metavar="N",
                   help=f"--mode lastn: train the last N blocks + final norm + head (default: {d.unfreeze_blocks})")
    g.add_argument("--lp-epochs", dest="lp_epochs", type=int, default=S, metavar="K",
                   help=f"linear-probe warm start: K head-only epochs before full/lora/lastn (default: {d.lp_epochs})")
    g.add_argument("--lp-lr", dest="lp_lr", type=float, default=S, metavar="X", help=f"lr of the warm start (default: {d.lp_lr})")
    g = p.add_argument_group("Optimisation")
    g.add_argument("--epochs", type=int, default=S, metavar="N", help=f"(default: {d.epochs}, plus --lp-epochs)")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=S, metavar="N",
                   help=f"per process (default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=S, metavar="X",
                   help="peak AdamW lr of the head (default by mode: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--min-lr", dest="min_lr", type=float, default=S, metavar="X", help=f"cosine floor (default: {d.min_lr})")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=S, metavar="X",
                   help=f"AdamW weight decay, not on norms/biases/tokens (default: {d.weight_decay})")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=S, metavar="X",
                   help=f"linear warm-up, per step (default: {d.warmup_epochs})")
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=S, metavar="X",
                   help=f"(default: {d.label_smoothing})")
    g.add_argument("--accum-steps", dest="accum_steps", type=int, default=S, metavar="N",
                   help=f"gradient accumulation (default: {d.accum_steps})")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=S, metavar="X",
                   help=f"max gradient norm, 0 = off (default: {d.clip_grad})")
    g.add_argument("--amp", choices=AMPS, default=S,
                   help=f"mixed precision; fp16 needs a GPU (default: {d.amp})")
    g.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_true", default=S,
                   help="recompute activations in backward (less memory, ~30%% slower)")
    g.add_argument("--no-augment", dest="no_augment", action="store_true", default=S,
                   help="train on the evaluation preprocessing (no random crop/flip)")
    g.add_argument("--seed", type=int, default=S, metavar="N", help=f"(default: {d.seed})")
    g = p.add_argument_group("Run")
    g.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML with any of these options (keys with _ or -); flags override it")
    g.add_argument("--device", choices=DEVICES, default=S, help=f"(default: {d.device})")
    g.add_argument("--num-workers", "--num_workers", dest="num_workers", type=int, default=S, metavar="N",
                   help="DataLoader workers per process (default: min(8, CPUs - 1))")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=S,
                   help="continue from OUTPUT/checkpoint_last.pth if present (default: on)")
    g.add_argument("--max-train-batches", dest="max_train_batches", type=int, default=S, metavar="N",
                   help="stop each epoch after N batches (smoke runs; default: whole epoch)")
    g.add_argument("--save-every-steps", dest="save_every_steps", type=int, default=S, metavar="N",
                   help="also write checkpoint_last.pth every N optimizer steps (default: end of epoch only)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="no tqdm progress bars (epoch summary lines stay)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    try:
        cfg = resolve_config(args, config_file)
        finetune(cfg)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from checkpoint_last.pth", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the known errors below get a message, not a traceback
        from train.datasets import ManifestError
        from train.engine import NonFiniteError
        from train.model import WeightsError

        if isinstance(exc, NonFiniteError):
            print(f"error: {exc}", file=sys.stderr)
            return 3
        if isinstance(exc, (ConfigError, WeightsError, ManifestError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
