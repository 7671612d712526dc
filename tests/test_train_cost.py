"""The training-budget model: FLOPs × samples → GPU-hours, totals, reductions, stated assumptions."""

from __future__ import annotations

import math

import pytest
from mllm_bench.reports import train_cost as tc

from mllm_bench.config import ConfigError
from tests.reports_fakes import PER_TOKEN, fake_profile


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
    assert t.loc[("saisa", "total"), "vs_baseline"] == pytest.approx(total / t.loc[("llava", "total"), "gpu_hours"] - 1)
    assert math.isnan(t.loc[("llava", "total"), "vs_baseline"])
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
        return -table.set_index(["arch", "stage"]).loc[("saisa", "total"), "vs_baseline"]

    assert reduction(tokens) <= 0.3 < reduction(max(tokens - 8, 1))
    assert tc.finetune_text_for_reduction(profile, recipe, "tiny-llm-mha", "tiny-clip", target=0.01,
                                          max_tokens=512) is None  # never that small within the window
