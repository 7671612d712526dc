"""Comparison tables: one row per quantity, one column per model, each with its change vs a baseline.

:func:`comparison` builds the table in long form (quantity, model, value, unit, vs_baseline) from tidy
result rows; the renderers turn it into a rich table, Markdown, CSV or LaTeX, each followed by the
conventions the numbers follow.

Measured numbers carry how far to trust them: a timed value shows the spread of its repeats (IQR as a
percentage of the median), a memory quantity measured from the CPU's resident set says so in its label, and a
value (or a change vs the baseline computed from one) that is noisy or was timed on a busy host is marked ``†``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pandas as pd
from rich.table import Table

from mllm_bench.choices import FORMATS as FORMATS  # re-exported
from mllm_bench.config import ConfigError
from mllm_bench.conventions import is_published
from mllm_bench.environment import BUSY_LOAD_FRACTION, is_busy

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

# The latency metric (median of timed repeats) of each timed phase; its ``latency_iqr_s`` row has the same phase.
PHASE_LATENCY = {"vision_encode": "vision_encode_latency_s", "prefill": "prefill_latency_s",
                 "decode": "decode_latency_s", "train_step": "train_step_latency_s"}
LATENCY_PHASE = {metric: phase for phase, metric in PHASE_LATENCY.items()}
# A timed value whose IQR exceeds this fraction of its median is marked noisy.
NOISY_SPREAD = 0.25
# How measured memory was taken (a row's ``note``) where it is not an allocator's peak: label and caveat.
RSS_METHODS = {
    "cpu_rss_peak_delta": "how far the process's peak resident set (VmHWM) rose during the phase",
    "cpu_maxrss_delta": "how far the process's lifetime peak resident set (ru_maxrss) rose during the phase; 0 "
                        "when an earlier phase peaked higher",
}
FLAG = "†"


@dataclass(frozen=True)
class Quantity:
    """A table row: ``metric`` filtered by ``where`` (see :func:`reports.rows.pick`)."""

    label: str
    metric: str
    where: tuple[tuple[str, str], ...] = ()
    sources: tuple[str, ...] = SOURCE_ORDER


def compare_quantities(scope: str = "language", convention: str = "dense",
                       stages: tuple[str, ...] = ("pretrain", "finetune")) -> list[Quantity]:
    """What ``mllm-bench compare`` shows, in order (rows without data are dropped later). A published
    convention fixes its own scope, so ``scope`` does not filter its FLOPs rows."""
    flops: tuple[tuple[str, str], ...] = (("scope", scope), ("convention", convention))
    if is_published(convention):
        flops = (("convention", convention),)
    out = [Quantity("parameters", "params", (("stage", "inference"),))]
    out += [Quantity(f"trainable parameters ({s})", "trainable_params", (("stage", s),)) for s in stages]
    out += [
        Quantity("prefill FLOPs", "prefill_flops", (("stage", "inference"), *flops)),
        Quantity("decode FLOPs / token", "decode_flops_per_token", (("stage", "inference"), *flops)),
    ]
    out += [
        Quantity("LLaVA-1.5-equivalent visual tokens", "equivalent_visual_tokens", (("stage", "inference"), *flops)),
        Quantity("layer-averaged visual tokens", "layer_avg_visual_tokens", (("stage", "inference"),)),
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
        Quantity("prefill latency (TTFT)", "prefill_latency_s", (("scope", scope),), measured),
        Quantity("decode latency / token", "decode_latency_s", (), measured),
        Quantity("decode throughput", "tokens_per_s", (("phase", "decode"),), measured),
        Quantity("prefill MFU", "mfu", (("phase", "prefill"), ("scope", scope)), measured),
        Quantity("prefill peak memory", "peak_memory_bytes", (("phase", "prefill"), ("scope", scope)), measured),
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
    measured = df[df["source"] == "measured"]
    by_metric = {m: rows for m, rows in df.groupby("metric", sort=False)}  # one pass, not one per quantity
    records = []
    for q in quantities:
        rows = pick(by_metric.get(q.metric, df.iloc[:0]), q.metric, q.sources, **dict(q.where))
        if rows.empty:
            continue
        values = {tuple(r[c] for c in IDENTITY): r for _, r in rows.iterrows()}
        base = next((values[k]["value"] for k in base_keys if k in values), math.nan)
        for key, label in labels.items():
            if key not in values:
                continue
            r = values[key]
            change = math.nan if key[0] == baseline or not base else r["value"] / base - 1
            iqr, spread = timing_spread(measured, r) if r["source"] == "measured" else (math.nan, math.nan)
            records.append({"quantity": q.label, "model": label, "arch": key[0], "llm": key[1], "vision": key[2],
                            "options": key[3], "metric": q.metric, "value": float(r["value"]), "unit": r["unit"],
                            "source": r["source"], "vs_baseline": change, "iqr": iqr, "spread": spread,
                            "memory_method": r["note"] if r["note"] in RSS_METHODS else "",
                            "busy": r["source"] == "measured" and r["unit"] != "bytes" and row_busy(r)})
    out = pd.DataFrame.from_records(records)
    if out.empty:
        raise ConfigError("no result rows match the table's quantities; was anything profiled?")
    out["flagged"] = out["busy"] | (out["spread"] > NOISY_SPREAD)
    out.attrs["baseline"] = baseline
    out.attrs["models"] = list(labels.values())
    return out


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def row_busy(row: pd.Series) -> bool:
    """Whether a measured row was made on a busy host (its environment's load average vs CPU count)."""
    load, cpus = _number(row.get("load_avg_1m", "")), _number(row.get("cpu_count", ""))
    return not (math.isnan(load) or math.isnan(cpus)) and is_busy(load, cpus)


def timing_spread(measured: pd.DataFrame, row: pd.Series) -> tuple[float, float]:
    """(IQR in the row's unit, IQR ÷ median) of the timed repeats a measured row comes from: the
    ``latency_iqr_s`` row of its model, stage and phase, over the phase's latency median. The IQR is
    NaN for rows that are not latencies (throughput, MFU: their relative spread is the timing's); both are
    NaN for rows not timed (memory)."""
    phase = LATENCY_PHASE.get(row["metric"], row["phase"])
    if phase not in PHASE_LATENCY or row["unit"] == "bytes":
        return math.nan, math.nan
    same = measured
    for col in (*IDENTITY, "stage"):
        same = same[same[col] == row[col]]
    same = same[same["phase"].isin([phase, ""])]

    def one(metric: str) -> float:
        sel = same[same["metric"] == metric]
        if row["scope"] and (sel["scope"] == row["scope"]).any():
            sel = sel[sel["scope"] == row["scope"]]
        return float(sel["value"].iloc[0]) if len(sel) else math.nan

    iqr, median = one("latency_iqr_s"), one(PHASE_LATENCY[phase])
    spread = iqr / median if median > 0 else math.nan
    return (iqr if row["metric"] == PHASE_LATENCY[phase] else math.nan), spread


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
        label = str(quantity) + (" (CPU RSS growth)" if any(group.get("memory_method", pd.Series(dtype=str)))
                                 else "")
        row = [label, unit, "/".join(dict.fromkeys(group["source"]))]
        base = next((by_model[m] for m in base_models if m in by_model), None)
        for m in models:
            r = by_model.get(m)
            row.append(_value_cell(r, divisor) if r is not None else "—")
            if m not in base_models:
                flagged = r is not None and (_flagged(r) or (base is not None and _flagged(base)))
                change = fmt_change(r["vs_baseline"]) if r is not None else "—"
                row.append(change + (f" {FLAG}" if flagged and change != "—" else ""))
        body.append(row)
    return header, body


def _flagged(r: pd.Series) -> bool:
    return bool(r.get("flagged", False))


def _value_cell(r: pd.Series, divisor: float) -> str:
    """The value, then for a timed value its spread ``(IQR 4%)``, then ``†`` when noisy or timed on a busy host."""
    text = fmt_number(r["value"], divisor)
    spread = r.get("spread", math.nan)
    if spread is not None and not math.isnan(spread):
        text += f" (IQR {spread * 100:.0f}%)" if spread >= 0.01 else f" (IQR {spread * 100:.1f}%)"
    return text + (f" {FLAG}" if _flagged(r) else "")


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
    """The long form, machine-readable: raw values in their base units, vs_baseline as a fraction; for measured
    rows ``iqr`` (latencies, seconds), ``spread`` (IQR ÷ median of the timing), ``memory_method`` (CPU resident-set
    methods) and ``flagged`` (noisy or timed on a busy host)."""
    buf = io.StringIO()
    cols = ["quantity", "model", "arch", "llm", "vision", "options", "metric", "value", "unit", "source",
            "vs_baseline", "iqr", "spread", "memory_method", "flagged"]
    table[[c for c in cols if c in table.columns]].to_csv(buf, index=False)
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
    return Conventions(scope, convention, [line for line in lines if line]).lines(df) + measured_notes(df)


def measured_notes(df: pd.DataFrame) -> list[str]:
    """What the measured rows' labels mean: the spread, the CPU memory method, the flag, a busy host."""
    measured = df[df["source"] == "measured"]
    if measured.empty:
        return []
    notes = []
    if (measured["metric"] == "latency_iqr_s").any():
        notes.append("(IQR n%) after a measured value: the interquartile range of its timed repeats as a percentage "
                     "of their median (throughput and MFU share the timing of their phase); measured memory is "
                     "one run.")
    methods = [m for m in RSS_METHODS if (measured["note"] == m).any()]
    for method in methods:
        notes.append(f"Measured memory labelled \"CPU RSS growth\" ({method}): {RSS_METHODS[method]}. Coarse: it "
                     "includes allocator caching and anything else the process allocated, and is not comparable "
                     "with a CUDA allocator's peak.")
    timed = measured[measured["unit"] != "bytes"]
    busy = timed[[row_busy(r) for _, r in timed.iterrows()]]
    noisy = [timing_spread(measured, r)[1] > NOISY_SPREAD for _, r in timed.iterrows()
             if r["metric"] == "latency_iqr_s"]
    if len(busy) or any(noisy):
        notes.append(f"{FLAG} marks a measured value, or a change vs the baseline computed from one, whose IQR "
                     f"exceeds {NOISY_SPREAD * 100:.0f}% of its median or that was timed on a busy host: not "
                     "reliable.")
    if len(busy):
        loads = sorted({(r["load_avg_1m"], r["cpu_count"]) for _, r in busy.iterrows()})
        seen = ", ".join(f"{load} on {cpus} CPUs" for load, cpus in loads[:3]) + ("…" if len(loads) > 3 else "")
        notes.append(f"Warning: the host was busy while measuring {', '.join(dict.fromkeys(busy['arch']))} "
                     f"(1-minute load average {seen}; busy = at least {BUSY_LOAD_FRACTION:g} × the CPU count): "
                     "measured times are unreliable; rerun on an idle machine.")
    return notes
