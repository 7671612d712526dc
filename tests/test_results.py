"""Result files: NaN written as valid JSON, extra (sweep) columns kept by every writer, reader and SQLite."""

from __future__ import annotations

import json
import math
import sqlite3

import pandas as pd
import pytest

from mllm_bench.config import ConfigError
from mllm_bench.results import (
    append_sqlite,
    json_rows,
    read_results,
    rows_to_json,
    to_frame,
    write_rows,
)
from mllm_bench.schema import COLUMNS, make_row
from mllm_bench.workload import Workload


def strict_json(text: str):
    """``json.loads`` that refuses NaN/Infinity (which are not JSON)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))


def rows() -> pd.DataFrame:
    base = {"arch": "llava", "llm": "tiny-llm", "batch_size": 1, "git_commit": "0012345"}
    ok = to_frame([make_row(base, "prefill_flops", 1.5e9, "counted", scope="language"),
                   make_row(base, "mfu", float("nan"), "measured"),
                   make_row(base, "tokens_per_s", float("inf"), "measured")])
    ok = ok.assign(status="ok", sweep_key="k1", error="")
    oom = pd.DataFrame([{"arch": "saisa", "metric": "oom", "value": 1.0, "status": "oom", "sweep_key": "k2",
                         "error": "OutOfMemoryError: CUDA out of memory"}])
    return pd.concat([ok, oom], ignore_index=True)


def test_json_is_valid_with_nan_and_inf():
    data = strict_json(rows_to_json(rows()))
    assert [r["value"] for r in data] == [1.5e9, None, None, 1.0]
    assert data[3]["metric"] == "oom" and data[3]["error"].startswith("OutOfMemoryError")


def test_json_has_one_row_a_line_with_python_values():
    import numpy as np

    frame = pd.DataFrame({"arch": ["llava", "saisa"], "n": [np.int64(3), np.int64(4)], "x": [0.5, np.nan],
                          "flag": [True, False]})
    lines = rows_to_json(frame).splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 4
    assert json.loads(lines[1].rstrip(",")) == {"arch": "llava", "n": 3, "x": 0.5, "flag": True}
    assert json.loads(lines[2]) == {"arch": "saisa", "n": 4, "x": None, "flag": False}
    assert rows_to_json(frame.iloc[:0]) == "[]\n"


@pytest.mark.parametrize("name", ["r.json", "r.csv"])
def test_files_keep_extra_columns_and_nan(tmp_path, name):
    path = write_rows(rows(), tmp_path / name)
    if name.endswith(".json"):
        strict_json(path.read_text())
    back = read_results(path)
    assert list(back.columns[: len(COLUMNS)]) == list(COLUMNS)  # schema first, extras after
    assert back["status"].tolist() == ["ok", "ok", "ok", "oom"] and back["sweep_key"].tolist()[-1] == "k2"
    assert back["error"].tolist()[-1] == "OutOfMemoryError: CUDA out of memory"
    assert back["metric"].tolist() == ["prefill_flops", "mfu", "tokens_per_s", "oom"]
    assert back["value"].iloc[0] == 1.5e9 and math.isnan(back["value"].iloc[1])
    assert not math.isfinite(back["value"].iloc[2])  # inf: null in JSON (NaN), inf in CSV
    assert back["git_commit"].tolist()[0] == "0012345"  # text columns stay text (no leading zeros lost)
    assert back["scope"].tolist() == ["language", "", "", ""]  # blanks are "" again, not NaN
    assert [p.name for p in tmp_path.iterdir()] == [name]  # written atomically: no temporary file left


def test_sqlite_append_adds_columns(tmp_path):
    db = tmp_path / "r.db"
    plain = rows().drop(columns=["status", "sweep_key", "error"]).iloc[:3]
    assert append_sqlite(plain, db) == 3
    assert append_sqlite(rows(), db) == 4  # the table gains status, sweep_key, error
    with sqlite3.connect(db) as con:
        cols = [r[1] for r in con.execute("pragma table_info(results)")]
    assert {"status", "sweep_key", "error"} <= set(cols)
    back = read_results(db)
    assert len(back) == 7 and back["status"].tolist() == ["", "", "", "ok", "ok", "ok", "oom"]
    assert math.isnan(back["value"].iloc[1])  # NaN stored as NULL, read back as NaN
    with pytest.raises(ConfigError, match="no table 'other'"):
        read_results(db, table="other")


def test_folder_reads_only_row_files(tmp_path):
    write_rows(rows(), tmp_path / "results.json")
    (tmp_path / "sweep.json").write_text('{"vary": {}}')  # a manifest, not rows
    (tmp_path / "comparison.csv").write_text("quantity,arch,value\nprefill FLOPs,llava,1\n")  # a table
    back = read_results(tmp_path)
    assert len(back) == 4 and "status" in back.columns
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no result files"):
        read_results(tmp_path / "empty")


def test_bad_files(tmp_path):
    (tmp_path / "dict.json").write_text('{"metric": "params"}')
    with pytest.raises(ConfigError, match="not a JSON list"):
        read_results(tmp_path / "dict.json")
    (tmp_path / "table.csv").write_text("quantity,value\nx,1\n")
    with pytest.raises(ConfigError, match=r"holds no result rows \(column\(s\) \['metric'\] missing"):
        read_results(tmp_path / "table.csv")
    with pytest.raises(ConfigError, match="suffix must be one of"):
        write_rows(rows(), tmp_path / "r.txt")
    with pytest.raises(ConfigError, match="does not exist"):
        read_results(tmp_path / "missing.json")


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    from mllm_bench.atomic import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_normalise_gives_every_text_column_as_converting_all_of_them_would():
    """Text columns already text are left alone; the result equals converting every one (blank → "")."""
    from mllm_bench.results import normalise
    from mllm_bench.schema import COLUMNS, TEXT_COLUMNS

    base = {c: "x" for c in COLUMNS} | {"value": 1.0, "batch_size": 1}
    frames = [pd.DataFrame([base, base]),                                        # text already
              pd.DataFrame([base, {**base, "scope": None, "note": math.nan}]),  # blanks in text columns
              pd.DataFrame([base, {**base, "load_avg_1m": 0.5, "cpu_count": 2}]),  # numbers in text columns
              pd.DataFrame([base]).astype({"arch": object, "value": object})]
    for df in frames:
        expected = df.copy()
        expected[list(TEXT_COLUMNS)] = expected[list(TEXT_COLUMNS)].astype(object).fillna("").astype(str)
        expected["value"] = pd.to_numeric(expected["value"]).astype(float)
        pd.testing.assert_frame_equal(normalise(df), expected[list(COLUMNS)])


def _frame_path(rows, **fields):
    """What a sweep point's record held before json_rows: the rows' frame, assigned, through JSON."""
    return json.loads(rows_to_json(to_frame(rows).assign(**fields)))


@pytest.mark.parametrize("stage", ["inference", "finetune"])
def test_json_rows_of_profiler_rows_equal_their_frame_through_json(stage) -> None:
    from mllm_bench.profile import profile_rows
    from mllm_bench.registry import architecture_names, architecture_spec

    fields = {"status": "ok", "error": "", "vision": "a-vision"}
    for arch in architecture_names():
        rows = profile_rows(arch, Workload(text_before=3, text_after=4, stage=stage), "tiny-llm", "tiny-clip",
                            dict(architecture_spec(arch).tiny_options) or None)
        got = json_rows(rows, **fields)
        assert got == _frame_path(rows, **fields), arch
        assert [list(r) for r in got] == [list(r) for r in _frame_path(rows, **fields)]  # column order too


def test_json_rows_make_cells_as_the_frame_does() -> None:
    import numpy as np

    base = make_row({"arch": "llava"}, "params", 1.0, "counted")
    odd = [
        {**base, "value": float("nan"), "note": None, "load_avg_1m": 0.5, "cpu_count": 2},
        {**base, "value": float("inf"), "visual_tokens": 576, "text_tokens": "", "git_commit": float("nan")},
        {**base, "value": np.float32(2.5), "batch_size": np.int64(3), "device_name": np.str_("cpu")},
        {**base, "value": "7", "context_len": 5.0, "image_sizes": 336},
    ]
    for rows in (odd, odd[:1], odd[1:3]):
        assert json_rows(rows, status="oom") == _frame_path(rows, status="oom")
    partial = [{k: v for k, v in base.items() if k != "note"}]  # not the whole schema: through a frame
    assert json_rows(partial, status="ok") == _frame_path(partial, status="ok")
    frame = to_frame([base])
    assert json_rows(frame, status="ok") == json.loads(rows_to_json(frame.assign(status="ok")))
