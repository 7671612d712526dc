"""Result files: kept as an alias of :mod:`mllm_bench.results`, the one implementation (import from there)."""

from __future__ import annotations

from mllm_bench.results import (
    SQLITE_SUFFIXES,
    SQLITE_TABLE,
    append_sqlite,
    atomic_write_text,
    concat_rows,
    rows_to_json,
    write_rows,
)
from mllm_bench.results import read_results as read_rows

__all__ = ["SQLITE_SUFFIXES", "SQLITE_TABLE", "append_sqlite", "atomic_write_text", "concat_rows", "read_rows",
           "rows_to_json", "write_rows"]
