"""ShortV (Yuan et al., "ShortV: Efficient Multimodal Large Language Models by Freezing Visual Tokens in
Ineffective Layers", ICCV 2025, arXiv 2504.00502; code github.com/icip-cas/ShortV).

LLaVA-1.5 in which, in a chosen set of decoder layers, visual tokens are *frozen*: they still give keys and
values (from their current hidden state), but get no query, attention output or FFN, and their hidden
states pass to the next layer unchanged. Text tokens see them causally by position, as in LLaVA. All other
layers are LLaVA's, over the whole spliced sequence.

Official code (``llava/model/language_model/llava_llama.py``): ``LlavaLlamaModel.__init__`` reads the frozen
("replaced") layers from ``REPLACED_LAYERS`` and builds ``ShortvDecoderLayer`` there; its ``forward`` zeroes
the attention output and the FFN output of the visual rows (``hidden_states[:, 35:text_start_idx] = 0``), so
their residual stream is unchanged; ``LlavaLlamaSdpaAttention.forward`` drops the visual rows from the queries
(``apply_rotary_pos_emb(..., text_start_idx)``) and keeps them in the keys; ``LlavaLlamaModel.forward`` builds
the mask: text queries causal by position over [text before, visual, text after]. Decode steps
(``q_len == 1``) run ordinary layers; the cache holds every layer's visual keys and values.

Which layers: the paper ranks layers by a data-dependent "layer contribution" score. ``frozen_layers`` names
them; otherwise ``num_frozen`` = N (default 19, the paper's LLaVA-1.5-7B setting) takes, on a 32-layer LLM
with N <= 19, the first N of the official LLaVA-1.5-7B ranking (the README's "Replaced Layers",
:data:`LLAVA_7B_RANKING`), and on any other LLM or N the last N layers. The latter is an assumption (late
layers score lowest in the paper's figures), stated in the rows' description.

Implementation: the two streams (visual rows, text rows) are kept apart, keys in the order [visual, text]
in every layer; a full layer runs on their concatenation with LLaVA's causal mask by position (row order
does not matter to it), a frozen layer runs the text rows with the visual rows as key/value-only rows
(SAISA's :func:`saisa_mask`). Both kinds append [visual, text] keys to the KV cache, so decode is LLaVA's.

Training stages as LLaVA's: ``pretrain`` trains the projector; ``finetune`` the projector and the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mllm_bench.architectures.llava import LLaVA, projector_cost
from mllm_bench.architectures.saisa import saisa_mask

from mllm_bench.batch import MultimodalBatch, splice_layout
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.decoder import KVCache
from mllm_bench.masks import AttentionMask
from mllm_bench.model import ModelOutput
from mllm_bench.spec import ArchSpec
from mllm_bench.workload import Workload

# ShortV README, "Replaced Layers", LLaVA-1.5-7B: layers in the order of replacement (lowest LC score first)
LLAVA_7B_RANKING: tuple[int, ...] = (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19)
LLAVA_7B_LAYERS = 32
DEFAULT_NUM_FROZEN = 19


def _parse_indices(text: str) -> tuple[int, ...] | str:
    """``"3,8,13"`` or ``"[3, 8, 13]"`` as a tuple of ints (the text itself when it is not one, for the error)."""
    parts = [p.strip() for p in text.strip().strip("[]()").split(",") if p.strip()]
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else text


@dataclass(frozen=True)
class ShortVOptions:
    """``num_frozen``: how many layers freeze the visual tokens (default 19); ``frozen_layers``: which ones,
    explicitly (overrides ``num_frozen``; the CLI's ``-o shortv.frozen_layers=31,29,30``)."""

    num_frozen: int = DEFAULT_NUM_FROZEN
    frozen_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        value = self.frozen_layers
        if isinstance(value, str):
            value = _parse_indices(value)
        if isinstance(value, list):
            value = tuple(value)
        object.__setattr__(self, "frozen_layers", value)
        require(value is None or (isinstance(value, tuple) and len(set(value)) == len(value)
                                  and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)),
                f"shortv option frozen_layers must be a list of distinct layer indices >= 0 (or None), got {value!r}")
        n = self.num_frozen
        require(isinstance(n, int) and not isinstance(n, bool) and n >= 0,
                f"shortv option num_frozen must be an integer >= 0, got {n!r}")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        """The frozen layers of a ``num_layers``-layer LLM, sorted, checked against it."""
        if self.frozen_layers is not None:
            bad = [i for i in self.frozen_layers if i >= num_layers]
            if bad:
                raise ConfigError(f"shortv option frozen_layers {list(self.frozen_layers)}: {bad} are not layers "
                                  f"of the {num_layers}-layer LLM (0..{num_layers - 1})")
            return tuple(sorted(self.frozen_layers))
        n = self.num_frozen
        if n > num_layers:
            raise ConfigError(f"shortv option num_frozen={n} exceeds the LLM's {num_layers} layers")
        if num_layers == LLAVA_7B_LAYERS and n <= len(LLAVA_7B_RANKING):
            return tuple(sorted(LLAVA_7B_RANKING[:n]))
        return tuple(range(num_layers - n, num_layers))


def shortv_cost(model: ShortV, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> MLP projector -> decoder with key/value-only visual rows in the frozen layers -> lm_head."""
    llm, stage = model.llm_config, workload.stage
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    cm.vision_tower(model.vision_config)
    g = projector_cost(cm, model.projector_input_size, llm.hidden_size, model.projector_tokens,
                       trainable=stage_trains(model, "multi_modal_projector.", stage))
    frozen = set(model.frozen_layers)
    g = cm.key_value_visual_decoder([i in frozen for i in range(llm.num_layers)],
                                    trainable=stage_trains(model, "language_model.", stage), visual_grad=g)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


class ShortV(LLaVA):
    spec = ArchSpec(
        name="shortv",
        display_name="ShortV",
        description="ShortV: LLaVA-1.5 with visual tokens frozen (keys/values only, no query, no FFN) in chosen "
                    "layers; default N=19: LLaVA-1.5-7B's released layers on 32 layers, else the last N (assumed)",
        color="#bcbd22",
        tiny_options={"num_frozen": 1},
        checkpoint_renames=(("model.multi_modal_projector.", "multi_modal_projector."),),
        order=35,
    )
    Options = ShortVOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        self.frozen_layers = self.options.layers(llm.num_layers)

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return shortv_cost(self, workload, context_len)

    def _run(self, batch: MultimodalBatch, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, h) of the text tokens; fills ``cache`` when given."""
        self.check_batch(batch)
        lm = self.language_model
        layout = splice_layout(batch, self.tokens_per_image)
        text_valid = batch.text_mask()
        text = lm.embed_tokens(batch.input_ids)
        frozen_mask = saisa_mask(layout, text_valid)  # text queries over [visual, text] keys
        rope_text = lm.rope(frozen_mask.q_pos, text.dtype)
        rope_all = lm.rope(frozen_mask.k_pos, text.dtype)
        k_visual = frozen_mask.k_visual
        # every row a query, in the keys' order [visual, text]; causal by position, not by row
        full_mask = AttentionMask(frozen_mask.k_pos, frozen_mask.k_pos, frozen_mask.k_valid, frozen_mask.k_valid,
                                  k_visual, k_visual, self.mask_rule,
                                  meta_plain_causal=self.mask_rule is None and not batch.images_per_sample)
        visual = self.image_features(batch.pixel_values).to(text.dtype) if batch.images_per_sample else None
        v = 0 if visual is None else visual.shape[1]
        frozen = set(self.frozen_layers)
        for i in range(len(lm.layers)):
            if visual is not None and i in frozen:
                text = lm.run_layer(i, text, rope_text, frozen_mask, cache, kv_only=(visual, rope_all))
            else:
                x = text if visual is None else torch.cat([visual, text], 1)
                x = lm.run_layer(i, x, rope_all, full_mask, cache)
                visual, text = (None, x) if visual is None else (x[:, :v], x[:, v:])
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

