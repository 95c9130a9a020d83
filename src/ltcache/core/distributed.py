"""Rank and world helpers that do nothing in a single process, and the few collectives stage 2 uses under torchrun:
a rank's contiguous share of rows, sums across ranks, and rows gathered back in order."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    import torch


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU). Returns whether
    this call created it (the caller then destroys it when done)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """The torchrun process group for the block: joined on entry when launched with WORLD_SIZE > 1, left when the
    block ends however it ends (an early error included). Yields whether this block created it; a group that was
    joined already is left to the code that joined it. train-backbone, extract and compare all run in one."""
    created = init_distributed(device)
    try:
        yield created
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def local_rows(rows: int, rank: int | None = None, world: int | None = None) -> slice:
    """The contiguous share of `rows` rows that `rank` (default: this process) takes: rank r of W takes
    [rows * r // W, rows * (r + 1) // W). The shares cover every row once, in order."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return slice(rows * rank // world, rows * (rank + 1) // world)


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """The element-wise sum of `values` over all ranks (float64); `values` itself in a single process."""
    if not is_distributed():
        return list(values)
    import torch

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(local: torch.Tensor, rows: int) -> torch.Tensor:
    """Every rank's `local` rows (its `local_rows(rows)` share) concatenated in rank order: the whole [rows, ...]
    tensor, on every rank. Shares differ by at most one row, so each is padded to the largest for all_gather."""
    if not is_distributed():
        return local
    import torch

    world = get_world_size()
    sizes = [len(range(rows)[local_rows(rows, r, world)]) for r in range(world)]
    flag = local.dtype == torch.bool  # gloo gathers no bool: as uint8 and back
    padded = local.new_zeros((max(sizes), *local.shape[1:]), dtype=torch.uint8 if flag else local.dtype)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    gathered = torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
    return gathered.bool() if flag else gathered
