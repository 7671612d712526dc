"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv 2412.04467; code github.com/dvlab-research/VisionZip).

LLaVA-1.5 whose vision tower hands the projector a few tokens instead of all 576 patches: *dominant* tokens, the
ones the [CLS] query attends to most in the feature layer, and *contextual* tokens, the rest merged by key
similarity. Training-free: the parameters (and checkpoints) are LLaVA-1.5's; from the projector on, everything
is LLaVA with ``dominant + contextual`` visual tokens per image.

Each rule as the official code has it (``visionzip/clip_encoder.py``, ``CLIPVisionTower_VisionZip.forward``;
``visionzip/utils.py``, ``CLIPAttention_forward``, ``CLIP_EncoderLayer_forward`` and ``apply_info``;
``visionzip/main.py``, ``visionzip``):

* The layer: ``attentions[-2]``, ``hidden_states[-2]`` and the ``metric`` of the layer with ``r > 0`` (index 22 of
  CLIP-L's 24), i.e. LLaVA-1.5's feature layer: its attention, its keys and its output. Here: the feature layer
  of the vision config (the last layer the tower runs).
* Dominant: the softmax attention of the CLS query (row 0) to every patch (CLS's own column excluded), summed
  over all heads; the top ``dominant - 1`` patches, plus the CLS token itself (``main.visionzip`` passes
  ``dominant - 1`` to ``apply_info``; the CLS index 0 is prepended to the top-k indices). They are gathered
  with a boolean mask, so they keep their sequence order: CLS first, then the chosen patches by position.
* Contextual: over the remaining tokens (in sequence order), the metric is the layer's key projection
  (``k_proj``, with bias, before scaling) averaged over heads, L2-normalised. ``contextual`` targets are
  sampled uniformly: ``step = max(1, M // contextual)``, targets ``0, step, 2·step, ...`` (first
  ``contextual``) of the M remaining. Every other remaining token is assigned to the target of highest
  cosine similarity (argmax); a contextual token is the target's hidden state **plus** the mean of the hidden
  states assigned to it (zero when none; the target is not part of the mean), computed as in the official
  code with a one-hot assignment matrix and one batched matmul.
* Output: ``[dominant (CLS + patches), contextual]`` feature-layer hidden states, then LLaVA's projector.
  ``visionzip.tokens=64|128|192`` gives the paper's LLaVA-1.5 splits 54+10, 108+20, 162+30 (README's example
  ``visionzip(model, dominant=54, contextual=10)``); ``visionzip.dominant`` and ``visionzip.contextual`` set
  them explicitly.

Where we differ: the official tower runs eager attention with ``output_attentions=True`` in every layer; ours
keeps the fused path and asks the feature layer for an attention probe of the CLS row only
(:meth:`~mllm_bench.vision.VisionTower.forward_probed`), one extra QK^T row per image (2·T·d FLOPs), counted.
The selection's matmuls (key similarity, the one-hot merge) are counted too, in the ``vision`` component:
they belong to the vision encode (``encode``), before the projector. Needs a CLS token: CLIP towers only (the
official code has no SigLIP path either). Each image is reduced on its own, so several images per sample
and padding work as in LLaVA. The tower is frozen in both training stages, so the selection has no backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from mllm_bench.architectures.llava import LLaVA, projector_cost
from torch import nn

from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown, CostModel, stage_trains
from mllm_bench.spec import COMPUTE_BUDGETS, BudgetKnob
from mllm_bench.workload import Workload

# the paper's LLaVA-1.5 settings: total visual tokens -> (dominant, contextual)
PAPER_SPLITS: dict[int, tuple[int, int]] = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class VisionZipOptions:
    """``tokens`` (64, 128 or 192: the paper's splits) or explicit ``dominant`` (CLS included) and ``contextual``;
    0 = not set (all 0: the paper's default, 64 = 54 + 10)."""

    tokens: int = 0
    dominant: int = 0
    contextual: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "dominant", "contextual"):
            value = getattr(self, name)
            require(_count(value) and value >= 0, f"visionzip option {name} must be an integer >= 1, got {value!r}")
        if not (self.dominant or self.contextual):
            require(self.tokens in PAPER_SPLITS or not self.tokens,
                    f"visionzip option tokens must be one of {sorted(PAPER_SPLITS)} (the paper's LLaVA-1.5 splits), "
                    f"got {self.tokens!r}; set visionzip.dominant and visionzip.contextual for another split")
            return
        require(self.dominant >= 1 and self.contextual >= 1,
                "visionzip options dominant and contextual go together, each an integer >= 1; "
                f"got dominant={self.dominant!r}, contextual={self.contextual!r}")
        require(not self.tokens or self.tokens == self.dominant + self.contextual,
                f"visionzip option tokens={self.tokens!r} differs from dominant + contextual = "
                f"{self.dominant} + {self.contextual}")

    @property
    def split(self) -> tuple[int, int]:
        """(dominant, contextual)."""
        if self.dominant:
            return self.dominant, self.contextual
        return PAPER_SPLITS[self.tokens or 64]


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (N, n) of x (N, T, c)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class DominantContextualSelector(nn.Module):
    """VisionZip's token selection: dominant tokens by CLS attention, the rest merged into contextual tokens."""

    cost_component = "vision"

    def __init__(self, dominant: int, contextual: int) -> None:
        super().__init__()
        self.dominant, self.contextual = dominant, contextual

    def forward(self, hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``hidden`` (N, T, D) feature-layer states, CLS at 0; ``cls_attention`` (N, heads, T) the CLS query's
        softmax row; ``keys`` (N, heads, T, head_dim). Returns (N, dominant + contextual, D)."""
        n, t, _ = hidden.shape
        top = cls_attention[..., 1:].sum(1).topk(self.dominant - 1, dim=1).indices + 1
        rest_flag = torch.ones(n, t, dtype=torch.bool, device=hidden.device).scatter(1, top, False)
        rest_flag[:, 0] = False  # CLS is kept
        # a stable sort puts the kept tokens last, each group in sequence order (the official boolean-mask gather)
        order = torch.sort(rest_flag.to(torch.int8), dim=1, descending=True, stable=True).indices
        m = t - self.dominant
        rest_index, kept_index = order[:, :m], order[:, m:]
        dominant = _rows(hidden, kept_index)
        rest = _rows(hidden, rest_index)
        metric = _rows(keys.mean(1), rest_index)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, m // self.contextual)
        target_list = list(range(0, m, step))[:self.contextual]
        other_list = sorted(set(range(m)) - set(target_list))
        targets = torch.tensor(target_list, device=hidden.device)
        others = torch.tensor(other_list, dtype=torch.long, device=hidden.device)
        similarity = metric[:, others] @ metric[:, targets].transpose(1, 2)
        assign = torch.zeros(n, others.shape[0], self.contextual, dtype=hidden.dtype, device=hidden.device)
        assign = assign.scatter(2, similarity.argmax(dim=2, keepdim=True), 1.0)
        counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
        merged = assign.transpose(1, 2) @ rest[:, others] / counts
        return torch.cat([dominant, rest[:, targets] + merged], dim=1)


def selection_cost(cm: CostModel, vision: VisionConfig, dominant: int, contextual: int) -> None:
    """The CLS attention row of the feature layer, the key similarity and the one-hot merge, per image."""
    n_img, d = cm.batch * cm.num_images, vision.hidden_size
    t = vision.num_patches + 1
    m = t - dominant
    merged = m - contextual
    flops = 2.0 * n_img * (t * d + merged * contextual * (d // vision.num_heads) + contextual * merged * d)
    for phase in cm.phases:
        if phase != "decode":
            cm.cost.add(phase, "vision", "visual", "forward", flops)


def visionzip_cost(model: VisionZip, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> selection -> MLP projector on the kept tokens -> spliced-sequence decoder -> lm_head."""
    llm, vision, stage = model.llm_config, model.vision_config, workload.stage
    cm = CostModel(llm, workload, model.tokens_per_image, context_len)
    cm.vision_tower(vision)
    selection_cost(cm, vision, *model.options.split)
    g = projector_cost(cm, vision.hidden_size, llm.hidden_size, model.projector_tokens,
                       trainable=stage_trains(model, "multi_modal_projector.", stage))
    g = cm.spliced_decoder(model.attention_pairs(cm.segments), trainable=stage_trains(model, "language_model.", stage),
                           grad_in=g)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


class VisionZip(LLaVA):
    spec = dataclasses.replace(
        LLaVA.spec,
        name="visionzip",
        display_name="VisionZip",
        description="LLaVA-1.5 + VisionZip: dominant (CLS attention) and merged contextual tokens before the projector",
        color="#e6ab02",
        tiny_options={"dominant": 4, "contextual": 3},
        order=45,
        budget_knob=BudgetKnob("tokens", "64, 128 or 192 (the paper's dominant + contextual splits)",
                               lambda model, workload: sorted(PAPER_SPLITS), COMPUTE_BUDGETS, COMPUTE_BUDGETS),
    )
    Options = VisionZipOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        dominant, contextual = self.options.split
        if not vision.has_cls_token:
            raise ConfigError(f"visionzip ranks tokens by the [CLS] attention; vision tower {vision.name!r} "
                              f"({vision.kind}) has no CLS token (use a CLIP tower)")
        if dominant - 1 + contextual > vision.num_patches:
            raise ConfigError(f"visionzip dominant={dominant} (CLS included) + contextual={contextual} exceeds the "
                              f"{vision.num_patches} patches + CLS of vision tower {vision.name!r}; "
                              f"choose dominant + contextual <= {vision.num_patches + 1}")
        self.token_selector = DominantContextualSelector(dominant, contextual)

    @property
    def projector_tokens(self) -> int:
        return sum(self.options.split)

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return visionzip_cost(self, workload, context_len)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The kept feature-layer tokens (B*K, dominant + contextual, vision width) of images (B, K, C, H, W)."""
        hidden, probe = self.vision_tower.forward_probed(pixel_values.flatten(0, 1), probe_rows=1)
        return self.token_selector(hidden, probe.weights[:, :, 0], probe.keys)
