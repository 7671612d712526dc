"""Launchers: the README's ``torchrun --nproc-per-node 2 -m mllm_bench.cli.app sweep ...`` runs on CPU, and a sweep
called inside an initialised torch.distributed process group (gloo) shares one launch id from rank 0, so
every rank's markers land in one folder even when the launcher names no launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from mllm_bench.reports.sweep import share_launch_id

from mllm_bench.distributed import Ranks
from tests.test_sweep_ranks import SWEEP, clean_env


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


def test_the_readme_torchrun_command_runs_on_cpu(tmp_path):
    out = tmp_path / "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    done = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "mllm_bench.cli.app", *SWEEP[:4],
                           "text_after=4", *SWEEP[5:], "--out", str(out)], env=clean_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["points_finished"] == 2 and manifest["ranks"]["launch"].startswith("torchrun-")
    assert sorted(o["arch"] for o in manifest["this_run"]) == ["llava", "saisa"]
