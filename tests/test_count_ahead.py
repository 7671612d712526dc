"""Counting ahead in a forked child: it only fills the count cache, the parent waits for it and never depends on it."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from functools import partial

import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports.collect import VOLATILE
from typer.testing import CliRunner

from mllm_bench import count_ahead as ahead

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counting ahead forks on Linux only")


def stop_tqdm_monitor() -> None:
    """tqdm's monitor thread, left by an earlier test's progress bar (torch.compile's), would keep the fork off:
    it is stopped (tqdm starts it again with its next bar)."""
    tqdm = sys.modules.get("tqdm")
    monitor = getattr(getattr(tqdm, "tqdm", None), "monitor", None)
    if monitor is not None:
        monitor.exit()
        tqdm.tqdm.monitor = None


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_BENCH_COUNT_CACHE", "on")
    monkeypatch.setenv("MLLM_BENCH_CACHE_DIR", str(tmp_path / "cache"))
    if ahead.usable_cpus() < 2:
        pytest.skip("one CPU: nothing is counted ahead")
    stop_tqdm_monitor()
    assert ahead.why_not_fork() == "", [t.name for t in threading.enumerate()]


def write_pid(path, seconds=0.0):
    """Calls sent to the child are pickled: module-level functions, bound with functools.partial."""
    time.sleep(seconds)
    path.write_text(str(os.getpid()))


def fail():
    raise ValueError("bad call")


def write_pid_and_hang(path):
    path.write_text(str(os.getpid()))
    time.sleep(60)


def test_the_child_runs_the_calls_and_wait_returns_when_it_is_done(cache_on, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    with ahead.count_ahead() as child:
        assert child.running
        child.submit([partial(write_pid, first, 0.3), partial(write_pid, second)])
        child.wait()
        assert first.exists() and second.exists()  # both ran, in the child, before wait returned
    assert int(first.read_text()) != os.getpid() and first.read_text() == second.read_text()


def test_a_failing_child_stops_quietly_and_the_parent_goes_on(cache_on, tmp_path, capfd):
    after = tmp_path / "after"
    with ahead.count_ahead() as child:
        child.submit([fail, partial(write_pid, after)])
        child.wait()
    assert not after.exists()  # the child stopped at the failure
    assert "Traceback" not in capfd.readouterr().err  # the parent repeats the call and reports what it raises


def test_leaving_stops_a_child_still_running(cache_on, tmp_path):
    pid_file = tmp_path / "pid"

    start = time.perf_counter()
    with ahead.count_ahead() as child:
        child.submit([partial(write_pid_and_hang, pid_file)])
        while not pid_file.exists() and time.perf_counter() - start < 10:
            time.sleep(0.01)
    assert time.perf_counter() - start < 10
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_wait_stops_a_child_past_the_time_limit(cache_on, tmp_path, monkeypatch):
    monkeypatch.setattr(ahead, "WAIT_LIMIT_S", 0.5)
    pid_file = tmp_path / "pid"
    start = time.perf_counter()
    with ahead.count_ahead() as child:
        child.submit([partial(write_pid_and_hang, pid_file)])
        child.wait()  # the parent counts for itself from here: the child must not go on beside it
        assert not child.running and time.perf_counter() - start < 10


def test_a_child_sent_nothing_or_what_cannot_be_sent_ends(cache_on, tmp_path):
    start = time.perf_counter()
    with ahead.count_ahead():  # left before anything is submitted (a check failed): the child ends, no hang
        pass
    with ahead.count_ahead() as child:
        child.submit([lambda: None])  # a lambda does not pickle: nothing runs ahead, the parent counts
        assert not child.running
        child.wait()
    with ahead.count_ahead() as child:
        child.submit([])
        child.wait()
    assert time.perf_counter() - start < 30


def test_no_child_where_it_cannot_help_or_is_unsafe(tmp_path, monkeypatch):
    monkeypatch.setattr(ahead, "usable_cpus", lambda: 2)
    monkeypatch.setenv("MLLM_BENCH_COUNT_CACHE", "off")
    assert "MLLM_BENCH_COUNT_CACHE" in ahead.why_not_fork()
    ran = tmp_path / "ran"
    with ahead.count_ahead() as child:
        assert not child.running
        child.submit([partial(write_pid, ran)])
        child.wait()
    assert not ran.exists()  # nothing ran: the parent counts for itself
    monkeypatch.setenv("MLLM_BENCH_COUNT_CACHE", "on")
    monkeypatch.setattr(ahead, "usable_cpus", lambda: 1)
    assert ahead.why_not_fork() == "one CPU"
    monkeypatch.setattr(ahead, "usable_cpus", lambda: 2)
    stop_tqdm_monitor()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert ahead.why_not_fork() == "other threads are running"
    finally:
        stop.set()
        thread.join()


TINY = ["--llm", "tiny-llm", "--vision", "tiny-clip", "--dtype", "float32", "--measure", "never",
        "--text-before", "4", "--text-after", "4", "--format", "json", "-o", "flamingo.cross_attn_every=1",
        "-o", "flamingo.num_latents=4"]


def compare_rows(tmp_path, monkeypatch, name, fork: bool) -> tuple[list[dict], set[int]]:
    """``compare``'s rows with an empty count cache of its own, and the pids that counted (recorded in a file,
    since a child's memory is its own)."""
    from mllm_bench import profile

    monkeypatch.setenv("MLLM_BENCH_CACHE_DIR", str(tmp_path / name))
    if not fork:
        monkeypatch.setattr(ahead, "why_not_fork", lambda: "turned off by the test")
    pids = tmp_path / f"{name}.pids"
    counting = profile.count_inference

    def recorded(*args, **kwargs):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return counting(*args, **kwargs)

    monkeypatch.setattr(profile, "count_inference", recorded)
    result = CliRunner().invoke(app, ["compare", *TINY])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(profile, "count_inference", counting)
    return json.loads(result.stdout), {int(p) for p in pids.read_text().split()}


def test_compare_counted_ahead_gives_the_rows_it_gives_counting_itself(cache_on, tmp_path, monkeypatch):
    forked, forked_pids = compare_rows(tmp_path, monkeypatch, "forked", fork=True)
    serial, serial_pids = compare_rows(tmp_path, monkeypatch, "serial", fork=False)
    assert forked_pids and os.getpid() not in forked_pids  # every count ran in the child
    assert serial_pids == {os.getpid()}
    assert {r["source"] for r in forked} == {"analytic", "counted"}

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]

    assert strip(forked) == strip(serial)
