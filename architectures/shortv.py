"""ShortV (Yuan et al., "ShortV: Efficient Multimodal Large Language Models by Freezing Visual Tokens in
Ineffective Layers", arXiv 2504.00502, ICCV 2025; code github.com/icip-cas/ShortV).

LLaVA-1.5 (same tower, projector and spliced sequence) in which, in a chosen set of decoder layers, the
visual tokens are *frozen*: they still give keys and values (after the layer's input RMSNorm) but get no
query, attention output or FFN, and their hidden states pass to the next layer unchanged. Text tokens
are full tokens in every layer; attention stays causal by LLaVA position. Official code:
``ShortvDecoderLayer.forward`` and ``LlavaLlamaSdpaAttention.forward`` (Q only for the text rows, K/V for
all, visual rows' attention and FFN outputs set to 0 so the residual passes them on) and the mask built in
``LlavaLlamaModel.forward`` (``sdpa_attention_mask``: text before the image causal, text after it over
all earlier tokens), in ``llava/model/language_model/llava_llama.py``. In the other layers
(``LlamaDecoderLayer``) and in decode steps every layer is LLaVA's; the KV cache holds the visual keys
and values of every layer.

Which layers: the paper ranks layers by a data-dependent "layer contribution" score. The official README
("Replaced Layers") lists the order for LLaVA-1.5-7B (``31,29,30,28,0,26,27,25,24,22,23,21,2,3,20,18,17,12,19``,
19 layers) and LLaVA-1.5-13B (24 of 40). Assumption of these rows: a 32-layer LLM takes the 7B order, a
40-layer one the 13B order (whatever the checkpoint); beyond the published list, and for other depths,
the remaining layers from the last one down. ``num_frozen`` (None: the paper's share, 19 of 32, i.e.
19 at 32 layers and 24 at 40 as published, round(19·L/32) elsewhere) takes the first N of that order;
``frozen_layers`` names them explicitly (``-o shortv.frozen_layers=5,6,7``).

Where we generalise the official code (one sample, one image at a fixed offset 35, ``n_visual`` tokens):
any number of images per sample, padding, batches. ShortV is training-free; the training stages here run
LLaVA-1.5's stages (``pretrain``: projector; ``finetune``: projector + LLM) through ShortV's forward.

Implementation: a text stream and a visual stream. Runs of full layers splice both into LLaVA's sequence
(so they take LLaVA's fused causal path); a frozen layer runs the text rows with the visual rows as
key/value-only rows (:meth:`~mllm_bench.decoder.LlamaDecoder.run_layer` with ``kv_only``), whose keys
come first; its prompt cache is then put back into the spliced order every other layer's cache has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mllm_bench.architectures.llava import LLaVA, projector_cost
from mllm_bench.architectures.saisa import saisa_mask

from mllm_bench.batch import MultimodalBatch, splice_layout
from mllm_bench.config import LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.decoder import KVCache
from mllm_bench.model import ModelOutput
from mllm_bench.spec import ArchSpec, BudgetKnob
from mllm_bench.spliced import gather_rows, scatter_rows
from mllm_bench.workload import Workload

# official README, "Replaced Layers": order of replacement per checkpoint, keyed here by LLM depth
PUBLISHED_ORDER: dict[int, tuple[int, ...]] = {
    32: (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19),
    40: (39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21, 20, 17),
}
PAPER_FROZEN, PAPER_LAYERS = 19, 32


def _parse_indices(text: str) -> tuple[int, ...]:
    cleaned = text.strip().strip("[]()").replace(" ", "")
    try:
        return tuple(int(x) for x in cleaned.split(",") if x)
    except ValueError:
        return (-1,)  # refused below with the option's name


def replacement_order(num_layers: int) -> tuple[int, ...]:
    """Layers in the order ShortV freezes them: the published order for this depth, then the rest from the last down."""
    order = PUBLISHED_ORDER.get(num_layers, ())
    return order + tuple(i for i in range(num_layers - 1, -1, -1) if i not in order)


@dataclass(frozen=True)
class ShortVOptions:
    """``num_frozen``: how many layers freeze the visual tokens (None: the paper's share, 19 of 32);
    ``frozen_layers``: which ones, explicitly (overrides the order; ``num_frozen`` then must be None or its length)."""

    num_frozen: int | None = None
    frozen_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = self.num_frozen
        if isinstance(n, str):  # the CLI hands untyped fields over as text
            n = int(n) if n.strip().lstrip("-").isdigit() else n
            object.__setattr__(self, "num_frozen", n)
        require(n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 0),
                f"shortv option num_frozen must be an integer >= 0 (or None), got {n!r}")
        layers = self.frozen_layers
        if isinstance(layers, str):  # -o shortv.frozen_layers=5,6,7
            layers = _parse_indices(layers)
        if isinstance(layers, list):
            layers = tuple(layers)
        object.__setattr__(self, "frozen_layers", layers)
        require(layers is None or (isinstance(layers, tuple) and len(set(layers)) == len(layers)
                                   and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)),
                f"shortv option frozen_layers must be distinct layer indices >= 0, e.g. 5,6,7; "
                f"got {self.frozen_layers!r}")
        require(layers is None or n is None or n == len(layers),
                f"shortv options num_frozen={n} and frozen_layers={list(layers or ())} disagree; give one of them")

    def frozen(self, num_layers: int) -> frozenset[int]:
        """The frozen layers of a ``num_layers``-layer decoder, checked against it."""
        if self.frozen_layers is not None:
            require(all(i < num_layers for i in self.frozen_layers),
                    f"shortv option frozen_layers {list(self.frozen_layers)} must be layers of the "
                    f"{num_layers}-layer decoder (0..{num_layers - 1})")
            return frozenset(self.frozen_layers)
        n = round(PAPER_FROZEN * num_layers / PAPER_LAYERS) if self.num_frozen is None else self.num_frozen
        require(n <= num_layers, f"shortv option num_frozen={n} exceeds the decoder's {num_layers} layers")
        return frozenset(replacement_order(num_layers)[:n])


def shortv_cost(model: ShortV, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> MLP projector -> decoder with key/value-only visual rows in the frozen layers -> lm_head."""
    llm, stage = model.llm_config, workload.stage
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    cm.vision_tower(model.vision_config)
    g = projector_cost(cm, model.projector_input_size, llm.hidden_size, model.projector_tokens,
                       trainable=stage_trains(model, "multi_modal_projector.", stage))
    g = cm.key_value_visual_decoder([i in model.frozen_layers for i in range(llm.num_layers)],
                                    trainable=stage_trains(model, "language_model.", stage),
                                    grad_in=False, visual_grad=g)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


class ShortV(LLaVA):
    spec = ArchSpec(
        name="shortv",
        display_name="ShortV",
        description="ShortV: LLaVA-1.5, visual tokens frozen (keys/values only, passed on unchanged) in chosen layers",
        color="#8c564b",
        checkpoint_renames=(("model.multi_modal_projector.", "multi_modal_projector."),),
        # layer 0 frozen, layer 1 full on tiny-llm: both kinds and both transitions' gradient flags
        tiny_options={"frozen_layers": (0,)},
        order=35,
        budget_knob=BudgetKnob("num_frozen", "N in 0..num_layers (layers in the official replacement order)",
                               lambda model, workload: list(range(model.llm_config.num_layers, -1, -1)),
                               frozenset({"flops"}), frozenset({"flops"})),  # most frozen (cheapest) first
    )
    Options = ShortVOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        self.frozen_layers = self.options.frozen(llm.num_layers)

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return shortv_cost(self, workload, context_len)

    def _run(self, batch: MultimodalBatch, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, h) of the text tokens; fills ``cache`` (spliced key order) when given."""
        self.check_batch(batch)
        lm = self.language_model
        layout = splice_layout(batch, self.tokens_per_image)
        text = lm.embed_tokens(batch.input_ids)
        visual = self.image_features(batch.pixel_values).to(text.dtype) if batch.images_per_sample else None
        full_mask = self.sequence_mask(layout)
        rope_full = lm.rope(layout.positions, text.dtype)
        kv_mask = saisa_mask(layout, batch.text_mask())
        rope_text = lm.rope(kv_mask.q_pos, text.dtype)
        rope_keys = lm.rope(kv_mask.k_pos, text.dtype)
        to_spliced = None
        if cache is not None and visual is not None:  # kv-only key order [visual, text] -> spliced order
            nv, nt = layout.visual_index.shape[1], layout.text_index.shape[1]
            src = torch.empty_like(layout.positions)
            rows = torch.arange(nv + nt, device=src.device)
            src.scatter_(1, layout.visual_index, rows[:nv].expand_as(layout.visual_index))
            src.scatter_(1, layout.text_index, rows[nv:].expand_as(layout.text_index))
            to_spliced = src
        i, num = 0, len(lm.layers)
        while i < num:
            if i in self.frozen_layers:
                kv_only = None if visual is None else (visual, rope_keys)
                text = lm.run_layer(i, text, rope_text, kv_mask, cache, kv_only=kv_only)
                if to_spliced is not None:
                    kv = cache.layers[i]
                    idx = to_spliced[:, None, :, None].expand(-1, kv.k.shape[1], -1, kv.k.shape[3])
                    kv.k, kv.v = kv.k.gather(2, idx), kv.v.gather(2, idx)
                i += 1
                continue
            parts = [(layout.text_index, text)] + ([] if visual is None else [(layout.visual_index, visual)])
            x = scatter_rows(layout.length, parts)
            while i < num and i not in self.frozen_layers:
                x = lm.run_layer(i, x, rope_full, full_mask, cache)
                i += 1
            text = gather_rows(x, layout.text_index)
            visual = None if visual is None else gather_rows(x, layout.visual_index)
        if cache is not None:
            cache.add_prompt(full_mask)
        return lm.norm(text)

    def forward(self, batch: MultimodalBatch) -> ModelOutput:
        return self.text_output(batch, self.lm_head(self._run(batch)))

    def prefill(self, batch: MultimodalBatch) -> tuple[torch.Tensor, KVCache]:
        """Logits of the last text token and a cache with every layer's visual and text keys/values."""
        self.check_prompt(batch)
        cache = KVCache.empty(self.llm_config.num_layers, batch.batch_size, batch.input_ids.device)
        hidden = self._run(batch, cache)
        return self.lm_head(hidden[:, -1]), cache
