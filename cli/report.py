"""``mllm-bench report``: rebuild tables and plots from saved result files or a SQLite file."""

from __future__ import annotations

from pathlib import Path

import typer

from mllm_bench.config import ConfigError
from mllm_bench.results import concat_rows, read_results

from .common import Convention, Format, Opt, Scope, handle_errors, parse_archs, parse_stages
from .compare import emit


@handle_errors
def report(
    inputs: list[Path] = typer.Argument(..., help="Result files (.json/.csv), folders of them, or SQLite files."),
    arch: list[str] = typer.Option(None, "--arch", "-a", help="Only these architectures (default: all found)."),
    llm: str = typer.Option(None, help="Only rows of this LLM preset (needed when several are present)."),
    stage: list[str] = typer.Option(None, "--stage", help="Training stage(s) to show: pretrain, finetune."),
    baseline: str = typer.Option("llava", help="Architecture the 'vs' columns compare against."),
    scope: Scope = typer.Option(Scope.language),
    convention: Convention = typer.Option(Convention.dense),
    vary: str = typer.Option(None, help="Plot cost against this field (e.g. visual_tokens) instead of a table."),
    fmt: Opt.OutputFormat = Format.table,
    out: Path = typer.Option(None, help="Folder for the rebuilt tables (and plots)."),
    make_plots: bool = typer.Option(False, "--plots", help="Rebuild plots under OUT."),
) -> None:
    """Rebuild tables/plots from saved rows without profiling again."""
    rows = concat_rows(read_results(p) for p in inputs)
    if rows.empty:
        raise ConfigError("the input files hold no result rows")
    archs = parse_archs(arch, default=sorted(set(rows["arch"])))
    every = rows
    rows = rows[rows["arch"].isin(archs)]
    if llm:
        rows = rows[rows["llm"] == llm]
        if rows.empty:
            raise ConfigError(f"--llm {llm!r}: no rows; the inputs hold {sorted(set(every['llm']))}")
    stages = parse_stages(stage)
    if vary:
        from mllm_bench.reports import plots

        if vary not in rows.columns:
            raise ConfigError(f"--vary {vary!r} is not a column of the rows")
        folder = out or Path(".")
        written = plots.cost_curves(rows, vary, folder / f"cost_vs_{vary}", scope=scope.value,
                                    convention=convention.value)
        typer.echo("\n".join(str(p) for p in written))
        return
    if len(set(rows["llm"])) > 1 and not llm:
        raise ConfigError(f"rows hold several LLMs {sorted(set(rows['llm']))}; pick one with --llm "
                          "(or use --vary llm for a plot)")
    emit(rows, stages, baseline, scope.value, convention.value, fmt, out, make_plots, None,
         title=f"{', '.join(archs)} (from {len(inputs)} file(s))")
