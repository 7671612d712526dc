"""Validated configurations of the language model and the vision tower.

Both are frozen dataclasses: they are checked once, on construction, and every error names the field
and what is allowed. Presets live in :mod:`mllm_bench.presets`; real configs load from a local
Hugging Face ``config.json`` with :func:`llm_config_from_hf` and :func:`vision_config_from_hf`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
            f"{type(obj).__name__}.{name} must be a finite number > 0, got {value!r}",
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
        _finite_positive(self, "factor")
        require(self.factor >= 1, f"RopeScaling.factor must be >= 1, got {self.factor}")
        if self.rope_type == "llama3":
            _finite_positive(self, "low_freq_factor", "high_freq_factor")
            _positive(self, "original_max_position_embeddings")
            require(0 < self.low_freq_factor < self.high_freq_factor,
                    f"RopeScaling needs 0 < low_freq_factor < high_freq_factor, got {self.low_freq_factor} and "
                    f"{self.high_freq_factor}")


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
    # defaults applied when the config was read from a file (one line each); not part of equality
    notes: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        require(isinstance(self.name, str), f"LLMConfig.name must be a string, got {self.name!r}")
        _positive(
            self, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings",
        )
        _finite_positive(self, "rms_norm_eps", "rope_theta")
        require(isinstance(self.tie_word_embeddings, bool),
                f"LLMConfig.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
                f"LLMConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        require(
            self.hidden_size % self.num_heads == 0,
            f"LLMConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})",
        )
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"LLMConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})",
        )
        require(self.head_dim % 2 == 0, f"LLMConfig head_dim ({self.head_dim}) must be even for RoPE")

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
    # defaults applied when the config was read from a file (one line each); not part of equality
    notes: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        require(isinstance(self.name, str), f"VisionConfig.name must be a string, got {self.name!r}")
        require(self.kind in ("clip", "siglip"), f"VisionConfig.kind must be 'clip' or 'siglip', got {self.kind!r}")
        require(
            self.hidden_act in VISION_ACTIVATIONS,
            f"VisionConfig.hidden_act {self.hidden_act!r} is not supported; choose one of {list(VISION_ACTIVATIONS)}",
        )
        _positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size", "patch_size")
        _finite_positive(self, "layer_norm_eps")
        require(isinstance(self.allow_partial_patches, bool),
                f"VisionConfig.allow_partial_patches must be true or false, got {self.allow_partial_patches!r}")
        require(_is_int(self.feature_layer),
                f"VisionConfig.feature_layer must be an integer layer index, got {self.feature_layer!r}")
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


# Fields a stand-alone config.json must give: transformers always writes them, and its defaults for them
# describe one particular model (LlamaConfig's are a 7B Llama with a 2048 context, CLIPVisionConfig's a
# ViT-B/32 at 224 px), never "unknown". Inside a composite file (LLaVA's text_config and vision_config,
# CLIP's or SigLIP's vision_config) transformers 4 wrote only what differs from the sub-config class's
# defaults (llava-hf/llava-1.5-7b-hf's text_config has no hidden_size), so there every field is optional.
# Every default applied, anywhere, is one line of the result's ``notes``.
LLM_REQUIRED: tuple[str, ...] = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
    "max_position_embeddings",
)
VISION_REQUIRED: tuple[str, ...] = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
    "patch_size",
)
_UPSTREAM = object()  # "take transformers' default"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    for kind, name in ((bool, "boolean"), (int | float, "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    return f"{value!r} (a JSON {_json_type(value)})"


def _read_json(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The JSON object in ``path`` (a config.json or a folder holding one) and the file it came from."""
    require(isinstance(path, str | Path), f"config path must be a str or Path, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    require(p.is_file(), f"config path {str(path)!r} is not a config.json file or a folder holding one")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a JSON text file (byte {err.start} is not UTF-8); "
                          "expected a Hugging Face config.json") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot be read: {err.strerror or err}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
                          "expected a Hugging Face config.json") from None
    require(isinstance(raw, dict), f"{p}: expected a JSON object {{...}} (a Hugging Face config.json), "
                                   f"got a JSON {_json_type(raw)}")
    return raw, p


def _section(raw: dict[str, Any], key: str, file: Path) -> dict[str, Any]:
    value = raw[key]
    require(isinstance(value, dict), f"{file}: {key} must be a JSON object {{...}}, got {_show(value)}")
    return value


class _Fields:
    """One section of a config.json, read with its types checked.

    A missing (or null) field is an error when it is in ``required``; otherwise it takes a default
    (transformers' own unless given) and a line saying so goes to ``notes``.
    """

    def __init__(self, raw: dict[str, Any], file: Path, section: str, upstream: Any, required: tuple[str, ...],
                 what: str) -> None:
        self.raw, self.file, self.section, self.upstream, self.required, self.what = (
            raw, file, section, upstream, required, what)
        self.notes: list[str] = []
        self._defaults: Any = None

    def check_required(self) -> None:
        """One error naming every required field the file lacks (or sets to null)."""
        missing = [key for key in self.required if self.raw.get(key) is None]
        require(not missing, f"{self.file}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing; "
                             f"a stand-alone {self.what} config.json must give {', '.join(self.required)}")

    def name(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def where(self, key: str) -> str:
        return f"{self.file}: {self.name(key)}"

    def upstream_default(self, key: str) -> Any:
        if self._defaults is None:
            self._defaults = self.upstream()
        if key == "rope_theta" and not hasattr(self._defaults, key):  # transformers 5 nests it
            return (getattr(self._defaults, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return getattr(self._defaults, key)

    def get(self, key: str, default: Any = _UPSTREAM, origin: str = "", note: bool = True) -> Any:
        """The file's value of ``key``, or the default (noted) when the field is optional."""
        value = self.raw.get(key)
        if value is not None:
            return value
        if key in self.required:
            state = "null" if key in self.raw else "missing"
            raise ConfigError(f"{self.where(key)} is {state}; a stand-alone {self.what} config.json must give "
                              f"{', '.join(self.required)}")
        if default is _UPSTREAM:
            default = self.upstream_default(key)
            origin = origin or f"transformers' {self.upstream.__name__} default"
        if note:
            self.notes.append(f"{self.name(key)} = {default!r}: not in {self.file.name}, {origin}")
        return default

    def positive_int(self, key: str, default: Any = _UPSTREAM, origin: str = "") -> int:
        value = self.get(key, default, origin)
        require(_is_int(value) and value > 0, f"{self.where(key)} must be a positive integer, got {_show(value)}")
        return value

    def square_size(self, key: str) -> int:
        """An image or patch size: one integer, or transformers 5's [height, width] with both equal."""
        value = self.get(key)
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        require(_is_int(value) and value > 0,
                f"{self.where(key)} must be a positive integer (square images and patches), got {_show(value)}")
        return value

    def positive_number(self, key: str, default: Any = _UPSTREAM, origin: str = "") -> float:
        value = self.get(key, default, origin)
        require(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
                f"{self.where(key)} must be a finite number > 0, got {_show(value)}")
        return float(value)

    def boolean(self, key: str, default: Any = _UPSTREAM, origin: str = "", note: bool = True) -> bool:
        value = self.get(key, default, origin, note)
        require(isinstance(value, bool), f"{self.where(key)} must be true or false, got {_show(value)}")
        return value

    def string(self, key: str, default: Any = _UPSTREAM, origin: str = "") -> str:
        value = self.get(key, default, origin)
        require(isinstance(value, str), f"{self.where(key)} must be a string, got {_show(value)}")
        return value

    def display_name(self, name: str | None, path: str | Path) -> str:
        given = self.raw.get("_name_or_path")
        if name or (isinstance(given, str) and given):
            return name or given
        return Path(path).stem or self.file.parent.resolve().name


def _rope_scaling(fields: _Fields) -> RopeScaling | None:
    """RoPE scaling as the file declares it: transformers 4 ``rope_scaling`` or 5 ``rope_parameters``."""
    raw = fields.raw
    key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    declared = raw.get(key)
    if declared is None:
        return None
    where = fields.where(key)
    require(isinstance(declared, dict), f"{where} must be a JSON object or null, got {_show(declared)}")
    rope_type = declared.get("rope_type") or declared.get("type") or "default"
    require(isinstance(rope_type, str), f"{where}.rope_type must be a string, got {_show(rope_type)}")
    if rope_type == "default":
        return None
    require(rope_type in ROPE_SCALING_TYPES,
            f"{fields.file}: RoPE type {rope_type!r} is not supported; supported: 'default', "
            + ", ".join(repr(t) for t in ROPE_SCALING_TYPES))
    require("factor" in declared, f"{fields.file}: RoPE type {rope_type!r} needs a 'factor'")
    extra = {}
    if rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            require(name in declared, f"{fields.file}: RoPE type 'llama3' needs {name!r}")
            extra[name] = declared[name]
    for name, value in (("factor", declared["factor"]), *extra.items()):
        require(isinstance(value, int | float) and not isinstance(value, bool),
                f"{where}.{name} must be a number, got {_show(value)}")
    try:
        return RopeScaling(rope_type, float(declared["factor"]), **extra)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _rope_theta(fields: _Fields) -> float:
    """RoPE theta: top level (transformers 4) or in ``rope_parameters`` (5), else transformers' default."""
    params = fields.raw.get("rope_parameters")
    if fields.raw.get("rope_theta") is None and isinstance(params, dict) and params.get("rope_theta") is not None:
        nested = _Fields(params, fields.file, fields.name("rope_parameters"), fields.upstream, (), fields.what)
        return nested.positive_number("rope_theta")
    return fields.positive_number("rope_theta")


def _built(cls: Any, file: Path, **values: Any) -> Any:
    """``cls(**values)``, its validation errors naming the file they came from."""
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None


def _composite_without(top: dict[str, Any], section: str, file: Path) -> None:
    """Refuse a LLaVA/CLIP/SigLIP file that lacks the sub-config we need (transformers would invent one)."""
    model_type = top.get("model_type")
    require(model_type not in ("llava", "clip", "siglip"),
            f"{file}: a {model_type!r} config without {section}; give the {section} (mllm-bench does not assume "
            "transformers' default one)")


def llm_config_from_hf(path: str | Path, name: str | None = None) -> LLMConfig:
    """An :class:`LLMConfig` from a local Llama/Vicuna/LLaVA ``config.json`` (never downloads).

    Fields in :data:`LLM_REQUIRED` must be in a stand-alone file; every default applied is in ``notes``.
    """
    from transformers import LlamaConfig

    top, file = _read_json(path)
    if "text_config" in top:  # a LLaVA config: take its language model
        fields = _Fields(_section(top, "text_config", file), file, "text_config", LlamaConfig, (), "Llama")
    else:
        _composite_without(top, "text_config", file)
        fields = _Fields(top, file, "", LlamaConfig, LLM_REQUIRED, "Llama")
    rope_scaling = _rope_scaling(fields)  # first: an unsupported RoPE type is the clearest refusal
    fields.check_required()
    hidden = fields.positive_int("hidden_size")
    layers = fields.positive_int("num_hidden_layers")
    heads = fields.positive_int("num_attention_heads")
    kv_heads = fields.positive_int("num_key_value_heads", heads, "num_attention_heads (as transformers reads it)")
    intermediate = fields.positive_int("intermediate_size")
    vocab = fields.positive_int("vocab_size")
    context = fields.positive_int("max_position_embeddings")
    eps = fields.positive_number("rms_norm_eps")
    theta = _rope_theta(fields)
    if fields.raw.get("tie_word_embeddings") is None and isinstance(top.get("tie_word_embeddings"), bool):
        tied = top["tie_word_embeddings"]  # a LLaVA file may say it at the top level
    else:
        tied = fields.boolean("tie_word_embeddings")
    act = fields.string("hidden_act")
    require(act == "silu", f"{fields.where('hidden_act')} must be 'silu' (SwiGLU), got {act!r}")
    for bias in ("attention_bias", "mlp_bias"):
        require(not fields.boolean(bias, False, note=False),
                f"{fields.where(bias)}=true is not supported (Llama has no biases)")
    config = _built(
        LLMConfig, file,
        name=fields.display_name(name, path), hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=context,
        rms_norm_eps=eps, rope_theta=theta, tie_word_embeddings=tied, rope_scaling=rope_scaling,
        notes=tuple(fields.notes),
    )
    head_dim = fields.raw.get("head_dim")
    require(head_dim is None or (_is_int(head_dim) and head_dim == config.head_dim),
            f"{fields.where('head_dim')} is {_show(head_dim)}; only hidden_size / num_attention_heads "
            f"({config.head_dim}) is supported")
    return config


def vision_config_from_hf(path: str | Path, name: str | None = None, feature_layer: int = -2) -> VisionConfig:
    """A :class:`VisionConfig` from a local CLIP/SigLIP (vision or full) or LLaVA ``config.json``.

    Fields in :data:`VISION_REQUIRED` must be in a stand-alone file; every default applied is in ``notes``.
    """
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    top, file = _read_json(path)
    if "vision_feature_layer" in top:
        feature_layer = top["vision_feature_layer"]
    require(_is_int(feature_layer), f"{file}: vision_feature_layer must be one integer, got {_show(feature_layer)}")
    strategy = top.get("vision_feature_select_strategy", "default")
    require(
        strategy == "default",
        f"{file}: vision_feature_select_strategy {strategy!r} is not supported; only 'default' (CLS dropped)",
    )
    parent = top.get("model_type")
    if "vision_config" in top:
        raw, section, required = _section(top, "vision_config", file), "vision_config", ()
    else:
        _composite_without(top, "vision_config", file)
        raw, section, required = top, "", VISION_REQUIRED
    probe = _Fields(raw, file, section, CLIPVisionConfig, required, "CLIP/SigLIP vision")
    probe.check_required()
    siglip_parent = isinstance(parent, str) and "siglip" in parent
    model_type = probe.string("model_type", "siglip_vision_model" if siglip_parent else "clip_vision_model",
                              f"as transformers reads a {parent!r} file's vision_config")
    require("clip" in model_type or "siglip" in model_type,
            f"{probe.where('model_type')} {model_type!r} is not a vision tower mllm-bench builds; allowed: "
            "clip_vision_model, siglip_vision_model (or a clip, siglip or llava config holding one)")
    kind: VisionKind = "siglip" if "siglip" in model_type else "clip"
    fields = _Fields(raw, file, section, CLIPVisionConfig if kind == "clip" else SiglipVisionConfig, required,
                     "CLIP/SigLIP vision")
    fields.notes = probe.notes
    if section and "vision_feature_layer" not in top:
        fields.notes.append(f"vision_feature_layer = {feature_layer}: not in {file.name}, the feature_layer argument")
    hidden = fields.positive_int("hidden_size")
    layers = fields.positive_int("num_hidden_layers")
    heads = fields.positive_int("num_attention_heads")
    intermediate = fields.positive_int("intermediate_size")
    image, patch = fields.square_size("image_size"), fields.square_size("patch_size")
    partial = image % patch != 0
    if partial and image > patch:
        fields.notes.append(f"image_size {image} is not a multiple of patch_size {patch}: the patch convolution "
                            f"drops the last {image % patch} pixel rows and columns, as transformers' does")
    return _built(
        VisionConfig, file,
        name=fields.display_name(name, path), kind=kind, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=intermediate, image_size=image, patch_size=patch, feature_layer=feature_layer,
        allow_partial_patches=partial, layer_norm_eps=fields.positive_number("layer_norm_eps"),
        hidden_act=fields.string("hidden_act"), notes=tuple(fields.notes),
    )
