"""The spliced-sequence wiring several architectures share: visual tokens written into the input sequence
at their images' positions, then an ordinary causal decoder over the whole sequence.

A subclass of :class:`SplicedMLLM` says how many tokens each image brings (``image_token_counts``) and what
they are (``spliced_features``); embedding, the mask, the forward pass and prefill are here once.
"""

from __future__ import annotations

import torch

from .batch import MultimodalBatch, SplicedLayout, splice_layout
from .decoder import KVCache
from .masks import AttentionMask, MaskRule, causal_mask
from .model import MLLM, ModelOutput


def scatter_rows(length: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A (B, length, h) tensor whose rows ``index`` (B, n) are ``values`` (B, n, h), for each part."""
    values = parts[0][1]
    out = values.new_zeros(values.shape[0], length, values.shape[-1])
    for index, vals in parts:
        out = out.scatter(1, index.unsqueeze(-1).expand(-1, -1, vals.shape[-1]), vals)
    return out


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, n) of x (B, T, h)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class SplicedMLLM(MLLM):
    """An MLLM whose visual tokens are full tokens of the input sequence, causal by position."""

    # An extra attention rule on top of causal (e.g. NAAViT's); None for plain causal.
    mask_rule: MaskRule | None = None

    def prepared(self, batch: MultimodalBatch) -> MultimodalBatch:
        """The checked batch in the form ``spliced_features`` reads (the batch itself by default)."""
        return batch

    def image_token_counts(self, batch: MultimodalBatch) -> int | torch.Tensor:
        """Visual tokens of each image: one count for all, or (B, K) per image."""
        return self.tokens_per_image

    def spliced_features(self, batch: MultimodalBatch, counts: int | torch.Tensor) -> torch.Tensor:
        """The visual tokens (B, N, h) of each sample's images, in order (``counts`` as above)."""
        return self.image_features(batch.pixel_values)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines neither image_features nor spliced_features")

    def embed(self, batch: MultimodalBatch) -> tuple[torch.Tensor, SplicedLayout]:
        """The spliced input sequence (B, T + visual, h) and its layout."""
        self.check_batch(batch)
        batch = self.prepared(batch)
        counts = self.image_token_counts(batch)
        layout = splice_layout(batch, counts)
        text = self.language_model.embed_tokens(batch.input_ids)
        parts = [(layout.text_index, text)]
        if batch.images_per_sample:
            parts.append((layout.visual_index, self.spliced_features(batch, counts).to(text.dtype)))
        return scatter_rows(layout.length, parts), layout

    def sequence_mask(self, layout: SplicedLayout) -> AttentionMask:
        return causal_mask(layout.positions, layout.valid, layout.is_visual, self.mask_rule)

    def forward(self, batch: MultimodalBatch) -> ModelOutput:
        x, layout = self.embed(batch)
        hidden = self.language_model(x, layout.positions, self.sequence_mask(layout))
        return self.text_output(batch, self.lm_head(gather_rows(hidden, layout.text_index)))

    def prefill(self, batch: MultimodalBatch) -> tuple[torch.Tensor, KVCache]:
        self.check_prompt(batch)
        x, layout = self.embed(batch)
        cache = KVCache.empty(self.llm_config.num_layers, batch.batch_size, x.device)
        mask = self.sequence_mask(layout)
        hidden = self.language_model(x, layout.positions, mask, cache)
        cache.add_prompt(mask)
        return self.lm_head(hidden[:, -1]), cache
