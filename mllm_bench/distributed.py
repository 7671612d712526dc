"""Scale-out: FSDP2 (``torch.distributed.fsdp.fully_shard``) training steps and sweep sharding.

Run under ``torchrun``: NCCL on CUDA, gloo on CPU (how the tests cover it). Each decoder layer (and
any other block list an architecture names in ``fsdp_units``) becomes its own FSDP unit, then the
root; parameters are stored as sharded DTensors and gathered per unit during forward/backward.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join the process group torchrun described (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables this is a single process (rank 0 of 1) and no group is created.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistEnv(0, 1, 0, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one: the decoder layers and any ``fsdp_units`` the model adds."""
    return [*model.language_model.layers, *model.fsdp_units()]


def shard_model(model: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Apply FSDP2 to ``model`` in place over all ranks (each unit, then the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_points(points: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of a sweep's points (round-robin, so costly neighbours spread out)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
    return [p for i, p in enumerate(points) if i % world_size == rank]
