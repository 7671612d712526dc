"""SAISA: the efficient path equals a naive full-sequence formulation; causality, caching, stages, 7B size."""

from __future__ import annotations

import time

import pytest
import torch
from mllm_bench.architectures.saisa import SAISA

from mllm_bench import PAPER_WORKLOAD, MultimodalBatch, build_model
from mllm_bench.batch import splice_layout
from mllm_bench.masks import causal_mask

from .helpers import assert_gradients_reach_exactly, random_batch, tiny_model


def naive_saisa_logits(model: SAISA, batch: MultimodalBatch) -> torch.Tensor:
    """SAISA as a full LLaVA-style sequence: every token runs through every layer (visual ones too),
    with a dense causal mask; before each layer the visual rows are overwritten with that layer's
    projector output, so whatever the visual queries computed is discarded. Logits (B, T, V) at text."""
    lm = model.language_model
    layout = splice_layout(batch, model.tokens_per_image)
    b, length, h = batch.batch_size, layout.length, model.llm_config.hidden_size
    feats = model.image_features(batch.pixel_values)
    x = torch.zeros(b, length, h)
    x[torch.arange(b).unsqueeze(1), layout.text_index] = lm.embed_tokens(batch.input_ids)
    rope = lm.rope(layout.positions, x.dtype)
    mask = causal_mask(layout.positions, layout.valid)
    rows = torch.arange(b).unsqueeze(1)
    for i, layer in enumerate(lm.layers):
        x = x.clone()
        x[rows, layout.visual_index] = model.mm_projectors[i](feats)
        x = layer(x, rope, mask, backend="math")
    return model.lm_head(lm.norm(x)[rows, layout.text_index])


@pytest.mark.parametrize(
    "positions, pads",
    [([[3], [6]], None), ([[2, 7], [0, 4]], None), ([[5], [4]], [3, 0]), ([[3, 3], [10, 10]], None)],
    ids=["one-image", "two-images", "left-padded", "adjacent-and-trailing-images"],
)
def test_efficient_path_equals_naive_full_sequence(positions, pads):
    model = tiny_model("saisa")
    batch = random_batch(model, batch=2, text=10, positions=positions, pad=pads)
    with torch.no_grad():
        ours = model(batch).logits
        naive = naive_saisa_logits(model, batch)
    valid = batch.text_mask()
    torch.testing.assert_close(ours[valid], naive[valid], atol=1e-5, rtol=1e-5)


def test_efficient_path_computes_no_visual_rows():
    """Every decoder linear sees text rows only, except K and V, which also see the visual rows."""
    model = tiny_model("saisa")
    batch = random_batch(model, batch=1, text=10, positions=[[4]])
    rows: dict[str, int] = {}

    def count(name: str):
        def hook(module, inputs, output):
            rows[name] = rows.get(name, 0) + inputs[0].shape[1]
        return hook

    layer = model.language_model.layers[0]
    hooks = [m.register_forward_hook(count(n)) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    t, v = batch.num_text, model.tokens_per_image
    for name, n in rows.items():
        assert n == (t + v if name.endswith(("k_proj", "v_proj")) else t), (name, n)


def test_image_changes_only_text_after_it():
    model = tiny_model("saisa")
    batch = random_batch(model, batch=2, text=10, positions=[[4], [7]])
    other = MultimodalBatch(batch.input_ids, torch.randn_like(batch.pixel_values), batch.image_positions)
    with torch.no_grad():
        a, b = model(batch).logits, model(other).logits
    for i, pos in enumerate([4, 7]):
        torch.testing.assert_close(a[i, :pos], b[i, :pos], atol=0.0, rtol=0.0)
        assert (a[i, pos:] - b[i, pos:]).abs().amax(-1).min() > 1e-4


def test_prefill_and_decode_equal_forward():
    model = tiny_model("saisa")
    batch = random_batch(model, batch=2, text=9, positions=[[5], [4]], pad=[2, 0])
    with torch.no_grad():
        logits, cache = model.prefill(batch)
        torch.testing.assert_close(logits, model(batch).logits[:, -1], atol=1e-5, rtol=1e-5)
        v = model.tokens_per_image
        assert cache.length == 9 + v and cache.layers[0].k.shape[2] == 9 + v
        assert int(cache.k_visual.sum()) == 2 * v
        ids, mask = batch.input_ids, batch.attention_mask
        for _ in range(3):
            token = logits.argmax(-1)
            logits, cache = model.decode(token, cache)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
            full = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask)).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_generate_equals_full_recomputation():
    model = tiny_model("saisa")
    batch = random_batch(model, batch=2, text=8, positions=[[4], [3]], pad=[0, 3])
    steps = 5
    with torch.no_grad():
        generated = model.generate(batch, steps)
        assert generated.shape == (2, steps)
        ids, mask = batch.input_ids, batch.attention_mask
        for s in range(steps):
            full = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask)).logits[:, -1]
            assert torch.equal(full.argmax(-1), generated[:, s])
            ids = torch.cat([ids, generated[:, s:s + 1]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_reach_exactly_the_trainable_parameters(stage):
    model = tiny_model("saisa")
    trainable = model.set_stage(stage)
    expected = ("mm_projectors.",) if stage == "pretrain" else ("mm_projectors.", "language_model.", "lm_head.")
    assert trainable and all(n.startswith(expected) for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(model.num_parameters(p) for p in expected)
    batch = random_batch(model, batch=2, text=10, positions=[[3], [5]], labels=True)
    model(batch).loss.backward()
    assert_gradients_reach_exactly(model, trainable)


def test_key_only_rows_give_the_same_layer_output_joint_or_apart():
    """A layer's key-only rows are normed and projected with the text rows in one pass, or apart when only
    they need a gradient (pretraining's first layer); both give the same output and input gradients."""
    model = tiny_model("saisa")
    layer = model.language_model.layers[0]
    batch = random_batch(model, batch=2, text=10, positions=[[3], [5]])
    calls = []
    handle = layer.register_forward_pre_hook(lambda _m, args: calls.append(args))
    with torch.no_grad():
        model(batch)
    handle.remove()
    x, rope, mask, _, (rows, key_rope), backend = calls[0]
    rows = rows.clone().requires_grad_()
    apart = layer(x, rope, mask, None, (rows, key_rope), backend)  # x needs no gradient, rows do
    together = layer(x.clone().requires_grad_(), rope, mask, None, (rows, key_rope), backend)
    torch.testing.assert_close(apart, together, atol=1e-6, rtol=1e-6)
    (grad_apart,) = torch.autograd.grad(apart.square().sum(), rows)
    (grad_together,) = torch.autograd.grad(together.square().sum(), rows)
    torch.testing.assert_close(grad_apart, grad_together, atol=1e-5, rtol=1e-5)


def test_no_images_is_the_text_only_llm():
    model = tiny_model("saisa")
    ids = torch.randint(0, 256, (2, 7))
    batch = MultimodalBatch(ids, torch.zeros(2, 0, 3, 32, 32), torch.zeros(2, 0, dtype=torch.long))
    with torch.no_grad():
        ours = model(batch).logits
        lm = model.language_model
        pos = torch.arange(7).expand(2, 7)
        plain = model.lm_head(lm(lm.embed_tokens(ids), pos, causal_mask(pos)))
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def projector_params(llm_hidden: int, layers: int, vision_dim: int = 1024) -> int:
    return layers * (vision_dim * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden)


@pytest.mark.parametrize("llm, hidden, layers", [("vicuna-7b", 4096, 32), ("vicuna-13b", 5120, 40)])
def test_full_size_on_meta(llm, hidden, layers):
    start = time.perf_counter()
    model = build_model("saisa", llm)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.num_parameters("mm_projectors.") == projector_params(hidden, layers)
    assert model.num_parameters("multi_modal_projector.") == 0
    assert set(model.trainable_parameters("pretrain")) == {
        n for n, _ in model.named_parameters() if n.startswith("mm_projectors.")
    }
    if llm == "vicuna-7b":
        assert model.num_parameters("mm_projectors.") == 671_350_784  # ≈ 0.67B
        out = model(model.example_batch(PAPER_WORKLOAD))
        assert out.logits.shape == (1, 64, 32000) and out.logits.device.type == "meta"
    assert time.perf_counter() - start < 10
