"""Runs the commands refuse before any work: context length, devices, output paths, memory, architecture options;
and compare's output set, replaced whole or not at all."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from mllm_bench.cli.app import app
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from mllm_bench.presets import llm_preset, vision_preset
from mllm_bench.registry import build_model
from mllm_bench.workload import Workload
from tests.reports_fakes import fake_profile

runner = CliRunner()
TINY = ["--llm", "tiny-llm", "--vision", "tiny-clip", "--device", "cpu", "--dtype", "float32"]
FLAMINGO_FITS = ["-o", "flamingo.cross_attn_every=1"]  # tiny-llm has 2 layers
CONTEXT = llm_preset("tiny-llm").max_position_embeddings
VISUAL = (vision_preset("tiny-clip").image_size // vision_preset("tiny-clip").patch_size) ** 2  # one image
TEXT_BEFORE = 32  # compare's default (the paper workload's)


def invoke(*args: str):
    return runner.invoke(app, list(args))


def flat(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def calls(monkeypatch):
    """Profiler calls of every command (a fake profiler: these tests are about what runs, not the numbers)."""
    made: list = []
    for module in ("compare", "sweep", "train_cost", "paper"):
        monkeypatch.setattr(f"mllm_bench.cli.{module}.get_profile", lambda: fake_profile(made))
    return made


# ----- prompts and generation past the context; empty --arch ---------------------------------------------
def test_prompt_longer_than_the_context_is_refused(calls):
    after = CONTEXT - TEXT_BEFORE - VISUAL + 1  # one position too many for llava
    result = invoke("compare", *TINY, "--arch", "llava", "--text-after", str(after))
    assert result.exit_code == 2, result.output
    assert f"takes {CONTEXT + 1} positions" in flat(result) and f"max_position_embeddings {CONTEXT}" in flat(result)
    assert calls == []
    fits = invoke("compare", *TINY, "--arch", "llava", "--text-after", str(after - 1), "--measure", "never")
    assert fits.exit_code == 0, fits.output


def test_flamingo_counts_only_text_positions(calls):
    after = CONTEXT - TEXT_BEFORE - VISUAL + 1  # too long with the visual tokens, fits with text alone
    ok = invoke("compare", *TINY, *FLAMINGO_FITS, "--arch", "flamingo", "--baseline", "flamingo",
                "--text-after", str(after), "--measure", "never")
    assert ok.exit_code == 0, ok.output
    over = invoke("compare", *TINY, *FLAMINGO_FITS, "--arch", "flamingo", "--baseline", "flamingo",
                  "--text-after", str(CONTEXT - TEXT_BEFORE + 1))
    assert over.exit_code == 2 and f"takes {CONTEXT + 1} positions ({CONTEXT + 1} text)" in flat(over)


@pytest.mark.parametrize("arch", ["llava", "saisa", "naavit"])
def test_generating_past_the_context_is_refused(calls, arch):
    after, new = 400, 100
    prompt = TEXT_BEFORE + after + VISUAL
    result = invoke("compare", *TINY, "--arch", arch, "--baseline", arch, "--text-after", str(after),
                    "--generate-tokens", str(new))
    assert result.exit_code == 2, result.output
    assert f"needs {prompt + new} positions" in flat(result)
    assert f"at most {CONTEXT - prompt} new tokens fit" in flat(result)
    assert calls == []


def test_python_api_refuses_prompts_and_generation_past_the_context():
    model = build_model("llava", "tiny-llm", "tiny-clip", device="cpu", dtype="float32")
    with pytest.raises(ConfigError, match="max_position_embeddings 512"):
        model.example_batch(Workload(text_before=0, text_after=CONTEXT - VISUAL + 1, device="meta"))
    batch = model.example_batch(Workload(text_before=0, text_after=CONTEXT - VISUAL - 4, device="cpu",
                                         dtype="float32"))
    assert model.generate(batch, 4).shape == (1, 4)  # exactly fills the context
    with pytest.raises(ConfigError, match="at most 4 new tokens fit"):
        model.generate(batch, 5)


@pytest.mark.parametrize("args, message", [
    (["--arch", ""], "--arch: no architecture named"),
    (["--arch", ","], "--arch: no architecture named"),
    (["--stage", ""], "--stage: no stage named"),
])
def test_empty_lists_are_refused_not_defaulted(calls, args, message):
    result = invoke("compare", *TINY, *args)
    assert result.exit_code == 2 and message in flat(result), result.output
    assert calls == []


# ----- architecture options against the LLM, before any profiling ----------------------------------------
@pytest.mark.parametrize("command, extra", [
    ("compare", []),
    ("sweep", ["--vary", "text_after=4,8"]),
    ("train-cost", ["--device", "h100"]),
])
def test_default_architectures_are_validated_before_any_profiling(calls, command, extra):
    device = [] if command == "train-cost" else ["--device", "cpu"]
    result = invoke(command, *extra, "--llm", "tiny-llm", "--vision", "tiny-clip", *device)
    assert result.exit_code == 2, result.output
    assert "cross_attn_every must be in [1, 2]" in flat(result)
    assert calls == []  # before: llava was profiled first, then flamingo failed


def test_unbounded_option_is_refused_with_its_bound(calls):
    result = invoke("compare", *TINY, *FLAMINGO_FITS, "-o", "flamingo.resampler_depth=100000")
    assert result.exit_code == 2 and "resampler_depth must be an integer in [1, 64]" in flat(result)


# ----- devices and output paths ---------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_missing_cuda_device_is_refused(calls, command):
    extra = ["--vary", "text_after=4"] if command == "sweep" else []
    result = invoke(command, *extra, "--llm", "tiny-llm", "--vision", "tiny-clip", "--arch", "llava",
                    "--device", "cuda")
    assert result.exit_code == 2, result.output
    assert "--device cuda: CUDA is not available" in flat(result) and calls == []


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_missing_mps_device_is_refused(calls):
    result = invoke("compare", "--llm", "tiny-llm", "--vision", "tiny-clip", "--arch", "llava", "--device", "mps")
    assert result.exit_code == 2 and "--device mps: MPS is not available" in flat(result) and calls == []


def out_args(command: str, out: Path) -> list[str]:
    return {"compare": ["compare", *TINY, "--arch", "llava", "--out", str(out)],
            "sweep": ["sweep", "--vary", "text_after=4", *TINY, "--arch", "llava", "--out", str(out)],
            "train-cost": ["train-cost", "--arch", "llava", "--llm", "tiny-llm", "--vision", "tiny-clip",
                           "--out", str(out)],
            "paper": ["paper", "--out", str(out)]}[command]


@pytest.mark.parametrize("command", ["compare", "sweep", "train-cost", "paper"])
def test_out_that_is_a_file_is_refused_before_work(calls, tmp_path, command):
    file = tmp_path / "taken"
    file.write_text("x")
    result = invoke(*out_args(command, file))
    assert result.exit_code == 2, result.output
    assert f"--out {file}: is a file, not a folder" in flat(result) and calls == []
    under = invoke(*out_args(command, file / "sub"))
    assert under.exit_code == 2 and f"{file} is a file" in flat(under) and calls == []


@pytest.mark.parametrize("command", ["compare", "sweep", "train-cost", "paper"])
def test_unwritable_out_is_refused_before_work(calls, tmp_path, monkeypatch, command):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anyway: make creating a file fail as it would for a user
        import tempfile

        real = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    result = invoke(*out_args(command, folder / "out"))
    folder.chmod(0o700)
    assert result.exit_code == 2, result.output
    assert f"cannot write in {folder} (Permission denied)" in flat(result) and calls == []


def db_args(command: str, db: Path, tmp_path: Path) -> list[str]:
    if command == "sweep":
        return ["sweep", "--vary", "text_after=4", *TINY, "--arch", "llava", "--out", str(tmp_path / "s"),
                "--db", str(db)]
    return ["compare", *TINY, "--arch", "llava", "--db", str(db)]


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_bad_db_is_refused_before_work(calls, tmp_path, command):
    folder = tmp_path / "dir.db"
    folder.mkdir()
    result = invoke(*db_args(command, folder, tmp_path))
    assert result.exit_code == 2 and f"--db {folder}: is a folder" in flat(result), result.output
    text = tmp_path / "notes.db"
    text.write_text("not a database\n")
    result = invoke(*db_args(command, text, tmp_path))
    assert result.exit_code == 2 and f"--db {text}: is not a SQLite database" in flat(result), result.output
    assert calls == []
    import sqlite3

    good = tmp_path / "good.db"
    sqlite3.connect(good).execute("create table t (x)").connection.close()
    assert invoke(*db_args(command, good, tmp_path)).exit_code == 0


# ----- memory and CUDA-only paths, before measuring -------------------------------------------------------
def tiny_llava_bytes() -> tuple[int, int]:
    """(all parameters, parameters outside the vision tower) of tiny llava, in float32 bytes."""
    model = build_model("llava", "tiny-llm", "tiny-clip", device="meta", dtype="float32")
    params = {id(p): p for p in model.parameters()}.values()
    vision = {id(p) for p in model.vision_tower.parameters()}
    return 4 * sum(p.numel() for p in params), 4 * sum(p.numel() for p in params if id(p) not in vision)


def test_measurement_larger_than_the_free_memory_is_refused(calls, monkeypatch):
    weights, trained = tiny_llava_bytes()  # finetune trains the projector, LLM and lm_head
    # finetune needs weights + gradients + two AdamW states of what it trains, and more (activations)
    free = weights + 3 * trained - 1
    monkeypatch.setattr("mllm_bench.cli.common.available_memory", lambda device: (free, "test"))
    args = ["compare", *TINY, "--arch", "llava", "--stage", "finetune", "--measure"]
    result = invoke(*args, "always")
    assert result.exit_code == 2, result.output
    assert "measuring llava finetune on tiny-llm needs at least" in flat(result)
    assert f"{free / 2**20:.1f} MiB is available (test)" in flat(result) and calls == []  # a tiny model: MiB
    assert invoke(*args, "never").exit_code == 0  # nothing measured: nothing to hold
    monkeypatch.setattr("mllm_bench.cli.common.available_memory", lambda device: (weights + 4 * trained, "t"))
    assert invoke(*args[:-3], "--stage", "pretrain", "--measure", "always").exit_code == 0


def test_available_cpu_memory_is_at_most_memavailable():
    from mllm_bench.cli.common import available_memory

    lines = Path("/proc/meminfo").read_text().splitlines()
    mem_available = int(next(x for x in lines if x.startswith("MemAvailable:")).split()[1]) * 1024
    free, source = available_memory("cpu")
    assert 0 < free <= mem_available * 1.05 and source  # the cgroup's limit may be lower


def test_cuda_graph_decode_is_refused_on_cpu(calls):
    result = invoke("compare", *TINY, "--arch", "llava", "--measure", "always", "--decode-mode", "graph")
    assert result.exit_code == 2, result.output
    assert "--decode-mode graph" in flat(result) and "on cpu use dynamic or static" in flat(result)
    assert calls == []


def test_progress_lines_when_stderr_is_not_a_terminal(calls):
    result = invoke("compare", *TINY, "--arch", "llava,saisa", "--format", "csv")
    assert result.exit_code == 0, result.output
    steps = 2 * 3  # each architecture at inference, pretrain and finetune
    lines = [x for x in result.stderr.splitlines() if x.startswith("profiling ")]
    assert [x.split(":")[0] for x in lines] == [f"profiling {i}/{steps}" for i in range(1, steps + 1)]
    # the analytic training steps run first, the counted inference calls last (reports/collect.py)
    assert lines[-1].startswith(f"profiling {steps}/{steps}: saisa inference (")


# ----- compare's output set: old or new, never mixed ------------------------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_write_leaves_the_old_set_intact(calls, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke("compare", *TINY, "--arch", "llava,saisa", "--out", str(out)).exit_code == 0
    old = snapshot(out)
    assert {"results.json", "results.csv", "comparison.md", "comparison.csv", "comparison.tex"} <= set(old)
    import mllm_bench.results as results  # compare imports write_rows from here when it runs

    real, written = results.write_rows, []

    def disk_fills(rows, path):
        written.append(path)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(rows, path)

    monkeypatch.setattr(results, "write_rows", disk_fills)
    result = invoke("compare", *TINY, "--arch", "llava,saisa", "--text-after", "8", "--out", str(out))
    assert result.exit_code == 1 and "No space left on device" in flat(result)
    assert snapshot(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left beside it
    monkeypatch.setattr(results, "write_rows", real)  # room again: the folder is swapped whole
    assert invoke("compare", *TINY, "--arch", "llava,saisa", "--text-after", "8", "--out", str(out)).exit_code == 0
    assert set(snapshot(out)) == set(old)
    assert {r["text_after"] for r in json.loads((out / "results.json").read_text())} == {8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_new_set_replaces_the_old_one_whole_and_keeps_other_files(calls, tmp_path):
    out = tmp_path / "out"
    assert invoke("compare", *TINY, "--arch", "llava,saisa", "--out", str(out), "--plots").exit_code == 0
    assert (out / "plots").is_dir()
    (out / "notes.txt").write_text("mine")
    result = invoke("compare", *TINY, "--arch", "llava,saisa", "--text-after", "8", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert {r["text_after"] for r in rows} == {8}
    assert not (out / "plots").exists()  # the old run's plots are not left beside the new rows
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    again = invoke("compare", *TINY, "--arch", "llava,saisa", "--text-after", "9", "--out", str(out))
    assert again.exit_code == 0 and {r["text_after"] for r in json.loads((out / "results.json").read_text())} == {9}
