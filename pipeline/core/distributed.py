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


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; otherwise the named torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:<n>'"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return resolved


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


def gather_variable(part: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's ``part`` ([n_r, ...], n_r may differ between ranks), in rank order, on
    every rank. Parts are padded to one size, so one collective call moves them all."""
    if world.size == 1:
        return [part]
    lengths = torch.zeros(world.size, dtype=torch.int64, device=part.device)
    lengths[world.rank] = len(part)
    dist.all_reduce(lengths)
    padded = part.new_zeros((int(lengths.max()), *part.shape[1:]))
    padded[: len(part)] = part
    gathered = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(gathered, padded)
    return [g[:k] for g, k in zip(gathered, lengths.tolist(), strict=True)]


def _collective_device(world: World) -> torch.device:
    return (
        torch.device("cuda", world.local_rank)
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def gather_rows(
    part: np.ndarray, world: World, n: int, everywhere: bool = False
) -> np.ndarray | None:
    """The ranks' row shards ([n_r, D], rank r holding ``world.shard(n)``) stacked in rank
    order into [n, D] on rank 0 (None on the others, unless ``everywhere``)."""
    if world.size == 1:
        return part
    expected = world.shard(n)
    if len(part) != expected.stop - expected.start:
        raise ValueError(
            f"rank {world.rank} holds {len(part)} rows, its shard is "
            f"{expected.stop - expected.start}"
        )
    parts = gather_variable(torch.from_numpy(part).to(_collective_device(world)), world)
    if not (world.is_main or everywhere):
        return None
    return np.concatenate([p.cpu().numpy() for p in parts])


def sum_gradients(params: list[torch.Tensor], world: World) -> None:
    """Sum each parameter's gradient over the ranks, in place (what DDP does after backward);
    a gradient that no rank computed stays None, as in a single process."""
    if world.size == 1 or not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                       for p in params])  # fmt: skip
    device = _collective_device(world)
    flags, grads = flags.to(device), grads.to(device)
    dist.all_reduce(flags)
    dist.all_reduce(grads)
    for p, flag, g in zip(params, flags.tolist(), grads.split([p.numel() for p in params]),
                          strict=True):  # fmt: skip
        if flag > 0:
            p.grad = g.view_as(p).to(p.device).clone()


def sum_scalar(value: torch.Tensor, world: World) -> torch.Tensor:
    """``value`` summed over the ranks (itself in a single process)."""
    if world.size == 1:
        return value
    total = value.detach().to(_collective_device(world)).clone()
    dist.all_reduce(total)
    return total.to(value.device)
