"""LLaVA and its decoder equal transformers' implementations given the same weights."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from mllm_bench.checkpoint import load_weights, to_mllm_bench_names
from mllm_bench.masks import causal_mask

from .helpers import random_batch, tiny_model


def hf_llama_config(model) -> LlamaConfig:
    c = model.llm_config
    cfg = LlamaConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return cfg


def hf_llava(model) -> LlavaForConditionalGeneration:
    v = model.vision_config
    vision = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=hf_llama_config(model), image_token_index=model.llm_config.vocab_size - 1,
        vision_feature_layer=v.feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=v.tokens_per_image,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(123)
    hf = LlavaForConditionalGeneration(cfg).eval()
    # Give transformers our weights; its extra last vision layer stays random and must not matter.
    ours = {("model." + k if not k.startswith("lm_head") else k): p for k, p in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert not unexpected
    assert all(".encoder.layers.2." in k or "post_layernorm" in k for k in missing), missing
    return hf


def expanded_ids(batch, image_token: int, tokens_per_image: int) -> torch.Tensor:
    """transformers' input format: each image as ``tokens_per_image`` placeholder tokens."""
    rows = []
    for b in range(batch.batch_size):
        row: list[int] = []
        ids = batch.input_ids[b].tolist()
        positions = batch.image_positions[b].tolist()
        for i in range(len(ids) + 1):
            row += [image_token] * tokens_per_image * positions.count(i)
            if i < len(ids):
                row.append(ids[i])
        rows.append(row)
    return torch.tensor(rows)


def test_llava_logits_match_transformers():
    model = tiny_model("llava")
    hf = hf_llava(model)
    vocab = model.llm_config.vocab_size
    batch = random_batch(model, batch=2, text=9, positions=[[2], [5]], vocab_limit=vocab - 1)
    ours = model(batch).logits
    ids = expanded_ids(batch, vocab - 1, model.tokens_per_image)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=batch.pixel_values.flatten(0, 1)).logits
    text_rows = ids != vocab - 1
    torch.testing.assert_close(ours.reshape(-1, vocab), theirs[text_rows], atol=1e-5, rtol=1e-5)


def test_llava_two_images_match_transformers():
    model = tiny_model("llava")
    hf = hf_llava(model)
    vocab = model.llm_config.vocab_size
    batch = random_batch(model, batch=1, text=8, positions=[[1, 4]], vocab_limit=vocab - 1)
    ours = model(batch).logits
    ids = expanded_ids(batch, vocab - 1, model.tokens_per_image)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=batch.pixel_values.flatten(0, 1)).logits
    torch.testing.assert_close(ours.reshape(-1, vocab), theirs[ids != vocab - 1], atol=1e-5, rtol=1e-5)


def test_decoder_matches_llama_for_causal_lm():
    model = tiny_model("llava")
    torch.manual_seed(5)
    hf = LlamaForCausalLM(hf_llama_config(model)).eval()
    # transformers' weights into ours, through the checkpoint renaming a real user would use
    state = {k: v for k, v in hf.state_dict().items()}
    renamed = to_mllm_bench_names(state)
    assert "language_model.layers.0.self_attn.q_proj.weight" in renamed and "lm_head.weight" in renamed
    missing = load_weights(model, state, strict=False)
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in missing)
    ids = torch.randint(0, model.llm_config.vocab_size, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        x = model.language_model.embed_tokens(ids)
        ours = model.lm_head(model.language_model(x, positions, causal_mask(positions)))
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
