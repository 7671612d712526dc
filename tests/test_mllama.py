"""Llama-3.2-Vision (mllama): logits equal transformers' MllamaForConditionalGeneration given the same weights,
cached decode equals recomputation, the real preset's parameter count equals transformers', stages, config.json."""

from __future__ import annotations

import json

import pytest
import torch
from mllm_bench.architectures.mllama import LLAMA32_11B_VISION_TEXT, LLAMA32_11B_VISION_TOWER, Mllama
from mllm_bench.architectures.mllama import mllama_configs_from_hf as read_config

from mllm_bench import ConfigError, MultimodalBatch, build_model
from mllm_bench.checkpoint import load_weights
from mllm_bench.registry import architecture_names, register, unregister

from .helpers import tiny_model

IMAGE_TOKEN = 256  # tiny-llm's vocab_size: the first of the 8 extra embedding rows, as 128256 in the 11B


@pytest.fixture(autouse=True)
def registered():
    """Register mllama for these tests unless it is installed already."""
    installed = "mllama" in architecture_names()
    if not installed:
        register(Mllama)
    yield
    if not installed:
        unregister("mllama")


def hf_tiny_config(cross_layers: list[int], max_num_tiles: int = 2):
    """transformers' MllamaConfig at tiny-llm / tiny-clip sizes with the spec's tiny options."""
    from mllm_bench.architectures.mllama.config import supported_aspect_ratios
    from transformers import MllamaConfig

    text = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, cross_attention_layers=cross_layers,
                pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=3, num_global_layers=1, attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=8, norm_eps=1e-5, hidden_act="quick_gelu", max_num_tiles=max_num_tiles,
                  intermediate_layers_indices=[0, 1], vision_output_dim=96,
                  supported_aspect_ratios=[list(r) for r in supported_aspect_ratios(max_num_tiles)])
    config = MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    return config


def hf_tiny_model(seed: int = 0, cross_layers: list[int] | None = None, max_num_tiles: int = 2):
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    hf = MllamaForConditionalGeneration(hf_tiny_config(cross_layers or [1], max_num_tiles)).eval()
    with torch.no_grad():  # every weight random, gates open, norms near 1
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "gate" in name:
                p.copy_(0.3 + 0.5 * torch.rand_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return hf


def processor_inputs(batch: MultimodalBatch, grid: tuple[int, int], max_num_tiles: int, tile: int) -> dict:
    """transformers' inputs for ``batch``, derived as MllamaImageProcessor / MllamaProcessor derive them."""
    from transformers.models.mllama.image_processing_pil_mllama import (
        build_aspect_ratio_mask_np,
        convert_aspect_ratios_to_ids_np,
        split_to_tiles_np,
    )
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    b, k = batch.image_positions.shape
    tiles = torch.zeros(b, k, max_num_tiles, 3, tile, tile)
    for i in range(b):
        for j in range(k):
            split = split_to_tiles_np(batch.pixel_values[i, j].numpy(), *grid)
            tiles[i, j, :grid[0] * grid[1]] = torch.from_numpy(split)
    ratios = [[grid] * k for _ in range(b)]
    token_masks = [get_cross_attention_token_mask(ids.tolist(), IMAGE_TOKEN) for ids in batch.input_ids]
    dense = convert_sparse_cross_attention_mask_to_dense(token_masks, [[grid[0] * grid[1]] * k] * b, max_num_tiles,
                                                         batch.num_text)
    mask = batch.text_mask()
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    ratio_ids = torch.from_numpy(convert_aspect_ratios_to_ids_np(ratios, max_num_tiles))
    ratio_mask = torch.from_numpy(build_aspect_ratio_mask_np(ratios, max_num_tiles))
    return dict(input_ids=batch.input_ids, pixel_values=tiles, aspect_ratio_ids=ratio_ids, aspect_ratio_mask=ratio_mask,
        cross_attention_mask=torch.from_numpy(dense), attention_mask=mask.long(), position_ids=positions)


def tiny_batch(model: Mllama, positions: list[list[int]], text: int = 10, pad: list[int] | None = None,
               seed: int = 1) -> MultimodalBatch:
    """Random text with the image token at each image's position; canvases of the model's tile grid."""
    gen = torch.Generator().manual_seed(seed)
    b = len(positions)
    ids = torch.randint(0, 256, (b, text), generator=gen)
    for i, row in enumerate(positions):
        ids[i, row] = IMAGE_TOKEN
    h, w = model.canvas
    pixels = torch.randn(b, len(positions[0]), 3, h, w, generator=gen)
    mask = None
    if pad is not None:
        mask = torch.ones(b, text, dtype=torch.bool)
        for i, n in enumerate(pad):
            mask[i, :n] = False
    return MultimodalBatch(ids, pixels, torch.tensor(positions, dtype=torch.long).reshape(b, -1), mask)


def ours_from(hf, **options) -> Mllama:
    model = tiny_model("mllama", **options)
    load_weights(model, hf.state_dict())
    return model


@torch.no_grad()
@pytest.mark.parametrize(("positions", "pad", "grid"), [
    ([[2], [4]], [0, 2], (1, 2)),
    ([[2, 6], [3, 4]], [0, 2], (1, 2)),  # sample 1: adjacent image tokens, seen together
    ([[1, 5]], None, (1, 1)),  # one tile of two used: the other is zero and masked
], ids=["one-image", "two-images", "one-tile"])
def test_logits_equal_transformers(positions, pad, grid):
    hf = hf_tiny_model()
    model = ours_from(hf, tile_rows=grid[0], tile_cols=grid[1])
    batch = tiny_batch(model, positions, pad=pad)
    theirs = hf(**processor_inputs(batch, grid, 2, 32)).logits
    ours = model(batch).logits
    valid = batch.text_mask()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)
    # the images matter: other pixels change the logits after the first image
    other = MultimodalBatch(batch.input_ids, torch.randn_like(batch.pixel_values), batch.image_positions,
                            batch.attention_mask)
    assert (model(other).logits[0, -1] - ours[0, -1]).abs().max() > 1e-3


@torch.no_grad()
def test_text_only_skips_the_cross_attention_layers_as_transformers_does():
    hf = hf_tiny_model()
    model = ours_from(hf)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    batch = MultimodalBatch(ids, torch.zeros(2, 0, 3, *model.canvas), torch.zeros(2, 0, dtype=torch.long))
    torch.testing.assert_close(model(batch).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_vision_encoder_equals_transformers_at_the_default_depths():
    """Three-layer-deep intermediate picks and several global layers, at the tower level."""
    from mllm_bench.architectures.mllama.vision import TiledVisionModel
    from transformers import MllamaVisionConfig, MllamaVisionModel

    from mllm_bench.config import VisionConfig

    torch.manual_seed(0)
    cfg = MllamaVisionConfig(hidden_size=32, num_hidden_layers=5, num_global_layers=2, attention_heads=4,
                             intermediate_size=48, image_size=28, patch_size=7, max_num_tiles=4, hidden_act="gelu",
                             intermediate_layers_indices=[1, 3, 4], vision_output_dim=128)
    cfg._attn_implementation = "eager"
    hf = MllamaVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = TiledVisionModel(VisionConfig("t", "clip", 32, 5, 4, 48, 28, 7, hidden_act="gelu"),
                            Mllama.Options(num_global_layers=2, intermediate_layers=(1, 3, 4), tile_rows=1,
                                           tile_cols=3))
    ours.load_state_dict(hf.state_dict())
    tiles = torch.randn(2, 4, 3, 28, 28)
    tiles[:, 3] = 0
    ratio = torch.tensor([3, 3])  # (1, 3) in [(1,1), (1,2), (1,3), ...]
    used = torch.tensor([[True, True, True, False]] * 2)
    theirs = hf(tiles.unsqueeze(1), ratio.view(2, 1), used.long().view(2, 1, 4)).last_hidden_state[:, 0]
    torch.testing.assert_close(ours(tiles, ratio, used), theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("positions", [[[2, 5], [1, 2]], [[], []]], ids=["two-images", "no-image"])
def test_cached_generation_equals_full_recomputation(positions):
    model = ours_from(hf_tiny_model(seed=2))
    batch = tiny_batch(model, positions, text=8, pad=[1, 0]) if positions[0] else MultimodalBatch(
        torch.randint(0, 256, (2, 8)), torch.zeros(2, 0, 3, *model.canvas), torch.zeros(2, 0, dtype=torch.long),
        torch.tensor([[False] + [True] * 7, [True] * 8]))
    steps = 4
    generated = model.generate(batch, steps)
    ids, mask = batch.input_ids, batch.text_mask()
    logits, cache = model.prefill(batch)
    for step in range(steps):
        full = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask)).logits[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        assert torch.equal(full.argmax(-1), generated[:, step])
        ids = torch.cat([ids, generated[:, step:step + 1]], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        logits, cache = model.decode(generated[:, step], cache)
    if positions[0]:
        # one cross-attention layer: K and V, 2 samples x 2 images x 2 tiles x (16 patches + CLS), 2 KV heads x 16, fp32
        assert model.extra_cache_nbytes(cache) == {"media": 2 * 2 * (2 * 2 * 17) * (2 * 16) * 4}


@pytest.mark.parametrize(("stage", "train_llm"), [("pretrain", False), ("finetune", False), ("finetune", True)])
def test_gradients_reach_exactly_the_trainable_parameters(stage, train_llm):
    model = ours_from(hf_tiny_model(), train_llm_in_finetune=train_llm)
    trainable = model.set_stage(stage)
    adapter = ("vision_tower.", "multi_modal_projector.", "language_model.layers.1.")
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(adapter + (("language_model.", "lm_head.") if train_llm else ()))}
    assert set(trainable) == expected and "language_model.layers.1.cross_attn_attn_gate" in expected
    batch = tiny_batch(model, [[2, 6], [3, 4]])
    batch.labels = batch.input_ids.clone()
    model(batch).loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # rows of the embedding tables for aspect ratios the batch does not use get no gradient, but they get one
    assert reached == expected


# meta-llama/Llama-3.2-11B-Vision's config.json (the fields that shape the model)
REAL_CONFIG = {
    "model_type": "mllama", "image_token_index": 128256,
    "text_config": {
        "model_type": "mllama_text_model", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    },
    "vision_config": {
        "model_type": "mllama_vision_model", "hidden_size": 1280, "num_hidden_layers": 32, "num_global_layers": 8,
        "attention_heads": 16, "intermediate_size": 5120, "image_size": 560, "patch_size": 14, "max_num_tiles": 4,
        "norm_eps": 1e-5, "hidden_act": "gelu", "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "vision_output_dim": 7680,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    },
}


def test_real_preset_parameter_count_equals_transformers():
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    config = {k: v for k, v in REAL_CONFIG.items() if k != "model_type"}
    with torch.device("meta"):
        theirs = MllamaForConditionalGeneration(MllamaConfig(**config))
    ours = build_model("mllama", "llama3.2-11b-vision", "llama3.2-11b-vision")
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert ours.num_parameters() == n_theirs
    assert 10.6e9 < n_theirs < 10.7e9  # "11B": 10.67B published
    assert ours.cross_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert ours.tokens_per_image == 4 * (1600 + 1)
    assert ours.vision_tower.output_dim == 7680
    # by part, as transformers' modules hold them
    for prefix, theirs_prefix in (("vision_tower.", "model.vision_model."), ("lm_head.", "lm_head."),
                                  ("multi_modal_projector.", "model.multi_modal_projector.")):
        assert ours.num_parameters(prefix) == sum(p.numel() for n, p in theirs.named_parameters()
                                                  if n.startswith(theirs_prefix))


def test_config_json_gives_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIG))
    llm, vision, options = read_config(tmp_path, name="llama3.2-11b-vision")
    assert vision == LLAMA32_11B_VISION_TOWER and llm == LLAMA32_11B_VISION_TEXT
    assert options == {"cross_attention_layers": (3, 8, 13, 18, 23, 28, 33, 38), "num_global_layers": 8,
                       "intermediate_layers": (3, 7, 15, 23, 30), "max_num_tiles": 4}
    preset = build_model("mllama", "llama3.2-11b-vision", "llama3.2-11b-vision")
    assert build_model("mllama", llm, vision, options=options).num_parameters() == preset.num_parameters()
    bad = json.loads(json.dumps(REAL_CONFIG))
    bad["vision_config"]["vision_output_dim"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="vision_output_dim"):
        read_config(tmp_path)
    del bad["vision_config"]["num_global_layers"]
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="num_global_layers"):
        read_config(tmp_path)


@pytest.mark.parametrize(("options", "field"), [
    ({"tile_rows": 2, "tile_cols": 3}, "max_num_tiles"),
    ({"cross_attention_layers": [5]}, "cross_attention_layers"),
    ({"intermediate_layers": [7]}, "intermediate_layers"),
    ({"num_global_layers": 0}, "num_global_layers"),
])
def test_bad_options_are_refused(options, field):
    with pytest.raises(ConfigError, match=field):
        tiny_model("mllama", **options)


def test_images_must_be_canvases_of_the_tile_grid():
    model = tiny_model("mllama", tile_cols=2)
    batch = MultimodalBatch(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 1, 3, 32, 32),
                            torch.tensor([[1]]))
    with pytest.raises(ConfigError, match="tile_rows x tile_cols"):
        model(batch)


@pytest.mark.parametrize(("grid", "used"), [((1, 2), 34), ((1, 1), 17)])
def test_effective_attention_pairs_follow_the_masks(grid, used):
    """Text 5 + image + 3 + image + 9: rows 0-4 see no image (mask cleared: all 68 keys), rows 5-7 image 1's used
    tiles, rows 8-16 image 2's; the tower leaves out padding-to-padding pairs only."""
    from mllm_bench import Workload

    model = tiny_model("mllama", tile_rows=grid[0], tile_cols=grid[1])
    wl = Workload(batch_size=2, images_per_sample=2, text_before=5, text_between=3, text_after=9, dtype="float32")
    cost = model.analytic_cost(wl)
    width = 64  # 4 heads x 16
    scores = [t for t in cost.terms if t.phase == "prefill" and t.component == "cross_attn" and t.pass_ == "forward"
              and t.dense == 2 * 17 * 68 * 4 * width]
    assert len(scores) == 1 and scores[0].effective == 2 * (5 * 68 + 3 * used + 9 * used) * 4 * width
    # tower: 2 tiles x 24 tokens (17 padded to 24); padding = 48 - used tokens; 3 local + 1 global layers
    seq, pad = 48, 48 - used
    vision = [t for t in cost.terms if t.phase == "prefill" and t.component == "vision" and t.dense != t.effective]
    assert len(vision) == 1
    assert vision[0].dense == 4 * seq * seq * 4 * 32 * 4 and vision[0].effective == 4 * (seq**2 - pad**2) * 4 * 32 * 4


def test_counted_equals_analytic_at_the_real_size():
    """Llama-3.2-11B-Vision on meta tensors, two images of 2 x 2 tiles: prefill, decode and a pretraining step."""
    from mllm_bench import Workload
    from mllm_bench.flops import count_decode, count_prefill, count_train_step

    model = build_model("mllama", "llama3.2-11b-vision", "llama3.2-11b-vision")
    wl = Workload(images_per_sample=2, text_before=5, text_between=7, text_after=20)
    cost = model.analytic_cost(wl)
    assert count_prefill(model, wl).total == pytest.approx(cost.flops("prefill"), rel=1e-9)
    assert count_decode(model, wl)[0].total == pytest.approx(cost.flops("decode"), rel=1e-9)
    train = wl.replace(stage="pretrain")
    assert count_train_step(model, train).total == pytest.approx(model.analytic_cost(train).flops("train_step"),
                                                                 rel=1e-9)
    # the tower per image, by hand: 4 tiles x (1600 patches + CLS, padded to 1608) = 6432 tokens, 40 layers
    n, d, m = 6432, 1280, 5120
    tower = 2 * 4 * 1600 * 3 * 14 * 14 * d + 40 * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)
    assert cost.flops("prefill", component="vision") == pytest.approx(2 * tower, rel=1e-12)


# ----- one tile grid per image ---------------------------------------------------------------------------
def expected_grid(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The processor's rule, written out: of the grids (rows, cols) with rows x cols <= max_tiles, each scaled by
    min(rows x tile / height, cols x tile / width), the least upscaling (smallest scale >= 1) or else the least
    downscaling (largest scale); ties to the fewest tiles, then the first grid in (1, 1), (1, 2), ... order."""
    grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]
    scale = {g: min(g[0] * tile / height, g[1] * tile / width) for g in grids}
    ups = [g for g in grids if scale[g] >= 1]
    pick = min(scale[g] for g in ups) if ups else max(scale.values())
    tied = [g for g in grids if scale[g] == pick]
    return next(g for g in tied if g[0] * g[1] == min(r * c for r, c in tied))


def test_tile_grids_follow_the_processor_rule():
    from mllm_bench.architectures.mllama.config import tile_grid
    from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

    # 560 px tiles, up to 4 (the 11B), worked by hand: (300, 2000) needs 1 x 4 to reach scale 1.12; (560, 1680)
    # ties 1 x 3 with 1 x 4 at scale 1, the fewer tiles win; (2000, 2000) cannot upscale, 2 x 2 shrinks least (0.56)
    by_hand = {(560, 560): (1, 1), (560, 1120): (1, 2), (1120, 560): (2, 1), (1120, 1120): (2, 2), (100, 100): (1, 1),
               (300, 2000): (1, 4), (560, 1680): (1, 3), (800, 600): (2, 2), (2000, 2000): (2, 2)}
    for (h, w), grid in by_hand.items():
        assert expected_grid(h, w, 4, 560) == grid
        assert tile_grid(h, w, 4, 560) == grid, (h, w)
    # and transformers' own function over a spread of sizes and tile limits
    sizes = [(h, w) for h in (7, 31, 32, 33, 50, 64, 65, 96, 130, 200) for w in (5, 32, 40, 63, 64, 100, 128, 300)]
    for max_tiles in (1, 2, 3, 4, 6):
        for h, w in sizes:
            rows, cols = (int(v) // 32 for v in get_optimal_tiled_canvas(h, w, max_tiles, 32))
            assert tile_grid(h, w, max_tiles, 32) == (rows, cols) == expected_grid(h, w, max_tiles, 32), (h, w)


# (height, width) of each sample's images at 32 px tiles, up to 4: by the rule, 1 x 1, 1 x 3 (scale 0.8: no grid
# reaches 1) | 2 x 1 (scale 1: 2 x 1, 2 x 2, 3 x 1, 4 x 1 tie, the fewest tiles win), 2 x 2 (scale 0.91)
MIXED_SIZES = [[(32, 32), (40, 100)], [(64, 32), (70, 70)]]
MIXED_TILES = [[1, 3], [2, 4]]


def processor_batch(sizes: list[list[tuple[int, int]]], positions: list[list[int]], text: int = 10,
                    pad: list[int] | None = None, seed: int = 1) -> tuple[MultimodalBatch, dict]:
    """Random images of ``sizes`` through transformers' MllamaImageProcessor (32 px tiles, up to 4); our batch
    (its tiles with the original sizes) and transformers' inputs (its tiles, aspect ratios, cross mask)."""
    import numpy as np
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    rng = np.random.default_rng(seed)
    images = [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in row] for row in sizes]
    out = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4)(images, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed)
    b = len(positions)
    ids = torch.randint(0, 256, (b, text), generator=gen)
    for i, row in enumerate(positions):
        ids[i, row] = IMAGE_TOKEN
    mask = torch.ones(b, text, dtype=torch.bool)
    for i, n in enumerate(pad or []):
        mask[i, :n] = False
    batch = MultimodalBatch(ids, out["pixel_values"], torch.tensor(positions), mask, None,
                            torch.tensor(sizes, dtype=torch.long))
    token_masks = [get_cross_attention_token_mask(row.tolist(), IMAGE_TOKEN) for row in ids]
    dense = convert_sparse_cross_attention_mask_to_dense(token_masks, out["num_tiles"], 4, text)
    theirs = dict(input_ids=ids, pixel_values=out["pixel_values"], aspect_ratio_ids=out["aspect_ratio_ids"],
                  aspect_ratio_mask=out["aspect_ratio_mask"], cross_attention_mask=torch.from_numpy(dense),
                  attention_mask=mask.long(), position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))
    return batch, {**theirs, "num_tiles": out["num_tiles"]}


@torch.no_grad()
def test_mixed_tile_grids_equal_transformers():
    """Two samples of two images of different aspect ratios (1, 3 | 2, 4 tiles of 4), left padding, adjacent image
    tokens in sample 1: the processor's tiles and tile counts, and the logits of MllamaForConditionalGeneration."""
    from mllm_bench.architectures.mllama.config import supported_aspect_ratios

    hf = hf_tiny_model(max_num_tiles=4)
    model = ours_from(hf, max_num_tiles=4)
    batch, theirs = processor_batch(MIXED_SIZES, [[2, 6], [3, 4]], pad=[0, 2])
    grids = model.tile_grids(batch)
    assert [[r * c for r, c in row] for row in grids] == MIXED_TILES == theirs.pop("num_tiles")
    assert [[expected_grid(h, w, 4, 32) for h, w in row] for row in MIXED_SIZES] == grids
    ids = [[supported_aspect_ratios(4).index(g) + 1 for g in row] for row in grids]
    assert theirs["aspect_ratio_ids"].tolist() == ids
    ours = model(batch).logits
    valid = batch.text_mask()
    torch.testing.assert_close(ours[valid], hf(**theirs).logits[valid], atol=1e-5, rtol=1e-5)
    # the grids matter: the same tiles taken as other images' sizes change the logits after the images
    swapped = MultimodalBatch(batch.input_ids, batch.pixel_values, batch.image_positions, batch.attention_mask,
                              None, batch.image_sizes.flip(1))
    assert (model(swapped).logits[0, -1] - ours[0, -1]).abs().max() > 1e-3


@torch.no_grad()
def test_mixed_tile_grids_cached_generation_equals_recomputation():
    model = ours_from(hf_tiny_model(seed=2, max_num_tiles=4), max_num_tiles=4)
    batch, _ = processor_batch(MIXED_SIZES, [[2, 5], [1, 2]], text=8, pad=[1, 0])
    steps = 3
    generated = model.generate(batch, steps)
    ids, mask = batch.input_ids, batch.text_mask()
    logits, cache = model.prefill(batch)
    for step in range(steps):
        full = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask, None,
                                     batch.image_sizes)).logits[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        assert torch.equal(full.argmax(-1), generated[:, step])
        ids = torch.cat([ids, generated[:, step:step + 1]], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
        logits, cache = model.decode(generated[:, step], cache)


def test_workload_image_sizes_give_each_image_its_grid():
    """example_batch: tiles with the unused ones zero, the sizes on the CPU; visual tokens = tiles x (16 + CLS)."""
    from mllm_bench import Workload

    model = tiny_model("mllama", max_num_tiles=4)
    wl = Workload(batch_size=2, images_per_sample=2, image_sizes=((32, 32), (40, 100)), text_before=3,
                  text_between=2, text_after=4, dtype="float32", device="cpu")
    assert model.visual_tokens_per_image(wl) == [1 * 17, 3 * 17]
    assert model.visual_tokens_per_image(wl.replace(image_sizes=None)) == [17, 17]  # the options' 1 x 1
    batch = model.example_batch(wl)
    assert tuple(batch.pixel_values.shape) == (2, 2, 4, 3, 32, 32) and batch.image_sizes.tolist() == [
        [[32, 32], [40, 100]]] * 2
    nonzero = batch.pixel_values.flatten(3).abs().sum(-1) > 0
    assert nonzero.tolist() == [[[True, False, False, False], [True, True, True, False]]] * 2
    assert model(batch).logits.shape == (2, wl.num_text_tokens, 256)
    assert model.analytic_cost(wl).info["tile_grids"] == [(1, 1), (1, 3)]
    with pytest.raises(ConfigError, match="max_num_tiles=4"):
        model(MultimodalBatch(batch.input_ids, batch.pixel_values[:, :, :2], batch.image_positions, None, None,
                              batch.image_sizes))


def test_effective_attention_pairs_of_mixed_grids():
    """Images of 1 and 2 tiles (of 2): text 5 + image + 3 + image + 9; rows 0-4 see no image (all 68 keys), rows
    5-7 image 1's 17 used keys, rows 8-16 image 2's 34; the tower's padding is 48 - 17 and 48 - 34 tokens."""
    from mllm_bench import Workload

    model = tiny_model("mllama")
    wl = Workload(batch_size=2, images_per_sample=2, image_sizes=((32, 32), (32, 64)), text_before=5,
                  text_between=3, text_after=9, dtype="float32")
    cost = model.analytic_cost(wl)
    width = 64
    scores = [t for t in cost.terms if t.phase == "prefill" and t.component == "cross_attn" and t.pass_ == "forward"
              and t.dense == 2 * 17 * 68 * 4 * width]
    assert len(scores) == 1 and scores[0].effective == 2 * (5 * 68 + 3 * 17 + 9 * 34) * 4 * width
    vision = [t for t in cost.terms if t.phase == "prefill" and t.component == "vision" and t.dense != t.effective]
    assert len(vision) == 1 and vision[0].dense == 2 * 2 * 48 * 48 * 4 * 32 * 4
    assert vision[0].effective == 2 * ((48**2 - 31**2) + (48**2 - 14**2)) * 4 * 32 * 4
    # decode inherits the last row's mask: image 2's 34 keys
    decode = [t for t in cost.terms if t.phase == "decode" and t.component == "cross_attn" and t.dense != t.effective]
    assert len(decode) == 1 and decode[0].effective == 2 * 34 * 4 * width
    assert "padding tiles" in cost.info["cost_note"] and cost.info["visual_tokens_per_image"] == [17, 34]


def test_counted_equals_analytic_for_mixed_grids_at_the_real_size():
    """Llama-3.2-11B-Vision, images of 560 x 560 (1 tile) and 560 x 1120 (1 x 2): prefill, decode, pretraining."""
    from mllm_bench import Workload
    from mllm_bench.flops import count_decode, count_prefill, count_train_step

    model = build_model("mllama", "llama3.2-11b-vision", "llama3.2-11b-vision")
    wl = Workload(images_per_sample=2, image_sizes=((560, 560), (560, 1120)), text_before=5, text_between=7,
                  text_after=20)
    assert model.visual_tokens_per_image(wl) == [1601, 2 * 1601]
    cost = model.analytic_cost(wl)
    assert count_prefill(model, wl).total == pytest.approx(cost.flops("prefill"), rel=1e-9)
    assert count_decode(model, wl)[0].total == pytest.approx(cost.flops("decode"), rel=1e-9)
    train = wl.replace(stage="pretrain")
    assert count_train_step(model, train).total == pytest.approx(model.analytic_cost(train).flops("train_step"),
                                                                 rel=1e-9)
    # transformers runs 4 tiles per image whatever the grid: the dense cost is the 2 x 2 grid's
    assert cost.flops("prefill") == pytest.approx(model.analytic_cost(wl.replace(image_sizes=None)).flops("prefill"),
                                                  rel=1e-12)


def test_cli_options_take_layer_lists_as_text(tmp_path):
    from mllm_bench.cli.app import app
    from typer.testing import CliRunner

    assert Mllama.Options(cross_attention_layers="[3, 8]", intermediate_layers="0,1").cross_attention_layers == (3, 8)
    result = CliRunner().invoke(app, ["compare", "-a", "llava,mllama", "--llm", "tiny-llm", "--vision", "tiny-clip",
                                      "-o", "mllama.cross_attention_layers=1", "-o", "mllama.intermediate_layers=0,1",
                                      "--measure", "never", "--count", "none", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, ["compare", "-a", "mllama", "--llm", "tiny-llm", "--vision", "tiny-clip",
                                   "-o", "mllama.cross_attention_layers=x", "--baseline", "mllama",
                                   "--measure", "never"])
    assert bad.exit_code == 2 and "cross_attention_layers" in bad.output
