"""Pareto fronts of cost against cost (or against accuracy) and their plots.

A point is on the front when no other point is at least as good on every axis and better on one: costs
(``x``, ``y``) are minimised, an ``accuracy`` axis, when given, is maximised. Points with a missing value on
any axis are never on the front (and are drawn hollow, as dominated ones are).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mllm_bench.config import ConfigError
from mllm_bench.conventions import scope_for

from .rows import IDENTITY, model_labels, normalise, pick, scale_for


def pareto_front(df: pd.DataFrame, x: str, y: str | None = None, accuracy: str | None = None) -> pd.Series:
    """Boolean mask (aligned with ``df``'s index): the rows no other row dominates.

    ``x`` and ``y`` are minimised, ``accuracy`` maximised; ``y`` or ``accuracy`` may be left out (at least two
    axes in all). Equal points are all on the front (neither dominates the other)."""
    axes = [c for c in (x, y) if c is not None]
    signs = [1.0] * len(axes)
    if accuracy is not None:
        axes.append(accuracy)
        signs.append(-1.0)  # maximised: compare its negation
    if len(axes) < 2:
        raise ConfigError("pareto_front needs two axes at least: x and y, or x and accuracy")
    missing = [c for c in axes if c not in df.columns]
    if missing:
        raise ConfigError(f"pareto_front: no column(s) {missing}; columns are {list(df.columns)}")
    values = np.column_stack([pd.to_numeric(df[c], errors="coerce").to_numpy(float) * s
                              for c, s in zip(axes, signs, strict=True)])
    finite = np.isfinite(values).all(axis=1)
    mask = np.zeros(len(df), dtype=bool)
    pts = values[finite]
    for i in np.flatnonzero(finite):
        p = values[i]
        dominated = ((pts <= p).all(axis=1) & (pts < p).any(axis=1)).any()
        mask[i] = not dominated
    return pd.Series(mask, index=df.index, name="pareto")


def cost_points(df: pd.DataFrame, quantities: Sequence[tuple[str, str, dict[str, str]]]) -> pd.DataFrame:
    """One row per model (columns ``label``, ``arch`` and one per quantity) from tidy result rows.

    ``quantities``: (column name, metric, where) triples, each picked as :func:`reports.rows.pick` does (the
    preferred source; aggregate component/role rows). A model without a value gets NaN."""
    df = normalise(df)
    labels = model_labels(df)
    out = pd.DataFrame({"label": list(labels.values()), "arch": [k[0] for k in labels]},
                       index=pd.MultiIndex.from_tuples(list(labels), names=list(IDENTITY)))
    for column, metric, where in quantities:
        rows = pick(df, metric, **where)
        values = {tuple(r[c] for c in IDENTITY): float(r["value"]) for _, r in rows.iterrows()}
        out[column] = [values.get(k, math.nan) for k in labels]
    return out.reset_index(drop=True)


def inference_cost_points(df: pd.DataFrame, scope: str, convention: str) -> pd.DataFrame:
    """Prefill FLOPs (``prefill_flops``, per batch, at ``scope``/``convention``) and KV cache per sample
    (``kv_cache_bytes``, every role) of each model."""
    return cost_points(df, [
        ("prefill_flops", "prefill_flops", {"stage": "inference", "scope": scope_for(convention, scope),
                                            "convention": convention}),
        ("kv_cache_bytes", "kv_cache_bytes", {"role": "all"}),
    ])


def pareto_plot(points: pd.DataFrame, x: str, y: str, stem: str | Path, x_label: str = "", y_label: str = "",
                x_unit: str = "", y_unit: str = "", maximise_y: bool = False, footnote: str = "",
                title: str = "") -> list[Path]:
    """Scatter of ``points`` (columns ``label``, ``arch``, ``x``, ``y``) with the Pareto front joined by a step line:
    filled markers on the front, hollow ones dominated. ``x`` is minimised, ``y`` minimised (a cost) or, with
    ``maximise_y``, maximised (an accuracy). Units (``FLOP``, ``bytes``, ...) scale the axes as the tables do.
    Returns the PNG and PDF paths (nothing when no point has both values)."""
    from . import plots  # matplotlib loads only when plotting

    pts = points.assign(_x=pd.to_numeric(points[x], errors="coerce"), _y=pd.to_numeric(points[y], errors="coerce"))
    pts = pts[np.isfinite(pts["_x"]) & np.isfinite(pts["_y"])]
    if pts.empty:
        return []
    front = pareto_front(pts, "_x", None if maximise_y else "_y", "_y" if maximise_y else None)
    xdiv, xname = scale_for(x_unit, pts["_x"]) if x_unit else (1.0, "")
    ydiv, yname = scale_for(y_unit, pts["_y"]) if y_unit else (1.0, "")
    plots._style()
    fig, ax = plots.plt.subplots(figsize=(5.8, 4.2))
    for i, (idx, p) in enumerate(pts.iterrows()):
        color = plots.arch_color(p["arch"], i)
        on = bool(front.loc[idx])
        ax.scatter(p["_x"] / xdiv, p["_y"] / ydiv, s=110, marker="o", zorder=3, linewidth=1.2,
                   color=color if on else "white", edgecolor=color if not on else "black")
        ax.annotate(plots._pretty(str(p["label"])), (p["_x"] / xdiv, p["_y"] / ydiv), textcoords="offset points",
                    xytext=(9, 0), ha="left", va="center", fontsize=8, zorder=4)  # beside the marker, not on it
    best = pts[front.to_numpy()].sort_values(["_x", "_y"], ascending=[True, not maximise_y])
    if len(best) > 1:
        ax.step(best["_x"] / xdiv, best["_y"] / ydiv, where="post", color="0.3", lw=1.2, ls="--", zorder=2,
                label="Pareto front")
        ax.legend(loc="best", frameon=False, fontsize=8)
    ax.set_xlabel(x_label + (f" ({xname})" if xname else ""))
    ax.set_ylabel(y_label + (f" ({yname})" if yname else ""))
    ax.set_title(title or "Pareto front", fontsize=11)
    better = "lower left" if not maximise_y else "upper left"
    note = f"filled: on the Pareto front (better = {better}); hollow: dominated"
    fig.tight_layout()
    return plots.save(fig, stem, "; ".join(p for p in (footnote, note) if p))


def inference_pareto(df: pd.DataFrame, stem: str | Path, scope: str, convention: str) -> list[Path]:
    """Prefill FLOPs vs KV cache per sample, one point per model, the front marked."""
    from .plots import footnote_for

    points = inference_cost_points(df, scope, convention)
    return pareto_plot(points, "prefill_flops", "kv_cache_bytes", stem, "prefill FLOPs", "KV cache / sample",
                       "FLOP", "bytes", footnote=footnote_for(scope, convention, "prefill per batch"),
                       title="Prefill FLOPs vs KV cache")


def accuracy_pareto(df: pd.DataFrame, accuracy: pd.DataFrame, folder: str | Path, scope: str,
                    convention: str) -> list[Path]:
    """Per benchmark, prefill FLOPs (minimised) vs the score (maximised, or minimised where the file says lower is
    better), as ``pareto_accuracy_<benchmark>``; ``accuracy``: rows of :func:`reports.accuracy.join`."""
    from .accuracy import benchmarks, slug
    from .plots import footnote_for

    costs = inference_cost_points(df, scope, convention)
    keys = list(model_labels(normalise(df)))
    written: list[Path] = []
    for bench in benchmarks(accuracy):
        sel = accuracy[accuracy["benchmark"] == bench]
        score = {tuple(str(r[c]) for c in IDENTITY): float(r["value"]) for _, r in sel.iterrows()}
        points = costs.assign(score=[score.get(tuple(str(v) for v in k), math.nan) for k in keys])
        higher = bool(sel["higher_is_better"].all()) if "higher_is_better" in sel.columns else True
        written += pareto_plot(points, "prefill_flops", "score", Path(folder) / f"pareto_accuracy_{slug(bench)}",
                               "prefill FLOPs", bench, "FLOP", "", maximise_y=higher,
                               footnote=footnote_for(scope, convention, "prefill per batch; scores as reported"),
                               title=f"Prefill FLOPs vs {bench}")
    return written
