"""Llama-3.2-Vision's analytic cost: tiled tower, projector, self-attention slots and cross-attention slots.

Composed from :class:`~mllm_bench.costmodel.CostModel`'s primitives in data-flow order. Each image has its
own tile grid (:meth:`Mllama.workload_grids`), but what is computed is what transformers computes: the tower
runs ``max_num_tiles`` tiles per image whatever its grid (unused tiles are zero, not skipped), each padded
to a multiple of 8 tokens, and the projector and the cross-attention keys/values cover every tile, so dense
FLOPs do not depend on the grids. The grids set the effective counts only: the vision attention leaves out
padding-to-padding pairs (the mask's one rule), each image's unused tiles being padding; the
cross-attention pairs are those the cross mask allows (the used tiles of the images a row sees), rows that
see no image counting every key (their mask is cleared). ``cost.info['cost_note']`` says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.workload import Workload

from .text import image_spans
from .vision import padded_tile_length

if TYPE_CHECKING:
    from .model import Mllama


def tiled_vision_tower(cm: CostModel, model: Mllama, trainable: bool) -> bool:
    """Patch convolution on every tile, then local and global layers over all of an image's padded tiles."""
    v, o = model.vision_config, model.options
    n_img = cm.batch * cm.num_images
    if not n_img:
        return False
    d, m, tiles = v.hidden_size, v.intermediate_size, o.max_num_tiles
    seq = tiles * padded_tile_length(v.num_patches)
    pads = [seq - r * c * (v.num_patches + 1) for r, c in model.workload_grids(cm.workload)]  # each image's
    allowed = cm.batch * sum(seq * seq - pad * pad for pad in pads)
    layers = v.num_layers + o.num_global_layers
    g = trainable  # learned embeddings precede the first layer
    for phase in cm.phases:
        if phase == "decode":
            continue
        cm.linear(phase, "vision", "visual", n_img * tiles * v.num_patches, 3 * v.patch_size ** 2, d, trainable)
        rows = n_img * seq
        cm.linear(phase, "vision", "visual", rows, d, d, trainable, g, count=4 * layers)
        cm.scores(phase, "vision", "visual", n_img * seq * seq, allowed, d, d, g, g, layers)
        cm.linear(phase, "vision", "visual", rows, d, m, trainable, g, layers)
        cm.linear(phase, "vision", "visual", rows, m, d, trainable, g, layers)
        if phase == "train_step" and g:
            cm.add_activations(rows * layers * (4 * d + 2 * m))
    return g


def projector(cm: CostModel, d_in: int, trainable: bool, grad_in: bool) -> bool:
    rows = cm.batch * cm.visual
    for phase in cm.phases:
        if phase != "decode" and rows:
            cm.linear(phase, "connector", "visual", rows, d_in, cm.llm.hidden_size, trainable, grad_in)
    return bool(rows) and (trainable or grad_in)


def self_attention_layers(cm: CostModel, layers: int, trainable: bool, grad_in: bool) -> bool:
    """``layers`` causal self-attention layers over the text only."""
    g = grad_in or trainable
    if not layers:
        return g
    b, t, width = cm.batch, cm.text, cm.q_width
    for phase in cm.phases:
        if phase == "decode":
            cm.decode_layers(layers, visual_in_cache=False)
            continue
        start = len(cm.cost.terms)
        cm.decoder_layer_linears(phase, {"text": b * t}, {"text": b * t}, trainable, g, count=layers)
        cm.scores(phase, "attn_scores", "text", b * t * t, b * t * (t + 1) // 2, width, width, g, g, layers)
        if phase == "train_step" and cm.workload.gradient_checkpointing and g:
            cm.recompute(start, {("ffn", "text"): cm.down_proj(b * t, layers)})
    return g


def cross_pairs(workload: Workload, keys_per_image: int, used_per_image: list[int]) -> tuple[int, int]:
    """Allowed (text, vision key) pairs of one sample: all prompt rows, and the last row (what decode inherits).
    ``used_per_image``: the keys of the tiles each image uses."""
    k, t = workload.images_per_sample, workload.num_text_tokens
    positions = torch.tensor([workload.image_positions()], dtype=torch.long)
    ends = image_spans(positions, t)[0].tolist()
    starts = positions[0].tolist()
    rows = []
    for i in range(t):
        seen = [j for j in range(k) if starts[j] <= i < ends[j]]
        rows.append(sum(used_per_image[j] for j in seen) if seen else k * keys_per_image)
    return sum(rows), rows[-1]


def cross_attention_layers(cm: CostModel, model: Mllama, layers: int, trainable: bool, grad_in: bool,
                           media_grad: bool) -> bool:
    """``layers`` gated cross-attention layers: text queries over every image's vision tokens, and an MLP."""
    if not layers or not cm.num_images:
        return grad_in
    llm, o = cm.llm, model.options
    h, m, kv, width = llm.hidden_size, llm.intermediate_size, llm.kv_dim, cm.q_width
    b, t, keys = cm.batch, cm.text, cm.visual
    tokens = model.vision_tower.tokens
    allowed, last = cross_pairs(cm.workload, o.max_num_tiles * tokens, model.visual_tokens_per_image(cm.workload))
    g = grad_in or trainable  # the layer's RMSNorm weights are trained with it
    kv_g = trainable or media_grad
    for phase in cm.phases:
        if phase == "decode":
            cm.linear(phase, "cross_attn", "text", b, h, width, count=layers)
            cm.scores(phase, "cross_attn", "text", b * keys, b * last, width, width, count=layers)
            cm.linear(phase, "cross_attn", "text", b, width, h, count=layers)
            cm.linear(phase, "cross_attn", "text", b, h, m, count=2 * layers)
            cm.linear(phase, "cross_attn", "text", b, m, h, count=layers)
            continue
        cm.linear(phase, "cross_attn", "visual", b * keys, h, kv, trainable, media_grad, 2 * layers)
        start = len(cm.cost.terms)  # the layer itself (keys/values are projected once, before the decoder)
        cm.linear(phase, "cross_attn", "text", b * t, h, width, trainable, g, layers)
        cm.scores(phase, "cross_attn", "text", b * t * keys, b * allowed, width, width, g, kv_g, layers)
        cm.linear(phase, "cross_attn", "text", b * t, width, h, trainable, g or kv_g, layers)
        cm.linear(phase, "cross_attn", "text", b * t, h, m, trainable, g or kv_g, 2 * layers)
        cm.linear(phase, "cross_attn", "text", b * t, m, h, trainable, g or kv_g, layers)
        out_g = g or kv_g
        if phase == "train_step" and cm.workload.gradient_checkpointing and out_g:
            # a trained MLP gate keeps the MLP output for its own gradient, so down_proj is rerun too
            down = 0.0 if trainable else 2.0 * b * t * m * h * layers
            cm.recompute(start, {("cross_attn", "text"): down})
        if phase == "train_step" and out_g:
            cm.add_activations(layers * (b * t * (4 * h + 2 * width + 3 * m) + b * keys * (h + 2 * kv)))
    media = layers * 2 * kv * keys * cm.bytes_per_element
    cm.cost.kv_cache_bytes["media"] = cm.cost.kv_cache_bytes.get("media", 0.0) + media
    return g or kv_g


def mllama_cost(model: Mllama, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Tower -> projector -> decoder slots in order (self-attention on text; cross-attention on the vision tokens)."""
    stage, llm = workload.stage, model.llm_config
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    vision_g = tiled_vision_tower(cm, model, trainable=stage_trains(model, "vision_tower.", stage))
    media_g = projector(cm, model.vision_tower.output_dim, stage_trains(model, "multi_modal_projector.", stage),
                        vision_g)
    llm_trained = any(stage_trains(model, f"language_model.layers.{i}.", stage) for i in model.self_attention_layers)
    cross_trained = any(stage_trains(model, f"language_model.layers.{i}.", stage) for i in model.cross_layers)
    g = llm_trained  # the embeddings are trained with the LLM
    cross = set(model.cross_layers) if workload.images_per_sample else set()
    run = 0  # consecutive self-attention slots not yet added
    for i in range(llm.num_layers):
        if i in cross:
            g = self_attention_layers(cm, run, llm_trained, g)
            run = 0
            g = cross_attention_layers(cm, model, 1, cross_trained, g, media_g)
        elif i in model.self_attention_layers:
            run += 1
    g = self_attention_layers(cm, run, llm_trained, g)
    cm.kv_cache(len(model.self_attention_layers), visual_in_cache=False)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    cost = cm.result()
    grids = model.workload_grids(workload)
    cost.info["tile_grids"] = grids
    cost.info["visual_tokens_per_image"] = model.visual_tokens_per_image(workload)
    if workload.images_per_sample:
        cost.info["cost_note"] = (
            f"mllama computes {model.options.max_num_tiles} tiles per image whatever its grid (tiles used: "
            f"{[r * c for r, c in grids]}): the tower, the projector and the cross-attention keys/values include "
            "the zero padding tiles, as transformers runs them; effective attention leaves out the pairs their "
            "masks block (padding-to-padding in the tower, unused tiles in the cross-attention)")
    return cost
