"""ShortV: frozen layers equal a naive full-sequence formulation; num_frozen=0 is LLaVA; caching; stages; costs."""

from __future__ import annotations

import pytest
import torch
from mllm_bench.architectures.shortv import LLAVA_7B_RANKING, ShortV, ShortVOptions

from mllm_bench import MultimodalBatch, Workload, build_model
from mllm_bench.config import ConfigError
from mllm_bench.flops import count_prefill, count_train_step
from mllm_bench.masks import causal_mask
from mllm_bench.registry import architecture_names, register, unregister

from .helpers import assert_gradients_reach_exactly, random_batch, tiny_model


@pytest.fixture(autouse=True)
def registered():
    """Register shortv for these tests unless it is installed already."""
    installed = "shortv" in architecture_names()
    if not installed:
        register(ShortV)
    yield
    if not installed:
        unregister("shortv")


def naive_shortv_logits(model: ShortV, batch: MultimodalBatch, frozen: set[int]) -> torch.Tensor:
    """ShortV as LLaVA over the spliced sequence with a dense causal mask, every row through every layer; in a
    frozen layer the visual rows' outputs are overwritten by their inputs. Logits (B, T, V) at the text rows."""
    lm = model.language_model
    x, layout = model.embed(batch)
    rope = lm.rope(layout.positions, x.dtype)
    mask = causal_mask(layout.positions, layout.valid)
    rows = torch.arange(batch.batch_size).unsqueeze(1)
    for i, layer in enumerate(lm.layers):
        out = layer(x, rope, mask, backend="math").clone()
        if i in frozen:
            out[rows, layout.visual_index] = x[rows, layout.visual_index]
        x = out
    return model.lm_head(lm.norm(x)[rows, layout.text_index])


@pytest.mark.parametrize("frozen", [(0,), (1,), (0, 1)], ids=["first", "last", "both"])
def test_equals_naive_with_two_images_and_left_padding(frozen):
    model = tiny_model("shortv", frozen_layers=frozen)
    batch = random_batch(model, batch=2, text=10, positions=[[2, 7], [0, 5]], pad=[3, 0])
    with torch.no_grad():
        ours = model(batch).logits
        naive = naive_shortv_logits(model, batch, set(frozen))
        plain = naive_shortv_logits(model, batch, set())
    valid = batch.text_mask()
    torch.testing.assert_close(ours[valid], naive[valid], atol=1e-5, rtol=1e-5)
    # freezing a layer before the last changes what later layers read (the last one's visual outputs are unused)
    assert torch.allclose(ours[valid], plain[valid], atol=1e-3) == (frozen == (1,))


def test_no_frozen_layer_is_llava():
    llava = tiny_model("llava")
    model = tiny_model("shortv", num_frozen=0)
    model.load_state_dict(llava.state_dict())
    batch = random_batch(model, batch=2, text=10, positions=[[2, 7], [0, 5]], pad=[3, 0])
    with torch.no_grad():
        a, b = model(batch).logits, llava(batch).logits
    valid = batch.text_mask()
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)


def test_frozen_layer_runs_visual_rows_through_k_and_v_only():
    model = tiny_model("shortv", frozen_layers=(1,))
    batch = random_batch(model, batch=1, text=10, positions=[[4]])
    rows: dict[str, int] = {}

    def hook(name):
        return lambda _m, inputs, _o: rows.__setitem__(name, rows.get(name, 0) + inputs[0].shape[1])

    handles = [m.register_forward_hook(hook(n)) for n, m in model.language_model.layers[1].named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    t, v = batch.num_text, model.tokens_per_image
    assert rows and all(n == (t + v if name.endswith(("k_proj", "v_proj")) else t) for name, n in rows.items())


def test_generate_equals_full_recomputation():
    model = tiny_model("shortv", frozen_layers=(0,))
    batch = random_batch(model, batch=2, text=8, positions=[[2, 5], [0, 6]], pad=[2, 0])
    steps = 4
    with torch.no_grad():
        generated = model.generate(batch, steps)
        ids = batch.input_ids
        for s in range(steps):
            mask = torch.cat([batch.attention_mask, torch.ones(2, s, dtype=torch.bool)], 1)
            full = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask)).logits[:, -1]
            assert torch.equal(full.argmax(-1), generated[:, s])
            ids = torch.cat([ids, generated[:, s:s + 1]], 1)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_reach_exactly_the_trainable_parameters(stage):
    model = tiny_model("shortv", frozen_layers=(0,))
    trainable = model.set_stage(stage)
    expected = ("multi_modal_projector.",) if stage == "pretrain" else (
        "multi_modal_projector.", "language_model.", "lm_head.")
    assert trainable and all(n.startswith(expected) for n in trainable)
    batch = random_batch(model, batch=2, text=10, positions=[[3], [5]], labels=True)
    model(batch).loss.backward()
    assert_gradients_reach_exactly(model, trainable)


@pytest.mark.parametrize("frozen", [(0,), (1,)], ids=["first", "last"])
def test_counted_equals_analytic_for_explicit_layers(frozen):
    """The shared cost test runs the tiny options; here the other frozen layer, both stages (gradient flags)."""
    model = build_model("shortv", "tiny-llm", "tiny-clip", options={"frozen_layers": frozen})
    wl = Workload(batch_size=2, images_per_sample=2, text_before=5, text_between=3, text_after=9)
    assert count_prefill(model, wl).total == pytest.approx(model.analytic_cost(wl).flops("prefill"), rel=1e-9)
    for stage in ("pretrain", "finetune"):
        train = wl.replace(stage=stage)
        assert count_train_step(model, train).total == pytest.approx(
            model.analytic_cost(train).flops("train_step"), rel=1e-9)


def test_layer_choice():
    assert ShortVOptions().layers(32) == tuple(sorted(LLAVA_7B_RANKING))
    assert ShortVOptions(num_frozen=3).layers(32) == (29, 30, 31)
    assert ShortVOptions(num_frozen=2).layers(40) == (38, 39)
    assert ShortVOptions(frozen_layers="[5, 1,3]").layers(8) == (1, 3, 5)
    with pytest.raises(ConfigError, match="num_frozen=19 exceeds"):
        ShortVOptions().layers(2)
    with pytest.raises(ConfigError, match="frozen_layers"):
        ShortVOptions(frozen_layers=(1, 9)).layers(4)
    with pytest.raises(ConfigError, match="frozen_layers"):
        ShortVOptions(frozen_layers="1,x")
