"""Checkpoint layouts of transformers 4 and 5 load through the renaming; weights load into a meta model."""

from __future__ import annotations

import pytest
import torch
from mllm_bench.architectures.llava import LLaVA

from mllm_bench import build_model
from mllm_bench.checkpoint import load_weights, to_mllm_bench_names

from .helpers import random_batch, tiny_model


@pytest.mark.parametrize("layout", ["transformers5", "transformers4.52", "transformers4"])
def test_checkpoint_layouts_load(layout):
    source, target = tiny_model("llava", seed=1), tiny_model("llava", seed=2)
    state = {}
    for key, value in source.state_dict().items():
        if layout == "transformers5":
            key = key if key.startswith("lm_head") else "model." + key
        elif layout == "transformers4.52":
            key = key if key.startswith("lm_head") else "model." + key
            key = key.replace("model.vision_tower.", "model.vision_tower.vision_model.")
        else:
            key = key.replace("language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
            key = key.replace("vision_tower.", "vision_tower.vision_model.")
        state[key] = value
    assert set(to_mllm_bench_names(state, LLaVA.spec.checkpoint_renames)) == set(source.state_dict())
    load_weights(target, state)
    batch = random_batch(source, batch=1, text=5, positions=[[1]])
    with torch.no_grad():
        torch.testing.assert_close(target(batch).logits, source(batch).logits)


def test_weights_load_into_a_meta_model():
    source = tiny_model("llava")
    meta = build_model("llava", "tiny-llm", "tiny-clip", device="meta", dtype="float32")
    load_weights(meta, source.state_dict())
    assert all(p.device.type == "cpu" for p in meta.parameters())
    batch = random_batch(source, batch=1, text=5, positions=[[1]])
    with torch.no_grad():
        torch.testing.assert_close(meta.eval()(batch).logits, source(batch).logits)
