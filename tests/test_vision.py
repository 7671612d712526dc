"""Our ViT equals transformers' CLIP and SigLIP vision models at the feature layer, given the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from mllm_bench.checkpoint import to_mllm_bench_names
from mllm_bench.config import replace
from mllm_bench.presets import vision_preset
from mllm_bench.vision import build_vision_tower, encode_images, unused_vision_keys


def hf_tower(cfg):
    common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act)
    if cfg.kind == "clip":
        hf_cfg, cls = CLIPVisionConfig(**common), CLIPVisionModel
    else:
        hf_cfg, cls = SiglipVisionConfig(**common, vision_use_head=False), SiglipVisionModel
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-siglip"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_tower_equals_transformers(preset, feature_layer):
    cfg = replace(vision_preset(preset), feature_layer=feature_layer)
    hf = hf_tower(cfg)
    ours = build_vision_tower(cfg).eval()
    state = {f"vision_tower.vision_model.{k}": v for k, v in hf.state_dict().items()}  # transformers-4 names too
    state = to_mllm_bench_names(state)
    for key in unused_vision_keys(cfg, list(state)):
        del state[key]
    ours.load_state_dict({k.removeprefix("vision_tower."): v for k, v in state.items()}, strict=True)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
        got = encode_images(ours, cfg, pixels)
    expected = expected[:, 1:] if cfg.has_cls_token else expected
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(ours.encoder.layers) == cfg.layers_run < cfg.num_layers + (feature_layer == -1)
