"""The process group a training run lives in: one process, or ``torchrun``'s."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

__all__ = ["Topology", "init_topology", "all_reduce_sum"]


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process stands: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_topology(device: str | None = None) -> Topology:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``): NCCL on CUDA, gloo on CPU. Without those variables: one process.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        here = torch.device("cuda", local_rank)
    else:
        here = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Topology(rank=rank, world=world, device=here)


def all_reduce_sum(values: torch.Tensor, topology: Topology) -> torch.Tensor:
    """``values`` summed over all processes (the input itself with one process)."""
    if topology.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
