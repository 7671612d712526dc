"""The model-neutral input batch, its validation and its layout once visual tokens are spliced in.

A batch holds text tokens only; images are given separately with the text index they precede. An
architecture that puts visual tokens into the sequence (LLaVA, NAAViT, SAISA) splices them in at
those indices, one that does not (Flamingo) uses the indices for its media mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, require

IGNORE_INDEX = -100


@dataclass
class MultimodalBatch:
    """``input_ids`` (B, T) text tokens; ``pixel_values`` (B, K, C, H, W); ``image_positions`` (B, K).

    ``image_positions[b, k]`` is the text index that image k of sample b comes before (T means after
    all text); positions are non-decreasing within a sample. ``attention_mask`` (B, T) is True for
    real tokens, False for padding. ``labels`` (B, T) are the token ids to predict at each position
    (``-100`` = ignored); the model shifts them itself, as transformers does.

    ``image_sizes`` (B, K, 2), optional: each image's original (height, width) in pixels, as
    transformers' ``image_sizes``, for architectures that cut an image into crops by its size; their
    ``pixel_values`` are then (B, K, P, C, H, W), the crops of each image first and unused crops last.
    It stays on the CPU (``to`` leaves it there): the token counts it sets are tensor shapes.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_positions: torch.Tensor
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_text(self) -> int:
        return self.input_ids.shape[1]

    @property
    def images_per_sample(self) -> int:
        return self.image_positions.shape[1]

    def text_mask(self) -> torch.Tensor:
        if self.attention_mask is None:
            return torch.ones_like(self.input_ids, dtype=torch.bool)
        return self.attention_mask.bool()

    def to(self, device: torch.device | str) -> MultimodalBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return MultimodalBatch(
            move(self.input_ids), move(self.pixel_values), move(self.image_positions),
            move(self.attention_mask), move(self.labels), self.image_sizes,
        )

    def validate(self, image_size: int, vocab_size: int | None = None, crops: bool = False) -> None:
        """Check shapes and ranges; errors name the field and what is allowed.

        ``crops``: the architecture takes each image as crops, ``pixel_values`` (B, K, P, C, H, W), and
        needs ``image_sizes``.
        """
        ids, pix, pos = self.input_ids, self.pixel_values, self.image_positions
        if crops:
            require(pix.dim() == 6, "pixel_values must be (batch, images, crops, channels, height, width) for an "
                                    f"architecture that cuts images into crops, got shape {tuple(pix.shape)}")
            require(pix.shape[2] > 0, f"pixel_values must hold at least one crop per image, got {tuple(pix.shape)}")
            self._validate_image_sizes()
            pix = pix[:, :, 0]  # the checks below hold for every crop alike
        require(ids.dim() == 2, f"input_ids must be (batch, text_tokens), got shape {tuple(ids.shape)}")
        require(ids.dtype == torch.long, f"input_ids must be torch.long, got {ids.dtype}")
        b, t = ids.shape
        require(t > 0, "input_ids must hold at least one text token per sample, got 0")
        require(pos.dtype == torch.long, f"image_positions must be torch.long (text indices), got {pos.dtype}")
        require(
            pos.dim() == 2 and pos.shape[0] == b,
            f"image_positions must be (batch={b}, images), got {tuple(pos.shape)}",
        )
        require(
            pix.dim() == 5,
            f"pixel_values must be (batch, images, channels, height, width), got shape {tuple(pix.shape)}",
        )
        require(
            tuple(pix.shape[:2]) == tuple(pos.shape),
            f"pixel_values holds {tuple(pix.shape[:2])} (batch, images) but image_positions gives "
            f"{tuple(pos.shape)}: every image needs exactly one position and every position one image",
        )
        require(pix.shape[2] == 3, f"pixel_values must have 3 (RGB) channels, got {pix.shape[2]}")
        require(
            tuple(pix.shape[-2:]) == (image_size, image_size),
            f"pixel_values images must be {image_size}x{image_size} for this vision tower, got {tuple(pix.shape[-2:])}",
        )
        for name, other in (("attention_mask", self.attention_mask), ("labels", self.labels)):
            require(
                other is None or tuple(other.shape) == (b, t),
                f"{name} must have the shape of input_ids {(b, t)}, "
                f"got {None if other is None else tuple(other.shape)}",
            )
        require(
            self.labels is None or self.labels.dtype == torch.long,
            f"labels must be torch.long token ids (-100 = ignored), got {getattr(self.labels, 'dtype', None)}",
        )
        if ids.device.type == "meta":
            return
        if pos.numel():
            require(
                bool((pos >= 0).all()) and bool((pos <= t).all()),
                f"image_positions must lie in [0, {t}] (text indices; {t} = after all text), got {pos.tolist()}",
            )
            require(
                bool((pos[:, 1:] >= pos[:, :-1]).all()),
                f"image_positions must be non-decreasing within each sample, got {pos.tolist()}",
            )
        if vocab_size is not None and ids.numel():
            require(
                int(ids.min()) >= 0 and int(ids.max()) < vocab_size,
                f"input_ids must lie in [0, {vocab_size}) for this vocabulary, "
                f"got [{int(ids.min())}, {int(ids.max())}]",
            )


    def _validate_image_sizes(self) -> None:
        sizes, pix = self.image_sizes, self.pixel_values
        require(sizes is not None, "image_sizes (batch, images, 2) is required: this architecture cuts each image "
                                   "into crops by its original (height, width)")
        require(sizes.dtype == torch.long and tuple(sizes.shape) == (*pix.shape[:2], 2),
                f"image_sizes must be torch.long of shape (batch, images, 2) = {(*pix.shape[:2], 2)}, "
                f"got {sizes.dtype} {tuple(sizes.shape)}")
        require(sizes.device.type == "cpu", f"image_sizes must be on the CPU (its values set shapes), "
                                            f"got {sizes.device}")
        require(not sizes.numel() or int(sizes.min()) > 0,
                f"image_sizes must be positive (height, width) pixels, got {sizes.tolist()}")


@dataclass
class SplicedLayout:
    """Where every token lands once each image's ``tokens_per_image`` visual tokens are spliced in.

    ``text_index`` (B, T) and ``visual_index`` (B, K*V) index the full sequence of length
    T + K*V; ``positions`` (B, T+K*V) are the RoPE positions (padding skipped); ``valid`` and
    ``is_visual`` (B, T+K*V) mark real and visual tokens.
    """

    text_index: torch.Tensor
    visual_index: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    is_visual: torch.Tensor

    @property
    def length(self) -> int:
        return self.positions.shape[1]


def rope_positions(valid: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, L) of a sequence whose real tokens are ``valid``: padding is skipped."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def splice_layout(batch: MultimodalBatch, tokens_per_image: int | torch.Tensor) -> SplicedLayout:
    """Compute the spliced layout (same length for every sample: T + K * tokens_per_image).

    ``tokens_per_image`` may also be a (B, K) CPU tensor of each image's own count; see
    :func:`splice_layout_by_image`.
    """
    if isinstance(tokens_per_image, torch.Tensor):
        return splice_layout_by_image(batch, tokens_per_image)
    b, t = batch.input_ids.shape
    k = batch.images_per_sample
    v = tokens_per_image
    device = batch.input_ids.device
    length = t + k * v
    text_range = torch.arange(t, device=device)
    pos = batch.image_positions.to(device)
    # images placed before text index i: those with position <= i
    images_before = (pos.unsqueeze(1) <= text_range.view(1, t, 1)).sum(-1) if k else torch.zeros(b, t, device=device)
    text_index = text_range.view(1, t) + v * images_before.long()
    image_start = pos + v * torch.arange(k, device=device).view(1, k)
    visual_index = (image_start.unsqueeze(-1) + torch.arange(v, device=device).view(1, 1, v)).reshape(b, k * v)
    is_visual = torch.zeros(b, length, dtype=torch.bool, device=device)
    valid = torch.ones(b, length, dtype=torch.bool, device=device)
    if k:
        is_visual.scatter_(1, visual_index, True)
    valid.scatter_(1, text_index, batch.text_mask())
    return SplicedLayout(text_index, visual_index, rope_positions(valid), valid, is_visual)


def splice_layout_by_image(batch: MultimodalBatch, counts: torch.Tensor) -> SplicedLayout:
    """The spliced layout when image k of sample b brings its own ``counts[b, k]`` visual tokens.

    Every sample is as long as the longest, T + max_b sum_k counts[b, k]; a sample with fewer visual
    tokens starts with filler slots (neither valid nor visual: left padding, as transformers pads the
    shorter of its expanded prompts). ``visual_index`` (B, N), N = the most visual tokens of any
    sample, lists a sample's filler slots first, then its visual tokens in order.
    """
    b, t = batch.input_ids.shape
    k = batch.images_per_sample
    require(tuple(counts.shape) == (b, k) and counts.device.type == "cpu",
            f"per-image visual-token counts must be a CPU tensor (batch={b}, images={k}), got "
            f"{tuple(counts.shape)} on {counts.device}")
    totals_host = counts.long().sum(1)
    n = int(totals_host.max()) if b and k else 0
    device = batch.input_ids.device
    c = counts.long().to(device)
    filler = (n - totals_host).to(device)  # (B,)
    text_range = torch.arange(t, device=device)
    pos = batch.image_positions.to(device)
    if k:
        before = (pos.unsqueeze(1) <= text_range.view(1, t, 1)).long()  # (B, T, K)
        text_index = filler.view(b, 1) + text_range.view(1, t) + (before * c.unsqueeze(1)).sum(-1)
    else:
        text_index = filler.view(b, 1) + text_range.view(1, t)
    cum_end = c.cumsum(1)  # (B, K)
    cum_start = cum_end - c
    image_start = filler.view(b, 1) + pos + cum_start
    slot = torch.arange(n, device=device).view(1, n)
    rank = slot - filler.view(b, 1)  # the visual token's rank within its sample, < 0 on filler slots
    is_token = rank >= 0
    if k:
        image_of = (cum_end.unsqueeze(1) <= rank.unsqueeze(-1)).sum(-1).clamp(max=k - 1)  # (B, N)
        index = image_start.gather(1, image_of) + rank - cum_start.gather(1, image_of)
        visual_index = torch.where(is_token, index, slot.expand(b, n))
    else:
        visual_index = slot.expand(b, n)
    length = t + n
    is_visual = torch.zeros(b, length, dtype=torch.bool, device=device)
    valid = torch.zeros(b, length, dtype=torch.bool, device=device)
    is_visual.scatter_(1, visual_index, is_token)
    valid.scatter_(1, visual_index, is_token)
    valid.scatter_(1, text_index, batch.text_mask())
    return SplicedLayout(text_index, visual_index, rope_positions(valid), valid, is_visual)


def check_prompt(batch: MultimodalBatch) -> None:
    """A prompt to prefill/generate from: left padding, and text after the last image.

    Generation continues from the last *text* token in every architecture (SAISA's and Flamingo's visual
    tokens have no output), so an image may not be the end of the prompt.
    """
    check_left_padded(batch)
    pos = batch.image_positions
    if pos.numel() and pos.device.type != "meta" and bool((pos >= batch.num_text).any()):
        raise ConfigError(
            f"image_positions {pos.tolist()}: a prompt must end with text; put at least one text token after the "
            f"last image (positions must be < {batch.num_text} for prefill/generate)"
        )


def check_left_padded(batch: MultimodalBatch) -> None:
    """Generation appends tokens at the end, so padding must be on the left."""
    mask = batch.text_mask()
    if mask.device.type == "meta" or bool(mask.all()):
        return
    first_real = mask.float().argmax(-1, keepdim=True)
    after_first = torch.arange(mask.shape[1], device=mask.device).view(1, -1) >= first_real
    if not bool(mask[after_first].all()):
        raise ConfigError(
            "attention_mask has padding after real tokens; prefill/generate need left padding "
            "(pad at the start of each sample)"
        )


def shifted_targets(batch: MultimodalBatch, adjacent: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for each text position: the next text label, or -100.

    ``adjacent`` (B, T-1) says whether text i+1 directly follows text i in the model's sequence; a
    target right after an image is not predicted from text (LLaVA predicts it from the last visual
    token, which not every architecture has), so we ignore it in every architecture alike.
    """
    if batch.labels is None:
        raise ConfigError("labels are required for a training forward; pass MultimodalBatch(labels=...)")
    targets = torch.full_like(batch.labels, IGNORE_INDEX)
    nxt = batch.labels[:, 1:]
    keep = batch.text_mask()
    keep = keep[:, :-1] & keep[:, 1:]  # neither the predicting token nor its target is padding
    if adjacent is not None:
        keep = keep & adjacent
    targets[:, :-1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE_INDEX))
    return targets


def text_adjacency(batch: MultimodalBatch) -> torch.Tensor:
    """(B, T-1): True where no image sits between text i and text i+1."""
    t = batch.num_text
    idx = torch.arange(1, t, device=batch.input_ids.device).view(1, t - 1, 1)
    if batch.images_per_sample == 0:
        return torch.ones(batch.batch_size, t - 1, dtype=torch.bool, device=idx.device)
    return ~(batch.image_positions.unsqueeze(1) == idx).any(-1)
