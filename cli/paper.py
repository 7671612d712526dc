"""``mllm-bench paper``: regenerate the paper's tables, figure and README (every assumption) into a fresh folder.

Without ``--out`` each run writes ``out/paper/<timestamp>/``; the committed ``results/paper/`` is
rewritten only when ``--out results/paper`` names it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import typer

from mllm_bench.choices import BUDGET_DEVICES

from .common import Convention, check_before_work, err_console, get_profile, handle_errors, progress_bar

DEFAULT_ROOT = Path("out/paper")


def fresh_run_dir(root: Path = DEFAULT_ROOT) -> Path:
    """A new folder ``root/<UTC timestamp>/`` (``-2``, ``-3``… when two runs start in the same second)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{root}: no free folder name for {stamp}")


@handle_errors
def paper(
    out: Path = typer.Option(None, help=f"Folder to write (default: a fresh {DEFAULT_ROOT}/<timestamp>/; "
                             "--out results/paper regenerates the committed results)."),
    device: str = typer.Option("a100", help=f"Device for GPU-hours: {', '.join(BUDGET_DEVICES)}."),
    mfu: str = typer.Option("0.4", help="MFU for the training budget, in (0, 1]: one number, or per architecture "
                            "(llava=0.47,saisa=0.32; a bare number sets the rest)."),
    convention: list[Convention] = typer.Option([], help="Also write inference_flops_<CONVENTION>.md/.csv under "
                                                "this FLOPs convention (repeatable)."),
    measured: Path = typer.Option(None, help="Result file with measured train_step mfu rows (e.g. "
                                  "results/gpu/nvidia-h200/rows.csv): each arch's finetune MFU, for every LLM size."),
) -> None:
    """Recompute the SAISA paper's efficiency claims (7B and 13B) into OUT."""
    from mllm_bench.reports.paper import (
        PAPER_ARCHS,
        PAPER_LLMS,
        PAPER_VISION,
        inference_markdown,
        regenerate,
        write_literature,
    )
    from mllm_bench.reports.train_cost import measured_mfu, parse_mfu, peak_flops

    from mllm_bench.config import ConfigError
    from mllm_bench.presets import vision_preset
    from mllm_bench.results import read_results

    # every option is checked here, before the minutes of profiling
    try:
        peak_flops(device)
    except ConfigError as err:
        raise ConfigError(f"--device: {err}") from err
    check_before_work(out=out)
    conventions = [c.value for c in convention]
    utilisation = parse_mfu(mfu, PAPER_ARCHS)
    if measured is not None:  # any LLM's rows: a 7B measurement serves 13B too
        utilisation, _ = measured_mfu(measured, PAPER_ARCHS, None, vision_preset(PAPER_VISION).tokens_per_image,
                                      given=utilisation)
    profile = get_profile()
    steps = len(PAPER_LLMS) * len(PAPER_ARCHS) * 3
    command = "mllm-bench paper" + (f" --out {out}" if out is not None else "")
    if out is None:
        out = fresh_run_dir()
    command += (f" --device {device}" if device != "a100" else "") + (f" --mfu {mfu}" if mfu != "0.4" else "")
    command += f" --measured {measured}" if measured is not None else ""
    command += "".join(f" --convention {name}" for name in conventions)
    with progress_bar(steps, "regenerating paper results") as advance:
        result = regenerate(out, profile, mfu=utilisation, device=device, on_step=advance, command=command,
                            conventions=conventions)
    result.files += write_literature(out, read_results(measured) if measured is not None else None)
    typer.echo(inference_markdown(result.inference, claim=True), nl=False)
    err_console.print(f"wrote {len(result.files)} files under {out}")
