"""The count cache returns exactly what counting returns, and only for the same code, model and workload."""

from __future__ import annotations

import pytest
import torch

import mllm_bench.profile as profiling
from mllm_bench import count_cache
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


def test_an_unreadable_entry_is_counted_again(cache) -> None:
    cold = profiling.profile("llava", WL, **TINY)
    (entry,) = cache.glob("*.json")
    entry.write_text("{not json", encoding="utf-8")
    again = profiling.profile("llava", WL, **TINY)
    assert _fields(again) == _fields(cold)
    assert entry.read_text(encoding="utf-8").startswith("{")


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
