"""LLaVA-NeXT / LLaVA-1.6 (Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge", 2024;
AnyRes from "Improved Baselines with Visual Instruction Tuning", arXiv 2310.03744, Sec. 3.4 "Scaling to
higher resolutions").

AnyRes: each image is fitted to the best of a list of grid resolutions (``image_grid_pinpoints``,
llava-v1.6: 336x672, 672x336, 672x672, 1008x336, 336x1008, as height x width), cut into tower-sized
tiles, and a base image (the whole image at the tower's size) goes first. Base and tiles run through the
CLIP tower (layer -2, CLS dropped) and LLaVA-1.5's two-layer MLP; the tiles' features are laid out as
one feature grid, the rows or columns the padding added are cut off again (unpadding to the original
aspect ratio), and a learned ``image_newline`` embedding ends every feature row. The image's tokens in
the sequence: base (576) + unpadded grid + one newline per grid row. From there on they are ordinary
tokens, as in LLaVA-1.5.

Rules, as transformers implements them (``transformers/models/llava_next/modeling_llava_next.py``)
and the official code (haotian-liu/LLaVA ``llava/mm_utils.py``, ``llava/model/llava_arch.py``):

* best-fit resolution: ``select_best_resolution`` (``transformers/image_processing_utils.py``; LLaVA
  ``mm_utils.select_best_resolution``): most effective pixels after an aspect-preserving fit, then
  least waste; the first pinpoint wins ties.
* crops per image: ``image_size_to_num_patches`` (grid tiles + 1 base); the tiles are cut from the
  image resized and padded to the best resolution (``LlavaNextImageProcessor``), so a batch holds them
  already cut: ``pixel_values`` (B, K, P, 3, 336, 336) with each image's crops first, and ``image_sizes``
  (B, K, 2) its original (height, width).
* packing: ``LlavaNextModel.pack_image_features`` (grid view, ``permute(4, 0, 2, 1, 3)``, ``unpad_image``,
  newline per row, base first); the count ``LlavaNextProcessor._get_number_of_features``.
* feature selection: ``vision_feature_select_strategy="default"`` (CLS dropped), the only strategy the
  released checkpoints use; layer -2 as LLaVA-1.5.

Training stages, as the official ``llava/train/train.py``: ``pretrain`` (``tune_mm_mlp_adapter``) trains
the projector only, ``image_newline`` stays as initialised; ``finetune`` trains projector,
``image_newline``, the LLM and lm_head. Deviation: LLaVA-1.6's stage 2 also trains the vision tower at
a lower learning rate; as for every architecture here the tower stays frozen.

Visual tokens depend on each image's size, so a :class:`~mllm_bench.workload.Workload` without
``image_sizes`` (square images at the tower's size) gives 1,176 per image at 336 px (576 base + 24x24
unpadded + 24 newlines), not 576; a 672x672 image gives 576 + 48x48 + 48 = 2,928 (the "2,880" often
quoted omits the 48 newlines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mllm_bench.batch import MultimodalBatch
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig
from mllm_bench.costmodel import CostBreakdown, CostModel, Segment, causal_pairs, stage_trains
from mllm_bench.image_sizes import parse_sizes
from mllm_bench.projector import MLPProjector
from mllm_bench.spec import ArchSpec
from mllm_bench.spliced import SplicedMLLM
from mllm_bench.vision import encode_images
from mllm_bench.workload import Workload, check_fits_context, check_workload_fits

Size = tuple[int, int]  # (height, width) in pixels, transformers' order
# llava-v1.6's image_grid_pinpoints in tiles of the tower's size: (rows, columns)
V16_GRIDS: tuple[Size, ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


# ----- AnyRes: resolution, crops, packed token count ----------------------------------------------
def select_best_resolution(original: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint (height, width) keeping the most pixels of ``original`` after an aspect-preserving fit,
    then wasting the fewest; the first wins ties (transformers' ``select_best_resolution``)."""
    height, width = original
    best, best_effective, best_wasted = pinpoints[0], 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def unpadded_grid(original: Size, rows: int, cols: int) -> Size:
    """Feature rows and columns left of a (rows, cols) feature grid once the padding that fitted
    ``original`` into it is cut off (transformers' ``unpad_image``)."""
    height, width = original
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new_rows) // 2), cols
    new_cols = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new_cols) // 2)


def parse_pinpoints(value: object) -> tuple[Size, ...] | None:
    """``image_grid_pinpoints`` as (height, width) pairs: pairs, or a string ``"WxH,WxH,..."`` (the CLI's)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_sizes(value, ",")
        except ValueError:
            value = None
    ok = isinstance(value, tuple | list) and len(value) > 0 and all(
        isinstance(p, tuple | list) and len(p) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p) for p in value)
    if not ok:
        raise ConfigError("llava-next option image_grid_pinpoints must be (height, width) pairs of positive "
                          "integers, or 'WxH,WxH,...' (e.g. '672x336,336x672'), or None for llava-v1.6's grid")
    return tuple((int(p[0]), int(p[1])) for p in value)


@dataclass(frozen=True)
class AnyResOptions:
    """``image_grid_pinpoints``: candidate resolutions, (height, width) pixel pairs, multiples of the tower's
    image size (``-o llava-next.image_grid_pinpoints=672x336,336x672`` on the CLI, width x height); None:
    llava-v1.6's grid (1x2, 2x1, 2x2, 3x1, 1x3 tiles) at the tower's size, i.e. its published pinpoints at
    336 px."""

    image_grid_pinpoints: tuple[Size, ...] | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_grid_pinpoints", parse_pinpoints(self.image_grid_pinpoints))


class AnyResCost(CostModel):
    """The cost model with each image's own visual tokens and the crops the tower runs on."""

    def __init__(self, llm: LLMConfig, workload: Workload, tokens: list[int], crops: list[int],
                 context_len: int | None = None) -> None:
        super().__init__(llm, workload, 0, context_len)
        segs = [Segment("text", workload.text_before)]
        for i, n in enumerate(tokens):
            if i:
                segs.append(Segment("text", workload.text_between))
            segs.append(Segment("visual", n))
        segs.append(Segment("text", workload.text_after))
        self.segments = [s for s in segs if s.length]
        self.visual = sum(tokens)
        self.crops = sum(crops)

    def vision_tower(self, vision: VisionConfig, trainable: bool = False) -> bool:
        """The tower on every crop (base + tiles) of every image."""
        images, self.num_images = self.num_images, self.crops
        try:
            return super().vision_tower(vision, trainable)
        finally:
            self.num_images = images

    def crop_connector(self, vision: VisionConfig, trainable: bool) -> bool:
        """The MLP on every crop's patch features (before packing: the unpadded-away rows are projected too)."""
        rows, d_in, d = self.batch * self.crops * vision.num_patches, vision.hidden_size, self.llm.hidden_size
        for phase in self.phases:
            if phase != "decode":
                self.linear(phase, "connector", "visual", rows, d_in, d, trainable, False)
                self.linear(phase, "connector", "visual", rows, d, d, trainable, trainable)
        return trainable


def llava_next_cost(model: LLaVANeXT, workload: Workload, context_len: int | None = None) -> CostBreakdown:
    """Tower on base + tiles -> MLP on every crop -> packed tokens spliced, causal decoder -> lm_head."""
    sizes = workload.original_image_sizes(model.vision_config.image_size)
    cm = AnyResCost(model.llm_config, workload, model.visual_tokens_per_image(workload),
                    [model.num_crops(s) for s in sizes], context_len)
    stage = workload.stage
    cm.vision_tower(model.vision_config)
    g = cm.crop_connector(model.vision_config, trainable=stage_trains(model, "multi_modal_projector.", stage))
    g = cm.spliced_decoder(causal_pairs(cm.segments), trainable=stage_trains(model, "language_model.", stage),
                           grad_in=g or stage_trains(model, "image_newline", stage))
    cm.lm_head(trainable=stage_trains(model, "lm_head.", stage), grad_in=g)
    cm.cost.info["visual_tokens_per_image"] = model.visual_tokens_per_image(workload)
    return cm.result()


# the pixel value the image processor pads with (black, before normalisation), normalised, per tower kind
PAD_MEAN_STD = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def crops_of_tower_images(pixels: torch.Tensor, pinpoints: Sequence[Size], kind: str = "clip") -> torch.Tensor:
    """Crops (B, K, 1 + tiles, C, s, s) of normalised images (B, K, C, s, s) given at the tower's size s, cut as
    ``LlavaNextImageProcessor.get_image_patches`` does: the image itself as the base, then the image fitted
    into the best-fit pinpoint (aspect kept), centred on black padding, cut into s x s tiles row by row.

    A square image at the tower's size fits a pinpoint without resizing whenever one has a side s (as
    llava-v1.6's do), and then the crops are exactly the processor's; a fit that needs resizing uses
    torch's bicubic resampling (antialiased) where the processor uses PIL's, so values differ slightly.
    """
    b, k, c, s, _ = pixels.shape
    h, w = select_best_resolution((s, s), pinpoints)
    if w / s < h / s:  # transformers' get_patch_output_size
        new_h, new_w = min(math.ceil(s * w / s), h), w
    else:
        new_h, new_w = h, min(math.ceil(s * h / s), w)
    images = pixels.flatten(0, 1)
    if (new_h, new_w) != (s, s):
        images = torch.nn.functional.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True)
    mean, std = PAD_MEAN_STD.get(kind, PAD_MEAN_STD["clip"])
    black = (-torch.tensor(mean) / torch.tensor(std)).to(pixels.device, pixels.dtype).view(1, c, 1, 1)
    canvas = black.expand(b * k, c, h, w).clone()
    top, left = (h - new_h) // 2, (w - new_w) // 2
    canvas[:, :, top:top + new_h, left:left + new_w] = images
    tiles = canvas.view(b * k, c, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
    return torch.cat((pixels.flatten(0, 1).unsqueeze(1), tiles), dim=1).view(b, k, -1, c, s, s)


class LLaVANeXT(SplicedMLLM):
    spec = ArchSpec(
        name="llava-next",
        display_name="LLaVA-NeXT",
        description="LLaVA-NeXT (1.6): AnyRes base + best-fit tiles through the tower and MLP, unpadded, "
                    "a newline token per feature row, spliced into the sequence",
        color="#17becf",
        checkpoint_renames=(("model.multi_modal_projector.", "multi_modal_projector."),
                            ("model.image_newline", "image_newline")),
        order=5,
    )
    Options = AnyResOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        s = vision.image_size
        self.pinpoints: tuple[Size, ...] = self.options.image_grid_pinpoints or tuple(
            (r * s, c * s) for r, c in V16_GRIDS)
        bad = [p for p in self.pinpoints if p[0] % s or p[1] % s]
        if bad:
            raise ConfigError(f"llava-next option image_grid_pinpoints: {bad} are not multiples of the vision "
                              f"tower's image size {s} (each pinpoint is a grid of {s}x{s} tiles)")
        self.multi_modal_projector = MLPProjector(vision.hidden_size, llm.hidden_size)
        self.image_newline = nn.Parameter(nn.init.normal_(torch.empty(llm.hidden_size), std=llm.hidden_size ** -0.5))

    # ----- AnyRes token counts ---------------------------------------------------------------------
    def grid(self, size: Size) -> Size:
        """Tiles (rows, columns) of an image of original ``size`` (height, width)."""
        h, w = select_best_resolution(size, self.pinpoints)
        return h // self.vision_config.image_size, w // self.vision_config.image_size

    def num_crops(self, size: Size) -> int:
        """Crops through the tower: the grid's tiles and the base image."""
        rows, cols = self.grid(size)
        return rows * cols + 1

    def image_tokens(self, size: Size) -> int:
        """Visual tokens of one image in the sequence: base + unpadded feature grid + one newline per row."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        rows, cols = self.grid(size)
        kept_rows, kept_cols = unpadded_grid(size, rows * side, cols * side)
        return side * side + kept_rows * kept_cols + kept_rows

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens of a square image at the tower's size (a workload's default image)."""
        s = self.vision_config.image_size
        return self.image_tokens((s, s))

    def visual_tokens_per_image(self, workload: Workload) -> list[int]:
        return [self.image_tokens(s) for s in workload.original_image_sizes(self.vision_config.image_size)]

    def image_token_counts(self, batch: MultimodalBatch) -> torch.Tensor:
        """Each image's visual tokens (B, K), from ``batch.image_sizes``."""
        sizes = batch.image_sizes.tolist()
        return torch.tensor([[self.image_tokens(tuple(s)) for s in row] for row in sizes],
                            dtype=torch.long).reshape(batch.batch_size, batch.images_per_sample)

    # ----- model -------------------------------------------------------------------------------------
    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        if stage == "pretrain":
            return ("multi_modal_projector.",)
        return ("multi_modal_projector.", "image_newline", "language_model.", "lm_head.")

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return llava_next_cost(self, workload, context_len)

    def prepared(self, batch: MultimodalBatch) -> MultimodalBatch:
        return self.as_crops(batch)

    def as_crops(self, batch: MultimodalBatch) -> MultimodalBatch:
        """``batch`` with each image as its crops and size: as it is when it has ``image_sizes``; else its
        images (B, K, C, s, s) are taken at the tower's size s and cut as the image processor cuts them
        (:func:`crops_of_tower_images`)."""
        if batch.image_sizes is not None:
            return batch
        s = self.vision_config.image_size
        b, k = batch.pixel_values.shape[:2]
        pixels = crops_of_tower_images(batch.pixel_values, self.pinpoints, self.vision_config.kind)
        sizes = torch.tensor([s, s], dtype=torch.long).expand(b, k, 2).contiguous()
        return MultimodalBatch(batch.input_ids, pixels, batch.image_positions, batch.attention_mask, batch.labels,
                               sizes)

    def check_batch(self, batch: MultimodalBatch) -> None:
        if batch.image_sizes is None and batch.pixel_values.dim() == 5:
            batch.validate(self.vision_config.image_size, self.llm_config.vocab_size)
            return
        batch.validate(self.vision_config.image_size, self.llm_config.vocab_size, crops=True)
        need = max((self.num_crops(tuple(s)) for s in batch.image_sizes.flatten(0, 1).tolist()), default=1)
        if batch.pixel_values.shape[2] < need:
            raise ConfigError(f"pixel_values holds {batch.pixel_values.shape[2]} crops per image, but image_sizes "
                              f"{batch.image_sizes.tolist()} need up to {need} (tiles of the best-fit pinpoint "
                              "+ the base image)")

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tower features (N, V, vision width) of crops (N, C, H, W) (or of every crop of a (B, K, P, ...) tensor)."""
        return encode_images(self.vision_tower, self.vision_config, pixel_values.reshape(-1, *pixel_values.shape[-3:]))

    def pack(self, features: torch.Tensor, size: Size) -> torch.Tensor:
        """One image's tokens (n, h) from its projected crop features (P, side*side, h): base first, then the
        tiles as one feature grid, unpadded, a newline after each row (``pack_image_features``)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        rows, cols = self.grid(size)
        base, tiles = features[0], features[1:]
        grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        kept_rows, kept_cols = unpadded_grid(size, rows * side, cols * side)
        top, left = (rows * side - kept_rows) // 2, (cols * side - kept_cols) // 2
        grid = grid[:, top:top + kept_rows, left:left + kept_cols]
        newline = self.image_newline.to(grid.dtype)[:, None, None].expand(-1, kept_rows, 1)
        grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat((base, grid), dim=0)

    def spliced_features(self, batch: MultimodalBatch, counts: torch.Tensor) -> torch.Tensor:
        """Visual tokens (B, N, h) of each sample's images in order, N the most of any sample; a sample with
        fewer starts with zero rows (its filler slots, see :func:`~mllm_bench.batch.splice_layout`)."""
        sizes = [[tuple(s) for s in row] for row in batch.image_sizes.tolist()]
        crops = [self.num_crops(s) for row in sizes for s in row]
        pix = batch.pixel_values.flatten(0, 1)
        if all(n == pix.shape[1] for n in crops):  # no padding crops: a view of the batch's own pixels
            chosen = pix.flatten(0, 1)
        else:
            chosen = torch.cat([pix[i, :n] for i, n in enumerate(crops)])
        feats = self.multi_modal_projector(self.encode(chosen)).split(crops)
        packed = [self.pack(f, s) for f, s in zip(feats, [s for row in sizes for s in row], strict=True)]
        k, n = batch.images_per_sample, int(counts.sum(1).max())
        out = []
        for b in range(batch.batch_size):
            own = torch.cat(packed[b * k:(b + 1) * k])
            out.append(torch.cat((own.new_zeros(n - own.shape[0], own.shape[1]), own)))
        return torch.stack(out)

    @torch.no_grad()
    def generate(self, batch: MultimodalBatch, max_new_tokens: int, decode_mode: str = "dynamic") -> torch.Tensor:
        self.check_batch(batch)
        counts = self.image_token_counts(self.as_crops(batch))
        visual = int(counts.sum(1).max()) if batch.images_per_sample else 0
        check_fits_context(self.llm_config, batch.num_text + visual, max(max_new_tokens, 0),
                           "the batch's text and images")
        return super().generate(batch, max_new_tokens, decode_mode)

    def example_batch(self, workload: Workload, seed: int = 0) -> MultimodalBatch:
        """A random batch of ``workload``'s shape: each image's crops by its original size (default: square
        at the tower's size), padded to the most crops of any image."""
        s = self.vision_config.image_size
        if workload.image_size is not None and workload.image_size != s:
            raise ConfigError(f"Workload.image_size {workload.image_size} differs from the model's vision image_size "
                              f"{s}; build the model with that vision image size (image_sizes sets the images')")
        sizes = workload.original_image_sizes(s)
        check_workload_fits(workload, self.llm_config, self.visual_tokens_per_image(workload))
        device = torch.device(workload.device)
        gen = torch.Generator().manual_seed(seed)
        b, t, k = workload.batch_size, workload.num_text_tokens, workload.images_per_sample
        p = max((self.num_crops(hw) for hw in sizes), default=1)
        if device.type == "meta":
            ids = torch.zeros(b, t, dtype=torch.long, device=device)
            pixels = torch.empty(b, k, p, 3, s, s, device=device, dtype=workload.torch_dtype)
        else:
            ids = torch.randint(0, self.llm_config.vocab_size, (b, t), generator=gen).to(device)
            pixels = torch.randn(b, k, p, 3, s, s, generator=gen).to(device, workload.torch_dtype)
        positions = torch.tensor([workload.image_positions()] * b, dtype=torch.long).reshape(b, k).to(device)
        image_sizes = torch.tensor([sizes] * b, dtype=torch.long).reshape(b, k, 2)
        labels = ids.clone() if workload.is_training else None
        return MultimodalBatch(ids, pixels, positions, None, labels, image_sizes)
