"""Accuracies from evaluation files, joined to cost rows by architecture (``mllm-bench report --accuracy``).

An input is ``FILE`` or ``FILE:ARCH`` (repeatable):

* an lmms-eval results file (``*_results.json``: a top-level ``"results"`` object of task →
  ``{"metric,filter": value, "metric_stderr,filter": ..., "alias": ...}``, with ``"config"`` naming the
  evaluated ``model`` and ``model_args`` and ``"higher_is_better"`` per task and metric). It names a
  checkpoint, not one of this toolkit's architectures, so ``:ARCH`` is required: nothing is guessed from
  ``model_args``. Every numeric metric of every task becomes one score, ``TASK METRIC`` (the filter added
  when it is not ``none``); standard errors, aliases and non-numeric entries are skipped.
* a CSV with columns ``arch, benchmark, score`` (one score a line), or ``benchmark, score`` with ``FILE:ARCH``.
  CSV scores are taken as higher-is-better.

Scores are joined to the one model of their architecture in the cost rows (an architecture with several
models, e.g. two option sets, is refused as ambiguous); a score for an architecture the rows do not hold is
reported as unmatched and left out. No score is rescaled or made up; without an input there is no accuracy.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mllm_bench.config import ConfigError
from mllm_bench.schema import IDENTITY

from .rows import field_text
from .tables import Quantity

METRIC = "accuracy"
SOURCE = "reported"  # read from an evaluation file: not counted, analytic or measured here
UNIT = "score"
CSV_COLUMNS = ("arch", "benchmark", "score")


@dataclass(frozen=True)
class Score:
    """One accuracy of one architecture on one benchmark, and where it was read."""

    arch: str
    benchmark: str
    value: float
    origin: str
    higher_is_better: bool = True
    direction_stated: bool = False  # whether the file says which way is better (else higher is taken as better)


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:ARCH`` (a path that exists as given is never split)."""
    text = spec.strip()
    if Path(text).exists() or ":" not in text:
        return Path(text), None
    path, _, arch = text.rpartition(":")
    if not path or not arch.strip():
        raise ConfigError(f"--accuracy {spec!r}: expected FILE or FILE:ARCH")
    return Path(path), arch.strip()


def read_scores(spec: str) -> list[Score]:
    """The scores of one ``--accuracy`` input (see the module's docstring)."""
    path, arch = parse_spec(spec)
    if not path.is_file():
        raise ConfigError(f"--accuracy {spec}: {path} does not exist or is not a file")
    if path.suffix.lower() == ".json":
        return read_lmms_eval(path, arch)
    if path.suffix.lower() == ".csv":
        return read_csv_scores(path, arch)
    raise ConfigError(f"--accuracy {spec}: {path.name} is neither .json (lmms-eval results) nor .csv "
                      f"(columns {', '.join(CSV_COLUMNS)})")


LMMS_EVAL_SHAPE = ('an lmms-eval results file: a JSON object with a top-level "results" object of task → '
                   '{"metric,filter": number, ...}')


def _model_text(data: dict[str, Any]) -> str:
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    parts = [f"{key}={config[key]}" for key in ("model", "model_args") if config.get(key)]
    return ", ".join(parts)


def read_lmms_eval(path: Path, arch: str | None) -> list[Score]:
    """Scores of an lmms-eval results JSON, all assigned to ``arch`` (required)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--accuracy {path}: not readable as JSON ({err}); expected {LMMS_EVAL_SHAPE}") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ConfigError(f"--accuracy {path}: no top-level \"results\" object; expected {LMMS_EVAL_SHAPE}")
    model = _model_text(data)
    if arch is None:
        raise ConfigError(f"--accuracy {path}: an lmms-eval file names a checkpoint ({model or 'no config.model'}), "
                          f"not an architecture; name it as {path}:ARCH, e.g. {path}:llava")
    better = data.get("higher_is_better") if isinstance(data.get("higher_is_better"), dict) else {}
    origin = f"{path} (lmms-eval{'; ' + model if model else ''})"
    scores = []
    for task, metrics in data["results"].items():
        if not isinstance(metrics, dict):
            raise ConfigError(f"--accuracy {path}: results[{task!r}] is {type(metrics).__name__}, not an object of "
                              f"\"metric,filter\": number; expected {LMMS_EVAL_SHAPE}")
        task_better = better.get(task) if isinstance(better.get(task), dict) else {}
        for key, value in metrics.items():
            metric, _, filter_ = key.partition(",")
            if key == "alias" or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue  # "N/A", submission paths, nested breakdowns
            name = f"{task} {metric}" + (f" ({filter_})" if filter_ and filter_ != "none" else "")
            scores.append(Score(arch, name, float(value), origin, bool(task_better.get(metric, True)),
                                metric in task_better))
    if not scores:
        raise ConfigError(f"--accuracy {path}: \"results\" holds no numeric score; expected {LMMS_EVAL_SHAPE}")
    return scores


def read_csv_scores(path: Path, arch: str | None) -> list[Score]:
    """Scores of a CSV with ``arch, benchmark, score`` (``benchmark, score`` when ``arch`` is given)."""
    wanted = ("benchmark", "score") if arch else CSV_COLUMNS
    expected = f"a CSV with a header naming {', '.join(wanted)}" + ("" if arch else " (or FILE:ARCH and no arch "
                                                                                   "column)")
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            lines = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"--accuracy {path}: not readable as CSV ({err}); expected {expected}") from err
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ConfigError(f"--accuracy {path}: no column(s) {missing} (header: {header or 'none'}); "
                          f"expected {expected}")
    if arch and "arch" in header:
        raise ConfigError(f"--accuracy {path}:{arch}: the CSV has an arch column already; give FILE alone, or drop "
                          "the column")
    scores = []
    for number, line in enumerate(lines, start=2):
        extra = [v for v in line.get(None) or [] if (v or "").strip()]
        if extra:  # csv puts fields beyond the header under None: a decimal comma would cut the score short
            raise ConfigError(f"--accuracy {path} line {number}: more fields than the header ({extra!r} left over); "
                              "quote a value that holds a comma")
        row = {k.strip(): (v or "").strip() for k, v in line.items() if k is not None}
        name, raw, who = row.get("benchmark", ""), row.get("score", ""), arch or row.get("arch", "")
        if not name or not who:
            raise ConfigError(f"--accuracy {path} line {number}: {'benchmark' if not name else 'arch'} is blank; "
                              f"expected {expected}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--accuracy {path} line {number}: score {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"--accuracy {path} line {number}: score {raw!r} is not a finite number")
        scores.append(Score(who, name, value, f"{path} line {number}"))
    if not scores:
        raise ConfigError(f"--accuracy {path}: no scores (only a header); expected {expected}")
    return scores


# ----- joining -------------------------------------------------------------------------------------------
@dataclass
class Joined:
    """Accuracy rows for the table (one per model and benchmark), warnings for scores left out, and notes."""

    rows: pd.DataFrame
    warnings: list[str]
    notes: list[str]


def _unique(scores: Iterable[Score]) -> list[Score]:
    """``scores`` with repeats (same arch, benchmark and value) dropped; contradictions refused."""
    seen: dict[tuple[str, str], Score] = {}
    for s in scores:
        key = (s.arch, s.benchmark)
        if key in seen and seen[key].value != s.value:
            raise ConfigError(f"--accuracy: {s.arch} {s.benchmark} is {seen[key].value:g} in {seen[key].origin} and "
                              f"{s.value:g} in {s.origin}; give one of them")
        seen.setdefault(key, s)
    return list(seen.values())


def join(rows: pd.DataFrame, scores: Sequence[Score]) -> Joined:
    """Accuracy rows matching ``scores`` to the models of the cost ``rows`` by architecture."""
    models = rows[list(IDENTITY)].map(field_text).drop_duplicates()
    records, warnings, origins = [], [], {}
    for s in _unique(scores):
        mine = models[models["arch"] == s.arch]
        if mine.empty:
            warnings.append(f"unmatched accuracy: {s.arch} {s.benchmark} = {s.value:g} ({s.origin}): the rows hold no "
                            f"{s.arch} (they hold {', '.join(sorted(set(models['arch'])))}); not shown")
            continue
        if len(mine) > 1:
            listed = "; ".join(" ".join(v for v in r if v) for r in mine.itertuples(index=False, name=None))
            raise ConfigError(f"--accuracy: {s.arch} ({s.origin}) matches {len(mine)} models of the rows ({listed}); "
                              "keep one with --where (e.g. --where options=...) or --llm")
        key = mine.iloc[0].to_dict()
        records.append({**key, "metric": METRIC, "value": s.value, "unit": UNIT, "source": SOURCE,
                        "benchmark": s.benchmark, "higher_is_better": s.higher_is_better,
                        "direction_stated": s.direction_stated, "note": s.origin})
        origins.setdefault(s.origin.split(" line ")[0], set()).add(s.arch)
    notes = []
    if records:
        read = "; ".join(f"{origin} for {', '.join(sorted(archs))}" for origin, archs in origins.items())
        notes.append(f"Accuracy rows (source {SOURCE}): scores as the files give them, read from {read}. They are "
                     "joined by architecture name: they describe the checkpoint evaluated, which the cost rows' "
                     "configuration (LLM, vision tower, options) is taken to match. The 'vs' column of an accuracy "
                     "row is the relative change of the score, not a difference in points.")
        lower = sorted({r["benchmark"] for r in records if not r["higher_is_better"]})
        if lower:
            notes.append(f"Lower is better for: {', '.join(lower)} (the file's higher_is_better).")
        assumed = sorted({r["benchmark"] for r in records if not r["direction_stated"]})
        if assumed:
            notes.append(f"Higher is taken as better for: {', '.join(assumed)} (the file does not say which way is "
                         "better).")
    return Joined(pd.DataFrame.from_records(records), warnings, notes)


def benchmarks(accuracy: pd.DataFrame) -> list[str]:
    """The benchmarks of accuracy rows, in order of first appearance."""
    return list(dict.fromkeys(accuracy["benchmark"])) if len(accuracy) else []


def accuracy_quantities(accuracy: pd.DataFrame) -> list[Quantity]:
    """One table row per benchmark: ``accuracy: BENCHMARK`` (source ``reported``)."""
    return [Quantity(f"accuracy: {b}", METRIC, (("benchmark", b),), (SOURCE,)) for b in benchmarks(accuracy)]


def slug(text: str) -> str:
    """``text`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "benchmark"
