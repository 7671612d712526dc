"""Tables, result files and plots built from hand-made tidy rows."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mllm_bench.reports import plots, tables
from mllm_bench.reports.collect import collect
from mllm_bench.reports.rows import fmt_change, normalise, pick, scale_for

from mllm_bench.config import ConfigError
from mllm_bench.workload import Workload
from tests.reports_fakes import fake_profile, row


def test_pick_refuses_first_ranked_rows_that_disagree_and_takes_ones_that_agree():
    agree = [row("llava", "prefill_flops", 3.0, scope="language", timestamp=t) for t in ("t1", "t2")]
    df = normalise(pd.DataFrame([*agree, row("saisa", "prefill_flops", 1.0, scope="language")]))
    assert pick(df, "prefill_flops", scope="language")["value"].tolist() == [3.0, 1.0]
    differ = [row("llava", "prefill_flops", 3.0, scope="language", batch_size=1),
              row("llava", "prefill_flops", 6.0, scope="language", batch_size=2)]
    df = normalise(pd.DataFrame([*differ, row("saisa", "prefill_flops", 1.0, scope="language")]))
    with pytest.raises(ConfigError, match=r"prefill_flops of llava.*2 rows qualify with different values \(3, 6\); "
                                          r"they differ in \['batch_size'\]"):
        pick(df, "prefill_flops", scope="language")


def test_pick_prefers_exact_aggregate_and_counted_rows():
    df = normalise(pd.DataFrame([
        row("llava", "prefill_flops", 1.0, scope="total", convention="dense"),
        row("llava", "prefill_flops", 2.0, scope="language", convention="dense", source="analytic"),
        row("llava", "prefill_flops", 3.0, scope="language", convention="dense"),
        row("llava", "prefill_flops", 4.0, scope="language", convention="dense", component="ffn"),
        row("llava", "prefill_flops", 5.0, scope="language", convention="effective"),
        row("llava", "params", 7.0, "params"),
    ]))
    assert pick(df, "prefill_flops", scope="language", convention="dense")["value"].tolist() == [3.0]
    assert pick(df, "prefill_flops", ("analytic",), scope="language", convention="dense")["value"].tolist() == [2.0]
    assert pick(df, "prefill_flops", scope="total", convention="dense")["value"].tolist() == [1.0]
    # blank fields match any request: params has no scope
    assert pick(df, "params", scope="language")["value"].tolist() == [7.0]


def _pick_by_pandas(df, metric, sources, by, **where):
    """The selection rule of :func:`pick`, written with pandas operations: the reference it must equal."""
    rows = df[(df["metric"] == metric) & df["source"].isin(sources)]
    rank = pd.Series(0.0, index=rows.index)
    for col, wanted in where.items():
        rows = rows[rows[col].isin([wanted, ""] if isinstance(wanted, str) else [*wanted, ""])]
        rank = rank.loc[rows.index] + (rows[col] == "").astype(float) * 100
    for col in ("component", "role"):
        if col not in where:
            rank = rank + rows[col].map(lambda v: {"all": 0, "": 1}.get(v, 2)) * 10
    rank = rank + rows["source"].map({s: i for i, s in enumerate(sources)})
    rows = rows.assign(_rank=rank).sort_values("_rank", kind="stable")
    return rows.drop_duplicates(list(by)).drop(columns="_rank"), rows.duplicated([*by, "_rank"]).any()


def test_pick_equals_its_rule_written_with_pandas_on_random_frames():
    import random

    rng = random.Random(0)
    outcomes = []
    for trial in range(120):
        records = [row(rng.choice(["llava", "saisa", "fastv"]), rng.choice(["prefill_flops", "params"]),
                       rng.choice([1.0, 2.0]), source=rng.choice(["counted", "analytic", "measured"]),
                       scope=rng.choice(["language", "total", ""]), component=rng.choice(["all", "ffn", ""]),
                       role=rng.choice(["all", "visual", ""]), stage=rng.choice(["inference", "finetune", ""]))
                   for _ in range(rng.randint(0, 12))]
        df = normalise(pd.DataFrame(records)) if records else normalise(pd.DataFrame([row("llava", "params", 1.0)]))
        df.index = [f"r{i}" for i in range(len(df))]  # an index that is not positions
        sources = tuple(rng.sample(["counted", "analytic", "measured"], rng.randint(1, 3)))
        where = {k: v for k, v in (("scope", rng.choice(["language", "total", None])),
                                   ("stage", rng.choice(["inference", ("inference", "finetune"), None])),
                                   ("role", rng.choice(["visual", None]))) if v is not None}
        by = rng.choice([("arch",), ("arch", "llm"), ("arch", "stage")])
        metric = rng.choice(["prefill_flops", "params"])
        expected, tied = _pick_by_pandas(df, metric, sources, by, **where)
        try:
            got = pick(df, metric, sources, by=by, **where)
        except ConfigError:  # tied first rows that disagree
            assert tied, f"trial {trial}: refused rows without a tie"
            outcomes.append("refused")
            continue
        pd.testing.assert_frame_equal(got, expected)
        outcomes.append("tied, agreeing" if tied else "empty" if got.empty else "picked")
    assert set(outcomes) == {"refused", "tied, agreeing", "empty", "picked"}


def test_comparison_vs_baseline_and_renderers():
    df = pd.DataFrame([
        row("llava", "prefill_flops", 8.0e12, scope="language", convention="dense"),
        row("saisa", "prefill_flops", 2.0e12, scope="language", convention="dense"),
        row("flamingo", "prefill_flops", 1.0e12, scope="language", convention="dense"),
        row("llava", "params", 7.0e9, "params"), row("saisa", "params", 7.7e9, "params"),
        row("flamingo", "params", 8.4e9, "params"),
        row("llava", "kv_cache_bytes", 2**30, "bytes", role="all"),
        row("saisa", "kv_cache_bytes", 2**29, "bytes", role="all"),
    ])
    qs = tables.compare_quantities("language", "dense", ("finetune",))
    table = tables.comparison(df, qs, "llava")
    got = table.set_index(["quantity", "arch"])["vs_baseline"]
    assert got["prefill FLOPs", "saisa"] == pytest.approx(-0.75)
    assert got["prefill FLOPs", "flamingo"] == pytest.approx(-0.875)
    assert got["parameters", "saisa"] == pytest.approx(0.1)
    assert math.isnan(got["prefill FLOPs", "llava"])
    assert ("KV cache / sample", "flamingo") not in got.index  # absent rows stay absent
    header, body = tables.wide(table)
    assert header[:4] == ["quantity", "unit", "source", "llava"] and "saisa vs llava" in header
    prefill = next(r for r in body if r[0] == "prefill FLOPs")
    assert prefill[1:4] == ["TFLOP", "counted", "8.000"] and "−75.0%" in prefill
    kv = next(r for r in body if r[0] == "KV cache / sample")
    assert kv[1] == "GiB" and "−50.0%" in kv
    notes = tables.notes_for(df, "language", "dense")
    md = tables.to_markdown(table, "t", notes)
    assert "| prefill FLOPs | TFLOP | counted | 8.000 |" in md and "2 FLOPs" in md and "dense" in md and "abc1234" in md
    tex = tables.to_latex(table, "t", notes)
    assert r"\toprule" in tex and r"$-$75.0\%" in tex
    csv = pd.read_csv(__import__("io").StringIO(tables.to_csv(table)))
    assert csv.loc[(csv["quantity"] == "prefill FLOPs") & (csv["arch"] == "saisa"), "vs_baseline"].item() == -0.75
    with pytest.raises(ConfigError, match="baseline 'naavit'.*llava"):
        tables.comparison(df, qs, "naavit")


def test_formatting():
    assert scale_for("FLOP", [8.5e12, 2.9e12]) == (1e12, "TFLOP")
    assert scale_for("bytes", [3 * 2**20]) == (2**20, "MiB")
    assert scale_for("s", [0.004]) == (1e-3, "ms")
    assert fmt_change(-0.6612) == "−66.1%" and fmt_change(float("nan")) == "—"


def test_collect_dedupes_rows_repeated_across_stages():
    calls = []
    rows = collect(["llava", "saisa"], Workload(), fake_profile(calls), "tiny-llm", "tiny-clip",
                   stages=("pretrain", "finetune"))
    assert [(c[0], c[4]) for c in calls] == [("llava", "inference"), ("llava", "pretrain"), ("llava", "finetune"),
                                            ("saisa", "inference"), ("saisa", "pretrain"), ("saisa", "finetune")]
    params = rows[rows["metric"] == "params"]
    # params rows differ only by stage across calls, so each stage keeps its own; identical rows collapse
    assert len(params) == 6 and len(rows.drop(columns="timestamp").drop_duplicates()) == len(rows)


def test_collect_runs_the_uncounted_calls_first_and_keeps_the_rows_in_order():
    calls, events = [], []
    profile = fake_profile(calls)

    def recorded(*args, count=True, **kwargs):
        events.append((args[0], args[1].stage, count))
        return profile(*args, **kwargs)

    rows = collect(["llava", "saisa"], Workload(), recorded, "tiny-llm", "tiny-clip", stages=("finetune",),
                   count="inference", before_counted=lambda: events.append("wait"))
    # the analytic training steps, then the wait (once), then the counted inference calls
    assert events == [("llava", "finetune", False), ("saisa", "finetune", False), "wait",
                      ("llava", "inference", True), ("saisa", "inference", True)]
    stages = rows.drop_duplicates(["arch", "stage"])[["arch", "stage"]].values.tolist()
    assert stages == [["llava", "inference"], ["llava", "finetune"], ["saisa", "inference"], ["saisa", "finetune"]]
    events.clear()
    collect(["llava"], Workload(), recorded, "tiny-llm", "tiny-clip", stages=("finetune",), count="none",
            before_counted=lambda: events.append("wait"))
    assert "wait" not in events  # nothing counts: nothing to wait for


def test_crossovers():
    x = [1, 2, 3, 4]
    assert plots.crossovers(x, [1, 2, 3, 4], [4, 3, 2, 1]) == [(2.5, 2.5)]
    assert plots.crossovers(x, [1, 1, 1, 1], [2, 2, 2, 2]) == []
    assert plots.crossovers(x, [1, 2, 3, 4], [1, 2, 3, 4]) == []  # coinciding curves never cross
    assert plots.crossovers(x, [1, 2, 3, 4], [2, 2, 2, 2]) == [(2.0, 2.0)]  # touch then cross


def test_plots_write_png_and_pdf(tmp_path):
    rows = collect(["llava", "saisa", "flamingo"], Workload(), fake_profile(), "tiny-llm", "tiny-clip",
                   stages=("finetune",))
    paths = plots.flops_by_component(rows, tmp_path / "comp", "language", "dense")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)
    assert plots.memory_by_component(rows, tmp_path / "mem") == []  # no training memory rows: nothing to draw
    pts = pd.DataFrame({"arch": ["llava", "saisa"], "x": [10.0, 7.0], "y": [8.5, 2.9]})
    assert len(plots.tradeoff(pts, tmp_path / "trade")) == 2
    sweep_rows = pd.concat([collect(["llava", "saisa"], Workload(images_per_sample=k), fake_profile(), "tiny-llm",
                                    "tiny-clip", stages=()) for k in (1, 2, 4)])
    assert len(plots.cost_curves(sweep_rows, "visual_tokens", tmp_path / "curve")) == 2


def test_paper_regeneration_on_tiny_presets(tmp_path):
    from mllm_bench.reports.paper import paper_formula_flops, regenerate

    from mllm_bench.presets import llm_preset, vision_preset
    from mllm_bench.profile import profile

    result = regenerate(tmp_path, profile, llms=("tiny-llm-mha",), vision="tiny-clip",
                        workload=Workload(text_before=4, text_after=4),
                        options={"flamingo": {"num_latents": 4, "resampler_depth": 1, "cross_attn_every": 1}})
    inf = result.inference.set_index("arch")
    for arch in ("llava", "saisa"):  # counted == the paper's closed form (MHA, language scope, dense)
        want = paper_formula_flops(arch, llm_preset("tiny-llm-mha"), vision_preset("tiny-clip"), 8) / 1e12
        assert inf.loc[arch, "tflops_counted"] == pytest.approx(want, rel=1e-12)
        assert inf.loc[arch, "tflops_analytic"] == pytest.approx(want, rel=0.005)
    assert inf.loc["saisa", "vs_llava"] == pytest.approx(inf.loc["saisa", "tflops_counted"]
                                                         / inf.loc["llava", "tflops_counted"] - 1)
    names = {p.name for p in result.files}
    assert {"README.md", "tradeoff.png", "tradeoff.pdf", "train_budget.md", "inference_flops_paper.csv",
            "inference_flops_total_effective.md", "rows.csv"} <= names
    readme = (tmp_path / "README.md").read_text()
    assert "mllm-bench paper" in readme and "## Assumptions" in readme and "26%" in readme
    assert "total scope and effective attention: **analytic only**" in readme  # each table names its source
    tradeoff = readme.split("## Trade-off")[1].split("## ")[0]
    assert "tradeoff.png" in tradeoff and "| LLM |" not in tradeoff and "x: GPU-hours" in tradeoff
    assert "prefill panel: 16 visual + 4 + 4 text tokens" in readme  # each component panel's workload
    assert "training-step panel: 16 visual + 40 + 216 text tokens" in readme
    budget = result.budget.set_index(["arch", "stage"])
    assert budget.loc[("saisa", "total"), "gpu_hours"] == pytest.approx(
        budget.loc[("saisa", "pretrain"), "gpu_hours"] + budget.loc[("saisa", "finetune"), "gpu_hours"])


def test_workload_line_writes_counts_as_integers_in_numeric_order():
    from mllm_bench.reports.rows import workload_line

    # a column with blanks reads back from CSV as floats
    df = pd.DataFrame({"batch_size": [1.0, 16.0, 2.0, float("nan")], "generate_tokens": [0.0, float("nan"), 0.0, 0.0]})
    assert workload_line(df) == "Workload: batch 1/2/16, generated 0."
