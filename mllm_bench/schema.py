"""The tidy result rows' schema: one metric per row, :data:`COLUMNS` in order, and :func:`make_row`.

The columns are the contract between the profiler and the reports/CLI. Text fields not applicable to a
row are ``""``; ``value`` is a float (NaN where unknown). Plain Python: the profiler makes rows without
pandas (:mod:`mllm_bench.results` holds the DataFrame side: writers, readers, SQLite).
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError

IDENTITY = ("arch", "llm", "vision", "options")
MEASURE = ("metric", "value", "unit", "source", "scope", "convention", "component", "role", "stage", "phase")
# ``image_size``: the vision tower's px; ``image_sizes``: the images' original sizes, ``WxH`` (``;`` between images).
WORKLOAD = ("batch_size", "images_per_sample", "image_size", "image_sizes", "visual_tokens", "text_tokens",
            "text_before", "text_after", "generate_tokens", "context_len", "dtype", "device")
# ``load_avg_1m``/``cpu_count``: the host's 1-minute load average and CPU count when the row was made ("" on meta).
ENVIRONMENT = ("device_name", "attention_backend", "torch_version", "transformers_version", "mllm_bench_version",
               "git_commit", "load_avg_1m", "cpu_count", "timestamp")
# ``note`` says how a measured number was obtained (e.g. ``cpu_rss_peak_delta``); "" otherwise.
COLUMNS: tuple[str, ...] = IDENTITY + MEASURE + WORKLOAD + ENVIRONMENT + ("note",)
NUMERIC = ("value",)
# Workload counts: integers, or blank where a row has none (kept as read: "" in JSON, NaN in CSV/SQLite).
COUNTS = ("batch_size", "images_per_sample", "image_size", "visual_tokens", "text_tokens", "text_before",
          "text_after", "generate_tokens", "context_len")
TEXT_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERIC + COUNTS)
SOURCES = ("analytic", "counted", "measured")

METRIC_UNITS: dict[str, str] = {
    "params": "params", "trainable_params": "params",
    "prefill_flops": "FLOP", "decode_flops_per_token": "FLOP", "train_step_flops": "FLOP", "vision_flops": "FLOP",
    "kv_cache_bytes": "bytes", "weights_bytes": "bytes", "grads_bytes": "bytes", "optimizer_bytes": "bytes",
    "activations_bytes": "bytes", "train_peak_memory_bytes": "bytes", "peak_memory_bytes": "bytes",
    "reserved_memory_bytes": "bytes",
    "prefill_latency_s": "s", "decode_latency_s": "s", "train_step_latency_s": "s", "vision_encode_latency_s": "s",
    "latency_iqr_s": "s", "tokens_per_s": "tokens/s", "achieved_flops_per_s": "FLOP/s", "mfu": "ratio",
    "prefill_speedup_vs_flops": "ratio", "equivalent_visual_tokens": "tokens", "layer_avg_visual_tokens": "tokens",
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
