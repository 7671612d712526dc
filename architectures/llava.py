"""LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", arXiv 2310.03744).

CLIP ViT-L/14-336 features from the second-to-last layer, CLS dropped, go through a two-layer MLP
(``mlp2x_gelu``) into the LLM's embedding space and are spliced into the input sequence where the
image sits. From there on visual tokens are ordinary tokens: queries, keys, values, attention output
and FFN in every layer, attending causally to everything before them.

Training stages: ``pretrain`` trains the projector; ``finetune`` the projector and the LLM (the
vision tower stays frozen in both).

Connector options (:class:`LLaVAOptions`, default 1 = LLaVA-1.5 unchanged), both on the square patch grid:

* ``pixel_shuffle=s``: space-to-depth before the projector, as Idefics3 and InternVL do. Each s×s block of
  patches becomes one token whose features are the block's s² feature vectors concatenated, row by row
  (transformers' ``Idefics3Connector.pixel_shuffle`` order: channel ``(dh·s + dw)·D + d``); tokens ÷ s², and
  the projector's input width becomes vision_dim·s².
* ``pool=k``: k×k average pooling (``avg_pool2d``, kernel k, stride k) of the *projected* grid, as LLaVA-Video
  pools video frames after the projector (LLaVA-NeXT ``llava_arch.py``, ``get_2dPool`` with
  ``mm_spatial_pool_mode="average"``). transformers' ``LlavaOnevisionModel.apply_pooling`` interpolates
  bilinearly to ⌈g/2⌉ instead, which on an even grid is exactly 2×2 average pooling (tested); for k > 2 the
  two differ and we pool. Pooling is no matrix product, so it adds no FLOPs; the projector still runs on
  every (shuffled) patch.

Shuffle runs first, then pooling; the grid must divide by s and then by k, else a ConfigError names the
option and the grid. ``tokens_per_image`` (the batch layout, RoPE positions and the cost model read it) is
patches / (s·k)².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown, CostModel, Segment, causal_pairs, stage_trains
from mllm_bench.projector import MLPProjector
from mllm_bench.spec import COMPUTE_BUDGETS, ArchSpec, BudgetKnob
from mllm_bench.spliced import SplicedMLLM
from mllm_bench.workload import Workload

# far above any published setting (2 or 3), low enough that a typo is refused rather than built
MAX_REDUCTION = 64


@dataclass(frozen=True)
class LLaVAOptions:
    """LLaVA connector settings: ``pixel_shuffle`` (s×s space-to-depth before the projector) and ``pool``
    (k×k average pooling after it); 1 leaves LLaVA-1.5 unchanged."""

    pool: int = 1
    pixel_shuffle: int = 1

    def __post_init__(self) -> None:
        for name in ("pool", "pixel_shuffle"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_REDUCTION,
                    f"llava option {name} must be an integer in [1, {MAX_REDUCTION}], got {value!r}")


def square_grid(tokens: int, what: str) -> int:
    """Side of the square patch grid of ``tokens`` tokens; a ConfigError naming ``what`` otherwise."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConfigError(f"{what} needs a square patch grid, got {tokens} tokens per image")
    return side


def check_grid_divides(side: int, factor: int, option: str, grid: str = "patch grid") -> int:
    """The grid side after an ``option``=factor reduction; a ConfigError when ``factor`` does not divide it."""
    if side % factor:
        raise ConfigError(f"{option}={factor} does not divide the {side}x{side} {grid}; "
                          f"choose a divisor of {side}")
    return side // factor


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Space-to-depth (N, g*g, D) -> (N, (g/s)^2, D*s^2): token (i, j) holds the s×s block's vectors row by row,
    channel (dh*s + dw)*D + d, in Idefics3's order."""
    if scale == 1:
        return x
    n, t, d = x.shape
    g = math.isqrt(t)
    x = x.view(n, g // scale, scale, g // scale, scale, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, t // scale ** 2, d * scale ** 2)


def pool_grid(x: torch.Tensor, k: int) -> torch.Tensor:
    """k×k average pooling, stride k, of a square token grid (N, g*g, h) -> (N, (g/k)^2, h), row-major."""
    if k == 1:
        return x
    n, t, h = x.shape
    g = math.isqrt(t)
    grid = x.view(n, g, g, h).permute(0, 3, 1, 2)
    return F.avg_pool2d(grid, k, k).permute(0, 2, 3, 1).reshape(n, t // k ** 2, h)


def projector_cost(cm: CostModel, d_in: int, d_out: int, tokens_per_image: int, trainable: bool) -> bool:
    """LLaVA's two-layer MLP on ``tokens_per_image`` rows per image (before any pooling)."""
    rows = cm.batch * cm.num_images * tokens_per_image
    for phase in cm.phases:
        if phase == "decode":
            continue
        cm.linear(phase, "connector", "visual", rows, d_in, d_out, trainable)
        cm.linear(phase, "connector", "visual", rows, d_out, d_out, trainable, trainable)
    return trainable


def llava_cost(model: LLaVA, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Vision tower -> MLP projector -> spliced-sequence decoder (``model``'s mask) -> lm_head on the text."""
    cm, stage = CostModel(model.llm_config, workload, model.tokens_per_image, context_len), workload.stage
    cm.vision_tower(model.vision_config)
    g = projector_cost(cm, model.projector_input_size, model.llm_config.hidden_size, model.projector_tokens,
                       trainable=stage_trains(model, "multi_modal_projector.", stage))
    g = cm.spliced_decoder(model.attention_pairs(cm.segments), trainable=stage_trains(model, "language_model.", stage),
                           grad_in=g)
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    return cm.result()


def pool_factors(model: LLaVA, workload: Workload) -> list[int]:
    """Pooling factors k dividing the projected grid's side, largest first (fewest tokens first): the
    ``pool`` settings ``compare --equal`` searches."""
    side = math.isqrt(model.projector_tokens)
    if side * side != model.projector_tokens:
        return [1]
    return [k for k in range(min(side, MAX_REDUCTION), 0, -1) if side % k == 0]


class LLaVA(SplicedMLLM):
    spec = ArchSpec(
        name="llava",
        display_name="LLaVA-1.5",
        description="LLaVA-1.5: MLP projector, visual tokens spliced into the input sequence",
        color="#1f77b4",
        checkpoint_renames=(("model.multi_modal_projector.", "multi_modal_projector."),),
        order=0,
        budget_knob=BudgetKnob("pool", "k dividing the projected grid's side (k×k average pooling after the projector)",
                               pool_factors, COMPUTE_BUDGETS, COMPUTE_BUDGETS),
    )
    Options = LLaVAOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        shuffle, pool = self.pixel_shuffle_factor, self.pool_factor
        if shuffle > 1 or pool > 1:
            side = square_grid(vision.tokens_per_image, f"{self.name} options pixel_shuffle/pool")
            side = check_grid_divides(side, shuffle, f"{self.name}.pixel_shuffle")
            check_grid_divides(side, pool, f"{self.name}.pool",
                               "grid left by pixel_shuffle" if shuffle > 1 else "patch grid")
        self.multi_modal_projector = MLPProjector(self.projector_input_size, llm.hidden_size)

    # a subclass whose Options lack pixel_shuffle / pool gets neither
    @property
    def pixel_shuffle_factor(self) -> int:
        return getattr(self.options, "pixel_shuffle", 1)

    @property
    def pool_factor(self) -> int:
        return getattr(self.options, "pool", 1)

    @property
    def projector_input_size(self) -> int:
        """Width of a projector input row: vision_dim, times s² after pixel shuffle."""
        return self.vision_config.hidden_size * self.pixel_shuffle_factor ** 2

    @property
    def projector_tokens(self) -> int:
        """Rows per image the projector runs on (after pixel shuffle, before pooling)."""
        return self.vision_config.tokens_per_image // self.pixel_shuffle_factor ** 2

    @property
    def tokens_per_image(self) -> int:
        return self.projector_tokens // self.pool_factor ** 2

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        if stage == "pretrain":
            return ("multi_modal_projector.",)
        return ("multi_modal_projector.", "language_model.", "lm_head.")

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return llava_cost(self, workload, context_len)

    def attention_pairs(self, segments: list[Segment]) -> dict[str, int]:
        """Allowed query-key pairs of one sample per query role under :meth:`sequence_mask` (plain causal)."""
        return causal_pairs(segments)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens (B, K*V, h) of images (B, K, C, H, W): shuffle, project, pool."""
        features = pixel_shuffle(self.encode(pixel_values), self.pixel_shuffle_factor)
        projected = pool_grid(self.multi_modal_projector(features), self.pool_factor)
        return projected.reshape(pixel_values.shape[0], -1, self.llm_config.hidden_size)
