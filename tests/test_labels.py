"""Every printed number says what it is: the version, the architectures' options, the budget's notes, and the
measured rows' spread, memory method and host load."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports import tables
from mllm_bench.reports import train_cost as tc
from typer.testing import CliRunner

import mllm_bench
from mllm_bench.presets import LLM_PRESETS, VISION_PRESETS
from mllm_bench.registry import architecture_names, get_architecture
from tests.reports_fakes import fake_profile, row

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
    from mllm_bench.schema import COLUMNS

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
    # the table built from them shows each timing's spread and labels the CPU memory method
    table = tables.comparison(rows, tables.compare_quantities(stages=()), "llava")
    header, body = tables.wide(table)
    cells = {r[0]: r for r in body}
    iqr = rows[(rows["metric"] == "latency_iqr_s") & (rows["phase"] == "prefill")]["value"].item()
    median = rows[rows["metric"] == "prefill_latency_s"]["value"].item()
    assert f"(IQR {iqr / median * 100:.{0 if iqr / median >= 0.01 else 1}f}%)" in cells["prefill latency (TTFT)"][3]
    assert "prefill peak memory (CPU RSS growth)" in cells
    notes = " ".join(tables.notes_for(rows, "language", "dense"))
    assert "cpu_rss_peak_delta" in notes or "cpu_maxrss_delta" in notes


# ----- train-cost: every count in the notes comes from the config used -----------------------------------
@pytest.fixture
def fake_train_cost(monkeypatch):
    """train-cost with the fake profiler (FLOPs ∝ tokens, visual tokens = the preset's patch grid)."""
    monkeypatch.setattr("mllm_bench.cli.train_cost.get_profile", lambda: fake_profile())


def test_train_cost_names_the_visual_tokens_of_the_vision_tower_used(fake_train_cost, monkeypatch):
    vision = VISION_PRESETS["siglip-so400m-384"]
    visual = (vision.image_size // vision.patch_size) ** 2  # 27 × 27 = 729
    monkeypatch.setattr(tc, "finetune_text_for_reduction", lambda *args, **kwargs: 1800)  # the bisection's answer
    result = runner.invoke(app, ["train-cost", "--arch", "llava,saisa", "--vision", vision.name])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"one image ({visual} visual tokens, {vision.name}) per sample" in text
    assert "576" not in text  # CLIP-336's count appears nowhere
    # the break-even line is printed (vicuna-7b) and counts the same visual tokens
    assert f"~1,800 text tokens after the image: with the 40 before it and the {visual} visual tokens that is " \
           f"{40 + visual + 1800:,} tokens" in text
    assert "see the break-even length above" in text
    # LLaVA-1.5's reported hours were for its CLIP-336 tower: no implied MFU under another one
    assert "reported 8×A100 hours" not in text


def test_train_cost_refers_to_a_break_even_line_only_when_printed(fake_train_cost):
    result = runner.invoke(app, ["train-cost", "--arch", "llava,saisa", "--llm", "tiny-llm", "--vision", "tiny-siglip"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Why FLOPs and the paper differ" in text  # the fake's SAISA saves 50%, not 26%
    assert "break-even" not in text and "falls to 26% only if" not in text
    vision = VISION_PRESETS["tiny-siglip"]
    assert f"one image ({(vision.image_size // vision.patch_size) ** 2} visual tokens, tiny-siglip)" in text


def test_train_cost_notes_follow_the_sample_counts_given():
    recipe = tc.llava15_recipe(finetune_samples=12_800)
    table, _ = tc.train_cost(["llava", "saisa"], fake_profile(), recipe, "vicuna-7b", "clip-vit-l-336")
    text = " ".join(tc.budget_notes(table, recipe))
    assert f"(12,800 ÷ 128, LLaVA-1.5's finetune batch, ≈ {12_800 // 128:,} in finetune)" in text
    assert "12,800 samples (a given count; LLaVA-1.5 trains on 665,000" in text
    assert "665K ÷ 128" not in text and "5.2K" not in text
    assert "reported 8×A100 hours" not in text  # those hours are for 665K finetune samples


def test_break_even_search_counts_the_visual_tokens_of_the_vision_tower_used():
    from mllm_bench.profile import profile

    recipe = tc.llava15_recipe((1, 8), (8, 8))
    vision = VISION_PRESETS["tiny-siglip"]
    visual = (vision.image_size // vision.patch_size) ** 2
    # a target never reached: the search gives up at the longest text that fits max_tokens with these visual tokens
    calls = []

    def spy(arch, workload, **kwargs):
        calls.append(workload.text_before + workload.text_after)
        return profile(arch, workload, **kwargs)

    found = tc.finetune_text_for_reduction(spy, recipe, "tiny-llm-mha", "tiny-siglip", target=-1.0, max_tokens=200)
    assert found is None
    assert max(calls) == 8 + (200 - 8 - visual)


# ----- measured rows in the comparison table: spread, memory method, busy host ---------------------------
def measured_rows(saisa_load: str = "0.10") -> pd.DataFrame:
    """llava and saisa timed by hand: prefill (saisa noisy: IQR 40% of the median), a finetune train step (saisa
    40× slower, on a host whose load is ``saisa_load`` on 2 CPUs) and CPU resident-set memory."""
    env = {"source": "measured", "load_avg_1m": "0.10", "cpu_count": "2", "unit": "s"}
    saisa_env = {**env, "load_avg_1m": saisa_load}
    prefill = {"phase": "prefill", "stage": "inference", "note": "perf_counter"}
    train = {"phase": "train_step", "stage": "finetune", "note": "perf_counter; compiled"}
    memory = {"phase": "prefill", "stage": "inference", "note": "cpu_rss_peak_delta", "unit": "bytes"}
    return pd.DataFrame([
        row("llava", "prefill_latency_s", 0.010, **env, **prefill),
        row("llava", "latency_iqr_s", 0.001, **env, **prefill),
        row("saisa", "prefill_latency_s", 0.020, **env, **prefill),
        row("saisa", "latency_iqr_s", 0.008, **env, **prefill),
        row("llava", "train_step_latency_s", 0.100, **env, **train),
        row("llava", "latency_iqr_s", 0.002, **env, **train),
        row("saisa", "train_step_latency_s", 4.000, **saisa_env, **train),
        row("saisa", "latency_iqr_s", 0.120, **saisa_env, **train),
        row("llava", "peak_memory_bytes", 2**20, **{**env, **memory}),
        row("saisa", "peak_memory_bytes", 2**21, **{**env, **memory}),
    ])


def test_measured_cells_show_their_spread_and_flag_noise_and_a_busy_host():
    rows = measured_rows(saisa_load="1.60")  # 1.60 >= 0.75 × 2 CPUs
    table = tables.comparison(rows, tables.compare_quantities(stages=("finetune",)), "llava")
    header, body = tables.wide(table)
    cells = {r[0]: dict(zip(header, r, strict=True)) for r in body}
    prefill = cells["prefill latency (TTFT)"]
    assert prefill["unit"] == "ms"
    assert prefill["llava"] == f"{10.0:.2f} (IQR {0.001 / 0.010:.0%})"  # 10.00 (IQR 10%)
    assert prefill["saisa"] == f"{20.0:.2f} (IQR {0.008 / 0.020:.0%}) †"  # noisy: 40% > 25%
    assert prefill["saisa vs llava"] == "+100.0% †"
    train = cells["train-step latency (finetune)"]
    assert train["llava"] == f"0.100 (IQR {0.002 / 0.100:.0%})"
    assert train["saisa"] == f"4.000 (IQR {0.120 / 4.0:.0%}) †"  # quiet timing, busy host
    assert train["saisa vs llava"] == f"+{(4.0 / 0.1 - 1) * 100:.1f}% †"
    assert cells["prefill peak memory (CPU RSS growth)"]["saisa vs llava"] == "+100.0%"  # memory: not flagged
    notes = tables.notes_for(rows, "language", "dense")
    text = " ".join(notes)
    assert "interquartile range" in text and "cpu_rss_peak_delta" in text and "allocator caching" in text
    assert "Warning: the host was busy while measuring saisa" in text
    assert "1-minute load average 1.60 on 2 CPUs" in text and "0.75 × the CPU count" in text
    md = tables.to_markdown(table, "t", notes)
    assert "| 20.00 (IQR 40%) † |" in md and "- Warning: the host was busy" in md
    csv = pd.read_csv(__import__("io").StringIO(tables.to_csv(table))).set_index(["quantity", "arch"])
    assert csv.loc[("prefill latency (TTFT)", "saisa"), "iqr"] == pytest.approx(0.008)
    assert csv.loc[("prefill latency (TTFT)", "saisa"), "spread"] == pytest.approx(0.4)
    assert bool(csv.loc[("train-step latency (finetune)", "saisa"), "flagged"])


def test_quiet_measurements_on_an_idle_host_carry_no_warning():
    rows = measured_rows()
    rows = rows[rows["phase"] != "prefill"]  # drop the noisy prefill timing and the memory rows
    table = tables.comparison(rows, tables.compare_quantities(stages=("finetune",)), "llava")
    header, body = tables.wide(table)
    assert not any("†" in cell for r in body for cell in r)
    text = " ".join(tables.notes_for(rows, "language", "dense"))
    assert "busy" not in text and "†" not in text and "CPU RSS" not in text
