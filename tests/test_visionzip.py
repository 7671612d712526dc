"""VisionZip: dominant + contextual tokens equal a naive per-image formulation of the official rules, computed from
transformers' eager CLIP (attention weights, hidden states and keys of the feature layer); counted == analytic,
cached == recomputed generation, gradients per stage, LLaVA checkpoints load, clear errors."""

from __future__ import annotations

import pytest
import torch
from mllm_bench.architectures.visionzip import VisionZip
from transformers import CLIPVisionConfig, CLIPVisionModel

from mllm_bench import PAPER_WORKLOAD, ConfigError, Workload, build_model
from mllm_bench.config import replace
from mllm_bench.flops import count_decode, count_prefill, count_train_step
from mllm_bench.presets import llm_preset, vision_preset
from mllm_bench.registry import architecture_names, register, unregister

from .helpers import assert_gradients_reach_exactly, random_batch, tiny_model
from .test_llava import recompute_greedy
from .test_llava_pooling import assert_logits_equal_hand_spliced


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registered for these tests unless the installed package already provides it."""
    added = "visionzip" not in architecture_names()
    if added:
        register(VisionZip)
    yield
    if added:
        unregister("visionzip")


def hf_clip(model) -> CLIPVisionModel:
    """transformers' CLIP vision model (eager attention) with ``model``'s tower weights."""
    v = model.vision_config
    cfg = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                           patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act)
    cfg._attn_implementation = "eager"
    hf = CLIPVisionModel(cfg).eval()
    state = {k.removeprefix("vision_tower."): p for k, p in model.state_dict().items() if k.startswith("vision_tower.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(f"encoder.layers.{v.layers_run}." in k or "post_layernorm" in k for k in missing), missing
    return hf


def naive_visionzip(model, pixel_values: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """Per image, from the paper's definition as the official code applies it: (N, dominant + contextual, D)."""
    hf = hf_clip(model)
    layer = model.vision_config.layers_run - 1  # the feature layer, 0-based
    heads = model.vision_config.num_heads
    out = []
    with torch.no_grad():
        res = hf(pixel_values=pixel_values.flatten(0, 1), output_hidden_states=True, output_attentions=True)
        attn, hidden = res.attentions[layer], res.hidden_states[layer + 1]
        block = hf.encoder.layers[layer] if hasattr(hf, "encoder") else hf.vision_model.encoder.layers[layer]
        keys = block.self_attn.k_proj(block.layer_norm1(res.hidden_states[layer]))
        for n in range(hidden.shape[0]):
            t, d = hidden.shape[1], hidden.shape[2]
            # dominant: CLS + the dominant-1 patches the CLS query attends to most (summed over heads), by position
            score = {j: sum(float(attn[n, h, 0, j]) for h in range(heads)) for j in range(1, t)}
            chosen = sorted(sorted(score, key=lambda j: -score[j])[:dominant - 1])
            kept = [0] + chosen
            rest = [j for j in range(t) if j not in kept]
            # contextual: uniform targets among the rest; every other token joins its most similar target (keys
            # averaged over heads, cosine); a contextual token is its target plus the mean of the tokens it got
            metric = {j: keys[n, j].view(heads, d // heads).mean(0) for j in rest}
            metric = {j: m / m.norm() for j, m in metric.items()}
            step = max(1, len(rest) // contextual)
            targets = [rest[i] for i in range(0, len(rest), step)][:contextual]
            groups: dict[int, list[int]] = {c: [] for c in targets}
            for j in rest:
                if j not in targets:
                    sims = [float(metric[j] @ metric[c]) for c in targets]
                    groups[targets[sims.index(max(sims))]].append(j)
            tokens = [hidden[n, j] for j in kept]
            for c in targets:
                extra = torch.stack([hidden[n, j] for j in groups[c]]).mean(0) if groups[c] else torch.zeros(d)
                tokens.append(hidden[n, c] + extra)
            out.append(torch.stack(tokens))
    return torch.stack(out)


@pytest.mark.parametrize(("dominant", "contextual"), [(4, 3), (6, 2), (1, 5)])
def test_selected_tokens_equal_naive_formulation(dominant, contextual):
    model = tiny_model("visionzip", dominant=dominant, contextual=contextual)
    batch = random_batch(model, batch=2, text=6, positions=[[1, 4], [2, 2]])
    with torch.no_grad():
        got = model.encode(batch.pixel_values)
    expected = naive_visionzip(model, batch.pixel_values, dominant, contextual)
    assert got.shape == (4, dominant + contextual, model.vision_config.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_logits_equal_llama_on_naive_tokens_with_two_images_and_left_padding():
    model = tiny_model("visionzip")
    batch = random_batch(model, batch=2, text=8, positions=[[3, 5], [4, 6]], pad=[0, 2])
    with torch.no_grad():
        feats = model.multi_modal_projector(naive_visionzip(model, batch.pixel_values, 4, 3))
    assert model.tokens_per_image == 7
    assert_logits_equal_hand_spliced(model, batch, feats)


def test_cached_generation_equals_recomputation():
    model = tiny_model("visionzip")
    batch = random_batch(model, batch=2, text=7, positions=[[2, 5], [4, 4]], pad=[0, 3])
    assert torch.equal(model.generate(batch, 5), recompute_greedy(model, batch, 5))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_reach_exactly_each_stage(stage):
    model = tiny_model("visionzip")
    trainable = model.set_stage(stage)
    model(random_batch(model, batch=2, text=6, labels=True)).loss.backward()
    assert_gradients_reach_exactly(model, trainable)
    assert not any(n.startswith("vision_tower.") for n in trainable)


def test_llava_checkpoints_load_unchanged():
    llava, zipped = tiny_model("llava"), tiny_model("visionzip", seed=5)
    zipped.load_state_dict(llava.state_dict(), strict=True)


@pytest.mark.parametrize(("tokens", "split"), [(None, (54, 10)), (64, (54, 10)), (128, (108, 20)), (192, (162, 30))])
def test_paper_splits(tokens, split):
    options = {} if tokens is None else {"tokens": tokens}
    model = build_model("visionzip", "vicuna-7b", "clip-vit-l-336", options=options)
    assert model.options.split == split and model.tokens_per_image == sum(split)


@pytest.mark.parametrize(("vision", "options", "needle"), [
    ("tiny-siglip", {"dominant": 4, "contextual": 3}, "has no CLS token"),
    ("tiny-clip", {"dominant": 10, "contextual": 8}, "exceeds the 16 patches"),
    ("tiny-clip", {}, "exceeds the 16 patches"),  # the paper's 54 + 10 on a 4x4 grid
    ("tiny-clip", {"tokens": 100}, "tokens must be one of"),
    ("tiny-clip", {"dominant": 4}, "go together"),
    ("tiny-clip", {"dominant": 0, "contextual": 3}, "go together, each an integer >= 1"),
    ("tiny-clip", {"dominant": -1, "contextual": 3}, "dominant must be an integer >= 1"),
    ("tiny-clip", {"tokens": "64"}, "tokens must be an integer"),
    ("tiny-clip", {"tokens": 64, "dominant": 4, "contextual": 3}, "differs from dominant"),
])
def test_bad_options_are_config_errors(vision, options, needle):
    with pytest.raises(ConfigError, match=needle):
        build_model("visionzip", "tiny-llm", vision, options=options)


MID_LLM = replace(llm_preset("vicuna-7b"), name="vicuna-7b-2layers", num_layers=2)
MID_VISION = replace(vision_preset("clip-vit-l-336"), name="clip-l-336-2layers", num_layers=2)
MULTI = Workload(batch_size=2, images_per_sample=2, text_before=5, text_between=3, text_after=9, generate_tokens=4)


@pytest.mark.parametrize(("llm", "vision", "options", "workload"), [
    ("tiny-llm", "tiny-clip", {"dominant": 4, "contextual": 3}, MULTI),
    (MID_LLM, MID_VISION, {"tokens": 192}, PAPER_WORKLOAD),
    (MID_LLM, MID_VISION, {"tokens": 64}, MULTI),
])
def test_counted_equals_analytic_and_selection_cost(llm, vision, options, workload):
    model = build_model("visionzip", llm, vision, options=options)
    llava = build_model("llava", llm, vision)
    v = model.vision_config
    dom, ctx = model.options.split
    # selection over LLaVA's tower: the CLS row's QK^T, the key similarity of the merged tokens to the targets,
    # and the one-hot merge matmul, per image
    t, n_img = v.num_patches + 1, workload.batch_size * workload.images_per_sample
    merged = t - dom - ctx
    d, head_dim = v.hidden_size, v.hidden_size // v.num_heads
    selection = 2 * n_img * (t * d + merged * ctx * head_dim + ctx * merged * d)
    prefill, llava_prefill = count_prefill(model, workload), count_prefill(llava, workload)
    assert prefill.by_component()["vision"] - llava_prefill.by_component()["vision"] == selection
    analytic = model.analytic_cost(workload)
    assert prefill.total == pytest.approx(analytic.flops("prefill"), rel=1e-9)
    assert count_decode(model, workload)[0].total == pytest.approx(analytic.flops("decode"), rel=1e-9)
    for stage in ("pretrain", "finetune"):
        wl = workload.replace(stage=stage)
        counted, expected = count_train_step(model, wl), model.analytic_cost(wl)
        assert counted.total == pytest.approx(expected.flops("train_step"), rel=1e-9)
        assert counted.by_pass().get("backward", 0) == pytest.approx(expected.flops("train_step", pass_="backward"),
                                                                     rel=1e-9)
