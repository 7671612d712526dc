"""One sweep over several processes: ranks from torchrun's or srun's variables, points split by index % world
size, each rank on its own device, rank 0 waiting for the others and writing the summary a single process
writes; resuming with another number of ranks redoes nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports import sweep as sweep_mod
from mllm_bench.reports.sweep import (
    expand,
    mark_rank_done,
    mark_rank_started,
    merge_ranks,
    rank_device,
    run_sweep,
    wait_for_ranks,
)
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from mllm_bench.distributed import Ranks, launch_ranks
from mllm_bench.results import read_results
from mllm_bench.schema import ENVIRONMENT
from mllm_bench.workload import Workload
from tests.reports_fakes import fake_profile

ROOT = Path(__file__).resolve().parents[1]
HERE = {"code": "0.1.0@aaaa", "device": "test cpu"}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID",
               "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MLLM_BENCH_LAUNCH_ID",
               "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")
# a real sweep of analytic and counted points: 2 architectures x 2 values = 4 points
SWEEP = ["sweep", "-a", "llava,saisa", "--vary", "text_after=4,8", "--llm", "tiny-llm", "--vision", "tiny-clip",
         "--device", "cpu", "--dtype", "float32", "--no-plots"]


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables; GIT_DIR hides the checkout, so the code version points
    record is ``0.1.0@unknown`` whatever others commit meanwhile (see :func:`pinned_code`)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "PYTHONPATH": str(ROOT), "GIT_DIR": str(ROOT / "no-such-git-dir"), **extra}


@pytest.fixture
def pinned_code(monkeypatch):
    """The code version of in-process runs, as the subprocesses of :func:`clean_env` see it."""
    from mllm_bench import __version__

    monkeypatch.setattr(sweep_mod, "code_version", lambda: f"{__version__}@unknown")


# ----- ranks from the launcher's variables -----------------------------------------------------------------
def test_ranks_come_from_torchrun_or_srun_variables():
    assert launch_ranks({}) == Ranks()
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "TORCHELASTIC_RUN_ID": "abc",
                "TORCHELASTIC_RESTART_COUNT": "1"}
    assert launch_ranks(torchrun) == Ranks(3, 8, 3, "torchrun-abc-1", "RANK/WORLD_SIZE")
    assert launch_ranks({**torchrun, "TORCHELASTIC_RUN_ID": "none"}).launch == ""  # a static rendezvous: no id
    assert launch_ranks({"RANK": "1", "WORLD_SIZE": "2"}) == Ranks(1, 2, 1, "", "RANK/WORLD_SIZE")
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
            "SLURM_STEP_ID": "0"}
    assert launch_ranks(srun) == Ranks(5, 16, 1, "slurm-77.0", "SLURM_PROCID/SLURM_NTASKS")
    batch_script = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}  # sbatch/salloc shell: one process
    assert launch_ranks(batch_script) == Ranks()
    assert launch_ranks({**srun, "MLLM_BENCH_LAUNCH_ID": "mine"}).launch == "mine"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2, WORLD_SIZE=2: .*rank in \[0, 2\)"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0", "SLURM_STEP_ID": "0"}, r"SLURM_PROCID=0, SLURM_NTASKS=0"),
])
def test_bad_rank_variables_are_refused_naming_them(env, message):
    with pytest.raises(ConfigError, match=message):
        launch_ranks(env)


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    assert rank_device("cpu", Ranks(1, 2, 1)) == "cpu"
    assert rank_device("cuda", Ranks()) == "cuda"
    monkeypatch.setattr(sweep_mod.torch.cuda, "device_count", lambda: 8)
    assert rank_device("cuda", Ranks(11, 16, 3)) == "cuda:3"
    with pytest.raises(ConfigError, match="local rank 9 has no CUDA device.*cuda:0 to cuda:7"):
        rank_device("cuda", Ranks(9, 16, 9))
    with pytest.raises(ConfigError, match="--device cuda:2: under 2 ranks each takes cuda:LOCAL_RANK"):
        rank_device("cuda:2", Ranks(1, 2, 1))
    monkeypatch.setattr(sweep_mod.torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1
    assert rank_device("cuda", Ranks(3, 4, 3)) == "cuda:0"


def test_a_rank_runs_its_points_on_its_device_and_keys_keep_the_device_type(tmp_path):
    points = expand(["llava"], {"batch_size": [1, 2, 3]}, Workload(device="cuda"), "tiny-llm", "tiny-clip")
    seen = []
    inner = fake_profile()

    def profile(arch, workload, **kw):
        seen.append((workload.batch_size, workload.device))
        return inner(arch, workload.replace(device="cpu"), **kw).assign(device=workload.device)

    result = run_sweep(points, tmp_path, profile, rank=1, world_size=2, origin=HERE, run_device="cuda:1")
    assert seen == [(2, "cuda:1")]  # index 1 of 0..2 is rank 1's under index % 2
    assert result.keys == [points[1].key] and dict(points[1].workload)["device"] == "cuda"
    assert set(result.rows["device"]) == {"cuda"}  # one workload whichever GPU ran it: tables can mix ranks
    assert json.loads((tmp_path / "points" / f"{points[1].key}.json").read_text())["ran_on"] == "cuda:1"


# ----- resuming with another number of ranks -----------------------------------------------------------------
def test_a_grid_resumed_with_three_ranks_after_two_profiles_each_point_once(tmp_path):
    points = expand(["llava", "saisa"], {"batch_size": [1, 2, 3]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    calls: list = []
    run_sweep(points, tmp_path, fake_profile(calls), rank=0, world_size=2, origin=HERE)  # rank 1 never ran
    assert len(calls) == 3
    later = [run_sweep(points, tmp_path, fake_profile(calls), rank=r, world_size=3, origin=HERE) for r in range(3)]
    assert len(calls) == 6  # the three of rank 1 of 2, nothing twice
    assert sum(r.done for r in later) == 3 and sum(r.skipped for r in later) == 3


# ----- rank 0 waits for the others ---------------------------------------------------------------------------
def test_rank_zero_waits_for_a_slow_rank_and_not_for_a_dead_one(tmp_path):
    ranks = Ranks(0, 3, 0, "test-launch")
    points = expand(["llava"], {"batch_size": [1, 2, 3]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    slow = run_sweep(points, tmp_path, fake_profile(), rank=1, world_size=3, origin=HERE)

    def finish_later():
        time.sleep(1.0)
        mark_rank_done(tmp_path, Ranks(1, 3, 1, "test-launch"), slow)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "ranks" / "test-launch-of-3").mkdir(parents=True)
    (tmp_path / "ranks" / "test-launch-of-3" / "rank-2.start.json").write_text(json.dumps(
        {"rank": 2, "pid": int(dead.stdout), "host": sweep_mod.socket.gethostname(), "started": time.time()}))
    writer = threading.Thread(target=finish_later)
    start = time.monotonic()
    writer.start()
    markers, missing = wait_for_ranks(tmp_path, ranks, timeout_s=30, poll_s=0.1)
    writer.join()
    assert 0.9 <= time.monotonic() - start < 10  # waited for rank 1, not for the timeout
    assert list(markers) == [1] and markers[1]["keys"] == [points[1].key]
    assert missing == {2: f"rank 2 (pid {int(dead.stdout)}) ended without finishing its points"}

    merged = merge_ranks(points, run_sweep(points, tmp_path, fake_profile(), rank=0, world_size=3, origin=HERE),
                         markers, missing, tmp_path, 3)
    assert [(o.point.key, o.run) for o in merged.outcomes] == [
        (points[0].key, "new"), (points[1].key, "new"), (points[2].key, "missing")]
    assert merged.done == 2 and "ended without finishing" in merged.outcomes[2].why
    assert set(merged.rows["batch_size"]) == {1, 2}  # rank 1's rows read back from the store


def test_a_rank_that_finished_before_rank_zero_started_counts(tmp_path):
    """No launch id, rank 0 started late by the launcher: rank 1's marker, written before rank 0's process
    start (``since``), is this launch's: its start came after the earlier launch into the folder ended."""
    points = expand(["llava"], {"batch_size": [1, 2, 3, 4]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    folder = tmp_path / "ranks" / "unnamed-of-2"
    earlier_launch(tmp_path, Ranks(0, 2, 0, ""), points)
    ended = json.loads((folder / "waited.json").read_text())["ended"]
    mark_rank_started(tmp_path, Ranks(1, 2, 1, ""), started=ended + 5)
    mark_rank_done(tmp_path, Ranks(1, 2, 1, ""), run_sweep(points, tmp_path, fake_profile(), rank=1, world_size=2,
                                                           origin=HERE))
    mark_rank_started(tmp_path, Ranks(0, 2, 0, ""))  # rank 0 of this launch starts last
    start = time.monotonic()
    markers, missing = wait_for_ranks(tmp_path, Ranks(0, 2, 0, ""), timeout_s=20, poll_s=0.1,
                                      since=time.time() + 60, points=points)
    assert time.monotonic() - start < 10 and missing == {}  # taken at once, not waited for until the timeout
    assert markers[1]["keys"] == [points[1].key, points[3].key] and markers[1]["started"] == ended + 5


def test_the_first_launch_into_a_folder_counts_a_rank_that_finished_before_rank_zero(tmp_path):
    mark_rank_started(tmp_path, Ranks(1, 2, 1, ""))
    mark_rank_done(tmp_path, Ranks(1, 2, 1, ""), run_sweep([], tmp_path, fake_profile(), origin=HERE))
    markers, missing = wait_for_ranks(tmp_path, Ranks(0, 2, 0, ""), timeout_s=5, poll_s=0.1, since=time.time() + 60)
    assert list(markers) == [1] and missing == {}


def earlier_launch(out: Path, ranks: Ranks, points: list, with_end: bool = True) -> None:
    """A launch of ``points`` over ``ranks.world_size`` ranks into ``out`` that finished (rank 0 waited for
    the others and recorded its end) or, ``with_end`` False, whose rank 0 was killed before waiting."""
    mark_rank_started(out, dataclasses.replace(ranks, rank=0))
    for r in range(1, ranks.world_size):
        mine = dataclasses.replace(ranks, rank=r)
        mark_rank_started(out, mine)
        mark_rank_done(out, mine, run_sweep(points, out, fake_profile(), rank=r, world_size=ranks.world_size,
                                            origin=HERE))
    if with_end:
        markers, _ = wait_for_ranks(out, dataclasses.replace(ranks, rank=0), timeout_s=5, poll_s=0.05, points=points)
        assert len(markers) == ranks.world_size - 1


@pytest.mark.parametrize("launch", ["reused-id", ""])
def test_a_marker_of_an_earlier_launch_is_not_taken_for_this_one_s(tmp_path, launch):
    """The same launch folder (a reused MLLM_BENCH_LAUNCH_ID, or no id), the same grid and world size: rank 1
    of this launch has not started yet, so the folder still holds the earlier launch's start and done markers.
    They are that launch's: rank 1 started before its rank 0 stopped waiting."""
    points = expand(["llava"], {"batch_size": [1, 2]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    earlier_launch(tmp_path, Ranks(0, 2, 0, launch), points)
    mark_rank_started(tmp_path, Ranks(0, 2, 0, launch))
    markers, missing = wait_for_ranks(tmp_path, Ranks(0, 2, 0, launch), timeout_s=0.3, poll_s=0.1,
                                      since=time.time() - 60, points=points)
    assert markers == {}
    assert missing[1].startswith("rank 1 did not finish within 0.3 s (a done marker was found, but for a different "
                                 "grid or launch: rank 1 started at ")
    assert "before the earlier launch into the folder ended" in missing[1]


def test_a_rank_s_marker_of_an_earlier_start_is_not_taken_once_this_launch_s_rank_started(tmp_path):
    """A reused launch id whose earlier launch left no record of its end (its rank 0 was killed): once rank 1
    of this launch has written its start marker, the earlier done marker (another start) is not its answer."""
    points = expand(["llava"], {"batch_size": [1, 2]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    ranks = Ranks(0, 2, 0, "reused")
    earlier_launch(tmp_path, ranks, points, with_end=False)
    stale = json.loads((tmp_path / "ranks" / "reused-of-2" / "rank-1.json").read_text())
    mark_rank_started(tmp_path, ranks)
    started = mark_rank_started(tmp_path, Ranks(1, 2, 1, "reused"))  # rank 1 of this launch, still working
    assert started != stale["started"]

    def finish_later():
        time.sleep(1.0)
        mark_rank_done(tmp_path, Ranks(1, 2, 1, "reused"), run_sweep(points, tmp_path, fake_profile(), rank=1,
                                                                     world_size=2, origin=HERE))

    markers, missing = wait_for_ranks(tmp_path, ranks, timeout_s=0.3, poll_s=0.1, since=0, points=points)
    assert markers == {} and "for a different grid or launch: it follows a start of rank 1" in missing[1]
    writer = threading.Thread(target=finish_later)
    writer.start()
    t0 = time.monotonic()
    markers, missing = wait_for_ranks(tmp_path, ranks, timeout_s=30, poll_s=0.1, since=0, points=points)
    writer.join()
    assert 0.9 <= time.monotonic() - t0 < 10 and missing == {}  # waited for this launch's answer
    assert markers[1]["started"] == started and markers[1]["finished"] > stale["finished"]


def test_after_an_unfinished_launch_only_markers_written_after_rank_zero_started_count(tmp_path):
    """The earlier launch's rank 0 was killed, so its end is unknown: an intact start and done marker of its
    rank 1 cannot be told from this launch's by their start, and count only when written after ``since``."""
    points = expand(["llava"], {"batch_size": [1, 2]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    earlier_launch(tmp_path, Ranks(0, 2, 0, ""), points, with_end=False)
    mark_rank_started(tmp_path, Ranks(0, 2, 0, ""))
    assert json.loads((tmp_path / "ranks" / "unnamed-of-2" / "rank-0.start.json").read_text())["earlier_unfinished"]
    markers, missing = wait_for_ranks(tmp_path, Ranks(0, 2, 0, ""), timeout_s=0.3, poll_s=0.1,
                                      since=time.time() + 1, points=points)
    assert markers == {} and "before rank 0 started, and the launch before this one into the folder ended " \
                             "unfinished" in missing[1]
    markers, _ = wait_for_ranks(tmp_path, Ranks(0, 2, 0, ""), timeout_s=0.3, poll_s=0.1, since=time.time() - 60,
                                points=points)
    assert list(markers) == [1]


@pytest.mark.parametrize("other, reason", [
    ({"batch_size": [7, 8]}, "its points are not rank 1's share of this grid (1 of its 1 points are not rank 1's in "
                             "this grid; 1 of rank 1's 1 points are not in it)"),
    ({"batch_size": [1, 2, 3]}, "its world size is 3, not 2"),
])
def test_a_marker_for_another_grid_or_world_size_is_not_merged(tmp_path, other, reason):
    """A done marker in this launch's folder that answers another request (a reused launch id into the same
    ``--out``): rank 0 keeps waiting for rank 1 and says at the timeout why the marker was not taken."""
    points = expand(["llava"], {"batch_size": [1, 2]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    grid = expand(["llava"], other, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    world = len(grid) if len(grid) == 3 else 2
    old = run_sweep(grid, tmp_path, fake_profile(), rank=1, world_size=world, origin=HERE)
    mark_rank_started(tmp_path, Ranks(1, 2, 1, "same-id"))
    marker = mark_rank_done(tmp_path, Ranks(1, world, 1, "same-id"), old)
    if world != 2:  # a marker of 3 ranks in the folder of 2 (written by hand; the folder names the size)
        marker = marker.rename(tmp_path / "ranks" / "same-id-of-2" / "rank-1.json")
    ranks = Ranks(0, 2, 0, "same-id")
    t0 = time.monotonic()
    markers, missing = wait_for_ranks(tmp_path, ranks, timeout_s=0.5, poll_s=0.1, points=points)
    assert time.monotonic() - t0 >= 0.5  # kept waiting: the marker is not this launch's answer
    assert markers == {}
    assert missing == {1: "rank 1 did not finish within 0.5 s (a done marker was found, but for a different grid "
                          f"or launch: {reason})"}
    own = run_sweep(points, tmp_path, fake_profile(), rank=0, world_size=2, origin=HERE)
    merged = merge_ranks(points, own, {1: json.loads(marker.read_text())}, {}, tmp_path, 2)  # given it anyway
    assert [(o.point.key, o.run) for o in merged.outcomes] == [(points[0].key, "new"), (points[1].key, "missing")]
    assert merged.outcomes[1].why == f"rank 1's done marker was not merged: {reason}" and merged.done == 1


def test_a_reused_launch_id_into_the_same_folder_waits_for_the_new_grid(tmp_path, no_launcher, monkeypatch):
    """Two launches with one MLLM_BENCH_LAUNCH_ID into one --out, different grids: rank 0 of the second,
    whose rank 1 never comes, does not take the first launch's marker for it."""
    from mllm_bench.cli import sweep as sweep_cli

    monkeypatch.setattr(sweep_cli, "get_profile", lambda: fake_profile())
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MLLM_BENCH_LAUNCH_ID", "same")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert CliRunner().invoke(app, [*SWEEP, "--out", str(out), "--wait-ranks", "5"]).exit_code == 0
    second = [*SWEEP[:4], "text_after=16,32", *SWEEP[5:]]
    result = CliRunner().invoke(app, [*second, "--out", str(out), "--wait-ranks", "1"])
    assert result.exit_code == 1, result.output
    manifest = json.loads((out / "sweep.json").read_text())
    assert len(manifest["ranks"]["missing"]) == 1
    assert "rank 1 did not finish within 1 s (a done marker was found, but for a different grid or launch" in \
           manifest["ranks"]["missing"][0]
    assert [o["run"] for o in manifest["this_run"]][1::2] == ["missing", "missing"]


# ----- a real two-process sweep ------------------------------------------------------------------------------
def comparable(path: Path) -> pd.DataFrame:
    """A summary's rows without the columns that say where and when they were made."""
    rows = read_results(path)
    return rows.drop(columns=[c for c in (*ENVIRONMENT, "sweep_device") if c in rows.columns])


def test_two_ranks_write_the_summary_one_process_writes_and_a_rerun_redoes_nothing(tmp_path, no_launcher,
                                                                                   pinned_code):
    ranked, single = tmp_path / "ranked", tmp_path / "single"
    procs = []
    for r in (0, 1):  # rank 1 starts late: rank 0 must wait for its points
        procs.append(subprocess.Popen([sys.executable, "-m", "mllm_bench.cli.app", *SWEEP, "--out", str(ranked),
                                       "--wait-ranks", "120"], env=clean_env(RANK=str(r), WORLD_SIZE="2"),
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(3.0 if r == 0 else 0)
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "4 points profiled" in logs[0] and "rank 0 writes the summary" in logs[1]

    result = CliRunner().invoke(app, [*SWEEP, "--out", str(single)])
    assert result.exit_code == 0, result.output
    two, one = comparable(ranked / "results.json"), comparable(single / "results.json")
    assert len(one) and list(two.columns) == list(one.columns)
    pd.testing.assert_frame_equal(two, one)

    manifest = json.loads((ranked / "sweep.json").read_text())
    assert manifest["points_finished"] == 4 and manifest["points_done"] == 4
    assert manifest["ranks"]["world_size"] == 2 and manifest["ranks"]["missing"] == []
    keys = json.loads((single / "sweep.json").read_text())["this_run"]
    markers = {r: json.loads((ranked / "ranks" / "unnamed-of-2" / f"rank-{r}.json").read_text()) for r in (0, 1)}
    assert {r: m["keys"] for r, m in markers.items()} == {r: [k["key"] for k in keys[r::2]] for r in (0, 1)}

    stamps = {p.name: p.stat().st_mtime_ns for p in (ranked / "points").glob("*.json")}
    # one process (WORLD_SIZE=1) after the 2-rank launch
    again = CliRunner(env={"RANK": "0", "WORLD_SIZE": "1"}).invoke(app, [*SWEEP, "--out", str(ranked)])
    assert again.exit_code == 0, again.output
    manifest = json.loads((ranked / "sweep.json").read_text())
    assert manifest["points_done"] == 0 and manifest["points_skipped"] == 4 and "ranks" not in manifest
    assert {o["run"] for o in manifest["this_run"]} == {"reused"}
    assert {p.name: p.stat().st_mtime_ns for p in (ranked / "points").glob("*.json")} == stamps
    pd.testing.assert_frame_equal(comparable(ranked / "results.json"), one)


def test_a_failed_point_on_another_rank_is_reported_by_rank_zero(tmp_path, no_launcher, monkeypatch):
    from mllm_bench.cli import sweep as sweep_cli

    calls: list = []
    failing = fake_profile(calls, fail={("saisa", 16): RuntimeError("kaput on rank 1")})
    monkeypatch.setattr(sweep_cli, "get_profile", lambda: failing)
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MLLM_BENCH_LAUNCH_ID", "t1")
    monkeypatch.setenv("RANK", "1")
    one = CliRunner().invoke(app, [*SWEEP, "--out", str(out)])
    assert one.exit_code == 0, one.output  # a worker's failure must not make torchrun stop rank 0
    assert "kaput on rank 1" in one.output and not (out / "sweep.json").exists()
    monkeypatch.setenv("RANK", "0")
    zero = CliRunner().invoke(app, [*SWEEP, "--out", str(out), "--wait-ranks", "5"])
    assert zero.exit_code == 1 and "kaput on rank 1" in zero.output
    assert sorted(c[0] for c in calls) == ["llava", "llava", "saisa", "saisa"]  # each rank its own points
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["points_finished"] == 2 and len(manifest["errors"]) == 2
    assert manifest["ranks"] == {"world_size": 2, "launch": "t1", "from": "RANK/WORLD_SIZE",
                                 "split": "point index % world_size == rank", "missing": []}


def test_only_rank_zero_writes_the_sqlite_file_and_it_gets_every_rank_s_points_once(tmp_path, no_launcher,
                                                                                     monkeypatch):
    import sqlite3

    from mllm_bench.cli import sweep as sweep_cli

    monkeypatch.setattr(sweep_cli, "get_profile", lambda: fake_profile())
    out, db = tmp_path / "out", tmp_path / "runs.db"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MLLM_BENCH_LAUNCH_ID", "t2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        result = CliRunner().invoke(app, [*SWEEP, "--out", str(out), "--db", str(db), "--wait-ranks", "5"])
        assert result.exit_code == 0, result.output
        if rank == "1":
            assert not db.exists()  # the other ranks leave SQLite to rank 0 (no concurrent writers on NFS)
    with sqlite3.connect(db) as con:
        per_point = dict(con.execute("select sweep_key, count(*) from results group by sweep_key").fetchall())
    manifest = json.loads((out / "sweep.json").read_text())
    assert sorted(per_point) == sorted(o["key"] for o in manifest["this_run"]) and len(per_point) == 4
    assert len(set(per_point.values())) == 1  # every point stored once, with all of its rows


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_jobs_count_points_in_local_processes_as_one_process_would(tmp_path, no_launcher, pinned_code, monkeypatch,
                                                                   method):
    """``--jobs 2``: a second process (a fork, or a fresh interpreter where CUDA is initialised here) takes every
    other point; the summary equals a one-process run."""
    import multiprocessing

    import torch

    if method == "spawn":
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    methods = []
    real = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda m=None: methods.append(m) or real(m))
    monkeypatch.setenv("GIT_DIR", str(ROOT / "no-such-git-dir"))  # the spawned rank sees the code version too
    jobs, single = tmp_path / "jobs", tmp_path / "single"
    result = CliRunner().invoke(app, [*SWEEP, "--out", str(jobs), "--jobs", "2", "--wait-ranks", "120"])
    assert result.exit_code == 0, result.output
    markers = sorted(p.name for p in (jobs / "ranks").glob("*/rank-*.json") if "start" not in p.name)
    assert markers == ["rank-0.json", "rank-1.json"]
    folder = next((jobs / "ranks").glob("jobs-*-of-2"))  # the spawned rank's done marker names its start marker
    done, start = (json.loads((folder / name).read_text()) for name in ("rank-1.json", "rank-1.start.json"))
    assert (done["pid"], done["started"]) == (start["pid"], start["started"]) and done["pid"] != os.getpid()
    assert methods == [method]
    assert CliRunner().invoke(app, [*SWEEP, "--out", str(single)]).exit_code == 0
    pd.testing.assert_frame_equal(comparable(jobs / "results.json"), comparable(single / "results.json"))


@pytest.mark.parametrize("extra, env, message", [
    (["--measure", "always"], {}, "would share the machine"),
    ([], {"RANK": "0", "WORLD_SIZE": "2"}, "use one or the other"),
])
def test_jobs_refuse_measuring_and_launchers(tmp_path, no_launcher, extra, env, message):
    result = CliRunner(env=env).invoke(app, [*SWEEP, "--out", str(tmp_path / "x"), "--jobs", "2", *extra])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_a_point_reported_finished_whose_file_does_not_parse_is_an_error_not_an_empty_ok(tmp_path):
    points = expand(["llava"], {"batch_size": [1, 2]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    ranks = Ranks(1, 2, 1, "t", "test")
    other = run_sweep(points, tmp_path, fake_profile(), rank=1, world_size=2, origin=HERE)
    marker = json.loads(mark_rank_done(tmp_path, ranks, other).read_text())
    (tmp_path / "points" / f"{points[1].key}.json").write_text("{truncated", encoding="utf-8")
    own = run_sweep(points, tmp_path, fake_profile(), rank=0, world_size=2, origin=HERE)
    merged = merge_ranks(points, own, {1: marker}, {}, tmp_path, 2)
    assert [o.status for o in merged.outcomes] == ["ok", "error"]
    assert any(points[1].key == key and "did not parse" in why for key, why in merged.errors)


def test_jobs_default_to_one_per_core_only_for_large_grids_that_measure_nothing_outside_a_launcher():
    from mllm_bench.cli.sweep import AUTO_JOBS_MIN_POINTS, auto_jobs

    cores = len(os.sched_getaffinity(0))
    assert auto_jobs(AUTO_JOBS_MIN_POINTS, "never", launched=False) == min(cores, AUTO_JOBS_MIN_POINTS)
    assert auto_jobs(200, "never", launched=False) == cores
    assert auto_jobs(AUTO_JOBS_MIN_POINTS - 1, "never", launched=False) == 1
    assert auto_jobs(200, "auto", launched=False) == auto_jobs(200, "always", launched=False) == 1
    assert auto_jobs(200, "never", launched=True) == 1
