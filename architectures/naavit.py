"""NAAViT, "No Attention Among Visual Tokens" (SAISA paper, arXiv 2502.02458, Section 3).

The pilot study behind SAISA: LLaVA-1.5 unchanged except for the attention mask. A visual query
attends to the text before its image and to itself, never to another visual token; text attends
as in LLaVA. Parameters, stages and the KV cache are LLaVA's.

The rule is :class:`NoVisualToVisual` (one predicate, read by the dense mask, FlexAttention's block mask
and the refusal of static fast-path structures) and :func:`naavit_pairs` (its pair count, read by the
analytic cost model's effective convention).
"""

from __future__ import annotations

import dataclasses

import torch
from mllm_bench.architectures.llava import LLaVA

from mllm_bench.costmodel import Segment
from mllm_bench.masks import AttentionMask, MaskRule


class NoVisualToVisual(MaskRule):
    """A visual query never sees another visual token; it still sees itself (same position)."""

    name = "naavit"

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor, q_visual: torch.Tensor,
                k_visual: torch.Tensor) -> torch.Tensor:
        return ~(q_visual & k_visual & (k_pos != q_pos))

    def applies(self, mask: AttentionMask) -> bool:
        # with no visual query (a decode step, text-only prompts) the mask is plain causal
        return bool(mask.q_visual.any())


def naavit_pairs(segments: list[Segment]) -> dict[str, int]:
    """Allowed pairs per query role: text causally over everything before it, a visual query over the
    text before it and itself."""
    pairs = {"text": 0, "visual": 0}
    before = text_before = 0
    for seg in segments:
        n = seg.length
        if seg.role == "visual":
            pairs["visual"] += n * (text_before + 1)
        else:
            pairs["text"] += n * before + n * (n + 1) // 2
            text_before += n
        before += n
    return {role: count for role, count in pairs.items() if any(s.role == role for s in segments)}


class NAAViT(LLaVA):
    spec = dataclasses.replace(
        LLaVA.spec,
        name="naavit",
        display_name="NAAViT",
        description="LLaVA-1.5 with no attention among visual tokens (SAISA's pilot)",
        color="#9467bd",
        fast_attention_backend="flex",  # a block mask that skips visual-visual blocks
        order=10,
        budget_knob=None,  # LLaVA-1.5's pool knob is not part of the pilot's comparison
    )
    mask_rule = NoVisualToVisual()

    def attention_pairs(self, segments: list[Segment]) -> dict[str, int]:
        return naavit_pairs(segments)
