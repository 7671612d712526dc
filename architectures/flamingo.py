"""Flamingo-style wiring (Alayrac et al., arXiv 2204.14198), as OpenFlamingo implements it.

Facts from github.com/mlfoundations/open_flamingo (``src/helpers.py``, ``src/flamingo_lm.py``):

* **Perceiver Resampler** at the vision width. Each image's patch features are read by
  ``num_latents`` (64) learned latents through ``resampler_depth`` (6) blocks of attention
  (8 heads x 64; queries from the latents, keys/values from concat(media, latents), with separate
  LayerNorms for media and latents) and a FeedForward (LayerNorm -> Linear -> GELU -> Linear, x4, no
  bias), both residual; a final LayerNorm. Images are resampled independently of each other.
* **Gated cross-attention blocks** before decoder layer ``i`` whenever ``(i + 1) % cross_attn_every == 0``
  (released k: 1, 2, 4): LayerNorm -> attention (queries from the text hidden state, keys/values from the
  latents) -> ``tanh(attn_gate)``; LayerNorm -> FeedForward -> ``tanh(ff_gate)``; each residual on the text
  stream. Gates start at 0, so a fresh model is exactly the text-only LM.
* **Media masking**: a text token attends only to the latents of the latest image before it; text before
  any image gets zero cross-attention output (the gated FFN still runs on every token, as upstream).

The decoder runs on text only (no visual tokens in the sequence); the shared ``LlamaDecoder`` layers are
driven one by one so the blocks can sit between them.

Deviations from OpenFlamingo, on purpose: the vision features come from the same tower and feature layer
as the other architectures here (``VisionConfig.feature_layer``, -2 for LLaVA-1.5's CLIP, CLS dropped),
where OpenFlamingo uses the last layer's patch tokens, so every architecture sees the same features.
OpenFlamingo's resampler has optional media/frame time embeddings, but ``Flamingo`` builds it without
``max_num_media``/``max_num_frames``, so released models have none; we omit them too.

Parameter names map onto OpenFlamingo's: ``perceiver.layers.N.attn`` = ``perceiver.layers.N.0``,
``perceiver.layers.N.ff.{norm,fc1,fc2}`` = ``perceiver.layers.N.1.{0,1,3}``;
``gated_cross_attn_layers.I`` is the block before decoder layer ``I`` (upstream keeps one slot per layer).

Training stages: ``pretrain`` trains the resampler and the cross-attention blocks; ``finetune`` the same,
plus the LLM (decoder and lm_head) when ``train_llm_in_finetune``. The vision tower is always frozen.
OpenFlamingo also unfreezes the LM's input embeddings (for its new ``<image>``/``<|endofchunk|>``
tokens); we add no tokens, so they stay frozen here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm_bench.batch import MultimodalBatch, rope_positions
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.decoder import KVCache
from mllm_bench.masks import AttentionMask, causal_mask
from mllm_bench.model import MLLM, ModelOutput
from mllm_bench.workload import Workload

KV = tuple[torch.Tensor, torch.Tensor]


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
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"flamingo option {name} must be a positive integer, got {value!r}",
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

    def __init__(self, dim: int, opts: FlamingoOptions) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(opts.num_latents, dim))
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


class Flamingo(MLLM):
    name = "flamingo"
    description = "Flamingo-style: Perceiver Resampler latents read by gated cross-attention before every k-th layer"
    Options = FlamingoOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        opts: FlamingoOptions = self.options
        if not 1 <= opts.cross_attn_every <= llm.num_layers:
            raise ConfigError(
                f"flamingo option cross_attn_every must be in [1, {llm.num_layers}] (num_layers of "
                f"{llm.name}), got {opts.cross_attn_every}"
            )
        self.perceiver = PerceiverResampler(vision.hidden_size, opts)
        # Keyed by the decoder layer each block runs before.
        self.gated_cross_attn_layers = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(llm.hidden_size, vision.hidden_size, opts)
             for i in range(llm.num_layers) if (i + 1) % opts.cross_attn_every == 0}
        )

    # ----- what a cost model needs -----------------------------------------------------------------
    @property
    def cross_attn_layer_indices(self) -> tuple[int, ...]:
        """Decoder layers that have a gated cross-attention block before them."""
        return tuple(int(i) for i in self.gated_cross_attn_layers)

    @property
    def num_latents(self) -> int:
        """Keys/values each image contributes to cross-attention."""
        return self.options.num_latents

    def fsdp_units(self) -> list[nn.Module]:
        """The resampler and each gated cross-attention block are FSDP2 units of their own."""
        return [self.perceiver, *self.gated_cross_attn_layers.values()]

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        connector = ("perceiver.", "gated_cross_attn_layers.")
        if stage == "finetune" and self.options.train_llm_in_finetune:
            return connector + ("language_model.", "lm_head.")
        return connector

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        """Vision tower -> resampler -> text-only decoder with a gated cross-attention block before every k-th layer."""
        o, llm, stage = self.options, self.llm_config, workload.stage
        cm = CostModel(llm, workload, self.tokens_per_image, context_len)
        cm.vision_tower(self.vision_config)
        media_grad = cm.perceiver_resampler(
            self.vision_config.hidden_size, o.num_latents, o.resampler_depth, o.resampler_heads,
            o.resampler_dim_head, o.resampler_ff_mult, trainable=stage_trains(self, "perceiver.", stage))
        llm_trained = stage_trains(self, "language_model.", stage)
        first = self.cross_attn_layer_indices[0]  # blocks after it all see gradients alike
        g = cm.text_decoder_layers(first, trainable=llm_trained, grad_in=llm_trained)
        g = cm.gated_cross_attention(
            self.vision_config.hidden_size, workload.images_per_sample * o.num_latents, o.xattn_heads,
            o.xattn_dim_head, o.xattn_ff_mult, trainable=stage_trains(self, "gated_cross_attn_layers.", stage),
            grad_in=g, media_grad=media_grad, blocks=len(self.cross_attn_layer_indices))
        g = cm.text_decoder_layers(llm.num_layers - first, trainable=llm_trained, grad_in=g)
        cm.text_kv_cache(llm.num_layers)
        cm.lm_head(trainable=stage_trains(self, "lm_head.", stage), grad_in=g)
        return cm.result()

    # ----- the model -------------------------------------------------------------------------------
    def media_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Resampled latents (B, K * num_latents, vision width) of images (B, K, C, H, W)."""
        return self.perceiver(self.encode(pixel_values)).reshape(pixel_values.shape[0], -1,
                                                                 self.vision_config.hidden_size)

    def media_kv(self, batch: MultimodalBatch) -> dict[str, KV] | None:
        """Each cross-attention block's keys/values over all the batch's latents (None without images)."""
        if batch.images_per_sample == 0:
            return None
        latents = self.media_latents(batch.pixel_values)
        return {i: block.attn.media_kv(latents) for i, block in self.gated_cross_attn_layers.items()}

    def run_cross_attn(self, index: int, x: torch.Tensor, kv: dict[str, KV] | None, mask: MediaMask) -> torch.Tensor:
        """The gated block before decoder layer ``index``, if there is one."""
        key = str(index)
        if key not in self.gated_cross_attn_layers:
            return x
        block = self.gated_cross_attn_layers[key]
        block_kv = None if kv is None else kv[key]
        lm = self.language_model
        if lm.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, block_kv, mask, use_reentrant=False)
        return block(x, block_kv, mask)

    def run_decoder(self, x: torch.Tensor, positions: torch.Tensor, mask: AttentionMask,
                    kv: dict[str, KV] | None, media: MediaMask, cache: KVCache | None = None) -> torch.Tensor:
        """Text hidden states through every (block, decoder layer) pair and the final norm."""
        rope = self.language_model.rope(positions, x.dtype)
        for i in range(self.llm_config.num_layers):
            x = self.run_cross_attn(i, x, kv, media)
            x = self.language_model.run_layer(i, x, rope, mask, cache)
        return self.language_model.norm(x)

    def _prompt(self, batch: MultimodalBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMask, MediaMask]:
        self.check_batch(batch)
        valid = batch.text_mask()
        positions = rope_positions(valid)
        x = self.language_model.embed_tokens(batch.input_ids)
        media = media_mask(batch.image_positions, batch.num_text, self.options.num_latents)
        return x, positions, causal_mask(positions, valid), media

    def forward(self, batch: MultimodalBatch) -> ModelOutput:
        x, positions, mask, media = self._prompt(batch)
        hidden = self.run_decoder(x, positions, mask, self.media_kv(batch), media)
        return self.text_output(batch, self.lm_head(hidden))

    def prefill(self, batch: MultimodalBatch) -> tuple[torch.Tensor, KVCache]:
        """Latents once, the prompt's self-attention cache, and each block's K/V of the latest image.

        ``cache.extra["cross_attn_kv"]`` maps block key -> (K, V) of shape (B, H, num_latents, D): every
        image precedes the generated tokens, so the latest image (the last one) is all decode needs.
        """
        self.check_prompt(batch)
        x, positions, mask, media = self._prompt(batch)
        kv = self.media_kv(batch)
        cache = KVCache.empty(self.llm_config.num_layers, batch.batch_size, x.device)
        hidden = self.run_decoder(x, positions, mask, kv, media, cache)
        cache.add_prompt(mask)
        n = self.options.num_latents
        latest = None if kv is None else {i: (k[:, :, -n:], v[:, :, -n:]) for i, (k, v) in kv.items()}
        cache.extra["cross_attn_kv"] = latest
        return self.lm_head(hidden[:, -1]), cache

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        x = self.language_model.embed_tokens(tokens.view(-1, 1))
        pos, mask = cache.step()
        kv = cache.extra["cross_attn_kv"]
        has_media = torch.full_like(pos, kv is not None, dtype=torch.bool)
        media = MediaMask(None, has_media)
        hidden = self.run_decoder(x, pos, mask, kv, media, cache)
        return self.lm_head(hidden[:, -1]), cache

    def cross_attn_cache_nbytes(self, cache: KVCache) -> int:
        """Bytes of the cross-attention keys/values held in ``cache.extra`` (latest image, every block)."""
        kv = cache.extra.get("cross_attn_kv")
        if not kv:
            return 0
        return sum(t.numel() * t.element_size() for pair in kv.values() for t in pair)
