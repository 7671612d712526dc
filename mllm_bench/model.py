"""The one interface every architecture implements, and what they share around it.

An :class:`MLLM` is an ``nn.Module`` with a vision tower, a Llama-style ``language_model`` and an
``lm_head``; how visual features reach the decoder is the subclass's business. Subclasses set
``spec`` (an :class:`~mllm_bench.spec.ArchSpec`: name, display name, colour, ...), ``Options`` (a frozen
dataclass of connector settings) and implement ``forward``, ``prefill``, ``decode``,
``trainable_prefixes`` and ``analytic_cost``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .batch import IGNORE_INDEX, MultimodalBatch, check_prompt, shifted_targets, text_adjacency
from .config import ConfigError, LLMConfig, VisionConfig
from .decoder import KVCache, LlamaDecoder
from .spec import ArchSpec
from .static_decode import DECODE_MODES, decode_steps
from .vision import build_vision_tower, encode_images
from .workload import STAGES, Workload, check_fits_context, check_workload_fits


@dataclass(frozen=True)
class NoOptions:
    """An architecture without connector settings."""


@dataclass
class ModelOutput:
    """``logits`` (B, T, V) at every text position; ``loss`` when the batch has labels."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def option_value(options_cls: type, arch: str, key: str, raw: str, what: str = "--option") -> Any:
    """The text ``raw`` of option ``arch.key`` as the type of the field's default (bool, int, float; other
    fields, e.g. lists an architecture parses itself, stay text); errors name ``what`` and the option."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    if key not in fields:
        raise ConfigError(f"{what} {arch}.{key}: {arch} has no option {key!r}; options: {sorted(fields) or 'none'}")
    kind = type(fields[key].default)
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind in (int, float):
            return kind(raw)
    except ValueError as err:
        raise ConfigError(f"{what} {arch}.{key}: {raw!r} is not a {kind.__name__}") from err
    return raw


def parse_options(options_cls: type, arch: str, given: dict[str, Any] | Any | None) -> Any:
    """Build an architecture's options dataclass, naming unknown fields and the allowed ones."""
    if given is None:
        return options_cls()
    if isinstance(given, options_cls):
        return given
    if not isinstance(given, dict):
        raise ConfigError(f"options must be a dict of {arch!r} connector settings, got {type(given).__name__}")
    allowed = sorted(f.name for f in dataclasses.fields(options_cls))
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"architecture {arch!r} has no option(s) {unknown}; allowed options: {allowed or 'none'}")
    return options_cls(**given)


class MLLM(nn.Module, ABC):
    """A multimodal LLM: images + text in, next-token logits out."""

    spec: ClassVar[ArchSpec]
    name: ClassVar[str] = ""  # spec.name, set for every subclass that declares a spec
    Options: ClassVar[type] = NoOptions
    # Cost components of modules the base builds whose class declares none (see mllm_bench/flops.py).
    base_components: ClassVar[dict[str, str]] = {"lm_head": "lm_head", "language_model.embed_tokens": "embedding"}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls.name = cls.spec.name

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: Any = None) -> None:
        super().__init__()
        self.llm_config = llm
        self.vision_config = vision
        self.options = parse_options(self.Options, self.name, options)
        self.vision_tower = self.build_vision_tower(vision)
        self.language_model = self.build_language_model(llm)
        self.lm_head = nn.Linear(llm.hidden_size, llm.vocab_size, bias=False)
        if llm.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    # ----- what each architecture provides -------------------------------------------------------
    def build_vision_tower(self, vision: VisionConfig) -> nn.Module:
        """The vision tower (a CLIP/SigLIP ViT); an architecture with a tower of its own overrides this
        (it runs after ``self.options`` is set)."""
        return build_vision_tower(vision)

    def build_language_model(self, llm: LLMConfig) -> LlamaDecoder:
        """The decoder; an architecture whose decoder has layers of its own overrides this."""
        return LlamaDecoder(llm)

    def vision_blocks(self) -> list[nn.Module]:
        """The vision tower's repeated blocks (compiled one by one)."""
        return list(self.vision_tower.encoder.layers)

    @abstractmethod
    def forward(self, batch: MultimodalBatch) -> ModelOutput:
        """Logits at every text position, and the loss when ``batch.labels`` is given."""

    @abstractmethod
    def prefill(self, batch: MultimodalBatch) -> tuple[torch.Tensor, KVCache]:
        """Process the prompt: logits (B, V) of its last token and the cache to decode from."""

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One step: tokens (B,) appended after the cache; returns logits (B, V) and the grown cache.

        The default runs the new text token through the decoder against the self-attention cache
        (LLaVA, NAAViT, SAISA); architectures with more state (Flamingo) override it.
        """
        x = self.language_model.embed_tokens(tokens.view(-1, 1))
        pos, mask = cache.step()
        hidden = self.language_model(x, pos, mask, cache)
        return self.lm_head(hidden[:, -1]), cache

    @abstractmethod
    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        """Parameter-name prefixes trained in ``stage`` (``pretrain`` or ``finetune``)."""

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> Any:
        """Closed-form FLOPs of ``workload`` (a :class:`~mllm_bench.costmodel.CostBreakdown`).

        Inference: ``prefill`` and one ``decode`` step with ``context_len`` cached tokens (default:
        the prompt); training: a ``train_step`` of ``workload.stage``.
        """
        raise NotImplementedError(f"architecture {self.name!r} has no analytic cost model")

    # ----- shared behaviour ----------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        return self.vision_config.tokens_per_image

    def visual_tokens_per_image(self, workload: Workload) -> list[int]:
        """Visual tokens of each image of a ``workload`` sample: ``tokens_per_image`` each, unless the
        architecture derives them from each image's size (``Workload.image_sizes``) and overrides this."""
        return [self.tokens_per_image] * workload.images_per_sample

    @property
    def positions_per_image(self) -> int:
        """Sequence positions (RoPE slots) one image takes in the decoder: its visual tokens, by default."""
        return self.tokens_per_image

    def set_attention_backend(self, backend: str) -> None:
        self.language_model.attention_backend = backend

    def fsdp_units(self) -> list[nn.Module]:
        """Connector blocks to shard (and compile) one by one besides the decoder layers: ``spec.fsdp_modules``,
        each ``ModuleList``/``ModuleDict`` as its children."""
        units: list[nn.Module] = []
        for attr in self.spec.fsdp_modules:
            module = getattr(self, attr)
            units.extend(module.values() if isinstance(module, nn.ModuleDict)
                         else module if isinstance(module, nn.ModuleList) else [module])
        return units

    def module_components(self) -> dict[str, str]:
        """Cost components declared by module name (the base's and ``spec.components``)."""
        return {**self.base_components, **self.spec.components}

    def extra_cache_nbytes(self, cache: KVCache) -> dict[str, int]:
        """Bytes of an architecture's own cached state in ``cache.extra``, by role (none by default)."""
        return {}

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.language_model.gradient_checkpointing = enabled

    def compile_layers(self, **compile_options: Any) -> None:
        """``torch.compile`` in place each repeated block: decoder layers, vision encoder layers and the
        architecture's connector blocks (its ``fsdp_units``: SAISA's projectors, Flamingo's resampler and
        cross-attention blocks). ``compile_options`` go to ``Module.compile``.

        Masks are prepared outside the layers (:func:`~mllm_bench.attention.prepare_mask`), so each traces
        to one graph per way it is called, and the decoder notes each layer's attention path for
        :func:`~mllm_bench.attention.record_paths` from outside the compiled code. All layers share one
        code object, and one measurement calls it several ways (prefill with and without a cache,
        training, decode with each cache type): torch's default of 8 compiled versions per code object
        would quietly leave the rest eager, so the limit is raised to at least 64.
        """
        import torch._dynamo

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the older name
        setattr(config, name, max(getattr(config, name), 64))
        for block in [*self.language_model.layers, *self.vision_blocks(), *self.fsdp_units()]:
            block.compile(**{"dynamic": None, **compile_options})
        self.language_model.compiled_layers = True

    def check_batch(self, batch: MultimodalBatch) -> None:
        batch.validate(self.vision_config.image_size, self.llm_config.vocab_size)

    def trainable_parameters(self, stage: str) -> dict[str, nn.Parameter]:
        """The parameters trained in ``stage`` by name (empty for ``inference``)."""
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        if stage == "inference":
            return {}
        prefixes = self.trainable_prefixes(stage)
        return {n: p for n, p in self.named_parameters() if n.startswith(prefixes)}

    def set_stage(self, stage: str) -> dict[str, nn.Parameter]:
        """Set ``requires_grad`` for ``stage`` (and train/eval mode); returns the trainable parameters."""
        trainable = self.trainable_parameters(stage)
        for name, param in self.named_parameters():
            if param.requires_grad != (name in trainable):
                param.requires_grad_(name in trainable)
        training = stage != "inference"
        if any(m.training != training for m in self.modules()):  # reading is cheaper than nn.Module's setattr
            self.train(training)
        return trainable

    def num_parameters(self, prefix: str = "") -> int:
        """Parameters (each shared tensor once) whose name starts with ``prefix``."""
        # names and shapes are fixed once a model is built, so the sizes are listed once
        sizes = self.__dict__.get("_parameter_sizes")
        if sizes is None:
            sizes = self.__dict__["_parameter_sizes"] = tuple((n, p.numel()) for n, p in self.named_parameters())
        return sum(k for n, k in sizes if n.startswith(prefix))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision-tower features (B*K, V, vision width) of images (B, K, C, H, W), one row block per image."""
        return encode_images(self.vision_tower, self.vision_config, pixel_values.flatten(0, 1))

    def text_output(self, batch: MultimodalBatch, logits: torch.Tensor) -> ModelOutput:
        """``logits`` at every text position, with the next-token loss when the batch has labels."""
        if batch.labels is None:
            return ModelOutput(logits)
        return ModelOutput(logits, self.loss(logits, shifted_targets(batch, text_adjacency(batch))))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over positions whose target is not ignored (0, still differentiable, if none)."""
        flat = targets.flatten()
        if flat.device.type != "meta" and not bool((flat != IGNORE_INDEX).any()):
            return logits.float().sum() * 0.0
        return F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=IGNORE_INDEX)

    def check_prompt(self, batch: MultimodalBatch) -> None:
        """Validate a prefill/generate prompt (shapes, left padding, text after the last image)."""
        self.check_batch(batch)
        check_prompt(batch)

    @torch.no_grad()
    def generate(self, batch: MultimodalBatch, max_new_tokens: int, decode_mode: str = "dynamic") -> torch.Tensor:
        """Greedy decoding with the KV cache: new tokens (B, max_new_tokens). Needs left padding.

        ``decode_mode``: ``dynamic`` (growing cache), ``static`` (preallocated cache) or ``graph`` (static
        cache + CUDA graph, CUDA only); see :mod:`mllm_bench.static_decode`. All give the same tokens.
        """
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if decode_mode not in DECODE_MODES:
            raise ConfigError(f"decode_mode must be one of {list(DECODE_MODES)}, got {decode_mode!r}")
        check_fits_context(self.llm_config, batch.num_text + batch.images_per_sample * self.positions_per_image,
                           max_new_tokens, "the batch's text and images")
        logits, cache = self.prefill(batch)
        tokens = [logits.argmax(-1)]
        if max_new_tokens > 1:
            step, _ = decode_steps(self, cache, max_new_tokens - 1, decode_mode)
            for _ in range(max_new_tokens - 1):
                tokens.append(step(tokens[-1]).argmax(-1))
        return torch.stack(tokens, dim=1)

    def example_batch(self, workload: Workload, seed: int = 0) -> MultimodalBatch:
        """A random batch of ``workload``'s shape on its device (meta allowed), labels when training."""
        check_workload_fits(workload, self.llm_config, self.positions_per_image)
        device = torch.device(workload.device)
        gen = torch.Generator().manual_seed(seed)
        b, t, k = workload.batch_size, workload.num_text_tokens, workload.images_per_sample
        size = self.vision_config.image_size
        if workload.image_size is not None and workload.image_size != size:
            raise ConfigError(
                f"Workload.image_size {workload.image_size} differs from the model's vision image_size {size}; "
                "build the model with that vision image size"
            )
        if device.type == "meta":
            ids = torch.zeros(b, t, dtype=torch.long, device=device)
            pixels = torch.empty(b, k, 3, size, size, device=device, dtype=workload.torch_dtype)
        else:
            ids = torch.randint(0, self.llm_config.vocab_size, (b, t), generator=gen).to(device)
            pixels = torch.randn(b, k, 3, size, size, generator=gen).to(device, workload.torch_dtype)
        positions = torch.tensor([workload.image_positions()] * b, dtype=torch.long).reshape(b, k).to(device)
        labels = ids.clone() if workload.is_training else None
        return MultimodalBatch(ids, pixels, positions, None, labels)
