"""Multi-process training through ``torchrun``: process-group set-up (NCCL on GPUs, gloo on CPU), rank helpers,
and a deterministic sharded sampler so N processes see exactly the samples one process would, split."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain
    single-process run returns rank 0 of 1 and starts nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op when single-process)."""
    if info.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``x`` over every process (identity when single-process)."""
    if not info.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / info.world_size


def any_process(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every process when ``flag`` is True on any (e.g. one rank caught SIGTERM): lets all ranks leave a
    loop at the same step instead of the others waiting forever in the next collective."""
    if not info.enabled:
        return flag
    y = torch.tensor([int(flag)], device=device)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return bool(y.item())


class ShardedSampler(torch.utils.data.Sampler[int]):
    """An epoch-seeded permutation of the dataset, dealt out by rank: process r takes positions
    r, r + W, r + 2W, ... of each global batch, so the union over ranks of every global batch equals the batch a
    single process would draw with the same seed. ``start`` skips already-consumed indices on resume."""

    def __init__(self, length: int, seed: int, info: DistInfo = DistInfo(), shuffle: bool = True):
        self.length, self.seed, self.info, self.shuffle = length, seed, info, shuffle
        self.epoch = 0
        self.start = 0  # position in the global order to resume from

    def global_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()[self.start:]
        usable = len(order) - len(order) % self.info.world_size  # equal share for every rank
        return iter(order[self.info.rank:usable:self.info.world_size])

    def __len__(self) -> int:
        return (self.length - self.start) // self.info.world_size
