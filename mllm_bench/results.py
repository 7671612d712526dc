"""Tidy result rows (one metric per row) as a pandas DataFrame: schema, atomic JSON/CSV writers, readers, SQLite.

The columns are the contract between the profiler and the reports/CLI; :data:`COLUMNS` lists them
in order. Text fields not applicable to a row are ``""``; ``value`` is a float (NaN where unknown).
Frames may carry extra columns (a sweep adds ``status``, ``sweep_key``, ``error``); every writer and
reader here keeps them. JSON is always valid: NaN and infinities are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import ConfigError

IDENTITY = ("arch", "llm", "vision", "options")
MEASURE = ("metric", "value", "unit", "source", "scope", "convention", "component", "role", "stage", "phase")
WORKLOAD = ("batch_size", "images_per_sample", "image_size", "visual_tokens", "text_tokens", "text_before",
            "text_after", "generate_tokens", "context_len", "dtype", "device")
ENVIRONMENT = ("device_name", "attention_backend", "torch_version", "transformers_version", "mllm_bench_version",
               "git_commit", "timestamp")
# ``note`` says how a measured number was obtained (e.g. ``cpu_rss_peak_delta``); "" otherwise.
COLUMNS: tuple[str, ...] = IDENTITY + MEASURE + WORKLOAD + ENVIRONMENT + ("note",)
NUMERIC = ("value",)
# Workload counts: integers, or blank where a row has none (kept as read: "" in JSON, NaN in CSV/SQLite).
COUNTS = ("batch_size", "images_per_sample", "image_size", "visual_tokens", "text_tokens", "text_before",
          "text_after", "generate_tokens", "context_len")
TEXT_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERIC + COUNTS)
ROW_FILE_SUFFIXES = (".json", ".csv")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_TABLE = "results"
SOURCES = ("analytic", "counted", "measured")

METRIC_UNITS: dict[str, str] = {
    "params": "params", "trainable_params": "params",
    "prefill_flops": "FLOP", "decode_flops_per_token": "FLOP", "train_step_flops": "FLOP", "vision_flops": "FLOP",
    "kv_cache_bytes": "bytes", "weights_bytes": "bytes", "grads_bytes": "bytes", "optimizer_bytes": "bytes",
    "activations_bytes": "bytes", "train_peak_memory_bytes": "bytes", "peak_memory_bytes": "bytes",
    "reserved_memory_bytes": "bytes",
    "prefill_latency_s": "s", "decode_latency_s": "s", "train_step_latency_s": "s", "vision_encode_latency_s": "s",
    "latency_iqr_s": "s", "tokens_per_s": "tokens/s", "achieved_flops_per_s": "FLOP/s", "mfu": "ratio",
    "prefill_speedup_vs_flops": "ratio",
}


def make_row(base: dict[str, Any], metric: str, value: float, source: str, **fields: Any) -> dict[str, Any]:
    """One row: ``base`` (identity, workload, environment) + the metric, its unit and the given fields."""
    if metric not in METRIC_UNITS:
        raise ConfigError(f"unknown metric {metric!r}; metrics are {sorted(METRIC_UNITS)}")
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {list(SOURCES)}, got {source!r}")
    row = {c: "" for c in COLUMNS}
    row.update(base)
    row.update(fields)
    row.update(metric=metric, value=float(value), unit=METRIC_UNITS[metric], source=source)
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise ConfigError(f"unknown result column(s) {unknown}; columns are {list(COLUMNS)}")
    return row


def to_frame(rows: Iterable[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows as a DataFrame: :data:`COLUMNS` first and in order, then any extra columns (see :func:`normalise`)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(list(rows))
    return normalise(df)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with every schema column present (missing ones ""), blank text as "" (CSV/SQLite give NaN),
    ``value`` as float, schema columns first and extra columns after them (blank as "" when not numeric)."""
    out = df.reset_index(drop=True).copy()
    for col in COLUMNS:
        if col not in out.columns:
            out[col] = ""
    for col in TEXT_COLUMNS:
        out[col] = out[col].astype(object).where(out[col].notna(), "").astype(str)
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
def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` through a temporary file, fsync and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def rows_to_json(df: pd.DataFrame) -> str:
    """Rows as a JSON list of objects, every column kept; NaN/inf become ``null`` (always valid JSON)."""
    records = [{k: _json_value(v) for k, v in r.items()} for r in df.to_dict(orient="records")]
    return json.dumps(records, indent=1, allow_nan=False, default=str) + "\n"


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
def read_results(path: str | Path, table: str = SQLITE_TABLE) -> pd.DataFrame:
    """Rows from a ``.json``/``.csv`` file written here, a SQLite file's ``table``, or a folder of row files.

    A folder gives the rows of every ``.json``/``.csv`` file in it that holds tidy rows (others, such as a
    sweep's manifest or a comparison table, are skipped). Returns :func:`normalise` of the rows.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"result path {str(path)!r} does not exist")
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.suffix in ROW_FILE_SUFFIXES and not p.name.startswith(".")]
        written_as_json = {p.stem for p in files if p.suffix == ".json"}
        frames = []
        for p in files:
            if p.suffix == ".csv" and p.stem in written_as_json:
                continue  # the same rows, written in both formats (results.json and results.csv)
            try:
                frames.append(read_results(p))
            except (ConfigError, json.JSONDecodeError, UnicodeDecodeError):
                continue  # not tidy rows: a sweep's manifest, a comparison table
        if not frames:
            raise ConfigError(f"folder {str(path)!r} holds no result files (.json or .csv of tidy rows)")
        return concat_rows(frames)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ConfigError(f"{str(path)!r} is not a JSON list of result rows")
        df = pd.DataFrame.from_records(data)
    elif path.suffix == ".csv":
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(TEXT_COLUMNS, str))
    elif path.suffix in SQLITE_SUFFIXES:
        with sqlite3.connect(path) as con:
            if not con.execute("select 1 from sqlite_master where type='table' and name=?", (table,)).fetchone():
                raise ConfigError(f"SQLite file {str(path)!r} has no table {table!r}")
            df = pd.read_sql(f"select * from {_quote(table)}", con)
    else:
        raise ConfigError(f"result file {str(path)!r}: suffix must be one of "
                          f"{list(ROW_FILE_SUFFIXES + SQLITE_SUFFIXES)}")
    if "metric" not in df.columns or "value" not in df.columns:
        raise ConfigError(f"{str(path)!r} holds no result rows (columns 'metric' and 'value' missing)")
    return normalise(df)
