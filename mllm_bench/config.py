"""Validated configurations of the language model and the vision tower.

Both are frozen dataclasses: they are checked once, on construction, and every error names the field
and what is allowed. Presets live in :mod:`mllm_bench.presets`; real configs load from a local
Hugging Face ``config.json`` with :func:`llm_config_from_hf` and :func:`vision_config_from_hf`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration, preset, workload or batch that cannot be used, with the reason."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)  # bool is an int subclass: refused explicitly
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}",
        )


def replace(config: Any, **changes: Any) -> Any:
    """A copy of a config dataclass with some fields changed (validated again)."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - fields)
    require(not unknown, f"{type(config).__name__} has no field(s) {unknown}; fields are {sorted(fields)}")
    return dataclasses.replace(config, **changes)


ROPE_SCALING_TYPES: tuple[str, ...] = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for longer contexts.

    ``linear``: every frequency divided by ``factor`` (positions interpolated). ``llama3`` (Llama-3.1/3.2):
    wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` kept, longer than
    ``original_max_position_embeddings / low_freq_factor`` divided by ``factor``, and those between blended
    linearly in ``original_max_position_embeddings / wavelength``.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        require(self.rope_type in ROPE_SCALING_TYPES,
                f"RopeScaling.rope_type must be one of {list(ROPE_SCALING_TYPES)}, got {self.rope_type!r}")
        require(self.factor >= 1, f"RopeScaling.factor must be >= 1, got {self.factor}")
        if self.rope_type == "llama3":
            require(0 < self.low_freq_factor < self.high_freq_factor,
                    f"RopeScaling needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor} and "
                    f"{self.high_freq_factor}")
            require(self.original_max_position_embeddings > 0, "RopeScaling.original_max_position_embeddings must "
                    f"be > 0, got {self.original_max_position_embeddings}")


@dataclass(frozen=True)
class LLMConfig:
    """A Llama-style decoder (Vicuna, Llama-2/3): RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        _positive(
            self, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings",
        )
        require(
            self.hidden_size % self.num_heads == 0,
            f"LLMConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})",
        )
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"LLMConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})",
        )
        require(self.head_dim % 2 == 0, f"LLMConfig head_dim ({self.head_dim}) must be even for RoPE")
        require(self.rms_norm_eps > 0, f"LLMConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        require(self.rope_theta > 0, f"LLMConfig.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


VisionKind = Literal["clip", "siglip"]
# transformers' names of the activations CLIP/SigLIP towers use (implemented in mllm_bench.vision)
VISION_ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower (transformers' CLIP or SigLIP vision model), run up to ``feature_layer``.

    ``feature_layer`` counts like Python indices over the encoder layers: -2 (LLaVA-1.5's choice)
    means the output of the second-to-last layer, so the last layer is never built or run.
    """

    name: str
    kind: VisionKind
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    feature_layer: int = -2
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # SigLIP-so400m-384 really uses 384 px with 14 px patches: the stride-14 convolution drops the
    # last 6 pixel rows and columns. Only a preset that is built that way sets this.
    allow_partial_patches: bool = False

    def __post_init__(self) -> None:
        require(self.kind in ("clip", "siglip"), f"VisionConfig.kind must be 'clip' or 'siglip', got {self.kind!r}")
        require(
            self.hidden_act in VISION_ACTIVATIONS,
            f"VisionConfig.hidden_act {self.hidden_act!r} is not supported; choose one of {list(VISION_ACTIVATIONS)}",
        )
        _positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size", "patch_size")
        require(
            self.hidden_size % self.num_heads == 0,
            f"VisionConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})",
        )
        require(
            self.image_size % self.patch_size == 0
            or (self.allow_partial_patches and self.image_size >= self.patch_size),
            f"VisionConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})",
        )
        require(
            -self.num_layers <= self.feature_layer < self.num_layers and self.feature_layer != 0,
            f"VisionConfig.feature_layer must be in [-{self.num_layers}, -1] or [1, {self.num_layers - 1}] "
            f"(a layer of the {self.num_layers}-layer encoder), got {self.feature_layer}",
        )

    @property
    def has_cls_token(self) -> bool:
        return self.kind == "clip"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one image gives the connector (patches; CLIP's CLS token is dropped)."""
        return self.num_patches

    @property
    def layers_run(self) -> int:
        """Encoder layers actually built and run to reach ``feature_layer``."""
        return self.feature_layer if self.feature_layer > 0 else self.num_layers + 1 + self.feature_layer


def _read_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    require(p.is_file(), f"config path {str(path)!r} is not a config.json file or a folder holding one")
    with p.open() as f:
        return json.load(f)


def _hf_config(cls: Any, raw: dict[str, Any], path: str | Path) -> Any:
    """transformers' own config class over ``raw``, so fields a file leaves out get transformers' defaults
    (llava-hf configs list only what differs from Llama's)."""
    fields = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
    try:
        return cls(**fields)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{path}: transformers cannot read this {cls.__name__}: {err}") from err


def _rope_scaling(raw: dict[str, Any], path: str | Path) -> RopeScaling | None:
    """RoPE scaling as the file declares it: transformers 4 ``rope_scaling`` or 5 ``rope_parameters``."""
    declared = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = declared.get("rope_type") or declared.get("type") or "default"
    if rope_type == "default":
        return None
    require(rope_type in ROPE_SCALING_TYPES,
            f"{path}: RoPE type {rope_type!r} is not supported; supported: 'default', "
            + ", ".join(repr(t) for t in ROPE_SCALING_TYPES))
    require("factor" in declared, f"{path}: RoPE type {rope_type!r} needs a 'factor'")
    extra = {}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            require(key in declared, f"{path}: RoPE type 'llama3' needs {key!r}")
            extra[key] = declared[key]
    return RopeScaling(rope_type, float(declared["factor"]), **extra)


def _rope_theta(raw: dict[str, Any], hf: Any) -> float:
    """RoPE theta: top level (transformers 4) or in ``rope_parameters`` (5), else transformers' default."""
    params = raw.get("rope_parameters") or getattr(hf, "rope_parameters", None) or {}
    return float(raw.get("rope_theta") or params.get("rope_theta") or getattr(hf, "rope_theta", None) or 10000.0)


def llm_config_from_hf(path: str | Path, name: str | None = None) -> LLMConfig:
    """An :class:`LLMConfig` from a local Llama/Vicuna/LLaVA ``config.json`` (never downloads)."""
    from transformers import LlamaConfig

    raw = _read_json(path)
    if "text_config" in raw:  # a LLaVA config: take its language model
        raw = raw["text_config"]
    rope_scaling = _rope_scaling(raw, path)  # before transformers reads the file: a clear refusal first
    hf = _hf_config(LlamaConfig, raw, path)
    heads = hf.num_attention_heads
    head_dim = raw.get("head_dim")
    require(
        head_dim in (None, hf.hidden_size // heads),
        f"{path}: head_dim {head_dim} differs from hidden_size / num_attention_heads; not supported",
    )
    require(not getattr(hf, "attention_bias", False), f"{path}: attention_bias=true is not supported (Llama has none)")
    act = getattr(hf, "hidden_act", "silu")
    require(act == "silu", f"{path}: hidden_act must be 'silu' (SwiGLU), got {act!r}")
    return LLMConfig(
        name=name or raw.get("_name_or_path") or Path(path).stem,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=hf.num_key_value_heads or heads,
        intermediate_size=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=_rope_theta(raw, hf),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
    )


def vision_config_from_hf(path: str | Path, name: str | None = None, feature_layer: int = -2) -> VisionConfig:
    """A :class:`VisionConfig` from a local CLIP/SigLIP (vision or full) or LLaVA ``config.json``."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    raw = _read_json(path)
    if "vision_feature_layer" in raw:
        feature_layer = raw["vision_feature_layer"]
    strategy = raw.get("vision_feature_select_strategy", "default")
    require(
        strategy == "default",
        f"{path}: vision_feature_select_strategy {strategy!r} is not supported; only 'default' (CLS dropped)",
    )
    require(isinstance(feature_layer, int), f"{path}: vision_feature_layer must be one integer, got {feature_layer!r}")
    if "vision_config" in raw:
        raw = raw["vision_config"]
    kind: VisionKind = "siglip" if "siglip" in raw.get("model_type", "") else "clip"
    hf = _hf_config(CLIPVisionConfig if kind == "clip" else SiglipVisionConfig, raw, path)
    return VisionConfig(
        name=name or raw.get("_name_or_path") or Path(path).stem,
        kind=kind,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        feature_layer=feature_layer,
        allow_partial_patches=hf.image_size % hf.patch_size != 0,
        layer_norm_eps=hf.layer_norm_eps,
        hidden_act=hf.hidden_act,
    )
