"""Scale-out: which rank a launcher made this process, FSDP2 (``torch.distributed.fsdp.fully_shard``) training
steps, and sweep sharding.

Run under ``torchrun``: NCCL on CUDA, gloo on CPU (how the tests cover it). Each decoder layer (and
any other block list an architecture names in ``fsdp_units``) becomes its own FSDP unit, then the
root; parameters are stored as sharded DTensors and gathered per unit during forward/backward.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError

T = TypeVar("T")
LAUNCH_ID_ENV = "MLLM_BENCH_LAUNCH_ID"  # names one launch of all ranks where the launcher gives no id
TORCHRUN_SOURCE = "RANK/WORLD_SIZE"  # Ranks.source when torchrun (or any launcher setting these) made them


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

    Without RANK and WORLD_SIZE this is a single process (rank 0 of 1) and no group is created.
    """
    ranks = launch_ranks()
    if ranks.source != TORCHRUN_SOURCE:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistEnv(0, 1, 0, device)
    rank, world, local_rank = ranks.rank, ranks.world_size, ranks.local_rank
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, device)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launch: ``rank`` of ``world_size``, ``local_rank`` on its node (its CUDA
    device), ``launch`` an id every rank of one launch shares ("" when the launcher gives none) and
    ``source``, the variables they came from."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launch: str = ""
    source: str = ""


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        if default is None:
            raise ConfigError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def launch_ranks(env: Mapping[str, str] | None = None) -> Ranks:
    """The ranks a launcher set in ``env`` (default ``os.environ``): torchrun's (or any launcher's) RANK,
    WORLD_SIZE, LOCAL_RANK; else srun's SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (only inside a job step,
    SLURM_STEP_ID set: a batch script or salloc shell is one process); else one process.

    The launch id: ``MLLM_BENCH_LAUNCH_ID``, else torchrun's TORCHELASTIC_RUN_ID (unless "none") with its
    restart count, else Slurm's job and step ids; "" when none is set."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        names, source = ("RANK", "WORLD_SIZE"), TORCHRUN_SOURCE
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local = _env_int(env, "LOCAL_RANK", _env_int(env, "SLURM_LOCALID", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        names, source = ("SLURM_PROCID", "SLURM_NTASKS"), "SLURM_PROCID/SLURM_NTASKS"
        rank, world = _env_int(env, "SLURM_PROCID"), _env_int(env, "SLURM_NTASKS")
        local = _env_int(env, "SLURM_LOCALID", rank)
    else:
        return Ranks()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"{names[0]}={rank}, {names[1]}={world}: the world size must be >= 1 and the rank in "
                          f"[0, {max(world, 1)}), local rank >= 0 (got {local})")
    launch = env.get(LAUNCH_ID_ENV, "").strip()
    if not launch and env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        launch = f"torchrun-{env['TORCHELASTIC_RUN_ID']}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if not launch and env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID"):
        launch = f"slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    return Ranks(rank, world, local, launch, source)


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
