"""``mllm-bench report``: rebuild tables and plots from saved result files or a SQLite file.

A table shows one workload. Rows of several (a sweep's folder, a SQLite file fed by runs on different
workloads) are refused, naming the fields that vary, until ``--where`` picks one; ``--vary`` plots a cost
against one field instead. Rows that repeat each other are dropped; rows that contradict each other
(the same number with two values) are refused, naming where each comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from mllm_bench.config import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from mllm_bench.reports.accuracy import Joined, Score

from .common import (
    CONVENTION_HELP,
    Convention,
    Format,
    Opt,
    Scope,
    err_console,
    handle_errors,
    parse_archs,
    parse_stages,
)
from .compare import emit

ORIGIN = "_origin"  # the file each row was read from (dropped before anything is printed or written)


@handle_errors
def report(
    inputs: list[Path] = typer.Argument(..., help="Result files (.json/.csv), folders of them, or SQLite files."),
    arch: list[str] = typer.Option(None, "--arch", "-a", help="Only these architectures (default: all found)."),
    llm: str = typer.Option(None, help="Only rows of this LLM preset (needed when several are present)."),
    where: list[str] = typer.Option(None, "--where", "-w", help="Only rows whose FIELD equals VALUE, FIELD=VALUE, "
                                    "repeatable (e.g. --where text_tokens=256): picks one workload of several."),
    stage: list[str] = typer.Option(None, "--stage", help="Training stage(s) to show: pretrain, finetune."),
    baseline: str = typer.Option("llava", help="Architecture the 'vs' columns compare against."),
    scope: Scope = typer.Option(Scope.language),
    convention: Convention = typer.Option(Convention.dense, help=CONVENTION_HELP),
    vary: str = typer.Option(None, help="Plot cost against this field (e.g. visual_tokens) instead of a table."),
    fmt: Opt.OutputFormat = Format.table,
    out: Path = typer.Option(None, help="Folder for the rebuilt tables (and plots)."),
    make_plots: bool = typer.Option(False, "--plots", help="Rebuild plots under OUT."),
    accuracy: list[str] = typer.Option(None, "--accuracy", help="Accuracies to join to the rows, repeatable: "
                                       "FILE.csv (columns arch, benchmark, score), FILE.csv:ARCH (benchmark, score) "
                                       "or FILE.json:ARCH (an lmms-eval results file, every score for ARCH)."),
) -> None:
    """Rebuild tables/plots from saved rows without profiling again."""
    from mllm_bench.results import concat_rows, read_result_files

    conditions = parse_where(where)
    scores = read_accuracy(accuracy)
    files = [pair for p in inputs for pair in read_result_files(p)]
    rows = concat_rows(frame.assign(**{ORIGIN: str(path)}) for path, frame in files)
    if rows.empty:
        raise ConfigError("the input files hold no result rows")
    archs = parse_archs(arch, default=sorted(set(rows["arch"])))
    every = rows
    rows = rows[rows["arch"].isin(archs)]
    if llm:
        rows = rows[rows["llm"] == llm]
        if rows.empty:
            raise ConfigError(f"--llm {llm!r}: no rows; the inputs hold {sorted(set(every['llm']))}")
    rows = apply_where(rows, conditions)
    stages = parse_stages(stage)
    if vary:
        from mllm_bench.reports import plots

        if scores:
            raise ConfigError("--accuracy joins scores to a table; it does not go with --vary (a cost curve)")

        if vary not in rows.columns or vary == ORIGIN:
            raise ConfigError(f"--vary {vary!r} is not a column of the rows")
        rows = one_workload(rows, over=(vary,))
        folder = out or Path(".")
        x, hue, note = vary, None, ""
        if vary == "image_sizes":  # text labels (WxH): placed by pixel count, as the sweep's plots place them
            from mllm_bench.reports.sweep import image_curve_rows

            rows, x, hue, note = image_curve_rows(rows, None, True, None)
        written = plots.cost_curves(rows, x, folder / f"cost_vs_{vary}", scope=scope.value,
                                    convention=convention.value, hue=hue, note=note)
        typer.echo("\n".join(str(p) for p in written))
        return
    if len(set(rows["llm"])) > 1 and not llm:
        raise ConfigError(f"rows hold several LLMs {sorted(set(rows['llm']))}; pick one with --llm "
                          "(or use --vary llm for a plot)")
    rows = one_workload(rows)
    joined = join_accuracy(rows, scores) if scores else None
    emit(rows, stages, baseline, scope.value, convention.value, fmt, out, make_plots, None,
         title=f"{', '.join(archs)} (from {len(files)} file(s))", extra_notes=joined.notes if joined else (),
         accuracy=joined.rows if joined else None)


def read_accuracy(specs: Sequence[str] | None) -> list[Score]:
    """``--accuracy`` inputs read and checked (before any rows are): their scores
    (:func:`mllm_bench.reports.accuracy.read_scores`)."""
    if not specs:
        return []
    from mllm_bench.reports.accuracy import read_scores

    return [score for spec in specs for score in read_scores(spec)]


def join_accuracy(rows: pd.DataFrame, scores: list[Score]) -> Joined:
    """The scores joined to ``rows``; each score left out is named on stderr."""
    from mllm_bench.reports.accuracy import join

    joined = join(rows, scores)
    for line in joined.warnings:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    return joined


def parse_where(specs: Sequence[str] | None) -> dict[str, str]:
    """``--where FIELD=VALUE`` (repeatable) → {FIELD: VALUE}."""
    out: dict[str, str] = {}
    for spec in specs or ():
        field, sep, value = spec.partition("=")
        field, value = field.strip(), value.strip()
        if not sep or not field:
            raise ConfigError(f"--where {spec!r}: expected FIELD=VALUE, e.g. --where text_tokens=256")
        if field in out and out[field] != value:
            raise ConfigError(f"--where {field}: given twice ({out[field]!r} and {value!r}); a table shows one value")
        out[field] = value
    return out


def apply_where(rows: pd.DataFrame, conditions: dict[str, str]) -> pd.DataFrame:
    """The rows whose every ``--where`` field equals its value (a blank field matches nothing)."""
    from mllm_bench.reports.rows import field_text

    for field, value in conditions.items():
        if field not in rows.columns or field == ORIGIN:
            columns = [c for c in rows.columns if c != ORIGIN]
            raise ConfigError(f"--where {field}={value}: {field!r} is not a field of the rows; fields: {columns}")
        text = rows[field].map(field_text)
        matched = rows[text == value]
        if matched.empty:
            present = sorted(set(text) - {""})
            raise ConfigError(f"--where {field}={value}: no rows; {field} is "
                              f"{', '.join(present[:12]) + ('…' if len(present) > 12 else '') if present else 'blank'}"
                              " in the rows")
        rows = matched
    return rows


def one_workload(rows: pd.DataFrame, over: Sequence[str] = ()) -> pd.DataFrame:
    """``rows`` when they hold one workload (per value of the ``over`` fields), repeated rows dropped;
    otherwise a ConfigError naming the fields that vary and how to pick one."""
    from mllm_bench.reports.rows import SHARED_WORKLOAD, drop_repeated_rows, varying_workload, workloads

    varying = varying_workload(rows, over)
    if len(varying) > 1:
        varying.pop("context_len", None)  # follows from the others
    if varying:
        fields = [f for f in varying if f in SHARED_WORKLOAD] or list(varying)
        found = workloads(rows, fields)
        listed = "; ".join(f"{f} {', '.join(v)}" for f, v in varying.items())
        first = fields[0]
        plot = "" if over else f"; to plot cost against a field, use --vary {first} (or run `mllm-bench sweep`)"
        raise ConfigError(f"the rows hold {len(found) if '…' not in found else 'many'} workloads and a "
                          f"{'curve' if over else 'table'} shows one at a time: {listed}. Pick one with "
                          f"--where FIELD=VALUE (repeatable), e.g. --where {first}={varying[first][0]}{plot}. "
                          f"Workloads: {' | '.join(found)}")
    origin = rows[ORIGIN].tolist() if ORIGIN in rows.columns else None
    try:
        rows = drop_repeated_rows(rows.reset_index(drop=True), origin)
    except ConfigError as err:
        raise ConfigError(f"{err}: keep one run's rows (pass its file, or --where on a field that tells the "
                          "runs apart, e.g. git_commit or device_name)") from err
    return rows.drop(columns=[ORIGIN], errors="ignore")
