"""The Llama-style decoder every architecture shares: RMSNorm, RoPE, GQA attention, SwiGLU, KV cache.

Parameter names follow transformers' ``LlamaModel`` (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``layers.N.mlp.gate_proj``, ``norm``) so its state dicts load as they are. Attention takes an
:class:`~mllm_bench.masks.AttentionMask` and, optionally, extra rows that give keys and values only
(how SAISA feeds visual tokens without computing their queries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attend, attention_path, attention_weights, note_path, prepare_mask
from .config import LLMConfig, RopeScaling
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


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim / 2,), fp32, with ``scaling`` applied (see :class:`RopeScaling`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep short wavelengths, divide long ones by factor, blend those between
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    out = torch.where(wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    between = (wavelength >= context / scaling.high_freq_factor) & (wavelength <= context / scaling.low_freq_factor)
    return torch.where(between, blended, out)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                scaling: RopeScaling | None = None) -> Rope:
    """cos and sin tables (B, T, head_dim) for integer ``positions`` (B, T), as Llama computes them."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
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

    def add_prompt(self, mask: AttentionMask) -> None:
        """Record the prompt's keys (``mask``'s, in the order the layers appended them); decoding continues
        after the last one (a prompt ends with text)."""
        self.add_keys(mask.k_pos, mask.k_valid, mask.k_visual)
        self.next_pos = mask.k_pos[:, -1] + 1

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
        return pos, self.step_mask(pos)

    def step_mask(self, pos: torch.Tensor) -> AttentionMask:
        """The mask of one new text token per sample at ``pos`` (B, 1) over every cached key."""
        ones = torch.ones_like(pos, dtype=torch.bool)
        return AttentionMask(pos, self.k_pos, ones, self.k_valid, ~ones, self.k_visual)

    def nbytes(self) -> dict[str, int]:
        """Bytes of self-attention keys+values held, split into visual and text keys."""
        per_token = sum(kv.k.element_size() * kv.k[0, :, 0].numel() * 2 for kv in self.layers if kv.k is not None)
        visual = int(self.k_visual.sum()) if self.k_visual.device.type != "meta" else 0
        total = self.k_pos.shape[0] * self.length
        return {"visual": visual * per_token, "text": (total - visual) * per_token}


class SelfAttention(nn.Module):
    # its own ops are the attention scores; its projections (children) are attn_proj
    cost_component = "attn_scores"
    cost_component_children = "attn_proj"

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, T, heads*D) -> (B, heads, T, D)."""
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: AttentionMask,
        cache: LayerKV | None = None,
        backend: str = "sdpa",
        num_key_rows: int = 0,
        key_rows: torch.Tensor | None = None,
        key_rope: Rope | None = None,
        weight_rows: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention output (B, T, h) of the query rows of ``x`` (normed hidden states).

        Rows that give keys and values only (SAISA's visual tokens) come before the query rows' own keys,
        either inside ``x`` (its first ``num_key_rows`` rows: one K and one V projection for all rows) or
        apart (``key_rows``: projected on their own, so no gradient is computed for rows that need none).
        ``rope`` rotates the queries, ``key_rope`` (default ``rope``) all keys. Keys follow the cache:
        [cache, key-only rows, query rows], ``mask``'s key order. ``weight_rows`` (B, r): also return the
        attention probabilities (B, H, r, Tk) of those query rows (:func:`~mllm_bench.attention.attention_weights`,
        computed without gradient).
        """
        queries = x[:, num_key_rows:] if num_key_rows else x
        q = apply_rope(self._heads(self.q_proj(queries), self.num_heads), rope)
        if key_rows is None:
            k, v = self.k_proj(x), self.v_proj(x)
        else:
            k = torch.cat([self.k_proj(key_rows), self.k_proj(x)], 1)
            v = torch.cat([self.v_proj(key_rows), self.v_proj(x)], 1)
        k = apply_rope(self._heads(k, self.num_kv_heads), rope if key_rope is None else key_rope)
        v = self._heads(v, self.num_kv_heads)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attend(q, k, v, mask, backend)
        out = self.o_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.num_heads * self.head_dim))
        if weight_rows is None:
            return out
        with torch.no_grad():
            return out, attention_weights(q, k, mask, weight_rows)


class SwiGLU(nn.Module):
    cost_component = "ffn"

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
        weight_rows: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block over the rows of ``x``; with ``weight_rows``, also those query rows' attention
        probabilities (see :meth:`SelfAttention.forward`).

        ``kv_only`` = (rows, key rope): hidden states (B, n, h), un-normed, that give keys and values only,
        and the RoPE tables of all keys, [those rows, x]. They share x's input RMSNorm and K/V projections
        and have no query, attention output, residual or FFN. Normally they are normed and projected with
        x's rows in one pass; when a gradient reaches only one of the two (SAISA's first layer in
        pretraining, where only the visual rows lead to trained weights) they run apart, so no gradient
        is computed that nothing needs.
        """
        if kv_only is None:
            attn = self.self_attn(self.input_layernorm(x), rope, mask, cache, backend, weight_rows=weight_rows)
        else:
            rows, key_rope = kv_only
            if torch.is_grad_enabled() and rows.requires_grad != x.requires_grad:
                attn = self.self_attn(self.input_layernorm(x), rope, mask, cache, backend,
                                      key_rows=self.input_layernorm(rows), key_rope=key_rope, weight_rows=weight_rows)
            else:
                attn = self.self_attn(self.input_layernorm(torch.cat([rows, x], 1)), rope, mask, cache, backend,
                                      num_key_rows=rows.shape[1], key_rope=key_rope, weight_rows=weight_rows)
        if weight_rows is None:
            return self._residual(x, attn)
        return self._residual(x, attn[0]), attn[1]

    def _residual(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + attn
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
        self.compiled_layers = False  # set by MLLM.compile_layers: paths are then noted here, not in the layers

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta, dtype, self.config.rope_scaling)

    def run_layer(self, index: int, x: torch.Tensor, rope: Rope, mask: AttentionMask,
                  cache: KVCache | None = None, kv_only: tuple[torch.Tensor, Rope] | None = None,
                  weight_rows: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run layer ``index`` (with activation checkpointing when enabled and training); with ``weight_rows``
        (B, r) it also returns those query rows' attention probabilities (B, H, r, Tk)."""
        layer = self.layers[index]
        layer_cache = None if cache is None else cache.layers[index]
        prepare_mask(mask, self.attention_backend)  # host-side work here, not inside a compiled layer
        if self.compiled_layers:
            inputs_grad = x.requires_grad or (kv_only is not None and kv_only[0].requires_grad)
            needs_grad = torch.is_grad_enabled() and (inputs_grad or any(p.requires_grad for p in layer.parameters()))
            note_path(attention_path(mask, self.attention_backend, needs_grad))
            if weight_rows is not None:
                note_path("math:weights")
        # recomputation would append to the cache a second time, so cached calls are never checkpointed
        extra = () if weight_rows is None else (weight_rows,)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(layer, x, rope, mask, layer_cache, kv_only, self.attention_backend, *extra,
                              use_reentrant=False)
        return layer(x, rope, mask, layer_cache, kv_only, self.attention_backend, *extra)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: AttentionMask,
                cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states (B, T, h) -> final-normed hidden states, through every layer."""
        rope = self.rope(positions, x.dtype)
        for i in range(len(self.layers)):
            x = self.run_layer(i, x, rope, mask, cache)
        return self.norm(x)
