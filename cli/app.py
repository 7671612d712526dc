"""The ``mllm-bench`` command line (typer)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from mllm_bench.presets import LLM_PRESETS, VISION_PRESETS
from mllm_bench.registry import architecture_names, get_architecture

from .compare import compare
from .paper import paper
from .report import report
from .sweep import sweep
from .train_cost import train_cost

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Multimodal LLM architectures side by side.")
console = Console()


@app.callback()
def _root() -> None:
    """Multimodal LLM architectures side by side: FLOPs, memory and time."""


@app.command("list")
def list_cmd() -> None:
    """List architectures and presets."""
    arch = Table(title="architectures")
    arch.add_column("name")
    arch.add_column("wiring")
    for name in architecture_names():
        try:
            description = get_architecture(name).description
        except ImportError as err:  # a broken third-party plugin must not hide the others
            description = f"[red]failed to load: {err}[/red]"
        arch.add_row(name, description)
    console.print(arch)
    llms = Table(title="LLM presets")
    for col in ("name", "hidden", "layers", "heads", "kv heads", "ffn", "vocab"):
        llms.add_column(col)
    for c in LLM_PRESETS.values():
        llms.add_row(c.name, *map(str, (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads,
                                        c.intermediate_size, c.vocab_size)))
    console.print(llms)
    vis = Table(title="vision presets")
    for col in ("name", "kind", "width", "layers run", "image", "patch", "visual tokens"):
        vis.add_column(col)
    for v in VISION_PRESETS.values():
        vis.add_row(v.name, v.kind, str(v.hidden_size), f"{v.layers_run}/{v.num_layers}", str(v.image_size),
                    str(v.patch_size), str(v.tokens_per_image))
    console.print(vis)


app.command("compare")(compare)
app.command("sweep")(sweep)
app.command("train-cost")(train_cost)
app.command("paper")(paper)
app.command("report")(report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
