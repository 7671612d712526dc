"""Equal-budget selection: the chosen settings against closed forms written here, labels for the cases without
a setting, the bisection against an exhaustive search, and the parser's errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
from mllm_bench.architectures.fastv import kept_visual_tokens
from mllm_bench.reports.equal import (
    Budget,
    _Search,
    best_within,
    budget_knobs,
    choose,
    choose_all,
    knob_tokens,
    parse_budget,
)

from mllm_bench.config import ConfigError, replace
from mllm_bench.presets import vision_preset
from mllm_bench.registry import build_model
from mllm_bench.workload import PAPER_WORKLOAD

KNOBS = budget_knobs()

# Vicuna-7B + CLIP ViT-L/14-336 on the paper workload: 64 text tokens (32 + 32), one image of 576 tokens
H, M, L, T, V, DV = 4096, 11008, 32, 64, 576, 1024


def dense_layer(n: int) -> int:
    """The SAISA/ShortV paper's dense decoder layer: 2n(4h+3m)h + 4n²h."""
    return 2 * n * (4 * H + 3 * M) * H + 4 * n * n * H


def frozen_layer() -> int:
    """A layer whose visual tokens are keys/values only: 2t(4h+3m)h + 4vh² + 4t(t+v)h."""
    return 2 * T * (4 * H + 3 * M) * H + 4 * V * H * H + 4 * T * (T + V) * H


CONNECTOR = 2 * V * (DV * H + H * H)  # LLaVA's two-layer MLP on every visual token


def fastv_flops(kept: int, layer: int = 2) -> int:
    """FastV: ``layer`` full layers, the ranking QK^T row (2·n·h) in layer K-1, the rest over text + kept tokens."""
    n = T + V
    return CONNECTOR + layer * dense_layer(n) + 2 * n * H + (L - layer) * dense_layer(T + kept)


def shortv_flops(frozen: int) -> int:
    return CONNECTOR + frozen * frozen_layer() + (L - frozen) * dense_layer(T + V)


def pick(arch: str, spec: str, options: dict | None = None, baseline: str | None = None, **kw):
    return choose(arch, "vicuna-7b", "clip-vit-l-336", options, PAPER_WORKLOAD, parse_budget(spec),
                  baseline=baseline, **kw)


@pytest.mark.parametrize("budget", [3.3e12, 1.5e12])
def test_fastv_keeps_the_most_tokens_within_a_flops_budget(budget):
    expected = max(k for k in range(1, V + 1) if fastv_flops(k) <= budget)
    choice = pick("fastv", f"flops={budget}")
    assert choice.status == "chosen" and choice.meets
    assert kept_visual_tokens(V, choice.value) == expected
    assert choice.amount == fastv_flops(expected) <= budget < fastv_flops(expected + 1)
    assert choice.options == {"drop_ratio": choice.value}
    assert f"{expected} visual tokens kept from layer 2 on" in choice.line


def test_fastv_keeps_its_other_options():
    budget = 3.3e12
    expected = max(k for k in range(1, V + 1) if fastv_flops(k, layer=3) <= budget)
    choice = pick("fastv", f"flops={budget}", {"layer": 3})
    assert choice.options["layer"] == 3 and kept_visual_tokens(V, choice.value) == expected


def test_shortv_freezes_the_fewest_layers_within_a_flops_budget():
    budget = 4.0e12
    expected = min(n for n in range(L + 1) if shortv_flops(n) <= budget)
    choice = pick("shortv", f"flops={budget}")
    assert choice.value == expected and choice.amount == shortv_flops(expected)


def test_visual_token_budget_per_knob():
    choices = {c.arch: c for c in choose_all(["llava", "fastv", "visionzip", "qformer"], "vicuna-7b",
                                             "clip-vit-l-336", {}, PAPER_WORKLOAD, parse_budget("visual_tokens=64"),
                                             baseline="saisa")}
    assert choices["visionzip"].options == {"tokens": 64}
    assert choices["fastv"].value == pytest.approx((V - 64) / V) and kept_visual_tokens(V, choices["fastv"].value) == 64
    assert choices["llava"].options == {"pool": 3}  # the 24x24 grid pooled 3x3: 8x8 = 64 tokens
    assert choices["qformer"].options == {"num_queries": 64}
    assert all(c.amount == 64 and c.meets for c in choices.values())


def test_visual_token_budget_takes_the_closest_count_not_above():
    budget = 100
    assert pick("visionzip", f"visual_tokens={budget}").options == {"tokens": 64}  # 64 < 100 < 128
    pool = pick("llava", f"visual_tokens={budget}")
    side = 24
    expected = min(k for k in range(1, side + 1) if side % k == 0 and (side // k) ** 2 <= budget)
    assert pool.options == {"pool": expected} and pool.amount == (side // expected) ** 2
    assert kept_visual_tokens(V, pick("fastv", f"visual_tokens={budget}").value) == budget


def test_infeasible_budget_is_labelled_and_runs_at_the_cheapest_setting():
    choice = pick("fastv", "flops=1e9")
    assert choice.status == "infeasible" and not choice.meets
    assert kept_visual_tokens(V, choice.value) == 1 and choice.amount == fastv_flops(1)
    assert choice.line.startswith("fastv: no setting meets prefill FLOPs ≤ 1e9")
    assert "smallest is prefill FLOPs" in choice.line and "profiled there" in choice.line


def test_architectures_without_a_setting_stay_as_they_are():
    saisa = pick("saisa", "visual_tokens=64")
    assert saisa.status == "no knob" and saisa.options == {} and saisa.amount == V and not saisa.meets
    assert "no knob" in saisa.line and "over" in saisa.line
    shortv = pick("shortv", "visual_tokens=64")
    assert shortv.status == "unaffected" and shortv.options == {} and "does not change the visual tokens" in shortv.line
    base = pick("llava", "flops=3.3e12", baseline="llava")
    assert base.status == "baseline" and base.options == {} and base.amount == CONNECTOR + L * dense_layer(T + V)


def test_params_budget_moves_only_knobs_that_change_parameters():
    assert pick("fastv", "params=1e10").status == "unaffected"
    base = build_model("qformer", options={"num_queries": 1}, device="meta").num_parameters()
    width = 768  # each query is one learned vector of the Q-Former's width
    choice = pick("qformer", f"params={base + 9 * width}")
    assert choice.options == {"num_queries": 10} and choice.amount == base + 9 * width
    assert pick("qformer", f"params={base - 1}").status == "infeasible"


def test_an_option_the_budget_chooses_is_refused():
    with pytest.raises(ConfigError, match=r"fastv.drop_ratio=0.3 conflicts with --equal"):
        pick("fastv", "flops=3e12", {"drop_ratio": 0.3})


def test_kept_count_is_the_architectures_own():
    model = build_model("fastv", options={"drop_ratio": 0.3}, device="meta")
    assert knob_tokens(KNOBS["fastv"], model, PAPER_WORKLOAD) == kept_visual_tokens(V, 0.3)
    llava = build_model("llava", device="meta")
    assert knob_tokens(KNOBS["llava"], llava, PAPER_WORKLOAD) == V  # no count of its own: the spliced tokens


def test_each_architecture_declares_its_own_knob_and_none_is_inherited():
    """NAAViT and VisionZip derive their specs from LLaVA-1.5's: neither takes its pool knob."""
    assert {a: k.option for a, k in KNOBS.items()} == {
        "llava": "pool", "flamingo": "num_latents", "shortv": "num_frozen", "fastv": "drop_ratio",
        "visionzip": "tokens", "qformer": "num_queries"}


def test_a_knob_moving_an_unknown_budget_is_refused():
    from mllm_bench.spec import BudgetKnob

    with pytest.raises(ConfigError, match="BudgetKnob 'pool'.*'latency'"):
        BudgetKnob("pool", "k", lambda m, w: [1], frozenset({"latency"}), frozenset())
    with pytest.raises(ConfigError, match="monotone among moves"):
        BudgetKnob("pool", "k", lambda m, w: [1], frozenset({"flops"}), frozenset({"params"}))


@pytest.mark.parametrize("spec, message", [
    ("flop=3e12", "KEY one of ['flops', 'visual_tokens', 'params']"),
    ("flops", "expected KEY=VALUE"),
    ("flops=", "expected KEY=VALUE"),
    ("flops=lots", "'lots' is not a number"),
    ("flops=-1", "positive finite number"),
    ("visual_tokens=6.5", "whole number"),
    ("params=inf", "positive finite number"),
])
def test_malformed_budget(spec, message):
    with pytest.raises(ConfigError, match="--equal") as err:
        parse_budget(spec)
    assert message in str(err.value)


def test_parse_budget():
    assert parse_budget(" flops = 3.3e12 ") == Budget("flops", 3.3e12)
    assert parse_budget("visual_tokens=64") == Budget("visual_tokens", 64.0)


# ----- the search itself, exhaustively on a small model ------------------------------------------------------
SMALL_VISION = replace(vision_preset("tiny-clip"), image_size=96)  # 12 x 12 = 144 patches
SMALL_OPTIONS = {"qformer": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128},
                 "flamingo": {"resampler_depth": 1, "resampler_heads": 2, "resampler_dim_head": 8, "xattn_heads": 2,
                              "xattn_dim_head": 8, "cross_attn_every": 1}}
SMALL_WORKLOAD = PAPER_WORKLOAD.replace(text_before=4, text_after=4, dtype="float32")


def _small_search(arch: str, kind: str):
    knob = KNOBS[arch]
    base = build_model(arch, "tiny-llm-mha", SMALL_VISION, SMALL_OPTIONS.get(arch), device="meta", dtype="float32")
    values = knob.values(base, SMALL_WORKLOAD)[:24]  # the Q-Former's and Flamingo's first 24 counts
    search = _Search(arch, knob, "tiny-llm-mha", SMALL_VISION, SMALL_OPTIONS.get(arch, {}), SMALL_WORKLOAD, kind,
                     "language", "dense")
    return search, values


@pytest.mark.parametrize("arch, kind", [(a, k) for a, knob in KNOBS.items() for k in sorted(knob.monotone)])
def test_monotone_knobs_are_monotone_and_bisection_agrees(arch, kind):
    search, values = _small_search(arch, kind)
    amounts = [search.at(values, i).amount for i in range(len(values))]
    finite = [a for a in amounts if math.isfinite(a)]
    assert finite and finite == sorted(finite), f"{arch} {kind}: {amounts}"
    assert all(math.isfinite(a) for a in amounts[:len(finite)])  # invalid settings only at the expensive end
    for budget in sorted({*finite[:: max(1, len(finite) // 3)], finite[0] - 1, finite[-1] + 1, finite[0] * 1.01}):
        fresh, _ = _small_search(arch, kind)
        assert best_within(fresh, values, budget, True) == best_within(search, values, budget, False), budget


def test_search_uses_the_knob_table_it_is_given():
    knobs = {"fastv": dataclasses.replace(KNOBS["fastv"], values=lambda model, workload: [0.5, 0.25])}
    choice = pick("fastv", "flops=1e15", knobs=knobs)
    assert choice.value == 0.25 and len(choice.searched) <= 2


# ----- compare --equal end to end ----------------------------------------------------------------------------
def test_compare_equal_visual_tokens(tmp_path):
    import json

    import pandas as pd
    from mllm_bench.cli.app import app
    from typer.testing import CliRunner

    out = tmp_path / "eq"
    # tiny-clip at 96 px: 12 x 12 = 144 visual tokens per image
    archs = "llava,visionzip,fastv,saisa"
    args = ["--equal", "visual_tokens=64", "-a", archs, "--llm", "tiny-llm-mha", "--vision", "tiny-clip",
            "--image-size", "96", "--measure", "never", "--count", "none", "--stage", "finetune",
            "--format", "csv", "--out", str(out), "--plots"]
    result = CliRunner().invoke(app, ["compare", *args])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "results.csv", keep_default_na=False)
    params = rows[rows["metric"] == "params"].set_index("arch")
    options = {a: json.loads(o) if o else {} for a, o in params["options"].items()}
    assert options["visionzip"] == {"tokens": 64}
    assert options["fastv"] == {"drop_ratio": (144 - 64) / 144}
    assert options["llava"] == {} and options["saisa"] == {}  # the baseline and an architecture without a knob
    assert params["visual_tokens"].to_dict() == {"llava": 144, "visionzip": 64, "fastv": 144, "saisa": 144}
    visual_kv = rows[(rows["metric"] == "kv_cache_bytes") & (rows["role"] == "visual")].set_index("arch")["value"]
    # FastV caches all 144 visual tokens in its first K = 2 layers and the 64 kept in the third; VisionZip 64 in all 3
    assert visual_kv["fastv"] == visual_kv["visionzip"] * (2 * 144 + 64) / (3 * 64)
    text = " ".join(result.output.split())
    assert "fastv: drop_ratio=0.555556: 64 visual tokens kept from layer 2 on, 100.0% of the budget 64, within" in text
    assert "saisa: no knob" in text and "llava: the baseline" in text
    md = (out / "comparison.md").read_text()
    assert "Equal budget: visual tokens ≤ 64 per sample" in md and "- visionzip: tokens=64" in md
    assert (out / "plots" / "pareto.png").stat().st_size > 1000


def test_compare_equal_refuses_a_malformed_budget():
    from mllm_bench.cli.app import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["compare", "--equal", "tokens=64"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "--equal 'tokens=64': expected KEY=VALUE with KEY one of ['flops', 'visual_tokens', 'params']" in text


def test_compare_refuses_a_flops_budget_in_a_published_convention():
    from mllm_bench.cli.app import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["compare", "--equal", "flops=3e12", "--convention", "fastv"])
    assert result.exit_code == 2
    assert "mllm-bench's own conventions" in " ".join(result.output.split())
