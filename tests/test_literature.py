"""The literature table: every claim has a source and a stated cause, and the recomputations and readings
equal the closed forms written out here."""

from __future__ import annotations

import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports.literature import CLAIMS_FILE, literature_table, load_claims
from typer.testing import CliRunner

from mllm_bench.config import ConfigError

# Vicuna-7B / 13B v1.5, CLIP ViT-L/14-336 (REFERENCE.md)
V7 = dict(h=4096, m=11008, L=32, V=32000)
V13 = dict(h=5120, m=13824, L=40, V=32000)
DV = 1024


def _full(n: int, h: int, m: int) -> float:
    return 2 * n * (4 * h + 3 * m) * h + 4 * n * n * h


def _frozen(t: int, v: int, h: int, m: int) -> float:
    return 2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * (t + v) * h


@pytest.fixture(scope="module")
def table():
    return literature_table().set_index("id")


def test_every_claim_has_a_source_a_cause_and_a_verdict(table) -> None:
    assert len(table) >= 12
    assert table["source"].str.len().min() > 10
    assert table["cause"].str.len().min() > 10
    assert set(table["reproduced"]) <= {"yes", "reading", "no", "n/a"}
    for paper in ("SAISA", "ShortV", "FastV", "VTW", "VisionZip"):
        assert paper in set(table["paper"])


def test_saisa_and_shortv_rows(table) -> None:
    h, m, L = V7["h"], V7["m"], V7["L"]
    t, v = 64, 576
    projector = 2 * v * (DV * h + h * h)
    llava = L * _full(t + v, h, m) + projector
    saisa = L * (_frozen(t, v, h, m) + projector)
    assert table.loc["saisa-7b", "recomputed"] == pytest.approx(100 * (1 - saisa / llava))
    assert table.loc["shortv-llava-7b", "recomputed"] == pytest.approx(llava / 1e12)
    shortv = 13 * _full(t + v, h, m) + 19 * _frozen(t, v, h, m) + projector
    assert table.loc["shortv-n19-7b", "recomputed"] == pytest.approx(shortv / 1e12)
    assert (table.loc[["saisa-7b", "shortv-llava-7b", "shortv-n19-7b", "shortv-fastv-7b"], "reproduced"]
            == "yes").all()


def test_llava_next_rows_are_explained_by_the_papers_token_count(table) -> None:
    h, m, L = V13["h"], V13["m"], V13["L"]
    t = 64
    assert table.loc["shortv-next-13b", "reading_value"] == pytest.approx(L * _full(t + 2880, h, m) / 1e12)
    n24 = (L - 24) * _full(t + 2880, h, m) + 24 * _frozen(t, 2880, h, m)
    assert table.loc["shortv-n24-next-13b", "reading_value"] == pytest.approx(n24 / 1e12)
    # ours: transformers' packing of 672×672 (576 + 48·48 + 48 newlines) and the connector on the 2,880 features
    v = 576 + 48 * 48 + 48
    ours = L * _full(t + v, h, m) + 2 * 2880 * (DV * h + h * h)
    assert table.loc["shortv-next-13b", "recomputed"] == pytest.approx(ours / 1e12)
    assert table.loc["shortv-next-13b", "reproduced"] == "reading"


def test_fastv_rows_use_eq5(table) -> None:
    h, m, L = V7["h"], V7["m"], V7["L"]

    def eq5(n: int) -> float:
        return 4 * n * h * h + 2 * n * n * h + 2 * n * h * m

    n = 36 + 576
    ranking = n * h  # the ranking row of layer K−1, one multiply-add per FLOP
    ratio = (3 * eq5(n) + (L - 3) * eq5(n - 288) + ranking) / (L * eq5(n))
    assert table.loc["fastv-k3-7b", "recomputed"] == pytest.approx(100 * ratio)


def test_vtw_reading(table) -> None:
    h, m, L, vocab = V7["h"], V7["m"], V7["L"], V7["V"]
    n = 640
    reading = L * 2 * n * (4 * h * h + 3 * h * m) + 2 * 576 * (DV * h + h * h) + 2 * n * h * vocab
    assert table.loc["vtw-7b", "reading_value"] == pytest.approx(reading / 1e12)
    assert round(reading / 1e12, 2) == 8.48
    assert table.loc["vtw-7b", "reproduced"] == "reading"


def test_llm_viewer_budgets_are_labelled_not_reproduced(table) -> None:
    h, m, L, vocab, heads = V7["h"], V7["m"], V7["L"], V7["V"], 32
    n = 64 + 192
    per_layer = 2 * n * (4 * h * h + 3 * h * m) + 4 * n * n * h + 5 * heads * n * n + 18 * h * n
    assert table.loc["llm-viewer-192", "recomputed"] == pytest.approx((L * per_layer + h * vocab) / 1e12)
    assert table.loc["llm-viewer-192", "reproduced"] == "no"
    assert table.loc["visionzip-next", "reproduced"] == "n/a"


def test_a_bad_claims_file_is_named(tmp_path) -> None:
    text = CLAIMS_FILE.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "claims.csv"
    bad.write_text("\n".join([text[0], text[1].replace(",saved,", ",guess,")]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"claims.csv, line 2 \(saisa-7b\): compute must be one of"):
        load_claims(bad)
    bad.write_text("id,paper\nx,y\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="missing column"):
        load_claims(bad)


def test_literature_command() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["literature", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("id,paper,model")
    conventions = runner.invoke(app, ["literature", "--conventions"])
    assert conventions.exit_code == 0
    assert "4nd² + 2n²d + 2ndm" in conventions.output and "llm-viewer" in conventions.output


def test_literature_refuses_latex_rather_than_printing_markdown_under_its_name() -> None:
    result = CliRunner().invoke(app, ["literature", "--format", "latex"])
    assert result.exit_code == 2
    assert "--format latex" in result.output
