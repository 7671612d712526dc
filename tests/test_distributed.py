"""FSDP2 on CPU (gloo): a sharded training step equals the single-process step on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mllm_bench.config import ConfigError
from mllm_bench.distributed import init_distributed, shard_model, shard_points

from .helpers import random_batch, tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_step(model, batch) -> float:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = init_distributed("gloo")
    model = tiny_model("llava")
    model.set_stage("finetune")
    full = random_batch(model, batch=2, text=8, positions=[[2], [2]], labels=True)
    shard_model(model, "cpu")
    mine = type(full)(full.input_ids[rank:rank + 1], full.pixel_values[rank:rank + 1],
                      full.image_positions[rank:rank + 1], None, full.labels[rank:rank + 1])
    _train_step(model, mine)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.state_dict().items()}
    if env.rank == 0:
        torch.save(state, os.path.join(out_dir, "sharded.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_shard_points_round_robin():
    points = list(range(7))
    shares = [shard_points(points, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == points
    with pytest.raises(ConfigError, match="rank must be in"):
        shard_points(points, 3, 3)


@pytest.mark.slow
def test_fsdp2_step_matches_single_process(tmp_path):
    reference = tiny_model("llava")
    reference.set_stage("finetune")
    full = random_batch(reference, batch=2, text=8, positions=[[2], [2]], labels=True)
    _train_step(reference, full)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    ref_state, initial = reference.state_dict(), tiny_model("llava").state_dict()
    assert set(sharded) == set(ref_state)
    changed = 0
    for name, value in ref_state.items():
        torch.testing.assert_close(sharded[name], value, atol=2e-5, rtol=1e-4, msg=name)
        changed += int(not torch.equal(value, initial[name]))
    assert changed > 0  # the step really updated parameters


def test_init_distributed_reads_the_launcher_variables_as_the_sweep_does(monkeypatch) -> None:
    """One reader of RANK/WORLD_SIZE: a bad value is refused with its name, Slurm's alone is one process."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    single = init_distributed("gloo")
    assert (single.rank, single.world_size) == (0, 1)
    monkeypatch.setenv("RANK", "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK='one'"):
        init_distributed("gloo")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2, WORLD_SIZE=2"):
        init_distributed("gloo")
