"""Sweeping an architecture option (``--vary fastv.drop_ratio=...``): that architecture's points take each
value, the others are profiled once and drawn flat, and bad option sweeps are refused before any work."""

from __future__ import annotations

import pandas as pd
import pytest
from mllm_bench.cli.app import app
from mllm_bench.reports.sweep import curve_rows, expand, parse_vary
from typer.testing import CliRunner

from mllm_bench import ConfigError, Workload
from mllm_bench.profile import profile

TINY = ["--llm", "tiny-llm", "--vision", "tiny-clip"]


def test_only_the_owner_of_the_option_gets_a_point_per_value():
    grid = parse_vary(["fastv.drop_ratio=0.25,0.5"])
    assert grid == {"fastv.drop_ratio": [0.25, 0.5]}
    points = expand(["llava", "fastv"], grid, Workload(), "tiny-llm", "tiny-clip", {"fastv": {"layer": 1}})
    assert [(p.arch, dict(p.options)) for p in points] == [
        ("llava", {}), ("fastv", {"layer": 1, "drop_ratio": 0.25}), ("fastv", {"layer": 1, "drop_ratio": 0.5})]
    # with a second, workload field each value of it still gets one llava point
    grid = parse_vary(["fastv.drop_ratio=0.25,0.5", "text_after=4,8"])
    points = expand(["llava", "fastv"], grid, Workload(), "tiny-llm", "tiny-clip", {"fastv": {"layer": 1}})
    assert sum(p.arch == "llava" for p in points) == 2 and sum(p.arch == "fastv" for p in points) == 4


@pytest.mark.parametrize("vary, archs, options, message", [
    ("fastv.drop_ratio=0.5", ["llava"], {}, "architecture 'fastv' is not being run"),
    ("fastv.drop_ratio=half", ["fastv"], {}, "'half' is not a float"),
    ("fastv.ratio=0.5", ["fastv"], {}, "fastv has no option 'ratio'"),
    ("fastv.drop_ratio=1.5", ["fastv"], {}, "drop_ratio"),
    ("fastv.drop_ratio=0.5", ["fastv"], {"fastv": {"drop_ratio": 0.25}}, "both set it"),
])
def test_bad_option_sweeps_are_refused(vary, archs, options, message):
    with pytest.raises(ConfigError, match=message):
        expand(archs, parse_vary([vary]), Workload(), "tiny-llm", "tiny-clip", options)


def test_sweep_command_profiles_each_value_and_plots_one_curve(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "-a", "llava,fastv", "-o", "fastv.layer=1", "--vary",
                                      "fastv.drop_ratio=0.25,0.75", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "results.csv", keep_default_na=False)
    prefill = rows[(rows["metric"] == "prefill_flops") & (rows["source"] == "counted") & (rows["scope"] == "language")
                   & (rows["convention"] == "dense") & (rows["component"] == "all")]
    assert sorted(prefill["arch"]) == ["fastv", "fastv", "llava"]
    for ratio in (0.25, 0.75):
        expected = profile("fastv", Workload(), llm="tiny-llm", vision="tiny-clip",
                           options={"layer": 1, "drop_ratio": ratio})
        want = expected[(expected["metric"] == "prefill_flops") & (expected["source"] == "counted")
                        & (expected["scope"] == "language") & (expected["convention"] == "dense")
                        & (expected["component"] == "all")]["value"].iloc[0]
        assert want in set(prefill[prefill["arch"] == "fastv"]["value"])
    assert (out / "cost_vs_fastv_drop_ratio.png").exists()
    # for the plot: fastv's rows carry the value and one options label; llava's repeat at every value
    curves = curve_rows(rows, "fastv.drop_ratio", [0.25, 0.75])
    fastv = curves[curves["arch"] == "fastv"]
    assert set(fastv["fastv.drop_ratio"]) == {0.25, 0.75} and fastv["options"].nunique() == 1
    llava = curves[(curves["arch"] == "llava") & (curves["metric"] == "prefill_flops")]
    assert set(llava["fastv.drop_ratio"]) == {0.25, 0.75} and llava["value"].nunique() <= len(llava) // 2
