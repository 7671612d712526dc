"""The static KV cache decodes exactly like the growing one, for every architecture, with padding and
several images; its bookkeeping (slots, capacity, rollback) is checked directly."""

from __future__ import annotations

import pytest
import torch

from mllm_bench.config import ConfigError
from mllm_bench.registry import architecture_names
from mllm_bench.static_decode import DecodeGraph, StaticKVCache, decode_steps
from tests.helpers import random_batch, tiny_model

ARCHS = architecture_names()


def left_padded(model, positions: list[list[int]]):
    return random_batch(model, batch=2, text=9, positions=positions, pad=[2, 0])  # sample 0 two tokens shorter


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positions", ([[3], [5]], [[2, 5], [3, 4]]), ids=("1_image", "2_images"))
def test_static_cache_decodes_like_the_growing_cache(arch: str, positions: list[list[int]]) -> None:
    model = tiny_model(arch)
    batch = left_padded(model, positions)
    with torch.no_grad():
        logits, cache = model.prefill(batch)
        _, ref_cache = model.prefill(batch)
        static_step, static = decode_steps(model, cache, 4, "static")
        assert isinstance(static, StaticKVCache) and static.capacity == static.length + 4
        tokens = logits.argmax(-1)
        for _ in range(4):
            ref, ref_cache = model.decode(tokens, ref_cache)
            out = static_step(tokens)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            tokens = ref.argmax(-1)
        assert static.length == ref_cache.length
        assert static.nbytes() == ref_cache.nbytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_gives_the_same_tokens_in_every_cpu_decode_mode(arch: str) -> None:
    model = tiny_model(arch)
    batch = left_padded(model, [[3], [5]])
    dynamic = model.generate(batch, 5)
    static = model.generate(batch, 5, decode_mode="static")
    assert torch.equal(static, dynamic)


def test_static_cache_bookkeeping_and_errors() -> None:
    model = tiny_model("saisa")
    batch = random_batch(model, batch=2, text=6)
    with torch.no_grad():
        _, cache = model.prefill(batch)
        n = cache.length
        with pytest.raises(ConfigError, match="capacity must exceed"):
            StaticKVCache.from_cache(cache, n)
        static = StaticKVCache.from_cache(cache, n + 2)
        assert static.k_pos.shape == (2, n + 2) and not static.k_valid[:, n:].any()
        assert torch.equal(static.layers[0].k[:, :, :n], cache.layers[0].k)
        state = static.state()
        token = torch.zeros(2, dtype=torch.long)
        model.decode(token, static)
        assert static.length == n + 1 and int(static.slot) == n and static.k_valid[:, n].all()
        assert torch.equal(static.k_pos[:, n], cache.next_pos)
        static.restore(state)
        assert static.length == n and int(static.slot) == n - 1 and not static.k_valid[:, n:].any()
        model.decode(token, static)
        model.decode(token, static)
        with pytest.raises(ConfigError, match="full"):
            model.decode(token, static)
        with pytest.raises(ConfigError, match="one token per step"):
            static.layers[0].append(cache.layers[0].k, cache.layers[0].v)
        with pytest.raises(ConfigError, match="decode_mode must be one of"):
            decode_steps(model, cache, 2, "fast")
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            DecodeGraph(model, StaticKVCache.from_cache(cache, n + 2))
        with pytest.raises(ConfigError, match="decode_mode must be one of"):
            model.generate(batch, 2, decode_mode="graphs")
