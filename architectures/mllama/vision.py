"""Llama-3.2-Vision's tiled vision encoder, as transformers' ``MllamaVisionModel`` computes it.

Per image: ``max_num_tiles`` tiles (the unused ones zero) -> patch convolution (no bias) -> gated
aspect-ratio embedding before the CLS token -> CLS -> gated position + tile-position embedding ->
LayerNorm -> each tile padded to a multiple of 8 tokens -> the local encoder (32 layers) over all tiles
together -> LayerNorm -> gated aspect-ratio embedding -> the global encoder (8 layers with tanh-gated
attention and MLP) -> padding removed -> the global output concatenated with the local encoder's
intermediate layer outputs (interleaved per channel, as ``torch.stack(..., -1)`` leaves them).

The attention mask only separates padding from padding: a padding query (padded patch or unused tile)
does not see a padding key, while every real token sees every key, padding included (transformers'
``_prepare_aspect_ratio_attention_mask``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllm_bench.config import VisionConfig
from mllm_bench.vision import VisionMLP

from .config import MllamaOptions, supported_aspect_ratios


def padded_tile_length(patches_per_tile: int) -> int:
    """Tokens of one tile in the encoders: its patches, CLS, and zero padding to a multiple of 8."""
    n = patches_per_tile + 1
    return n + (8 - n % 8) % 8


class AspectRatioEmbedding(nn.Module):
    """One learned vector per tile for each aspect-ratio id, scaled by tanh(gate) (``gate`` starts at 0)."""

    def __init__(self, max_ratio_id: int, max_num_tiles: int, dim: int) -> None:
        super().__init__()
        self.max_num_tiles, self.dim = max_num_tiles, dim
        self.embedding = nn.Embedding(max_ratio_id + 1, max_num_tiles * dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, tiles, tokens, dim), ratio_ids (N,)."""
        emb = self.embedding(ratio_ids).reshape(-1, self.max_num_tiles, 1, self.dim)
        return x + emb * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """(1 - tanh g) x one position embedding per token + tanh g x a per-aspect-ratio tile-position embedding."""

    def __init__(self, max_ratio_id: int, max_num_tiles: int, tokens: int, dim: int) -> None:
        super().__init__()
        self.max_num_tiles, self.tokens, self.dim = max_num_tiles, tokens, dim
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(dim ** -0.5 * torch.randn(tokens, dim))
        self.tile_embedding = nn.Embedding(max_ratio_id + 1, max_num_tiles * tokens * dim)

    def forward(self, x: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.tokens, self.dim)
        tile = self.tile_embedding(ratio_ids).reshape(-1, self.max_num_tiles, self.tokens, self.dim)
        return x + gate * tile


class TileAttention(nn.Module):
    """Bidirectional multi-head attention without biases, under a boolean mask (True = allowed)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class TileEncoderLayer(nn.Module):
    """Pre-norm block; in the global encoder attention and MLP outputs are scaled by tanh of a gate (init pi/4)."""

    def __init__(self, cfg: VisionConfig, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.self_attn = TileAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg)  # fc1 -> activation -> fc2, as transformers names it
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), allowed)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * mlp if self.gated else mlp)


class TileEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TileEncoderLayer(cfg, gated) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, keep: tuple[int, ...] = ()) -> tuple[torch.Tensor,
                                                                                                 list[torch.Tensor]]:
        """Output and the outputs of layers ``keep`` (0-based)."""
        kept = []
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed)
            if i in keep:
                kept.append(x)
        return x, kept


class TiledVisionModel(nn.Module):
    """``MllamaVisionModel``: (N, tiles, 3, S, S) tiles + aspect-ratio ids -> (N, tiles, S²/p² + 1, out_dim)."""

    cost_component = "vision"

    def __init__(self, cfg: VisionConfig, opts: MllamaOptions) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.config, self.max_num_tiles = cfg, opts.max_num_tiles
        self.intermediate = opts.intermediate(cfg.num_layers)
        self.tokens = cfg.num_patches + 1
        max_ratio_id = len(supported_aspect_ratios(opts.max_num_tiles))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(d ** -0.5 * torch.randn(d))
        self.gated_positional_embedding = GatedPositionEmbedding(max_ratio_id, opts.max_num_tiles, self.tokens, d)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(max_ratio_id, opts.max_num_tiles, d)
        self.post_tile_positional_embedding = AspectRatioEmbedding(max_ratio_id, opts.max_num_tiles, d)
        self.layernorm_pre = nn.LayerNorm(d)
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = TileEncoder(cfg, cfg.num_layers, gated=False)
        self.global_transformer = TileEncoder(cfg, opts.num_global_layers, gated=True)

    @property
    def output_dim(self) -> int:
        return self.config.hidden_size * (1 + len(self.intermediate))

    def attention_allowed(self, tiles_used: torch.Tensor, length: int) -> torch.Tensor:
        """(N, 1, T*L, T*L): False only where query and key are both padding. ``tiles_used`` (N, T) bool."""
        n = tiles_used.shape[0]
        real = tiles_used.view(n, -1, 1).expand(-1, -1, length).clone()
        real[:, :, self.tokens:] = False
        pad = ~real.reshape(n, -1)
        return ~(pad.unsqueeze(-1) & pad.unsqueeze(-2)).unsqueeze(1)

    def forward(self, tiles: torch.Tensor, ratio_ids: torch.Tensor, tiles_used: torch.Tensor) -> torch.Tensor:
        """tiles (N, T, 3, S, S), ratio_ids (N,), tiles_used (N, T) bool."""
        n, t = tiles.shape[:2]
        d = self.config.hidden_size
        x = self.patch_embedding(tiles.flatten(0, 1).to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.pre_tile_positional_embedding(x.reshape(n, t, -1, d), ratio_ids)
        x = torch.cat([self.class_embedding.expand(n * t, 1, d), x.reshape(n * t, -1, d)], dim=1)
        x = self.gated_positional_embedding(x.reshape(n, t, self.tokens, d), ratio_ids)
        x = self.layernorm_pre(x)
        length = padded_tile_length(self.tokens - 1)
        x = F.pad(x, (0, 0, 0, length - self.tokens))
        allowed = self.attention_allowed(tiles_used, length)
        x, kept = self.transformer(x.reshape(n, t * length, d), allowed, self.intermediate)
        x = self.post_tile_positional_embedding(self.layernorm_post(x).reshape(n, t, length, d), ratio_ids)
        x, _ = self.global_transformer(x.reshape(n, t * length, d), allowed)
        out = [x.reshape(n, t, length, d)[:, :, :self.tokens]]
        if kept:
            stacked = torch.stack(kept, dim=-1).reshape(n, t, length, -1)
            out.append(stacked[:, :, :self.tokens])
        return torch.cat(out, dim=-1)
