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

from .blocks import (
    KV,
    FeedForward,
    FlamingoOptions,
    GatedCrossAttentionBlock,
    MaskedCrossAttention,
    MediaMask,
    PerceiverAttention,
    PerceiverLayer,
    PerceiverResampler,
    media_mask,
)
from .cost import flamingo_cost
from .model import Flamingo

__all__ = [
    "KV", "FeedForward", "Flamingo", "FlamingoOptions", "GatedCrossAttentionBlock", "MaskedCrossAttention",
    "MediaMask", "PerceiverAttention", "PerceiverLayer", "PerceiverResampler", "flamingo_cost", "media_mask",
]
