"""BLIP-2 Q-Former connector: equal to transformers' Blip2QFormerModel and Blip2ForConditionalGeneration given the
same weights, to a naive per-sample splice, cached decoding, gradients per stage, its FLOPs by hand, its options."""

from __future__ import annotations

import pytest
import torch
from mllm_bench.architectures.qformer import QFormerMLLM, QFormerOptions
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    LlamaForCausalLM,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mllm_bench import ConfigError, MultimodalBatch, Workload, build_model
from mllm_bench.checkpoint import load_weights
from mllm_bench.flops import count_prefill
from mllm_bench.memory import saved_activation_bytes
from mllm_bench.registry import architecture_names, register, unregister
from mllm_bench.vision import encode_images

from .helpers import assert_gradients_reach_exactly, random_batch, tiny_model
from .test_llava_faithful import expanded_ids, hf_llama_config

# three layers, cross-attention in layers 0 and 2 (frequency 2): both kinds of layer and a layer after the last
# cross-attention one
OPTS = {"num_queries": 4, "num_layers": 3, "num_heads": 2, "hidden_size": 16, "intermediate_size": 24}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register the architecture while these tests run, unless the installed entry point already has."""
    if "qformer" in architecture_names():
        yield
        return
    register(QFormerMLLM)
    yield
    unregister("qformer")


def model_with(seed: int = 0, **options) -> QFormerMLLM:
    return tiny_model("qformer", seed=seed, **{**OPTS, **options})


def hf_qformer_config(o: QFormerOptions, vision_dim: int) -> Blip2QFormerConfig:
    cfg = Blip2QFormerConfig(
        hidden_size=o.hidden_size, num_hidden_layers=o.num_layers, num_attention_heads=o.num_heads,
        intermediate_size=o.intermediate_size, cross_attention_frequency=o.cross_attention_frequency,
        encoder_hidden_size=vision_dim, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    return cfg


def test_qformer_equals_transformers():
    model = model_with()
    o = model.options
    hf = Blip2QFormerModel(hf_qformer_config(o, model.vision_config.hidden_size)).eval()
    hf.load_state_dict(model.qformer.state_dict(), strict=True)  # same names, same shapes, nothing left over
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(3, 16, model.vision_config.hidden_size, generator=gen)
    queries = torch.randn(3, o.num_queries, o.hidden_size, generator=gen)
    with torch.no_grad():
        theirs = hf(query_embeds=queries, encoder_hidden_states=image,
                    encoder_attention_mask=torch.ones(3, 16, dtype=torch.long)).last_hidden_state
        ours = model.qformer(queries, image)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert [layer.crossattention is not None for layer in model.qformer.encoder.layer] == [True, False, True]


class TowerFeatures(nn.Module):
    """Stands in for Blip2's EVA vision model: our tower's features, then Blip2's own ``post_layernorm``."""

    def __init__(self, model: QFormerMLLM, post_layernorm: nn.LayerNorm) -> None:
        super().__init__()
        self.model, self.post_layernorm = model, post_layernorm

    def forward(self, pixel_values: torch.Tensor, **_: object) -> BaseModelOutputWithPooling:
        hidden = self.post_layernorm(encode_images(self.model.vision_tower, self.model.vision_config, pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=hidden[:, 0])


def hf_blip2(model: QFormerMLLM) -> Blip2ForConditionalGeneration:
    """A tiny Blip2ForConditionalGeneration (Llama text model) with random, perturbed weights of its own."""
    o, v = model.options, model.vision_config
    vision = Blip2VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=1,
                               num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                               layer_norm_eps=1e-5)
    cfg = Blip2Config(vision_config=vision, qformer_config=hf_qformer_config(o, v.hidden_size),
                      text_config=hf_llama_config(model), num_query_tokens=o.num_queries,
                      image_token_index=model.llm_config.vocab_size - 1)
    cfg._attn_implementation = "eager"
    for sub in (cfg.text_config, cfg.qformer_config, cfg.vision_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(7)
    hf = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def test_whole_model_equals_transformers_blip2_two_images_left_padding():
    """Our model loaded from a Blip2ForConditionalGeneration state dict (its names) gives its logits at every text
    position, its vision model replaced by our tower (+ its post_layernorm): two images per sample, left padding."""
    model = model_with()
    hf = hf_blip2(model)
    state = {k: p for k, p in hf.state_dict().items()
             if not k.startswith("vision_model.") or k.startswith("vision_model.post_layernorm.")}
    state.update({k: p for k, p in model.state_dict().items() if k.startswith("vision_tower.")})
    load_weights(model, state, strict=True)
    hf.vision_model = TowerFeatures(model, hf.vision_model.post_layernorm)
    vocab = model.llm_config.vocab_size
    batch = random_batch(model, batch=2, text=9, positions=[[2, 5], [4, 9]], pad=[0, 2], vocab_limit=vocab - 1)
    ids = expanded_ids(batch, vocab - 1, model.tokens_per_image)
    mask = ids != -1
    mask[1, :2] = False  # sample 1's first two tokens (before its first image) are padding
    with torch.no_grad():
        ours = model(batch).logits
        theirs = hf(pixel_values=batch.pixel_values.flatten(0, 1), input_ids=ids, attention_mask=mask.long()).logits
    text = ids != vocab - 1
    real = batch.text_mask()
    torch.testing.assert_close(ours[real], theirs[text].view(2, 9, vocab)[real], atol=1e-5, rtol=1e-5)


def test_whole_model_equals_naive_splice():
    """Each sample alone, padding dropped: text embeddings with each image's projected Q-Former outputs inserted
    before the text token at its position, through LlamaForCausalLM loaded with our decoder."""
    model = model_with()
    llama = LlamaForCausalLM(hf_llama_config(model)).eval()
    ours_state = {("model." + k[len("language_model."):] if k.startswith("language_model.") else k): p
                  for k, p in model.state_dict().items() if k.startswith(("language_model.", "lm_head."))}
    llama.load_state_dict(ours_state, strict=True)
    batch = random_batch(model, batch=2, text=8, positions=[[1, 4], [3, 8]], pad=[0, 3], labels=True)
    with torch.no_grad():
        out = model(batch)
        for b in range(2):
            real = batch.text_mask()[b]
            ids, keep = batch.input_ids[b], real.nonzero().flatten()
            rows, text_rows = [], []
            for i in range(ids.shape[0] + 1):
                for k, p in enumerate(batch.image_positions[b].tolist()):
                    if p == i:
                        image = model.ln_vision(encode_images(model.vision_tower, model.vision_config,
                                                              batch.pixel_values[b, k:k + 1]))
                        q = model.qformer(model.query_tokens, image)  # one image, its own Q-Former pass
                        rows.append(model.language_projection(q)[0])
                if i < ids.shape[0] and real[i]:
                    text_rows.append(sum(r.shape[0] for r in rows))
                    rows.append(llama.model.embed_tokens(ids[i:i + 1]))
            logits = llama(inputs_embeds=torch.cat(rows)[None]).logits[0, text_rows]
            torch.testing.assert_close(out.logits[b, keep], logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.loss)


def recompute_greedy(model, batch: MultimodalBatch, steps: int) -> torch.Tensor:
    ids, mask, out = batch.input_ids, batch.text_mask(), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(MultimodalBatch(ids, batch.pixel_values, batch.image_positions, mask)).logits[:, -1].argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], 1)
    return torch.stack(out, 1)


def test_cached_generation_equals_recomputation():
    model = model_with()
    batch = random_batch(model, batch=2, text=7, positions=[[1, 3], [4, 5]], pad=[0, 3])
    assert torch.equal(model.generate(batch, 5), recompute_greedy(model, batch, 5))


CONNECTOR = ("query_tokens", "ln_vision.", "qformer.", "language_projection.")


@pytest.mark.parametrize(("stage", "llm_option", "prefixes"), [
    ("pretrain", False, CONNECTOR),
    ("pretrain", True, CONNECTOR),
    ("finetune", False, CONNECTOR),  # BLIP-2 / InstructBLIP keep the LLM frozen
    ("finetune", True, (*CONNECTOR, "language_model.", "lm_head.")),
])
def test_gradients_reach_exactly_each_stage(stage, llm_option, prefixes):
    model = model_with(train_llm_in_finetune=llm_option)
    trainable = model.set_stage(stage)
    assert set(trainable) == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert not any(n.startswith("vision_tower.") for n in trainable)
    model(random_batch(model, batch=2, text=6, positions=[[1], [3]], labels=True)).loss.backward()
    assert_gradients_reach_exactly(model, trainable)


def test_connector_flops_by_hand():
    """Prefill connector FLOPs from the paper's blocks, at BLIP-2's default Q-Former on the tiny LLM and tower."""
    model = build_model("qformer", "tiny-llm", "tiny-clip")  # defaults: 32 queries, 12 x 768, FFN 3072, every 2nd
    wl = Workload(batch_size=2, images_per_sample=2, text_before=3, text_between=2, text_after=4)
    q, h, m, d, v, H = 32, 768, 3072, model.vision_config.hidden_size, 16, model.llm_config.hidden_size
    per_layer = 2 * q * h * h * 4 + 2 * 2 * q * q * h + 2 * 2 * q * h * m  # Q, K, V, O; QK^T and PV; FFN
    per_cross = 2 * q * h * h * 2 + 2 * 2 * v * d * h + 2 * 2 * q * v * h  # Q, O; K, V from the image; scores
    per_image = 12 * per_layer + 6 * per_cross + 2 * q * h * H  # + language_projection
    analytic = model.analytic_cost(wl).flops("prefill", component="connector")
    assert analytic == 4 * per_image
    assert count_prefill(model, wl).flops("language") == pytest.approx(
        model.analytic_cost(wl).flops("prefill", scope="language"), rel=1e-9)
    assert model.tokens_per_image == 32


def test_visual_tokens_per_image_are_the_queries_whatever_the_tower():
    small, big = build_model("qformer", "tiny-llm", "tiny-clip"), build_model("qformer", "vicuna-7b", "clip-vit-l-336",
                                                                             device="meta")
    assert small.tokens_per_image == big.tokens_per_image == 32
    # BLIP-2's Q-Former on CLIP-L (width 1024): 12 layers, 6 cross-attention ones
    o, h, m, d = QFormerOptions(), 768, 3072, 1024
    layer = 4 * (h * h + h) + 2 * h + (h * m + m) + (m * h + h) + 2 * h
    cross = (h * h + h) + 2 * (d * h + h) + (h * h + h) + 2 * h
    assert big.num_parameters("qformer.") == o.num_layers * layer + 6 * cross + 2 * h
    assert big.num_parameters("query_tokens") == 32 * h
    assert big.num_parameters("language_projection.") == h * 4096 + 4096


@pytest.mark.parametrize(("options", "match"), [
    ({"num_queries": 0}, "num_queries must be an integer in"),
    ({"hidden_size": 100}, "hidden_size=100 must be divisible by num_heads=12"),
    ({"cross_attention_frequency": 13}, "cross_attention_frequency must be in"),
    ({"num_layers": "2"}, "num_layers must be an integer"),
    ({"train_llm_in_finetune": "yes"}, "train_llm_in_finetune must be True or False"),
    ({"latents": 4}, "has no option"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        build_model("qformer", "tiny-llm", "tiny-clip", options=options)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_activation_estimate_close_to_saved_tensors(stage):
    model = model_with(num_queries=32, hidden_size=64, num_heads=4, intermediate_size=256, num_layers=4,
                       train_llm_in_finetune=True)
    model.set_stage(stage)
    batch = random_batch(model, batch=2, text=10, labels=True)
    _, saved = saved_activation_bytes(model, lambda: model(batch).loss)
    est = model.analytic_cost(Workload(batch_size=2, text_before=3, text_after=7, stage=stage,
                                       dtype="float32")).activation_bytes
    assert est == pytest.approx(saved, rel=0.25)


def test_parameter_count_equals_transformers_at_blip2_defaults():
    """BLIP-2's Q-Former (EVA ViT-g features, width 1408): our query path has transformers' parameters exactly."""
    from mllm_bench.architectures.qformer import QFormer

    with torch.device("meta"):
        theirs = Blip2QFormerModel(Blip2QFormerConfig())
        ours = QFormer(QFormerOptions(), 1408)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 105_137_664
