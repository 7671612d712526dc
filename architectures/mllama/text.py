"""Llama-3.2-Vision's text side: the gated cross-attention decoder layer and its cross-attention mask.

The layer is transformers' ``MllamaCrossAttentionDecoderLayer``: RMSNorm -> cross-attention (queries from
the text, keys/values from the projected vision tokens, grouped-query heads, RMSNorm on every query and
key head, no RoPE) -> x + tanh(attn gate) * out; RMSNorm -> SwiGLU MLP -> zeroed on rows that see no
image -> x + tanh(mlp gate) * out. Gates start at 0.

The mask is the processor's (``get_cross_attention_token_mask``): image k is seen from its
``<|image|>`` token (text index ``image_positions[k]``) up to the next image's token; images whose tokens
are adjacent (or at the same index) form a group seen together up to the next image after the group;
the last image or group up to the end. Only the tiles an image uses (those of its own grid) are seen.
A text row that sees no image (text before the first image, padding) has its mask cleared, as
``_prepare_cross_attention_mask`` does, so it attends to every vision token (the unused tiles' too); its
MLP output is zeroed, its attention output is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mllm_bench.config import LLMConfig
from mllm_bench.decoder import RMSNorm, SwiGLU

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CrossMask:
    """``allowed`` (B, 1, T, M) over the M vision tokens (cleared rows all True); ``has_image`` (B, T)."""

    allowed: torch.Tensor
    has_image: torch.Tensor


def image_spans(image_positions: torch.Tensor, num_text: int) -> torch.Tensor:
    """End (exclusive) text index (B, K) to which each image is seen (processor's grouping rule)."""
    b, k = image_positions.shape
    ends = torch.full_like(image_positions, num_text)
    for j in range(k - 2, -1, -1):
        nxt = image_positions[:, j + 1]
        grouped = nxt - image_positions[:, j] <= 1
        ends[:, j] = torch.where(grouped, ends[:, j + 1], nxt)
    return ends


def cross_mask(image_positions: torch.Tensor, num_text: int, num_tiles: torch.Tensor, max_num_tiles: int,
               tokens_per_tile: int) -> CrossMask:
    """Which vision tokens (image, tile, token; images in order) each text index sees; ``num_tiles`` (B, K)
    gives the tiles each image uses (the first ones of its ``max_num_tiles``)."""
    device = image_positions.device
    text = torch.arange(num_text, device=device).view(1, num_text, 1)
    ends = image_spans(image_positions, num_text)
    sees = (image_positions.unsqueeze(1) <= text) & (text < ends.unsqueeze(1))  # (B, T, K)
    tile_used = torch.arange(max_num_tiles, device=device) < num_tiles.unsqueeze(-1)  # (B, K, tiles)
    allowed = (sees.unsqueeze(-1) & tile_used.unsqueeze(1)).repeat_interleave(tokens_per_tile, dim=-1)
    allowed = allowed.flatten(2)
    has_image = allowed.any(-1)
    allowed = allowed | ~has_image.unsqueeze(-1)
    return CrossMask(allowed.unsqueeze(1), has_image)


class CrossAttention(nn.Module):
    """``MllamaTextCrossAttention``: text queries over vision keys/values, q/k RMSNorm per head, GQA."""

    cost_component = "cross_attn"

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def vision_kv(self, states: torch.Tensor) -> KV:
        """Keys (normed) and values (B, Hkv, M, D) of the projected vision tokens (B, M, h)."""
        b, m, _ = states.shape
        k = self.k_proj(states).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, x: torch.Tensor, kv: KV, allowed: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2))
        groups = self.num_heads // self.num_kv_heads
        k, v = (y.repeat_interleave(groups, dim=1) for y in kv)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class CrossAttentionMLP(SwiGLU):
    """The cross-attention layer's SwiGLU MLP (counted with the cross-attention layer)."""

    cost_component = "cross_attn"


class CrossAttentionDecoderLayer(nn.Module):
    """``MllamaCrossAttentionDecoderLayer``: tanh-gated cross-attention and MLP, both residual."""

    cost_component = "cross_attn"

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = CrossAttentionMLP(cfg.hidden_size, cfg.intermediate_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: KV, mask: CrossMask) -> torch.Tensor:
        x = x + self.cross_attn_attn_gate.tanh().to(x.dtype) * self.cross_attn(self.input_layernorm(x), kv,
                                                                               mask.allowed)
        mlp = self.mlp(self.post_attention_layernorm(x)) * mask.has_image.unsqueeze(-1).to(x.dtype)
        return x + self.cross_attn_mlp_gate.tanh().to(x.dtype) * mlp
