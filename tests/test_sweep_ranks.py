"""One sweep over several processes: ranks from torchrun's or srun's variables, points split by index % world
size, each rank on its own device, rank 0 waiting for the others and writing the summary a single process
writes; resuming with another number of ranks redoes nothing."""

from __future__ import annotations

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
    Ranks,
    expand,
    launch_ranks,
    mark_rank_done,
    mark_rank_started,
    merge_ranks,
    rank_device,
    run_sweep,
    wait_for_ranks,
)
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from mllm_bench.results import ENVIRONMENT, read_results
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


def test_without_a_launch_id_only_markers_of_this_launch_count(tmp_path):
    ranks = Ranks(0, 2, 0, "")
    mark_rank_started(tmp_path, Ranks(1, 2, 1, ""))
    mark_rank_done(tmp_path, Ranks(1, 2, 1, ""), run_sweep([], tmp_path, fake_profile(), origin=HERE))
    markers, missing = wait_for_ranks(tmp_path, ranks, timeout_s=0.3, poll_s=0.1, since=time.time() + 1)
    assert markers == {} and missing == {1: "rank 1 did not finish within 0.3 s"}  # an earlier launch's marker
    markers, _ = wait_for_ranks(tmp_path, ranks, timeout_s=0.3, poll_s=0.1, since=time.time() - 60)
    assert list(markers) == [1]


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


def test_jobs_count_points_in_local_processes_as_one_process_would(tmp_path, no_launcher, pinned_code, monkeypatch):
    """``--jobs 2``: a spawned second process takes every other point; the summary equals a one-process run."""
    monkeypatch.setenv("GIT_DIR", str(ROOT / "no-such-git-dir"))  # the spawned rank sees the code version too
    jobs, single = tmp_path / "jobs", tmp_path / "single"
    result = CliRunner().invoke(app, [*SWEEP, "--out", str(jobs), "--jobs", "2", "--wait-ranks", "120"])
    assert result.exit_code == 0, result.output
    markers = sorted(p.name for p in (jobs / "ranks").glob("*/rank-*.json") if "start" not in p.name)
    assert markers == ["rank-0.json", "rank-1.json"]
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
