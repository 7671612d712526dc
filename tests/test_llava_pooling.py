"""LLaVA's connector options: ``pixel_shuffle`` (space-to-depth before the projector) and ``pool`` (average
pooling after it), against naive loops over the patch grid and transformers' Idefics3 / LLaVA-OneVision ops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mllm_bench.architectures.llava import LLaVAOptions, pixel_shuffle, pool_grid
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from mllm_bench import PAPER_WORKLOAD, ConfigError, Workload, build_model
from mllm_bench.config import replace
from mllm_bench.flops import count_decode, count_prefill, count_train_step
from mllm_bench.presets import llm_preset, vision_preset

from .helpers import assert_gradients_reach_exactly, random_batch, tiny_model
from .test_llava import recompute_greedy


def naive_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """(N, g*g, D) -> (N, (g/s)^2, D s^2): each s x s block's vectors concatenated row by row."""
    n, t, _ = x.shape
    g = int(round(t ** 0.5))
    out = []
    for img in range(n):
        tokens = []
        for i in range(g // s):
            for j in range(g // s):
                tokens.append(torch.cat([x[img, (i * s + dh) * g + j * s + dw] for dh in range(s) for dw in range(s)]))
        out.append(torch.stack(tokens))
    return torch.stack(out)


def naive_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, g*g, h) -> (N, (g/k)^2, h): the mean of each k x k block, blocks row by row."""
    n, t, _ = x.shape
    g = int(round(t ** 0.5))
    out = []
    for img in range(n):
        tokens = []
        for i in range(g // k):
            for j in range(g // k):
                block = [x[img, (i * k + di) * g + j * k + dj] for di in range(k) for dj in range(k)]
                tokens.append(torch.stack(block).mean(0))
        out.append(torch.stack(tokens))
    return torch.stack(out)


@pytest.mark.parametrize(("g", "s"), [(4, 2), (6, 3), (6, 2)])
def test_pixel_shuffle_is_space_to_depth_in_idefics3_order(g, s):
    x = torch.randn(2, g * g, 5)
    ours = pixel_shuffle(x, s)
    assert ours.shape == (2, (g // s) ** 2, 5 * s * s)
    torch.testing.assert_close(ours, naive_shuffle(x, s), rtol=0, atol=0)
    torch.testing.assert_close(ours, Idefics3Connector.pixel_shuffle(None, x, s), rtol=0, atol=0)


@pytest.mark.parametrize(("g", "k"), [(4, 2), (6, 3), (6, 2)])
def test_pool_is_block_average(g, k):
    x = torch.randn(3, g * g, 7)
    torch.testing.assert_close(pool_grid(x, k), naive_pool(x, k), rtol=1e-6, atol=1e-6)


def test_pool_2_equals_llava_onevision_bilinear_pooling():
    # transformers' apply_pooling interpolates bilinearly to ceil(g/2): on an even grid, the 2x2 block mean
    x = torch.randn(2, 36, 8)
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=48, patch_size=8)))
    torch.testing.assert_close(pool_grid(x, 2), LlavaOnevisionModel.apply_pooling(fake, x), rtol=1e-6, atol=1e-6)


def test_defaults_leave_llava_unchanged():
    model = tiny_model("llava")
    v = model.vision_config
    assert model.options == LLaVAOptions(pool=1, pixel_shuffle=1)
    assert model.tokens_per_image == (v.image_size // v.patch_size) ** 2
    assert model.multi_modal_projector.linear_1.in_features == v.hidden_size


@pytest.mark.parametrize("arch", ["llava", "naavit"])
@pytest.mark.parametrize("options", [{"pixel_shuffle": 2}, {"pool": 2}, {"pixel_shuffle": 2, "pool": 2}])
def test_image_features_equal_naive_shuffle_project_pool(arch, options):
    model = tiny_model(arch, **options)
    s, k = options.get("pixel_shuffle", 1), options.get("pool", 1)
    g = model.vision_config.image_size // model.vision_config.patch_size
    assert model.tokens_per_image == (g // (s * k)) ** 2
    assert model.multi_modal_projector.linear_1.in_features == model.vision_config.hidden_size * s * s
    batch = random_batch(model, batch=2, text=6, positions=[[1, 4], [2, 2]])
    with torch.no_grad():
        feats = model.encode(batch.pixel_values)
        expected = model.multi_modal_projector(naive_shuffle(feats, s) if s > 1 else feats)
        expected = naive_pool(expected, k) if k > 1 else expected
        got = model.image_features(batch.pixel_values)
    torch.testing.assert_close(got, expected.reshape(2, -1, expected.shape[-1]), rtol=1e-5, atol=1e-5)


def hf_llama(model) -> LlamaForCausalLM:
    """transformers' Llama with ``model``'s decoder and lm_head weights."""
    c = model.llm_config
    hf_cfg = LlamaConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict({k.replace("language_model.", "model.", 1): v for k, v in model.state_dict().items()
                        if k.startswith(("language_model.", "lm_head."))})
    return hf


def assert_logits_equal_hand_spliced(model, batch, feats: torch.Tensor) -> None:
    """Our text logits equal transformers' Llama fed, per sample, the text embeddings with ``feats`` (one row
    block per image, images in batch order) at each image's place; positions count valid tokens only."""
    hf = hf_llama(model)
    k = batch.images_per_sample
    with torch.no_grad():
        ours = model(batch).logits
        for b in range(batch.batch_size):
            rows, valid, is_text = [], [], []
            ids, pos = batch.input_ids[b], batch.image_positions[b].tolist()
            for i in range(len(ids) + 1):
                for img in [n for n, p in enumerate(pos) if p == i]:
                    rows += list(feats[b * k + img])
                    valid += [True] * feats.shape[1]
                    is_text += [False] * feats.shape[1]
                if i < len(ids):
                    rows.append(model.language_model.embed_tokens(ids[i]))
                    valid.append(bool(batch.text_mask()[b, i]))
                    is_text.append(True)
            mask = torch.tensor(valid)
            positions = (mask.cumsum(0) - 1).clamp(min=0)
            theirs = hf(inputs_embeds=torch.stack(rows)[None], attention_mask=mask[None].long(),
                        position_ids=positions[None]).logits[0]
            keep = torch.tensor(is_text) & mask
            torch.testing.assert_close(ours[b][batch.text_mask()[b]], theirs[keep], atol=1e-5, rtol=1e-5)


def test_forward_equals_llama_on_hand_spliced_reduced_tokens():
    """Two images per sample and left padding, the naive reduced tokens spliced by hand."""
    model = tiny_model("llava", pixel_shuffle=2, pool=2)
    batch = random_batch(model, batch=2, text=8, positions=[[3, 5], [4, 6]], pad=[0, 2])
    with torch.no_grad():
        feats = naive_pool(model.multi_modal_projector(naive_shuffle(model.encode(batch.pixel_values), 2)), 2)
    assert feats.shape[1] == 1
    assert_logits_equal_hand_spliced(model, batch, feats)


def test_cached_generation_equals_recomputation_with_pool_and_shuffle():
    model = tiny_model("llava", pixel_shuffle=2)
    batch = random_batch(model, batch=2, text=7, positions=[[2], [4]], pad=[0, 3])
    assert torch.equal(model.generate(batch, 5), recompute_greedy(model, batch, 5))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_reach_each_stage_through_pooling(stage):
    model = tiny_model("llava", pool=2, pixel_shuffle=2)
    trainable = model.set_stage(stage)
    model(random_batch(model, batch=2, text=6, labels=True)).loss.backward()
    assert_gradients_reach_exactly(model, trainable)


@pytest.mark.parametrize(("vision", "options", "needle"), [
    ("tiny-clip", {"pool": 3}, "llava.pool=3 does not divide the 4x4 patch grid"),
    ("tiny-clip", {"pixel_shuffle": 3}, "llava.pixel_shuffle=3 does not divide the 4x4 patch grid"),
    ("tiny-clip", {"pixel_shuffle": 2, "pool": 4}, "llava.pool=4 does not divide the 2x2 grid left by pixel_shuffle"),
    ("tiny-siglip", {"pool": 2}, "llava.pool=2 does not divide the 3x3 patch grid"),
    ("tiny-clip", {"pool": 0}, "pool must be an integer"),
    ("tiny-clip", {"pixel_shuffle": 1.5}, "pixel_shuffle must be an integer"),
])
def test_bad_grids_and_values_are_config_errors(vision, options, needle):
    with pytest.raises(ConfigError, match=needle):
        build_model("llava", "tiny-llm", vision, options=options)


MID_LLM = replace(llm_preset("vicuna-7b"), name="vicuna-7b-2layers", num_layers=2)
MID_VISION = replace(vision_preset("clip-vit-l-336"), name="clip-l-336-2layers", num_layers=2)
MULTI = Workload(batch_size=2, images_per_sample=2, text_before=5, text_between=3, text_after=9, generate_tokens=4)


@pytest.mark.parametrize(("llm", "vision", "options", "workload"), [
    ("tiny-llm", "tiny-clip", {"pixel_shuffle": 2, "pool": 2}, MULTI),
    ("tiny-llm", "tiny-clip", {"pool": 2}, PAPER_WORKLOAD),
    (MID_LLM, MID_VISION, {"pixel_shuffle": 2}, PAPER_WORKLOAD),
    (MID_LLM, MID_VISION, {"pixel_shuffle": 3, "pool": 2}, MULTI),
])
def test_counted_equals_analytic(llm, vision, options, workload):
    model = build_model("llava", llm, vision, options=options)
    v, h = model.vision_config, model.llm_config.hidden_size
    s, k = options.get("pixel_shuffle", 1), options.get("pool", 1)
    g = v.image_size // v.patch_size
    inference = model.analytic_cost(workload)
    # the projector runs on (g/s)^2 rows of width D s^2 per image; pooling adds nothing
    rows = workload.batch_size * workload.images_per_sample * (g // s) ** 2
    assert inference.flops("prefill", component="connector") == 2 * rows * (v.hidden_size * s * s * h + h * h)
    assert model.tokens_per_image == (g // (s * k)) ** 2
    decode, _ = count_decode(model, workload)
    assert count_prefill(model, workload).total == pytest.approx(inference.flops("prefill"), rel=1e-9)
    assert decode.total == pytest.approx(inference.flops("decode"), rel=1e-9)
    for stage in ("pretrain", "finetune"):
        wl = workload.replace(stage=stage)
        assert count_train_step(model, wl).total == pytest.approx(model.analytic_cost(wl).flops("train_step"),
                                                                  rel=1e-9)
