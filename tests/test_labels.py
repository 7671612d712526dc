"""Every printed number says what it is: the version, the architectures' options, the budget's notes, and the
measured rows' spread, memory method and host load."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pandas as pd
from mllm_bench.cli.app import app
from typer.testing import CliRunner

import mllm_bench
from mllm_bench.presets import LLM_PRESETS, VISION_PRESETS
from mllm_bench.registry import architecture_names, get_architecture

runner = CliRunner()


# ----- mllm-bench --version and list ---------------------------------------------------------------------
def test_version_prints_version_and_commit_without_torch():
    code = ("import sys; sys.argv = ['mllm-bench', '--version']\n"
            "from mllm_bench.cli.app import main\n"
            "main()\n"
            "print('loaded:', sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, last = done.stdout.strip().splitlines()
    assert first.startswith(f"mllm-bench {mllm_bench.__version__}")
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(mllm_bench.__file__)))
    if head.returncode == 0:
        assert f"(git {head.stdout.strip()}" in first
    assert last == "loaded: []"


def test_version_option_of_the_app_exits_0():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith(f"mllm-bench {mllm_bench.__version__}")


def test_list_shows_option_defaults_and_whole_preset_names_at_80_columns():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    cells = {cell.strip() for line in lines for cell in line.replace("┃", "│").split("│")}
    for name in [*LLM_PRESETS, *VISION_PRESETS, *architecture_names()]:
        assert name in cells, name  # a cell holding the whole name, not "siglip-so400m-…"
    options = get_architecture("flamingo").Options
    for f in dataclasses.fields(options):
        assert f"{f.name}={f.default!r}" in cells, f.name
    assert "cross_attn_every=4" in cells  # OpenFlamingo-style default, as the docs say


# ----- environment: host load ----------------------------------------------------------------------------
def test_environment_records_host_load_where_something_runs(monkeypatch):
    from mllm_bench import environment as env
    from mllm_bench.results import COLUMNS

    monkeypatch.setattr(env.os, "getloadavg", lambda: (3.456, 2.0, 1.0))
    monkeypatch.setattr(env.os, "cpu_count", lambda: 4)
    cpu = env.environment("cpu")
    assert cpu["load_avg_1m"] == "3.46" and cpu["cpu_count"] == "4"
    meta = env.environment("meta")
    assert meta["load_avg_1m"] == "" and meta["cpu_count"] == ""
    assert {"load_avg_1m", "cpu_count"} <= set(COLUMNS)
    assert env.is_busy(3.0, 4) and not env.is_busy(2.99, 4)  # 0.75 × 4 = 3


def test_measured_profile_rows_carry_the_host_load():
    from mllm_bench.profile import profile
    from mllm_bench.workload import Workload

    wl = Workload(batch_size=1, text_before=2, text_after=2, generate_tokens=2, dtype="float32", device="cpu")
    rows = profile("llava", wl, llm="tiny-llm", vision="tiny-clip", measure="always", count=False)
    measured = rows[rows["source"] == "measured"]
    assert len(measured)
    assert set(measured["cpu_count"]) == {str(os.cpu_count())}
    loads = pd.to_numeric(measured["load_avg_1m"])
    assert loads.notna().all() and (loads >= 0).all()
