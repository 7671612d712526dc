"""Tidy result rows (one metric per row), as a pandas DataFrame, with atomic JSON/CSV writers and SQLite.

The columns are the contract between the profiler and the reports/CLI; :data:`COLUMNS` lists them
in order. Text fields not applicable to a row are ``""``; ``value`` is a float.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
UNITS = ("params", "FLOP", "bytes", "s", "FLOP/s", "ratio", "tokens/s")
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


def to_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with exactly :data:`COLUMNS` (missing text fields are "")."""
    df = pd.DataFrame(list(rows))
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = ""
    df = df[list(COLUMNS)]
    df["value"] = df["value"].astype(float)
    return df


def _atomic_write(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomically write rows as a JSON list of objects."""
    return _atomic_write(path, json.dumps(df.to_dict(orient="records"), indent=1, default=str) + "\n")


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomically write rows as CSV."""
    return _atomic_write(path, df.to_csv(index=False))


def read_results(path: str | Path) -> pd.DataFrame:
    """Rows from a JSON or CSV file written here (or a SQLite file's ``results`` table)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"results file {str(p)!r} does not exist")
    if p.suffix == ".json":
        return to_frame(json.loads(p.read_text()))
    if p.suffix == ".csv":
        return to_frame(pd.read_csv(p, keep_default_na=False).to_dict(orient="records"))
    if p.suffix in (".db", ".sqlite", ".sqlite3"):
        with sqlite3.connect(p) as con:
            return to_frame(pd.read_sql("SELECT * FROM results", con).to_dict(orient="records"))
    raise ConfigError(f"results file {str(p)!r} must end in .json, .csv, .db or .sqlite")


def append_sqlite(df: pd.DataFrame, path: str | Path, table: str = "results") -> Path:
    """Append rows to ``table`` of a SQLite file (created when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as con:
        df[list(COLUMNS)].to_sql(table, con, if_exists="append", index=False)
    return path
