"""Batches and the loss: padding never enters the loss, prompts end with text and are left padded, bad
batches are named (not torch errors), a loss with no target is zero, checkpointing runs with a cache."""

from __future__ import annotations

import pytest
import torch

from mllm_bench import ConfigError, MultimodalBatch, Workload, build_model
from mllm_bench.registry import architecture_names

from .helpers import random_batch, set_gates, tiny_model


@pytest.mark.parametrize("arch", architecture_names())
def test_padding_never_enters_the_loss(arch):
    model = tiny_model(arch)
    set_gates(model, 0.5)  # Flamingo's gates: open them so the image matters (a no-op elsewhere)
    batch = random_batch(model, batch=2, text=8, positions=[[4], [4]], labels=True)
    batch.attention_mask = torch.ones(2, 8, dtype=torch.bool)
    batch.attention_mask[1, :3] = False
    first = model(batch).loss
    batch.input_ids[1, :3] = (batch.input_ids[1, :3] + 7) % model.llm_config.vocab_size  # only padding changes
    batch.labels = batch.input_ids.clone()
    assert torch.equal(model(batch).loss, first)


def test_prompts_must_end_with_text_and_be_left_padded():
    model = tiny_model("llava")
    batch = random_batch(model, batch=1, text=5, positions=[[5]])
    with pytest.raises(ConfigError, match="a prompt must end with text"):
        model.generate(batch, 2)
    right = random_batch(model, batch=1, text=6, positions=[[2]])
    right.attention_mask = torch.tensor([[True] * 4 + [False] * 2])
    for arch in architecture_names():
        with pytest.raises(ConfigError, match="left padding"):
            tiny_model(arch).prefill(right)


def test_gradient_checkpointing_with_a_cache_runs():
    model = tiny_model("llava")
    model.set_stage("finetune")
    model.set_gradient_checkpointing(True)
    logits, cache = model.prefill(random_batch(model, batch=1, text=5, positions=[[1]]))
    logits.sum().backward()
    assert cache.length == 5 + model.tokens_per_image


def test_bad_input_is_named_not_a_torch_error():
    model = tiny_model("llava")
    batch = random_batch(model, batch=1, text=5, positions=[[1]], labels=True)
    cases = [
        (dict(pixel_values=batch.pixel_values[:, :, :1]), "3 \\(RGB\\) channels"),
        (dict(image_positions=batch.image_positions.float()), "image_positions must be torch.long"),
        (dict(labels=batch.labels.float()), "labels must be torch.long"),
        (dict(input_ids=batch.input_ids[:, :0], labels=None, image_positions=torch.zeros(1, 1, dtype=torch.long)),
         "at least one text token"),
    ]
    for change, message in cases:
        fields = dict(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                      image_positions=batch.image_positions, attention_mask=None, labels=batch.labels)
        fields.update(change)
        with pytest.raises(ConfigError, match=message):
            model(MultimodalBatch(**fields))
    with pytest.raises(ConfigError, match="device 'gpu'"):
        build_model("llava", "tiny-llm", "tiny-clip", device="gpu")
    with pytest.raises(ConfigError, match="options must be a dict"):
        build_model("llava", "tiny-llm", "tiny-clip", options="abc")
    with pytest.raises(ConfigError, match="llm must be a preset name"):
        build_model("llava", 7, "tiny-clip")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        Workload(batch_size=True)
    from mllm_bench.config import replace
    from mllm_bench.presets import vision_preset

    with pytest.raises(ConfigError, match="hidden_act 'relu6x' is not supported; choose one of"):
        replace(vision_preset("tiny-clip"), hidden_act="relu6x")


def test_loss_without_any_target_is_zero_not_nan():
    model = tiny_model("llava")
    model.set_stage("finetune")
    batch = random_batch(model, batch=1, text=5, positions=[[1]], labels=True)
    batch.labels = torch.full_like(batch.labels, -100)
    loss = model(batch).loss
    assert float(loss) == 0.0
    loss.backward()  # still a graph
