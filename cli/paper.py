"""``mllm-bench paper``: regenerate results/paper/ (tables, figure, README with every assumption)."""

from __future__ import annotations

from pathlib import Path

import typer
from mllm_bench.reports.train_cost import DEVICE_PEAKS

from .common import err_console, get_profile, handle_errors, progress_bar


@handle_errors
def paper(
    out: Path = typer.Option(Path("results/paper"), help="Folder to regenerate."),
    device: str = typer.Option("a100", help=f"Device for GPU-hours: {', '.join(DEVICE_PEAKS)}."),
    mfu: float = typer.Option(0.4, help="MFU assumed for the training budget (0-1]."),
) -> None:
    """Recompute the SAISA paper's efficiency claims (7B and 13B) into OUT."""
    from mllm_bench.reports.paper import PAPER_ARCHS, PAPER_LLMS, inference_markdown, regenerate

    if device not in DEVICE_PEAKS:
        from mllm_bench.config import ConfigError

        raise ConfigError(f"--device: unknown device {device!r}; choose one of {sorted(DEVICE_PEAKS)}")
    profile = get_profile()
    steps = len(PAPER_LLMS) * len(PAPER_ARCHS) * 3
    command = "mllm-bench paper" + (f" --out {out}" if out != Path("results/paper") else "")
    command += (f" --device {device}" if device != "a100" else "") + (f" --mfu {mfu}" if mfu != 0.4 else "")
    with progress_bar(steps, "regenerating paper results") as advance:
        result = regenerate(out, profile, mfu=mfu, device=device, on_step=advance, command=command)
    typer.echo(inference_markdown(result.inference, claim=True), nl=False)
    err_console.print(f"wrote {len(result.files)} files under {out}")
