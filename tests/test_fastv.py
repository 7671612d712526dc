"""FastV: equal to a naive formulation of the paper's rule (per sample, explicit loops), to LLaVA when
nothing is dropped; the KV cache of later layers holds the kept tokens only; ranking cost counted."""

from __future__ import annotations

import math

import pytest
import torch
from mllm_bench.architectures.fastv import FastV, kept_visual_tokens

from mllm_bench import PAPER_WORKLOAD, MultimodalBatch, Workload, build_model
from mllm_bench.attention import record_paths
from mllm_bench.config import ConfigError
from mllm_bench.flops import count_prefill
from mllm_bench.registry import architecture_names, register, unregister
from mllm_bench.static_decode import decode_steps

from .helpers import assert_gradients_reach_exactly, random_batch, tiny_model


@pytest.fixture(autouse=True)
def registered():
    """Register fastv for these tests unless it is installed already."""
    installed = "fastv" in architecture_names()
    if not installed:
        register(FastV)
    yield
    if not installed:
        unregister("fastv")


CASES = {
    # GQA, K=1: ranking in the first layer; two images and left padding
    "gqa_two_images_padded": ("tiny-llm", {"layer": 1, "drop_ratio": 0.5}, [[2, 5], [3, 4]], [2, 0]),
    # MHA, K=2 of 3 layers, one image, 3/4 dropped
    "mha_one_image": ("tiny-llm-mha", {"layer": 2, "drop_ratio": 0.75}, [[3], [5]], None),
}


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def _rotate(x: torch.Tensor, pos: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """RoPE (rotate-half) of x (H, n, D) at integer positions pos (n,)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = head_dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _layer(layer: torch.nn.Module, x: torch.Tensor, pos: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer over one sample's rows x (n, h), causal by position; returns the output and the
    attention probabilities (H, n, n), written out."""
    att, hd, nh, nkv = layer.self_attn, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    h = _rms(x, layer.input_layernorm)
    q = _rotate((h @ att.q_proj.weight.T).view(-1, nh, hd).transpose(0, 1), pos, hd, cfg.rope_theta)
    k = _rotate((h @ att.k_proj.weight.T).view(-1, nkv, hd).transpose(0, 1), pos, hd, cfg.rope_theta)
    v = (h @ att.v_proj.weight.T).view(-1, nkv, hd).transpose(0, 1)
    n = x.shape[0]
    probs = torch.zeros(nh, n, n)
    out = torch.zeros(nh, n, hd)
    for head in range(nh):
        kv = head // (nh // nkv)
        for i in range(n):
            allowed = [j for j in range(n) if pos[j] <= pos[i]]
            scores = torch.stack([q[head, i] @ k[kv, j] for j in allowed]) / math.sqrt(hd)
            p = torch.softmax(scores, 0)
            probs[head, i, allowed] = p
            out[head, i] = sum(p[a] * v[kv, j] for a, j in enumerate(allowed))
    x = x + out.transpose(0, 1).reshape(n, nh * hd) @ att.o_proj.weight.T
    mlp, h = layer.mlp, _rms(x, layer.post_attention_layernorm)
    ffn = (torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return x + ffn, probs


def naive_fastv_logits(model: FastV, batch: MultimodalBatch, rank_text: int | None = None) -> list[torch.Tensor]:
    """FastV from its definition, one sample at a time, padding removed: the sample's sequence (text with
    each image's visual tokens before the text index it precedes) through layers < K; in layer K-1 the
    visual tokens are scored by the head-averaged attention the ranking token pays them (the last token, or
    the real text token ``rank_text`` of the sample), the round(V(1-R)) highest kept in order; the later
    layers run over the kept rows at their original positions. Logits (T_real, V) at each sample's text."""
    cfg, lm = model.llm_config, model.language_model
    k_layer, ratio = model.options.layer, model.options.drop_ratio
    feats = model.image_features(batch.pixel_values)
    mask = batch.text_mask()
    per_image = model.tokens_per_image
    out = []
    for b in range(batch.batch_size):
        rows, visual, text_rows = [], [], []
        real = [t for t in range(batch.num_text) if mask[b, t]]
        images = batch.image_positions[b].tolist()
        for t in range(batch.num_text + 1):
            for img, p in enumerate(images):
                if p == t:
                    for j in range(per_image):
                        visual.append(len(rows))
                        rows.append(feats[b, img * per_image + j])
            if t < batch.num_text and mask[b, t]:
                text_rows.append(len(rows))
                rows.append(lm.embed_tokens.weight[batch.input_ids[b, t]])
        x, pos = torch.stack(rows), torch.arange(len(rows))
        for i in range(k_layer):
            x, probs = _layer(lm.layers[i], x, pos, cfg)
        ranker = len(rows) - 1 if rank_text is None else text_rows[real.index(rank_text)]
        score = probs[:, ranker].mean(0)
        best = sorted(visual, key=lambda r: -float(score[r]))[:round(len(visual) * (1 - ratio))]
        keep = [r for r in range(len(rows)) if r not in visual or r in best]
        x, pos = x[keep], pos[keep]
        for i in range(k_layer, cfg.num_layers):
            x, _ = _layer(lm.layers[i], x, pos, cfg)
        text_kept = [keep.index(r) for r in text_rows]
        out.append(model.lm_head(_rms(x[text_kept], lm.norm)))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_naive_fastv_at_every_text_position(case: str) -> None:
    llm, options, positions, pad = CASES[case]
    model = tiny_model("fastv", llm=llm, **options)
    batch = random_batch(model, batch=2, text=9, positions=positions, pad=pad)
    with torch.no_grad():
        logits = model(batch).logits
        last, _ = model.prefill(batch)
        naive = naive_fastv_logits(model, batch)
    mask = batch.text_mask()
    for b in range(batch.batch_size):
        torch.testing.assert_close(logits[b][mask[b]], naive[b], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last[b], naive[b][-1], atol=1e-4, rtol=1e-4)
    # and the ranking matters: a different ranking token changes what the later text sees
    with torch.no_grad():
        other = naive_fastv_logits(model, batch, rank_text=positions[1][0])
    assert not torch.allclose(other[1][-1], naive[1][-1], atol=1e-4)


def test_drop_ratio_zero_is_llava_with_the_same_weights() -> None:
    llava = tiny_model("llava")
    fastv = tiny_model("fastv", drop_ratio=0.0)
    fastv.load_state_dict(llava.state_dict())
    batch = random_batch(llava, batch=2, text=9, positions=[[2, 5], [3, 4]], pad=[2, 0])
    with torch.no_grad():
        torch.testing.assert_close(fastv(batch).logits, llava(batch).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fastv.prefill(batch)[0], llava.prefill(batch)[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(fastv.generate(batch, 4), llava.generate(batch, 4))


def test_cached_generation_equals_recomputation_with_the_prompt_ranking() -> None:
    """Decode steps attend, in layers >= K, to the tokens kept at prefill (ranked by the last prompt token):
    the same as recomputing the whole sequence with that ranking."""
    model = tiny_model("fastv", llm="tiny-llm-mha", layer=2)
    prompt = random_batch(model, batch=2, text=8, positions=[[2, 5], [3, 4]], pad=[2, 0])
    with torch.no_grad():
        logits, cache = model.prefill(prompt)
        steps, tokens = [logits], []
        for _ in range(3):
            tokens.append(steps[-1].argmax(-1))
            step, cache = model.decode(tokens[-1], cache)
            steps.append(step)
        ids = torch.cat([prompt.input_ids, torch.stack(tokens, 1)], 1)
        full = MultimodalBatch(ids, prompt.pixel_values, prompt.image_positions,
                               torch.cat([prompt.text_mask(), torch.ones(2, 3, dtype=torch.bool)], 1))
        naive = naive_fastv_logits(model, full, rank_text=prompt.num_text - 1)
    for b in range(2):
        torch.testing.assert_close(torch.stack([s[b] for s in steps]), naive[b][-4:], atol=1e-4, rtol=1e-4)
    # layers < K hold every token, layers >= K text and the kept visual tokens only
    visual, kept = 2 * model.tokens_per_image, kept_visual_tokens(2 * model.tokens_per_image, 0.5)
    pruned = cache.extra["fastv_cache"]
    assert [kv.k.shape[2] for kv in cache.layers] == [8 + visual + 3] * 2
    assert pruned.layers[2].k.shape[2] == 8 + kept + 3 and pruned.layers[0].k is None
    assert int(pruned.k_visual[0].sum()) == kept


def test_kept_count_rounds_half_to_even_like_the_official_code() -> None:
    assert kept_visual_tokens(576, 0.5) == 288 and kept_visual_tokens(576, 0.75) == 144
    model = tiny_model("fastv", drop_ratio=0.59375)  # 16 visual tokens * 0.40625 = 6.5 -> 6
    batch = random_batch(model, batch=1, text=6)
    with torch.no_grad():
        _, cache = model.prefill(batch)
    assert int(cache.extra["fastv_cache"].k_visual.sum()) == 6


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_reach_exactly_the_trainable_parameters(stage: str) -> None:
    model = tiny_model("fastv")
    trainable = model.set_stage(stage)
    model(random_batch(model, batch=2, text=9, positions=[[2, 5], [3, 4]], labels=True)).loss.backward()
    assert_gradients_reach_exactly(model, trainable)


def test_ranking_scores_are_counted_and_their_path_recorded() -> None:
    """The ranking row costs one QK^T row per sample over the full sequence in layer K-1: FastV with nothing
    dropped counts exactly that much more attention than LLaVA."""
    wl = PAPER_WORKLOAD
    fastv = build_model("fastv", "tiny-llm", "tiny-clip", options={"layer": 1, "drop_ratio": 0.0})
    llava = build_model("llava", "tiny-llm", "tiny-clip")
    cfg = fastv.llm_config
    n = wl.num_text_tokens + wl.images_per_sample * fastv.tokens_per_image
    extra = 2 * wl.batch_size * n * cfg.num_heads * cfg.head_dim
    counted = count_prefill(fastv, wl).flops(component="attn_scores")
    assert counted - count_prefill(llava, wl).flops(component="attn_scores") == extra
    assert fastv.analytic_cost(wl).flops("prefill", component="attn_scores") == counted
    # layer K-1 also computes the ranking row explicitly; the pruned sequence (gaps in its positions) is
    # causal by row, so the fused path keeps is_causal after pruning
    model = tiny_model("fastv", llm="tiny-llm-mha", layer=2)
    batch = random_batch(model, batch=2, text=6)
    with torch.no_grad():
        with record_paths() as paths:
            ref = model.prefill(batch)[0]
        model.set_attention_backend("flash")
        with record_paths() as fast_paths:
            fast = model.prefill(batch)[0]
    assert paths == {"sdpa:causal": 2, "sdpa:dense": 1, "math:weights": 1}
    assert fast_paths == {"flash:causal": 3, "math:weights": 1}
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_bad_options_are_named() -> None:
    with pytest.raises(ConfigError, match="layer=2 must be below the LLM's 2 layers"):
        build_model("fastv", "tiny-llm", "tiny-clip")
    with pytest.raises(ConfigError, match="layer must be an integer >= 1"):
        build_model("fastv", "tiny-llm", "tiny-clip", options={"layer": 0})
    with pytest.raises(ConfigError, match="drop_ratio must be a number in"):
        build_model("fastv", "tiny-llm", "tiny-clip", options={"layer": 1, "drop_ratio": 1.5})


def _eq5(n: int, d: int, m: int) -> float:
    """FastV's eq. 5 per layer: 4nd^2 + 2n^2d + 2ndm (a multiply-add counted once, two FFN matrices)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@pytest.mark.parametrize(("llm", "layers", "d", "m", "k", "published"), [
    ("vicuna-7b", 32, 4096, 11008, 3, 0.57),  # FastV README, lmms-eval table: "FastV K=3 R=50% (FLOPS=57%)"
    ("vicuna-13b", 40, 5120, 13824, 2, 0.55),  # FastV abstract: "45% reduction in FLOPs for LLaVA-1.5-13B"
])
def test_published_flops_ratios(llm: str, layers: int, d: int, m: int, k: int, published: float) -> None:
    """FastV's figures under its eq. 5 with the official code's prompt (36 text tokens + 576 visual, R=50%),
    and our exact count (2 FLOPs per multiply-add, three FFN matrices, the ranking row) beside them."""
    n, visual = 36 + 576, 576
    theirs = (k * _eq5(n, d, m) + (layers - k) * _eq5(n - visual // 2, d, m)) / (layers * _eq5(n, d, m))
    assert round(theirs, 2) == published
    wl = Workload(batch_size=1, text_before=35, text_after=1)
    fastv = build_model("fastv", llm, "clip-vit-l-336", options={"layer": k, "drop_ratio": 0.5})
    llava = build_model("llava", llm, "clip-vit-l-336")
    decoder = ("attn_proj", "attn_scores", "ffn")
    ours = (sum(fastv.analytic_cost(wl).flops("prefill", component=c) for c in decoder)
            / sum(llava.analytic_cost(wl).flops("prefill", component=c) for c in decoder))
    assert abs(ours - theirs) < 0.002


def test_shortv_quotes_fastv_under_the_saisa_convention() -> None:
    """ShortV (arXiv 2504.00502) quotes LLaVA-1.5-7B at 8.5 and FastV (K=2, R=50%) at 4.9 TFLOPs: language
    scope, dense attention, 576 visual + 64 text tokens."""
    fastv = build_model("fastv", "vicuna-7b", "clip-vit-l-336")
    assert round(fastv.analytic_cost(PAPER_WORKLOAD).flops("prefill", scope="language") / 1e12, 1) == 4.9


def test_static_cache_rolls_back_as_a_captured_decode_graph_needs() -> None:
    """A CUDA graph's warm-up decodes and then restores the static cache's state; the later layers' cache is
    derived from it each step, so decoding after the rollback equals the growing cache."""
    model = tiny_model("fastv")
    batch = random_batch(model, batch=2, text=9, positions=[[2, 5], [3, 4]], pad=[2, 0])
    with torch.no_grad():
        logits, cache = model.prefill(batch)
        _, ref_cache = model.prefill(batch)
        step, static = decode_steps(model, cache, 4, "static")
        state = static.state()
        for _ in range(2):
            step(torch.zeros(2, dtype=torch.long))
        static.restore(state)
        tokens = logits.argmax(-1)
        for _ in range(4):
            ref, ref_cache = model.decode(tokens, ref_cache)
            torch.testing.assert_close(step(tokens), ref, atol=1e-5, rtol=1e-5)
            tokens = ref.argmax(-1)
    assert model.extra_cache_nbytes(static) == model.extra_cache_nbytes(ref_cache)


def test_right_padding_ranks_by_the_last_real_token() -> None:
    """A training batch may pad on the right: the ranking row is each sample's last real token."""
    model = tiny_model("fastv")
    batch = random_batch(model, batch=2, text=9, positions=[[2, 5], [3, 4]], labels=True)
    batch.attention_mask = torch.ones(2, 9, dtype=torch.bool)
    batch.attention_mask[0, -3:] = False
    with torch.no_grad():
        logits = model(batch).logits
        naive = naive_fastv_logits(model, batch)
    torch.testing.assert_close(logits[0, :6], naive[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], naive[1], atol=1e-4, rtol=1e-4)


def test_text_only_is_llava() -> None:
    llava = tiny_model("llava")
    fastv = tiny_model("fastv")
    fastv.load_state_dict(llava.state_dict())
    batch = random_batch(llava, batch=2, text=7, positions=[[], []], pad=[2, 0])
    with torch.no_grad():
        torch.testing.assert_close(fastv(batch).logits, llava(batch).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(fastv.generate(batch, 3), llava.generate(batch, 3))


def test_effective_rows_with_several_images_say_they_assume_an_even_split():
    from mllm_bench.profile import profile

    kw = dict(llm="tiny-llm", vision="tiny-clip", options={"layer": 1})
    two = profile("fastv", Workload(images_per_sample=2, text_between=2), **kw)
    one = profile("fastv", Workload(), **kw)
    effective = two[(two["source"] == "analytic") & (two["convention"] == "effective")]
    assert len(effective) and effective["note"].str.contains("split evenly").all()
    assert not two[(two["source"] == "analytic") & (two["convention"] == "dense")]["note"].str.contains("split").any()
    assert not one["note"].str.contains("split evenly").any()
