"""The typer commands end to end: numbers in the output files, exit codes, helpful usage errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from typer.testing import CliRunner

from tests.reports_fakes import PER_TOKEN, fake_profile

runner = CliRunner()


TINY = ["--llm", "tiny-llm", "--vision", "tiny-clip", "--device", "cpu", "--dtype", "float32"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("args, message", [
    (["compare", "--arch", "llava,gpt4"], "unknown architecture(s) ['gpt4']; choose from"),
    (["compare", "--llm", "vicuna-70b"], "choose one of ['llama3-8b'"),
    (["compare", "--option", "flamingo.latents=4"], "options: ['cross_attn_every'"),
    (["compare", "--option", "flamingo.num_latents=four"], "'four' is not a int"),
    (["compare", "--option", "saisa"], "expected ARCH.KEY=VALUE"),
    (["compare", "--arch", "saisa", "--baseline", "llava"], "--baseline 'llava' is not among"),
    (["compare", "--stage", "warmup"], "choose from ['pretrain', 'finetune']"),
    (["compare", "--dtype", "int4"], "choose one of ['bf16'"),
    (["compare", "--format", "xml"], "xml"),
    (["compare", "--measure", "sometimes"], "sometimes"),
    (["compare", "--attention-backend", "fused", *TINY], "attention_backend must be 'fast' or one of"),
    (["compare", "--decode-mode", "cudagraph", *TINY], "decode_mode must be one of ['dynamic', 'static', 'graph']"),
    (["sweep", "--vary", "colour=red"], "FIELD one of ['visual_tokens'"),
    (["sweep", "--vary", "visual_tokens=1000", *TINY], "nearest valid"),
    (["train-cost", "--finetune-text", "40"], "expected BEFORE,AFTER"),
    (["train-cost", "--device", "tpu", "--arch", "llava"], "choose one of ['a100'"),
    (["report", "/nonexistent/rows.json"], "does not exist"),
])
def test_bad_usage_exits_2_with_choices(args, message):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_list_still_works():
    result = invoke("list")
    assert result.exit_code == 0 and "saisa" in result.output and "tiny-clip" in result.output


@pytest.fixture
def fake(monkeypatch):
    """The report machinery with a predictable profiler (numbers ∝ tokens), for command plumbing tests."""
    calls: list = []
    for module in ("compare", "sweep", "train_cost"):
        monkeypatch.setattr(f"mllm_bench.cli.{module}.get_profile", lambda: fake_profile(calls))
    return calls


def test_compare_writes_every_format_and_the_db(fake, tmp_path):
    out = tmp_path / "out"
    result = invoke("compare", *TINY, *TINY_FLAMINGO, "--format", "csv", "--out", str(out), "--plots", "--db",
                    str(tmp_path / "r.db"))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "comparison.csv")
    prefill = table[table["quantity"] == "prefill FLOPs"].set_index("arch")
    assert prefill.loc["saisa", "value"] == PER_TOKEN["saisa"] * (16 + 64)
    assert prefill.loc["saisa", "vs_baseline"] == pytest.approx(PER_TOKEN["saisa"] / PER_TOKEN["llava"] - 1)
    assert (out / "comparison.tex").read_text().count(r"\toprule") == 1
    assert "One multiply-add = 2 FLOPs" in (out / "comparison.md").read_text().replace("one", "One")
    rows = json.loads((out / "results.json").read_text())
    assert {r["arch"] for r in rows} == {"llava", "flamingo", "saisa"}
    assert (out / "plots" / "flops_by_component.png").stat().st_size > 1000
    assert pd.read_sql("select * from results", __import__("sqlite3").connect(tmp_path / "r.db")).shape[0] == len(rows)
    report = invoke("report", str(out / "results.json"), "--format", "markdown")
    assert report.exit_code == 0 and "−50.0%" in report.output  # saisa vs llava, rebuilt from the file


def test_sweep_command_resumes(fake, tmp_path):
    args = ["sweep", "--vary", "visual_tokens=16,32,64", "--arch", "llava,saisa", *TINY, "--text-before", "4",
            "--text-after", "4", "--out", str(tmp_path)]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert len(fake) == 6 and (tmp_path / "cost_vs_visual_tokens.png").exists()
    fake.clear()
    second = invoke(*args)
    assert second.exit_code == 0 and fake == [] and "6 already done" in " ".join(second.output.split())
    rows = pd.read_csv(tmp_path / "results.csv")
    sel = rows[(rows["metric"] == "prefill_flops") & (rows["scope"] == "language") & (rows["convention"] == "dense")
               & (rows["component"] == "all") & (rows["arch"] == "llava")]
    assert sorted(sel["visual_tokens"]) == [16, 32, 64]
    assert sorted(sel["value"]) == [PER_TOKEN["llava"] * (v + 8) for v in (16, 32, 64)]


def test_train_cost_command(fake, tmp_path):
    result = invoke("train-cost", "--arch", "llava,saisa", "--llm", "tiny-llm", "--vision", "tiny-clip",
                    "--pretrain-text", "0,8", "--finetune-text", "8,8", "--mfu", "0.5", "--device", "h100",
                    "--scope", "language", "--convention", "dense", "--format", "csv", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "train_cost.csv").set_index(["arch", "stage"])
    flops = 3 * PER_TOKEN["saisa"] * (16 + 16) * 665_000
    assert table.loc[("saisa", "finetune"), "flops"] == pytest.approx(flops)
    assert table.loc[("saisa", "finetune"), "gpu_hours"] == pytest.approx(flops / (989e12 * 0.5) / 3600)
    assert "paper reports 26%" in (tmp_path / "train_cost.md").read_text()


def test_train_cost_with_measured_mfu(fake, tmp_path):
    from tests.test_train_cost import mfu_rows

    measured = tmp_path / "gpu.csv"
    mfu_rows({"llava": 0.5, "saisa": 0.25}).to_csv(measured, index=False)
    result = invoke("train-cost", "--arch", "llava,saisa", "--llm", "tiny-llm", "--vision", "tiny-clip",
                    "--measured", str(measured), "--device", "h100", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "train_cost.csv").set_index(["arch", "stage"])
    assert table.loc[("saisa", "finetune"), "mfu"] == 0.25 and table.loc[("llava", "pretrain"), "mfu"] == 0.5
    assert table.loc[("saisa", "total"), "gpu_hours_vs_baseline"] == pytest.approx(0.0)
    text = " ".join(result.output.split())
    assert "MFU saisa 25.0%: measured on NVIDIA H200: finetune train step, batch 12, 16 visual + 8 text" in text
    assert "below in GPU-hours at the MFUs above" in text
    override = invoke("train-cost", "--arch", "llava,saisa", "--llm", "tiny-llm", "--vision", "tiny-clip",
                      "--measured", str(measured), "--mfu", "saisa=0.5", "--format", "csv")
    assert override.exit_code == 0 and "0.5," in override.stdout and "0.25," not in override.stdout
    missing = invoke("train-cost", "--arch", "llava,flamingo", "--llm", "tiny-llm", "--vision", "tiny-clip",
                     "--measured", str(measured))
    assert missing.exit_code == 2 and "--mfu flamingo=VALUE" in " ".join(missing.output.split())
    assert not [c for c in fake if c[0] == "flamingo"]  # rejected before any counting


@pytest.mark.parametrize("args, message", [
    (["--mfu", "0"], "--mfu: default must be in (0, 1], got 0.0"),
    (["--mfu", "saisa=1.5"], "--mfu: saisa must be in (0, 1]"),
    (["--mfu", "gpt=0.3"], "'gpt' is not being run"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--measured", "/nonexistent/rows.csv"], "does not exist"),
])
def test_paper_rejects_bad_options_before_profiling(monkeypatch, tmp_path, args, message):
    def no_profiling():
        raise AssertionError("the profiler must not be reached with bad options")

    monkeypatch.setattr("mllm_bench.cli.paper.get_profile", no_profiling)
    monkeypatch.setattr("mllm_bench.reports.paper.regenerate", lambda *a, **k: pytest.fail("regenerate called"))
    result = invoke("paper", "--out", str(tmp_path), *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not list(tmp_path.iterdir())


def test_report_names_the_llms_of_the_unfiltered_input(fake, tmp_path):
    out = tmp_path / "out"
    assert invoke("compare", *TINY, "--arch", "llava", "--format", "csv", "--out", str(out)).exit_code == 0
    result = invoke("report", str(out / "results.json"), "--llm", "vicuna-7b")
    assert result.exit_code == 2
    assert "--llm 'vicuna-7b': no rows; the inputs hold ['tiny-llm']" in " ".join(result.output.split())


# ----- end to end with the real profiler (tiny presets; FLOPs counted on meta tensors) -------------------
MHA = ["--llm", "tiny-llm-mha", "--vision", "tiny-clip", "--device", "cpu", "--dtype", "float32"]
TINY_FLAMINGO = ["-o", "flamingo.num_latents=4", "-o", "flamingo.resampler_depth=1", "-o",
                 "flamingo.cross_attn_every=1"]


def paper_formula(arch: str, text: int, visual: int) -> float:
    from mllm_bench.reports.paper import paper_formula_flops

    from mllm_bench.presets import llm_preset, vision_preset

    return paper_formula_flops(arch, llm_preset("tiny-llm-mha"), vision_preset("tiny-clip"), text, visual)


def test_compare_end_to_end_numbers(tmp_path):
    out = tmp_path / "cmp"
    result = invoke("compare", *MHA, *TINY_FLAMINGO, "--text-before", "4", "--text-after", "4", "--measure", "never",
                    "--count", "all", "--format", "json", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["source"] for r in rows} == {"counted", "analytic"}
    table = pd.read_csv(out / "comparison.csv")
    prefill = table[table["quantity"] == "prefill FLOPs"].set_index("arch")
    # the table's counted prefill FLOPs equal the SAISA paper's closed form (language scope, dense attention)
    assert prefill.loc["llava", "value"] == paper_formula("llava", 8, 16)
    assert prefill.loc["saisa", "value"] == paper_formula("saisa", 8, 16)
    assert prefill.loc["saisa", "vs_baseline"] == pytest.approx(
        paper_formula("saisa", 8, 16) / paper_formula("llava", 8, 16) - 1)
    assert (prefill["source"] == "counted").all()
    flamingo = [r for r in rows if r["arch"] == "flamingo"][0]
    assert json.loads(flamingo["options"]) == {"cross_attn_every": 1, "num_latents": 4, "resampler_depth": 1}
    md = (out / "comparison.md").read_text()
    assert "| prefill FLOPs |" in md and "Options: flamingo" in md and "Scope: language" in md


def test_compare_measured_on_cpu(tmp_path):
    out = tmp_path / "m"
    result = invoke("compare", *MHA, "--arch", "llava", "--stage", "finetune", "--measure", "always",
                    "--min-seconds", "0.01", "--format", "csv", "--out", str(out), "--plots",
                    "--attention-backend", "fast", "--decode-mode", "static")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert set(rows["attention_backend"]) == {"flash"}  # llava's fast path, recorded in every row
    assert set(rows[rows["metric"] == "decode_latency_s"]["note"]) == {"perf_counter; decode=static"}
    table = pd.read_csv(out / "comparison.csv").set_index("quantity")
    assert table.loc["prefill latency (TTFT)", "value"] > 0
    assert table.loc["train-step latency (finetune)", "source"] == "measured"
    assert (out / "plots" / "memory_by_component.png").stat().st_size > 1000


def test_sweep_end_to_end_numbers_and_resume(tmp_path):
    args = ["sweep", "--vary", "visual_tokens=4,16,32", "--arch", "llava,saisa", *MHA, "--text-before", "4",
            "--text-after", "4", "--out", str(tmp_path)]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    rows = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    sel = rows[(rows["metric"] == "prefill_flops") & (rows["source"] == "counted") & (rows["scope"] == "language")
               & (rows["component"] == "all")]
    got = {(r.arch, r.visual_tokens): r.value for r in sel.itertuples()}
    # 4 tokens = one 16 px image (2×2 patches), 16 = one image, 32 = two images
    assert set(sel["images_per_sample"]) == {1, 2} and set(sel["image_size"]) == {16, 32}
    for arch in ("llava", "saisa"):
        for v in (4, 16, 32):
            assert got[arch, v] == paper_formula(arch, 8, v)
    assert (tmp_path / "cost_vs_visual_tokens.png").exists()
    second = invoke(*args)
    assert second.exit_code == 0 and "0 points profiled, 6 already done" in " ".join(second.output.split())


def test_train_cost_end_to_end(tmp_path):
    from mllm_bench.profile import profile
    from mllm_bench.workload import Workload

    result = invoke("train-cost", "--arch", "llava,saisa", "--llm", "tiny-llm-mha", "--vision", "tiny-clip",
                    "--pretrain-text", "1,7", "--finetune-text", "4,12", "--format", "csv", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "train_cost.csv").set_index(["arch", "stage"])
    for arch in ("llava", "saisa"):
        for stage, (before, after), samples in (("pretrain", (1, 7), 558_000), ("finetune", (4, 12), 665_000)):
            rows = profile(arch, Workload(text_before=before, text_after=after, stage=stage), llm="tiny-llm-mha",
                           vision="tiny-clip")
            # train-cost's default: total scope, effective attention (analytic; counted rows are dense only)
            want = rows[(rows["metric"] == "train_step_flops") & (rows["source"] == "analytic")
                        & (rows["scope"] == "total") & (rows["convention"] == "effective")
                        & (rows["component"] == "all") & (rows["role"] == "all")]["value"].item()
            assert table.loc[(arch, stage), "flops"] == want * samples
            assert table.loc[(arch, stage), "gpu_hours"] == pytest.approx(
                table.loc[(arch, stage), "flops"] / (312e12 * 0.4) / 3600)


@pytest.mark.parametrize("command", ["compare", "sweep", "train-cost"])
@pytest.mark.parametrize("args, message", [
    (["--arch", "gpt4"], "unknown architecture(s) ['gpt4']"),
    (["--vision", "clip-vit-g"], "--vision: unknown preset 'clip-vit-g'"),
    (["--option", "llava.nope=1"], "llava has no option 'nope'"),
])
def test_shared_options_are_checked_alike_by_every_command(command, args, message):
    extra = ["--vary", "text_after=1"] if command == "sweep" else []
    result = invoke(command, *extra, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_shared_parsing_helpers():
    from mllm_bench.cli.common import default_device, make_workload, parse_models

    from mllm_bench.config import ConfigError

    archs, options = parse_models(["flamingo,llava", "flamingo"], "tiny-llm", "tiny-clip", ["flamingo.num_latents=4"])
    assert archs == ["flamingo", "llava"] and options == {"flamingo": {"num_latents": 4}}
    workload = make_workload("float32", None, text_before=3, stage="finetune")
    assert (workload.device, workload.dtype, workload.text_before, workload.stage) == (
        default_device(), "float32", 3, "finetune")
    with pytest.raises(ConfigError, match="--dtype: unknown dtype 'int4'"):
        make_workload("int4", "cpu")


def test_roofline_roofs_use_the_device_table():
    from mllm_bench.cli.compare import device_roofs

    assert device_roofs("NVIDIA H100 PCIe") == (756e12, 2.0e12)  # data sheet: 756 TFLOP/s bf16, 2.0 TB/s
    assert device_roofs("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)  # SXM
    assert device_roofs("NVIDIA L4") == (0.0, 0.0) and device_roofs("cpu") == (0.0, 0.0)  # no bandwidth: no roof
