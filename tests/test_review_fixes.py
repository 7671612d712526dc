"""Edge cases found in review: real config files, checkpoint layouts, padding in the loss, prompts,
weights into meta models, checkpointing with a cache, and bad input that must not reach torch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from mllm_bench import ConfigError, MultimodalBatch, Workload, build_model
from mllm_bench.checkpoint import load_weights, to_mllm_bench_names
from mllm_bench.config import llm_config_from_hf, vision_config_from_hf

from .helpers import random_batch, set_gates, tiny_model

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


@pytest.mark.parametrize("layout", ["transformers5", "transformers4.52", "transformers4"])
def test_checkpoint_layouts_load(layout):
    source, target = tiny_model("llava", seed=1), tiny_model("llava", seed=2)
    state = {}
    for key, value in source.state_dict().items():
        if layout == "transformers5":
            key = key if key.startswith("lm_head") else "model." + key
        elif layout == "transformers4.52":
            key = key if key.startswith("lm_head") else "model." + key
            key = key.replace("model.vision_tower.", "model.vision_tower.vision_model.")
        else:
            key = key.replace("language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
            key = key.replace("vision_tower.", "vision_tower.vision_model.")
        state[key] = value
    assert set(to_mllm_bench_names(state)) == set(source.state_dict())
    load_weights(target, state)
    batch = random_batch(source, batch=1, text=5, positions=[[1]])
    with torch.no_grad():
        torch.testing.assert_close(target(batch).logits, source(batch).logits)


def test_weights_load_into_a_meta_model():
    source = tiny_model("llava")
    meta = build_model("llava", "tiny-llm", "tiny-clip", device="meta", dtype="float32")
    load_weights(meta, source.state_dict())
    assert all(p.device.type == "cpu" for p in meta.parameters())
    batch = random_batch(source, batch=1, text=5, positions=[[1]])
    with torch.no_grad():
        torch.testing.assert_close(meta.eval()(batch).logits, source(batch).logits)


@pytest.mark.parametrize("arch", ["llava", "saisa", "flamingo"])
def test_padding_never_enters_the_loss(arch):
    model = tiny_model(arch, **({"cross_attn_every": 1} if arch == "flamingo" else {}))
    set_gates(model, 0.5)  # Flamingo's gates: open them so the image matters (a no-op elsewhere)
    batch = random_batch(model, batch=2, text=8, positions=[[4], [4]], labels=True)
    batch.attention_mask = torch.ones(2, 8, dtype=torch.bool)
    batch.attention_mask[1, :3] = False
    first = model(batch).loss
    batch.input_ids[1, :3] = (batch.input_ids[1, :3] + 7) % model.llm_config.vocab_size  # only padding changes
    batch.labels = batch.input_ids.clone()
    assert torch.equal(model(batch).loss, first)


def test_prompts_must_end_with_text_and_be_left_padded():
    model = tiny_model("llava")
    batch = random_batch(model, batch=1, text=5, positions=[[5]])
    with pytest.raises(ConfigError, match="a prompt must end with text"):
        model.generate(batch, 2)
    right = random_batch(model, batch=1, text=6, positions=[[2]])
    right.attention_mask = torch.tensor([[True] * 4 + [False] * 2])
    for arch in ("llava", "saisa", "flamingo"):
        with pytest.raises(ConfigError, match="left padding"):
            tiny_model(arch).prefill(right)


def test_gradient_checkpointing_with_a_cache_runs():
    model = tiny_model("llava")
    model.set_stage("finetune")
    model.set_gradient_checkpointing(True)
    logits, cache = model.prefill(random_batch(model, batch=1, text=5, positions=[[1]]))
    logits.sum().backward()
    assert cache.length == 5 + model.tokens_per_image


def test_bad_input_is_named_not_a_torch_error():
    model = tiny_model("llava")
    batch = random_batch(model, batch=1, text=5, positions=[[1]], labels=True)
    cases = [
        (dict(pixel_values=batch.pixel_values[:, :, :1]), "3 \\(RGB\\) channels"),
        (dict(image_positions=batch.image_positions.float()), "image_positions must be torch.long"),
        (dict(labels=batch.labels.float()), "labels must be torch.long"),
        (dict(input_ids=batch.input_ids[:, :0], labels=None, image_positions=torch.zeros(1, 1, dtype=torch.long)),
         "at least one text token"),
    ]
    for change, message in cases:
        fields = dict(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                      image_positions=batch.image_positions, attention_mask=None, labels=batch.labels)
        fields.update(change)
        with pytest.raises(ConfigError, match=message):
            model(MultimodalBatch(**fields))
    with pytest.raises(ConfigError, match="device 'gpu'"):
        build_model("llava", "tiny-llm", "tiny-clip", device="gpu")
    with pytest.raises(ConfigError, match="options must be a dict"):
        build_model("llava", "tiny-llm", "tiny-clip", options="abc")
    with pytest.raises(ConfigError, match="llm must be a preset name"):
        build_model("llava", 7, "tiny-clip")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        Workload(batch_size=True)
    from mllm_bench.config import replace
    from mllm_bench.presets import vision_preset

    with pytest.raises(ConfigError, match="hidden_act 'relu6x' is not supported; choose one of"):
        replace(vision_preset("tiny-clip"), hidden_act="relu6x")


def test_loss_without_any_target_is_zero_not_nan():
    model = tiny_model("llava")
    model.set_stage("finetune")
    batch = random_batch(model, batch=1, text=5, positions=[[1]], labels=True)
    batch.labels = torch.full_like(batch.labels, -100)
    loss = model(batch).loss
    assert float(loss) == 0.0
    loss.backward()  # still a graph


def test_masks_are_built_once_per_forward_not_per_layer():
    from mllm_bench.masks import causal_mask

    pos = torch.arange(6).expand(2, 6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    mask = causal_mask(pos, valid)
    assert mask.dense() is mask.dense()  # every layer reuses one tensor
    assert mask.is_plain_causal() is False and "plain_causal" in mask.memo
    assert bool(mask.dense()[0, 0, 3, 4]) is False and bool(mask.dense()[0, 0, 4, 3]) is True
