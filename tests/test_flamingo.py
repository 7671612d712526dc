"""Flamingo-style architecture: gates-at-zero equivalence, media masking, cache, stages, options, 7B size."""

from __future__ import annotations

import pytest
import torch

from mllm_bench import PAPER_WORKLOAD, ConfigError, MultimodalBatch, build_model
from mllm_bench.masks import causal_mask

from .helpers import random_batch, set_gates, tiny_model


def with_pixels(batch: MultimodalBatch, image: int, seed: int) -> MultimodalBatch:
    """A copy of ``batch`` whose image ``image`` (in every sample) is replaced by new noise."""
    pixels = batch.pixel_values.clone()
    pixels[:, image] = torch.randn(pixels[:, image].shape, generator=torch.Generator().manual_seed(seed))
    return MultimodalBatch(batch.input_ids, pixels, batch.image_positions, batch.attention_mask, batch.labels)


@torch.no_grad()
def test_gates_at_zero_equal_text_only_llm():
    model = tiny_model("flamingo")
    batch = random_batch(model, text=9, positions=[[3, 6], [4, 7]], pad=[0, 2])
    valid = batch.attention_mask
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    x = model.language_model.embed_tokens(batch.input_ids)
    text_only = model.lm_head(model.language_model(x, positions, causal_mask(positions, valid)))
    ours = model(batch).logits
    torch.testing.assert_close(ours[valid], text_only[valid], atol=1e-5, rtol=1e-5)
    set_gates(model)
    assert not torch.allclose(model(batch).logits[valid], text_only[valid], atol=1e-3)


@torch.no_grad()
def test_one_image_affects_only_text_from_its_position_on():
    model = tiny_model("flamingo")
    set_gates(model)
    batch = random_batch(model, batch=1, text=10, positions=[[3]])
    a, b = model(batch).logits, model(with_pixels(batch, 0, seed=9)).logits
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=0, rtol=0)
    assert (a[0, 3:] - b[0, 3:]).abs().amax(-1).min() > 1e-4


@torch.no_grad()
def test_text_attends_only_to_the_latest_image():
    model = tiny_model("flamingo")
    set_gates(model)
    batch = random_batch(model, batch=1, text=10, positions=[[3, 6]])
    seen = {}
    hook = model.gated_cross_attn_layers["0"].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    first = model(batch).logits
    block_first = seen["out"]
    second = model(with_pixels(batch, 0, seed=9)).logits
    block_second = seen["out"]
    hook.remove()
    # the first cross-attention block: text after image 2 ignores image 1; text between sees it
    torch.testing.assert_close(block_first[:, 6:], block_second[:, 6:], atol=0, rtol=0)
    torch.testing.assert_close(block_first[:, :3], block_second[:, :3], atol=0, rtol=0)
    assert (block_first[0, 3:6] - block_second[0, 3:6]).abs().amax(-1).min() > 1e-4
    assert (first[0, 3:6] - second[0, 3:6]).abs().amax(-1).min() > 1e-4
    # changing image 2 leaves everything before it alone
    third = model(with_pixels(batch, 1, seed=10)).logits
    torch.testing.assert_close(first[:, :6], third[:, :6], atol=0, rtol=0)
    assert (first[0, 6:] - third[0, 6:]).abs().amax(-1).min() > 1e-4


@torch.no_grad()
def test_an_image_followed_directly_by_another_is_never_seen():
    model = tiny_model("flamingo")
    set_gates(model)
    batch = random_batch(model, batch=1, text=8, positions=[[3, 3]])
    torch.testing.assert_close(model(batch).logits, model(with_pixels(batch, 0, seed=4)).logits, atol=0, rtol=0)


@torch.no_grad()
def test_left_padding_matches_the_unpadded_sample():
    model = tiny_model("flamingo")
    set_gates(model)
    padded = random_batch(model, text=10, positions=[[2, 6], [5, 8]], pad=[0, 3])
    alone = MultimodalBatch(
        padded.input_ids[1:, 3:], padded.pixel_values[1:], padded.image_positions[1:] - 3, None,
    )
    torch.testing.assert_close(model(padded).logits[1, 3:], model(alone).logits[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("positions", [[[2, 5], [4, 6]], [[], []]], ids=["two-images", "no-image"])
def test_cached_generation_equals_full_recomputation(positions):
    model = tiny_model("flamingo", cross_attn_every=2)
    set_gates(model)
    assert model.cross_attn_layer_indices == (1,)
    batch = random_batch(model, text=8, positions=positions, pad=[2, 0])
    steps = 5
    generated = model.generate(batch, steps)
    ids, mask = batch.input_ids, batch.attention_mask
    logits, cache = model.prefill(batch)
    for step in range(steps):
        full = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask)).logits[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        assert torch.equal(full.argmax(-1), generated[:, step])
        ids = torch.cat([ids, generated[:, step:step + 1]], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        logits, cache = model.decode(generated[:, step], cache)
    if positions[0]:
        kv = cache.extra["cross_attn_kv"]["1"][0]
        assert kv.shape == (2, model.options.xattn_heads, model.num_latents, model.options.xattn_dim_head)
        assert model.cross_attn_cache_nbytes(cache) == 2 * kv.numel() * kv.element_size()


@pytest.mark.parametrize(
    ("stage", "train_llm", "prefixes"),
    [
        ("pretrain", False, ("perceiver.", "gated_cross_attn_layers.")),
        ("finetune", False, ("perceiver.", "gated_cross_attn_layers.")),
        ("finetune", True, ("perceiver.", "gated_cross_attn_layers.", "language_model.", "lm_head.")),
    ],
)
def test_gradients_reach_exactly_the_trainable_parameters(stage, train_llm, prefixes):
    model = tiny_model("flamingo", train_llm_in_finetune=train_llm)
    set_gates(model, 0.5)
    trainable = model.set_stage(stage)
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert set(trainable) == expected and any(n.endswith("attn_gate") for n in expected)
    batch = random_batch(model, batch=2, text=10, positions=[[2, 6], [3, 3]], labels=True)
    model(batch).loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == expected
    assert not any(n.startswith("vision_tower.") for n in reached)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for enabled in (False, True):
        model = tiny_model("flamingo")
        set_gates(model, 0.5)
        model.set_stage("pretrain")
        model.set_gradient_checkpointing(enabled)
        batch = random_batch(model, batch=2, text=10, positions=[[2, 6], [3, 3]], labels=True)
        model(batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cross_attn_every": 0}, "cross_attn_every"),
        ({"cross_attn_every": 3}, "cross_attn_every"),  # tiny-llm has 2 layers
        ({"num_latent": 8}, "num_latent"),
        ({"xattn_heads": -1}, "xattn_heads"),
        ({"resampler_depth": 1.5}, "resampler_depth"),
        ({"train_llm_in_finetune": "yes"}, "train_llm_in_finetune"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        build_model("flamingo", "tiny-llm", "tiny-clip", options=options)


def resampler_params(d: int, depth: int = 6, latents: int = 64, inner: int = 512, mult: int = 4) -> int:
    attn = 2 * 2 * d + d * inner + d * 2 * inner + inner * d
    ff = 2 * d + 2 * d * mult * d
    return latents * d + depth * (attn + ff) + 2 * d


def block_params(h: int, dv: int, inner: int = 512, mult: int = 4) -> int:
    attn = 2 * h + h * inner + dv * 2 * inner + inner * h
    ff = 2 * h + 2 * h * mult * h
    return attn + ff + 2


@pytest.mark.parametrize("every", [4, 1])
def test_7b_parameter_counts_and_meta_forward(every, capsys):
    model = build_model("flamingo", "vicuna-7b", "clip-vit-l-336", options={"cross_attn_every": every})
    h, dv = model.llm_config.hidden_size, model.vision_config.hidden_size
    assert model.cross_attn_layer_indices == tuple(range(every - 1, 32, every))
    resampler = model.num_parameters("perceiver.")
    xattn = model.num_parameters("gated_cross_attn_layers.")
    assert resampler == resampler_params(dv)
    assert xattn == (32 // every) * block_params(h, dv)
    total = model.num_parameters()
    llava = build_model("llava")
    base = llava.num_parameters() - llava.num_parameters("multi_modal_projector.")
    assert total == base + resampler + xattn
    assert sum(p.numel() for p in model.trainable_parameters("pretrain").values()) == resampler + xattn
    with capsys.disabled():
        print(f"\nflamingo-7b k={every}: resampler {resampler / 1e6:.2f}M, cross-attn {xattn / 1e9:.3f}B "
              f"({len(model.cross_attn_layer_indices)} blocks), total {total / 1e9:.3f}B")
    if every == 4:
        batch = model.example_batch(PAPER_WORKLOAD)
        logits = model(batch).logits
        assert logits.device.type == "meta" and logits.shape == (1, PAPER_WORKLOAD.num_text_tokens, 32000)
