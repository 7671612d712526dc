"""Pareto fronts on hand-made points, and the plot of cost vs cost from result rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mllm_bench.reports.pareto import inference_cost_points, inference_pareto, pareto_front, pareto_plot

from mllm_bench.config import ConfigError
from mllm_bench.results import to_frame
from mllm_bench.schema import make_row


def front(points: dict[str, tuple], **axes) -> set[str]:
    df = pd.DataFrame([{"name": k, **dict(zip(("a", "b", "c"), v, strict=False))} for k, v in points.items()])
    mask = pareto_front(df, **axes)
    return set(df[mask]["name"])


def test_two_costs_minimised():
    points = {"A": (1, 9), "B": (2, 5), "C": (3, 6), "D": (4, 1), "E": (4, 2), "F": (9, 9)}
    # C: B is lower on both; E: D has the same a and lower b; F: dominated by all
    assert front(points, x="a", y="b") == {"A", "B", "D"}


def test_equal_points_are_both_on_the_front():
    assert front({"A": (1, 1), "B": (1, 1), "C": (2, 2)}, x="a", y="b") == {"A", "B"}


def test_accuracy_is_maximised():
    points = {"A": (1, 0, 0.50), "B": (2, 0, 0.70), "C": (3, 0, 0.60), "D": (5, 0, 0.90)}
    # cost vs accuracy: C costs more than B and scores less
    assert front(points, x="a", accuracy="c") == {"A", "B", "D"}
    # a cheaper second cost keeps C on the three-axis front
    three = {"A": (1, 5, 0.5), "B": (2, 5, 0.7), "C": (3, 1, 0.6), "D": (5, 5, 0.9), "E": (5, 6, 0.9)}
    assert front(three, x="a", y="b", accuracy="c") == {"A", "B", "C", "D"}


def test_missing_values_are_never_on_the_front():
    assert front({"A": (1, math.nan), "B": (2, 2), "C": (3, 1)}, x="a", y="b") == {"B", "C"}


def test_front_needs_two_axes_and_real_columns():
    df = pd.DataFrame({"a": [1.0]})
    with pytest.raises(ConfigError, match="two axes"):
        pareto_front(df, "a")
    with pytest.raises(ConfigError, match=r"no column\(s\) \['b'\]"):
        pareto_front(df, "a", "b")


def rows_of(values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    rows = []
    for arch, (flops, kv) in values.items():
        base = {"arch": arch, "llm": "vicuna-7b", "vision": "clip-vit-l-336"}
        rows.append(make_row(base, "prefill_flops", flops, "analytic", scope="language", convention="dense",
                             component="all", role="all", stage="inference", phase="prefill"))
        rows.append(make_row(base, "prefill_flops", flops * 3, "analytic", scope="total", convention="dense",
                             component="all", role="all", stage="inference", phase="prefill"))
        rows.append(make_row(base, "kv_cache_bytes", kv, "analytic", component="all", role="all",
                             stage="inference", phase="decode"))
        rows.append(make_row(base, "kv_cache_bytes", kv / 2, "analytic", component="all", role="visual",
                             stage="inference", phase="decode"))
    return to_frame(rows)


def test_points_from_rows_and_the_plot(tmp_path):
    rows = rows_of({"llava": (8.5e12, 3.3e8), "saisa": (2.9e12, 3.3e8), "flamingo": (1.0e12, 2.0e7)})
    points = inference_cost_points(rows, "language", "dense").set_index("arch")
    assert points.loc["saisa", "prefill_flops"] == 2.9e12 and points.loc["saisa", "kv_cache_bytes"] == 3.3e8
    assert set(points[pareto_front(points, "prefill_flops", "kv_cache_bytes").to_numpy()].index) == {"flamingo"}
    written = inference_pareto(rows, tmp_path / "pareto", "language", "dense")
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in written)


def test_plot_skips_points_without_values(tmp_path):
    points = pd.DataFrame({"label": ["llava", "saisa"], "arch": ["llava", "saisa"], "x": [1.0, math.nan],
                           "y": [2.0, 1.0]})
    assert len(pareto_plot(points, "x", "y", tmp_path / "p")) == 2
    assert pareto_plot(points.assign(x=math.nan), "x", "y", tmp_path / "q") == []


def test_points_under_a_published_convention_use_its_own_scope():
    rows = rows_of({"llava": (8.5e12, 3.3e8)})
    fastv = (rows["metric"] == "prefill_flops") & (rows["scope"] == "language")
    rows.loc[fastv, ["scope", "convention"]] = ["decoder", "fastv"]
    points = inference_cost_points(rows, "language", "fastv")
    assert points["prefill_flops"].tolist() == [8.5e12]  # the fastv row carries scope "decoder", not --scope
