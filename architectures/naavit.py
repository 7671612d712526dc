"""NAAViT, "No Attention Among Visual Tokens" (SAISA paper, arXiv 2502.02458, Section 3).

The pilot study behind SAISA: LLaVA-1.5 unchanged except for the attention mask. A visual query
attends to the text before its image and to itself, never to another visual token; text attends
as in LLaVA. Parameters, stages and the KV cache are LLaVA's.
"""

from __future__ import annotations

from mllm_bench.architectures.llava import LLaVA


class NAAViT(LLaVA):
    name = "naavit"
    description = "LLaVA-1.5 with no attention among visual tokens (SAISA's pilot)"
    visual_to_visual = False
    fast_attention_backend = "flex"  # a block mask that skips visual-visual blocks
