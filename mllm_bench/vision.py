"""The vision tower: a CLIP or SigLIP ViT, built only up to the feature layer.

The modules mirror transformers' ``CLIPVisionModel`` / ``SiglipVisionModel`` exactly (same parameter
names: ``embeddings.patch_embedding``, ``embeddings.class_embedding``, ``embeddings.position_embedding``,
``pre_layrnorm``, ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
layer_norm2}``), so their checkpoints load as they are and tests compare the two tower by tower. We
build it ourselves rather than import transformers' modelling code because that import alone costs
~4 s, which dominated counting a 7B model on meta tensors.

LLaVA-1.5 reads the second-to-last layer, so the last encoder layer (and the post-layernorm and pooling
head, which only the last layer feeds) are never built: they cost no parameters, FLOPs or time.

A connector that ranks tokens by the tower's own attention calls :meth:`VisionTower.forward_probed`: the same
hidden states, plus one layer's keys and the softmax attention of its first few query rows
(:class:`AttentionProbe`). The layer itself still runs fused attention; the probed rows cost one extra
QK^T on those rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VISION_ACTIVATIONS, VisionConfig, require


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x·sigmoid(1.702x)."""
    return x * torch.sigmoid(1.702 * x)


# transformers' names for the activations ViT towers use
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
assert set(ACTIVATIONS) == set(VISION_ACTIVATIONS)


class VisionEmbeddings(nn.Module):
    """Patch convolution, CLS token (CLIP only) and learned position embeddings."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         bias=cfg.kind == "siglip")
        self.has_cls = cfg.has_cls_token
        if self.has_cls:
            self.class_embedding = nn.Parameter(nn.init.normal_(torch.empty(d)))  # = torch.randn(d)
        # one learned vector per position; used whole (transformers gathers it with an arange buffer)
        self.position_embedding = nn.Embedding(cfg.num_patches + int(self.has_cls), d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.has_cls:
            patches = torch.cat([self.class_embedding.expand(patches.shape[0], 1, -1), patches], dim=1)
        return patches + self.position_embedding.weight


@dataclass
class AttentionProbe:
    """What one encoder layer's attention exposes: ``weights`` (N, heads, rows, T), the softmax attention of its
    first ``rows`` queries over every token, and ``keys`` (N, heads, T, head_dim), the key projection (with bias,
    before any scaling)."""

    weights: torch.Tensor
    keys: torch.Tensor


Probed = tuple[torch.Tensor, AttentionProbe]  # hidden states and the probe of the layer that gave them


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased projections."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, probe_rows: int = 0) -> torch.Tensor | Probed:
        """The attention output; with ``probe_rows`` > 0, also the probe of the first ``probe_rows`` queries."""
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k = heads(self.q_proj(x)), heads(self.k_proj(x))
        out = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)))
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, d))
        if not probe_rows:
            return out
        scores = q[:, :, :probe_rows] @ k.transpose(-1, -2) * self.head_dim ** -0.5
        return out, AttentionProbe(scores.softmax(-1), k)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-norm transformer block (LayerNorm → attention → residual; LayerNorm → MLP → residual)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, probe_rows: int = 0) -> torch.Tensor | Probed:
        """The layer's output; with ``probe_rows`` > 0, also its attention probe (see :class:`VisionAttention`)."""
        if not probe_rows:
            x = x + self.self_attn(self.layer_norm1(x))
            return x + self.mlp(self.layer_norm2(x))
        attn, probe = self.self_attn(self.layer_norm1(x), probe_rows)
        x = x + attn
        return x + self.mlp(self.layer_norm2(x)), probe


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.layers_run))

    def forward(self, x: torch.Tensor, probe_rows: int = 0) -> torch.Tensor | Probed:
        """The last layer's output; with ``probe_rows`` > 0, also that layer's attention probe."""
        *before, last = self.layers
        for layer in before:
            x = layer(x)
        return last(x, probe_rows) if probe_rows else last(x)


class VisionTower(nn.Module):
    """A CLIP/SigLIP vision transformer with ``cfg.layers_run`` layers (up to the feature layer)."""

    cost_component = "vision"

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.kind == "clip":  # CLIP normalises the embeddings before the first layer; SigLIP does not
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, probe_rows: int = 0) -> torch.Tensor | Probed:
        """Hidden states (N, tokens, width) at the feature layer, CLS included for CLIP; with ``probe_rows`` > 0,
        also the feature layer's attention probe (see :meth:`forward_probed`)."""
        hidden = self.embeddings(pixel_values)
        if self.config.kind == "clip":
            hidden = self.pre_layrnorm(hidden)
        return self.encoder(hidden, probe_rows)

    def forward_probed(self, pixel_values: torch.Tensor, probe_rows: int = 1) -> Probed:
        """:meth:`forward`'s hidden states and the feature layer's (the last layer run) attention probe of its
        first ``probe_rows`` queries (CLIP's CLS token is query 0)."""
        require(probe_rows >= 1, f"probe_rows must be >= 1, got {probe_rows}")
        return self(pixel_values, probe_rows)


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    """The vision tower of ``cfg`` (built on the current default device and dtype)."""
    return VisionTower(cfg)


def encode_images(tower: nn.Module, cfg: VisionConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch features (N, num_patches, vision_width) of images (N, C, H, W) at ``cfg.feature_layer``."""
    hidden = tower(pixel_values)
    return hidden[:, 1:] if cfg.has_cls_token else hidden


def unused_vision_keys(cfg: VisionConfig, keys: list[str], prefix: str = "vision_tower.") -> list[str]:
    """Checkpoint keys of the vision tower that the truncated tower does not have."""
    unused = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith(("post_layernorm.", "head.")) or rest.endswith("position_ids"):
            unused.append(key)
        elif rest.startswith("encoder.layers."):
            if int(rest.split(".")[2]) >= cfg.layers_run:
                unused.append(key)
    return unused
