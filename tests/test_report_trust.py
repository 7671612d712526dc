"""``mllm-bench report`` never prints a wrong number silently: rows of several workloads, contradicting rows
and result files that are cut short, corrupt or not rows at all are refused with exit 2, naming what is wrong.

The result files are written by the real commands (tiny presets, analytic costs only) and then damaged.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports import tables
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from mllm_bench.profile import profile
from mllm_bench.results import concat_rows, read_results, write_rows
from mllm_bench.workload import Workload

runner = CliRunner()
TINY = ["--llm", "tiny-llm", "--vision", "tiny-clip", "--device", "cpu", "--dtype", "float32", "--measure", "never"]
ARCHS = ["--arch", "llava,saisa"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def said(result) -> str:
    """Everything the command printed, on one line (rich wraps long messages)."""
    return " ".join(result.output.split())


def squeezed(result) -> str:
    """The output without any whitespace: long paths survive rich's line breaks."""
    return "".join(result.output.split())


def table_values(csv_text: str) -> dict[tuple[str, str], float]:
    """(quantity, model) → value of a comparison table printed with ``--format csv``."""
    table = pd.read_csv(io.StringIO(csv_text))
    return {(q, m): v for q, m, v in zip(table["quantity"], table["model"], table["value"], strict=True)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two ``compare`` runs (text after the image 32 and 40) into their own folders and one SQLite file,
    and a ``sweep`` over text after the image (16 and 40): the folder layouts users report from."""
    root = tmp_path_factory.mktemp("runs")
    db = root / "both.db"
    tables_by_text = {}
    for text_after in (32, 40):
        result = invoke("compare", *TINY, *ARCHS, "--count", "none", "--text-after", text_after,
                        "--out", root / f"compare{text_after}", "--db", db, "--format", "csv")
        assert result.exit_code == 0, result.output
        tables_by_text[text_after] = table_values(result.stdout)
    result = invoke("sweep", "--vary", "text_after=16,40", *TINY, *ARCHS, "--out", root / "sweep", "--no-plots")
    assert result.exit_code == 0, result.output
    return root, db, tables_by_text


def same_numbers(got: dict, want: dict) -> None:
    common = set(got) & set(want)
    assert ("prefill FLOPs", "saisa") in common
    for key in common:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


# ----- several workloads --------------------------------------------------------------------------------
def test_a_sweep_folder_is_refused_until_where_picks_a_point(runs):
    root, _, compared = runs
    refused = invoke("report", root / "sweep", "--format", "csv")
    assert refused.exit_code == 2, refused.output
    text = said(refused)
    assert "text_after 16, 40" in text and "--where" in text and "--vary" in text
    picked = invoke("report", root / "sweep", "--where", "text_after=40", "--format", "csv")
    assert picked.exit_code == 0, picked.output
    same_numbers(table_values(picked.stdout), compared[40])  # the sweep's point = a compare at that workload


def test_a_db_fed_by_two_workloads_is_refused_until_where_picks_one(runs):
    _, db, compared = runs
    refused = invoke("report", db)
    assert refused.exit_code == 2, refused.output
    assert "text_after 32, 40" in said(refused) and "text_tokens 64, 72" in said(refused)
    for text_after in (32, 40):
        picked = invoke("report", db, "--where", f"text_after={text_after}", "--format", "csv")
        assert picked.exit_code == 0, picked.output
        same_numbers(table_values(picked.stdout), compared[text_after])


def test_two_compare_folders_of_different_workloads_are_refused(runs):
    root, _, _ = runs
    result = invoke("report", root / "compare32", root / "compare40")
    assert result.exit_code == 2 and "text_after 32, 40" in said(result), result.output


def test_vary_refuses_a_second_field_that_varies(runs, tmp_path):
    root, _, _ = runs
    result = invoke("compare", *TINY, *ARCHS, "--count", "none", "--batch-size", "2", "--text-after", "40",
                    "--out", tmp_path / "batch2", "--format", "csv")
    assert result.exit_code == 0, result.output
    mixed = invoke("report", root / "sweep", tmp_path / "batch2", "--vary", "text_after", "--out", tmp_path)
    assert mixed.exit_code == 2 and "batch_size 1, 2" in said(mixed), mixed.output
    assert not list(tmp_path.glob("cost_vs_*"))
    plotted = invoke("report", root / "sweep", "--vary", "text_after", "--out", tmp_path)
    assert plotted.exit_code == 0, plotted.output  # text_tokens follows text_after: one curve per model


@pytest.mark.parametrize("spec, message", [
    ("text_after=99", "--where text_after=99: no rows; text_after is 16, 40"),
    ("colour=red", "'colour' is not a field of the rows"),
    ("text_after", "expected FIELD=VALUE"),
])
def test_where_errors_name_what_is_there(runs, spec, message):
    root, _, _ = runs
    result = invoke("report", root / "sweep", "--where", spec)
    assert result.exit_code == 2 and message in said(result), result.output


def test_the_table_api_refuses_rows_of_two_workloads():
    rows = concat_rows(profile(arch, Workload(text_after=text_after, dtype="float32", device="cpu"), llm="tiny-llm",
                               vision="tiny-clip", measure="never", count=False)
                       for arch in ("llava", "saisa") for text_after in (8, 16))
    with pytest.raises(ConfigError, match=r"prefill_flops of llava .*differ in \['text_tokens', 'text_after'"):
        tables.comparison(rows, tables.compare_quantities(stages=()))


# ----- repeated and contradicting rows ------------------------------------------------------------------
def test_a_run_repeated_into_the_db_reads_as_one(runs, tmp_path):
    root, _, compared = runs
    db = tmp_path / "twice.db"
    for _ in range(2):
        assert invoke("compare", *TINY, *ARCHS, "--count", "none", "--db", db, "--format", "csv").exit_code == 0
    result = invoke("report", db, "--format", "csv")
    assert result.exit_code == 0, result.output
    same_numbers(table_values(result.stdout), compared[32])


def test_contradicting_rows_are_refused_naming_metric_and_files(runs, tmp_path):
    root, _, _ = runs
    rows = json.loads((root / "compare32" / "results.json").read_text())
    changed = 0
    for r in rows:  # the same run, as other code would have counted it
        if r["arch"] == "saisa" and r["metric"] == "prefill_flops":
            r["value"] *= 1.1
            changed += 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(rows))
    result = invoke("report", root / "compare32", other)
    assert result.exit_code == 2, result.output
    text = said(result)
    assert "conflicting rows: saisa prefill_flops" in text
    assert str(root / "compare32" / "results.json") in squeezed(result)
    assert str(other / "results.json") in squeezed(result)
    assert "timestamp" in text and f"{changed - 1} more" in text


# ----- files that are not (whole) result rows -----------------------------------------------------------
def per_arch_folder(root, name: str):
    """llava.json and saisa.json, one file per architecture (rows from the real profiler)."""
    folder = root / name
    for arch in ("llava", "saisa"):
        write_rows(profile(arch, Workload(dtype="float32", device="cpu"), llm="tiny-llm", vision="tiny-clip",
                           measure="never", count=False), folder / f"{arch}.json")
    return folder


def test_a_truncated_file_in_a_folder_is_an_error_not_a_smaller_table(tmp_path):
    folder = per_arch_folder(tmp_path, "archs")
    assert invoke("report", folder).exit_code == 0
    saisa = folder / "saisa.json"
    saisa.write_text(saisa.read_text()[: len(saisa.read_text()) // 2])
    result = invoke("report", folder)
    assert result.exit_code == 2, result.output
    assert "saisa.json" in said(result) and "not valid JSON" in said(result)
    with pytest.raises(ConfigError, match=r"saisa.json' is not valid JSON.*truncated"):
        read_results(folder)


def test_a_corrupt_file_is_named_with_exit_2(runs, tmp_path):
    root, _, _ = runs
    broken = tmp_path / "results.json"
    broken.write_text((root / "compare32" / "results.json").read_text()[:-40])
    result = invoke("report", broken)
    assert result.exit_code == 2, result.output
    assert f"'{broken}'isnotvalidJSON" in squeezed(result)  # the file, then the reason
    assert "failed" not in said(result) and "JSONDecodeError" not in said(result)


def cut_csv(root, tmp_path, keep: float):
    text = (root / "compare32" / "results.csv").read_text()
    path = tmp_path / "results.csv"
    path.write_text(text[: int(len(text) * keep)])
    return path, text


def test_a_truncated_csv_is_an_error_naming_the_line(runs, tmp_path):
    root, _, _ = runs
    path, text = cut_csv(root, tmp_path, 0.5)
    line = path.read_text().count("\n") + 1  # the line the cut falls in
    result = invoke("report", path)
    assert result.exit_code == 2, result.output
    assert f"line {line} has" in said(result) and "truncated" in said(result)


def test_a_csv_cut_in_its_last_field_is_an_error(runs, tmp_path):
    root, _, _ = runs
    text = (root / "compare32" / "results.csv").read_text()
    path = tmp_path / "results.csv"
    path.write_text(text[:-1])  # the newline after the last row: cut inside its last field
    with pytest.raises(ConfigError, match="does not end with a newline"):
        read_results(path)


def test_the_comparison_table_is_not_read_as_rows(runs):
    root, _, _ = runs
    result = invoke("report", root / "compare32" / "comparison.csv")
    assert result.exit_code == 2 and "is a comparison table" in said(result), result.output
    assert invoke("report", root / "compare32").exit_code == 0  # in its folder it is skipped, the rows are read


def test_a_non_numeric_value_is_an_error_naming_file_row_and_value(runs, tmp_path):
    root, _, _ = runs
    rows = pd.read_csv(root / "compare32" / "results.csv", dtype=str, keep_default_na=False)
    rows.loc[5, "value"] = "12,5e6"
    path = tmp_path / "edited.csv"
    rows.to_csv(path, index=False)
    with pytest.raises(ConfigError, match=rf"edited.csv': row 6 \({rows.loc[5, 'arch']} {rows.loc[5, 'metric']}\): "
                                          r"value '12,5e6' is not a number"):
        read_results(path)


def test_a_file_missing_schema_columns_is_an_error(runs, tmp_path):
    root, _, _ = runs
    rows = pd.read_csv(root / "compare32" / "results.csv", dtype=str, keep_default_na=False)
    path = tmp_path / "nostage.csv"
    rows.drop(columns=["stage", "text_after"]).to_csv(path, index=False)
    result = invoke("report", path)
    assert result.exit_code == 2, result.output
    assert "nostage.csv" in said(result) and "['stage', 'text_after']" in said(result)


def test_a_row_without_metric_is_an_error(runs, tmp_path):
    root, _, _ = runs
    rows = json.loads((root / "compare32" / "results.json").read_text())
    rows[3]["metric"] = None
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match="edited.json': row 4 has no 'metric'"):
        read_results(path)


def test_a_corrupt_sqlite_file_is_named_with_exit_2(runs, tmp_path):
    _, db, _ = runs
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database, just bytes" * 100)
    result = invoke("report", broken)
    assert result.exit_code == 2 and "broken.db" in said(result), result.output
    garbled = tmp_path / "garbled.db"
    shutil.copy(db, garbled)
    with sqlite3.connect(garbled) as con:
        con.execute("update results set value = 'lots' where rowid = 7")
    with pytest.raises(ConfigError, match=r"garbled.db': row 7 .*value 'lots' is not a number"):
        read_results(garbled)
