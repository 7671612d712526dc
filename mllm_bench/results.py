"""Tidy result rows (one metric per row) as a pandas DataFrame: atomic JSON/CSV writers, readers, SQLite.

The rows follow :mod:`mllm_bench.schema`: :data:`COLUMNS` in order, text fields not applicable to a row
``""``, ``value`` a float (NaN where unknown). Frames may carry extra columns (a sweep adds ``status``,
``sweep_key``, ``error``); every writer and reader here keeps them. JSON is always valid: NaN and
infinities are written as ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .atomic import atomic_write_text
from .config import ConfigError
from .schema import COLUMNS, COUNTS, IDENTITY, MEASURE, NUMERIC, TEXT_COLUMNS, WORKLOAD

ROW_FILE_SUFFIXES = (".json", ".csv")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_TABLE = "results"


def to_frame(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows as a DataFrame: :data:`COLUMNS` first and in order, then any extra columns (see :func:`normalise`)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(list(rows))
    return normalise(df)


_TEXT_DTYPE = pd.Series([""], dtype=object).astype(str).dtype  # what text columns become (pandas 3: ``str``)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with every schema column present (missing ones ""), blank text as "" (CSV/SQLite give NaN),
    ``value`` as float, schema columns first and extra columns after them (blank as "" when not numeric)."""
    out = df.reset_index(drop=True).copy()
    for col in COLUMNS:
        if col not in out.columns:
            out[col] = ""
    # columns that are text already, with nothing blank (the profiler's rows), are left as they are: converting
    # every one costs ~10 ms a frame
    text = [c for c in TEXT_COLUMNS if out[c].dtype != _TEXT_DTYPE or out[c].isna().any()]
    if text:
        out[text] = out[text].astype(object).fillna("").astype(str)
    if out["value"].dtype != np.float64:
        out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(float)
    extra = [c for c in out.columns if c not in COLUMNS]
    for col in extra:
        if not pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].where(out[col].notna(), "")
    return out[list(COLUMNS) + extra]


def concat_rows(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """The non-empty frames one after another (an empty frame when there are none)."""
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ----- writing -----------------------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    if type(value) in (str, int, bool):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def rows_to_json(df: pd.DataFrame) -> str:
    """Rows as a JSON list of objects, one row a line, every column kept; NaN/inf become ``null`` (always valid
    JSON)."""
    columns = [str(c) for c in df.columns]
    values = [df[c].tolist() for c in df.columns]  # Python scalars, as to_dict gives
    records = [dict(zip(columns, map(_json_value, row), strict=True)) for row in zip(*values, strict=True)]
    if not records:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, allow_nan=False, default=str) for r in records) + "\n]\n"


def json_rows(rows: pd.DataFrame | Sequence[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    """Rows with ``fields`` set on each (new columns after the others), as JSON values: what
    ``json.loads(rows_to_json(frame.assign(**fields)))`` gives for their frame. Row dicts that hold exactly
    the schema's columns (the profiler's rows) are converted one by one, without a DataFrame (about 15 ms a
    sweep point); anything else goes through one."""
    if isinstance(rows, pd.DataFrame):
        return json.loads(rows_to_json(rows.assign(**fields)))
    if any(row.keys() != _COLUMN_SET for row in rows):
        return json.loads(rows_to_json(to_frame(rows).assign(**fields)))
    out = []
    for row in rows:
        record = {c: _json_cell(c, row[c]) for c in COLUMNS}
        record.update((k, _json_value(v)) for k, v in fields.items())
        out.append(record)
    return out


_COLUMN_SET = frozenset(COLUMNS)
_TEXT_SET = frozenset(TEXT_COLUMNS)


def _json_cell(column: str, value: Any) -> Any:
    """A schema cell as :func:`normalise` then :func:`rows_to_json` make it: text as str ("" when blank),
    ``value`` as a float (null when not finite or not a number), counts as they are."""
    if column in _TEXT_SET:
        if type(value) is str:
            return value
        return "" if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) \
            else str(value)
    if column == "value":
        number = pd.to_numeric(value, errors="coerce") if not isinstance(value, (int, float)) else value
        return _json_value(float(number))
    return _json_value(value)


def write_json(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomically write rows as a JSON list of objects (see :func:`rows_to_json`)."""
    return atomic_write_text(path, rows_to_json(df))


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomically write rows as CSV (NaN as an empty field)."""
    return atomic_write_text(path, df.to_csv(index=False))


def write_rows(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomically write rows as ``.json`` or ``.csv``, chosen by the suffix."""
    path = Path(path)
    if path.suffix == ".json":
        return write_json(df, path)
    if path.suffix == ".csv":
        return write_csv(df, path)
    raise ConfigError(f"result file {str(path)!r}: suffix must be one of {list(ROW_FILE_SUFFIXES)}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def append_sqlite(df: pd.DataFrame, path: str | Path, table: str = SQLITE_TABLE) -> int:
    """Append rows to ``table`` of a SQLite file (created when missing; columns it lacks are added).

    Returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as con:
        have = {r[1] for r in con.execute(f"pragma table_info({_quote(table)})")}
        if have:
            for col in df.columns:
                if col not in have:
                    con.execute(f"alter table {_quote(table)} add column {_quote(str(col))}")
        df.to_sql(table, con, if_exists="append", index=False)
    return len(df)


# ----- reading -----------------------------------------------------------------------------------------
# Columns every result file written here has (``context_len`` and the environment may be absent: a sweep's
# out-of-memory rows carry neither; ``image_sizes``: files written before it lack it); a file lacking one is
# not result rows.
REQUIRED_COLUMNS: tuple[str, ...] = IDENTITY + MEASURE + tuple(c for c in WORKLOAD
                                                                if c not in ("context_len", "image_sizes"))
# Fields no row may leave blank.
REQUIRED_FIELDS = ("arch", "metric")
# Columns of the comparison table that ``compare --out`` writes beside the rows (comparison.csv).
COMPARISON_TABLE_COLUMNS = ("quantity", "model", "vs_baseline")


def read_results(path: str | Path, table: str = SQLITE_TABLE) -> pd.DataFrame:
    """Rows from a ``.json``/``.csv`` file written here, a SQLite file's ``table``, or a folder of row files.

    A folder gives the rows of every ``.json``/``.csv`` file in it (see :func:`read_result_files`).
    Returns :func:`normalise` of the rows. A file that does not parse, is cut short, lacks the schema's
    columns or holds a non-numeric value is a :class:`ConfigError` naming the file and what is wrong.
    """
    return concat_rows(frame for _, frame in read_result_files(path, table))


def read_result_files(path: str | Path, table: str = SQLITE_TABLE) -> list[tuple[Path, pd.DataFrame]]:
    """(file, normalised rows) for ``path``: one file, or each row file of a folder.

    In a folder, the files mllm-bench writes beside its rows and that hold none are skipped: a JSON
    object (a sweep's manifest), a CSV without a ``metric`` column (the paper's tables) and the comparison
    table (``comparison.csv``); a ``.csv`` beside a ``.json`` of the same name holds the same rows and is
    skipped too. Every other file must be valid result rows.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"result path {str(path)!r} does not exist")
    if not path.is_dir():
        return [(path, _read_file(path, table, in_folder=False))]
    files = [p for p in sorted(path.iterdir())
             if p.is_file() and p.suffix in ROW_FILE_SUFFIXES and not p.name.startswith(".")]
    written_as_json = {p.stem for p in files if p.suffix == ".json"}
    out = []
    for p in files:
        if p.suffix == ".csv" and p.stem in written_as_json:
            continue  # the same rows, written in both formats (results.json and results.csv)
        frame = _read_file(p, table, in_folder=True)
        if frame is not None:
            out.append((p, frame))
    if not out:
        raise ConfigError(f"folder {str(path)!r} holds no result files (.json or .csv of tidy rows)")
    return out


def _read_file(path: Path, table: str, in_folder: bool) -> pd.DataFrame | None:
    """The checked rows of one file; ``None`` for a file in a folder that holds something else (see above)."""
    name = repr(str(path))
    if path.suffix == ".json":
        data = _parse_json(path)
        if not isinstance(data, list):
            if in_folder and isinstance(data, dict):
                return None  # a manifest (sweep.json), not rows
            raise ConfigError(f"{name} is not a JSON list of result rows (it holds a {type(data).__name__})")
        bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ConfigError(f"{name}: row {bad + 1} is not a JSON object of column: value "
                              f"(got {type(data[bad]).__name__})")
        df = pd.DataFrame.from_records(data)
    elif path.suffix == ".csv":
        df = _parse_csv(path, in_folder)
        if df is None:
            return None
    elif path.suffix in SQLITE_SUFFIXES:
        df = _read_sqlite(path, table)
    else:
        raise ConfigError(f"result file {name}: suffix must be one of {list(ROW_FILE_SUFFIXES + SQLITE_SUFFIXES)}")
    columns = set(df.columns)
    if set(COMPARISON_TABLE_COLUMNS) <= columns:
        if in_folder:
            return None
        raise ConfigError(f"{name} is a comparison table (written by `mllm-bench compare --out`), not result "
                          "rows; report reads the results.json (or results.csv) beside it")
    if "metric" not in columns and in_folder and path.suffix == ".csv":
        return None  # a table written beside the rows (e.g. the paper's train_budget.csv)
    if not len(df):
        raise ConfigError(f"{name} holds no result rows (it is empty)")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if "metric" in missing or "value" in missing:
        raise ConfigError(f"{name} holds no result rows (column(s) {[c for c in ('metric', 'value') if c in missing]}"
                          " missing)")
    if missing:
        raise ConfigError(f"{name} lacks the result column(s) {missing}: not result rows written by mllm-bench "
                          "(or edited since)")
    _check_fields(name, df)
    return normalise(df)


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text (byte {err.start}): not a result file") from err
    except OSError as err:
        raise ConfigError(f"{str(path)!r} cannot be read: {err.strerror or err}") from err


def _parse_json(path: Path) -> Any:
    text = _text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = "; it stops mid-way (truncated?)" if not text.rstrip().endswith(("]", "}")) else ""
        raise ConfigError(f"{str(path)!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
                          f"{hint}") from err


def _parse_csv(path: Path, in_folder: bool) -> pd.DataFrame | None:
    """The CSV's rows, after checking that every line has the header's fields and the file ends with a newline."""
    text = _text(path)
    name = repr(str(path))
    if not text.strip():
        raise ConfigError(f"{name} is empty: no header, no result rows")
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
        if in_folder and "metric" not in header:
            return None  # a table written beside the rows, checked no further
        for record in reader:
            if record and len(record) != len(header):
                raise ConfigError(f"{name}: line {reader.line_num} has {len(record)} field(s), the header has "
                                  f"{len(header)}: the file is truncated or malformed")
    except csv.Error as err:
        raise ConfigError(f"{name}: not valid CSV at line {reader.line_num}: {err}") from err
    if not text.endswith(("\n", "\r")):
        raise ConfigError(f"{name} does not end with a newline: its last row is cut short (truncated file?)")
    try:
        return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""],
                           dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except (ValueError, pd.errors.ParserError) as err:
        raise ConfigError(f"{name}: not readable as CSV rows: {err}") from err


def _read_sqlite(path: Path, table: str) -> pd.DataFrame:
    try:
        with sqlite3.connect(path) as con:
            if not con.execute("select 1 from sqlite_master where type='table' and name=?", (table,)).fetchone():
                raise ConfigError(f"SQLite file {str(path)!r} has no table {table!r}")
            return pd.read_sql(f"select * from {_quote(table)}", con)
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable SQLite file: {err}") from err


def _blank(values: pd.Series) -> pd.Series:
    """True where a field is empty: None, NaN or only whitespace."""
    return values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())


def _check_fields(name: str, df: pd.DataFrame) -> None:
    """Every row names its arch and metric; ``value`` and the workload counts are numbers (or blank)."""
    for col in REQUIRED_FIELDS:
        blank = _blank(df[col].astype(object)).to_numpy().nonzero()[0]
        if len(blank):
            more = f" ({len(blank)} rows in all)" if len(blank) > 1 else ""
            raise ConfigError(f"{name}: row {blank[0] + 1} has no {col!r}{more}: a truncated or hand-edited file?")
    for col in NUMERIC + COUNTS:
        if col not in df.columns:
            continue
        values = df[col].astype(object)
        is_bool = values.map(lambda v: isinstance(v, bool | np.bool_))
        numeric = pd.to_numeric(values.where(~is_bool), errors="coerce")
        bad = (is_bool | (numeric.isna() & ~_blank(values))).to_numpy().nonzero()[0]
        if len(bad):
            i = bad[0]
            row = df.iloc[i]
            raise ConfigError(f"{name}: row {i + 1} ({row['arch']} {row['metric']}): {col} {values.iloc[i]!r} is not "
                              "a number")
