"""SAISA (Yuan et al., "SAISA: Towards Multimodal Large Language Models with Both Training and Inference
Efficiency", arXiv 2502.02458; code github.com/icip-cas/SAISA).

Visual tokens keep their LLaVA-1.5 slots in the sequence (and their RoPE positions) but are never
processed as tokens: they give keys and values only. ViT features (LLaVA's tower and feature layer,
CLS dropped) go through one MLP per decoder layer, ``Linear(vision → h) → GELU → Linear(h → h)``,
whose output *is* layer l's visual hidden state, in that layer's input space: it is set (never
accumulated) before the layer's input RMSNorm. Each layer then computes K and V for every token but
Q, attention output and FFN for text only. Attention stays causal by LLaVA position, so text before
an image sees only earlier text, and text after it sees all earlier text and the image's tokens.

The text stream is the only residual stream: the visual rows of a layer come from its projector, so
no visual row is computed that nothing reads. The KV cache holds the visual keys and values of every
layer, so a decode step costs what LLaVA-1.5's does.

Naming: the official code keeps each layer's projector inside the decoder layer as
``model.layers.N.mm_projector`` (an ``nn.Sequential``: indices 0 and 2); here they live beside the
decoder as ``mm_projectors.N.linear_1``/``linear_2`` so the decoder stays transformers' Llama. There is
no LLaVA-style input projector (the official code builds one, but layer 0's projector overwrites
its output before any layer reads it).

Training stages: ``pretrain`` trains the per-layer projectors; ``finetune`` the projectors and the LLM
(the vision tower stays frozen in both).
"""

from __future__ import annotations

import torch
from torch import nn

from mllm_bench.batch import MultimodalBatch, SplicedLayout, splice_layout
from mllm_bench.config import LLMConfig, VisionConfig
from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.decoder import KVCache
from mllm_bench.masks import AttentionMask
from mllm_bench.model import MLLM, ModelOutput
from mllm_bench.projector import MLPProjector
from mllm_bench.spec import ArchSpec
from mllm_bench.workload import Workload


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries ``index`` (B, n) of a per-token tensor (B, L)."""
    return x.gather(1, index)


def saisa_mask(layout: SplicedLayout, text_valid: torch.Tensor) -> AttentionMask:
    """Text queries over [visual keys, text keys], causal by LLaVA position (SAISA's attention rule).

    Queries are the text tokens only; keys are all visual tokens, then all text tokens (the row order
    of :class:`~mllm_bench.decoder.SelfAttention`'s input: key-only rows first).
    Text before an image therefore sees only earlier text; text after it sees earlier text and the
    image. This is the one place SAISA's mask is described, so faster backends can read it here.
    """
    q_pos = _rows(layout.positions, layout.text_index)
    v_pos = _rows(layout.positions, layout.visual_index)
    v_flag = torch.ones_like(v_pos, dtype=torch.bool)
    no = torch.zeros_like(q_pos, dtype=torch.bool)
    return AttentionMask(
        q_pos=q_pos,
        k_pos=torch.cat([v_pos, q_pos], 1),
        q_valid=text_valid,
        k_valid=torch.cat([v_flag, text_valid], 1),
        q_visual=no,
        k_visual=torch.cat([v_flag, no], 1),
        meta_plain_causal=layout.visual_index.shape[1] == 0,
    )


def saisa_cost(model: SAISA, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> one MLP per layer -> decoder where visual tokens are keys/values only -> lm_head."""
    llm, stage = model.llm_config, workload.stage
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    cm.vision_tower(model.vision_config)
    visual_grad = cm.mlp_connector(model.vision_config.hidden_size, llm.hidden_size, count=llm.num_layers,
                                   trainable=stage_trains(model, "mm_projectors.", stage))
    # every layer's visual rows are keys/values only, each layer's from its own projector
    g = cm.key_value_visual_decoder([True] * llm.num_layers, trainable=stage_trains(model, "language_model.", stage),
                                    visual_grad=visual_grad, visual_per_layer=True)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


class SAISA(MLLM):
    spec = ArchSpec(
        name="saisa",
        display_name="SAISA",
        description="SAISA: per-layer visual projectors; visual tokens are keys/values only (no query, no FFN)",
        color="#2ca02c",
        # each layer's projector is its own FSDP2 unit (0.67B parameters at 7B would crowd the root)
        fsdp_modules=("mm_projectors",),
        order=30,
    )

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        self.mm_projectors = nn.ModuleList(
            MLPProjector(vision.hidden_size, llm.hidden_size) for _ in range(llm.num_layers)
        )

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        if stage == "pretrain":
            return ("mm_projectors.",)
        return ("mm_projectors.", "language_model.", "lm_head.")

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return saisa_cost(self, workload, context_len)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features (B, K*V, vision_dim) of images (B, K, C, H, W), before any projector."""
        return self.encode(pixel_values).reshape(pixel_values.shape[0], -1, self.vision_config.hidden_size)

    def _run(self, batch: MultimodalBatch, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, h) of the text tokens; fills ``cache`` when given."""
        self.check_batch(batch)
        lm = self.language_model
        layout = splice_layout(batch, self.tokens_per_image)
        text_valid = batch.text_mask()
        x = lm.embed_tokens(batch.input_ids)
        mask = saisa_mask(layout, text_valid)
        rope_text = lm.rope(mask.q_pos, x.dtype)
        feats, rope_keys = None, None
        if batch.images_per_sample:
            feats = self.image_features(batch.pixel_values).to(x.dtype)
            rope_keys = lm.rope(mask.k_pos, x.dtype)  # [visual, text] positions: the keys' order
        for i in range(len(lm.layers)):
            # layer i's visual hidden states are set (not accumulated) from its own projector
            kv_only = None if feats is None else (self.mm_projectors[i](feats), rope_keys)
            x = lm.run_layer(i, x, rope_text, mask, cache, kv_only=kv_only)
        if cache is not None:
            cache.add_prompt(mask)
        return lm.norm(x)

    def forward(self, batch: MultimodalBatch) -> ModelOutput:
        return self.text_output(batch, self.lm_head(self._run(batch)))

    def prefill(self, batch: MultimodalBatch) -> tuple[torch.Tensor, KVCache]:
        """Logits of the last text token and a cache with every layer's visual and text keys/values."""
        self.check_prompt(batch)
        cache = KVCache.empty(self.llm_config.num_layers, batch.batch_size, batch.input_ids.device)
        hidden = self._run(batch, cache)
        return self.lm_head(hidden[:, -1]), cache
