"""The Llama-style decoder every architecture shares: RMSNorm, RoPE, GQA attention, SwiGLU, KV cache.

Parameter names follow transformers' ``LlamaModel`` (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``layers.N.mlp.gate_proj``, ``norm``) so its state dicts load as they are. Attention takes an
:class:`~mllm_bench.masks.AttentionMask` and, optionally, extra rows that give keys and values only
(how SAISA feeds visual tokens without computing their queries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attend, prepare_mask
from .config import LLMConfig
from .masks import AttentionMask

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """cos and sin tables (B, T, head_dim) for integer ``positions`` (B, T), as Llama computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the tables (B, T, D)."""
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


@dataclass
class LayerKV:
    """One layer's cached keys and values, (B, Hkv, T, D) each, grown by concatenation."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@dataclass
class KVCache:
    """Per-layer keys/values plus what masks need about each cached key (position, padding, modality).

    ``extra`` holds an architecture's own cached state (e.g. Flamingo's media keys and values).
    """

    layers: list[LayerKV]
    k_pos: torch.Tensor
    k_valid: torch.Tensor
    k_visual: torch.Tensor
    next_pos: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, num_layers: int, batch: int, device: torch.device) -> KVCache:
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        return cls([LayerKV() for _ in range(num_layers)], z, z.bool(), z.bool(), next_pos)

    def add_keys(self, pos: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> None:
        """Record metadata of keys appended (in the same order as the layers append them)."""
        self.k_pos = torch.cat([self.k_pos, pos], 1)
        self.k_valid = torch.cat([self.k_valid, valid], 1)
        self.k_visual = torch.cat([self.k_visual, visual], 1)

    @property
    def length(self) -> int:
        return self.k_pos.shape[1]

    def step(self) -> tuple[torch.Tensor, AttentionMask]:
        """Register one new text token per sample: its positions (B, 1) and its mask over the cache."""
        pos = self.next_pos.view(-1, 1)
        ones = torch.ones_like(pos, dtype=torch.bool)
        self.add_keys(pos, ones, ~ones)
        self.next_pos = self.next_pos + 1
        return pos, AttentionMask(pos, self.k_pos, ones, self.k_valid, ~ones, self.k_visual, True)

    def nbytes(self) -> dict[str, int]:
        """Bytes of self-attention keys+values held, split into visual and text keys."""
        per_token = sum(kv.k.element_size() * kv.k[0, :, 0].numel() * 2 for kv in self.layers if kv.k is not None)
        visual = int(self.k_visual.sum()) if self.k_visual.device.type != "meta" else 0
        total = self.k_pos.numel()
        return {"visual": visual * per_token, "text": (total - visual) * per_token}


class SelfAttention(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def _kv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, rope), v

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: AttentionMask,
        cache: LayerKV | None = None,
        kv_only: tuple[torch.Tensor, Rope] | None = None,
        backend: str = "sdpa",
    ) -> torch.Tensor:
        """Queries from ``x``; keys/values from [cache, kv_only rows, x] in that order (``mask``'s key order)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, rope)
        k, v = self._kv(x, rope)
        if kv_only is not None:
            k_extra, v_extra = self._kv(*kv_only)
            k, v = torch.cat([k_extra, k], 2), torch.cat([v_extra, v], 2)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attend(q, k, v, mask, backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: AttentionMask,
        cache: LayerKV | None = None,
        kv_only: tuple[torch.Tensor, Rope] | None = None,
        backend: str = "sdpa",
    ) -> torch.Tensor:
        """Pre-norm block. ``kv_only`` rows (un-normed hidden states) give keys and values only."""
        normed_extra = None if kv_only is None else (self.input_layernorm(kv_only[0]), kv_only[1])
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, normed_extra, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token embeddings, decoder layers and the final norm (transformers' ``LlamaModel``)."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self.attention_backend = "sdpa"

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def run_layer(self, index: int, x: torch.Tensor, rope: Rope, mask: AttentionMask,
                  cache: KVCache | None = None, kv_only: tuple[torch.Tensor, Rope] | None = None) -> torch.Tensor:
        """Run layer ``index`` (with activation checkpointing when enabled and training)."""
        layer = self.layers[index]
        layer_cache = None if cache is None else cache.layers[index]
        prepare_mask(mask, self.attention_backend)  # host-side work here, not inside a compiled layer
        # recomputation would append to the cache a second time, so cached calls are never checkpointed
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(layer, x, rope, mask, layer_cache, kv_only, self.attention_backend, use_reentrant=False)
        return layer(x, rope, mask, layer_cache, kv_only, self.attention_backend)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: AttentionMask,
                cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states (B, T, h) -> final-normed hidden states, through every layer."""
        rope = self.rope(positions, x.dtype)
        for i in range(len(self.layers)):
            x = self.run_layer(i, x, rope, mask, cache)
        return self.norm(x)
