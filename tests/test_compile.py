"""Decoder layers compile whole: no graph breaks on any architecture's fast path (prefill, decode with either
cache), and a compiled SAISA matches eager. Host-side mask work happens in ``prepare_mask``, before the layer runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from mllm_bench.attention import record_paths
from mllm_bench.registry import architecture_names, architecture_spec
from mllm_bench.static_decode import StaticLayerKV, decode_steps
from tests.helpers import random_batch, tiny_model


def layer_calls(model: Any, run: Any) -> list[tuple[tuple, dict]]:
    """The arguments every call of decoder layer 0 received while ``run()`` ran (its cache as it was then)."""
    calls: list[tuple[tuple, dict]] = []
    layer = model.language_model.layers[0]

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        cache = args[3]
        if isinstance(cache, StaticLayerKV):  # written in place: keep copies of what it held
            args = (*args[:3], StaticLayerKV(cache.k.clone(), cache.v.clone(), cache.slot.clone()), *args[4:])
        elif cache is not None:  # the layer appends to it: keep a snapshot of what it had
            args = (*args[:3], type(cache)(cache.k, cache.v), *args[4:])
        calls.append((args, kwargs))

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("arch", architecture_names())
def test_decoder_layer_traces_without_graph_breaks(arch: str) -> None:
    model = tiny_model(arch)
    model.set_attention_backend(architecture_spec(arch).fast_attention_backend)
    batch = random_batch(model, batch=2, text=9)
    with torch.no_grad():
        logits, cache = model.prefill(batch)
        prefill_calls = layer_calls(model, lambda: model.prefill(batch))
        decode_calls = layer_calls(model, lambda: model.decode(logits.argmax(-1), cache))
        static_step, _ = decode_steps(model, model.prefill(batch)[1], 2, "static")
        static_calls = layer_calls(model, lambda: static_step(logits.argmax(-1)))
        layer = model.language_model.layers[0]
        for args, kwargs in (prefill_calls[0], decode_calls[0], static_calls[0]):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(layer)(*args, **kwargs)
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
            assert explained.graph_count == 1


def test_compiled_saisa_matches_eager_and_records_paths() -> None:
    model = tiny_model("saisa")
    model.set_attention_backend("flash")
    batch = random_batch(model, batch=2, text=9)
    with torch.no_grad():
        ref = model(batch).logits
        torch._dynamo.reset()
        model.compile_layers(backend="aot_eager")  # the traced graph without a C++ toolchain
        with record_paths() as paths:
            out = model(batch).logits
            graphs = counters["stats"]["unique_graphs"]
            for _ in range(3):  # counting paths must not make calls recompile
                model(batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert paths == {"flash:split": 4 * model.llm_config.num_layers}  # noted once per layer call
