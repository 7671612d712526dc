"""``mllm-bench sweep``: vary one or two fields across architectures; resumable."""

from __future__ import annotations

from pathlib import Path

import typer
from mllm_bench.reports.sweep import (
    VARY_FIELDS,
    expand,
    parse_vary,
    run_sweep,
    visual_tokens_note,
    write_sweep,
)

from mllm_bench.results import append_sqlite
from mllm_bench.workload import PAPER_WORKLOAD

from .common import (
    Convention,
    Measure,
    Opt,
    Scope,
    err_console,
    get_profile,
    handle_errors,
    make_workload,
    parse_models,
    progress_bar,
)

VARY_HELP = (f"FIELD=v1,v2,... (one or two; fields: {', '.join(VARY_FIELDS)}). visual_tokens=N uses N/576 images "
             "when N is a multiple of the per-image count (2304 = 4 images at 336 px, not one 672-px image), "
             "else one image whose patch grid gives N (N a square).")


@handle_errors
def sweep(
    vary: list[str] = typer.Option(..., "--vary", "-v", help=VARY_HELP),
    arch: Opt.Archs = None,
    llm: str = typer.Option("vicuna-7b", help="LLM preset (unless varied)."),
    vision: Opt.Vision = "clip-vit-l-336",
    option: Opt.ArchOptions = None,
    batch_size: Opt.BatchSize = PAPER_WORKLOAD.batch_size,
    images_per_sample: Opt.Images = PAPER_WORKLOAD.images_per_sample,
    text_before: Opt.TextBefore = PAPER_WORKLOAD.text_before,
    text_after: Opt.TextAfter = PAPER_WORKLOAD.text_after,
    generate_tokens: Opt.Generate = 0,
    device: Opt.Device = None,
    dtype: Opt.DType = "bfloat16",
    stage: str = typer.Option("inference", help="Workload stage of every point: inference, pretrain or finetune."),
    measure: Measure = typer.Option(Measure.never, help="Measure time/memory at each point (auto|never|always)."),
    scope: Scope = typer.Option(Scope.language, help="FLOPs scope of the plots."),
    convention: Convention = typer.Option(Convention.dense, help="Attention FLOPs convention of the plots."),
    out: Path = typer.Option(Path("results/sweep"), help="Folder for points, results and plots (resumable)."),
    make_plots: bool = typer.Option(True, "--plots/--no-plots", help="Write cost-vs-field plots."),
    db: Path = typer.Option(None, help="SQLite file to append the newly profiled rows to."),
) -> None:
    """Sweep workload/config fields across architectures; re-running skips finished points."""
    archs, options = parse_models(arch, llm, vision, option)
    base = make_workload(dtype, device, batch_size=batch_size, images_per_sample=images_per_sample,
                         text_before=text_before, text_after=text_after, generate_tokens=generate_tokens, stage=stage)
    grid = parse_vary(vary)
    points = expand(archs, grid, base, llm, vision, options, measure.value)
    profile = get_profile()
    with progress_bar(len(points), "sweeping") as advance:
        result = run_sweep(points, out, profile, lambda p, status: advance(f"{p.arch} {dict(p.values)} {status}"))
    write_sweep(result, out, grid, archs, base, vision)
    err_console.print(f"{result.done} points profiled, {result.skipped} already done, {len(result.oom)} out of "
                      f"memory (now or earlier), {len(result.errors)} failed; results in {out}")
    for message in [m for _, m in result.errors]:
        err_console.print(f"[red]failed:[/] {message}", highlight=False)
    if make_plots and len(result.rows):
        from mllm_bench.reports import plots

        fields = list(grid)
        notes = [visual_tokens_note(grid["visual_tokens"], vision)] if "visual_tokens" in grid else []
        written = plots.cost_curves(result.rows, fields[0], out / f"cost_vs_{fields[0]}",
                                    scope=scope.value, convention=convention.value,
                                    hue=fields[1] if len(fields) > 1 else None, note="; ".join(notes))
        err_console.print(f"wrote {len(written)} plot files")
    if db is not None and len(result.rows):
        new = result.rows[result.rows["sweep_key"].isin(result.new_keys)]
        append_sqlite(new, db)
    if result.errors:
        raise typer.Exit(1)
