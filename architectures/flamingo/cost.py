"""Flamingo's analytic cost: resampler, text-only decoder layers and gated cross-attention blocks.

Composed from the core primitives of :class:`~mllm_bench.costmodel.CostModel` (``linear``, ``scores``,
``recompute``, ``kv_cache``, the shared decoder-layer linears); terms follow the data flow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.workload import Workload

if TYPE_CHECKING:
    from .model import Flamingo


def perceiver_resampler(cm: CostModel, dim: int, latents: int, depth: int, heads: int, dim_head: int, ff_mult: int,
                        trainable: bool, grad_in: bool = False) -> bool:
    """Per image: ``latents`` queries over concat(media, latents), ``depth`` layers with an FFN."""
    n_img, inner, v = cm.batch * cm.num_images, heads * dim_head, cm.tokens_per_image
    if not n_img:
        return False
    g = trainable or grad_in  # learned latents and LayerNorms make every input need gradients
    for phase in cm.phases:
        if phase == "decode":
            continue
        q_rows, kv_rows = n_img * latents, n_img * (v + latents)
        cm.linear(phase, "connector", "media", q_rows, dim, inner, trainable, g, depth)
        cm.linear(phase, "connector", "media", kv_rows, dim, 2 * inner, trainable, g, depth)
        pairs = n_img * latents * (v + latents)
        cm.scores(phase, "connector", "media", pairs, pairs, inner, inner, g, g, depth)
        cm.linear(phase, "connector", "media", q_rows, inner, dim, trainable, g, depth)
        cm.linear(phase, "connector", "media", q_rows, dim, dim * ff_mult, trainable, g, depth)
        cm.linear(phase, "connector", "media", q_rows, dim * ff_mult, dim, trainable, g, depth)
        if phase == "train_step" and g:
            cm.add_activations(depth * (kv_rows * (dim + 2 * inner)
                                        + q_rows * (3 * dim + 2 * inner + 2 * dim * ff_mult)))
    return g


def text_decoder_layers(cm: CostModel, layers: int, trainable: bool = False, grad_in: bool = False) -> bool:
    """``layers`` plain causal decoder layers over the text tokens only (no visual tokens)."""
    width = cm.q_width
    b, t = cm.batch, cm.text
    g = grad_in or trainable
    if not layers:
        return g
    for phase in cm.phases:
        if phase == "decode":
            cm.decode_layers(layers, visual_in_cache=False)
            continue
        start = len(cm.cost.terms)
        cm.decoder_layer_linears(phase, {"text": b * t}, {"text": b * t}, trainable, g, count=layers)
        pairs = b * t * (t + 1) // 2
        cm.scores(phase, "attn_scores", "text", b * t * t, pairs, width, width, g, g, layers)
        if phase == "train_step" and cm.workload.gradient_checkpointing and g:
            cm.recompute(start, {("ffn", "text"): cm.down_proj(b * t, layers)})
    return g


def gated_cross_attention(cm: CostModel, media_dim: int, media_tokens: int, heads: int, dim_head: int, ff_mult: int,
                          trainable: bool, grad_in: bool = False, media_grad: bool = False,
                          blocks: int = 1) -> bool:
    """``blocks`` blocks: text queries over ``media_tokens`` keys/values per sample (+ a gated FFN).

    Keys/values are projected from the media once per prompt (decode keeps the latest image's). Effective
    pairs: a text token sees only the latest image's ``media_tokens / images`` latents, and text before
    any image sees none.
    """
    h, inner, b, t = cm.llm.hidden_size, heads * dim_head, cm.batch, cm.text
    g = grad_in or trainable  # LayerNorms inside the block are trained with it
    per_image = media_tokens // max(cm.num_images, 1)
    with_media = sum(s.length for i, s in enumerate(cm.segments)
                     if s.role == "text" and any(x.role == "visual" for x in cm.segments[:i]))
    has_media = media_tokens > 0
    for phase in cm.phases:
        if phase == "decode":
            if has_media:
                cm.linear(phase, "cross_attn", "text", b, h, inner, count=blocks)
                cm.scores(phase, "cross_attn", "text", b * per_image, b * per_image, inner, inner, count=blocks)
                cm.linear(phase, "cross_attn", "text", b, inner, h, count=blocks)
            cm.linear(phase, "cross_attn", "text", b, h, h * ff_mult, count=blocks)
            cm.linear(phase, "cross_attn", "text", b, h * ff_mult, h, count=blocks)
            continue
        if has_media:
            cm.linear(phase, "cross_attn", "media", b * media_tokens, media_dim, 2 * inner, trainable,
                      media_grad, blocks)
        start = len(cm.cost.terms)  # the block itself (media K/V are projected outside it)
        if has_media:
            cm.linear(phase, "cross_attn", "text", b * t, h, inner, trainable, g, blocks)
            cm.scores(phase, "cross_attn", "text", b * t * media_tokens, b * with_media * per_image,
                      inner, inner, g, media_grad or trainable, blocks)
            cm.linear(phase, "cross_attn", "text", b * t, inner, h, trainable, g or media_grad, blocks)
        out_g = g or (media_grad and has_media)
        cm.linear(phase, "cross_attn", "text", b * t, h, h * ff_mult, trainable, out_g, blocks)
        cm.linear(phase, "cross_attn", "text", b * t, h * ff_mult, h, trainable, out_g, blocks)
        if phase == "train_step" and cm.workload.gradient_checkpointing and out_g:
            # a trained gate saves the FFN output (for its own gradient), so fc2 is rerun too
            fc2 = 0.0 if trainable else 2.0 * b * t * h * ff_mult * h * blocks
            cm.recompute(start, {("cross_attn", "text"): fc2})
        if phase == "train_step" and out_g:
            cm.add_activations(blocks * (b * t * (3 * h + 2 * inner + 2 * h * ff_mult)
                                         + b * media_tokens * (media_dim + 2 * inner)))
    if has_media:
        media_kv = blocks * 2 * inner * per_image * cm.bytes_per_element
        cm.cost.kv_cache_bytes["media"] = cm.cost.kv_cache_bytes.get("media", 0.0) + media_kv
    return g or (media_grad and has_media)


def flamingo_cost(model: Flamingo, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> resampler -> text-only decoder with a gated cross-attention block before every k-th layer."""
    o, llm, vision, stage = model.options, model.llm_config, model.vision_config, workload.stage
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    cm.vision_tower(vision)
    media_grad = perceiver_resampler(
        cm, vision.hidden_size, o.num_latents, o.resampler_depth, o.resampler_heads, o.resampler_dim_head,
        o.resampler_ff_mult, trainable=stage_trains(model, "perceiver.", stage))
    llm_trained = stage_trains(model, "language_model.", stage)
    first = model.cross_attn_layer_indices[0]  # blocks after it all see gradients alike
    g = text_decoder_layers(cm, first, trainable=llm_trained, grad_in=llm_trained)
    g = gated_cross_attention(
        cm, vision.hidden_size, workload.images_per_sample * o.num_latents, o.xattn_heads, o.xattn_dim_head,
        o.xattn_ff_mult, trainable=stage_trains(model, "gated_cross_attn_layers.", stage), grad_in=g,
        media_grad=media_grad, blocks=len(model.cross_attn_layer_indices))
    g = text_decoder_layers(cm, llm.num_layers - first, trainable=llm_trained, grad_in=g)
    cm.kv_cache(llm.num_layers, visual_in_cache=False)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()
