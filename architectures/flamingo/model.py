"""The Flamingo-style model: a text-only decoder with a gated cross-attention block before every k-th layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm_bench.batch import MultimodalBatch, rope_positions
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig
from mllm_bench.costmodel import CostBreakdown
from mllm_bench.decoder import KVCache
from mllm_bench.masks import AttentionMask, causal_mask
from mllm_bench.model import MLLM, ModelOutput
from mllm_bench.spec import ALL_BUDGETS, ArchSpec, BudgetKnob, counts_up_to
from mllm_bench.workload import Workload

from .blocks import (
    KV,
    OPTION_BOUNDS,
    FlamingoOptions,
    GatedCrossAttentionBlock,
    MediaMask,
    PerceiverResampler,
    media_mask,
)
from .cost import flamingo_cost


class Flamingo(MLLM):
    spec = ArchSpec(
        name="flamingo",
        display_name="Flamingo-style",
        description="Flamingo-style: Perceiver Resampler latents read by gated cross-attention before every k-th layer",
        color="#ff7f0e",
        # small enough for the tiny presets (2 layers, width 64): a block before every layer
        tiny_options={"num_latents": 4, "resampler_depth": 2, "resampler_heads": 2, "resampler_dim_head": 8,
                      "xattn_heads": 2, "xattn_dim_head": 8, "cross_attn_every": 1},
        # the resampler and each gated cross-attention block are FSDP2 units of their own
        fsdp_modules=("perceiver", "gated_cross_attn_layers"),
        order=20,
        budget_knob=BudgetKnob("num_latents", f"1..{OPTION_BOUNDS['num_latents']} resampler latents",
                               counts_up_to(OPTION_BOUNDS["num_latents"]),
                               ALL_BUDGETS, ALL_BUDGETS,
                               lambda model, workload: model.options.num_latents * workload.images_per_sample,
                               "latents (cross-attention keys/values)"),
    )
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
    def positions_per_image(self) -> int:
        """None: images reach the decoder through cross-attention; only text takes sequence positions."""
        return 0

    @property
    def num_latents(self) -> int:
        """Keys/values each image contributes to cross-attention."""
        return self.options.num_latents

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        connector = ("perceiver.", "gated_cross_attn_layers.")
        if stage == "finetune" and self.options.train_llm_in_finetune:
            return connector + ("language_model.", "lm_head.")
        return connector

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return flamingo_cost(self, workload, context_len)

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

    def extra_cache_nbytes(self, cache: KVCache) -> dict[str, int]:
        """The cross-attention keys/values of the latest image, every block (role ``media``)."""
        return {"media": self.cross_attn_cache_nbytes(cache)}

    def cross_attn_cache_nbytes(self, cache: KVCache) -> int:
        """Bytes of the cross-attention keys/values held in ``cache.extra`` (latest image, every block)."""
        kv = cache.extra.get("cross_attn_kv")
        if not kv:
            return 0
        return sum(t.numel() * t.element_size() for pair in kv.values() for t in pair)
