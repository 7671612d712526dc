"""A sweep called inside an initialised torch.distributed process group (gloo on CPU) shares one launch id
from rank 0, so every rank's markers land in one folder even when the launcher names no launch."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from mllm_bench.reports.sweep import Ranks, share_launch_id


def _share(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        ranks = share_launch_id(Ranks(rank, 2, rank, ""))
        Path(folder, f"rank-{rank}.json").write_text(json.dumps(ranks.launch))
    finally:
        dist.destroy_process_group()


def test_rank_zero_broadcasts_a_launch_id_in_a_process_group(tmp_path):
    assert share_launch_id(Ranks(1, 2, 1, "")) == Ranks(1, 2, 1, "")  # no group: nothing to share
    assert share_launch_id(Ranks(0, 2, 0, "given")).launch == "given"
    mp.spawn(_share, args=(str(tmp_path),), nprocs=2, join=True)
    ids = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ids[0] == ids[1] and ids[0].startswith("group-") and len(ids[0]) == len("group-") + 12
