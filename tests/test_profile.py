"""The profile() API: tidy rows, counted == analytic, measured rows on CPU, bad input."""

from __future__ import annotations

import dataclasses

import pytest

from mllm_bench import Workload, measure
from mllm_bench.config import ConfigError
from mllm_bench.profile import MeasureSettings, profile, should_measure
from mllm_bench.schema import COLUMNS

WL = Workload(batch_size=2, text_before=3, text_after=5, generate_tokens=2, dtype="float32", device="cpu")


def _one(df, **match):
    sel = df
    for k, v in match.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (match, sel)
    return float(sel.value.iloc[0])


@pytest.mark.parametrize("arch", ["llava", "saisa"])
def test_profile_inference_rows(arch: str) -> None:
    df = profile(arch, WL, llm="tiny-llm", vision="tiny-clip")
    assert list(df.columns) == list(COLUMNS)
    assert set(df.source) == {"analytic", "counted"}
    assert (df.device == "meta").all() and (df.arch == arch).all() and (df.visual_tokens == 16).all()
    for metric in ("prefill_flops", "decode_flops_per_token"):
        for scope in ("language", "total"):
            key = dict(metric=metric, scope=scope, convention="dense", component="all", role="all")
            assert _one(df, source="counted", **key) == pytest.approx(_one(df, source="analytic", **key), rel=5e-3)
        eff = _one(df, metric=metric, source="analytic", scope="total", convention="effective", component="all",
                   role="all")
        assert eff <= _one(df, metric=metric, source="analytic", scope="total", convention="dense", component="all",
                           role="all")
    # the component rows add up to the total
    parts = df[(df.metric == "prefill_flops") & (df.source == "analytic") & (df.scope == "total")
               & (df.convention == "dense") & (df.role == "all") & (df.component != "all")]
    assert parts.value.sum() == pytest.approx(_one(df, metric="prefill_flops", source="analytic", scope="total",
                                                   convention="dense", component="all", role="all"))
    assert _one(df, metric="kv_cache_bytes", role="all") > _one(df, metric="kv_cache_bytes", role="text")
    assert _one(df, metric="params") > 0
    assert df[df.metric == "decode_flops_per_token"].context_len.eq(3 + 5 + 16).all()  # the prompt: text + visual


def test_profile_training_rows_and_measurement_on_cpu() -> None:
    df = profile("llava", WL.replace(stage="pretrain"), llm="tiny-llm", vision="tiny-clip", measure=True,
                 settings=MeasureSettings(min_seconds=0.01, min_repeats=2, warmup=1))
    assert _one(df, metric="trainable_params", stage="pretrain") < _one(df, metric="params")
    assert _one(df, metric="train_step_latency_s", source="measured") > 0
    mem = df[(df.metric == "peak_memory_bytes")]
    assert len(mem) == 1 and mem.note.iloc[0].startswith("cpu_")
    assert (df.device == "cpu").all()
    assert "mfu" not in set(df.metric)  # no peak FLOP/s for a CPU
    counted = _one(df, metric="train_step_flops", source="counted", scope="total", component="all")
    achieved = _one(df, metric="achieved_flops_per_s")
    assert achieved == pytest.approx(counted / _one(df, metric="train_step_latency_s"))


def test_profile_inference_measurement_phases() -> None:
    df = profile("saisa", WL, llm="tiny-llm", vision="tiny-clip", measure="auto",
                 settings=MeasureSettings(min_seconds=0.01, min_repeats=2, warmup=1))
    for metric in ("vision_encode_latency_s", "prefill_latency_s", "decode_latency_s"):
        assert _one(df, metric=metric) > 0
    assert set(df[df.metric == "latency_iqr_s"].phase) == {"vision_encode", "prefill", "decode"}
    assert df[df.metric == "decode_latency_s"].note.tolist() == ["perf_counter; decode=dynamic"]  # CPU default


def test_profile_static_decode_holds_the_same_cache() -> None:
    """A static cache decodes the same steps: the cache bytes reported after the timed steps agree."""
    kw = dict(llm="tiny-llm", vision="tiny-clip", measure="always",
              settings=MeasureSettings(min_seconds=0.0, min_repeats=3, max_repeats=3, warmup=1))
    dynamic = profile("llava", WL, **kw)
    static = profile("llava", WL, **{**kw, "settings": dataclasses.replace(kw["settings"], decode_mode="static")})
    assert static[static.metric == "decode_latency_s"].note.iloc[0] == "perf_counter; decode=static"
    kv = {name: df[df.metric == "kv_cache_bytes"].set_index("role").value.to_dict() for name, df in
          (("dynamic", dynamic), ("static", static))}
    assert kv["static"] == kv["dynamic"] and kv["static"]["all"] > 0


def test_profile_fast_backend_is_the_architectures_and_counting_stays_dense() -> None:
    timing = dict(min_seconds=0.0, min_repeats=1, max_repeats=1, warmup=0)
    kw = dict(llm="tiny-llm", vision="tiny-clip", measure="always")
    fast = profile("naavit", WL, settings=MeasureSettings(attention_backend="fast", **timing), **kw)
    assert set(fast["attention_backend"]) == {"flex"}  # NAAViT's block-sparse path
    reference = profile("naavit", WL, settings=MeasureSettings(**timing), **kw)
    counted = {name: df[(df.metric == "prefill_flops") & (df.source == "counted")].value.sum()
               for name, df in (("fast", fast), ("sdpa", reference))}
    assert counted["fast"] == counted["sdpa"] > 0


def test_profile_compiled_measures_with_compiled_layers(monkeypatch) -> None:
    from mllm_bench.model import MLLM

    compiled = []
    compile_layers = MLLM.compile_layers

    def aot_eager(self):  # the traced graphs without a C++ toolchain
        compiled.append(type(self).__name__)
        compile_layers(self, backend="aot_eager")

    monkeypatch.setattr(MLLM, "compile_layers", aot_eager)
    df = profile("saisa", WL, llm="tiny-llm", vision="tiny-clip", measure="always",
                 settings=MeasureSettings(compile=True, attention_backend="fast", min_seconds=0.0, min_repeats=1,
                                          max_repeats=1))
    assert compiled == ["SAISA"]
    assert set(df[df.metric == "decode_latency_s"].note) == {"perf_counter; compiled; decode=dynamic"}
    assert set(df[df.metric == "prefill_latency_s"].note) == {"perf_counter; compiled"}


def test_profile_bad_input() -> None:
    with pytest.raises(ConfigError, match="attention_backend must be 'fast' or one of"):
        MeasureSettings(attention_backend="fused")
    with pytest.raises(ConfigError, match="decode_mode must be one of"):
        MeasureSettings(decode_mode="cuda")
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        MeasureSettings(optimizer="sgd")
    with pytest.raises(ConfigError, match="min_repeats <= max_repeats"):
        MeasureSettings(min_repeats=5, max_repeats=2)
    with pytest.raises(ConfigError, match="unknown architecture"):
        profile("llava2", WL, llm="tiny-llm", vision="tiny-clip")
    with pytest.raises(ConfigError, match="measure must be one of"):
        should_measure("sometimes", "cpu", 10)
    assert should_measure("auto", "cpu", 10) and not should_measure("auto", "cpu", 7_000_000_000)


def test_decode_flops_are_per_token_and_prefill_per_batch() -> None:
    one = profile("llava", WL.replace(batch_size=1), llm="tiny-llm", vision="tiny-clip")
    two = profile("llava", WL, llm="tiny-llm", vision="tiny-clip")
    for source in ("analytic", "counted"):
        key = dict(scope="total", convention="dense", component="all", role="all", source=source)
        assert _one(two, metric="decode_flops_per_token", **key) == _one(one, metric="decode_flops_per_token", **key)
        assert _one(two, metric="prefill_flops", **key) == 2 * _one(one, metric="prefill_flops", **key)


def test_measured_train_step_mfu_leaves_recomputation_out() -> None:
    wl = WL.replace(stage="finetune", gradient_checkpointing=True)
    df = profile("llava", wl, llm="tiny-llm", vision="tiny-clip", measure=True,
                 settings=MeasureSettings(min_seconds=0.0, min_repeats=2, warmup=1))
    key = dict(metric="train_step_flops", scope="total", convention="dense", component="all", role="all")
    with_recompute = _one(df, source="counted", **key)
    no_ckpt = profile("llava", wl.replace(gradient_checkpointing=False), llm="tiny-llm", vision="tiny-clip")
    model_flops = _one(no_ckpt, source="counted", **key)
    assert with_recompute > model_flops  # checkpointing recomputes forward work
    rate = _one(df, metric="achieved_flops_per_s", phase="train_step")
    latency = _one(df, metric="train_step_latency_s", phase="train_step")
    assert rate * latency == pytest.approx(model_flops, rel=1e-9)


def test_settle_calls_until_nothing_compiles(monkeypatch) -> None:
    from collections import Counter

    from torch._dynamo.utils import counters

    monkeypatch.setitem(counters, "stats", Counter())  # this test's fake compilations leave no trace
    calls = []

    def compiles_twice() -> None:
        calls.append(1)
        if len(calls) <= 2:
            counters["stats"]["unique_graphs"] += 1  # what torch.compile records when it compiles

    assert measure.settle(compiles_twice) == 3 and len(calls) == 3
    calls.clear()

    def always_compiles() -> None:
        calls.append(1)
        counters["stats"]["unique_graphs"] += 1

    assert measure.settle(always_compiles) == measure.SETTLE_CALLS  # bounded
