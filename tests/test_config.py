"""Configs, presets, workloads and batches: validation and clear errors for bad input."""

from __future__ import annotations

import json
import resource
import time

import pytest
import torch

from mllm_bench import ConfigError, LLMConfig, Workload, build_model, get_architecture
from mllm_bench.config import llm_config_from_hf, replace, vision_config_from_hf
from mllm_bench.presets import llm_preset, vision_preset

from .helpers import random_batch, tiny_model


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown architecture 'lava'.*'llava'.*'saisa'"):
        get_architecture("lava")


def test_unknown_presets_name_the_choices():
    with pytest.raises(ConfigError, match=r"unknown LLM preset 'vicuna-8b'.*vicuna-7b"):
        llm_preset("vicuna-8b")
    with pytest.raises(ConfigError, match=r"unknown vision preset 'clip'.*clip-vit-l-336"):
        vision_preset("clip")
    with pytest.raises(ConfigError, match="unknown LLM preset"):
        build_model("llava", llm="nope")


def test_heads_must_divide_hidden():
    with pytest.raises(ConfigError, match=r"num_heads \(5\) must divide hidden_size \(64\)"):
        replace(llm_preset("tiny-llm"), num_heads=5)
    with pytest.raises(ConfigError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        replace(llm_preset("tiny-llm"), num_kv_heads=3)
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer"):
        LLMConfig("x", hidden_size=0, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=4, vocab_size=4)


def test_image_size_must_be_multiple_of_patch():
    with pytest.raises(ConfigError, match=r"image_size \(30\) must be a multiple of patch_size \(8\)"):
        replace(vision_preset("tiny-clip"), image_size=30)
    with pytest.raises(ConfigError, match="feature_layer"):
        replace(vision_preset("tiny-clip"), feature_layer=5)
    with pytest.raises(ConfigError, match="kind must be 'clip' or 'siglip'"):
        replace(vision_preset("tiny-clip"), kind="vit")
    # the real SigLIP-so400m-384 drops the last partial patch: 27 x 27 = 729 tokens
    assert vision_preset("siglip-so400m-384").tokens_per_image == 729
    with pytest.raises(ConfigError, match="no field"):
        replace(vision_preset("tiny-clip"), image_sizes=64)


def test_presets_match_reference_sizes():
    v7, v13, l3 = llm_preset("vicuna-7b"), llm_preset("vicuna-13b"), llm_preset("llama3-8b")
    assert (v7.hidden_size, v7.num_layers, v7.num_heads, v7.intermediate_size) == (4096, 32, 32, 11008)
    assert v7.vocab_size == 32000
    assert (v13.hidden_size, v13.num_layers, v13.num_heads, v13.intermediate_size) == (5120, 40, 40, 13824)
    assert (l3.num_kv_heads, l3.intermediate_size, l3.vocab_size, l3.rope_theta) == (8, 14336, 128256, 500000.0)
    clip = vision_preset("clip-vit-l-336")
    assert (clip.tokens_per_image, clip.layers_run, clip.hidden_size) == (576, 23, 1024)


def test_workload_validation():
    with pytest.raises(ConfigError, match="Workload.batch_size must be a positive integer"):
        Workload(batch_size=0)
    with pytest.raises(ConfigError, match=r"Workload.stage must be one of \['inference', 'pretrain', 'finetune'\]"):
        Workload(stage="train")
    with pytest.raises(ConfigError, match="unknown dtype 'f32'"):
        Workload(dtype="f32")
    with pytest.raises(ConfigError, match="at least one text token"):
        Workload(text_before=0, text_after=0)
    w = Workload(images_per_sample=3, text_before=5, text_between=2, text_after=7)
    assert w.num_text_tokens == 16 and w.image_positions() == [5, 7, 9]


def test_unknown_architecture_option_is_named():
    with pytest.raises(ConfigError, match=r"architecture 'llava' has no option\(s\) \['latents'\]"):
        build_model("llava", "tiny-llm", "tiny-clip", options={"latents": 4})


def test_image_count_must_match_positions():
    model = tiny_model("llava")
    batch = random_batch(model, batch=2, text=8, positions=[[2], [3]])
    batch.image_positions = torch.tensor([[2, 4], [3, 5]])
    with pytest.raises(ConfigError, match=r"pixel_values holds \(2, 1\).*image_positions gives \(2, 2\)"):
        model(batch)
    batch.image_positions = torch.tensor([[2], [9]])
    with pytest.raises(ConfigError, match=r"image_positions must lie in \[0, 8\]"):
        model(batch)
    batch.image_positions = torch.tensor([[2], [3]])
    batch.pixel_values = batch.pixel_values[..., :16, :16]
    with pytest.raises(ConfigError, match="pixel_values images must be 32x32"):
        model(batch)


def test_configs_load_from_local_hf_json(tmp_path):
    llava_cfg = {
        "model_type": "llava", "vision_feature_layer": -2,
        "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                        "vocab_size": 32064, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "intermediate_size": 4096, "image_size": 336,
                          "patch_size": 14},
    }
    (tmp_path / "config.json").write_text(json.dumps(llava_cfg))
    llm = llm_config_from_hf(tmp_path, name="llava-1.5-7b-hf")
    vision = vision_config_from_hf(tmp_path)
    assert llm.vocab_size == 32064 and llm.num_kv_heads == 32 and llm.name == "llava-1.5-7b-hf"
    assert vision.tokens_per_image == 576 and vision.layers_run == 23 and vision.kind == "clip"
    with pytest.raises(ConfigError, match="is not a config.json"):
        llm_config_from_hf(tmp_path / "missing")
    scaled = dict(llava_cfg["text_config"], rope_scaling={"rope_type": "dynamic", "factor": 8.0})
    (tmp_path / "scaled.json").write_text(json.dumps(scaled))
    with pytest.raises(ConfigError, match="RoPE type 'dynamic' is not supported; supported: 'default', 'linear'"):
        llm_config_from_hf(tmp_path / "scaled.json")


def test_full_size_presets_build_on_meta_fast_without_memory():
    build_model("llava", "tiny-llm", "tiny-clip")  # warm imports
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    llava = build_model("llava", "vicuna-7b", "clip-vit-l-336")
    saisa = build_model("saisa", "vicuna-7b", "clip-vit-l-336")
    flamingo = build_model("flamingo", "vicuna-7b", "clip-vit-l-336")
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert elapsed < 3.0, f"building three 7B models on meta took {elapsed:.2f}s"
    assert grown_mib < 200, f"building on meta grew RSS by {grown_mib:.0f} MiB"
    for model in (llava, saisa, flamingo):
        assert all(p.device.type == "meta" for p in model.parameters())
    assert llava.num_parameters("multi_modal_projector") == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # ~21M
    assert 6.9e9 < llava.num_parameters() < 7.2e9
