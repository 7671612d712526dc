"""LLaVA and NAAViT behaviour: padding, caching, NAAViT's mask, gradients per stage, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mllm_bench import ConfigError, MultimodalBatch
from mllm_bench.checkpoint import load_weights, read_state_dict

from .helpers import assert_gradients_reach_exactly, random_batch, tiny_model


def recompute_greedy(model, batch: MultimodalBatch, steps: int) -> torch.Tensor:
    """Greedy decoding without a cache: the full sequence again at every step."""
    ids, mask = batch.input_ids, batch.text_mask()
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask)).logits
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", ["llava", "naavit"])
def test_cached_generation_equals_recomputation(arch):
    model = tiny_model(arch)
    batch = random_batch(model, batch=2, text=7, positions=[[2], [4]], pad=[0, 3])
    cached = model.generate(batch, 6)
    assert torch.equal(cached, recompute_greedy(model, batch, 6))


@pytest.mark.parametrize("arch", ["llava", "naavit"])
def test_left_padding_does_not_change_a_sample(arch):
    model = tiny_model(arch)
    single = random_batch(model, batch=1, text=6, positions=[[2]])
    padded = MultimodalBatch(
        torch.cat([torch.zeros(1, 3, dtype=torch.long), single.input_ids], 1), single.pixel_values,
        single.image_positions + 3, torch.tensor([[False] * 3 + [True] * 6]),
    )
    with torch.no_grad():
        ref = model(single).logits
        got = model(padded).logits[:, 3:]
        ref_next, _ = model.prefill(single)
        got_next, _ = model.prefill(padded)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_next, ref_next, atol=1e-5, rtol=1e-5)


def test_right_padding_is_refused_for_generation():
    model = tiny_model("llava")
    batch = random_batch(model, batch=1, text=6, positions=[[2]])
    batch.attention_mask = torch.tensor([[True] * 4 + [False] * 2])
    with pytest.raises(ConfigError, match="left padding"):
        model.generate(batch, 2)


def test_naavit_differs_from_llava_only_through_visual_visual_attention():
    llava, naavit = tiny_model("llava"), tiny_model("naavit")
    naavit.load_state_dict(llava.state_dict())
    batch = random_batch(llava, batch=2, text=8, positions=[[2], [5]])
    with torch.no_grad():
        ref = llava(batch).logits
        removed = naavit(batch).logits
        naavit.mask_rule = None  # re-allow visual-visual attention on this instance
        allowed = naavit(batch).logits
    torch.testing.assert_close(allowed, ref, atol=1e-6, rtol=1e-6)
    # text before the image never sees visual tokens: identical; text after it: changed
    torch.testing.assert_close(removed[0, :2], ref[0, :2], atol=1e-6, rtol=1e-6)
    assert (removed[0, 2:] - ref[0, 2:]).abs().max() > 1e-4


def test_naavit_visual_query_sees_only_text_before_and_itself():
    model = tiny_model("naavit")
    from mllm_bench.batch import splice_layout

    batch = random_batch(model, batch=1, text=5, positions=[[2]])
    layout = splice_layout(batch, model.tokens_per_image)
    dense = model.sequence_mask(layout).dense()[0, 0]
    first_visual = int(layout.visual_index[0, 0])
    third_visual = int(layout.visual_index[0, 2])
    allowed = dense[third_visual].nonzero().flatten().tolist()
    assert allowed == [0, 1, third_visual]
    assert dense[first_visual].nonzero().flatten().tolist() == [0, 1, first_visual]
    last_text = int(layout.text_index[0, -1])
    assert bool(dense[last_text, : last_text + 1].all())


@pytest.mark.parametrize("arch", ["llava", "naavit"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_reach_exactly_the_trainable_parameters(arch, stage):
    model = tiny_model(arch)
    trainable = model.set_stage(stage)
    expected_prefixes = {"pretrain": ("multi_modal_projector.",),
                         "finetune": ("multi_modal_projector.", "language_model.", "lm_head.")}[stage]
    assert trainable and all(n.startswith(expected_prefixes) for n in trainable)
    batch = random_batch(model, batch=2, text=8, positions=[[2], [5]], labels=True)
    out = model(batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert_gradients_reach_exactly(model, trainable)


def test_loss_ignores_targets_right_after_an_image():
    model = tiny_model("llava")
    batch = random_batch(model, batch=1, text=6, positions=[[3]], labels=True)
    base = model(batch).loss
    changed = batch.labels.clone()
    changed[0, 3] = (changed[0, 3] + 1) % model.llm_config.vocab_size  # the token right after the image
    batch.labels = changed
    assert torch.equal(model(batch).loss, base)
    changed[0, 4] = (changed[0, 4] + 1) % model.llm_config.vocab_size
    assert not torch.equal(model(batch).loss, base)


def test_checkpoint_round_trip_through_safetensors(tmp_path):
    source, target = tiny_model("llava", seed=1), tiny_model("llava", seed=2)
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v.contiguous() for k, v in source.state_dict().items()}
    state["model.vision_tower.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(4, 4)  # a layer we never build
    save_file(state, str(tmp_path / "model.safetensors"))
    load_weights(target, read_state_dict(tmp_path))
    batch = random_batch(source, batch=1, text=5, positions=[[1]])
    with torch.no_grad():
        torch.testing.assert_close(target(batch).logits, source(batch).logits)
    with pytest.raises(ConfigError, match="missing"):
        load_weights(target, {"lm_head.weight": state["lm_head.weight"]})
