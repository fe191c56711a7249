"""The training loop and evaluation helpers used by `dinov2_triton.train.finetune`.

Reproducibility rules (what makes `--resume` exact):

* the data order depends only on (seed, epoch) (distributed.EpochSampler);
* each sample's augmentation is drawn from its own generator seeded with
  (seed, epoch, index) (SeededDataset), so it does not depend on worker
  count, worker seeds or where a run was interrupted;
* the learning rate is a pure function of the optimizer step (optim.Schedule);
* checkpoints hold every RNG state, the step and the batch within the epoch,
  and are written only at optimizer-step boundaries.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from dinov2_triton.train.distributed import (
    DistInfo,
    EpochSampler,
    ShardSampler,
    all_reduce_sum,
    any_flag,
    gather_objects,
)

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss (or the gradient) became NaN/Inf; training stopped before any
    checkpoint with bad weights was written."""


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def identity(x):
    """Picklable no-op transform (ManifestDataset hands us the PIL image)."""
    return x


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 100_019 + index) % (2**63 - 1)


class SeededDataset(torch.utils.data.Dataset):
    """Applies `transform` to `base[i]`'s image with torch's RNG seeded from
    (seed, epoch, i). Keys are `(index, epoch)` pairs from EpochSampler, or
    plain indices (deterministic evaluation transforms)."""

    def __init__(self, base, transform: Callable, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        img, label = self.base[index]
        if epoch is None:
            return self.transform(img), label
        # fork_rng: the global generator of this process is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img), label


class FeatureDataset(torch.utils.data.Dataset):
    """Cached backbone embeddings (linear probe with --cache-features)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.features[index], int(self.labels[index])


def make_loader(dataset, sampler, *, batch_size: int, num_workers: int, seed: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    # Own generator: creating an iterator must not consume the global RNG
    # (a resumed run creates one more iterator than an uninterrupted one).
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=device.type == "cuda", drop_last=False,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False)


# ----------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_has_bf16(device: torch.device) -> bool:
    """BF16 in hardware (compute capability >= 8.0). torch.cuda.is_bf16_supported()
    alone also says True when it is only emulated (Volta/Turing), where
    training is slow and xformers refuses bf16 ("only supported on A100+")."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def check_amp(amp: str, device: torch.device, attention: str = "sdpa") -> None:
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp {amp!r}: choose none, bf16 or fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU (CPU autocast has no useful FP16 kernels and "
                         "no loss scaling); use --amp bf16 or --amp none on CPU")
    if amp == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        name = torch.cuda.get_device_name(device)
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(f"--amp bf16: {name} (compute capability {cc}) has no BF16 in hardware "
                         f"(needs >= 8.0){' and xformers refuses it' if attention == 'xformers' else ''}; "
                         "use --amp fp16")


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def make_scaler(amp: str, device: torch.device):
    """Loss scaling is needed for FP16 only (BF16 has FP32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))


# ----------------------------------------------------------------------------
# RNG state, stored as tensors / lists so weights_only loading accepts it
# ----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training is: the next batch to run is `batch_in_epoch` of `epoch`."""
    epoch: int = 0
    step: int = 0                 # optimizer steps done (global)
    batch_in_epoch: int = 0       # batches of `epoch` already consumed
    epoch_loss_sum: float = 0.0   # running sums of the current epoch (kept for exact resume)
    epoch_samples: int = 0
    epoch_time_s: float = 0.0
    best_val_accuracy: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def _nonfinite_message(what: str, value: float, epoch: int, step: int, batch: int, lr: float,
                       amp: str, last_good: str | None) -> str:
    hint = [f"lower --lr (the current lr is {lr:.3g})"]
    if amp == "fp16":
        hint.append("use --amp bf16 or --amp none instead of fp16")
    hint.append("or set --clip-grad (e.g. 1.0)")
    kept = (f" No checkpoint was written with these weights; the last good one is kept: {last_good}."
            if last_good else " No checkpoint was written with these weights.")
    return (f"non-finite {what} ({value}) at epoch {epoch + 1}, step {step + 1} (batch {batch + 1} of the "
            f"epoch): training stopped. Try: {', '.join(hint)}.{kept}")


def train_one_epoch(*, model: nn.Module, loader: Iterable, n_batches: int, optimizer: torch.optim.Optimizer,
                    schedule, criterion: nn.Module, device: torch.device, amp: str, scaler,
                    state: TrainState, accum_steps: int = 1, clip_grad: float = 0.0,
                    dist: DistInfo | None = None, on_step: Callable[[TrainState], None] | None = None,
                    progress: bool = True, last_good: str | None = None, desc: str = "") -> dict[str, float]:
    """Run the rest of epoch `state.epoch` (from batch `state.batch_in_epoch`).

    `n_batches` is the epoch's full length (after --max-train-batches); the
    loader yields only the batches not consumed yet. Optimizer steps happen
    every `accum_steps` batches, counted from the start of the epoch, and at
    the end of the epoch (a short last group is averaged over its own size).
    """
    dist = dist or DistInfo()
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start = state.batch_in_epoch
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        # disable=None: a bar only on a terminal; a log file or CI gets the
        # one summary line per epoch instead of a carriage-return per batch.
        bar = tqdm(total=n_batches, initial=start, desc=desc, unit="batch", dynamic_ncols=True,
                   leave=False, mininterval=1.0, disable=None)
    t0 = time.perf_counter()
    time_at_start = state.epoch_time_s
    images_this_session = 0
    lr = schedule.value(state.step)
    b = start
    it = iter(loader)
    try:
        while b < n_batches:
            group = b // accum_steps
            group_end = min(n_batches, (group + 1) * accum_steps)
            group_size = group_end - group * accum_steps
            if b == group * accum_steps or b == start:
                lr = schedule.apply(optimizer, state.step)
            x, y = next(it)
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            last_in_group = b + 1 == group_end
            sync = contextlib.nullcontext() if (last_in_group or not hasattr(model, "no_sync")) else model.no_sync()
            with sync:
                with autocast(device, amp):
                    logits = model(x)
                    loss = criterion(logits.float(), y)
                loss_value = float(loss.detach().item())
                if any_flag(not math.isfinite(loss_value), dist, device):
                    raise NonFiniteError(_nonfinite_message("loss", loss_value, state.epoch, state.step, b,
                                                            lr, amp, last_good))
                scaler.scale(loss / group_size).backward()
            state.epoch_loss_sum += loss_value * len(y)
            state.epoch_samples += len(y)
            images_this_session += len(y) * dist.world_size
            if last_in_group:
                scaler.unscale_(optimizer)
                trainable = [p for p in params if p.grad is not None]
                # max_norm=inf still returns the norm: a free NaN/Inf check on the gradient.
                norm = torch.nn.utils.clip_grad_norm_(trainable, clip_grad if clip_grad > 0 else float("inf"))
                if not scaler.is_enabled() and not torch.isfinite(norm):
                    raise NonFiniteError(_nonfinite_message("gradient norm", float(norm), state.epoch,
                                                            state.step, b, lr, amp, last_good))
                scaler.step(optimizer)   # fp16: skips the step itself if grads overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch = b + 1
                state.epoch_time_s += time.perf_counter() - t0
                if on_step is not None:
                    on_step(state)
                t0 = time.perf_counter()  # saving a checkpoint is not training time
            b += 1
            if bar is not None:
                elapsed = max(1e-9, state.epoch_time_s - time_at_start + (time.perf_counter() - t0))
                bar.set_postfix(loss=f"{state.epoch_loss_sum / max(1, state.epoch_samples):.4f}",
                                lr=f"{lr:.2e}", img_s=f"{images_this_session / elapsed:.1f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    state.epoch_time_s += time.perf_counter() - t0
    loss_sum = all_reduce_sum(state.epoch_loss_sum, dist, device)
    samples = all_reduce_sum(state.epoch_samples, dist, device)
    return {"train_loss": loss_sum / max(1.0, samples), "lr": lr,
            "images_per_s": samples / max(1e-9, state.epoch_time_s), "epoch_time_s": state.epoch_time_s,
            "train_samples": int(samples)}


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------
@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], dataset, *, batch_size: int, device: torch.device,
            amp: str = "none", num_workers: int = 0, dist: DistInfo | None = None, seed: int = 0,
            progress: bool = False, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """fn(batch) for every item of `dataset`, sharded over ranks and gathered
    on all of them in dataset order. Returns (outputs float32 [N, ...], labels [N])."""
    dist = dist or DistInfo()
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size)
    loader = make_loader(dataset, sampler, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         device=device)
    outs, labels = [], []
    it = loader
    if progress and dist.is_main:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, mininterval=1.0,
                  disable=None)  # terminal only (see train_one_epoch)
    for x, y in it:
        with autocast(device, amp):
            out = fn(x.to(device, non_blocking=True))
        outs.append(out.float().cpu())
        labels.append(torch.as_tensor(y))
    out_t = torch.cat(outs) if outs else torch.empty(0)
    lab_t = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
    if dist.enabled:
        parts = gather_objects((sampler.indices, out_t, lab_t), dist)
        n = len(dataset)
        full_out = torch.empty((n, *parts[0][1].shape[1:]), dtype=torch.float32)
        full_lab = torch.empty(n, dtype=torch.int64)
        for idx, o, lab in parts:
            if len(idx):
                full_out[idx] = o
                full_lab[idx] = lab
        out_t, lab_t = full_out, full_lab
    return out_t.numpy(), lab_t.numpy()


def cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def evaluate(fn: Callable[[torch.Tensor], torch.Tensor], dataset, class_names, **kw) -> dict[str, Any]:
    """classification_metrics (+ loss) of `fn`'s logits on `dataset`."""
    from dinov2_triton.train.metrics import classification_metrics

    logits, labels = predict(fn, dataset, **kw)
    out = classification_metrics(labels, logits, class_names)
    out["loss"] = cross_entropy_np(logits, labels)
    return out


def epoch_sampler(n: int, *, seed: int, dist: DistInfo) -> EpochSampler:
    return EpochSampler(n, seed=seed, shuffle=True, rank=dist.rank, world_size=dist.world_size)
