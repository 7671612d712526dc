"""The LLaVA-1.5 → SAISA saving decomposition against closed forms written here (REFERENCE.md, SAISA/ShortV).

Per layer, t text and v visual tokens, n = t + v, hidden h, FFN width m (multi-head attention, K/V width h):
dense layer 2n(4h+3m)h + 4n²h; key/value-only layer 2t(4h+3m)h + 4vh² + 4t(t+v)h; projector 2v(d_v·h + h²).
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
from mllm_bench.reports.decomposition import (
    DELTA_COMPONENTS,
    STEPS,
    check_against_architectures,
    decomposition,
    to_markdown,
    wiring_cost,
    write_decomposition,
)

from mllm_bench.config import ConfigError
from mllm_bench.presets import llm_preset, vision_preset
from mllm_bench.workload import PAPER_WORKLOAD

# REFERENCE.md: Vicuna-7B / 13B v1.5 and CLIP ViT-L/14-336 (width 1024, 576 visual tokens)
SIZES = {"vicuna-7b": (4096, 11008, 32), "vicuna-13b": (5120, 13824, 40)}
D_V, V, T_BEFORE, T_AFTER = 1024, 576, 32, 32
T = T_BEFORE + T_AFTER
N = T + V


def causal(start: int, length: int) -> int:
    """Causal pairs of ``length`` queries at positions start..start+length-1 over every earlier key and themselves."""
    return length * start + length * (length + 1) // 2


# allowed query-key pairs of the paper workload (text 32, image 576, text 32)
TEXT_PAIRS = causal(0, T_BEFORE) + causal(T_BEFORE + V, T_AFTER)
VISUAL_CAUSAL_PAIRS = causal(T_BEFORE, V)
VISUAL_NAAVIT_PAIRS = V * (T_BEFORE + 1)  # the text before the image and itself


def expected(llm: str) -> dict[int, dict[str, float]]:
    """Language-scope prefill FLOPs of each step in both conventions, from the closed forms."""
    h, m, L = SIZES[llm]
    projector = 2 * V * (D_V * h + h * h)
    text_rows = 2 * T * (4 * h + 3 * m) * h  # Q, K, V, O and the 3-matrix FFN on text rows
    visual_kv = 4 * V * h * h  # K and V on visual rows
    visual_qo = 4 * V * h * h  # Q and O on visual rows
    visual_ffn = 6 * V * m * h
    pair = 4 * h  # QK^T and PV per allowed pair, per layer
    dense = {
        0: L * (2 * N * (4 * h + 3 * m) * h + 4 * N * N * h) + projector,
        # dense attention has no mask discount: NAAViT counts what LLaVA-1.5 does
        1: L * (2 * N * (4 * h + 3 * m) * h + 4 * N * N * h) + projector,
        # visual rows keep K, V and the FFN; only text queries score, over all t + v keys
        2: L * (text_rows + visual_kv + visual_ffn + 4 * T * N * h) + projector,
        3: L * (2 * T * (4 * h + 3 * m) * h + 4 * V * h * h + 4 * T * (T + V) * h) + projector,
        4: L * (2 * T * (4 * h + 3 * m) * h + 4 * V * h * h + 4 * T * (T + V) * h + projector),
    }
    linears_full = text_rows + visual_kv + visual_qo + visual_ffn
    effective = {
        0: L * (linears_full + pair * (TEXT_PAIRS + VISUAL_CAUSAL_PAIRS)) + projector,
        1: L * (linears_full + pair * (TEXT_PAIRS + VISUAL_NAAVIT_PAIRS)) + projector,
        2: L * (text_rows + visual_kv + visual_ffn + pair * TEXT_PAIRS) + projector,
        3: L * (text_rows + visual_kv + pair * TEXT_PAIRS) + projector,
        4: L * (text_rows + visual_kv + pair * TEXT_PAIRS + projector),
    }
    return {s: {"dense": dense[s], "effective": effective[s]} for s in dense}


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return {llm: decomposition(llm) for llm in SIZES}


def test_formulas_match_the_paper_form():
    # the test's own step 0 and step 4 are the paper's LLaVA-1.5 and SAISA closed forms; 7B ≈ 8.5 TFLOPs (ShortV)
    e = expected("vicuna-7b")
    assert e[0]["dense"] / 1e12 == pytest.approx(8.53, abs=0.005)
    assert e[4]["dense"] / e[0]["dense"] - 1 == pytest.approx(-0.665, abs=0.005)


@pytest.mark.parametrize("llm", list(SIZES))
def test_steps_equal_the_closed_forms(tables, llm):
    table, e = tables[llm], expected(llm)
    assert list(table["step"]) == [0, 1, 2, 3, 4]
    assert list(table["arch"]) == ["llava", "naavit", "", "", "saisa"]
    for _, r in table.iterrows():
        for conv in ("dense", "effective"):
            assert r[f"tflops_{conv}"] * 1e12 == pytest.approx(e[r["step"]][conv], rel=1e-12), (r["step"], conv)


@pytest.mark.parametrize("llm", list(SIZES))
def test_savings_add_up_and_split_by_component(tables, llm):
    table, e = tables[llm], expected(llm)
    h, m, L = SIZES[llm]
    for conv in ("dense", "effective"):
        total = (e[0][conv] - e[4][conv]) / 1e12
        assert table[f"saving_{conv}"].iloc[1:].sum() == pytest.approx(total, rel=1e-12)
        assert table[f"share_{conv}"].iloc[1:].sum() == pytest.approx(1.0, rel=1e-12)
        for _, r in table.iloc[1:].iterrows():
            prev = e[r["step"] - 1][conv] / 1e12
            assert r[f"saving_{conv}"] == pytest.approx(prev - e[r["step"]][conv] / 1e12, rel=1e-12)
            parts = sum(r[f"saving_{c}_{conv}"] for c in DELTA_COMPONENTS)
            assert parts == pytest.approx(r[f"saving_{conv}"], rel=1e-12, abs=1e-15)
        by = table.set_index("step")
        # step 3 takes exactly the visual FFN; step 4 adds L − 1 projectors
        assert by.loc[3, f"saving_ffn_{conv}"] * 1e12 == pytest.approx(L * 6 * V * m * h, rel=1e-12)
        assert by.loc[4, f"saving_connector_{conv}"] * 1e12 == pytest.approx(
            -(L - 1) * 2 * V * (D_V * h + h * h), rel=1e-12)
        # step 2 takes the visual Q and O and whatever attention the visual queries had left
        assert by.loc[2, f"saving_attn_proj_{conv}"] * 1e12 == pytest.approx(L * 4 * V * h * h, rel=1e-12)
    by = table.set_index("step")
    assert by.loc[1, "saving_dense"] == 0.0
    assert by.loc[1, "saving_attn_scores_effective"] * 1e12 == pytest.approx(
        L * 4 * h * (VISUAL_CAUSAL_PAIRS - VISUAL_NAAVIT_PAIRS), rel=1e-12)
    # alone from LLaVA-1.5, step 2 also removes the visual-visual pairs step 1 took
    assert by.loc[2, "saving_alone_effective"] == pytest.approx(by.loc[1, "saving_effective"]
                                                                + by.loc[2, "saving_effective"], rel=1e-12)
    assert by.loc[2, "saving_alone_effective"] > by.loc[2, "saving_effective"]
    for step in (1, 3, 4):
        assert by.loc[step, "saving_alone_effective"] == pytest.approx(by.loc[step, "saving_effective"], rel=1e-12)
    for step in (1, 2, 3, 4):
        assert by.loc[step, "saving_alone_dense"] == pytest.approx(by.loc[step, "saving_dense"], rel=1e-12)


def test_total_scope_adds_the_same_vision_tower_and_lm_head_to_every_step(tables):
    lang, total = tables["vicuna-7b"], decomposition("vicuna-7b", scope="total")
    for conv in ("dense", "effective"):
        offset = total[f"tflops_{conv}"] - lang[f"tflops_{conv}"]
        assert offset.iloc[0] > 0
        assert (offset - offset.iloc[0]).abs().max() < 1e-9
        assert total[f"saving_{conv}"].iloc[1:].tolist() == pytest.approx(lang[f"saving_{conv}"].iloc[1:].tolist())


def test_the_check_against_the_architectures_can_fail():
    llm, vision = llm_preset("vicuna-7b"), vision_preset("clip-vit-l-336")
    naavit_cost = wiring_cost(STEPS[1].wiring, llm, vision, PAPER_WORKLOAD)
    assert check_against_architectures(STEPS[1], naavit_cost, llm, vision, PAPER_WORKLOAD) == ["naavit"]
    with pytest.raises(AssertionError, match="attn_scores prefill FLOPs \\(effective\\).*llava"):
        check_against_architectures(STEPS[0], naavit_cost, llm, vision, PAPER_WORKLOAD)


def _latency_rows() -> pd.DataFrame:
    base = {"llm": "vicuna-7b", "vision": "clip-vit-l-336", "options": "", "unit": "s", "source": "measured",
            "stage": "inference", "phase": "prefill", "batch_size": 1, "images_per_sample": 1, "image_size": 336,
            "visual_tokens": 576, "text_tokens": 64, "generate_tokens": 0, "text_before": 32, "text_after": 32,
            "dtype": "bfloat16",
            "device": "cuda", "device_name": "GPU-X", "component": "all", "role": "all", "git_commit": "abc",
            "timestamp": "t"}
    rows = []
    for arch, ms, backend in (("llava", 30.0, "flash"), ("naavit", 90.0, "flex"), ("saisa", 60.0, "split")):
        for scope, scale in (("language", 1.0), ("total", 1.5)):
            rows.append(base | {"arch": arch, "metric": "prefill_latency_s", "value": ms * scale / 1e3,
                                "scope": scope, "attention_backend": backend})
            rows.append(base | {"arch": arch, "metric": "latency_iqr_s", "value": 0.001, "scope": scope})
        # another workload must not be picked
        rows.append(base | {"arch": arch, "metric": "prefill_latency_s", "value": 9.0, "scope": "language",
                            "batch_size": 16})
    return pd.DataFrame(rows)


def test_measured_latency_only_for_implemented_steps():
    table = decomposition("vicuna-7b", measured=_latency_rows())
    assert table["measured_prefill_ms"].tolist()[:2] == pytest.approx([30.0, 90.0])
    assert math.isnan(table["measured_prefill_ms"].iloc[2]) and math.isnan(table["measured_prefill_ms"].iloc[3])
    assert table["measured_prefill_ms"].iloc[4] == pytest.approx(60.0)
    assert table["measured_iqr_ms"].iloc[0] == pytest.approx(1.0)
    assert table["measured_backend"].tolist() == ["flash", "flex", "", "", "split"]
    total = decomposition("vicuna-7b", scope="total", measured=_latency_rows())
    assert total["measured_prefill_ms"].iloc[0] == pytest.approx(45.0)
    # no rows of this LLM: no times
    assert decomposition("vicuna-13b", measured=_latency_rows())["measured_prefill_ms"].isna().all()
    md = to_markdown(table)
    assert "| 2 | − visual queries (Q, O, scores) |" in md and "no implementation" in md
    assert "30.00 (IQR 1.00)" in md and "GPU-X" in md


def test_measured_rows_of_two_devices_are_refused():
    rows = _latency_rows()
    other = rows[rows["arch"] == "llava"].assign(device_name="GPU-Y", value=0.5)
    with pytest.raises(ConfigError, match="several devices"):
        decomposition("vicuna-7b", measured=pd.concat([rows, other]))


def test_bad_input():
    with pytest.raises(ConfigError, match="scope must be one of"):
        decomposition("vicuna-7b", scope="paper")
    with pytest.raises(ConfigError, match="inference"):
        decomposition("vicuna-7b", workload=dataclasses.replace(PAPER_WORKLOAD, stage="finetune"))


def test_files_are_written(tmp_path):
    files = write_decomposition(tmp_path, llms=("vicuna-7b",), measured=_latency_rows())
    # both LLMs' tables (their figures are drawn the same way; skipped to keep the test fast)
    assert [p.name for p in write_decomposition(tmp_path, measured=_latency_rows(), figures=False)] == [
        "saving_decomposition.csv", "saving_decomposition.md"]
    names = sorted(p.name for p in files)
    assert names == sorted(["saving_decomposition.md", "saving_decomposition.csv",
                            "saving_decomposition_vicuna-7b.png", "saving_decomposition_vicuna-7b.pdf"])
    assert all(p.stat().st_size > 1000 for p in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary files left behind
    csv = pd.read_csv(tmp_path / "saving_decomposition.csv")
    assert len(csv) == 10 and set(csv["llm"]) == set(SIZES)
    md = (tmp_path / "saving_decomposition.md").read_text()
    assert "## vicuna-13b, effective attention, language scope" in md
    assert "No measured rows for vicuna-13b" in md


def test_measured_rows_match_a_workload_whose_dtype_is_written_as_an_alias():
    table = decomposition("vicuna-7b", PAPER_WORKLOAD.replace(dtype="bf16"), measured=_latency_rows())
    assert table["measured_prefill_ms"].iloc[0] == pytest.approx(30.0)  # rows say "bfloat16", the workload "bf16"
