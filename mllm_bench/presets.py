"""Built-in presets: real model sizes (sources in ../shared/REFERENCE.md) and tiny ones for tests."""

from __future__ import annotations

from .config import ConfigError, LLMConfig, RopeScaling, VisionConfig

LLM_PRESETS: dict[str, LLMConfig] = {
    # lmsys/vicuna-7b-v1.5 (the LLaVA-1.5-7B language model)
    "vicuna-7b": LLMConfig(
        name="vicuna-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
    ),
    # lmsys/vicuna-13b-v1.5
    "vicuna-13b": LLMConfig(
        name="vicuna-13b", hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
        intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096,
    ),
    # meta-llama/Meta-Llama-3-8B (grouped-query attention, 8 KV heads)
    "llama3-8b": LLMConfig(
        name="llama3-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    # meta-llama/Llama-3.1-8B: Llama-3-8B with a 128K context through llama3 RoPE scaling
    "llama3.1-8b": LLMConfig(
        name="llama3.1-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    ),
    # meta-llama/Llama-3.2-11B-Vision's text model (architecture mllama): Llama-3.1-8B widths in 40 decoder
    # slots, of which 8 ([3, 8, ..., 38]) hold gated cross-attention layers
    "llama3.2-11b-vision": LLMConfig(
        name="llama3.2-11b-vision", hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    ),
    "tiny-llm": LLMConfig(
        name="tiny-llm", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, vocab_size=256, max_position_embeddings=512,
    ),
    "tiny-llm-mha": LLMConfig(
        name="tiny-llm-mha", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4,
        intermediate_size=160, vocab_size=256, max_position_embeddings=512,
    ),
}

VISION_PRESETS: dict[str, VisionConfig] = {
    # openai/clip-vit-large-patch14-336 (LLaVA-1.5): 576 patches + CLS, features from layer -2
    "clip-vit-l-336": VisionConfig(
        name="clip-vit-l-336", kind="clip", hidden_size=1024, num_layers=24, num_heads=16,
        intermediate_size=4096, image_size=336, patch_size=14, feature_layer=-2,
        layer_norm_eps=1e-5, hidden_act="quick_gelu",
    ),
    # google/siglip-so400m-patch14-384: 729 patches, no CLS
    "siglip-so400m-384": VisionConfig(
        name="siglip-so400m-384", kind="siglip", hidden_size=1152, num_layers=27, num_heads=16,
        intermediate_size=4304, image_size=384, patch_size=14, feature_layer=-2,
        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", allow_partial_patches=True,
    ),
    # meta-llama/Llama-3.2-11B-Vision's tiled tower (architecture mllama): 560 px tiles, 32 local layers (its
    # 8 global layers and tile settings are mllama options)
    "llama3.2-11b-vision": VisionConfig(
        name="llama3.2-11b-vision", kind="clip", hidden_size=1280, num_layers=32, num_heads=16,
        intermediate_size=5120, image_size=560, patch_size=14, feature_layer=-1, layer_norm_eps=1e-5,
        hidden_act="gelu",
    ),
    "tiny-clip": VisionConfig(
        name="tiny-clip", kind="clip", hidden_size=32, num_layers=3, num_heads=4,
        intermediate_size=64, image_size=32, patch_size=8, feature_layer=-2,
    ),
    "tiny-siglip": VisionConfig(
        name="tiny-siglip", kind="siglip", hidden_size=32, num_layers=3, num_heads=4,
        intermediate_size=64, image_size=24, patch_size=8, feature_layer=-2,
        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    ),
}


def llm_preset(name: str) -> LLMConfig:
    """The LLM preset called ``name``."""
    if not isinstance(name, str) or name not in LLM_PRESETS:
        raise ConfigError(f"unknown LLM preset {name!r}; choose one of {sorted(LLM_PRESETS)}")
    return LLM_PRESETS[name]


def vision_preset(name: str) -> VisionConfig:
    """The vision-tower preset called ``name``."""
    if not isinstance(name, str) or name not in VISION_PRESETS:
        raise ConfigError(f"unknown vision preset {name!r}; choose one of {sorted(VISION_PRESETS)}")
    return VISION_PRESETS[name]


def resolve_configs(llm: str | LLMConfig, vision: str | VisionConfig) -> tuple[LLMConfig, VisionConfig]:
    """The LLM and vision configs named by presets (or given as configs)."""
    return (llm_preset(llm) if isinstance(llm, str) else llm,
            vision_preset(vision) if isinstance(vision, str) else vision)
