"""``mllm-bench literature``: published efficiency claims recomputed under their own conventions and ours."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import Format, Opt, handle_errors


@handle_errors
def literature(
    fmt: Opt.OutputFormat = Format.table,
    conventions: bool = typer.Option(False, "--conventions", help="Print the published FLOP conventions instead: "
                                     "formula, source, scope, what each counts and leaves out."),
    claims: Path = typer.Option(None, help="A claims CSV of your own (columns as the built-in "
                                "mllm_bench/reports/literature_claims.csv)."),
) -> None:
    """Recompute the literature's efficiency claims (SAISA, ShortV, FastV, VTW, LLM-Viewer budgets, VisionZip)."""
    from mllm_bench.reports import literature as lit
    from rich.console import Console
    from rich.table import Table

    from mllm_bench.config import ConfigError
    from mllm_bench.conventions import PUBLISHED

    if fmt.value == "latex":
        raise ConfigError("--format latex: the literature table prints as table, markdown, csv or json")
    table = lit.conventions_table() if conventions else lit.literature_table(
        lit.load_claims(claims) if claims is not None else None)
    if fmt.value == "csv":
        typer.echo(table.to_csv(index=False), nl=False)
    elif fmt.value == "json":
        typer.echo(table.to_json(orient="records", indent=1))
    elif conventions:
        typer.echo("\n".join(f"- {c.describe()}" for c in PUBLISHED.values()))
    elif fmt.value == "markdown":
        typer.echo(lit.to_markdown(table), nl=False)
    else:
        out = Table(title="published efficiency claims, recomputed", show_lines=True)
        for col in ("claim", "published", "convention", "recomputed", "ours d/lang", "ours e/total", "reproduced"):
            out.add_column(col, justify="left" if col in ("claim", "convention") else "right", overflow="fold")
        for _, r in table.iterrows():
            out.add_row(f"{r['paper']}: {r['method']}, {r['model']}", f"{r['published']:g} {lit.SHORT_UNIT[r['unit']]}",
                        r["convention"], lit.fmt(r["recomputed"]), lit.fmt(r["ours_dense_language"]),
                        lit.fmt(r["ours_effective_total"]), r["reproduced"])
        console = Console()
        console.print(out)
        for _, r in table.iterrows():
            reading = f" Reading — {r['reading']}: {lit.fmt(r['reading_value'])}." if r["reading"] else ""
            console.print(f"[bold]{r['paper']}, {r['method']}[/bold] ({r['setting']}): {r['cause']}{reading} "
                          f"Source: {r['source']}.")
        console.print("Units as in each row's published column; `recomputed` applies the row's convention to the "
                      "exact analytic breakdown; `ours` = 2 FLOPs per multiply-add, dense/language or "
                      "effective/total. `mllm-bench literature --conventions` lists the conventions.")
