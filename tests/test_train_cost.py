"""The training-budget model: FLOPs × samples → GPU-hours, totals, reductions, stated assumptions."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mllm_bench.reports import train_cost as tc

from mllm_bench.config import ConfigError
from tests.reports_fakes import PER_TOKEN, fake_profile, row


def test_budget_arithmetic():
    recipe = tc.llava15_recipe((1, 7), (4, 12), pretrain_samples=1000, finetune_samples=500)
    table, rows = tc.train_cost(["llava", "saisa"], fake_profile(), recipe, "tiny-llm", "tiny-clip", device="h100",
                                mfu=0.5, scope="language", convention="dense")
    t = table.set_index(["arch", "stage"])
    # fake: train-step FLOPs = 3 × per-token cost × (16 visual + text tokens), language scope, dense
    pre = 3 * PER_TOKEN["llava"] * (16 + 8)
    assert t.loc[("llava", "pretrain"), "flops_per_sample"] == pytest.approx(pre)
    assert t.loc[("llava", "pretrain"), "gpu_hours"] == pytest.approx(pre * 1000 / (989e12 * 0.5) / 3600)
    fin = 3 * PER_TOKEN["saisa"] * (16 + 16)
    assert t.loc[("saisa", "finetune"), "flops"] == pytest.approx(fin * 500)
    total = t.loc[("saisa", "total"), "gpu_hours"]
    assert total == pytest.approx(t.loc[("saisa", "pretrain"), "gpu_hours"] + t.loc[("saisa", "finetune"), "gpu_hours"])
    assert t.loc[("saisa", "total"), "gpu_hours_vs_baseline"] == pytest.approx(
        total / t.loc[("llava", "total"), "gpu_hours"] - 1)
    assert t.loc[("saisa", "total"), "flops_vs_baseline"] == pytest.approx(
        t.loc[("saisa", "total"), "flops"] / t.loc[("llava", "total"), "flops"] - 1)
    assert math.isnan(t.loc[("llava", "total"), "gpu_hours_vs_baseline"])
    notes = tc.budget_notes(table, recipe)
    text = "\n".join(notes)
    assert "26%" in text and "1 token(s) before" in text and "MFU 0.50" in text
    md = tc.to_markdown(table, notes)
    assert "| tiny-llm | saisa | **total** |" in md and "−50.0%" in md
    assert set(rows["stage"]) == {"pretrain", "finetune"}


def test_implied_mfu_and_validation():
    recipe = tc.llava15_recipe()
    table, _ = tc.train_cost(["llava"], fake_profile(), recipe, "tiny-llm", "tiny-clip")
    assert tc.implied_mfu(table, "tiny-llm") == {}
    table["llm"] = "vicuna-7b"
    assert tc.implied_mfu(table, "vicuna-7b") == {}  # LLaVA-1.5's hours were reported with its CLIP-336 tower
    table["vision"] = "clip-vit-l-336"
    mfu = tc.implied_mfu(table, "vicuna-7b")
    flops = table.set_index("stage").loc["pretrain", "flops"]
    assert mfu["pretrain"] == pytest.approx(flops / (3.5 * 3600 * 8 * 312e12))
    with pytest.raises(ConfigError, match="mfu"):
        tc.train_cost(["llava"], fake_profile(), recipe, mfu=1.5)
    with pytest.raises(ConfigError, match="unknown device 'tpu'.*a100"):
        tc.peak_flops("tpu")
    with pytest.raises(ConfigError, match="baseline"):
        tc.train_cost(["saisa"], fake_profile(), recipe)


def test_break_even_text_length_brackets_the_target():
    from mllm_bench.profile import profile

    recipe = tc.llava15_recipe((1, 7), (4, 12), pretrain_samples=100, finetune_samples=100)
    tokens = tc.finetune_text_for_reduction(profile, recipe, "tiny-llm-mha", "tiny-clip", target=0.3, max_tokens=512)
    assert tokens is not None

    def reduction(after: int) -> float:
        r = tc.llava15_recipe((1, 7), (4, after), pretrain_samples=100, finetune_samples=100)
        table, _ = tc.train_cost(["llava", "saisa"], profile, r, "tiny-llm-mha", "tiny-clip")
        return -table.set_index(["arch", "stage"]).loc[("saisa", "total"), "flops_vs_baseline"]

    assert reduction(tokens) <= 0.3 < reduction(max(tokens - 8, 1))
    assert tc.finetune_text_for_reduction(profile, recipe, "tiny-llm-mha", "tiny-clip", target=0.01,
                                          max_tokens=512) is None  # never that small within the window


def test_parse_mfu():
    assert tc.parse_mfu("0.5").of("saisa") == 0.5 and tc.parse_mfu("0.5").uniform()
    mfu = tc.parse_mfu("llava=0.47, saisa=0.32", ["llava", "saisa", "flamingo"])
    assert (mfu.of("llava"), mfu.of("saisa"), mfu.of("flamingo")) == (0.47, 0.32, tc.DEFAULT_MFU)
    assert tc.parse_mfu("0.3,saisa=0.2").of("llava") == 0.3 and not tc.parse_mfu("0.3,saisa=0.2").uniform()
    for bad, message in (("0", "in \\(0, 1\\]"), ("saisa=fast", "ARCH=NUMBER"), ("", "empty"),
                         ("gpt=0.3", "'gpt' is not being run")):
        with pytest.raises(ConfigError, match=message):
            tc.parse_mfu(bad, ["llava", "saisa"])


def mfu_rows(values: dict[str, float], visual: int = 16, **fields) -> pd.DataFrame:
    """Measured train-step MFU rows as the GPU benchmark writes them (total scope, dense FLOPs)."""
    base = dict(source="measured", stage="finetune", phase="train_step", scope="total", convention="dense",
                unit="ratio", visual_tokens=visual, text_tokens=8, batch_size=12, device_name="NVIDIA H200")
    return pd.DataFrame([row(a, "mfu", v, **{**base, **fields}) for a, v in values.items()])


def test_measured_mfu_picks_the_matching_rows_and_gpu_hours_use_their_flops():
    rows = pd.concat([mfu_rows({"llava": 0.5, "saisa": 0.25}),
                      mfu_rows({"llava": 0.9, "saisa": 0.9}, visual=64),  # another visual-token count
                      mfu_rows({"llava": 0.8}, phase="prefill", stage="inference"),  # not a train step
                      mfu_rows({"llava": 0.7}, llm="vicuna-7b")])  # another LLM
    mfu, used = tc.measured_mfu(rows, ["llava", "saisa"], "tiny-llm", 16)
    assert (mfu.of("llava"), mfu.of("saisa")) == (0.5, 0.25) and len(used) == 2
    assert (mfu.scope, mfu.convention) == ("total", "dense") and "NVIDIA H200" in mfu.origin["saisa"]
    given = tc.measured_mfu(rows, ["llava", "saisa"], "tiny-llm", 16, given=tc.parse_mfu("saisa=0.4"))[0]
    assert given.of("saisa") == 0.4 and given.origin["saisa"] == "given"
    with pytest.raises(ConfigError, match="no finetune train_step mfu for flamingo"):
        tc.measured_mfu(rows, ["llava", "flamingo"], "tiny-llm", 16)
    with pytest.raises(ConfigError, match="with tiny-llm at 576 visual tokens"):
        tc.measured_mfu(rows, ["llava"], "tiny-llm", 576)

    recipe = tc.llava15_recipe((1, 7), (4, 12), pretrain_samples=1000, finetune_samples=500)
    table, _ = tc.train_cost(["llava", "saisa"], fake_profile(), recipe, "tiny-llm", "tiny-clip", device="h100",
                             mfu=mfu, scope="total", convention="effective")
    t = table.set_index(["arch", "stage"])
    # the fake's effective FLOPs are half its dense ones; GPU-hours divide the dense ones, the MFU's basis
    dense = 3 * PER_TOKEN["saisa"] * (16 + 16) * 2 * 500
    assert t.loc[("saisa", "finetune"), "flops"] == pytest.approx(dense / 2)
    assert t.loc[("saisa", "finetune"), "gpu_hours"] == pytest.approx(dense / (989e12 * 0.25) / 3600)
    assert t.loc[("saisa", "total"), "flops_vs_baseline"] == pytest.approx(-0.5)
    assert t.loc[("saisa", "total"), "gpu_hours_vs_baseline"] == pytest.approx(0.0)  # half the FLOPs at half the MFU
    text = "\n".join(tc.budget_notes(table, recipe))
    assert "50.0% below LLaVA-1.5's by FLOPs and 0.0% below in GPU-hours" in text
    assert "MFU saisa 25.0%: measured on NVIDIA H200" in text and "total-scope dense FLOPs" in text
    assert "| 25.0% |" in tc.to_markdown(table)


def test_measured_pretrain_mfu_applies_to_the_pretrain_stage_only():
    rows = pd.concat([mfu_rows({"llava": 0.5, "saisa": 0.25}), mfu_rows({"saisa": 0.125}, stage="pretrain")])
    mfu, used = tc.measured_mfu(rows, ["llava", "saisa"], "tiny-llm", 16)
    assert len(used) == 3 and mfu.per_stage == {("saisa", "pretrain"): 0.125}
    assert (mfu.of("saisa"), mfu.of("saisa", "pretrain"), mfu.of("saisa", "finetune")) == (0.25, 0.125, 0.25)
    assert mfu.of("llava", "pretrain") == 0.5  # no pretrain row: the finetune value
    recipe = tc.llava15_recipe((1, 7), (4, 12), pretrain_samples=1000, finetune_samples=500)
    table, _ = tc.train_cost(["llava", "saisa"], fake_profile(), recipe, "tiny-llm", "tiny-clip", device="h100",
                             mfu=mfu, scope="total", convention="dense")
    t = table.set_index(["arch", "stage"])
    pre = 3 * PER_TOKEN["saisa"] * (16 + 8) * 1000
    assert t.loc[("saisa", "pretrain"), "gpu_hours"] == pytest.approx(pre / (989e12 * 0.125) / 3600)
    assert t.loc[("saisa", "pretrain"), "mfu"] == 0.125 and t.loc[("saisa", "finetune"), "mfu"] == 0.25
    combined = t.loc[("saisa", "total"), "flops"] / (989e12 * t.loc[("saisa", "total"), "gpu_hours"] * 3600)
    assert t.loc[("saisa", "total"), "mfu"] == pytest.approx(combined) and 0.125 < combined < 0.25
    text = "\n".join(tc.mfu_notes(table))
    assert "MFU saisa pretrain 12.5%: measured on NVIDIA H200: pretrain train step" in text
    assert "for pretrain steps of llava (not measured)" in text


def test_break_even_beyond_the_training_length_is_out_of_reach():
    finetune = tc.llava15_recipe()[1]
    assert "beyond LLaVA-1.5's 2,048-token training length" in tc.break_even_text(1453, finetune, 576)
    assert "within LLaVA-1.5's" in tc.break_even_text(400, finetune, 576)
