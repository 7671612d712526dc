"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764; code
github.com/pkunlp-icler/FastV).

LLaVA-1.5 (same tower, projector and spliced sequence) whose decoder drops visual tokens after layer K:
layers 0..K-1 run over the full sequence; the attention that layer K-1 computed ranks the visual tokens, the
top ``round(V * (1 - R))`` are kept and the rest leave the sequence (hidden states, RoPE tables, mask) and
every later layer's KV cache. Options ``fastv.layer=K`` (default 2) and ``fastv.drop_ratio=R`` (default 0.5),
the paper's LLaVA-1.5 setting.

The rule, from the official in-place implementation (``LlamaModel.fastv_forward`` in
``src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py``, the ``fastv_config``
path with KV cache; the same as the ``fast_v_inplace`` branch of ``LlamaModel.forward`` in
``src/transformers/src/transformers/models/llama/modeling_llama.py``):

* scores: layer K-1's attention probabilities (``layer_outputs[1]`` with ``output_attentions`` on in that
  layer), averaged over all query heads (``torch.mean(..., dim=1)``), of the *last* query row only
  (``[-1]``), restricted to the visual tokens;
* kept: ``topk(round(V * (1 - R)))`` of those (Python's ``round``, halves to even), then
  ``keep_indexs.sort()``: kept tokens, text included, stay in their original order;
* positions: ``position_ids = keep_indexs``, so kept tokens keep their RoPE positions; decode steps continue
  the full sequence's numbering (``cache_position`` from the first layer's cache length; the older
  ``modeling_llama_fastv_kvcache.py`` numbers them after the kept tokens instead, marked "todo" there);
* K >= 1 (``assert AGG_LAYER > 0``);
* KV cache: layers >= K cache the kept tokens only; decode steps attend to that fixed set (the official
  README's "static kv-cache pruning": no re-ranking per generated token).

The official repo's other mode (``USE_FAST_V`` without ``fast_v_inplace``: dropped tokens masked out of
attention, every row still computed; "no speed up", README) is not implemented.

Fused attention kernels return no probabilities, so layer K-1 computes them explicitly for the ranking row
(:func:`~mllm_bench.attention.attention_weights`, path ``math:weights``: one QK^T row per sample over the
full sequence, component ``attn_scores``, counted and in the analytic cost); the layer's output takes the
model's attention backend as usual. The ranking is not differentiated: ``topk`` indices carry no gradient,
the kept rows' hidden states do.

Caches: the :class:`~mllm_bench.decoder.KVCache` a prefill returns holds layers < K over the full prompt;
a second one in its ``extra`` holds layers >= K over text + kept tokens (in a static cache, lined up with the
first so each decode step derives its slot and metadata from it: what a captured CUDA graph replays). The
pruned sequence is causal by row (kept rows stay in position order), so without padding its mask carries the
plain causal structure and fused kernels keep ``is_causal`` despite the gaps in its positions.

Deviations, all where the official code assumes one sample with one image at a fixed offset
(``image_token_start_index``, ``image_token_length``, and ``[0]`` picks sample 0's ranking for the batch):
each sample is ranked on its own (same kept count, its own indices); with several images all of a sample's
visual tokens are ranked together; the ranking row is each sample's last real token (the last row under
left padding, as in the official code); padding stays in the sequence, masked. Scores are fp32 (transformers'
eager softmax is fp32, then cast to the model dtype before the mean), which may only break near-ties
differently. Training is not part of FastV; here a training forward ranks by the last token of the full
sequence, as the official forward would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm_bench.batch import MultimodalBatch, SplicedLayout, splice_layout
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown, CostModel, Segment, causal_pairs, stage_trains
from mllm_bench.decoder import KVCache, LayerKV
from mllm_bench.masks import causal_mask, causal_structure
from mllm_bench.model import MLLM, ModelOutput
from mllm_bench.projector import MLPProjector
from mllm_bench.spec import COMPUTE_BUDGETS, ArchSpec, BudgetKnob
from mllm_bench.spliced import gather_rows, scatter_rows
from mllm_bench.static_decode import StaticKVCache, StaticLayerKV
from mllm_bench.workload import Workload

PRUNED_CACHE = "fastv_cache"  # cache.extra: the KV cache of layers >= K (kept tokens only)
PROMPT_LENGTH = "fastv_prompt_length"  # cache.extra: keys per sample of layers < K after the prompt
DROPPED = "fastv_dropped"  # cache.extra: visual tokens dropped per sample


@dataclass(frozen=True)
class FastVOptions:
    """``layer``: K, visual tokens are ranked in layer K-1 and dropped from layer K on; ``drop_ratio``: R,
    the share of visual tokens dropped."""

    layer: int = 2
    drop_ratio: float = 0.5

    def __post_init__(self) -> None:
        require(isinstance(self.layer, int) and not isinstance(self.layer, bool) and self.layer >= 1,
                f"fastv option layer must be an integer >= 1 (tokens are ranked in layer K-1), got {self.layer!r}")
        r = self.drop_ratio
        require(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1,
                f"fastv option drop_ratio must be a number in [0, 1], got {r!r}")


def kept_visual_tokens(visual: int, drop_ratio: float) -> int:
    """Visual tokens kept per sample: ``round(V * (1 - R))``, as the official code rounds."""
    return round(visual * (1 - drop_ratio))


def ranking_rows(valid: torch.Tensor) -> torch.Tensor:
    """(B, 1): each sample's last real row, the query whose attention ranks the visual tokens."""
    index = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return torch.where(valid, index, -1).amax(-1, keepdim=True)


def keep_visual(weights: torch.Tensor, layout: SplicedLayout, kept: int) -> torch.Tensor:
    """Rows (B, kept) of the visual tokens with the highest attention from the ranking row, averaged over
    heads (``weights``: (B, H, 1, L)), in sequence order."""
    received = weights.mean(dim=1)[:, 0].gather(1, layout.visual_index)
    return layout.visual_index.gather(1, received.topk(kept, dim=-1).indices).sort(-1).values


def pruned_layout(layout: SplicedLayout, kept_visual: torch.Tensor) -> tuple[torch.Tensor, SplicedLayout]:
    """Rows kept (B, T + kept), in order, and the layout of the pruned sequence (original positions)."""
    keep = torch.cat([layout.text_index, kept_visual], 1).sort(-1).values
    return keep, SplicedLayout(
        text_index=torch.searchsorted(keep, layout.text_index),
        visual_index=torch.searchsorted(keep, kept_visual),
        positions=layout.positions.gather(1, keep),
        valid=layout.valid.gather(1, keep),
        is_visual=layout.is_visual.gather(1, keep),
    )


def pruned_segments(segments: list[Segment], kept: int) -> list[Segment]:
    """One sample's sequence after pruning, ``kept`` visual tokens split evenly over the images (which image
    keeps how many is data-dependent; only the effective-attention count reads the split)."""
    images = sum(s.role == "visual" for s in segments)
    share, extra = divmod(kept, images) if images else (0, 0)
    out, seen = [], 0
    for s in segments:
        if s.role == "visual":
            s = Segment("visual", share + int(seen < extra))
            seen += 1
        if s.length:
            out.append(s)
    return out


def ranking_cost(cm: CostModel, needs_grad: bool) -> None:
    """Layer K-1's ranking probabilities: one QK^T row per sample over the full sequence, no gradient
    (recomputed with the layer under activation checkpointing)."""
    n = sum(s.length for s in cm.segments)
    role = cm.segments[-1].role
    f = 2.0 * cm.batch * n * cm.q_width
    for phase in cm.phases:
        if phase == "decode":
            continue
        cm.cost.add(phase, "attn_scores", role, "forward", f, f)
        if phase == "train_step" and cm.workload.gradient_checkpointing and needs_grad:
            cm.cost.add(phase, "attn_scores", role, "recompute", f, f)


def fastv_cost(model: FastV, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> MLP projector -> K layers over the full spliced sequence (+ the ranking row in layer
    K-1) -> the other layers over text + kept visual tokens -> lm_head."""
    llm, stage = model.llm_config, workload.stage
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    cm.vision_tower(model.vision_config)
    g = cm.mlp_connector(model.vision_config.hidden_size, llm.hidden_size,
                         trainable=stage_trains(model, "multi_modal_projector.", stage))
    trains_llm, k = stage_trains(model, "language_model.", stage), model.options.layer
    g = cm.spliced_decoder(causal_pairs(cm.segments), trainable=trains_llm, grad_in=g, num_layers=k)
    if cm.visual:
        ranking_cost(cm, g)
    # from layer K on the cost model describes the pruned sequence
    kept = kept_visual_tokens(cm.visual, model.options.drop_ratio)
    dropped = cm.visual - kept
    cm.segments, cm.visual = pruned_segments(cm.segments, kept), kept
    if workload.images_per_sample > 1:
        cm.cost.info["effective_note"] = ("effective attention after pruning assumes the kept visual tokens split "
                                          "evenly over the images (the real split is data-dependent)")
    if context_len is not None:
        cm.context_len = context_len - dropped
    g = cm.spliced_decoder(causal_pairs(cm.segments), trainable=trains_llm, grad_in=g, num_layers=llm.num_layers - k)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


def static_pruned_cache(pruned: KVCache, cache: StaticKVCache, first_layer: int) -> StaticKVCache:
    """``pruned`` (layers >= ``first_layer``) in fixed buffers lined up with the static ``cache`` of the other
    layers: the same free slots, written at ``cache``'s slot minus the dropped tokens."""
    filled = cache.length - cache.extra[DROPPED]
    capacity = cache.capacity - cache.extra[DROPPED]
    slot = torch.full((1,), filled - 1, dtype=torch.long, device=cache.k_pos.device)

    def widen(t: torch.Tensor) -> torch.Tensor:
        axis = 2 if t.dim() == 4 else 1
        shape = list(t.shape)
        shape[axis] = capacity
        out = t.new_zeros(shape)
        out.narrow(axis, 0, filled).copy_(t.narrow(axis, 0, filled))
        return out

    layers = [LayerKV() if i < first_layer else StaticLayerKV(widen(kv.k), widen(kv.v), slot)
              for i, kv in enumerate(pruned.layers)]
    return StaticKVCache(layers, widen(pruned.k_pos), widen(pruned.k_valid), widen(pruned.k_visual),
                         cache.next_pos.clone(), {}, slot, filled)


def drop_ratios(model: FastV, workload: Workload) -> list[float]:
    """Drop ratios R = (V − k)/V keeping k = 1, 2, ..., V of the V spliced visual tokens (cheapest first): the
    settings ``compare --equal`` searches."""
    v = sum(model.visual_tokens_per_image(workload))
    return [(v - k) / v for k in range(1, v + 1)]


def kept_tokens(model: FastV, workload: Workload) -> int:
    """Visual tokens per sample from layer K on."""
    return kept_visual_tokens(sum(model.visual_tokens_per_image(workload)), model.options.drop_ratio)


class FastV(MLLM):
    spec = ArchSpec(
        name="fastv",
        display_name="FastV",
        description="FastV: LLaVA-1.5 whose least-attended visual tokens (layer K-1) are dropped after layer K",
        color="#e377c2",
        tiny_options={"layer": 1},
        checkpoint_renames=(("model.multi_modal_projector.", "multi_modal_projector."),),
        order=40,
        budget_knob=BudgetKnob("drop_ratio", "R in [0, 1): keeps round(V·(1−R)) of V visual tokens, k = 1..V",
                               drop_ratios, COMPUTE_BUDGETS, COMPUTE_BUDGETS, kept_tokens,
                               "visual tokens kept from layer {layer} on"),
    )
    Options = FastVOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        if self.options.layer >= llm.num_layers:
            raise ConfigError(f"fastv option layer={self.options.layer} must be below the LLM's {llm.num_layers} "
                              f"layers (tokens are dropped from layer K on; K = {llm.num_layers} would drop nothing): "
                              f"set fastv.layer to 1..{llm.num_layers - 1}")
        self.multi_modal_projector = MLPProjector(vision.hidden_size, llm.hidden_size)

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        if stage == "pretrain":
            return ("multi_modal_projector.",)
        return ("multi_modal_projector.", "language_model.", "lm_head.")

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return fastv_cost(self, workload, context_len)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (B, K*V, h) of images (B, K, C, H, W)."""
        return self.multi_modal_projector(self.encode(pixel_values)).reshape(pixel_values.shape[0], -1,
                                                                             self.llm_config.hidden_size)

    def embed(self, batch: MultimodalBatch) -> tuple[torch.Tensor, SplicedLayout]:
        """LLaVA's spliced input sequence (B, T + K*V, h) and its layout."""
        self.check_batch(batch)
        layout = splice_layout(batch, self.tokens_per_image)
        text = self.language_model.embed_tokens(batch.input_ids)
        parts = [(layout.text_index, text)]
        if batch.images_per_sample:
            parts.append((layout.visual_index, self.image_features(batch.pixel_values).to(text.dtype)))
        return scatter_rows(layout.length, parts), layout

    def _run(self, batch: MultimodalBatch, cache: KVCache | None = None) -> tuple[torch.Tensor, SplicedLayout]:
        """Final-normed hidden states of the pruned sequence and its layout; fills ``cache`` (layers < K) and
        the pruned cache in its ``extra`` (layers >= K) when given."""
        x, layout = self.embed(batch)
        lm, k = self.language_model, self.options.layer
        pruned_cache = None if cache is None else cache.extra[PRUNED_CACHE]
        mask = causal_mask(layout.positions, layout.valid, layout.is_visual)
        rope = lm.rope(layout.positions, x.dtype)
        for i in range(k - 1):
            x = lm.run_layer(i, x, rope, mask, cache)
        new_layout = layout
        visual = layout.visual_index.shape[1]
        if visual:
            x, weights = lm.run_layer(k - 1, x, rope, mask, cache, weight_rows=ranking_rows(layout.valid))
            kept = keep_visual(weights, layout, kept_visual_tokens(visual, self.options.drop_ratio))
            keep, new_layout = pruned_layout(layout, kept)
            x = gather_rows(x, keep)
        else:
            x = lm.run_layer(k - 1, x, rope, mask, cache)
        pruned_mask = causal_mask(new_layout.positions, new_layout.valid, new_layout.is_visual)
        if visual and x.device.type != "meta" and bool(new_layout.valid.all()):
            # kept rows are in position order: causal by row, the gaps in positions change nothing (fused kernels)
            pruned_mask.structure = causal_structure(new_layout.length)
        pruned_rope = lm.rope(new_layout.positions, x.dtype)
        for i in range(k, len(lm.layers)):
            x = lm.run_layer(i, x, pruned_rope, pruned_mask, pruned_cache)
        if cache is not None:
            cache.add_prompt(mask)
            pruned_cache.add_prompt(pruned_mask)
            cache.extra[PROMPT_LENGTH] = cache.length
            cache.extra[DROPPED] = cache.length - pruned_cache.length
        return lm.norm(x), new_layout

    def forward(self, batch: MultimodalBatch) -> ModelOutput:
        hidden, layout = self._run(batch)
        return self.text_output(batch, self.lm_head(gather_rows(hidden, layout.text_index)))

    def prefill(self, batch: MultimodalBatch) -> tuple[torch.Tensor, KVCache]:
        """Logits of the last token; a cache of layers < K over the full prompt whose ``extra`` holds the cache
        of layers >= K over the kept tokens."""
        self.check_prompt(batch)
        b, device = batch.batch_size, batch.input_ids.device
        cache = KVCache.empty(self.options.layer, b, device)
        cache.extra[PRUNED_CACHE] = KVCache.empty(self.llm_config.num_layers, b, device)
        hidden, _ = self._run(batch, cache)
        return self.lm_head(hidden[:, -1]), cache

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One step: layers < K attend to the full prompt, layers >= K to the kept tokens; both caches grow."""
        lm, k = self.language_model, self.options.layer
        pruned = cache.extra[PRUNED_CACHE]
        if isinstance(cache, StaticKVCache) and not isinstance(pruned, StaticKVCache):
            pruned = cache.extra[PRUNED_CACHE] = static_pruned_cache(pruned, cache, k)
        x = lm.embed_tokens(tokens.view(-1, 1))
        pos, mask = cache.step()
        if isinstance(pruned, StaticKVCache):
            # the slots after the prompt mirror the other layers' (written in place: a CUDA graph replays this)
            start, offset = cache.extra[PROMPT_LENGTH], cache.extra[DROPPED]
            pruned.slot.copy_(cache.slot - offset)
            pruned.k_pos[:, start - offset:].copy_(cache.k_pos[:, start:])
            pruned.k_valid[:, start - offset:].copy_(cache.k_valid[:, start:])
            pruned.next_pos.copy_(cache.next_pos)
            pruned.filled = cache.length - offset
        else:
            ones = torch.ones_like(pos, dtype=torch.bool)
            pruned.add_keys(pos, ones, ~ones)
            pruned.next_pos = cache.next_pos
        pruned_mask = pruned.step_mask(pos)
        rope = lm.rope(pos, x.dtype)
        for i in range(len(lm.layers)):
            x = lm.run_layer(i, x, rope, mask, cache) if i < k else lm.run_layer(i, x, rope, pruned_mask, pruned)
        return self.lm_head(lm.norm(x)[:, -1]), cache

    def extra_cache_nbytes(self, cache: KVCache) -> dict[str, int]:
        """Bytes of every layer's keys and values by role: ``cache.nbytes()`` holds layers < K only, so the
        pruned layers' are added to them under the same roles (callers overlay this on ``cache.nbytes()``)."""
        pruned = cache.extra.get(PRUNED_CACHE)
        if pruned is None:
            return {}
        own, later = cache.nbytes(), pruned.nbytes()
        return {role: own.get(role, 0) + later.get(role, 0) for role in ("visual", "text")}
