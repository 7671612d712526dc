"""The vision tower: transformers' CLIP or SigLIP vision model, built only up to the feature layer.

LLaVA-1.5 reads the second-to-last layer, so the last encoder layer (and the post-layernorm and
pooling head, which only the last layer feeds) are never built: they cost no parameters, no
FLOPs and no time. Parameter names are transformers' (``embeddings``, ``pre_layrnorm``,
``encoder.layers.N``), so its checkpoints load with the unused tail ignored.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from .config import VisionConfig


def hf_vision_config(cfg: VisionConfig, attn_implementation: str = "sdpa") -> CLIPVisionConfig | SiglipVisionConfig:
    """The transformers config of the truncated tower (``layers_run`` layers)."""
    common = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers_run,
        num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
    )
    if cfg.kind == "clip":
        hf = CLIPVisionConfig(**common)
    else:
        hf = SiglipVisionConfig(**common, vision_use_head=False)
    hf._attn_implementation = attn_implementation
    return hf


def build_vision_tower(cfg: VisionConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """A transformers vision model with ``cfg.layers_run`` layers and no unused final norm."""
    hf = hf_vision_config(cfg, attn_implementation)
    model = CLIPVisionModel(hf) if cfg.kind == "clip" else SiglipVisionModel(hf)
    model.post_layernorm = nn.Identity()  # feeds only the pooled output, never the selected layer
    return model


def encode_images(tower: nn.Module, cfg: VisionConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch features (N, num_patches, vision_width) of images (N, C, H, W) at ``cfg.feature_layer``."""
    dtype = next(tower.parameters()).dtype
    hidden = tower.embeddings(pixel_values.to(dtype))
    if cfg.kind == "clip":
        hidden = tower.pre_layrnorm(hidden)
    hidden = tower.encoder(inputs_embeds=hidden).last_hidden_state
    return hidden[:, 1:] if cfg.has_cls_token else hidden


def unused_vision_keys(cfg: VisionConfig, keys: list[str], prefix: str = "vision_tower.") -> list[str]:
    """Checkpoint keys of the vision tower that the truncated tower does not have."""
    unused = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith(("post_layernorm.", "head.")):
            unused.append(key)
        elif rest.startswith("encoder.layers."):
            if int(rest.split(".")[2]) >= cfg.layers_run:
                unused.append(key)
    return unused
