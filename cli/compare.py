"""``mllm-bench compare``: architectures side by side on one workload."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from mllm_bench.choices import PAPER_WORKLOAD_FIELDS as PAPER
from mllm_bench.config import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from mllm_bench.reports.equal import Budget

    from mllm_bench.config import VisionConfig
    from mllm_bench.measure import MeasureSettings
    from mllm_bench.workload import Workload

from .common import (
    CONVENTION_HELP,
    Convention,
    Count,
    Format,
    Measure,
    Opt,
    Run,
    Scope,
    check_before_work,
    err_console,
    get_profile,
    handle_errors,
    make_workload,
    parse_image_size,
    parse_models,
    parse_stages,
    progress_bar,
)


@handle_errors
def compare(
    arch: Opt.Archs = None,
    llm: Opt.LLM = "vicuna-7b",
    vision: Opt.Vision = "clip-vit-l-336",
    option: Opt.ArchOptions = None,
    batch_size: Opt.BatchSize = PAPER["batch_size"],
    images_per_sample: Opt.Images = PAPER["images_per_sample"],
    image_size: Opt.ImageSize = None,
    text_before: Opt.TextBefore = PAPER["text_before"],
    text_after: Opt.TextAfter = PAPER["text_after"],
    text_between: int = typer.Option(0, min=0, help="Text tokens between consecutive images."),
    generate_tokens: Opt.Generate = 0,
    device: Opt.Device = None,
    dtype: Opt.DType = "bfloat16",
    stage: list[str] = typer.Option(None, "--stage", help="Training stage(s) to cost: pretrain, finetune."),
    measure: Measure = typer.Option(Measure.auto, help="auto: measure on CUDA, on CPU only small models."),
    count: Count = typer.Option(Count.inference, help="Count FLOPs on meta tensors for: all calls, inference "
                                "only (training steps analytic; fast), or none (analytic only)."),
    min_seconds: float = typer.Option(None, min=0.0, help="Timing: minimum seconds per measured phase."),
    attention_backend: str = typer.Option("sdpa", help="Attention when measuring: sdpa (reference), math, flash, "
                                          "flex, or fast (each architecture's CUDA fast path: flex for naavit, "
                                          "flash for the others). FLOPs are counted with sdpa either way."),
    compile_layers: bool = typer.Option(False, "--compile",
                                        help="torch.compile the model's layers and blocks before measuring."),
    decode_mode: str = typer.Option(None, help="How decode is measured: dynamic (growing KV cache), static "
                                    "(preallocated) or graph (static + CUDA graph; the default on CUDA)."),
    baseline: str = typer.Option("llava", help="Architecture the 'vs' columns compare against."),
    scope: Scope = typer.Option(Scope.language, help="FLOPs scope: language (paper) or total."),
    convention: Convention = typer.Option(Convention.dense, help=CONVENTION_HELP),
    out: Path = typer.Option(None, help="Folder for result files (rows JSON/CSV, tables, plots)."),
    fmt: Opt.OutputFormat = Format.table,
    make_plots: bool = typer.Option(False, "--plots", help="Write plots (PNG + PDF) under OUT/plots."),
    db: Path = typer.Option(None, help="SQLite file to append the rows to."),
    equal: str = typer.Option(None, help="Equal budget, KEY=VALUE: flops=B (prefill FLOPs per batch under --scope/"
                              "--convention), visual_tokens=N (per sample in the LLM) or params=P. Each architecture "
                              "with a knob runs at the setting whose cost is the largest within it; the baseline and "
                              "architectures without a knob run as they are (each labelled)."),
) -> None:
    """Compare architectures on one workload (default: LLaVA-1.5, Flamingo-style, SAISA at 7B, paper workload)."""
    if equal is not None:
        from mllm_bench.reports.equal import parse_budget

        budget = parse_budget(equal)  # a malformed --equal is refused before anything else
        if budget.kind == "flops" and convention.value not in ("dense", "effective"):
            raise ConfigError(f"--equal {equal} with --convention {convention.value}: FLOPs budgets are met in "
                              "mllm-bench's own conventions (--convention dense or effective, in --scope)")
    archs, options = parse_models(arch, llm, vision, option)
    if baseline not in archs:
        raise ConfigError(f"--baseline {baseline!r} is not among --arch {archs}")
    tower_size, image_sizes = parse_image_size(image_size)
    workload = make_workload(dtype, device, batch_size=batch_size, images_per_sample=images_per_sample,
                             image_size=tower_size, image_sizes=image_sizes, text_before=text_before,
                             text_after=text_after,
                             text_between=text_between, generate_tokens=generate_tokens)
    stages = parse_stages(stage)
    vision_cfg = vision_for(vision, tower_size)
    budget_notes: list[str] = []
    if equal is not None:
        options, budget_notes = equal_budget(archs, llm, vision_cfg, options, workload, budget, scope.value,
                                             convention.value, baseline)
    runs = [Run(a, llm, vision_cfg, options.get(a), workload.replace(stage=s), measure.value)
            for a in archs for s in ("inference", *stages)]
    from mllm_bench.count_ahead import count_ahead

    # forked once torch is imported, before the checks and pandas: the child needs neither
    with count_ahead() as ahead:
        check_before_work(runs, out=out or (DEFAULT_PLOTS_OUT if make_plots else None), db=db, out_beside=True,
                          attention_backend=attention_backend, decode_mode=decode_mode)
        from mllm_bench.measure import MeasureSettings

        timing = {"min_seconds": min_seconds} if min_seconds is not None else {}
        settings = MeasureSettings(attention_backend=attention_backend, compile=compile_layers,
                                   decode_mode=decode_mode, **timing)
        if ahead.running:
            ahead.submit(counts_to_fill(runs, count.value, settings))
        from mllm_bench.reports.collect import collect, steps

        with progress_bar(steps(archs, stages), "profiling") as advance:
            rows = collect(archs, workload, get_profile(), llm, vision_cfg, options, stages, measure.value, advance,
                           count.value, before_counted=ahead.wait, settings=settings)
    emit(rows, stages, baseline, scope.value, convention.value, fmt, out, make_plots, db,
         title=f"{', '.join(archs)} — {llm} + {vision}", extra_notes=budget_notes)


def counts_to_fill(runs: Sequence[Run], count: str, settings: MeasureSettings) -> list[Callable[[], object]]:
    """The profiler calls that fill the count cache with the counts ``runs`` will need (``--count``) and it does
    not hold yet: for :func:`~mllm_bench.count_ahead.count_ahead` to run while the rest is done."""
    from functools import partial

    from mllm_bench.choices import counts_stage
    from mllm_bench.profile import counts_cached, profile_rows

    return [partial(profile_rows, r.arch, r.workload, r.llm, r.vision, r.options, measure=False, count=True,
                    settings=settings)
            for r in runs if counts_stage(count, r.workload.stage)
            and not counts_cached(r.arch, r.workload, r.llm, r.vision, r.options)]


def equal_budget(archs: list[str], llm: str, vision_cfg: VisionConfig, options: dict[str, dict], workload: Workload,
                 budget: Budget, scope: str, convention: str, baseline: str) -> tuple[dict[str, dict], list[str]]:
    """``--equal``: each architecture's options at the budget (:mod:`mllm_bench.reports.equal`), one line each on
    stderr, and the table's notes."""
    from mllm_bench.reports.equal import budget_notes, choose_all

    with err_console.status("choosing each architecture's setting for the budget"):
        choices = choose_all(archs, llm, vision_cfg, options, workload, budget, scope, convention, baseline)
    notes = budget_notes(choices, budget, scope, convention)
    for line in notes:
        err_console.print(line, highlight=False, soft_wrap=True)
    return {c.arch: c.options for c in choices}, notes


def vision_for(vision: str, image_size: int | None):
    """The vision preset, at ``image_size`` when given (its patch grid must divide it)."""
    from mllm_bench.config import replace
    from mllm_bench.presets import vision_preset

    cfg = vision_preset(vision)
    return cfg if image_size in (None, cfg.image_size) else replace(cfg, image_size=image_size)


def emit(rows: pd.DataFrame, stages: list[str], baseline: str, scope: str, convention: str,
         fmt: Format, out: Path | None, make_plots: bool, db: Path | None, title: str,
         extra_notes: Sequence[str] = (), accuracy: pd.DataFrame | None = None) -> None:
    """Print the table in ``fmt`` and write the files (shared by ``compare`` and ``report``). ``extra_notes``
    follow the table's own; ``accuracy``: rows of :mod:`mllm_bench.reports.accuracy`, shown as the table's
    accuracy rows (and plotted against prefill FLOPs), never written into the result files."""
    from mllm_bench.reports import tables

    from mllm_bench.atomic import atomic_write_text
    from mllm_bench.results import append_sqlite, rows_to_json, write_rows

    quantities = tables.compare_quantities(scope, convention, tuple(stages))
    table_rows = rows
    if accuracy is not None and len(accuracy):
        import pandas as pd
        from mllm_bench.reports.accuracy import accuracy_quantities

        quantities += accuracy_quantities(accuracy)
        table_rows = pd.concat([rows, accuracy], ignore_index=True)
    table = tables.comparison(table_rows, quantities, baseline)
    notes = tables.notes_for(rows, scope, convention, list(extra_notes))
    # piped output has no terminal width: give the table room instead of rich's 80 columns
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    if fmt is Format.table:
        console.print(tables.to_rich(table, title, notes))
    elif fmt is Format.json:
        typer.echo(rows_to_json(rows), nl=False)
    else:
        typer.echo(tables.render(table, fmt.value, title, notes), nl=False)
    if make_plots and out is None:
        out = DEFAULT_PLOTS_OUT
    if out is not None:

        def write_set(folder: Path) -> list[Path]:
            written = [write_rows(rows, folder / "results.json"), write_rows(rows, folder / "results.csv")]
            for kind, suffix in (("markdown", "md"), ("csv", "csv"), ("latex", "tex")):
                written.append(atomic_write_text(folder / f"comparison.{suffix}",
                                                 tables.render(table, kind, title, notes)))
            if make_plots:
                written += write_plots(rows, folder / "plots", scope, convention, stages, accuracy)
            return written

        written = replace_set(out, write_set, SET_NAMES)
        err_console.print(f"wrote {len(written)} files under {out}")
    if db is not None:
        n = append_sqlite(rows, db)
        err_console.print(f"appended {n} rows to {db}")


DEFAULT_PLOTS_OUT = Path("results/compare")
# What one comparison writes under --out: replaced together, never mixed with an earlier run's files.
SET_NAMES = frozenset({"results.json", "results.csv", "comparison.md", "comparison.csv", "comparison.tex", "plots"})


def replace_set(out: Path, write: Callable[[Path], list[Path]], names: frozenset[str]) -> list[Path]:
    """Write a set of files with ``write(folder)`` into a new folder beside ``out``, then swap it in, so that
    ``out`` holds either its old set or the whole new one (a full disk stops the writing, not the swap).

    ``names``: the entries the set is made of. When ``out`` holds nothing else it is swapped whole (two
    renames); otherwise (other files, the working folder, a symlink) each entry is renamed in and the old
    set's remaining entries are removed, leaving the other files alone. Returns the paths under ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        written = write(stage)
        _swap_in(stage, out, names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # nothing left when the swap succeeded
    return [out / path.relative_to(stage) for path in written]


def _swap_in(stage: Path, out: Path, names: frozenset[str]) -> None:
    if not out.exists():
        os.rename(stage, out)
        return
    others = [p for p in out.iterdir() if p.name not in names]
    inside = Path.cwd().resolve().is_relative_to(out.resolve())
    if not others and not out.is_symlink() and not inside:
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rename(out, old)  # onto an empty folder: replaces it
        try:
            os.rename(stage, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    trash = stage / ".old"
    trash.mkdir()
    old = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
    new = [entry.name for entry in stage.iterdir() if entry != trash]
    placed: list[str] = []
    try:
        for name in old:  # the old set's entries go first, so no old file outlives the swap
            os.rename(out / name, trash / name)
        for name in new:
            os.rename(stage / name, out / name)
            placed.append(name)
    except OSError:  # put the old set back
        for name in placed:
            os.rename(out / name, stage / name)
        for name in old:
            if (trash / name).exists():
                os.rename(trash / name, out / name)
        raise


def write_plots(rows: pd.DataFrame, folder: Path, scope: str, convention: str, stages: list[str],
                accuracy: pd.DataFrame | None = None) -> list[Path]:
    """Component FLOPs, memory, Pareto (prefill FLOPs vs KV cache; vs each accuracy given) and (with
    measurements) roofline plots of one comparison."""
    from mllm_bench.reports import pareto, plots  # matplotlib loads only when plotting

    panels = [("prefill_flops", "inference", "inference: prefill"),
              ("train_step_flops", stages[-1], f"training step: {stages[-1]}")]
    written = plots.flops_by_component(rows, folder / "flops_by_component", scope, convention, panels)
    written += plots.memory_by_component(rows, folder / "memory_by_component", stages[-1])
    written += pareto.inference_pareto(rows, folder / "pareto", scope, convention)
    if accuracy is not None and len(accuracy):
        written += pareto.accuracy_pareto(rows, accuracy, folder, scope, convention)
    written += roofline_if_measured(rows, folder / "roofline")
    return written


def roofline_if_measured(rows: pd.DataFrame, stem: Path) -> list[Path]:
    measured = rows[(rows["metric"] == "achieved_flops_per_s") & (rows["source"] == "measured")]
    if measured.empty:
        return []
    device = str(measured["device_name"].iloc[0]) if "device_name" in measured else ""
    peak, bandwidth = device_roofs(device)
    from mllm_bench.reports import plots

    return plots.roofline(rows, stem, peak, bandwidth, device)


# HBM bandwidth (vendor data sheets) for the roofline; the peak is mllm_bench.devices' dense bf16 one.
BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 PCIe": 2.0e12, "NVIDIA H100 SXM": 3.35e12, "NVIDIA A100": 2.04e12}


def device_roofs(device_name: str) -> tuple[float, float]:
    """(peak FLOP/s, bandwidth B/s) of ``device_name``; (0, 0) when either is unknown."""
    from mllm_bench.devices import canonical_device, peak_flops

    bandwidth = BANDWIDTH.get(canonical_device(device_name) or "", 0.0)
    return (peak_flops(device_name) or 0.0, bandwidth) if bandwidth else (0.0, 0.0)
