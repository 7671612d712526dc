"""Analytic cost model: equals the counted FLOPs for every architecture, phase and stage; paper numbers."""

from __future__ import annotations

import pytest
from mllm_bench.architectures.naavit import naavit_pairs

from mllm_bench import PAPER_WORKLOAD, Workload, build_model
from mllm_bench.config import ConfigError, replace
from mllm_bench.costmodel import causal_pairs, sequence_segments
from mllm_bench.flops import count_decode, count_prefill, count_train_step
from mllm_bench.presets import llm_preset, vision_preset
from mllm_bench.registry import architecture_names, architecture_spec

ARCHS = architecture_names()
# 7B widths (vicuna-7b, CLIP ViT-L/14-336) with few layers so that meta counting stays quick
MID_LLM = replace(llm_preset("vicuna-7b"), name="vicuna-7b-4layers", num_layers=4)
MID_VISION = replace(vision_preset("clip-vit-l-336"), name="clip-l-336-3layers", num_layers=3)
# options on top of each architecture's own (its spec's tiny options at the tiny size): Flamingo with a block
# before every second layer, so text-only layers come before and after the blocks
SIZES = {
    "tiny": ("tiny-llm", "tiny-clip", {"flamingo": {"cross_attn_every": 2}}),
    "mid": (MID_LLM, MID_VISION, {"flamingo": {"cross_attn_every": 2}}),
}
WORKLOADS = {
    "paper": PAPER_WORKLOAD,
    "multi": Workload(batch_size=2, images_per_sample=2, text_before=5, text_between=3, text_after=9,
                      generate_tokens=4),
}


def _model(arch: str, size: str):
    llm, vision, overrides = SIZES[size]
    base = dict(architecture_spec(arch).tiny_options) if size == "tiny" else {}
    return build_model(arch, llm, vision, options={**base, **overrides.get(arch, {})})


def _by_component_pass(terms_or_counted, analytic: bool) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    if analytic:
        for t in terms_or_counted.terms:
            out[(t.component, t.pass_)] = out.get((t.component, t.pass_), 0.0) + t.dense
    else:
        for (module, p), f in terms_or_counted.by_module_pass.items():
            key = (terms_or_counted.components.get(module, "other"), p)
            out[key] = out.get(key, 0.0) + f
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("arch", ARCHS)
def test_counted_equals_analytic(arch: str, size: str, workload: str) -> None:
    model = _model(arch, size)
    wl = WORKLOADS[workload]
    inference = model.analytic_cost(wl)
    prefill = count_prefill(model, wl)
    decode, _ = count_decode(model, wl)
    for phase, counted in (("prefill", prefill), ("decode", decode)):
        assert counted.total == pytest.approx(inference.flops(phase), rel=5e-3)
        assert counted.flops("language") == pytest.approx(inference.flops(phase, scope="language"), rel=5e-3)
    prefill_terms = type(inference)([t for t in inference.terms if t.phase == "prefill"])
    assert _by_component_pass(prefill, False) == pytest.approx(_by_component_pass(prefill_terms, True), rel=1e-9)
    for stage in ("pretrain", "finetune"):
        train_wl = wl.replace(stage=stage)
        analytic = model.analytic_cost(train_wl)
        counted = count_train_step(model, train_wl)
        assert counted.total == pytest.approx(analytic.flops("train_step"), rel=5e-3)
        # and piece by piece: every (component, forward/backward) agrees
        assert _by_component_pass(counted, False) == pytest.approx(_by_component_pass(analytic, True), rel=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_counted_equals_analytic_with_checkpointing_and_decode_context(arch: str) -> None:
    model = _model(arch, "tiny")
    wl = WORKLOADS["multi"].replace(stage="finetune", gradient_checkpointing=True)
    analytic = model.analytic_cost(wl)
    counted = count_train_step(model, wl)
    assert counted.by_pass()["recompute"] > 0
    assert _by_component_pass(counted, False) == pytest.approx(_by_component_pass(analytic, True), rel=1e-9)
    _, prompt = count_decode(model, WORKLOADS["multi"])
    context = prompt + 5  # a decode context other than the prompt (visual tokens per image differ by architecture)
    decode, ctx = count_decode(model, WORKLOADS["multi"], context_len=context)
    assert ctx == context
    assert decode.total == pytest.approx(model.analytic_cost(WORKLOADS["multi"], context_len=context).flops("decode"))


def test_flamingo_llm_trained_in_finetune_option() -> None:
    model = build_model("flamingo", "tiny-llm-mha", "tiny-clip",
                        options={"cross_attn_every": 2, "num_latents": 4, "train_llm_in_finetune": True})
    wl = WORKLOADS["multi"].replace(stage="finetune")
    assert count_train_step(model, wl).total == pytest.approx(model.analytic_cost(wl).flops("train_step"), rel=1e-9)


def test_paper_numbers_7b() -> None:
    """SAISA paper convention: 576 visual + 64 text tokens, language scope, dense attention."""
    llava, saisa = build_model("llava"), build_model("saisa")
    h, m, d_v, L, v, t = 4096, 11008, 1024, 32, 576, 64
    n = t + v
    # REFERENCE.md, per layer: dense 2n(4h+3m)h + 4n²h; visual as keys/values only 2t(4h+3m)h + 4vh² + 4t(t+v)h;
    # SAISA's per-layer projector 2v(d_v·h + h²)
    dense_layer = 2 * n * (4 * h + 3 * m) * h + 4 * n * n * h
    kv_only_layer = 2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * (t + v) * h
    layer_projector = 2 * v * (d_v * h + h * h)
    a_llava = llava.analytic_cost(PAPER_WORKLOAD)
    a_saisa = saisa.analytic_cost(PAPER_WORKLOAD)
    decoder = sum(a_llava.flops("prefill", component=c) for c in ("attn_proj", "attn_scores", "ffn"))
    assert decoder == pytest.approx(L * dense_layer, rel=1e-12)
    assert 8.4e12 < decoder < 8.6e12  # "LLaVA-1.5-7B's decoder alone is about 8.5 TFLOPs"
    saisa_lang = a_saisa.flops("prefill", scope="language")
    assert saisa_lang == pytest.approx(L * (kv_only_layer + layer_projector), rel=1e-12)
    reduction = 1 - saisa_lang / a_llava.flops("prefill", scope="language")
    assert 0.65 < reduction < 0.67  # "about 66% fewer inference FLOPs"
    for model, analytic in ((llava, a_llava), (saisa, a_saisa)):
        assert count_prefill(model, PAPER_WORKLOAD).flops("language") == pytest.approx(
            analytic.flops("prefill", scope="language"), rel=5e-3)


def test_effective_attention_conventions() -> None:
    wl = Workload(text_before=3, text_after=5)
    segs = sequence_segments(wl, 16)
    n = 3 + 16 + 5
    assert sum(causal_pairs(segs).values()) == n * (n + 1) // 2
    # NAAViT: each visual query sees the 3 text tokens before and itself
    assert naavit_pairs(segs)["visual"] == 16 * 4
    assert naavit_pairs(segs)["text"] == causal_pairs(segs)["text"]
    llava, naavit, saisa, flamingo = (build_model(a, "tiny-llm", "tiny-clip", options=o) for a, o in
                                      (("llava", None), ("naavit", None), ("saisa", None),
                                       ("flamingo", {"cross_attn_every": 1, "num_latents": 4})))
    c = llava.llm_config
    width, L = c.num_heads * c.head_dim, c.num_layers
    eff = {name: m.analytic_cost(wl) for name, m in
           (("llava", llava), ("naavit", naavit), ("saisa", saisa), ("flamingo", flamingo))}
    scores = {k: v.flops("prefill", "effective", component="attn_scores") for k, v in eff.items()}
    assert scores["llava"] == 4 * width * L * n * (n + 1) // 2
    assert scores["llava"] - scores["naavit"] == 4 * width * L * (16 * 15 // 2)
    text_pairs = 3 * 4 // 2 + 5 * (3 + 16) + 5 * 6 // 2
    assert scores["saisa"] == 4 * width * L * text_pairs
    # dense conventions count every pair the kernel computes
    assert eff["naavit"].flops("prefill", "dense") == eff["llava"].flops("prefill", "dense")
    # Flamingo: the 3 text tokens before the image see no latents; the 5 after see 4 each
    o = flamingo.options
    inner = o.xattn_heads * o.xattn_dim_head
    assert eff["flamingo"].flops("prefill", "effective", component="cross_attn", role="text") - \
        eff["flamingo"].flops("prefill", "dense", component="cross_attn", role="text") == \
        4 * inner * len(flamingo.cross_attn_layer_indices) * (5 * 4 - 8 * 4)


def test_gqa_key_value_projections_use_kv_width() -> None:
    gqa = build_model("llava", "llama3-8b").analytic_cost(PAPER_WORKLOAD)
    cfg = llm_preset("llama3-8b")
    n, h = 640, cfg.hidden_size
    assert gqa.flops("prefill", component="attn_proj") == 2 * n * (2 * h * h + 2 * h * cfg.kv_dim) * cfg.num_layers


def test_bad_input_names_allowed_values() -> None:
    cost = build_model("llava", "tiny-llm", "tiny-clip").analytic_cost(PAPER_WORKLOAD)
    with pytest.raises(ConfigError, match="convention must be one of"):
        cost.flops("prefill", convention="sparse")
    with pytest.raises(ConfigError, match="scope must be one of"):
        cost.flops("prefill", scope="decoder")
