"""LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv 2310.03744).

CLIP ViT-L/14-336 features from the second-to-last layer, CLS dropped, go through a two-layer MLP
(``mlp2x_gelu``) into the LLM's embedding space and are spliced into the input sequence where the
image sits. From there on visual tokens are ordinary tokens: queries, keys, values, attention output
and FFN in every layer, attending causally to everything before them.

Training stages: ``pretrain`` trains the projector; ``finetune`` the projector and the LLM (the
vision tower stays frozen in both).
"""

from __future__ import annotations

import torch

from mllm_bench.batch import MultimodalBatch, SplicedLayout, splice_layout
from mllm_bench.config import LLMConfig, VisionConfig
from mllm_bench.costmodel import CostBreakdown, CostModel, Segment, causal_pairs, stage_trains
from mllm_bench.decoder import KVCache
from mllm_bench.masks import AttentionMask, MaskRule, causal_mask
from mllm_bench.model import MLLM, ModelOutput
from mllm_bench.projector import MLPProjector
from mllm_bench.spec import ArchSpec
from mllm_bench.workload import Workload


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


def llava_cost(model: LLaVA, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> MLP projector -> spliced-sequence decoder (``model``'s mask) -> lm_head on the text."""
    cm, stage = CostModel(model.llm_config, workload, model.tokens_per_image, context_len), workload.stage
    cm.vision_tower(model.vision_config)
    g = cm.mlp_connector(model.vision_config.hidden_size, model.llm_config.hidden_size,
                         trainable=stage_trains(model, "multi_modal_projector.", stage))
    g = cm.spliced_decoder(model.attention_pairs(cm.segments), trainable=stage_trains(model, "language_model.", stage),
                           grad_in=g)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


class LLaVA(MLLM):
    spec = ArchSpec(
        name="llava",
        display_name="LLaVA-1.5",
        description="LLaVA-1.5: MLP projector, visual tokens spliced into the input sequence",
        color="#1f77b4",
        checkpoint_renames=(("model.multi_modal_projector.", "multi_modal_projector."),),
        order=0,
    )
    # Causal by position over the whole spliced sequence, no extra rule (subclasses may add one).
    mask_rule: MaskRule | None = None

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        self.multi_modal_projector = MLPProjector(vision.hidden_size, llm.hidden_size)

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        if stage == "pretrain":
            return ("multi_modal_projector.",)
        return ("multi_modal_projector.", "language_model.", "lm_head.")

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return llava_cost(self, workload, context_len)

    def attention_pairs(self, segments: list[Segment]) -> dict[str, int]:
        """Allowed query-key pairs of one sample per query role under :meth:`sequence_mask` (plain causal)."""
        return causal_pairs(segments)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (B, K*V, h) of images (B, K, C, H, W)."""
        return self.multi_modal_projector(self.encode(pixel_values)).reshape(pixel_values.shape[0], -1,
                                                                             self.llm_config.hidden_size)

    def embed(self, batch: MultimodalBatch) -> tuple[torch.Tensor, SplicedLayout]:
        """The spliced input sequence (B, T + K*V, h) and its layout."""
        self.check_batch(batch)
        layout = splice_layout(batch, self.tokens_per_image)
        text = self.language_model.embed_tokens(batch.input_ids)
        parts = [(layout.text_index, text)]
        if batch.images_per_sample:
            parts.append((layout.visual_index, self.image_features(batch.pixel_values).to(text.dtype)))
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
