"""benchmarks/gpu_bench.py: end to end on CPU with tiny presets, the eager fallback when torch.compile fails,
settings validation, and that it measures through the profiler's engine (mllm_bench/measure.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest
from torch._dynamo.exc import TorchDynamoException

from mllm_bench import Workload, measure
from mllm_bench.config import ConfigError
from mllm_bench.profile import MeasureSettings, profile
from mllm_bench.timing import Timing


def load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_a_point_whose_compilation_fails_is_measured_eager_and_says_why(monkeypatch) -> None:
    bench = load_bench()
    calls = []

    def fake_run_point(arch, visual_tokens, s, rows, device, log, prefill_batch, note=""):
        calls.append((s.compile, note))
        rows.add({"arch": arch}, "prefill_latency_s", 1.0, note=note)
        if s.compile:
            raise TorchDynamoException("inductor lowering failed")

    monkeypatch.setattr(bench, "run_point", fake_run_point)
    rows = bench.Rows({"device_name": "test"})
    logged = []
    settings = bench.Settings(compile=True)
    bench.measure_point("saisa", 576, settings, rows, bench.torch.device("cpu"), logged.append, 32)
    assert calls == [(True, ""), (False, "compile failed: TorchDynamoException")]
    assert [r["note"] for r in rows.rows] == ["compile failed: TorchDynamoException"]  # the failed try's rows dropped
    assert "measuring eager" in logged[0]

    def always_failing(*args, **kwargs):
        raise TorchDynamoException("not a compile problem")

    monkeypatch.setattr(bench, "run_point", always_failing)
    with pytest.raises(TorchDynamoException):  # an eager run does not hide the error
        bench.measure_point("saisa", 576, bench.Settings(compile=False), rows, bench.torch.device("cpu"),
                            logged.append, 32)


def test_bad_settings_name_the_flag() -> None:
    bench = load_bench()
    with pytest.raises(ConfigError, match="--decode-modes has unknown mode"):
        bench.main(["--tiny", "--decode-modes", "dynamic,cudagraph"])
    with pytest.raises(ConfigError, match="--train-stages has unknown stage"):
        bench.main(["--tiny", "--train-stages", "sft"])
    with pytest.raises(ConfigError, match="--optimizer must be one of"):
        bench.main(["--tiny", "--optimizer", "sgd"])
    with pytest.raises(ConfigError, match="--prefill-batch must be >= 1"):
        bench.main(["--tiny", "--prefill-batch", "0"])


def test_gpu_bench_runs_end_to_end_on_cpu_with_tiny_presets(tmp_path) -> None:
    """benchmarks/gpu_bench.py --tiny: rows with the schema's columns, the speedup row, summary, plots."""
    out = load_bench().main(["--tiny", "--archs", "llava,saisa", "--visual-tokens", "16", "--out", str(tmp_path),
                             "--optimizer", "adamw-fp32-master", "--train-stages", "pretrain,finetune"])
    rows = pd.read_csv(out / "rows.csv", keep_default_na=False)
    for column in ("arch", "llm", "metric", "value", "unit", "source", "scope", "convention", "stage", "phase",
                   "visual_tokens", "attention_backend", "device_name", "torch_version", "git_commit"):
        assert column in rows.columns
    measured = rows[rows["source"] == "measured"]
    for metric in ("prefill_latency_s", "decode_latency_s", "train_step_latency_s", "latency_iqr_s"):
        assert (measured[measured["metric"] == metric]["value"].astype(float) > 0).all(), metric
    saisa = rows[(rows["arch"] == "saisa") & (rows["metric"] == "prefill_latency_s")]
    assert set(saisa["attention_backend"]) == {"flash[flash:split]"}
    assert set(rows[rows["metric"] == "prefill_latency_s"]["batch_size"]) == {1, 2}  # latency and throughput
    flops = rows[rows["metric"] == "prefill_flops"].set_index(["arch", "scope", "batch_size"])["value"].astype(float)
    assert flops["saisa", "language", 1] < flops["llava", "language", 1]  # SAISA's FLOP saving is counted
    assert flops["llava", "language", 2] == 2 * flops["llava", "language", 1]
    speedup = rows[rows["metric"] == "prefill_speedup_vs_flops"]
    assert set(speedup["scope"]) == {"total", "language"} and set(speedup["arch"]) == {"saisa"}
    lat = rows[rows["metric"] == "prefill_latency_s"].set_index(["arch", "scope", "batch_size"])["value"].astype(float)
    for b in (1, 2):
        expected = (lat["llava", "language", b] / lat["saisa", "language", b]) / (
            flops["llava", "language", b] / flops["saisa", "language", b])
        at = speedup[(speedup["scope"] == "language") & (speedup["batch_size"] == b)]
        assert abs(float(at["value"].iloc[0]) - expected) < 1e-9 * expected
    decode = rows[rows["metric"] == "decode_latency_s"]
    assert sorted(decode["note"]) == ["eager; decode=dynamic"] * 2 + ["eager; decode=static"] * 2  # 2 archs
    assert set(rows[rows["metric"] == "prefill_latency_s"]["note"]) == {"eager"}
    train = rows[rows["metric"] == "train_step_latency_s"]
    assert set(train["note"]) == {"eager; optimizer=adamw-fp32-master"}
    assert sorted(train["stage"]) == ["finetune", "finetune", "pretrain", "pretrain"]  # 2 archs x 2 stages
    step_flops = rows[rows["metric"] == "train_step_flops"].set_index(["arch", "stage"])["value"].astype(float)
    assert step_flops["saisa", "pretrain"] < step_flops["saisa", "finetune"]  # no LLM weight gradients
    summary = (out / "summary.md").read_text()
    assert summary.count("| saisa |") >= 2 and "decode ms/token (static)" in summary and "pretrain MFU" in summary
    assert "## Targets" in summary and "- SAISA prefill speedup ÷ FLOP-predicted, 16 visual" in summary
    assert (out / "gpu_bench.png").stat().st_size > 10_000


def test_resume_keeps_this_codes_points_and_measures_the_rest(tmp_path, capsys) -> None:
    """--resume goes through the sweep's point store: a point this code finished on this device with these
    settings is kept; one with other settings, or made by other code, is measured again."""
    import json

    from mllm_bench.reports.sweep import finished_points

    bench = load_bench()
    base = ["--tiny", "--visual-tokens", "16", "--phases", "prefill", "--out", str(tmp_path)]
    bench.main([*base, "--archs", "llava"])
    first = pd.read_json(tmp_path / "rows.json")
    llava_stamp = set(first[first["arch"] == "llava"]["timestamp"])
    bench.main([*base, "--archs", "llava,saisa", "--resume"])
    rows = pd.read_json(tmp_path / "rows.json")
    assert set(rows["arch"]) == {"llava", "saisa"}
    assert set(rows[rows["arch"] == "llava"]["timestamp"]) == llava_stamp  # kept, not measured again
    assert len(rows[rows["metric"] == "prefill_speedup_vs_flops"]) == 4  # recomputed over both runs' points
    summary = (tmp_path / "summary.md").read_text()
    assert "| llava | 16 |" in summary and "| saisa | 16 |" in summary
    store = tmp_path / "points"
    points = finished_points(store)
    assert len(points) == 2 and {p["params"]["arch"] for p in points.values()} == {"llava", "saisa"}
    assert not list(store.glob("*.claim"))  # claims released

    bench.main([*base, "--archs", "llava", "--resume", "--prefill-batch", "3"])  # other settings: other points
    rows = pd.read_json(tmp_path / "rows.json")
    assert set(rows["arch"]) == {"llava"} and set(rows["batch_size"]) == {1, 3}
    assert not set(rows["timestamp"]) & llava_stamp
    assert len(finished_points(store)) == 3

    llava = next(k for k, p in points.items() if p["params"]["arch"] == "llava")
    record = json.loads((store / f"{llava}.json").read_text())
    record["origin"]["code"] = "0.0.1@0123abcd"
    (store / f"{llava}.json").write_text(json.dumps(record))
    capsys.readouterr()
    bench.main([*base, "--archs", "llava,saisa", "--resume"])
    log = capsys.readouterr().out
    assert "llava v=16: measured again: made by mllm-bench 0.0.1@0123abcd" in log and "1 points kept" in log
    rows = pd.read_json(tmp_path / "rows.json")
    assert not set(rows[rows["arch"] == "llava"]["timestamp"]) & llava_stamp


def test_a_point_another_run_is_measuring_is_left_to_it(tmp_path, capsys) -> None:
    import os

    from mllm_bench.reports.sweep import claim_point

    bench = load_bench()
    s = bench.preset_settings(bench.parse_args(["--tiny", "--phases", "prefill"]))
    claim = claim_point(tmp_path / "points", bench.point_key(s, "saisa", 16))  # this (live) process holds it
    assert claim.held
    out = bench.main(["--tiny", "--visual-tokens", "16", "--phases", "prefill", "--archs", "llava,saisa",
                      "--out", str(tmp_path)])
    assert f"saisa v=16: skipped, pid {os.getpid()} is measuring it" in capsys.readouterr().out
    assert set(pd.read_json(out / "rows.json")["arch"]) == {"llava"}
    claim.release()


def test_compiled_run_records_paths_without_recompiling(tmp_path, monkeypatch) -> None:
    """The compiled path of the bench (here torch.compile's aot_eager backend: no C++ toolchain needed):
    layers compile, settle, and every row records the attention path and that it was compiled."""
    import dataclasses

    from torch._dynamo.utils import counters

    from mllm_bench.model import MLLM

    bench = load_bench()
    preset = bench.preset_settings
    monkeypatch.setattr(bench, "preset_settings", lambda args: dataclasses.replace(preset(args), compile=True))
    compile_layers = MLLM.compile_layers
    monkeypatch.setattr(MLLM, "compile_layers", lambda self: compile_layers(self, backend="aot_eager"))
    settled = []
    settle = measure.settle
    monkeypatch.setattr(measure, "settle", lambda fn: settled.append(settle(fn)) or settled[-1])
    graphs = counters["stats"]["unique_graphs"]
    out = bench.main(["--tiny", "--archs", "saisa", "--visual-tokens", "16", "--phases", "prefill,decode",
                      "--out", str(tmp_path)])
    rows = pd.read_csv(out / "rows.csv", keep_default_na=False)
    timed = rows[rows["metric"].isin(["prefill_latency_s", "decode_latency_s"])]
    assert set(timed["note"]) == {"compiled", "compiled; decode=dynamic", "compiled; decode=static"}
    assert all("flash:" in paths for paths in timed["attention_backend"])
    assert counters["stats"]["unique_graphs"] > graphs and max(settled) < measure.SETTLE_CALLS  # compiled, settled


def test_a_decode_mode_that_fails_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch) -> None:
    bench = load_bench()
    decode_steps = measure.decode_steps

    def refuse_static(model, cache, steps, mode):
        if mode == "static":
            raise RuntimeError("operation not permitted when stream is capturing")
        return decode_steps(model, cache, steps, mode)

    monkeypatch.setattr(measure, "decode_steps", refuse_static)
    out = bench.main(["--tiny", "--archs", "llava", "--visual-tokens", "16", "--phases", "decode",
                      "--out", str(tmp_path)])
    rows = pd.read_json(out / "rows.json")
    decode = rows[rows["metric"] == "decode_latency_s"].set_index("note")["value"]
    assert decode["eager; decode=dynamic"] > 0
    failed = "eager; decode=static; failed: RuntimeError: operation not permitted when stream is capturing"
    assert pd.isna(decode[failed])  # recorded as not measured, with the reason


def test_target_checks_say_met_or_not_met() -> None:
    bench = load_bench()
    rows = bench.Rows({"device_name": "NVIDIA H100 80GB HBM3"})
    point = {"arch": "saisa", "visual_tokens": 576, "batch_size": 32}
    rows.add(point, "prefill_speedup_vs_flops", 0.93, scope="language", phase="prefill")
    rows.add({**point, "visual_tokens": 2304}, "prefill_speedup_vs_flops", 0.85, scope="language", phase="prefill")
    rows.add({**point, "arch": "llava", "batch_size": 12}, "mfu", 0.47, phase="train_step", stage="finetune")
    for metric, value in (("prefill_latency_s", 0.100), ("latency_iqr_s", 0.001)):
        rows.add(point, metric, value, phase="prefill", scope="language", note="compiled")
    for metric, value in (("decode_latency_s", 0.010), ("latency_iqr_s", 0.0005)):
        rows.add(point, metric, value, phase="decode", note="compiled; decode=graph")
    text = "\n".join(bench.target_checks(rows.rows))
    assert "576 visual tokens, batch 32: 0.930 (target ≥ 0.9): met" in text
    assert "2304 visual tokens, batch 32: 0.850 (target ≥ 0.9): **not met**" in text
    assert "llava finetune-step MFU, 576 visual tokens: 47.0% (target ≥ 45% on an H100): met" in text
    assert "1 of 2 timed medians: **not met**; over: saisa 576 decode b32 [compiled; decode=graph] (5.0%)" in text


def test_the_bench_and_the_profiler_time_and_step_through_one_engine(tmp_path, monkeypatch) -> None:
    """One fake clock and one recorded optimizer factory in mllm_bench.measure: the bench's and profile()'s
    latencies, spreads and achieved FLOP/s all come from it, and both train with the optimizer it builds."""
    samples = (0.25, 0.5, 0.75)  # median 0.5 s; quartiles 0.375 and 0.625, so IQR 0.25 s

    def fake_time_fn(fn, device, warmup, min_repeats, min_seconds, max_repeats):
        fn()
        return Timing(samples)

    built = []
    make_optimizer = measure.make_optimizer

    def recorded(name, params, lr, fused):
        built.append(name)
        return make_optimizer(name, params, lr=lr, fused=fused)

    monkeypatch.setattr(measure, "time_fn", fake_time_fn)
    monkeypatch.setattr(measure, "make_optimizer", recorded)
    out = load_bench().main(["--tiny", "--archs", "llava", "--visual-tokens", "16", "--phases", "prefill,train_step",
                             "--train-stages", "finetune", "--optimizer", "adamw-fp32-master", "--out", str(tmp_path)])
    bench_rows = pd.read_json(out / "rows.json")
    wl = Workload(batch_size=1, text_before=3, text_after=5, dtype="float32", device="cpu", stage="finetune")
    settings = MeasureSettings(optimizer="adamw-fp32-master")
    profiled = pd.concat([profile("llava", wl, llm="tiny-llm", vision="tiny-clip", measure=True, settings=settings),
                          profile("llava", wl.replace(stage="inference"), llm="tiny-llm", vision="tiny-clip",
                                  measure=True, settings=settings)])
    assert built == ["adamw-fp32-master", "adamw-fp32-master"]  # the bench's finetune step, then profile's
    for rows in (bench_rows, profiled):
        timed = rows[rows["metric"].str.endswith("_latency_s")]
        assert len(timed) >= 2 and set(timed["value"]) == {0.5}
        assert set(rows[rows["metric"] == "latency_iqr_s"]["value"]) == {0.25}
        for phase in ("prefill", "train_step"):
            counted = rows[(rows["metric"] == f"{phase}_flops") & (rows["source"] == "counted")
                           & (rows["scope"] == "total") & (rows["component"].isin(["all", ""]))]
            achieved = rows[(rows["metric"] == "achieved_flops_per_s") & (rows["phase"] == phase)
                            & (rows["scope"] == "total")]
            pairs = counted.merge(achieved, on="batch_size", suffixes=("_flops", "_rate"))
            assert len(pairs) >= 1
            assert (pairs["value_rate"] == pairs["value_flops"] / 0.5).all(), phase
