"""``mllm-bench train-cost``: the LLaVA-1.5 two-stage recipe's budget for each architecture."""

from __future__ import annotations

from pathlib import Path

import typer

from mllm_bench.choices import BUDGET_DEVICES
from mllm_bench.config import ConfigError
from mllm_bench.presets import vision_preset

from .common import (
    Format,
    Opt,
    Run,
    Scope,
    TrainConvention,
    check_before_work,
    err_console,
    get_profile,
    handle_errors,
    parse_models,
    progress_bar,
)


def parse_pair(text: str, name: str) -> tuple[int, int]:
    """``"40,216"`` → (40, 216): text tokens before and after the image."""
    try:
        before, after = (int(x) for x in text.split(","))
    except ValueError as err:
        raise ConfigError(f"--{name}: expected BEFORE,AFTER (two integers, e.g. 40,216), got {text!r}") from err
    if before < 0 or after < 0 or before + after == 0:
        raise ConfigError(f"--{name}: token counts must be >= 0 with at least one text token, got {text!r}")
    return before, after


@handle_errors
def train_cost(
    arch: Opt.Archs = None,
    llm: Opt.LLM = "vicuna-7b",
    vision: Opt.Vision = "clip-vit-l-336",
    option: Opt.ArchOptions = None,
    device: str = typer.Option("a100", help=f"Device whose peak sets GPU-hours: {', '.join(BUDGET_DEVICES)}."),
    mfu: str = typer.Option("0.4", help="MFU in (0, 1] for every architecture (0.4), or per architecture "
                            "(llava=0.47,saisa=0.32; a bare number sets the rest). Used for both stages."),
    measured: Path = typer.Option(None, help="Result file(s) with measured train_step mfu rows (e.g. "
                                  "results/gpu/nvidia-h200/rows.csv): each arch's finetune MFU at the workload's "
                                  "visual-token count, unless --mfu names the arch."),
    pretrain_samples: int = typer.Option(558_000, min=1, help="Stage-1 samples (LCS-558K)."),
    finetune_samples: int = typer.Option(665_000, min=1, help="Stage-2 samples (LLaVA-1.5 mix 665K)."),
    pretrain_text: str = typer.Option("1,32", help="Stage-1 text tokens BEFORE,AFTER the image (BOS + caption)."),
    finetune_text: str = typer.Option("40,216", help="Stage-2 text tokens BEFORE,AFTER the image."),
    baseline: str = typer.Option("llava", help="Architecture the reduction is measured against."),
    scope: Scope = typer.Option(Scope.total, help="FLOPs scope (total: all the GPU runs)."),
    convention: TrainConvention = typer.Option(TrainConvention.effective, help="Attention FLOPs convention."),
    fmt: Opt.OutputFormat = Format.table,
    out: Path = typer.Option(None, help="Folder for train_cost.{md,csv} and the profiler rows."),
) -> None:
    """Training budget (FLOPs, GPU-hours) of the LLaVA-1.5 recipe per architecture, vs the paper's −26%."""
    from mllm_bench.reports import train_cost as budget

    from mllm_bench.atomic import atomic_write_text
    from mllm_bench.results import write_rows

    archs, options = parse_models(arch, llm, vision, option)
    budget.peak_flops(device)  # an unknown device is bad usage, before any counting
    recipe = budget.llava15_recipe(parse_pair(pretrain_text, "pretrain-text"), parse_pair(finetune_text,
                                   "finetune-text"), pretrain_samples, finetune_samples)
    utilisation = budget.parse_mfu(mfu, archs)
    if measured is not None:
        utilisation, _ = budget.measured_mfu(measured, archs, llm, vision_preset(vision).tokens_per_image,
                                             given=utilisation)
    check_before_work([Run(a, llm, vision, options.get(a), s.workload()) for a in archs for s in recipe], out=out)
    profile = get_profile()
    with progress_bar(len(archs) * len(recipe), "counting training FLOPs") as advance:
        table, rows = budget.train_cost(archs, profile, recipe, llm, vision, options, device, utilisation,
                                        scope.value, convention.value, baseline, advance)
    break_even = {}
    if {"llava", "saisa"} <= set(archs) and llm in budget.LLAVA_REPORTED_HOURS:
        break_even[llm] = budget.finetune_text_for_reduction(profile, recipe, llm, vision, scope=scope.value,
                                                              convention=convention.value)
    notes = budget.budget_notes(table, recipe, break_even)
    markdown = budget.to_markdown(table, notes)
    if fmt is Format.csv:
        typer.echo(table.to_csv(index=False), nl=False)
    elif fmt is Format.json:
        typer.echo(table.to_json(orient="records", indent=1))
    elif fmt is Format.latex:
        typer.echo(budget.to_latex(table, notes), nl=False)
    else:
        typer.echo(markdown, nl=False)
    if out is not None:
        atomic_write_text(out / "train_cost.md", markdown)
        atomic_write_text(out / "train_cost.csv", table.to_csv(index=False))
        write_rows(rows, out / "train_cost_rows.json")
        err_console.print(f"wrote train_cost.md, train_cost.csv, train_cost_rows.json under {out}")
