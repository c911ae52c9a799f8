"""Distributed-data-parallel plumbing for the lab: the same code runs alone or under
``torchrun --nproc_per_node=N -m normlab lab ...`` (``gloo`` on CPU, ``nccl`` on GPUs).

Rank 0 writes every file; each rank draws its own training data stream; losses and validation sums are
all-reduced so every rank takes the same decisions (divergence, early stop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "init_distributed", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return torch_dist.is_available() and torch_dist.is_initialized()

    def device(self) -> torch.device:
        """``cuda:<local_rank>`` when CUDA is available, else CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``, ...).

    Outside ``torchrun`` (no ``WORLD_SIZE``) nothing is initialised and a single-process :class:`DistInfo` is
    returned. A group initialised by the caller is reused.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, initialized_here=True)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.initialized_here and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device | None = None) -> list[float]:
    """Sum ``values`` over ranks (identity when not distributed)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or info.device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled or info.world_size == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled and info.world_size > 1:
        torch_dist.barrier()
