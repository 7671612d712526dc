"""``mllm-bench sweep``: vary one or two fields across architectures; resumable."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from mllm_bench.choices import PAPER_WORKLOAD_FIELDS as PAPER
from mllm_bench.choices import VARY_FIELDS
from mllm_bench.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from mllm_bench.reports.sweep import SweepResult

from .common import (
    CONVENTION_HELP,
    Convention,
    Measure,
    Opt,
    Run,
    Scope,
    check_before_work,
    err_console,
    handle_errors,
    make_workload,
    parse_models,
    progress_bar,
)

DEFAULT_ROOT = Path("out/sweep")
VARY_HELP = (f"FIELD=v1,v2,... (one or two; fields: {', '.join(VARY_FIELDS)}, or an architecture option ARCH.KEY, "
             "e.g. fastv.drop_ratio=0.25,0.5,0.75). visual_tokens=N uses N/576 images "
             "when N is a multiple of the per-image count (2304 = 4 images at 336 px, not one 672-px image), "
             "else one image whose patch grid gives N (N a square). image=WxH,... sets the images' original size "
             "(W wide, H high; WxH;WxH one per image) with the tower at its own size: LLaVA-NeXT's AnyRes "
             "derives its tokens from it; image_size=N is the tower's px.")


# ``--jobs`` by default: a grid this large is counted in one process per CPU core (forks: they start at once)
AUTO_JOBS_MIN_POINTS = 8


def get_profile() -> Callable[..., list[dict[str, Any]]]:
    """The profiler as a sweep calls it: :func:`~mllm_bench.profile.profile_rows`, rows as dicts (a point's
    rows go to its JSON record without a DataFrame)."""
    from mllm_bench.profile import profile_rows

    return profile_rows


def auto_jobs(points: int, measure: str, launched: bool) -> int:
    """The default ``--jobs``: one per CPU core this process may use for a grid of at least
    :data:`AUTO_JOBS_MIN_POINTS` points that measures nothing outside a launcher; else 1."""
    if measure != "never" or launched or points < AUTO_JOBS_MIN_POINTS:
        return 1
    from mllm_bench.environment import usable_cpus

    return min(usable_cpus(), points)


@handle_errors
def sweep(
    vary: list[str] = typer.Option(..., "--vary", "-v", help=VARY_HELP),
    arch: Opt.Archs = None,
    llm: str = typer.Option("vicuna-7b", help="LLM preset (unless varied)."),
    vision: Opt.Vision = "clip-vit-l-336",
    option: Opt.ArchOptions = None,
    batch_size: Opt.BatchSize = PAPER["batch_size"],
    images_per_sample: Opt.Images = PAPER["images_per_sample"],
    text_before: Opt.TextBefore = PAPER["text_before"],
    text_after: Opt.TextAfter = PAPER["text_after"],
    generate_tokens: Opt.Generate = 0,
    device: Opt.Device = None,
    dtype: Opt.DType = "bfloat16",
    stage: str = typer.Option("inference", help="Workload stage of every point: inference, pretrain or finetune."),
    measure: Measure = typer.Option(Measure.never, help="Measure time/memory at each point (auto|never|always)."),
    scope: Scope = typer.Option(Scope.language, help="FLOPs scope of the plots."),
    convention: Convention = typer.Option(Convention.dense, help=CONVENTION_HELP),
    out: Path = typer.Option(None, help="Folder for points, results and plots (resumable; default: "
                             f"{DEFAULT_ROOT}/<grid>/, one folder per grid)."),
    make_plots: bool = typer.Option(True, "--plots/--no-plots", help="Write cost-vs-field plots."),
    db: Path = typer.Option(None, help="SQLite file that gets every finished point's rows once (as each finishes)."),
    wait_ranks: float = typer.Option(86400.0, min=0.0, help="Under several ranks (torchrun, srun): seconds rank 0 "
                                     "waits for the others before writing the summary from what is finished."),
    jobs: int = typer.Option(None, min=1, help="Count the points in this many local processes (ranks of one launch "
                             "on this machine, as under torchrun); not with --measure, whose timings they would "
                             "share the machine with. Default: one per CPU core for a grid of "
                             f"{AUTO_JOBS_MIN_POINTS} or more points that measures nothing outside a launcher, "
                             "else 1."),
) -> None:
    """Sweep workload/config fields across architectures; re-running skips points this code finished here.

    Under torchrun (RANK/WORLD_SIZE) or srun (SLURM_PROCID/SLURM_NTASKS) each rank takes every N-th point on
    its own device (cuda:LOCAL_RANK) and rank 0 writes the summary once all ranks are done."""
    from mllm_bench.reports.sweep import (
        IMAGE_FIELD,
        LOCAL_RANK_POLL_S,
        RANK_POLL_S,
        Ranks,
        check_db,
        curve_rows,
        expand,
        grid_slug,
        image_curve_rows,
        image_note,
        mark_rank_done,
        mark_rank_started,
        merge_ranks,
        option_fields,
        parse_vary,
        rank_device,
        refresh_db,
        run_sweep,
        share_launch_id,
        start_rank_worker,
        visual_tokens_note,
        wait_for_ranks,
        write_sweep,
    )

    from mllm_bench.distributed import launch_ranks, shard_points

    archs, options = parse_models(arch, llm, vision, option)
    base = make_workload(dtype, device, batch_size=batch_size, images_per_sample=images_per_sample,
                         text_before=text_before, text_after=text_after, generate_tokens=generate_tokens, stage=stage)
    grid = parse_vary(vary)
    points = expand(archs, grid, base, llm, vision, options, measure.value)
    ranks = launch_ranks()
    if jobs is None:
        jobs = auto_jobs(len(points), measure.value, ranks.world_size > 1)
        if jobs > 1:
            err_console.print(f"counting in {jobs} local processes (one per CPU core; --jobs 1 for one)",
                              highlight=False)
    elif jobs > 1:
        if ranks.world_size > 1:
            raise ConfigError(f"--jobs {jobs} under a launcher of {ranks.world_size} ranks ({ranks.source}): use one "
                              "or the other")
        if measure.value != "never":
            raise ConfigError(f"--jobs {jobs} with --measure {measure.value}: parallel points would share the "
                              "machine and distort each other's timings; measure with one process per device "
                              "(torchrun / srun)")
    run_device = rank_device(base.device, ranks)  # the launcher's ranks: --jobs share this process's device
    if jobs > 1:
        ranks = Ranks(0, jobs, 0, f"jobs-{os.getpid()}-{os.urandom(4).hex()}", "--jobs")
    if run_device != base.device and run_device.startswith("cuda"):
        import torch

        torch.cuda.set_device(run_device)  # memory checks, timing and peak memory on this rank's GPU
    check_before_work([Run.of_point(p) for p in points], out=out, db=db)
    if out is None:
        out = DEFAULT_ROOT / grid_slug(grid, [p.key for p in points])
    if db is not None and ranks.rank == 0:
        check_db(db)
    profile = get_profile()
    several = ranks.world_size > 1
    if several:
        ranks = share_launch_id(ranks)
        mark_rank_started(out, ranks)
    workers = [start_rank_worker(points, out, profile, dataclasses.replace(ranks, rank=r), run_device)
               for r in range(1, jobs)] if jobs > 1 else []
    label = f"sweeping (rank {ranks.rank} of {ranks.world_size}, {run_device})" if several else "sweeping"
    share = len(shard_points(points, ranks.rank, ranks.world_size))
    with progress_bar(share, label) as advance:
        result = run_sweep(points, out, profile, lambda p, status: advance(f"{p.arch} {dict(p.values)} {status}"),
                           db=db if ranks.rank == 0 else None,  # only rank 0 writes SQLite (files on NFS)
                           rank=ranks.rank, world_size=ranks.world_size, run_device=run_device)
    ranks_info = None
    if several:
        mark_rank_done(out, ranks, result)
        if ranks.rank != 0:
            err_console.print(f"rank {ranks.rank} of {ranks.world_size}: {result.done} points profiled, "
                              f"{result.skipped} already done, {len(result.busy)} in progress elsewhere, "
                              f"{len(result.errors)} failed; rank 0 writes the summary in {out}", highlight=False)
            for message in [m for _, m in result.errors]:
                err_console.print(f"[red]failed:[/] {message}", highlight=False)
            return  # exit 0: a failing worker would make torchrun stop rank 0; rank 0 reports and exits 1
        err_console.print(f"rank 0: waiting for the other {ranks.world_size - 1} rank(s) (at most {wait_ranks:g} s)",
                          highlight=False)
        markers, missing = wait_for_ranks(out, ranks, wait_ranks, points=points,
                                          poll_s=LOCAL_RANK_POLL_S if workers else RANK_POLL_S)
        for worker in workers:
            worker.join()
        result = merge_ranks(points, result, markers, missing, out, ranks.world_size)
        if db is not None:
            refresh_db(result, db, out)
        ranks_info = {"world_size": ranks.world_size, "launch": ranks.launch, "from": ranks.source,
                      "split": "point index % world_size == rank", "missing": list(missing.values())}
        for why in missing.values():
            err_console.print(f"[red]not merged:[/] {why}; rerun the same command (with any number of ranks) "
                              "to finish and merge its points", highlight=False)
    write_sweep(result, out, grid, archs, base, vision, ranks=ranks_info)
    Console().print(_summary(result, scope.value, convention.value))
    redone = (f"; {len(result.redone)} of the profiled points were redone (finished earlier by other code or on "
              "another device: see the table)") if result.redone else ""
    err_console.print(f"{result.done} points profiled, {result.skipped} already done, {len(result.oom)} out of memory "
                      f"(now or earlier), {len(result.busy)} in progress elsewhere, {len(result.errors)} failed"
                      f"{redone}; results in {out}", highlight=False)
    for message in [m for _, m in result.errors]:
        err_console.print(f"[red]failed:[/] {message}", highlight=False)
    if make_plots and len(result.rows):
        from mllm_bench.reports import plots

        fields = list(grid)
        x, hue = fields[0], fields[1] if len(fields) > 1 else None
        notes = [visual_tokens_note(grid["visual_tokens"], vision)] if "visual_tokens" in grid else []
        rows = result.rows
        for name in option_fields(grid):  # an option's value becomes the x (or hue) of its architecture's rows
            rows = curve_rows(rows, name, grid[name])
            notes.append(f"architectures without {name} are drawn flat across it")
        drawable = True
        if IMAGE_FIELD in grid:  # images placed by pixel count (x) or named by their size (hue)
            labels = {p.key: dict(p.values)[IMAGE_FIELD] for p in points}
            try:
                rows, image_x, hue, image_xnote = image_curve_rows(rows, labels, x == IMAGE_FIELD, hue)
                x = image_x or x
                notes += [image_note(vision), *([image_xnote] if image_xnote else [])]
            except ConfigError as err:
                drawable = False
                err_console.print(f"[yellow]no plot:[/] {err}", highlight=False)
        written = plots.cost_curves(rows, x, out / f"cost_vs_{fields[0].replace('.', '_')}", scope=scope.value,
                                    convention=convention.value, hue=hue, note="; ".join(notes)) if drawable else []
        err_console.print(f"wrote {len(written)} plot files")
    if db is not None:
        for note in result.db_notes:
            err_console.print(f"[yellow]db write retried in the backfill:[/] {note}", highlight=False)
        if result.db_error:
            err_console.print(f"[red]failed:[/] {db} lacks finished points ({result.db_error}); rerun the sweep "
                              "to backfill them", highlight=False)
        else:
            err_console.print(f"every finished point of {out} is in {db}", highlight=False)
    if result.errors or result.db_error or (ranks_info and ranks_info["missing"]):
        raise typer.Exit(1)


def _summary(result: SweepResult, scope: str, convention: str) -> Table:
    """This run's points: status, whether each was new, reused or redone (and why), FLOPs and latency."""
    from mllm_bench.reports.rows import fmt_number, scale_for
    from mllm_bench.reports.sweep import summary_table

    lines = summary_table(result, scope, convention)
    flops_div, flops_unit = scale_for("FLOP", lines["flops"])
    time_div, time_unit = scale_for("s", lines["latency_s"])
    metrics = sorted(set(lines["flops_metric"]))
    table = Table(title=f"sweep points: {', '.join(metrics)} ({scope} scope, {convention} attention)",
                  title_justify="left")
    for name, justify in (("arch", "left"), ("point", "left"), ("status", "left"), ("run", "left"),
                          (flops_unit, "right"), (f"latency {time_unit}" if lines["latency_s"].notna().any()
                                                  else "latency", "right"), ("why", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in lines.itertuples():
        table.add_row(r.arch, r.point, r.status, r.run, fmt_number(r.flops, flops_div),
                      fmt_number(r.latency_s, time_div), r.why)
    return table
