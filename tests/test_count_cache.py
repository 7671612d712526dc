"""The count cache returns exactly what counting returns, and only for the same code, model and workload."""

from __future__ import annotations

import pytest
import torch

import mllm_bench.profile as profiling
from mllm_bench import count_cache
from mllm_bench.config import ConfigError
from mllm_bench.environment import environment
from mllm_bench.registry import build_model
from mllm_bench.workload import Workload

WL = Workload(text_before=3, text_after=4)
TINY = dict(llm="tiny-llm", vision="tiny-clip")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_BENCH_COUNT_CACHE", "on")
    monkeypatch.setenv("MLLM_BENCH_CACHE_DIR", str(tmp_path))
    return tmp_path / "counts"


def _fields(df):
    return df.drop(columns=["timestamp"]).to_dict("records")


def _no_counting(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("counted although the cache holds this count")
    monkeypatch.setattr(profiling, "count_inference", refuse)
    monkeypatch.setattr(profiling, "count_train_step", refuse)


@pytest.mark.parametrize("stage", ["inference", "finetune"])
def test_a_cached_count_gives_the_same_rows(cache, monkeypatch, stage) -> None:
    wl = WL.replace(stage=stage)
    cold = profiling.profile("saisa", wl, **TINY)
    assert len(list(cache.glob("*.json"))) == 1
    _no_counting(monkeypatch)
    warm = profiling.profile("saisa", wl, **TINY)
    assert _fields(warm) == _fields(cold)


def test_the_key_follows_the_model_the_workload_and_the_code(cache, monkeypatch) -> None:
    profiling.profile("llava", WL, **TINY)
    profiling.profile("llava", WL.replace(text_after=5), **TINY)
    profiling.profile("llava", WL, options={"pool": 2}, **TINY)
    profiling.profile("naavit", WL, **TINY)
    assert len(list(cache.glob("*.json"))) == 4
    monkeypatch.setattr(count_cache, "code_fingerprint", lambda: "edited code")
    profiling.profile("llava", WL, **TINY)
    assert len(list(cache.glob("*.json"))) == 5


@pytest.mark.parametrize("damage", ["{not json", "", "\0" * 64], ids=["torn", "empty", "zeros"])
def test_an_unreadable_entry_is_counted_again(cache, damage) -> None:
    """Entries are written without fsync: after a crash one may hold nothing or zeros; it is computed again."""
    cold = profiling.profile("llava", WL, **TINY)
    entries = sorted(cache.parent.glob("*/*.json"))
    assert [e.parent.name for e in entries] == ["counts", "rows"]
    for entry in entries:
        entry.write_text(damage, encoding="utf-8")
    again = profiling.profile("llava", WL, **TINY)
    assert _fields(again) == _fields(cold)
    assert all(entry.read_text(encoding="utf-8").startswith("{") for entry in entries)


def _no_model_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built although the cache holds the answer")
    monkeypatch.setattr(profiling, "cached_meta_model", refuse)
    monkeypatch.setattr(profiling, "build_model", refuse)


@pytest.mark.parametrize("count", [True, False])
def test_a_repeated_unmeasured_profile_builds_no_model_and_takes_the_environment_afresh(cache, monkeypatch,
                                                                                          count) -> None:
    cold = profiling.profile("saisa", WL, count=count, **TINY)
    _no_model_built(monkeypatch)
    monkeypatch.setattr(profiling, "environment", lambda *a: {**environment(*a), "git_commit": "a later commit"})
    warm = profiling.profile("saisa", WL, count=count, **TINY)
    assert set(warm["git_commit"]) == {"a later commit"}
    assert _fields(warm.drop(columns="git_commit")) == _fields(cold.drop(columns="git_commit"))
    assert list(warm.columns) == list(cold.columns) and warm.dtypes.equals(cold.dtypes)


def test_measured_rows_are_never_cached(cache) -> None:
    measured = profiling.profile("llava", WL.replace(dtype="float32"), measure=True, **TINY)
    assert (measured["source"] == "measured").any()
    assert not (cache.parent / "rows").exists()


def test_a_run_that_passed_the_checks_builds_no_model_the_next_time_and_a_refused_one_is_checked_again(
        cache, monkeypatch) -> None:
    from mllm_bench.cli import common

    runs = [common.Run("llava", "tiny-llm", "tiny-clip", None, WL)]
    common.check_runs(runs)
    built = []
    real = profiling.cached_meta_model
    monkeypatch.setattr(profiling, "cached_meta_model", lambda *a, **k: built.append(a) or real(*a, **k))
    common.check_runs(runs)
    assert built == []
    too_long = [common.Run("llava", "tiny-llm", "tiny-clip", None, WL.replace(text_after=10**6))]
    for _ in range(2):
        with pytest.raises(ConfigError, match="llava on tiny-llm"):
            common.check_runs(too_long)
    assert len(built) == 2


def test_off_writes_nothing(cache, monkeypatch) -> None:
    monkeypatch.setenv("MLLM_BENCH_COUNT_CACHE", "off")
    profiling.profile("llava", WL, **TINY)
    assert not cache.exists()


def test_meta_builds_skip_initialisation_and_restore_it() -> None:
    normal = torch.nn.init.normal_
    meta = build_model("llava-next", "tiny-llm", "tiny-clip", device="meta")
    cpu = build_model("llava-next", "tiny-llm", "tiny-clip", device="cpu")
    assert torch.nn.init.normal_ is normal
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in cpu.named_parameters()}
    assert all(p.is_meta for p in meta.parameters())
    torch.manual_seed(0)
    first = build_model("llava", "tiny-llm", "tiny-clip", device="cpu").vision_tower.embeddings.class_embedding
    torch.manual_seed(0)
    assert not torch.equal(first, torch.zeros_like(first))
    assert torch.equal(first, build_model("llava", "tiny-llm", "tiny-clip", device="cpu")
                       .vision_tower.embeddings.class_embedding)


@pytest.mark.parametrize("damage", ["a row without its note", "no parameter count"])
def test_a_rows_entry_that_parses_but_is_not_whole_is_computed_again(cache, damage) -> None:
    import json

    cold = profiling.profile("llava", WL, **TINY)
    (entry,) = (cache.parent / "rows").glob("*.json")
    data = json.loads(entry.read_text(encoding="utf-8"))
    if damage == "no parameter count":
        del data["params"]
    else:
        del data["rows"][0]["note"]
    entry.write_text(json.dumps(data), encoding="utf-8")
    again = profiling.profile("llava", WL, **TINY)
    assert _fields(again) == _fields(cold)
    assert json.loads(entry.read_text(encoding="utf-8")) != data  # written whole again


def test_cache_entries_skip_fsync_and_results_keep_it(cache, monkeypatch, tmp_path) -> None:
    import os

    from mllm_bench import atomic
    from mllm_bench.fingerprint import read_entry, write_entry

    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    write_entry("counts", "probe", {"a": 1})
    assert synced == [] and read_entry("counts", "probe") == {"a": 1}
    atomic.atomic_write_text(tmp_path / "result.json", "{}")
    assert len(synced) == 1
