"""BLIP-2's Q-Former as a connector (Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models", arXiv 2301.12597), as transformers implements it
(``models/blip_2/modeling_blip_2.py``) and LAVIS trains it (``lavis/models/blip2_models/blip2_opt.py``).

Each image's vision features are read by ``num_queries`` (32) learned query vectors through a BERT-style
transformer; the query outputs, projected by one linear layer into the LLM's width, are spliced into the sequence
at the image position exactly as LLaVA splices its projector outputs (``splice_layout``), so inside the LLM they
are full visual tokens (Q, K, V, O, FFN in every layer, causal attention), only 32 of them per image whatever the
image's size.

Each rule as transformers has it:

* ``Blip2ForConditionalGeneration.get_image_features``: ``query_tokens`` (1, num_queries, hidden) is expanded
  over the images and passed as ``query_embeds`` with the image embeddings as ``encoder_hidden_states`` (all
  valid: an all-ones encoder mask); the query output goes through ``language_projection``
  (Linear(qformer hidden, LLM hidden), with bias).
* ``Blip2QFormerModel.forward``: ``layernorm`` on the query embeddings (the Q-Former's input LayerNorm, eps
  1e-12), then the layers; queries attend to each other bidirectionally (no mask).
* ``Blip2QFormerLayer``: post-LayerNorm BERT blocks. Self-attention (``attention.attention.{query,key,value}``,
  biased, heads of hidden/num_heads) → ``attention.output``: LayerNorm(dense(attn) + input). Layers whose index
  is a multiple of ``cross_attention_frequency`` (0, 2, 4, ... by default) then run ``crossattention``: queries
  from the query states, keys and values from the image features (``key``/``value`` are Linear(vision width,
  hidden)), the same dense + residual LayerNorm. Then the query FFN: ``intermediate_query.dense`` → GELU (exact)
  → ``output_query``: LayerNorm(dense(·) + input).

Where we differ, and why:

* Vision features: the project's vision tower at ``VisionConfig.feature_layer`` with CLS dropped (for CLIP-L/336:
  layer -2, 576 patches), the features every architecture here reads. BLIP-2 uses EVA-CLIP ViT-g/14 at 224 px
  with its last layer removed ("we remove the last layer of the ViT and use the second last layer's output", the
  paper's section 3.3), all 257 tokens (CLS included), then LAVIS's ``ln_vision`` LayerNorm (transformers:
  ``vision_model.post_layernorm``). We keep that LayerNorm (``ln_vision``, eps 1e-5 as LAVIS's ``nn.LayerNorm``)
  on the features; like LAVIS it is trained with the Q-Former (LAVIS freezes ``visual_encoder`` only).
* The Q-Former's text side (word/position embeddings, the text FFN ``intermediate``/``output``) serves BLIP-2's
  stage-1 objectives (ITC, ITM, ITG) only; transformers builds it only with ``use_qformer_text_input``, and
  ``Blip2ForConditionalGeneration`` never feeds text. Not built here.
* Dropout (0.1 on attention probabilities and hidden states in training) is omitted: it has no FLOPs, and runs
  stay deterministic. transformers keeps the Q-Former and the queries in fp32 under a bf16 LLM
  (``_keep_in_fp32_modules``); here they run in the model's dtype (same FLOPs, less time and memory).

Training stages: ``pretrain`` (BLIP-2's stage 2, vision-to-language generative pre-training) trains the queries,
``ln_vision``, the Q-Former and ``language_projection``, LLM and vision tower frozen. BLIP-2 keeps the LLM frozen
in fine-tuning too (its VQA fine-tuning trains the Q-Former and the image encoder; InstructBLIP's instruction tuning
the Q-Former only), so ``finetune`` trains what ``pretrain`` does, plus the LLM (decoder and lm_head) only with
``-o qformer.train_llm_in_finetune=true`` (as LLaVA's finetune does). The vision tower stays frozen in both.

Parameter names are transformers' (``query_tokens``, ``qformer.layernorm``,
``qformer.encoder.layer.N.attention.attention.query``, ``...crossattention...``, ``...intermediate_query.dense``,
``...output_query.LayerNorm``, ``language_projection``), so a ``Blip2ForConditionalGeneration`` state dict's
connector loads as it is (``vision_model.post_layernorm`` → ``ln_vision``); its decoder loads where it is a Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mllm_bench.config import LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.spec import ALL_BUDGETS, ArchSpec, BudgetKnob, counts_up_to
from mllm_bench.spliced import SplicedMLLM
from mllm_bench.workload import Workload

# Far above BLIP-2's settings (32 queries, 12 layers of 768 with 12 heads, FFN 3072), low enough that a typo
# cannot build a model that takes minutes to count.
OPTION_BOUNDS = {"num_queries": 4096, "num_layers": 64, "num_heads": 256, "hidden_size": 16384,
                 "intermediate_size": 65536, "cross_attention_frequency": 64}
QFORMER_EPS = 1e-12  # Blip2QFormerConfig.layer_norm_eps
LN_VISION_EPS = 1e-5  # LAVIS's ln_vision: nn.LayerNorm's default


@dataclass(frozen=True)
class QFormerOptions:
    """Q-Former settings (defaults: BLIP-2's) and whether ``finetune`` also trains the LLM."""

    num_queries: int = 32
    num_layers: int = 12
    num_heads: int = 12
    hidden_size: int = 768
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    train_llm_in_finetune: bool = False

    def __post_init__(self) -> None:
        for name, bound in OPTION_BOUNDS.items():
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= bound,
                    f"qformer option {name} must be an integer in [1, {bound}], got {value!r}")
        require(self.hidden_size % self.num_heads == 0,
                f"qformer option hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        require(self.cross_attention_frequency <= self.num_layers,
                f"qformer option cross_attention_frequency must be in [1, num_layers={self.num_layers}] "
                f"(layers 0, f, 2f, ... cross-attend), got {self.cross_attention_frequency}")
        require(isinstance(self.train_llm_in_finetune, bool),
                f"qformer option train_llm_in_finetune must be True or False, got {self.train_llm_in_finetune!r}")

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers with cross-attention to the image features."""
        return tuple(range(0, self.num_layers, self.cross_attention_frequency))


# ----- the Q-Former's blocks (transformers' Blip2QFormer* modules, query path only) ------------------------
class MultiHeadAttention(nn.Module):
    """Bidirectional attention, biased ``query``/``key``/``value``; keys and values from ``context`` (width
    ``kv_dim``) when given (cross-attention), else from the queries' own states."""

    def __init__(self, hidden: int, heads: int, kv_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, q, hidden), context (N, v, kv_dim) or None -> (N, q, hidden), heads merged."""
        context = x if context is None else context

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(*y.shape[:2], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)),
                                             split(self.value(context)))
        return out.transpose(1, 2).flatten(2)


class DenseAddNorm(nn.Module):
    """LayerNorm(dense(x) + residual): BERT's post-norm output (``Blip2QFormerSelfOutput``/``Blip2QFormerOutput``)."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=QFORMER_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerAttention(nn.Module):
    """Attention (self or cross) with its post-norm output (``Blip2QFormerAttention``)."""

    def __init__(self, hidden: int, heads: int, kv_dim: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(hidden, heads, kv_dim)
        self.output = DenseAddNorm(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, context), x)


class Intermediate(nn.Module):
    """``intermediate_query``: dense then exact GELU."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the image (if ``cross``), the query FFN."""

    def __init__(self, o: QFormerOptions, vision_dim: int, cross: bool) -> None:
        super().__init__()
        self.attention = QFormerAttention(o.hidden_size, o.num_heads, o.hidden_size)
        self.crossattention = QFormerAttention(o.hidden_size, o.num_heads, vision_dim) if cross else None
        self.intermediate_query = Intermediate(o.hidden_size, o.intermediate_size)
        self.output_query = DenseAddNorm(o.intermediate_size, o.hidden_size)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        if self.crossattention is not None:
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    def __init__(self, o: QFormerOptions, vision_dim: int) -> None:
        super().__init__()
        cross = set(o.cross_attention_layers)
        self.layer = nn.ModuleList(QFormerLayer(o, vision_dim, i in cross) for i in range(o.num_layers))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, image)
        return x


class QFormer(nn.Module):
    """``Blip2QFormerModel`` on query embeddings alone: input LayerNorm, then the layers."""

    cost_component = "connector"

    def __init__(self, o: QFormerOptions, vision_dim: int) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(o.hidden_size, eps=QFORMER_EPS)
        self.encoder = QFormerEncoder(o, vision_dim)

    def forward(self, query_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """query_embeds (N, q, hidden), image_embeds (N, v, vision width) -> query outputs (N, q, hidden)."""
        return self.encoder(self.layernorm(query_embeds), image_embeds)


# ----- analytic cost -----------------------------------------------------------------------------------------
def qformer_connector_cost(cm: CostModel, o: QFormerOptions, vision_dim: int, vision_tokens: int, trainable: bool,
                           features_grad: bool) -> bool:
    """The Q-Former on every image: ``num_queries`` rows through self-attention, cross-attention to
    ``vision_tokens`` feature rows (on the cross layers) and the FFN. ``features_grad``: the image features need
    gradients (a trained ``ln_vision``). Learned queries make every query activation need gradients when trained."""
    n_img, h, L, C = cm.batch * cm.num_images, o.hidden_size, o.num_layers, len(o.cross_attention_layers)
    if not n_img:
        return False
    q_rows, kv_rows, g = n_img * o.num_queries, n_img * vision_tokens, trainable
    for phase in cm.phases:
        if phase == "decode":
            continue
        cm.linear(phase, "connector", "media", q_rows, h, h, trainable, g, 3 * L)  # self Q, K, V
        cm.scores(phase, "connector", "media", q_rows * o.num_queries, q_rows * o.num_queries, h, h, g, g, L)
        cm.linear(phase, "connector", "media", q_rows, h, h, trainable, g, L)  # self output dense
        cm.linear(phase, "connector", "media", q_rows, h, h, trainable, g, C)  # cross Q
        cm.linear(phase, "connector", "media", kv_rows, vision_dim, h, trainable, features_grad, 2 * C)
        kv_g = trainable or features_grad
        cm.scores(phase, "connector", "media", q_rows * vision_tokens, q_rows * vision_tokens, h, h, g, kv_g, C)
        cm.linear(phase, "connector", "media", q_rows, h, h, trainable, g or kv_g, C)  # cross output dense
        cm.linear(phase, "connector", "media", q_rows, h, o.intermediate_size, trainable, g or kv_g, L)
        cm.linear(phase, "connector", "media", q_rows, o.intermediate_size, h, trainable, g or kv_g, L)
        if phase == "train_step" and (g or kv_g):
            # beyond each trained linear's input: Q/K/V, LayerNorm inputs, GELU inputs; cross K/V
            cm.add_activations(L * q_rows * (4 * h + o.intermediate_size + h) + C * (2 * q_rows * h + 2 * kv_rows * h))
    return g or features_grad


def qformer_cost(model: QFormerMLLM, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> Q-Former per image -> language_projection -> LLaVA's spliced decoder -> lm_head."""
    o, llm, vision, stage = model.options, model.llm_config, model.vision_config, workload.stage
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    cm.vision_tower(vision)
    g = qformer_connector_cost(cm, o, vision.hidden_size, vision.tokens_per_image,
                               trainable=stage_trains(model, "qformer.", stage),
                               features_grad=stage_trains(model, "ln_vision.", stage))
    projection_trained = stage_trains(model, "language_projection.", stage)
    if cm.num_images:
        for phase in cm.phases:
            if phase != "decode":
                cm.linear(phase, "connector", "visual", cm.batch * cm.visual, o.hidden_size, llm.hidden_size,
                          projection_trained, g)
    g = g or projection_trained
    g = cm.spliced_decoder(trainable=stage_trains(model, "language_model.", stage), grad_in=g)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


# ----- the model -----------------------------------------------------------------------------------------------
class QFormerMLLM(SplicedMLLM):
    spec = ArchSpec(
        name="qformer",
        display_name="BLIP-2 Q-Former",
        description="BLIP-2 Q-Former: learned queries cross-attend to the ViT features; their outputs, "
                    "projected, are spliced into the sequence (32 visual tokens per image)",
        color="#d62728",
        # the tiny presets: 16 patches of width 32, LLM width 64; two layers, cross-attention in layer 0 only
        tiny_options={"num_queries": 4, "num_layers": 2, "num_heads": 2, "hidden_size": 16, "intermediate_size": 32},
        checkpoint_renames=(("vision_model.post_layernorm.", "ln_vision."),),
        fsdp_modules=("qformer",),
        components={"language_projection": "connector", "ln_vision": "connector"},
        order=50,
        budget_knob=BudgetKnob("num_queries", f"1..{OPTION_BOUNDS['num_queries']} learned queries",
                               counts_up_to(OPTION_BOUNDS["num_queries"]),
                               ALL_BUDGETS, ALL_BUDGETS),
    )
    Options = QFormerOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        o: QFormerOptions = self.options
        self.ln_vision = nn.LayerNorm(vision.hidden_size, eps=LN_VISION_EPS)
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, o.num_queries, o.hidden_size))  # LAVIS's init
        self.qformer = QFormer(o, vision.hidden_size)
        self.language_projection = nn.Linear(o.hidden_size, llm.hidden_size)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image in the sequence: one per query, whatever the image's size."""
        return self.options.num_queries

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        connector = ("query_tokens", "ln_vision.", "qformer.", "language_projection.")
        if stage == "finetune" and self.options.train_llm_in_finetune:
            return connector + ("language_model.", "lm_head.")
        return connector

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return qformer_cost(self, workload, context_len)

    def query_outputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Q-Former outputs (B*K, num_queries, qformer hidden) of images (B, K, C, H, W)."""
        image = self.ln_vision(self.encode(pixel_values))
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        return self.qformer(queries, image)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected query outputs (B, K*num_queries, h): each image's visual tokens, images in order."""
        projected = self.language_projection(self.query_outputs(pixel_values))
        return projected.reshape(pixel_values.shape[0], -1, self.llm_config.hidden_size)
