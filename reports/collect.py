"""Running the profiler for a comparison: each architecture at inference and at each training stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from mllm_bench.choices import COUNT_CHOICES as COUNT_CHOICES  # re-exported
from mllm_bench.choices import counts_stage
from mllm_bench.config import ConfigError
from mllm_bench.results import concat_rows
from mllm_bench.workload import Workload

ProfileFn = Callable[..., pd.DataFrame]
# Columns that differ between two profiler calls for the same number (not part of a row's identity).
VOLATILE = ("timestamp", "load_avg_1m")


def collect(
    archs: Sequence[str], workload: Workload, profile_fn: ProfileFn, llm: Any = "vicuna-7b",
    vision: Any = "clip-vit-l-336", options: dict[str, dict] | None = None,
    stages: Sequence[str] = ("pretrain", "finetune"), measure: str = "never",
    on_step: Callable[[str], None] | None = None, count: str = "all",
    before_counted: Callable[[], None] | None = None, **profile_kwargs: Any,
) -> pd.DataFrame:
    """Tidy rows of every architecture: one profiler call at ``inference`` and one per training stage.

    ``count``: which calls also count FLOPs on meta tensors (``all``, ``inference`` or ``none``); the
    others report the analytic model only (tests hold the two within 0.5% of each other). The calls that do
    not count run first, then ``before_counted()`` (e.g. waiting for :func:`mllm_bench.count_ahead.count_ahead`),
    then those that count; the rows come in architecture, then stage order either way.
    """
    if count not in COUNT_CHOICES:
        raise ConfigError(f"count must be one of {list(COUNT_CHOICES)}, got {count!r}")
    options = options or {}
    calls = [(arch, stage, counts_stage(count, stage)) for arch in archs for stage in ("inference", *stages)]
    frames: dict[int, pd.DataFrame] = {}
    waiting = before_counted
    for i in sorted(range(len(calls)), key=lambda i: calls[i][2]):  # the uncounted first, each in order
        arch, stage, counting = calls[i]
        if counting and waiting is not None:
            waiting()
            waiting = None
        frames[i] = profile_fn(arch, workload.replace(stage=stage), llm=llm, vision=vision,
                               options=options.get(arch) or None, measure=measure, count=counting, **profile_kwargs)
        if on_step:
            on_step(f"{arch} {stage}")
    return dedupe(concat_rows(frames[i] for i in range(len(calls))))


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """Drop rows repeated by several profiler calls (e.g. parameter counts reported at every stage)."""
    if df.empty:
        return df
    key = [c for c in df.columns if c not in VOLATILE]
    return df.loc[~df[key].astype(str).duplicated()].reset_index(drop=True)


def steps(archs: Sequence[str], stages: Sequence[str]) -> int:
    return len(archs) * (1 + len(stages))
