"""Result files: tidy rows as JSON or CSV (written atomically), appended to SQLite, read back."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mllm_bench.config import ConfigError

from .rows import normalise

SQLITE_TABLE = "results"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def rows_to_json(df: pd.DataFrame) -> str:
    """Tidy rows as a JSON list of objects (NaN as null)."""
    return json.dumps(json.loads(df.to_json(orient="records")), indent=1) + "\n"


def write_rows(df: pd.DataFrame, path: str | Path) -> Path:
    """Write rows as ``.json`` or ``.csv`` (chosen by the suffix), atomically."""
    path = Path(path)
    if path.suffix == ".json":
        return atomic_write_text(path, rows_to_json(df))
    if path.suffix == ".csv":
        return atomic_write_text(path, df.to_csv(index=False))
    raise ConfigError(f"result file {str(path)!r}: suffix must be .json or .csv")


def append_sqlite(df: pd.DataFrame, path: str | Path, table: str = SQLITE_TABLE) -> int:
    """Append rows to ``table`` of a SQLite file (created if missing; new columns added). Returns rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as con:
        exists = con.execute("select 1 from sqlite_master where type='table' and name=?", (table,)).fetchone()
        if exists:
            have = {r[1] for r in con.execute(f'pragma table_info("{table}")')}
            for col in df.columns:
                if col not in have:
                    con.execute(f'alter table "{table}" add column "{col}"')
        df.to_sql(table, con, if_exists="append", index=False)
    return len(df)


def read_rows(path: str | Path, table: str = SQLITE_TABLE) -> pd.DataFrame:
    """Rows from a ``.json``/``.csv`` result file, a SQLite file, or a folder of result files."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"result path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".csv") and not p.name.startswith("."))
        files = [p for p in files if _is_rows_file(p)]
        if not files:
            raise ConfigError(f"folder {str(path)!r} holds no result files (.json or .csv of tidy rows)")
        return concat_rows(read_rows(p) for p in files)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ConfigError(f"{str(path)!r} is not a JSON list of result rows")
        df = pd.DataFrame.from_records(data)
    elif path.suffix == ".csv":
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    elif path.suffix in SQLITE_SUFFIXES:
        with sqlite3.connect(path) as con:
            df = pd.read_sql(f'select * from "{table}"', con)
    else:
        raise ConfigError(f"result file {str(path)!r}: suffix must be .json, .csv or one of {list(SQLITE_SUFFIXES)}")
    if "metric" not in df.columns or "value" not in df.columns:
        raise ConfigError(f"{str(path)!r} holds no result rows (columns 'metric' and 'value' missing)")
    return normalise(df)


def _is_rows_file(path: Path) -> bool:
    if path.suffix == ".csv":
        return "metric" in path.open().readline()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "metric" in data[0]


def concat_rows(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
