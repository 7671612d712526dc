"""LLaVA-NeXT (AnyRes): logits and visual-token counts equal transformers'; cost, caching, stages."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mllm_bench.architectures.llava_next import LLaVANeXT, crops_of_tower_images, select_best_resolution
from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from mllm_bench import MultimodalBatch, Workload, build_model
from mllm_bench.checkpoint import load_weights
from mllm_bench.config import ConfigError
from mllm_bench.flops import count_prefill, count_train_step
from mllm_bench.registry import architecture_names, register, unregister

from .helpers import assert_gradients_reach_exactly, tiny_model
from .test_llava_faithful import hf_llama_config

V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# tiny-clip is 32 px: llava-v1.6's grid of tiles at 32 px; (height, width) of three aspect ratios
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SQUARE, WIDE, TALL = (64, 64), (40, 100), (100, 30)


@pytest.fixture(autouse=True, scope="module")
def registered():
    installed = "llava-next" in architecture_names()
    if not installed:
        register(LLaVANeXT)
    yield
    if not installed:
        unregister("llava-next")


def hf_llava_next(model) -> LlavaNextForConditionalGeneration:
    """transformers' model on the same tiny config, its weights loaded into ``model`` through the renames."""
    v = model.vision_config
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
    )
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=hf_llama_config(model), image_token_index=model.llm_config.vocab_size - 1,
        vision_feature_layer=v.feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_grid_pinpoints=TINY_PINPOINTS,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(321)
    hf = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    missing = load_weights(model, hf.state_dict())  # strict: every one of our parameters comes from transformers'
    assert not missing
    return hf


def hf_inputs(batch: MultimodalBatch, counts: list[list[int]], image_token: int, pad: int = 0):
    """transformers' input format: each image as its count of placeholder tokens; shorter prompts left-padded."""
    rows, masks = [], []
    for b in range(batch.batch_size):
        ids, real = batch.input_ids[b].tolist(), batch.text_mask()[b].tolist()
        positions = batch.image_positions[b].tolist()
        row, mask = [], []
        for i in range(len(ids) + 1):
            for k in [k for k, p in enumerate(positions) if p == i]:
                row += [image_token] * counts[b][k]
                mask += [True] * counts[b][k]
            if i < len(ids):
                row.append(ids[i])
                mask.append(real[i])
        rows.append(row)
        masks.append(mask)
    n = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (n - len(m)) + m for m in masks])
    return ids, mask


def tiny_batch(model, sizes: list[list[tuple[int, int]]], positions: list[list[int]], text: int = 9,
               pad: list[int] | None = None, seed: int = 1, vocab_limit: int | None = None) -> MultimodalBatch:
    """A random batch whose images have the given original (height, width) sizes."""
    gen = torch.Generator().manual_seed(seed)
    b, k, s = len(sizes), len(sizes[0]), model.vision_config.image_size
    p = max(model.num_crops(hw) for row in sizes for hw in row)
    ids = torch.randint(0, vocab_limit or model.llm_config.vocab_size, (b, text), generator=gen)
    mask = None
    if pad is not None:
        mask = torch.ones(b, text, dtype=torch.bool)
        for i, n in enumerate(pad):
            mask[i, :n] = False
    return MultimodalBatch(ids, torch.randn(b, k, p, 3, s, s, generator=gen), torch.tensor(positions), mask,
                           image_sizes=torch.tensor(sizes, dtype=torch.long))


@pytest.mark.parametrize("sizes, positions, pad", [
    ([[SQUARE], [WIDE], [TALL]], [[2], [5], [0]], None),
    ([[WIDE, TALL], [SQUARE, WIDE]], [[1, 4], [0, 6]], None),
    ([[TALL], [SQUARE]], [[5], [4]], [3, 0]),
], ids=["three-aspect-ratios", "two-images", "left-padded"])
def test_logits_match_transformers(sizes, positions, pad):
    model = tiny_model("llava-next")
    hf = hf_llava_next(model)
    vocab = model.llm_config.vocab_size
    batch = tiny_batch(model, sizes, positions, pad=pad, vocab_limit=vocab - 1)
    counts = model.image_token_counts(batch).tolist()
    ids, mask = hf_inputs(batch, counts, vocab - 1)
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(input_ids=ids, attention_mask=mask.long(), position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
                    pixel_values=batch.pixel_values.flatten(0, 1), image_sizes=batch.image_sizes.flatten(0, 1)).logits
    text = (ids != vocab - 1) & mask
    torch.testing.assert_close(ours[batch.text_mask()], theirs[text], atol=1e-5, rtol=1e-5)


def test_image_features_equal_transformers_packing():
    """Our packed tokens per image equal ``get_image_features``' (also its lengths) for each aspect ratio."""
    model = tiny_model("llava-next")
    hf = hf_llava_next(model)
    batch = tiny_batch(model, [[SQUARE, WIDE, TALL]], [[0, 3, 6]])
    counts = model.image_token_counts(batch)
    with torch.no_grad():
        ours = model.spliced_features(batch, counts)[0]
        theirs = hf.model.get_image_features(batch.pixel_values[0], batch.image_sizes[0]).pooler_output
    assert [t.shape[0] for t in theirs] == counts[0].tolist()
    torch.testing.assert_close(ours, torch.cat(theirs), atol=1e-5, rtol=1e-5)


def processor_count(height: int, width: int, pinpoints: list[list[int]], tower: int, patch: int) -> int:
    """transformers' own count: ``LlavaNextProcessor._get_number_of_features`` minus the CLS ("default")."""
    proc = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints), patch_size=patch,
                           num_additional_image_tokens=1)
    proc._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(proc, *a)
    return LlavaNextProcessor._get_number_of_features(proc, height, width, tower, tower) - 1


@pytest.mark.parametrize("size", [(672, 672), (336, 336), (672, 1008), (1008, 672), (336, 1008), (480, 640),
                                  (1080, 1920), (50, 2000)])
def test_visual_token_counts_equal_transformers_at_336(size):
    model = build_model("llava-next", "vicuna-7b", "clip-vit-l-336", device="meta")
    assert model.image_tokens(size) == processor_count(*size, V16_PINPOINTS, 336, 14)


def test_672_square_is_2928_tokens_not_2880():
    model = build_model("llava-next", "vicuna-13b", "clip-vit-l-336", device="meta")
    base, grid = 24 * 24, 48  # 336/14 patches a side; a 2x2 grid of tiles is 48 features a side, no padding cut
    assert select_best_resolution((672, 672), model.pinpoints) == (672, 672)
    assert model.image_tokens((672, 672)) == base + grid * grid + grid == 2928
    # a square image at the tower's size fits 1x2 tiles; the padded half of the grid is cut off again
    assert model.image_tokens((336, 336)) == base + 24 * 24 + 24 == model.tokens_per_image


def test_crops_equal_transformers_image_processor():
    """The processor's crops per image (tiles + base) equal ours, and its image_sizes are (height, width)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    model = tiny_model("llava-next")
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=TINY_PINPOINTS)
    for h, w in (SQUARE, WIDE, TALL):
        image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
        out = proc(images=[image], return_tensors="pt")
        assert out["image_sizes"].tolist() == [[h, w]]
        assert out["pixel_values"].shape[1] == model.num_crops((h, w))


def test_images_at_the_tower_size_are_cut_as_the_processor_cuts_them():
    """A plain (B, K, C, s, s) batch: the model cuts each image into the processor's crops itself."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=TINY_PINPOINTS)
    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    theirs = proc(images=[image], return_tensors="pt")["pixel_values"][0]  # base + 2 tiles (1x2 grid)
    model = tiny_model("llava-next")
    ours = crops_of_tower_images(theirs[0][None, None], model.pinpoints)[0, 0]
    assert ours.shape == theirs.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    plain = MultimodalBatch(torch.randint(0, 200, (1, 6)), theirs[0][None, None], torch.tensor([[2]]))
    cut = MultimodalBatch(plain.input_ids, theirs[None, None], plain.image_positions,
                          image_sizes=torch.tensor([[[32, 32]]]))
    with torch.no_grad():
        torch.testing.assert_close(model(plain).logits, model(cut).logits)


def test_per_image_counts_set_the_layout():
    model = tiny_model("llava-next")
    batch = tiny_batch(model, [[SQUARE, WIDE], [TALL, TALL]], [[1, 4], [0, 6]])
    x, layout = model.embed(batch)
    square, wide, tall = (model.image_tokens(s) for s in (SQUARE, WIDE, TALL))
    longest = max(square + wide, 2 * tall)
    assert x.shape[1] == layout.length == 9 + longest
    assert layout.is_visual.sum(1).tolist() == [square + wide, 2 * tall]
    assert layout.valid.sum(1).tolist() == [9 + square + wide, 9 + 2 * tall]


@pytest.mark.parametrize("sizes", [[(64, 64), (40, 100)], [(100, 30), (64, 64)]])
def test_counted_equals_analytic_with_image_sizes(sizes):
    model = build_model("llava-next", "tiny-llm", "tiny-clip", device="meta")
    wl = Workload(batch_size=2, images_per_sample=2, image_sizes=sizes, text_before=3, text_between=2, text_after=5)
    analytic = model.analytic_cost(wl)
    assert analytic.info["visual_tokens_per_image"] == [model.image_tokens(s) for s in sizes]
    assert count_prefill(model, wl).total == pytest.approx(analytic.flops("prefill"), rel=1e-9)
    for stage in ("pretrain", "finetune"):
        train = wl.replace(stage=stage)
        assert count_train_step(model, train).total == pytest.approx(model.analytic_cost(train).flops("train_step"),
                                                                     rel=1e-9)


def test_cost_grows_with_the_image():
    """A 672x672 image costs its 2,928 tokens in the decoder, the tower 5 crops (7B, meta)."""
    model = build_model("llava-next", "vicuna-7b", "clip-vit-l-336", device="meta")
    small, big = (model.analytic_cost(Workload(image_sizes=s)) for s in ((336, 336), (672, 672)))
    v = model.vision_config
    per_crop = small.flops("prefill", component="vision") / 3
    assert big.flops("prefill", component="vision") == pytest.approx(5 * per_crop)
    layer_linears = 2 * 32 * (3 * 4096 * 4096 + 4096 * 4096 + 3 * 4096 * 11008)
    assert (big.flops("prefill", component="ffn") + big.flops("prefill", component="attn_proj")
            - small.flops("prefill", component="ffn") - small.flops("prefill", component="attn_proj")) == \
        pytest.approx((2928 - 1176) * layer_linears)
    assert v.image_size == 336


def test_cached_generation_equals_recomputation():
    model = tiny_model("llava-next")
    batch = tiny_batch(model, [[WIDE], [SQUARE]], [[2], [4]], text=7, pad=[0, 3])
    cached = model.generate(batch, 5)
    ids, mask = batch.input_ids, batch.text_mask()
    expected = []
    with torch.no_grad():
        for _ in range(5):
            logits = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask,
                                           image_sizes=batch.image_sizes)).logits
            nxt = logits[:, -1].argmax(-1)
            expected.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], 1)
    assert torch.equal(cached, torch.stack(expected, 1))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_reach_exactly_the_trainable_parameters(stage):
    model = tiny_model("llava-next")
    trainable = model.set_stage(stage)
    expected = {"pretrain": ("multi_modal_projector.",),
                "finetune": ("multi_modal_projector.", "image_newline", "language_model.", "lm_head.")}[stage]
    assert trainable and all(n.startswith(expected) for n in trainable)
    assert ("image_newline" in trainable) == (stage == "finetune")
    batch = tiny_batch(model, [[TALL], [WIDE]], [[2], [5]], text=8)
    batch.labels = batch.input_ids.clone()
    out = model(batch)
    out.loss.backward()
    assert_gradients_reach_exactly(model, trainable)


def test_bad_inputs_are_refused():
    model = tiny_model("llava-next")
    batch = tiny_batch(model, [[SQUARE]], [[2]])
    with pytest.raises(ConfigError, match="image_sizes"):
        model(MultimodalBatch(batch.input_ids, batch.pixel_values, batch.image_positions))
    with pytest.raises(ConfigError, match="crops"):
        model(MultimodalBatch(batch.input_ids, batch.pixel_values[:, :, :2], batch.image_positions,
                              image_sizes=batch.image_sizes))
    with pytest.raises(ConfigError, match="multiples"):
        tiny_model("llava-next", image_grid_pinpoints="48x32")
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        tiny_model("llava-next", image_grid_pinpoints="wide")
    assert tiny_model("llava-next", image_grid_pinpoints="64x32,32x64").pinpoints == ((32, 64), (64, 32))


def test_cli_image_size_sets_each_images_size(tmp_path):
    from mllm_bench.cli.app import app
    from mllm_bench.cli.common import parse_image_size
    from typer.testing import CliRunner

    assert parse_image_size("672x1008") == (None, ((1008, 672),))  # W x H on the CLI, (height, width) inside
    assert parse_image_size("336") == (336, None)
    assert parse_image_size("64x32,32x96") == (None, ((32, 64), (96, 32)))
    with pytest.raises(ConfigError, match="--image-size"):
        parse_image_size("672x")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["compare", "-a", "llava,llava-next", "--llm", "tiny-llm", "--vision",
                                      "tiny-clip", "--image-size", "64x32", "--measure", "never", "--count", "none",
                                      "--out", str(out), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(next(out.glob("*.csv")))
    tokens = rows.groupby("arch")["visual_tokens"].first().to_dict()
    # 32 px high, 64 wide: a 1x2 grid of 4x4-feature tiles, no padding to cut: 16 base + 4 x 8 + 4 newlines
    assert tokens == {"llava": 16, "llava-next": 16 + 4 * 8 + 4}


def test_transformers4_checkpoint_names_load():
    """llava-hf/llava-v1.6-vicuna-7b-hf's files use transformers-4 names (``image_newline``,
    ``language_model.model.``, ``language_model.lm_head.``, ``vision_tower.vision_model.``); they load too."""
    source = tiny_model("llava-next")
    hf = hf_llava_next(source)
    v4 = {}
    for key, value in hf.state_dict().items():
        if key.startswith("model.language_model."):
            key = "language_model.model." + key.removeprefix("model.language_model.")
        elif key.startswith("lm_head."):
            key = "language_model." + key
        elif key.startswith("model.vision_tower."):
            key = "vision_tower.vision_model." + key.removeprefix("model.vision_tower.").removeprefix("vision_model.")
        else:
            key = key.removeprefix("model.")
        v4[key] = value
    assert "image_newline" in v4 and "vision_tower.vision_model.embeddings.patch_embedding.weight" in v4
    target = tiny_model("llava-next", seed=7)
    assert not load_weights(target, v4)
    for name, param in source.state_dict().items():
        assert torch.equal(param, target.state_dict()[name]), name
