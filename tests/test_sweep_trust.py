"""Sweeps never lose or mix rows: resume only what this code made on this device, every finished point in the
SQLite file exactly once whatever was interrupted, claims against a second process, every grid in the summary,
default output folders that never land on committed results, repeated --vary values refused."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports import sweep as sweep_mod
from mllm_bench.reports.sweep import (
    claim_point,
    expand,
    finished_points,
    parse_vary,
    run_sweep,
    store_point_rows,
    summary_table,
    write_sweep,
)
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from mllm_bench.workload import Workload
from tests.reports_fakes import PER_TOKEN, fake_profile

# rows the fake profiler gives one inference point: params, 2 scopes × 2 conventions × 3 components of
# prefill FLOPs, KV cache, weights
ROWS_PER_POINT = 1 + 2 * 2 * 3 + 2
BASE = Workload(text_before=4, text_after=4, device="cpu")
HERE = {"code": "0.1.0@aaaa", "device": "test cpu"}
TINY = ["--llm", "tiny-llm", "--vision", "tiny-clip", "--device", "cpu", "--dtype", "float32"]


def batch_points(n: int = 4):
    return expand(["llava"], {"batch_size": list(range(1, n + 1))}, BASE, "tiny-llm", "tiny-clip")


def db_counts(db: Path) -> dict[str, int]:
    """Rows per point key in the SQLite file's results table."""
    with sqlite3.connect(db) as con:
        return dict(con.execute("select sweep_key, count(*) from results group by sweep_key").fetchall())


def db_duplicates(db: Path) -> list:
    with sqlite3.connect(db) as con:
        return con.execute("select sweep_key, metric, scope, convention, component, count(*) from results "
                           "group by 1, 2, 3, 4, 5 having count(*) > 1").fetchall()


# ----- resume only the same code and device -------------------------------------------------------------
def test_resume_reuses_only_points_of_the_same_code_and_device(tmp_path):
    points = batch_points(3)
    calls: list = []
    first = run_sweep(points, tmp_path, fake_profile(calls), origin=HERE)
    assert len(calls) == 3 and [o.run for o in first.outcomes] == ["new"] * 3
    record = json.loads((tmp_path / "points" / f"{points[0].key}.json").read_text())
    assert record["origin"] == HERE

    calls.clear()
    same = run_sweep(points, tmp_path, fake_profile(calls), origin=HERE)
    assert calls == [] and same.skipped == 3 and [o.run for o in same.outcomes] == ["reused"] * 3

    other_code = {**HERE, "code": "0.1.0@bbbb"}
    redone = run_sweep(points, tmp_path, fake_profile(calls), origin=other_code)
    assert len(calls) == 3 and redone.done == 3 and redone.skipped == 0
    assert {o.run for o in redone.outcomes} == {"redone"}
    assert all("0.1.0@aaaa" in o.why and "0.1.0@bbbb" in o.why for o in redone.outcomes)

    calls.clear()
    other_device = {**other_code, "device": "NVIDIA H200"}
    moved = run_sweep(points, tmp_path, fake_profile(calls), origin=other_device)
    assert len(calls) == 3 and all("made on test cpu" in o.why for o in moved.outcomes)
    # the rows say where they came from
    assert set(moved.rows["sweep_code"]) == {"0.1.0@bbbb"} and set(moved.rows["sweep_device"]) == {"NVIDIA H200"}


def test_point_files_without_origin_are_redone(tmp_path):
    points = batch_points(2)
    run_sweep(points, tmp_path, fake_profile(), origin=HERE)
    path = tmp_path / "points" / f"{points[0].key}.json"
    old = json.loads(path.read_text())
    del old["origin"]  # as written before points recorded their origin
    path.write_text(json.dumps(old))
    (tmp_path / "points" / f"{points[1].key}.json").write_text('{"rows": [')  # a file that does not parse
    calls: list = []
    result = run_sweep(points, tmp_path, fake_profile(calls), origin=HERE)
    assert len(calls) == 2
    assert [o.why for o in result.outcomes] == [
        "its file records no code version or device (an older mllm-bench wrote it)", "its file did not parse"]


def test_default_origin_is_this_code_and_device(tmp_path, monkeypatch):
    points = batch_points(2)
    calls: list = []
    run_sweep(points, tmp_path, fake_profile(calls))
    record = json.loads((tmp_path / "points" / f"{points[0].key}.json").read_text())
    from mllm_bench import __version__
    from mllm_bench.environment import device_name, git_commit

    assert record["origin"] == {"code": f"{__version__}@{git_commit() or 'unknown'}", "device": device_name("cpu")}
    calls.clear()
    assert run_sweep(points, tmp_path, fake_profile(calls)).skipped == 2 and calls == []
    monkeypatch.setattr(sweep_mod, "code_version", lambda: "9.9.9@feedface")
    again = run_sweep(points, tmp_path, fake_profile(calls))
    assert len(calls) == 2 and all(o.run == "redone" and "9.9.9@feedface" in o.why for o in again.outcomes)


# ----- SQLite: every finished point exactly once ----------------------------------------------------------
def test_interrupted_sweep_leaves_every_finished_point_in_the_db_once(tmp_path):
    points = batch_points(5)
    db = tmp_path / "runs.db"
    calls: list = []
    inner = fake_profile(calls)

    def interrupted(*args, **kwargs):
        if len(calls) == 3:  # the fourth point: killed
            raise KeyboardInterrupt
        return inner(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(points, tmp_path / "s", interrupted, db=db, origin=HERE)
    finished = {p.key for p in points[:3]}
    assert db_counts(db) == dict.fromkeys(finished, ROWS_PER_POINT)  # the finished points reached the db already
    assert not list((tmp_path / "s" / "points").glob("*.claim"))  # the interrupted point's claim is released

    calls.clear()
    resumed = run_sweep(points, tmp_path / "s", fake_profile(calls), db=db, origin=HERE)
    assert len(calls) == 2 and resumed.skipped == 3 and not resumed.db_error
    assert db_counts(db) == {p.key: ROWS_PER_POINT for p in points}
    run_sweep(points, tmp_path / "s", fake_profile(), db=db, origin=HERE)  # nothing new: nothing appended twice
    assert db_counts(db) == {p.key: ROWS_PER_POINT for p in points} and db_duplicates(db) == []
    with sqlite3.connect(db) as con:
        batch = dict(con.execute("select sweep_key, batch_size from results where metric = 'params'").fetchall())
    assert {batch[p.key] for p in points} == {1, 2, 3, 4, 5}


def test_points_finished_without_the_db_are_backfilled(tmp_path):
    points = batch_points(3)
    run_sweep(points, tmp_path / "s", fake_profile(), origin=HERE)  # an earlier run without --db
    db = tmp_path / "runs.db"
    calls: list = []
    result = run_sweep(points, tmp_path / "s", fake_profile(calls), db=db, origin=HERE)
    assert calls == [] and result.skipped == 3
    assert db_counts(db) == {p.key: ROWS_PER_POINT for p in points}


def test_locked_db_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "DB_TIMEOUT_S", 0.05)
    points = batch_points(3)
    db = tmp_path / "runs.db"
    store_point_rows(db, pd.DataFrame([{"sweep_key": "other", "sweep_code": "x", "sweep_device": "y",
                                        "metric": "params", "value": 1.0}]))
    holder = sqlite3.connect(db)
    holder.execute("begin exclusive")  # another process holds the file
    try:
        locked = run_sweep(points, tmp_path / "s", fake_profile(), db=db, origin=HERE)
    finally:
        holder.rollback()
        holder.close()
    assert locked.done == 3 and len(locked.db_notes) == 3 and "locked" in locked.db_error
    assert db_counts(db) == {"other": 1}
    calls: list = []
    resumed = run_sweep(points, tmp_path / "s", fake_profile(calls), db=db, origin=HERE)
    assert calls == [] and not resumed.db_error
    assert db_counts(db) == {"other": 1, **{p.key: ROWS_PER_POINT for p in points}}


def test_storing_a_point_again_replaces_it(tmp_path):
    db = tmp_path / "r.db"
    rows = pd.DataFrame([{"sweep_key": "k", "sweep_code": "c", "sweep_device": "d", "metric": m, "value": v}
                         for m, v in (("a", 1.0), ("b", 2.0))])
    store_point_rows(db, rows)
    store_point_rows(db, rows.assign(value=[3.0, 4.0]))
    store_point_rows(db, rows.assign(sweep_code="c2"))  # the same point from other code is another entry
    with sqlite3.connect(db) as con:
        got = sorted(con.execute("select sweep_code, metric, value from results").fetchall())
    assert got == [("c", "a", 3.0), ("c", "b", 4.0), ("c2", "a", 1.0), ("c2", "b", 2.0)]


def test_bad_db_is_refused_before_any_work(tmp_path):
    db = tmp_path / "not.db"
    db.write_text("this is not sqlite " * 100)
    calls: list = []
    with pytest.raises(ConfigError, match="not.db.*not a SQLite file"):
        run_sweep(batch_points(2), tmp_path / "s", fake_profile(calls), db=db, origin=HERE)
    assert calls == []


# ----- claims: a second process ---------------------------------------------------------------------------
def _write_claim(points_dir: Path, key: str, pid: int) -> Path:
    points_dir.mkdir(parents=True, exist_ok=True)
    path = points_dir / f"{key}.claim"
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return path


def test_a_point_claimed_by_a_live_process_is_not_profiled_twice(tmp_path):
    points = batch_points(3)
    claimed = _write_claim(tmp_path / "points", points[1].key, os.getpid())  # this test's pid: alive
    calls: list = []
    inner = fake_profile(calls)
    seen_claims = []

    def profile(*args, **kwargs):
        seen_claims.append(sorted(p.name for p in (tmp_path / "points").glob("*.claim")))
        return inner(*args, **kwargs)

    result = run_sweep(points, tmp_path, profile, origin=HERE)
    assert [c[3] for c in calls] == [8, 8] and [o.run for o in result.outcomes] == ["new", "busy", "new"]
    assert result.busy == [points[1].key] and f"pid {os.getpid()}" in result.outcomes[1].why
    assert claimed.exists()  # somebody else's claim is left alone
    # while profiling, this run held a claim on the point it was profiling
    assert seen_claims[0] == sorted([f"{points[0].key}.claim", claimed.name])
    assert sorted(finished_points(tmp_path / "points")) == sorted([points[0].key, points[2].key])
    again = claim_point(tmp_path / "points", points[1].key)
    assert not again.held and again.holder == f"pid {os.getpid()}"


def test_a_dead_process_claim_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    points = batch_points(2)
    stale = _write_claim(tmp_path / "points", points[0].key, pid)
    calls: list = []
    result = run_sweep(points, tmp_path, fake_profile(calls), origin=HERE)
    assert len(calls) == 2 and result.busy == [] and not stale.exists()
    assert list((tmp_path / "points").glob("*.claim*")) == []


def test_claims_are_exclusive(tmp_path):
    first = claim_point(tmp_path, "k")
    second = claim_point(tmp_path, "k")
    assert first.held and not second.held and second.holder == f"pid {os.getpid()}"
    second.release()  # not held: removes nothing
    assert (tmp_path / "k.claim").exists()
    first.release()
    assert claim_point(tmp_path, "k").held


# ----- the summary holds every grid of the folder -------------------------------------------------------
def test_two_grids_in_one_folder_keep_both_summaries(tmp_path):
    grid_a = {"visual_tokens": [16, 32]}
    grid_b = {"batch_size": [2, 3]}
    a = expand(["llava", "saisa"], grid_a, BASE, "tiny-llm", "tiny-clip")
    b = expand(["llava", "saisa"], grid_b, BASE, "tiny-llm", "tiny-clip")
    write_sweep(run_sweep(a, tmp_path, fake_profile(), origin=HERE), tmp_path, grid_a, ["llava", "saisa"], BASE,
                "tiny-clip")
    write_sweep(run_sweep(b, tmp_path, fake_profile(), origin=HERE), tmp_path, grid_b, ["llava", "saisa"], BASE,
                "tiny-clip")
    rows = pd.read_json(tmp_path / "results.json")
    params = rows[rows["metric"] == "params"]
    assert sorted(params["sweep_key"]) == sorted(p.key for p in a + b)
    assert sorted(zip(params["arch"], params["visual_tokens"], params["batch_size"], strict=True)) == sorted(
        [(arch, v, 1) for arch in ("llava", "saisa") for v in (16, 32)]
        + [(arch, 16, n) for arch in ("llava", "saisa") for n in (2, 3)])
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert [g["vary"] for g in manifest["grids"]] == [grid_a, grid_b]
    assert [g["finished"] for g in manifest["grids"]] == [4, 4] and manifest["points_finished"] == 8
    assert manifest["grids"][0]["visual_tokens_mapping"].startswith("visual tokens per sample (tiny-clip)")


def test_summary_table_has_every_point_and_its_numbers(tmp_path):
    points = expand(["llava", "saisa"], {"visual_tokens": [16, 32]}, BASE, "tiny-llm", "tiny-clip")
    run_sweep(points[:2], tmp_path, fake_profile(), origin=HERE)
    result = run_sweep(points, tmp_path, fake_profile(), origin=HERE)
    table = summary_table(result).set_index(["arch", "point"])
    assert list(table["run"]) == ["reused", "reused", "new", "new"]
    for arch in ("llava", "saisa"):
        for v in (16, 32):
            assert table.loc[(arch, f"visual_tokens={v}"), "flops"] == PER_TOKEN[arch] * (v + 8)


# ----- the command: summary table, default folders, repeated values ------------------------------------
runner = CliRunner()


@pytest.fixture
def fake(monkeypatch):
    calls: list = []
    monkeypatch.setattr("mllm_bench.cli.sweep.get_profile", lambda: fake_profile(calls))
    return calls


def test_sweep_command_prints_a_summary_and_says_what_was_redone(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    args = ["sweep", "--vary", "visual_tokens=16,32", "--arch", "llava,saisa", *TINY, "--text-before", "4",
            "--text-after", "4", "--out", str(tmp_path), "--no-plots", "--db", str(tmp_path / "r.db")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    lines = [line for line in first.output.splitlines() if "visual_tokens=" in line]
    assert len(lines) == 4 and all(" new " in f" {line} " for line in lines)
    llava_32 = next(line for line in lines if "llava" in line and "visual_tokens=32" in line)
    cells = [c.strip() for c in llava_32.split("│")]  # arch, point, status, run, FLOP, latency, why
    assert cells[3:5] == ["ok", "new"] and float(cells[5]) == PER_TOKEN["llava"] * (32 + 8)
    assert db_counts(tmp_path / "r.db") == dict.fromkeys(db_counts(tmp_path / "r.db"), ROWS_PER_POINT)
    assert len(db_counts(tmp_path / "r.db")) == 4

    monkeypatch.setattr(sweep_mod, "code_version", lambda: "9.9.9@feedface")
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    text = " ".join(second.output.split())
    assert "4 points profiled, 0 already done" in text and "4 of the profiled points were redone" in text
    assert "made by mllm-bench" in text and "9.9.9@feedface" in text
    assert len(db_counts(tmp_path / "r.db")) == 4  # the same keys; the other code's rows sit beside them
    with sqlite3.connect(tmp_path / "r.db") as con:
        per_code = dict(con.execute("select sweep_code, count(distinct sweep_key) from results group by 1"))
    assert per_code["9.9.9@feedface"] == 4 and sum(per_code.values()) == 8


def test_sweep_defaults_to_one_folder_per_grid_under_out(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--arch", "llava", *TINY, "--text-before", "4", "--text-after", "4", "--no-plots"]
    for vary in ("visual_tokens=16,32", "text_tokens=8,20", "visual_tokens=16,32"):
        result = runner.invoke(app, ["sweep", "--vary", vary, *common])
        assert result.exit_code == 0, result.output
    folders = sorted(p.name for p in (tmp_path / "out" / "sweep").iterdir())
    assert len(folders) == 2 and {f.split("-")[0] for f in folders} == {"text_tokens", "visual_tokens"}
    assert len(fake) == 4  # the third command resumed the first grid's folder
    assert not (tmp_path / "results").exists()
    for folder in folders:
        assert json.loads((tmp_path / "out" / "sweep" / folder / "sweep.json").read_text())["points_finished"] == 2


def test_paper_defaults_to_a_fresh_folder_under_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written: list = []

    class Result:
        inference = None
        files: list = []

    def regenerate(out, profile, command="", **kwargs):
        written.append((Path(out), command))
        return Result()

    monkeypatch.setattr("mllm_bench.reports.paper.regenerate", regenerate)
    monkeypatch.setattr("mllm_bench.reports.paper.inference_markdown", lambda *a, **k: "")
    for args in ([], [], ["--out", "results/paper"]):
        result = runner.invoke(app, ["paper", *args])
        assert result.exit_code == 0, result.output
    (first, cmd1), (second, _), (named, cmd3) = written
    assert first != second and first.parent == second.parent == Path("out/paper") and first.is_dir()
    assert cmd1 == "mllm-bench paper" and named == Path("results/paper") and "--out results/paper" in cmd3
    assert "/out/" in (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()


def test_repeated_vary_values_are_refused():
    for spec, shown in (("visual_tokens=144,144", "144"), ("llm=tiny-llm,tiny-llm-mha,tiny-llm", "tiny-llm"),
                        ("batch_size=1,2,01", "1")):
        with pytest.raises(ConfigError, match=f"--vary {spec.split('=')[0]}: {shown} given more than once"):
            parse_vary([spec])
    for fields in (["text_tokens=8,20", "text_after=1,2"], ["text_before=1,2", "text_tokens=8,20"]):
        with pytest.raises(ConfigError, match="text_tokens sets text_after itself"):
            parse_vary(fields)
    result = runner.invoke(app, ["sweep", "--vary", "visual_tokens=144,144"])
    assert result.exit_code == 2 and "144 given more than once" in " ".join(result.output.split())


def test_every_point_is_reported_once_to_on_point(tmp_path):
    points = expand(["llava", "saisa"], {"visual_tokens": [16, 32]}, BASE, "tiny-llm", "tiny-clip")
    run_sweep(points[:1], tmp_path, fake_profile(), origin=HERE)
    _write_claim(tmp_path / "points", points[1].key, os.getpid())
    seen: list = []
    result = run_sweep(points, tmp_path, fake_profile(fail={("llava", 32): RuntimeError("kaput")}),
                       on_point=lambda p, status: seen.append((p.arch, dict(p.values)["visual_tokens"], status)),
                       origin=HERE)
    assert seen == [("llava", 16, "skipped"), ("saisa", 16, "busy"), ("llava", 32, "error"), ("saisa", 32, "ok")]
    assert [(o.status, o.run) for o in result.outcomes] == [("ok", "reused"), ("busy", "busy"), ("error", "failed"),
                                                            ("ok", "new")]
