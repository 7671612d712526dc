"""Accuracies: the lmms-eval JSON and CSV readers, the join to cost rows, and ``report --accuracy`` end to end."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports.accuracy import Score, join, read_csv_scores, read_lmms_eval, read_scores
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from tests.reports_fakes import row

# what lmms-eval writes (evaluator.simple_evaluate + EvaluationTracker): per task "metric,filter" values, their
# "_stderr" twins ("N/A" without bootstrap), an alias, non-numeric entries, and the evaluated model in "config"
LMMS_EVAL = {
    "results": {
        "mme": {"alias": "mme", "mme_cognition_score,none": 355.7, "mme_cognition_score_stderr,none": "N/A",
                "mme_percetion_score,none": 1510.75, "mme_percetion_score_stderr,none": "N/A"},
        "mmbench_en_dev": {"alias": "mmbench_en_dev", "gpt_eval_score,none": 64.3,
                           "gpt_eval_score_stderr,none": "N/A", "submission,none": None},
        "textvqa_val": {"alias": "textvqa_val", "exact_match,flexible-extract": 0.4582,
                        "exact_match_stderr,flexible-extract": 0.0069, "submission,none": []},
        "ocr_wer": {"alias": "ocr_wer", "wer,none": 0.21},
    },
    "higher_is_better": {"mme": {"mme_cognition_score": True, "mme_percetion_score": True},
                         "ocr_wer": {"wer": False}},
    "config": {"model": "llava", "model_args": "pretrained=liuhaotian/llava-v1.5-7b", "batch_size": "1"},
    "git_hash": "abc123",
}
EXPECTED = {"mme mme_cognition_score": 355.7, "mme mme_percetion_score": 1510.75,
            "mmbench_en_dev gpt_eval_score": 64.3, "textvqa_val exact_match (flexible-extract)": 0.4582,
            "ocr_wer wer": 0.21}


@pytest.fixture
def lmms_file(tmp_path):
    path = tmp_path / "20250101_results.json"
    path.write_text(json.dumps(LMMS_EVAL))
    return path


def test_lmms_eval_scores(lmms_file):
    scores = read_scores(f"{lmms_file}:llava")
    assert {s.benchmark: s.value for s in scores} == EXPECTED
    assert {s.arch for s in scores} == {"llava"}
    assert [s.benchmark for s in scores if not s.higher_is_better] == ["ocr_wer wer"]
    assert "model_args=pretrained=liuhaotian/llava-v1.5-7b" in scores[0].origin


def test_lmms_eval_needs_an_architecture(lmms_file):
    with pytest.raises(ConfigError, match="names a checkpoint") as err:
        read_scores(str(lmms_file))
    assert f"{lmms_file}:ARCH" in str(err.value) and "liuhaotian/llava-v1.5-7b" in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not readable as JSON"),
    (json.dumps([1, 2]), 'no top-level "results" object'),
    (json.dumps({"results": {"mme": 3}}), "results['mme'] is int"),
    (json.dumps({"results": {"mme": {"alias": "mme", "score_stderr,none": 0.1}}}), "holds no numeric score"),
])
def test_malformed_lmms_eval_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="--accuracy") as err:
        read_lmms_eval(path, "llava")
    assert message in str(err.value) and str(path) in str(err.value)
    assert "lmms-eval results file" in str(err.value)


def test_csv_scores(tmp_path):
    path = tmp_path / "acc.csv"
    path.write_text("arch,benchmark,score\nllava,mmbench,64.3\nsaisa, mmbench ,66.0\n")
    assert read_scores(str(path)) == [Score("llava", "mmbench", 64.3, f"{path} line 2"),
                                      Score("saisa", "mmbench", 66.0, f"{path} line 3")]
    one = tmp_path / "one.csv"
    one.write_text("benchmark,score\ngqa,61.9\n")
    assert read_scores(f"{one}:fastv") == [Score("fastv", "gqa", 61.9, f"{one} line 2")]


@pytest.mark.parametrize("content, arch, message", [
    ("model,benchmark,score\nx,gqa,1\n", None, "no column(s) ['arch']"),
    ("arch,benchmark\nllava,gqa\n", None, "no column(s) ['score']"),
    ("arch,benchmark,score\nllava,gqa,high\n", None, "line 2: score 'high' is not a number"),
    ("arch,benchmark,score\nllava,,1\n", None, "line 2: benchmark is blank"),
    ("arch,benchmark,score\n", None, "no scores"),
    ("arch,benchmark,score\nllava,gqa,1\n", "saisa", "has an arch column already"),
    ("arch,benchmark,score\nllava,gqa,62,5\n", None, "line 2: more fields than the header"),  # a decimal comma
])
def test_malformed_csv(tmp_path, content, arch, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_csv_scores(path, arch)
    assert message in str(err.value) and str(path) in str(err.value)


def test_inputs_that_are_neither_file_nor_known_kind(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_scores(str(tmp_path / "missing.csv"))
    (tmp_path / "acc.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"neither \.json"):
        read_scores(str(tmp_path / "acc.txt"))


def test_a_path_with_a_colon_is_not_split(tmp_path):
    path = tmp_path / "run:1.csv"
    path.write_text("arch,benchmark,score\nllava,gqa,62\n")
    assert read_scores(str(path))[0].arch == "llava"


def cost_rows(*models: tuple[str, str]) -> pd.DataFrame:
    return pd.DataFrame([row(arch, "prefill_flops", 1e9, options=opts) for arch, opts in models])


def test_join_matches_by_arch_and_reports_the_rest():
    scores = [Score("llava", "gqa", 62.0, "a.csv line 2"), Score("saisa", "gqa", 63.1, "a.csv line 3"),
              Score("fastv", "gqa", 60.0, "a.csv line 4"), Score("llava", "gqa", 62.0, "b.csv line 2")]
    joined = join(cost_rows(("llava", ""), ("saisa", "")), scores)
    got = joined.rows.set_index("arch")
    assert got["value"].to_dict() == {"llava": 62.0, "saisa": 63.1}
    assert set(got["source"]) == {"reported"} and set(got["metric"]) == {"accuracy"}
    assert len(joined.warnings) == 1 and joined.warnings[0].startswith("unmatched accuracy: fastv gqa = 60")
    assert "not a difference in points" in joined.notes[0] and "a.csv for llava, saisa" in joined.notes[0]


def test_join_refuses_ambiguity_and_contradictions():
    two = cost_rows(("fastv", '{"drop_ratio": 0.25}'), ("fastv", '{"drop_ratio": 0.75}'))
    with pytest.raises(ConfigError, match="matches 2 models"):
        join(two, [Score("fastv", "gqa", 60.0, "a.csv line 2")])
    with pytest.raises(ConfigError, match="is 62 in a.csv line 2 and 63 in b.csv line 2"):
        join(cost_rows(("llava", "")), [Score("llava", "gqa", 62.0, "a.csv line 2"),
                                        Score("llava", "gqa", 63.0, "b.csv line 2")])


def test_nothing_matched_gives_no_rows():
    joined = join(cost_rows(("llava", "")), [Score("saisa", "gqa", 60.0, "a.csv line 2")])
    assert joined.rows.empty and joined.notes == [] and len(joined.warnings) == 1


# ----- report --accuracy end to end ------------------------------------------------------------------------
runner = CliRunner()
TINY = ["--llm", "tiny-llm-mha", "--vision", "tiny-clip", "--measure", "never", "--count", "none", "--stage",
        "finetune"]


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    result = runner.invoke(app, ["compare", "-a", "llava,saisa,flamingo", *TINY, "-o", "flamingo.num_latents=4",
                                 "-o", "flamingo.resampler_depth=1", "-o", "flamingo.cross_attn_every=1",
                                 "--format", "csv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "results.json"


def test_report_joins_accuracy(results_file, tmp_path, lmms_file):
    scores = tmp_path / "acc.csv"
    scores.write_text("arch,benchmark,score\nllava,gqa,62.0\nsaisa,gqa,63.1\nqformer,gqa,41.0\n")
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(results_file), "--accuracy", str(scores), "--accuracy",
                                 f"{lmms_file}:flamingo", "--format", "csv", "--out", str(out), "--plots"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "unmatched accuracy: qformer gqa = 41" in text
    table = pd.read_csv(out / "comparison.csv")
    gqa = table[table["quantity"] == "accuracy: gqa"].set_index("arch")
    assert gqa["value"].to_dict() == {"llava": 62.0, "saisa": 63.1}
    assert gqa.loc["saisa", "vs_baseline"] == pytest.approx(63.1 / 62.0 - 1)
    assert set(gqa["source"]) == {"reported"}
    mme = table[table["quantity"] == "accuracy: mme mme_percetion_score"].set_index("arch")
    assert mme["value"].to_dict() == {"flamingo": 1510.75}
    assert math.isnan(mme.loc["flamingo", "vs_baseline"])  # llava has no MME score
    md = (out / "comparison.md").read_text()
    assert "| accuracy: gqa |" in md and "Accuracy rows (source reported)" in md
    rows = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert "accuracy" not in set(rows["metric"])  # the result files keep cost rows only
    plots = out / "plots"
    assert (plots / "pareto.png").exists() and (plots / "pareto_accuracy_gqa.png").stat().st_size > 1000
    assert (plots / "pareto_accuracy_ocr_wer_wer.pdf").exists()


def test_report_without_accuracy_has_no_accuracy_rows(results_file, tmp_path):
    result = runner.invoke(app, ["report", str(results_file), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "accuracy" not in result.stdout


@pytest.mark.parametrize("extra, message", [
    (["--accuracy", "/nonexistent/acc.csv"], "does not exist"),
    (["--vary", "visual_tokens", "--accuracy", "ACC"], "does not go with --vary"),
])
def test_report_accuracy_errors(results_file, tmp_path, extra, message):
    scores = tmp_path / "acc.csv"
    scores.write_text("arch,benchmark,score\nllava,gqa,62.0\n")
    args = [str(scores) if a == "ACC" else a for a in extra]
    result = runner.invoke(app, ["report", str(results_file), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_the_notes_say_where_higher_is_only_assumed_better(tmp_path):
    path = tmp_path / "acc.csv"
    path.write_text("arch,benchmark,score\nllava,ocr wer,12.5\n")
    rows = pd.DataFrame([{"arch": "llava", "llm": "vicuna-7b", "vision": "clip-vit-l-336", "options": "",
                          "metric": "params", "value": 1.0}])
    joined = join(rows, read_scores(str(path)))
    assert any("Higher is taken as better for: ocr wer" in n for n in joined.notes)
