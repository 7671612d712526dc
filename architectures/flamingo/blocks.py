"""Flamingo's paper blocks, in OpenFlamingo's form: options, Perceiver Resampler, media mask, gated
cross-attention (see ``mllm_bench/architectures/flamingo/__init__.py`` for the sources)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mllm_bench.config import require

KV = tuple[torch.Tensor, torch.Tensor]


# Upper bounds on the options: far above any released model (OpenFlamingo: 64 latents, depth 6, 8 heads x 64,
# FFN x4), low enough that a typo cannot build a model that takes minutes to count.
OPTION_BOUNDS = {
    "num_latents": 4096, "resampler_depth": 64, "resampler_heads": 256, "resampler_dim_head": 1024,
    "resampler_ff_mult": 64, "cross_attn_every": 1024, "xattn_heads": 256, "xattn_dim_head": 1024,
    "xattn_ff_mult": 64,
}


@dataclass(frozen=True)
class FlamingoOptions:
    """Resampler and cross-attention settings (defaults: OpenFlamingo's, with a block every 4th layer)."""

    num_latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    cross_attn_every: int = 4
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    train_llm_in_finetune: bool = False

    def __post_init__(self) -> None:
        for name in (
            "num_latents", "resampler_depth", "resampler_heads", "resampler_dim_head", "resampler_ff_mult",
            "cross_attn_every", "xattn_heads", "xattn_dim_head", "xattn_ff_mult",
        ):
            value, bound = getattr(self, name), OPTION_BOUNDS[name]
            require(
                isinstance(value, int) and not isinstance(value, bool) and 0 < value <= bound,
                f"flamingo option {name} must be an integer in [1, {bound}], got {value!r}",
            )
        require(
            isinstance(self.train_llm_in_finetune, bool),
            f"flamingo option train_llm_in_finetune must be True or False, got {self.train_llm_in_finetune!r}",
        )


class FeedForward(nn.Module):
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim), no biases (OpenFlamingo)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents); separate LayerNorms for media and latents."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media (N, v, dim), latents (N, n, dim) -> (N, n, dim)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, split_heads(k, self.heads), split_heads(v, self.heads))
        return self.to_out(merge_heads(out))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """``num_latents`` learned latents read each image's features; output (N, num_latents, dim)."""

    cost_component = "connector"

    def __init__(self, dim: int, opts: FlamingoOptions) -> None:
        super().__init__()
        self.latents = nn.Parameter(nn.init.normal_(torch.empty(opts.num_latents, dim)))  # = torch.randn
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, opts.resampler_heads, opts.resampler_dim_head, opts.resampler_ff_mult)
            for _ in range(opts.resampler_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """media (N, v, dim) for N images -> latents (N, num_latents, dim)."""
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


@dataclass
class MediaMask:
    """Which latents each text query may see.

    ``allowed`` (B, 1, T, M) over the M = K * num_latents keys, or None when every query with media sees
    every key (one image, or a decode step over the latest image only); ``has_media`` (B, T): False for
    text before any image, whose cross-attention output is zero.
    """

    allowed: torch.Tensor | None
    has_media: torch.Tensor


def media_mask(image_positions: torch.Tensor, num_text: int, num_latents: int) -> MediaMask:
    """The only-latest-image rule: text index i sees image j iff j is the last image with position <= i."""
    b, k = image_positions.shape
    device = image_positions.device
    text_index = torch.arange(num_text, device=device).view(1, num_text, 1)
    latest = (image_positions.unsqueeze(1) <= text_index).sum(-1) - 1  # (B, T), -1 = no image yet
    has_media = latest >= 0
    if k <= 1:
        return MediaMask(None, has_media)
    key_image = torch.arange(k, device=device).repeat_interleave(num_latents)  # (K*n,)
    allowed = key_image.view(1, 1, -1) == latest.unsqueeze(-1)
    allowed = allowed | ~has_media.unsqueeze(-1)  # keep rows non-empty; their output is zeroed anyway
    return MediaMask(allowed.unsqueeze(1), has_media)


class MaskedCrossAttention(nn.Module):
    """Text queries (width ``dim``) over media latents (width ``dim_visual``) under a :class:`MediaMask`."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def media_kv(self, media: torch.Tensor) -> KV:
        """Keys and values (B, H, M, D) of media latents (B, M, dim_visual); computed once per prompt."""
        k, v = self.to_kv(media).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x: torch.Tensor, kv: KV, mask: MediaMask) -> torch.Tensor:
        q = split_heads(self.to_q(self.norm(x)), self.heads)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask.allowed)
        out = out * mask.has_media.view(x.shape[0], 1, -1, 1).to(out.dtype)
        return self.to_out(merge_heads(out))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * xattn(x); then x + tanh(ff_gate) * ff(x). Gates start at 0."""

    cost_component = "cross_attn"

    def __init__(self, dim: int, dim_visual: int, opts: FlamingoOptions) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, opts.xattn_heads, opts.xattn_dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, opts.xattn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: KV | None, mask: MediaMask) -> torch.Tensor:
        """``kv`` None: no image in the batch, so only the gated FFN contributes."""
        if kv is not None:
            x = x + self.attn_gate.tanh().to(x.dtype) * self.attn(x, kv, mask)
        return x + self.ff_gate.tanh().to(x.dtype) * self.ff(x)
