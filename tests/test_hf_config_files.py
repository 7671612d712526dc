"""Real config files: a LLaVA config.json that lists only what differs from transformers' defaults, and a
config saved by transformers (RoPE theta and scaling)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from mllm_bench import ConfigError
from mllm_bench.config import llm_config_from_hf, vision_config_from_hf

# llava-hf/llava-1.5-7b-hf's config.json lists only what differs from transformers' defaults
LLAVA_HF_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
}


def test_partial_llava_hf_config_takes_transformers_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_HF_CONFIG))
    llm, vision = llm_config_from_hf(tmp_path), vision_config_from_hf(tmp_path)
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.intermediate_size) == (4096, 32, 32, 11008)
    assert llm.vocab_size == 32064 and llm.rope_theta == 10000.0 and llm.name == "lmsys/vicuna-7b-v1.5"
    assert (vision.tokens_per_image, vision.layers_run, vision.hidden_act) == (576, 23, "quick_gelu")
    full = dict(LLAVA_HF_CONFIG, vision_feature_select_strategy="full")
    (tmp_path / "config.json").write_text(json.dumps(full))
    with pytest.raises(ConfigError, match="vision_feature_select_strategy 'full'"):
        vision_config_from_hf(tmp_path)


def test_rope_theta_of_a_transformers_saved_config(tmp_path):
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, rope_theta=500000.0).save_pretrained(tmp_path)
    cfg = llm_config_from_hf(tmp_path)
    assert cfg.rope_theta == 500000.0 and cfg.num_kv_heads == 2
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}
    raw.pop("rope_scaling", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="RoPE type 'llama3' needs 'low_freq_factor'"):  # incomplete
        llm_config_from_hf(tmp_path)
    raw["rope_parameters"].update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = llm_config_from_hf(tmp_path)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
