"""The fine-tuning run behind `dinov2-triton train`: data, model (fresh or
resumed), what the loop trains on, the epochs, the checkpoints and the final
outputs, each a method of :class:`Trainer`.

    from dinov2_triton.train.finetune_config import resolve_config
    from dinov2_triton.train.trainer import finetune
    metrics = finetune(resolve_config({"data_path": "data", "weights": "random"}))

Outputs (rank 0 only): model_final.pth, model_best.pth, checkpoint_last.pth
(dinov2_triton.train.checkpoint records), metrics.json, config.yaml, train.log,
training_curves.png, confusion_matrix.png. The per-step loop, evaluation and
RNG handling are in train/engine.py; DDP helpers in train/distributed.py."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dinov2_triton.train.checkpoint import CHECKPOINT_LAST, MODEL_BEST, MODEL_FINAL
from dinov2_triton.train.finetune_config import (
    RESUME_MUST_MATCH,
    RESUME_SHOULD_MATCH,
    ConfigError,
    FinetuneConfig,
    effective_lr,
    prefer_hub_cache_when_offline,
    resolve_device,
    resolve_workers,
)

log = logging.getLogger("dinov2_triton.train.finetune")

StepCallback = Callable[[Any, Any], None]


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------
def _setup_logging(output: Path | None, is_main: bool) -> list[logging.Handler]:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    root = logging.getLogger("dinov2_triton.train")
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


def log_weights_banner(source: str, pretrained: bool, arch: str) -> None:
    """The warning of a run without pretrained weights, naming the arch's family and its released file."""
    from dinov2_triton.train.archs import arch_spec

    if not pretrained:
        spec = arch_spec(arch, flag="--arch")
        bar = "#" * 78
        log.warning(bar)
        log.warning("#  WEIGHTS: %s", source)
        log.warning("#  This backbone is NOT pretrained: accuracy says nothing about %s.", spec.family_name)
        log.warning("#  Use --weights hub (online) or --weights /path/%s.", spec.weights_file_glob)
        log.warning("#  Training from scratch? Layer decay and low lr protect pretrained features;")
        log.warning("#  here --layer-decay 1.0 --lr 1e-3 --no-augment learn faster in short runs.")
        log.warning(bar)
    else:
        log.info("weights: %s", source)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


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


def write_config_yaml(path: Path, cfg: FinetuneConfig, *, weights_source: str, pretrained: bool, lr: float,
                      num_workers: int, world_size: int) -> None:
    """The resolved config (re-usable with --config) plus a `run:` record."""
    from dinov2_triton.core.artifact_io import atomic_write_yaml, git_revision, library_versions, utc_now

    doc = cfg.to_dict()
    doc["run"] = {"weights_source": weights_source, "pretrained": pretrained, "effective_lr": lr,
                  "num_workers": num_workers, "world_size": world_size, "git_revision": git_revision(),
                  "versions": library_versions(), "command": " ".join(sys.argv), "created": utc_now()}
    atomic_write_yaml(path, doc)


# ----------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------
def read_training_checkpoint(path: str | Path):
    """checkpoint_last.pth as a CheckpointRecord that holds the training state
    (RecordError naming the file otherwise, with the --no-resume way out)."""
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.train.checkpoint import read_checkpoint

    try:
        record = read_checkpoint(path)
    except RecordError as exc:
        raise RecordError(f"{exc}; use --no-resume to start over") from None
    if record.training is None:
        raise RecordError(f"{path}: field 'training': missing (a model checkpoint, not the training state "
                          "of dinov2_triton.train.finetune); use --no-resume to start over")
    return record


def check_resume_compatible(ckpt, cfg: FinetuneConfig, class_names: Sequence[str], path: Path) -> None:
    old = ckpt.config
    new = cfg.to_dict()
    bad = [f"{k}: checkpoint {old.get(k)!r} vs now {new[k]!r}" for k in RESUME_MUST_MATCH
           if old.get(k) != new[k]]
    if list(ckpt.class_names) != list(class_names):
        bad.append(f"class_names: checkpoint {list(ckpt.class_names)} vs labels.txt {list(class_names)}")
    if bad:
        raise ConfigError(f"{path}: cannot resume, the run differs in: {'; '.join(bad)}. "
                          "Use --no-resume to start over or another --output-path.")
    changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in RESUME_SHOULD_MATCH if old.get(k) != new[k]]
    if changed:
        log.warning("resuming with changed settings (%s): the result will differ from an uninterrupted run",
                    ", ".join(changed))


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig, *, step_callback: StepCallback | None = None) -> dict[str, Any]:
    """Train as configured; returns the metrics written to metrics.json (on every rank).

    step_callback(train_state, model) runs after each optimizer step (after
    any mid-epoch checkpoint), e.g. to stop a run or inject a fault in tests."""
    import torch

    from dinov2_triton.train.distributed import cleanup, init_distributed
    from dinov2_triton.train.engine import check_amp

    device = resolve_device(cfg.device)
    try:
        check_amp(cfg.amp, device, cfg.attention)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.attention == "xformers" and device.type != "cuda":
        raise ConfigError("--attention xformers has no CPU kernels; use --attention sdpa on CPU")
    dist = init_distributed(device.type)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    try:
        return Trainer(cfg, device, dist, step_callback).run()
    finally:
        cleanup(dist)


def _optional_split(data_path: str, split: str):
    from dinov2_triton.data.datasets import ManifestDataset, read_manifest
    from dinov2_triton.train.engine import identity

    if not read_manifest(data_path, split):
        return None
    return ManifestDataset(data_path, split, transform=identity)


def num_batches(n: int, batch_size: int, world: int, max_batches: int) -> int:
    per_rank = -(-n // world)
    nb = -(-per_rank // batch_size)
    return min(nb, max_batches) if max_batches else nb


class Trainer:
    """One fine-tuning run. `run()` calls, in order: load_data, load_resume,
    build_model, prepare_datasets, plan, train_epochs, finish."""

    def __init__(self, cfg: FinetuneConfig, device, dist, step_callback: StepCallback | None = None):
        self.cfg, self.device, self.dist, self.step_callback = cfg, device, dist, step_callback
        self.out = Path(cfg.output_path)
        self.ckpt_path = self.out / CHECKPOINT_LAST
        self.lr = effective_lr(cfg)
        self.num_workers = resolve_workers(cfg.num_workers)
        self.timing: dict[str, float] = {}
        self.wrapped = None          # what train_one_epoch runs: trained_module, or its DDP wrapper
        self.wrapped_phase = None

    def run(self) -> dict[str, Any]:
        from dinov2_triton.data.datasets import read_labels
        from dinov2_triton.train.distributed import barrier

        self.t_start = time.perf_counter()
        read_labels(self.cfg.data_path)   # a wrong --data-path fails before anything is written
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        handlers = _setup_logging(self.out, self.dist.is_main)
        try:
            self.log_start()
            self.load_data()
            self.load_resume()
            self.build_model()
            self.prepare_datasets()
            self.plan()
            self.train_epochs()
            return self.finish()
        finally:
            self.wrapped = None      # free a DDP wrapper before the process group goes
            root = logging.getLogger("dinov2_triton.train")
            for h in handlers:
                root.removeHandler(h)
                h.close()

    def log_start(self) -> None:
        import torch

        log.info("dinov2_triton.train.finetune: %s", " ".join(sys.argv))
        log.info("device %s%s, %d process(es), %d data worker(s), amp %s", self.device,
                 f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "",
                 self.dist.world_size, self.num_workers, self.cfg.amp)

    # ------------------------------------------------------------------ setup
    def load_data(self) -> None:
        from dinov2_triton.core.preprocessing import PreprocessConfig, eval_transform, train_transform
        from dinov2_triton.data.datasets import ManifestDataset, read_labels
        from dinov2_triton.data.folder import read_summary
        from dinov2_triton.train.engine import identity

        cfg = self.cfg
        self.data_summary = read_summary(cfg.data_path)
        self.class_names = read_labels(cfg.data_path)
        if list(self.data_summary.classes) != self.class_names:
            raise ConfigError(f"{Path(cfg.data_path) / 'summary.json'}: classes {self.data_summary.classes} "
                              f"differ from labels.txt {self.class_names}; rerun dinov2_triton.data.load --force")
        self.train_base = ManifestDataset(cfg.data_path, "train", transform=identity)
        self.val_base = _optional_split(cfg.data_path, "val")
        self.test_base = _optional_split(cfg.data_path, "test")
        self.pre = PreprocessConfig.for_image_size(cfg.img_size)
        self.train_tf = train_transform(self.pre, augment=not cfg.no_augment)
        self.eval_tf = eval_transform(self.pre)
        log.info("data %s (%s, seed %d): %d train, %d val, %d test images, %d classes; preprocessing %s",
                 cfg.data_path, self.data_summary.source.type, self.data_summary.seed, len(self.train_base),
                 len(self.val_base or []), len(self.test_base or []), len(self.class_names), self.pre.to_dict())
        if self.val_base is None:
            log.warning("no val split in %s: model_best.pth will be the last epoch", cfg.data_path)

    def load_resume(self) -> None:
        self.resume = None
        if self.cfg.resume and self.ckpt_path.is_file():
            ckpt = read_training_checkpoint(self.ckpt_path)
            check_resume_compatible(ckpt, self.cfg, self.class_names, self.ckpt_path)
            pos = ckpt.training.train_state
            log.info("resuming from %s (epoch %d, step %d, batch %d of the epoch)", self.ckpt_path,
                     pos["epoch"] + 1, pos["step"], pos["batch_in_epoch"])
            self.resume = ckpt
        elif not self.cfg.resume and self.ckpt_path.is_file():
            log.info("--no-resume: ignoring %s (it is replaced at the end of the first epoch)", self.ckpt_path)

    def build_model(self) -> None:
        from dinov2_triton.train import engine
        from dinov2_triton.train.model import build_model
        from dinov2_triton.train.optim import build_optimizer
        from dinov2_triton.train.peft_modes import setup_mode

        cfg, ckpt = self.cfg, self.resume
        if not ckpt:
            prefer_hub_cache_when_offline(cfg.weights)
        engine.seed_everything(cfg.seed)
        built = build_model(cfg.arch, weights="random" if ckpt else cfg.weights,
                            num_classes=len(self.class_names), img_size=cfg.img_size, head=cfg.head,
                            attention=cfg.attention, backbone_overrides=cfg.backbone_overrides or None)
        self.weights_source = ckpt.weights_source if ckpt else built.weights_source
        # a resumed run keeps the resampling its weights were made with
        self.pos_embed_resampling = ckpt.pos_embed_resampling if ckpt else built.pos_embed_resampling
        # --weights random is the only source that is not pretrained weights
        self.pretrained = ckpt.pretrained if ckpt else cfg.weights != "random"
        log_weights_banner(self.weights_source, self.pretrained, cfg.arch)
        self.setup = setup_mode(built.model, cfg.mode, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                lora_dropout=cfg.lora_dropout, unfreeze_blocks=cfg.unfreeze_blocks)
        self.model = self.setup.model.to(self.device)
        if cfg.grad_checkpointing:
            self.model.backbone.set_grad_checkpointing(True)
        self.optimizer = build_optimizer(self.model, lr=self.lr, weight_decay=cfg.weight_decay,
                                         layer_decay=cfg.layer_decay)
        self.scaler = engine.make_scaler(cfg.amp, self.device)
        self.state = engine.TrainState()
        if ckpt:
            self.model.load_state_dict(ckpt.state_dict, strict=True)
            self.optimizer.load_state_dict(ckpt.training.optimizer)
            if ckpt.training.scaler:
                self.scaler.load_state_dict(ckpt.training.scaler)
            self.state = engine.TrainState.from_dict(ckpt.training.train_state)

    def prepare_datasets(self) -> None:
        """What the loop trains on: augmented images, or (--cache-features)
        the frozen backbone's embeddings computed once."""
        if self.cfg.cache_features:
            self._cache_features()
            return
        from dinov2_triton.train.engine import SeededDataset

        seed = self.cfg.seed
        self.train_ds = SeededDataset(self.train_base, self.train_tf, seed)
        self.val_ds = SeededDataset(self.val_base, self.eval_tf, seed) if self.val_base is not None else None
        self.test_ds = SeededDataset(self.test_base, self.eval_tf, seed) if self.test_base is not None else None
        self.trained_module = self.eval_fn = self.model

    def _cache_features(self) -> None:
        import torch

        from dinov2_triton.train import engine

        cfg = self.cfg
        t0 = time.perf_counter()
        self.model.eval()
        kw = dict(batch_size=cfg.batch_size, device=self.device, amp=cfg.amp, num_workers=self.num_workers,
                  dist=self.dist, seed=cfg.seed, progress=cfg.progress)

        def cache(base, name):
            if base is None:
                return None
            feats, labels = engine.predict(self.model.embed, engine.SeededDataset(base, self.eval_tf, cfg.seed),
                                           desc=f"features {name}", **kw)
            return engine.FeatureDataset(torch.from_numpy(feats), torch.from_numpy(labels))

        self.train_ds = cache(self.train_base, "train")
        self.val_ds, self.test_ds = cache(self.val_base, "val"), cache(self.test_base, "test")
        self.timing["feature_cache_s"] = time.perf_counter() - t0
        log.info("cached %d-dim embeddings of %d images in %.1f s (eval preprocessing: no augmentation)",
                 self.train_ds.features.shape[1],
                 len(self.train_ds) + len(self.val_ds or []) + len(self.test_ds or []),
                 self.timing["feature_cache_s"])
        self.trained_module = self.eval_fn = self.model.head

    def plan(self) -> None:
        """Steps, schedule, loss and sampler; writes config.yaml on a fresh run."""
        from torch import nn

        from dinov2_triton.train import engine
        from dinov2_triton.train.optim import Schedule

        cfg, dist = self.cfg, self.dist
        self.n_batches = num_batches(len(self.train_ds), cfg.batch_size, dist.world_size, cfg.max_train_batches)
        self.steps_per_epoch = -(-self.n_batches // cfg.accum_steps)
        self.total_epochs = cfg.lp_epochs + cfg.epochs
        spe = self.steps_per_epoch
        self.schedule = Schedule(lr=self.lr, min_lr=cfg.min_lr, total_steps=self.total_epochs * spe,
                                 warmup_steps=int(round(cfg.warmup_epochs * spe)),
                                 lp_steps=cfg.lp_epochs * spe, lp_lr=cfg.lp_lr)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.sampler = engine.epoch_sampler(len(self.train_ds), seed=cfg.seed, dist=dist)
        counts = self.setup.counts()
        log.info("%s: mode %s%s, %s parameters (%s trainable), lr %.3g (layer decay %.2f), %d epoch(s)%s, "
                 "%d step(s)/epoch of batch %d x %d process(es) x %d accumulation",
                 cfg.arch, cfg.mode, " (cached features)" if cfg.cache_features else "",
                 f"{counts['parameters']:,}", f"{counts['trainable']:,}", self.lr, cfg.layer_decay, cfg.epochs,
                 f" + {cfg.lp_epochs} linear-probe warm-up" if cfg.lp_epochs else "", spe,
                 cfg.batch_size, dist.world_size, cfg.accum_steps)
        self.eval_kw = dict(batch_size=cfg.batch_size, device=self.device, amp=cfg.amp,
                            num_workers=0 if cfg.cache_features else self.num_workers, dist=dist, seed=cfg.seed)
        if dist.is_main and not self.resume:
            write_config_yaml(self.out / "config.yaml", cfg, weights_source=self.weights_source,
                              pretrained=self.pretrained, lr=self.lr, num_workers=self.num_workers,
                              world_size=dist.world_size)
        if self.resume:
            engine.set_rng_state(self.resume.training.rng)   # last: building the model consumed RNG
        self.wrapped = self.trained_module
        self.last_good = str(self.ckpt_path) if self.resume else None

    # ------------------------------------------------------------------ checkpoints
    def _record(self, model, **fields):
        from dinov2_triton.train.checkpoint import make_checkpoint_record

        cfg = self.cfg
        return make_checkpoint_record(
            model, arch=cfg.arch, class_names=self.class_names, preprocessing=self.pre,
            weights_source=self.weights_source, pretrained=self.pretrained, config=cfg.to_dict(),
            backbone_overrides=cfg.backbone_overrides, mode=cfg.mode, lora=self.setup.info or None,
            pos_embed_resampling=self.pos_embed_resampling, **fields)

    def save_training_state(self, reason: str) -> None:
        """checkpoint_last.pth, on rank 0, never with non-finite weights."""
        from dinov2_triton.train import engine
        from dinov2_triton.train.checkpoint import TrainingResume, save_checkpoint

        if not engine.all_finite(self.model):
            raise engine.NonFiniteError(
                f"weights became non-finite at epoch {self.state.epoch + 1}, step {self.state.step}: not writing "
                f"{self.ckpt_path} (the last good one is kept). Lower --lr or set --clip-grad.")
        if not self.dist.is_main:
            return
        training = TrainingResume(
            optimizer=self.optimizer.state_dict(), scheduler=self.schedule.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
            rng=engine.rng_state(), train_state=self.state.to_dict())
        save_checkpoint(self._record(self.model, training=training), self.ckpt_path)
        log.debug("saved %s (%s)", self.ckpt_path, reason)

    def save_model(self, name: str, metrics: dict[str, Any], **fields) -> None:
        """model_best.pth / model_final.pth: plain weights (LoRA merged), rank 0."""
        from dinov2_triton.train.checkpoint import save_checkpoint

        if self.dist.is_main:
            save_checkpoint(self._record(self.setup.export_model(), metrics=metrics, **fields), self.out / name)

    def on_step(self, st) -> None:
        if self.cfg.save_every_steps and st.step % self.cfg.save_every_steps == 0:
            self.save_training_state(f"step {st.step}")
        if self.step_callback is not None:
            self.step_callback(st, self.model)

    # ------------------------------------------------------------------ epochs
    def wrap_for_phase(self, lp_phase: bool) -> None:
        """DDP records which parameters train when it is built: a new wrapper
        when the phase (linear-probe warm start -> full) changes."""
        if not self.dist.enabled or self.wrapped_phase == lp_phase:
            return
        import gc

        from dinov2_triton.train.distributed import wrap_ddp

        # Free the previous wrapper first: until it is destroyed its reducer
        # keeps autograd hooks and gradient buckets on the shared parameters,
        # and DDP objects sit in reference cycles, so this (its only
        # reference) is dropped and the cycles collected.
        self.wrapped = None
        gc.collect()
        self.wrapped = wrap_ddp(self.trained_module, self.device)
        self.wrapped_phase = lp_phase

    def train_epochs(self) -> None:
        from dinov2_triton.train import engine

        cfg, state = self.cfg, self.state
        while state.epoch < self.total_epochs:
            epoch = state.epoch
            lp_phase = self.schedule.in_linear_probe(epoch * self.steps_per_epoch)
            if not cfg.cache_features:
                self.setup.set_phase(linear_probe=lp_phase)
            self.wrap_for_phase(lp_phase)
            self.sampler.set_epoch(epoch, skip=state.batch_in_epoch * cfg.batch_size)
            loader = engine.make_loader(self.train_ds, self.sampler, batch_size=cfg.batch_size,
                                        num_workers=0 if cfg.cache_features else self.num_workers,
                                        seed=cfg.seed + epoch, device=self.device)
            phase = "linear-probe warm-up" if lp_phase and cfg.mode != "linear" else cfg.mode
            stats = engine.train_one_epoch(
                model=self.wrapped, loader=loader, n_batches=self.n_batches, optimizer=self.optimizer,
                schedule=self.schedule, criterion=self.criterion, device=self.device, amp=cfg.amp,
                scaler=self.scaler, state=state, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
                dist=self.dist, on_step=self.on_step, progress=cfg.progress, last_good=self.last_good,
                desc=f"epoch {epoch + 1}/{self.total_epochs} ({phase})")
            self.end_epoch(epoch, phase, stats)

    def end_epoch(self, epoch: int, phase: str, stats: Mapping[str, Any]) -> None:
        from dinov2_triton.train import engine

        state = self.state
        t_eval = time.perf_counter()
        val = None
        if self.val_ds is not None:
            self.model.eval()
            val = engine.evaluate(self.eval_fn, self.val_ds, self.class_names, **self.eval_kw)
        self.timing["eval_s"] = self.timing.get("eval_s", 0.0) + time.perf_counter() - t_eval
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
        self.save_training_state(f"end of epoch {epoch + 1}")
        self.last_good = str(self.ckpt_path)
        if improved:
            self.save_model(MODEL_BEST, {"val": val, "epoch": epoch + 1}, best_epoch=epoch + 1)
        log.info("epoch %d/%d %-8s loss %.4f | val loss %s acc %s F1 %s | lr %.2e | %.1f img/s | %.1f s%s",
                 epoch + 1, self.total_epochs, phase[:8], stats["train_loss"], _fmt(entry["val_loss"]),
                 _fmt(entry["val_accuracy"]), _fmt(entry["val_f1_macro"]), stats["lr"],
                 stats["images_per_s"], stats["epoch_time_s"], "  *best*" if improved and val else "")

    # ------------------------------------------------------------------ outputs
    def finish(self) -> dict[str, Any]:
        """Final evaluation, model_final.pth, metrics.json, plots."""
        from dinov2_triton.core.artifact_io import atomic_write_json
        from dinov2_triton.train import engine
        from dinov2_triton.train.distributed import barrier, broadcast_object

        cfg, state, out = self.cfg, self.state, self.out
        self.model.eval()
        t_eval = time.perf_counter()
        evaluate = lambda ds: engine.evaluate(self.eval_fn, ds, self.class_names, **self.eval_kw)  # noqa: E731
        test = evaluate(self.test_ds) if self.test_ds is not None else None
        val_final = evaluate(self.val_ds) if self.val_ds is not None else None
        self.timing["eval_s"] = self.timing.get("eval_s", 0.0) + time.perf_counter() - t_eval
        self.timing["train_s"] = sum(h["epoch_time_s"] for h in state.history)
        self.timing["total_s"] = time.perf_counter() - self.t_start
        metrics = {
            "weights_source": self.weights_source, "pretrained": self.pretrained,
            "arch": cfg.arch, "mode": cfg.mode, "img_size": cfg.img_size,
            "class_names": list(self.class_names),
            "data": {"path": str(cfg.data_path), "source": self.data_summary.source.type,
                     "seed": self.data_summary.seed, "split_sizes": dict(self.data_summary.split_sizes)},
            "test": test, "val": val_final,
            "best": {"epoch": state.best_epoch,
                     "val_accuracy": state.best_val_accuracy if self.val_ds is not None else None},
            "history": state.history,
            "timing": {k: round(v, 3) for k, v in self.timing.items()},
            "world_size": self.dist.world_size,
            "device": str(self.device),
        }
        if self.dist.is_main:
            self.save_model(MODEL_FINAL, {"test": test, "val": val_final}, epochs_trained=state.epoch)
            atomic_write_json(out / "metrics.json", metrics)
            self.write_plots(state.history, test, val_final)
            log.info("%s", format_summary(metrics, out))
        barrier(self.dist)
        return broadcast_object(metrics, self.dist)

    def write_plots(self, history, test, val_final) -> None:
        from dinov2_triton.train.plots import plot_confusion_matrix, plot_training_curves

        out = self.out
        plot_training_curves(history, out / "training_curves.png")
        if test is not None:
            plot_confusion_matrix(test["confusion_matrix"], self.class_names, out / "confusion_matrix.png")
        elif val_final is not None:
            plot_confusion_matrix(val_final["confusion_matrix"], self.class_names, out / "confusion_matrix.png",
                                  title="confusion matrix (val: no test split)")
