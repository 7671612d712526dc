"""What a measurement runs: batch shape, images, text lengths, generation length, dtype, device, stage.

Sequence layout of one sample (``images_per_sample`` = k)::

    [text_before] [image 1] [text_between] [image 2] ... [image k] [text_after]

Text tokens in all = text_before + (k - 1) * text_between + text_after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .choices import PAPER_WORKLOAD_FIELDS
from .choices import STAGES as STAGES  # re-exported
from .config import ConfigError, LLMConfig, replace, require

Stage = Literal["inference", "pretrain", "finetune"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``bf16``, ``bfloat16``, ``fp32``, ...) or one of those dtypes itself."""
    if isinstance(name, torch.dtype):
        require(name in DTYPES.values(), f"dtype {name} is not supported; models run in one of "
                                         f"{sorted({dtype_name(d) for d in DTYPES.values()})}")
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Workload:
    """One measured scenario. ``image_size`` None means the vision preset's own size.

    ``image_sizes``: each image's original (height, width) in pixels, as transformers' ``image_sizes``:
    one pair for every image, or one per image of a sample (the same in every sample); None means square
    images at the vision tower's size. An architecture that cuts images into crops by their size
    (AnyRes) takes its crops and visual tokens from it; one that resizes every image to the tower's size
    (LLaVA-1.5) is unaffected.
    """

    batch_size: int = 1
    images_per_sample: int = 1
    image_size: int | None = None
    image_sizes: tuple[tuple[int, int], ...] | None = None
    text_before: int = 32
    text_after: int = 32
    text_between: int = 0
    generate_tokens: int = 0
    dtype: str = "bfloat16"
    device: str = "meta"
    stage: Stage = "inference"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size",):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"Workload.{name} must be a positive integer, got {value!r}")
        for name in ("images_per_sample", "text_before", "text_after", "text_between", "generate_tokens"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"Workload.{name} must be an integer >= 0, got {value!r}")
        require(
            self.image_size is None or (isinstance(self.image_size, int) and self.image_size > 0),
            f"Workload.image_size must be a positive integer or None, got {self.image_size!r}",
        )
        if self.image_sizes is not None:
            object.__setattr__(self, "image_sizes", _image_sizes(self.image_sizes, self.images_per_sample))
        require(
            self.num_text_tokens > 0,
            "Workload must have at least one text token (text_before + text_between + text_after > 0)",
        )
        require(self.stage in STAGES, f"Workload.stage must be one of {list(STAGES)}, got {self.stage!r}")
        try:
            parse_dtype(self.dtype)
        except ConfigError as err:
            raise ConfigError(f"Workload.dtype: {err}") from None
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"Workload.device {self.device!r} is not a torch device (e.g. meta, cpu, cuda)") from err

    @property
    def num_text_tokens(self) -> int:
        between = max(self.images_per_sample - 1, 0) * self.text_between
        return self.text_before + between + self.text_after

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def is_training(self) -> bool:
        return self.stage != "inference"

    def original_image_sizes(self, tower_size: int) -> list[tuple[int, int]]:
        """Each image's original (height, width) in a sample; square ``tower_size`` images when unset."""
        sizes = self.image_sizes or ((tower_size, tower_size),)
        return list(sizes) * self.images_per_sample if len(sizes) == 1 else list(sizes)

    def image_positions(self) -> list[int]:
        """Text index before which each image sits (see the module docstring's layout)."""
        return [self.text_before + i * self.text_between for i in range(self.images_per_sample)]

    def replace(self, **changes: object) -> Workload:
        return replace(self, **changes)


def _image_sizes(value: object, images: int) -> tuple[tuple[int, int], ...]:
    """``Workload.image_sizes`` as a tuple of (height, width) pairs, checked."""
    if isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        value = (value,)  # one (height, width) pair for every image
    pairs = tuple(tuple(p) for p in value) if isinstance(value, tuple | list) and all(
        isinstance(p, tuple | list) for p in value) else None
    require(pairs is not None and len(pairs) > 0 and all(
        len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p) for p in pairs),
        f"Workload.image_sizes must be (height, width) pairs of positive integers, got {value!r}")
    require(len(pairs) in (1, images),
            f"Workload.image_sizes gives {len(pairs)} sizes; give one (for every image) or one per image "
            f"(images_per_sample={images})")
    return pairs


def check_fits_context(llm: LLMConfig, prompt: int, new_tokens: int = 0, detail: str = "",
                       shorten: str = "fewer text tokens or images") -> None:
    """Refuse a sequence longer than ``llm.max_position_embeddings``: a prompt of ``prompt`` positions, then
    ``new_tokens`` generated ones (the cache ends holding prompt + new tokens). ``detail`` says what the
    prompt is made of, ``shorten`` how to make it shorter."""
    limit = llm.max_position_embeddings
    what = f"{prompt} positions" + (f" ({detail})" if detail else "")
    if prompt > limit:
        raise ConfigError(f"the prompt takes {what}, more than {llm.name}'s max_position_embeddings {limit}; "
                          f"use {shorten}")
    if prompt + new_tokens > limit:
        raise ConfigError(f"generating {new_tokens} tokens after a prompt of {what} needs {prompt + new_tokens} "
                          f"positions, more than {llm.name}'s max_position_embeddings {limit}; at most "
                          f"{limit - prompt} new tokens fit")


def check_workload_fits(workload: Workload, llm: LLMConfig, positions_per_image: int | Sequence[int]) -> None:
    """Refuse ``workload`` when its sequence does not fit ``llm``'s context.

    ``positions_per_image``: sequence positions one image takes (its visual tokens where they are spliced
    into the sequence; 0 where images reach the decoder by cross-attention only), or a list with each
    image's own. At inference the ``generate_tokens`` count too.
    """
    if isinstance(positions_per_image, int):
        visual = workload.images_per_sample * positions_per_image
        each = f"{workload.images_per_sample} image(s) x {positions_per_image}"
    else:
        visual = sum(positions_per_image)
        each = f"images of {' + '.join(str(n) for n in positions_per_image)}"
    detail = f"{workload.num_text_tokens} text" + (f" + {each} visual tokens" if visual else "")
    shorten = "fewer text tokens (text_before/text_between/text_after)" + (" or fewer images" if visual else "")
    check_fits_context(llm, workload.num_text_tokens + visual,
                       workload.generate_tokens if workload.stage == "inference" else 0, detail, shorten)


# The SAISA paper's FLOPs convention (arXiv 2502.02458; ShortV arXiv 2504.00502): one 336 px image
# (576 visual tokens) and 64 text tokens. The split of the 64 around the image is our assumption:
# it does not change dense-attention FLOPs, only the mask-aware (effective) ones.
PAPER_WORKLOAD = Workload(**PAPER_WORKLOAD_FIELDS)
