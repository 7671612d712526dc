"""Comparison tables: one row per quantity, one column per model, each with its change vs a baseline.

:func:`comparison` builds the table in long form (quantity, model, value, unit, vs_baseline) from tidy
result rows; the renderers turn it into a rich table, Markdown, CSV or LaTeX, each followed by the
conventions the numbers follow.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pandas as pd
from rich.table import Table

from mllm_bench.config import ConfigError

from .rows import (
    IDENTITY,
    SOURCE_ORDER,
    Conventions,
    fmt_change,
    fmt_number,
    model_labels,
    normalise,
    options_line,
    pick,
    scale_for,
    workload_line,
)

FORMATS: tuple[str, ...] = ("table", "markdown", "csv", "json", "latex")


@dataclass(frozen=True)
class Quantity:
    """A table row: ``metric`` filtered by ``where`` (see :func:`reports.rows.pick`)."""

    label: str
    metric: str
    where: tuple[tuple[str, str], ...] = ()
    sources: tuple[str, ...] = SOURCE_ORDER


def compare_quantities(scope: str = "language", convention: str = "dense",
                       stages: tuple[str, ...] = ("pretrain", "finetune")) -> list[Quantity]:
    """What ``mllm-bench compare`` shows, in order (rows without data are dropped later)."""
    flops = (("scope", scope), ("convention", convention))
    out = [Quantity("parameters", "params", (("stage", "inference"),))]
    out += [Quantity(f"trainable parameters ({s})", "trainable_params", (("stage", s),)) for s in stages]
    out += [
        Quantity("prefill FLOPs", "prefill_flops", (("stage", "inference"), *flops)),
        Quantity("decode FLOPs / token", "decode_flops_per_token", (("stage", "inference"), *flops)),
    ]
    out += [Quantity(f"train-step FLOPs ({s})", "train_step_flops", (("stage", s), *flops)) for s in stages]
    out += [
        Quantity("weights", "weights_bytes", (("stage", "inference"),)),
        Quantity("KV cache / sample", "kv_cache_bytes", (("role", "all"),)),
        Quantity("KV cache / sample, visual", "kv_cache_bytes", (("role", "visual"),)),
    ]
    out += [Quantity(f"train peak memory est. ({s})", "train_peak_memory_bytes", (("stage", s),)) for s in stages]
    measured = ("measured",)
    out += [
        Quantity("vision encode latency", "vision_encode_latency_s", (), measured),
        Quantity("prefill latency (TTFT)", "prefill_latency_s", (), measured),
        Quantity("decode latency / token", "decode_latency_s", (), measured),
        Quantity("decode throughput", "tokens_per_s", (("phase", "decode"),), measured),
        Quantity("prefill MFU", "mfu", (("phase", "prefill"),), measured),
        Quantity("prefill peak memory", "peak_memory_bytes", (("phase", "prefill"),), measured),
    ]
    for s in stages:
        out += [
            Quantity(f"train-step latency ({s})", "train_step_latency_s", (("stage", s),), measured),
            Quantity(f"train-step MFU ({s})", "mfu", (("stage", s), ("phase", "train_step")), measured),
            Quantity(f"train-step peak memory ({s})", "peak_memory_bytes", (("stage", s), ("phase", "train_step")),
                     measured),
        ]
    return out


def comparison(df: pd.DataFrame, quantities: list[Quantity], baseline: str = "llava") -> pd.DataFrame:
    """Long-form comparison: quantity, model, value, unit, source, vs_baseline (value / baseline − 1)."""
    df = normalise(df)
    labels = model_labels(df)
    archs = sorted(set(df["arch"]))
    if baseline not in archs:
        raise ConfigError(f"baseline {baseline!r} is not among the compared architectures; choose one of {archs}")
    base_keys = [k for k in labels if k[0] == baseline]
    records = []
    for q in quantities:
        rows = pick(df, q.metric, q.sources, **dict(q.where))
        if rows.empty:
            continue
        values = {tuple(r[c] for c in IDENTITY): r for _, r in rows.iterrows()}
        base = next((values[k]["value"] for k in base_keys if k in values), math.nan)
        for key, label in labels.items():
            if key not in values:
                continue
            r = values[key]
            change = math.nan if key[0] == baseline or not base else r["value"] / base - 1
            records.append({"quantity": q.label, "model": label, "arch": key[0], "llm": key[1], "vision": key[2],
                            "options": key[3], "metric": q.metric, "value": float(r["value"]), "unit": r["unit"],
                            "source": r["source"], "vs_baseline": change})
    out = pd.DataFrame.from_records(records)
    if out.empty:
        raise ConfigError("no result rows match the table's quantities; was anything profiled?")
    out.attrs["baseline"] = baseline
    out.attrs["models"] = list(labels.values())
    return out


def wide(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells: quantity, unit, source, then per model its value and (not the baseline) its
    change vs the baseline."""
    baseline = table.attrs.get("baseline", "llava")
    models = [m for m in table.attrs.get("models", []) if m in set(table["model"])]
    base_models = [m for m in models if m.split(" ")[0] == baseline]
    header = ["quantity", "unit", "source"]
    for m in models:
        header.append(m)
        if m not in base_models:
            header.append(f"{m} vs {baseline}")
    body = []
    for quantity, group in table.groupby("quantity", sort=False):
        divisor, unit = scale_for(group["unit"].iloc[0], group["value"])
        by_model = {r["model"]: r for _, r in group.iterrows()}
        row = [str(quantity), unit, "/".join(dict.fromkeys(group["source"]))]
        for m in models:
            r = by_model.get(m)
            row.append(fmt_number(r["value"], divisor) if r is not None else "—")
            if m not in base_models:
                row.append(fmt_change(r["vs_baseline"]) if r is not None else "—")
        body.append(row)
    return header, body


def to_rich(table: pd.DataFrame, title: str = "", notes: list[str] | None = None) -> Table:
    header, body = wide(table)
    t = Table(title=title or None, caption="\n".join(notes or []), caption_justify="left")
    for i, h in enumerate(header):
        t.add_column(h.replace(" vs ", "\nvs "), justify="left" if i < 3 else "right", no_wrap=True)
    for row in body:
        t.add_row(*row)
    return t


def to_markdown(table: pd.DataFrame, title: str = "", notes: list[str] | None = None) -> str:
    header, body = wide(table)
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("−", "$-$"), ("—", "--"), ("·", r"$\cdot$"), ("µ", r"$\mu$"), ("–", "--")):
        text = text.replace(a, b)
    return text


def to_latex(table: pd.DataFrame, title: str = "", notes: list[str] | None = None) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``) with the notes as comments above it."""
    header, body = wide(table)
    lines = [f"% {latex_escape(n)}" for n in ([title] if title else []) + (notes or [])]
    lines += [r"\begin{tabular}{lll" + "r" * (len(header) - 3) + "}", r"\toprule"]
    lines.append(" & ".join(latex_escape(h) for h in header) + r" \\")
    lines.append(r"\midrule")
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """The long form, machine-readable: raw values in their base units, vs_baseline as a fraction."""
    buf = io.StringIO()
    cols = ["quantity", "model", "arch", "llm", "vision", "options", "metric", "value", "unit", "source",
            "vs_baseline"]
    table[cols].to_csv(buf, index=False)
    return buf.getvalue()


def render(table: pd.DataFrame, fmt: str, title: str = "", notes: list[str] | None = None) -> str:
    """Text of the table in ``fmt`` (markdown, csv, latex; ``table`` gives Markdown too, for files)."""
    if fmt in ("markdown", "table"):
        return to_markdown(table, title, notes)
    if fmt == "csv":
        return to_csv(table)
    if fmt == "latex":
        return to_latex(table, title, notes)
    raise ConfigError(f"unknown table format {fmt!r}; choose one of {list(FORMATS)}")


def notes_for(df: pd.DataFrame, scope: str, convention: str, extra: list[str] | None = None) -> list[str]:
    df = normalise(df)
    lines = [workload_line(df), options_line(df), *(extra or [])]
    return Conventions(scope, convention, [line for line in lines if line]).lines(df)
