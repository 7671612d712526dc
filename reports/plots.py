"""Figures from tidy result rows (matplotlib/seaborn, each saved as PNG and PDF).

Every figure carries a footnote with its conventions (FLOP = 2 MAC, scope, attention convention).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from mllm_bench.config import ConfigError  # noqa: E402
from mllm_bench.conventions import is_published, published, scope_for  # noqa: E402
from mllm_bench.registry import architecture_spec  # noqa: E402
from mllm_bench.spec import ArchSpec  # noqa: E402

from .rows import IDENTITY, model_labels, normalise, pick, scale_for  # noqa: E402

COMPONENT_ORDER = ("vision", "connector", "attn_proj", "attn_scores", "ffn", "cross_attn", "lm_head", "embedding",
                   "norm")
COMPONENT_NAMES = {"vision": "vision tower", "connector": "connector", "attn_proj": "attention proj.",
                   "attn_scores": "attention scores", "ffn": "FFN", "cross_attn": "cross-attention",
                   "lm_head": "lm_head", "embedding": "embedding", "norm": "norms",
                   "elementwise": "element-wise ops"}
X_NAMES = {"visual_tokens": "visual tokens per sample", "text_tokens": "text tokens per sample",
           "text_after": "text tokens after the image", "image_size": "image size (px)", "batch_size": "batch size",
           "llm": "LLM", "images_per_sample": "images per sample", "text_before": "text tokens before the image"}


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 200, "pdf.fonttype": 42, "axes.titleweight": "bold"})


def _spec(arch: str) -> ArchSpec | None:
    """The registered spec of ``arch``, or None for rows of an architecture this install does not have."""
    try:
        return architecture_spec(arch)
    except ConfigError:
        return None


def arch_name(arch: str) -> str:
    """The display name from the architecture's spec (the registry name if it is not installed)."""
    spec = _spec(arch)
    return spec.display_name if spec else arch


def arch_color(arch: str, fallback_index: int = 0) -> str:
    """The colour from the architecture's spec (a palette colour if it is not installed)."""
    spec = _spec(arch)
    return spec.color if spec else sns.color_palette("tab10")[(fallback_index + 4) % 10]


def save(fig: plt.Figure, stem: str | Path, footnote: str = "") -> list[Path]:
    """Save ``fig`` as ``stem.png`` and ``stem.pdf`` with ``footnote`` under it; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if footnote:  # under everything already drawn (labels, legends), wrapped to the figure's width
        box = fig.get_tightbbox(fig.canvas.get_renderer())
        width, height = fig.get_size_inches()
        text = textwrap.fill(footnote, max(int((box.x1 - box.x0) * 15), 40))
        fig.text(box.x0 / width, (box.y0 - 0.06) / height, text, fontsize=7.5, color="0.35", ha="left", va="top")
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def footnote_for(scope: str = "", convention: str = "", extra: str = "") -> str:
    if is_published(convention):
        conv = published(convention)
        parts = [f"FLOPs: the {conv.name} convention ({conv.title}; multiply-add = {conv.multiply_add}; scope "
                 f"{conv.scope})"]
    else:
        parts = ["FLOP = 2·MAC"]
        if scope:
            parts.append(f"scope: {scope}")
        if convention:
            parts.append(f"attention: {convention}")
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def _model_ticks(ax: plt.Axes, names: list[str]) -> None:
    """Model names under bars; long or many names are slanted so neighbours never overlap."""
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    slant = sum(len(n) + 3 for n in names) > 9 * width_in  # ~9 characters per inch at this font size
    ax.set_xticks(range(len(names)), names, rotation=25 if slant else 0, ha="right" if slant else "center",
                  rotation_mode="anchor")


def _pretty(label: str) -> str:
    arch, _, rest = label.partition(" ")
    return arch_name(arch) + (f" {rest}" if rest else "")


# ----- FLOPs by component ----------------------------------------------------------------------------
def flops_by_component(
    df: pd.DataFrame, stem: str | Path, scope: str = "total", convention: str = "dense",
    panels: Sequence[tuple[str, str, str]] = (("prefill_flops", "inference", "inference: prefill"),
                                              ("train_step_flops", "finetune", "training step: finetune")),
) -> list[Path]:
    """Stacked bars, one per model, split by component; one panel per (metric, stage) that has a breakdown."""
    df = normalise(df)
    scope = scope_for(convention, scope)
    labels = model_labels(df)
    data = []
    for metric, stage, title in panels:
        rows = df[(df["metric"] == metric) & (df["stage"].isin([stage, ""])) & (df["scope"].isin([scope, ""]))
                  & (df["convention"].isin([convention, ""])) & ~df["component"].isin(["all", ""])
                  & df["role"].isin(["all", ""])]
        if rows.empty:
            continue
        order = ("counted", "analytic")
        best = min(rows["source"], key=lambda s: order.index(s) if s in order else len(order))
        rows = rows[rows["source"] == best]
        data.append((title, rows))
    if not data:
        return []
    _style()
    fig, axes = plt.subplots(1, len(data), figsize=(3.6 * len(data) + 1.6, 3.6), squeeze=False)
    components = [c for c in COMPONENT_ORDER if any(c in set(r["component"]) for _, r in data)]
    components += sorted({c for _, r in data for c in r["component"]} - set(components))
    palette = dict(zip(components, sns.color_palette("Set2", len(components)), strict=True))
    for ax, (title, rows) in zip(axes[0], data, strict=True):
        keys = [k for k in labels if k in set(rows[list(IDENTITY)].itertuples(index=False, name=None))]
        divisor, unit = scale_for("FLOP", rows.groupby(list(IDENTITY))["value"].sum())
        bottom = np.zeros(len(keys))
        for comp in components:
            vals = np.array([rows[(rows[list(IDENTITY)].apply(tuple, axis=1) == k) & (rows["component"] == comp)]
                             ["value"].sum() for k in keys]) / divisor
            if not vals.any():
                continue
            ax.bar(range(len(keys)), vals, bottom=bottom, color=palette[comp], label=COMPONENT_NAMES.get(comp, comp),
                   width=0.65, edgecolor="white", linewidth=0.5)
            bottom += vals
        for i, total in enumerate(bottom):
            ax.text(i, total, f"{total:.3g}", ha="center", va="bottom", fontsize=8)
        _model_ticks(ax, [_pretty(labels[k]) for k in keys])
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, bottom.max() * 1.12 if len(bottom) else 1)
    handles, names = [], []
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.55), frameon=False, fontsize=8.5)
    fig.suptitle("FLOPs by component", fontsize=11, fontweight="bold")
    fig.tight_layout()
    workloads = "; ".join(f"{title}: {panel_workload(rows)}" for title, rows in data)
    return save(fig, stem, footnote_for(scope, convention, workloads))


def panel_workload(rows: pd.DataFrame) -> str:
    """The workload behind a panel's rows, e.g. "576 visual + 40 + 216 text tokens, batch 1"."""
    def values(col: str) -> list[str]:
        if col not in rows.columns:
            return []
        return sorted({str(int(float(v))) for v in rows[col] if str(v) not in ("", "nan")}, key=int)

    visual, before, after, batch = (values(c) for c in ("visual_tokens", "text_before", "text_after", "batch_size"))
    if not visual or len(visual) > 1 or len(before) > 1 or len(after) > 1:
        return "workload differs by model" if visual else "workload not recorded"
    text = f" + {before[0]} + {after[0]} text tokens" if before and after else ""
    return f"{visual[0]} visual{text}" + (f", batch {'/'.join(batch)}" if batch else "")


# ----- cost curves with crossovers ---------------------------------------------------------------------
def crossovers(x: Sequence[float], a: Sequence[float], b: Sequence[float], rtol: float = 1e-9
               ) -> list[tuple[float, float]]:
    """Where curve ``a`` crosses ``b`` (linear between samples): a list of (x, y).

    Samples where the curves touch are skipped, so curves that coincide have no crossover; one that
    changes sign across a touching sample is placed at that sample.
    """
    scale = max([abs(v) for v in (*a, *b)] or [0.0])
    signed = [(i, a[i] - b[i]) for i in range(len(x)) if abs(a[i] - b[i]) > rtol * scale]
    out = []
    for (i, d0), (j, d1) in zip(signed, signed[1:], strict=False):
        if d0 * d1 > 0:
            continue
        if j > i + 1:  # touching in between: the crossing is the first touching sample
            out.append((float(x[i + 1]), float(a[i + 1])))
        else:
            t = d0 / (d0 - d1)
            out.append((x[i] + t * (x[j] - x[i]), a[i] + t * (a[j] - a[i])))
    return out


def cost_curves(
    df: pd.DataFrame, x: str, stem: str | Path,
    panels: Sequence[tuple[str, dict[str, str], str]] = (),
    scope: str = "language", convention: str = "dense", hue: str | None = None, note: str = "",
) -> list[Path]:
    """One panel per metric: cost vs ``x`` per model, crossovers between models marked and labelled.

    ``panels`` are (metric, where, title); ``hue`` (a second varied field) draws one line style per value;
    ``note`` is added to the footnote (e.g. how visual-token counts map to images).
    """
    df = normalise(df)
    panels = panels or default_curve_panels(scope, convention)
    numeric_x = x != "llm"
    drawn = []
    for metric, where, title in panels:
        by = [*IDENTITY, x] + ([hue] if hue else [])
        rows = pick(df, metric, by=by, **where)
        if not rows.empty:
            drawn.append((metric, title, rows))
    if not drawn:
        return []
    _style()
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.5), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (_metric, title, rows) in zip(axes[0], drawn, strict=True):
        divisor, unit = scale_for(rows["unit"].iloc[0], rows["value"])
        curves: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        hues = sorted(set(rows[hue]), key=_sort_key) if hue else [None]
        labels = model_labels(rows)
        for h_i, h in enumerate(hues):
            for m_i, key in enumerate(labels):
                sel = rows[(rows[list(IDENTITY)].apply(tuple, axis=1) == key)]
                if hue:
                    sel = sel[sel[hue] == h]
                if sel.empty:
                    continue
                sel = sel.assign(_x=sel[x].map(_sort_key)).sort_values("_x")
                xs = sel["_x"].to_numpy(dtype=float) if numeric_x else np.arange(len(sel))
                ys = sel["value"].to_numpy(dtype=float) / divisor
                name = _pretty(labels[key]) + (f", {hue}={h}" if hue else "")
                # later models drawn thinner, so curves that coincide (e.g. equal KV caches) stay visible
                ax.plot(xs, ys, styles[h_i % len(styles)], marker="o", ms=max(6.0 - 1.2 * m_i, 3.0),
                        color=arch_color(key[0], m_i), label=name, lw=max(2.4 - 0.6 * m_i, 1.0))
                curves[(h, key)] = (xs, ys)
        _mark_crossovers(ax, curves)
        ax.set_xlabel(X_NAMES.get(x, x))
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        if not numeric_x:
            ax.set_xticks(range(len(set(rows[x]))), sorted(set(rows[x]), key=_sort_key))
        if numeric_x:
            xs_all = sorted({_sort_key(v) for v in rows[x]})
            if len(xs_all) > 2 and xs_all[-1] / max(xs_all[0], 1e-9) >= 64:  # else linear keeps ticks apart
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs_all, [f"{v:g}" for v in xs_all])
                ax.minorticks_off()
        ax.set_ylim(bottom=0)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(names), 4),
               frameon=False, fontsize=8.5)
    fig.suptitle(f"Cost vs {X_NAMES.get(x, x)}", fontsize=11, fontweight="bold")
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.22 + 0.05 * ((len(names) - 1) // 4))
    return save(fig, stem, footnote_for(scope, convention, "× = crossover" + (f"; {note}" if note else "")))


def _sort_key(v: object) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def _mark_crossovers(ax: plt.Axes, curves: dict[tuple, tuple[np.ndarray, np.ndarray]]) -> None:
    keys = list(curves)
    marked: list[tuple[float, float]] = []
    for i, ka in enumerate(keys):
        for kb in keys[i + 1:]:
            if ka[0] != kb[0]:  # compare models within one hue value
                continue
            xa, ya = curves[ka]
            xb, yb = curves[kb]
            if len(xa) != len(xb) or not np.allclose(xa, xb):
                continue
            for cx, cy in crossovers(xa, ya, yb):
                if any(abs(cx - mx) < 1e-9 and abs(cy - my) < 1e-9 for mx, my in marked):
                    continue
                marked.append((cx, cy))
                ax.plot([cx], [cy], marker="x", ms=9, mew=2, color="black", zorder=5)
                ax.annotate(f"{cx:.0f}" if abs(cx) >= 10 else f"{cx:.2g}", (cx, cy), textcoords="offset points",
                            xytext=(4, 6), fontsize=8, color="black")


def default_curve_panels(scope: str, convention: str) -> list[tuple[str, dict[str, str], str]]:
    flops = {"scope": scope_for(convention, scope), "convention": convention}
    return [
        ("prefill_flops", {"stage": "inference", **flops}, "prefill FLOPs"),
        ("train_step_flops", {"stage": "finetune", **flops}, "train-step FLOPs (finetune)"),
        ("kv_cache_bytes", {"role": "all"}, "KV cache / sample"),
        ("prefill_latency_s", {"scope": scope}, "prefill latency (measured)"),
    ]


# ----- training vs inference trade-off (the SAISA paper's Figure 1 style) ------------------------------
def tradeoff(points: pd.DataFrame, stem: str | Path, x_label: str = "training budget (GPU-hours)",
             y_label: str = "inference TFLOPs", footnote: str = "") -> list[Path]:
    """Scatter of ``points`` (columns arch, x, y[, group]): lower-left is better on both axes.

    Colour = architecture, marker = group (e.g. LLM size); both explained in legends, so labels never collide.
    """
    _style()
    groups = list(dict.fromkeys(points["group"])) if "group" in points.columns else [""]
    markers = ["o", "s", "^", "D"]
    fig, ax = plt.subplots(figsize=(5.4, 4.0))
    for g_i, g in enumerate(groups):
        sel = points[points["group"] == g] if g else points
        for i, (_, p) in enumerate(sel.iterrows()):
            ax.scatter(p["x"], p["y"], s=150, marker=markers[g_i % len(markers)], color=arch_color(p["arch"], i),
                       edgecolor="black", linewidth=0.6, zorder=3)
    archs = list(dict.fromkeys(points["arch"]))
    handles = [plt.Line2D([], [], ls="", marker="o", ms=9, color=arch_color(a, i), markeredgecolor="black",
                          label=arch_name(a)) for i, a in enumerate(archs)]
    if groups != [""]:
        handles += [plt.Line2D([], [], ls="", marker=markers[i % len(markers)], ms=9, color="0.85",
                               markeredgecolor="black", label=g) for i, g in enumerate(groups)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    xmax, ymax = points["x"].max(), points["y"].max()
    ax.set_xlim(0, xmax * 1.1)
    ax.set_ylim(0, ymax * 1.12)
    ax.annotate("better", xy=(0.05, 0.62), xytext=(0.2, 0.85), xycoords="axes fraction", fontsize=9, color="0.3",
                arrowprops={"arrowstyle": "->", "color": "0.4", "lw": 1.5})
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("Training budget vs inference cost", fontsize=11)
    fig.tight_layout()
    return save(fig, stem, footnote)


# ----- memory by component ----------------------------------------------------------------------------
MEMORY_PARTS = (("weights_bytes", "weights"), ("grads_bytes", "gradients"), ("optimizer_bytes", "optimizer state"),
                ("activations_bytes", "activations"))


def memory_by_component(df: pd.DataFrame, stem: str | Path, stage: str = "finetune") -> list[Path]:
    """Two panels: inference (weights + KV cache by modality) and a training step of ``stage``."""
    df = normalise(df)
    labels = model_labels(df)
    panels = []
    inference = [("weights", pick(df, "weights_bytes", stage=("inference",))),
                 ("KV cache, visual", pick(df, "kv_cache_bytes", role="visual")),
                 ("KV cache, text", pick(df, "kv_cache_bytes", role="text"))]
    training = [(name, pick(df, metric, stage=("inference",) if metric == "weights_bytes" else stage))
                for metric, name in MEMORY_PARTS]
    for title, parts in (("inference (per sample KV)", inference), (f"training step ({stage})", training)):
        parts = [(n, r[r["role"].isin(["all", ""]) | (r["metric"] == "kv_cache_bytes")]) for n, r in parts]
        if any(not r.empty for _, r in parts[1:]):
            panels.append((title, parts))
    if not panels:
        return []
    _style()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels) + 1.4, 3.6), squeeze=False)
    names = [n for _, parts in panels for n, _ in parts]
    palette = dict(zip(dict.fromkeys(names), sns.color_palette("Set2", len(set(names))), strict=True))
    for ax, (title, parts) in zip(axes[0], panels, strict=True):
        keys = list(labels)
        table = np.array([[_value(r, k) for k in keys] for _, r in parts])
        divisor, unit = scale_for("bytes", table.sum(axis=0))
        bottom = np.zeros(len(keys))
        for (name, _), vals in zip(parts, table / divisor, strict=True):
            ax.bar(range(len(keys)), vals, bottom=bottom, color=palette[name], label=name, width=0.65,
                   edgecolor="white", linewidth=0.5)
            bottom += vals
        for i, total in enumerate(bottom):
            ax.text(i, total, f"{total:.3g}", ha="center", va="bottom", fontsize=8)
        _model_ticks(ax, [_pretty(labels[k]) for k in keys])
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(bottom.max(), 1e-9) * 1.12)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle("Memory by component (analytic)", fontsize=11, fontweight="bold")
    fig.tight_layout()
    return save(fig, stem, "bytes in binary units (GiB = 2^30); AdamW state; activations as the profiler estimates")


def _value(rows: pd.DataFrame, key: tuple) -> float:
    sel = rows[rows[list(IDENTITY)].apply(tuple, axis=1) == key] if len(rows) else rows
    return float(sel["value"].iloc[0]) if len(sel) else 0.0


# ----- roofline -----------------------------------------------------------------------------------------
def roofline(df: pd.DataFrame, stem: str | Path, peak_flops: float, bandwidth: float, device: str = "") -> list[Path]:
    """Measured achieved FLOP/s per phase against the roof min(peak, bandwidth × intensity).

    Intensity = FLOPs of the phase ÷ bytes it must read at least once (weights, plus the KV cache for
    decode): a lower bound on traffic, so points sit at or left of their true intensity.
    """
    df = normalise(df)
    achieved = df[(df["metric"] == "achieved_flops_per_s") & (df["source"] == "measured")]
    if achieved.empty or not peak_flops or not bandwidth:
        return []
    weights = pick(df, "weights_bytes", stage=("inference",))
    kv = pick(df, "kv_cache_bytes", role="all")
    flops_metric = {"prefill": "prefill_flops", "decode": "decode_flops_per_token", "train_step": "train_step_flops"}
    points = []
    for _, r in achieved.iterrows():
        key = tuple(r[c] for c in IDENTITY)
        metric = flops_metric.get(r["phase"])
        if not metric:
            continue
        flops = pick(df, metric, stage=r["stage"] or "inference", scope="total", convention="effective")
        f = _value(flops, key)
        bytes_read = _value(weights, key) + (_value(kv, key) * max(float(r.get("batch_size") or 1), 1)
                                             if r["phase"] == "decode" else 0.0)
        if f and bytes_read:
            points.append((r["arch"], r["phase"], f / bytes_read, float(r["value"])))
    if not points:
        return []
    _style()
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    lo = min(p[2] for p in points) / 4
    hi = max(max(p[2] for p in points) * 4, peak_flops / bandwidth * 4)
    xs = np.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(xs, np.minimum(peak_flops, bandwidth * xs), color="0.2", lw=1.5, label="roof")
    markers = {"prefill": "o", "decode": "s", "train_step": "^"}
    for i, (arch, phase, x, y) in enumerate(points):
        ax.scatter(x, y, color=arch_color(arch, i), marker=markers.get(phase, "o"), s=60, edgecolor="black",
                   zorder=3, label=f"{arch_name(arch)} {phase}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"Roofline{' — ' + device if device else ''}", fontsize=11)
    ax.legend(fontsize=7.5, frameon=False, loc="lower right")
    fig.tight_layout()
    return save(fig, stem, f"peak {peak_flops:.3g} FLOP/s, bandwidth {bandwidth:.3g} B/s; FLOP = 2·MAC")


def measured_panels(df: pd.DataFrame, stem: str | Path, decode_mode: str, speedup_target: float = 0.9) -> list[Path]:
    """``benchmarks/gpu_bench.py``'s six panels of measured rows, one bar per (architecture, visual tokens):
    prefill (total and language scope, batch 1), decode in ``decode_mode``, finetune step and its MFU, and
    the prefill speedup ÷ FLOP-predicted (throughput batch; a dashed line at ``speedup_target``)."""
    panels = [("prefill_latency_s", {"scope": "total"}, "prefill (total, batch 1), ms", 1e3),
              ("prefill_latency_s", {"scope": "language"}, "prefill (language, batch 1), ms", 1e3),
              ("decode_latency_s", {}, f"decode ({decode_mode}), ms/token", 1e3),
              ("train_step_latency_s", {"stage": "finetune"}, "finetune step, ms", 1e3),
              ("mfu", {"phase": "train_step", "stage": "finetune"}, "finetune-step MFU, %", 100),
              ("prefill_speedup_vs_flops", {"scope": "language"},
               "prefill speedup / FLOP-predicted\n(language, throughput batch)", 1)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=150)
    archs = list(dict.fromkeys(df["arch"]))
    visual = sorted(set(df["visual_tokens"]))
    for ax, (metric, match, title, scale) in zip(axes.flat, panels, strict=True):
        sel = df[df["metric"] == metric]
        for k, v in match.items():
            sel = sel[sel[k] == v]
        if metric == "decode_latency_s":
            sel = sel[sel["note"].str.endswith(f"decode={decode_mode}")]
        # one bar per (arch, visual): batch 1 for latencies, the throughput batch for the speedup ratio
        sel = sel.sort_values("batch_size", ascending=metric != "prefill_speedup_vs_flops", kind="stable")
        width = 0.8 / max(len(visual), 1)
        for j, vt in enumerate(visual):
            ys = [sel[(sel["arch"] == a) & (sel["visual_tokens"] == vt)]["value"] for a in archs]
            heights = [float(y.iloc[0]) * scale if len(y) else 0.0 for y in ys]
            ax.bar([i + j * width for i in range(len(archs))], heights, width, label=f"{vt} visual")
        if metric == "prefill_speedup_vs_flops":
            ax.axhline(speedup_target, color="k", ls="--", lw=1)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(archs))], archs)
        ax.set_title(title, fontsize=10)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{df['device_name'].iloc[0]}: measured cost per architecture", fontsize=11)
    fig.tight_layout()
    return save(fig, stem)
