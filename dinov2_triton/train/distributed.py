"""torchrun / DDP helpers: one code path for 1 process and N processes.

`torchrun --nproc_per_node N -m dinov2_triton.train.finetune ...` sets RANK, WORLD_SIZE and
LOCAL_RANK; without them everything below degrades to a single process.
NCCL on GPUs, gloo on CPU. Only rank 0 writes files and logs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def cleanup(info: DistInfo) -> None:
    """Leave the process group cleanly. DDP wrappers sit in reference cycles;
    if one is only collected during interpreter shutdown, a gloo worker thread
    still alive then tries to take the GIL and the process aborts
    ("terminate called without an active exception"). So: drain pending work,
    collect the cycles, destroy the group, all while Python is fully alive."""
    if info.enabled:
        import gc

        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                gc.collect()
                dist.destroy_process_group()
                gc.collect()


def wrap_ddp(module: torch.nn.Module, device: torch.device):
    """A DistributedDataParallel wrapper of ``module``. DDP fixes the set of
    trained parameters when it is built: when that set changes, drop every
    reference to the old wrapper and gc.collect() before wrapping again (its
    reducer keeps autograd hooks and gradient buckets on the shared
    parameters until it is destroyed, and DDP objects sit in reference
    cycles; see dinov2_triton.train.trainer.Trainer.wrap_for_phase)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return float(value)
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is True on any rank (e.g. a non-finite loss),
    so all ranks stop together instead of hanging in the next all-reduce."""
    return all_reduce_sum(1.0 if flag else 0.0, info, device) > 0


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EpochSampler(torch.utils.data.Sampler):
    """Shard and order that depend only on (seed, epoch, rank, world_size).

    Yields (index, epoch) pairs, so each sample's augmentation can be seeded
    from (seed, epoch, index) as well (see engine.SeededDataset). `skip`
    drops this rank's first `skip` samples, which is how a run resumed in the
    middle of an epoch continues exactly where it stopped. Like
    DistributedSampler, the list is padded so every rank gets the same number
    of samples (ranks must run the same number of steps)."""

    def __init__(self, n: int, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = -(-self.n // self.world_size) if self.n else 0
        total = per_rank * self.world_size
        if total > len(order) and order:
            order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices()[self.skip:]:
            yield (i, self.epoch)

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard: rank r takes indices r, r+W, ... with no padding, so
    gathering by index gives every sample exactly once."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
