"""Multi-process runs under ``torchrun --nproc_per_node N``: each rank takes a contiguous shard
of the work, rank 0 gathers the results and alone writes outputs. Without torchrun's
environment everything here is a no-op for a single process (rank 0 of 1)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes (1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
        bounds = np.linspace(0, n, self.size + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: a CUDA ``device`` becomes cuda:<local rank>."""
        if device.type == "cuda" and self.size > 1:
            return torch.device("cuda", self.local_rank)
        return device


def _env_world() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 1:
        raise ValueError(f"WORLD_SIZE = {size}; torchrun sets a positive number")
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def world() -> Iterator[World]:
    """The process group torchrun describes (gloo on CPU, nccl with CUDA), torn down on exit;
    a single-process World when not launched by torchrun."""
    current = _env_world()
    if current.size == 1 or dist.is_initialized():
        yield current
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(current.local_rank)
    dist.init_process_group(backend)
    try:
        yield current
    finally:
        dist.destroy_process_group()


def gather_rows(part: np.ndarray, world: World, n: int) -> np.ndarray | None:
    """The ranks' row shards ([n_r, D], rank r holding ``world.shard(n)``) stacked in rank
    order into [n, D] on rank 0 (None on the others). Shards are padded to one size, so one
    collective call moves them all."""
    if world.size == 1:
        return part
    shards = [World(r, world.size).shard(n) for r in range(world.size)]
    lengths = [s.stop - s.start for s in shards]
    if len(part) != lengths[world.rank]:
        raise ValueError(
            f"rank {world.rank} holds {len(part)} rows, its shard is {lengths[world.rank]}"
        )
    padded = np.zeros((max(lengths), *part.shape[1:]), dtype=part.dtype)
    padded[: len(part)] = part
    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.from_numpy(padded).to(device)
    gathered = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(gathered, tensor)
    if not world.is_main:
        return None
    return np.concatenate([g.cpu().numpy()[:k] for g, k in zip(gathered, lengths, strict=True)])
