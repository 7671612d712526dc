"""Published FLOP conventions: each equals its published formula, written out here independently, on
LLaVA-1.5-7B and the SAISA paper workload (576 visual + 32 + 32 text tokens, prefill)."""

from __future__ import annotations

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports.rows import Conventions
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from mllm_bench.conventions import ALL_CONVENTIONS, PUBLISHED, published
from mllm_bench.costmodel import equivalent_tokens
from mllm_bench.profile import profile
from mllm_bench.registry import build_model
from mllm_bench.workload import PAPER_WORKLOAD, Workload

# Vicuna-7B v1.5 and CLIP ViT-L/14-336 (REFERENCE.md)
H, M, L, HEADS, VOCAB, DV = 4096, 11008, 32, 32, 32000, 1024
T, V = 64, 576
N = T + V


def _value(arch: str, convention: str, workload: Workload = PAPER_WORKLOAD, options: dict | None = None,
           llm: str = "vicuna-7b") -> float:
    model = build_model(arch, llm, "clip-vit-l-336", options, device="meta")
    return published(convention).flops(model.analytic_cost(workload), model.llm_config, "prefill")


def _eq5(n: int, d: int = H, m: int = M) -> float:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def test_fastv_eq5_on_llava() -> None:
    assert _value("llava", "fastv") == pytest.approx(L * _eq5(N), rel=1e-12)


def test_pdrop_on_llava() -> None:
    assert _value("llava", "pdrop") == pytest.approx(L * (4 * N * H * H + 2 * N * N * H + 3 * N * H * M), rel=1e-12)


def test_saisa_convention_on_llava_and_saisa() -> None:
    projector = 2 * V * (DV * H + H * H)
    llava = L * (2 * N * (4 * H + 3 * M) * H + 4 * N * N * H) + projector
    saisa = L * (2 * T * (4 * H + 3 * M) * H + 4 * V * H * H + 4 * T * (T + V) * H + projector)
    assert _value("llava", "saisa") == pytest.approx(llava, rel=1e-12)
    assert _value("saisa", "saisa") == pytest.approx(saisa, rel=1e-12)


def test_llm_viewer_on_llava() -> None:
    """model_analyzer.py @472f71f with configs/Llama.py: per layer linears 2·s·ic·oc, QK^T and SV 2·s²·d each,
    softmax 5·heads·s², two norms 7·h·s, two adds h·s, the activation 2·h·s; lm_head batch·h·V once."""
    linears = 2 * N * (H * H * 4 + 3 * H * M)
    attention = 2 * N * N * H * 2 + 5 * HEADS * N * N
    elementwise = 2 * 7 * H * N + 2 * H * N + 2 * H * N
    expected = L * (linears + attention + elementwise) + H * VOCAB
    assert _value("llava", "llm-viewer") == pytest.approx(expected, rel=1e-12)


def test_fastv_method_under_its_own_eq5() -> None:
    """FastV K=2, R=50%: K layers over n tokens, the rest over n − 288, plus the ranking row of layer K−1
    (QK^T of one query over n keys: n·d multiply-adds)."""
    expected = 2 * _eq5(N) + (L - 2) * _eq5(N - V // 2) + N * H
    assert _value("fastv", "fastv") == pytest.approx(expected, rel=1e-12)


def test_published_conventions_refuse_training() -> None:
    model = build_model("llava", "tiny-llm", "tiny-clip", device="meta")
    cost = model.analytic_cost(PAPER_WORKLOAD.replace(stage="finetune"))
    with pytest.raises(ConfigError, match="prefill and decode"):
        PUBLISHED["fastv"].flops(cost, model.llm_config, "train_step")
    with pytest.raises(ConfigError, match="convention must be one of"):
        published("calflops-ish")


def test_every_convention_names_its_source_and_what_it_leaves_out() -> None:
    for conv in PUBLISHED.values():
        text = conv.describe()
        assert conv.source in text and conv.leaves_out in text and conv.formula in text
    assert set(ALL_CONVENTIONS) == {"dense", "effective", *PUBLISHED}


def test_notes_never_claim_two_flops_per_mac_for_a_mac_convention() -> None:
    fastv = Conventions("language", "fastv").lines()
    assert not any("multiply-add = 2 FLOPs" in line for line in fastv)
    assert any("multiply-add = 1 FLOP" in line for line in fastv)
    assert any("multiply-add = 2 FLOPs" in line for line in Conventions("language", "dense").lines())


def test_equivalent_tokens_solves_the_quadratic() -> None:
    f = {x: 3.0 + 2.0 * x + 0.5 * x * x for x in (0, 256, 512)}
    assert equivalent_tokens(3.0 + 2.0 * 100 + 0.5 * 100 * 100, f) == pytest.approx(100)
    linear = {x: 7.0 + 4.0 * x for x in (0, 256, 512)}
    assert equivalent_tokens(7.0 + 4.0 * 33, linear) == pytest.approx(33)
    assert equivalent_tokens(1.0, f) is None


def _token_rows(arch: str, options: dict | None = None):
    df = profile(arch, PAPER_WORKLOAD, options=options, count=False)
    return df[df["metric"].isin(["equivalent_visual_tokens", "layer_avg_visual_tokens"])]


def test_equivalent_and_layer_averaged_tokens() -> None:
    rows = _token_rows("saisa")
    got = rows[(rows["metric"] == "equivalent_visual_tokens") & (rows["convention"] == "saisa")]["value"].iloc[0]
    # LLaVA-1.5 at x visual tokens (the SAISA paper's formula) costs what SAISA costs at 576
    projector = 2 * V * (DV * H + H * H)
    saisa = L * (2 * T * (4 * H + 3 * M) * H + 4 * V * H * H + 4 * T * (T + V) * H + projector)
    n = T + got
    llava_at = L * (2 * n * (4 * H + 3 * M) * H + 4 * n * n * H) + 2 * got * (DV * H + H * H)
    assert llava_at == pytest.approx(saisa, rel=1e-9)
    assert rows[rows["metric"] == "layer_avg_visual_tokens"]["value"].iloc[0] == 0  # no visual query or FFN row

    fastv = _token_rows("fastv")
    layer_avg = fastv[fastv["metric"] == "layer_avg_visual_tokens"]["value"].iloc[0]
    assert layer_avg == pytest.approx((2 * V + (L - 2) * (V // 2)) / L)

    zipped = _token_rows("visionzip", {"dominant": 54, "contextual": 10})
    eq = zipped[(zipped["metric"] == "equivalent_visual_tokens") & (zipped["scope"] == "language")
                & (zipped["convention"] == "dense")]["value"].iloc[0]
    assert eq == pytest.approx(64, abs=1e-6)  # 64 spliced tokens are 64 LLaVA tokens


def test_compare_under_a_published_convention() -> None:
    result = CliRunner().invoke(app, ["compare", "-a", "llava,saisa", "--convention", "llm-viewer", "--count",
                                      "none", "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert "llm-viewer" in result.output and "LLM-Viewer" in result.output
    tflops = L * (2 * N * (4 * H * H + 3 * H * M) + 4 * N * N * H + 5 * HEADS * N * N + 18 * H * N) + H * VOCAB
    assert f"{tflops / 1e12:.3f}" in result.output
    assert "train-step FLOPs" not in result.output  # training exists in dense/effective only


def test_train_cost_refuses_a_published_convention() -> None:
    result = CliRunner().invoke(app, ["train-cost", "--convention", "fastv"])
    assert result.exit_code == 2
    assert "fastv" in result.output


def test_paper_writes_a_table_in_a_published_convention(tmp_path) -> None:
    from mllm_bench.reports.paper import regenerate

    from mllm_bench.presets import llm_preset, vision_preset

    wl = Workload(text_before=4, text_after=4)
    result = regenerate(tmp_path, profile, llms=("tiny-llm-mha",), archs=("llava", "saisa"), vision="tiny-clip",
                        workload=wl, conventions=("pdrop",))
    table = pd.read_csv(tmp_path / "inference_flops_pdrop.csv").set_index("arch")
    c, v = llm_preset("tiny-llm-mha"), vision_preset("tiny-clip").tokens_per_image
    n, d, m = 8 + v, c.hidden_size, c.intermediate_size
    pdrop = c.num_layers * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)
    assert table.loc["llava", "tflops_analytic"] == pytest.approx(pdrop / 1e12, rel=1e-12)
    assert "pdrop convention" in (tmp_path / "inference_flops_pdrop.md").read_text()
    assert any(p.name == "inference_flops_pdrop.md" for p in result.files)
