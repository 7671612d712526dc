"""ShortV: frozen layers equal a naive full-layer formulation with visual outputs overwritten; LLaVA at N=0."""

from __future__ import annotations

import pytest
import torch
from mllm_bench.architectures.shortv import ShortV, ShortVOptions, replacement_order

from mllm_bench import PAPER_WORKLOAD, build_model
from mllm_bench.config import ConfigError
from mllm_bench.flops import count_prefill, count_train_step
from mllm_bench.registry import architecture_names, register, unregister
from mllm_bench.spliced import gather_rows
from tests.helpers import random_batch, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _registered():
    added = "shortv" not in architecture_names()  # registered by its entry point once installed
    if added:
        register(ShortV)
    yield
    if added:
        unregister("shortv")


def naive_logits(model: ShortV, batch) -> torch.Tensor:
    """Every layer a full LLaVA layer over the spliced sequence (dense causal mask); in frozen layers the
    visual rows' outputs are overwritten by their inputs. Logits of the text rows."""
    x, layout = model.embed(batch)
    lm = model.language_model
    mask = model.sequence_mask(layout)
    rope = lm.rope(layout.positions, x.dtype)
    vis = layout.is_visual.unsqueeze(-1)
    for i, layer in enumerate(lm.layers):
        out = layer(x, rope, mask, None, None, "math")
        x = torch.where(vis, x, out) if i in model.frozen_layers else out
    return model.lm_head(gather_rows(lm.norm(x), layout.text_index))


@pytest.mark.parametrize("case", [
    dict(positions=[[3], [3]], pad=None, frozen=(0,)),
    dict(positions=[[2, 5], [3, 4]], pad=[2, 0], frozen=(1,)),
    dict(positions=[[2, 5], [1, 6]], pad=[0, 3], frozen=(0, 2)),
])
def test_equals_naive(case) -> None:
    model = tiny_model("shortv", llm="tiny-llm-mha", frozen_layers=case["frozen"])
    batch = random_batch(model, batch=2, text=9, positions=case["positions"], pad=case["pad"])
    with torch.no_grad():
        logits = model(batch).logits
        naive = naive_logits(model, batch)
    valid = batch.text_mask()
    torch.testing.assert_close(logits[valid], naive[valid], atol=1e-5, rtol=1e-5)
    # a frozen layer changes the result (the test could fail)
    llava = tiny_model("llava", llm="tiny-llm-mha")
    llava.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(llava(batch).logits[valid], logits[valid], atol=1e-4)


def test_num_frozen_zero_is_llava() -> None:
    llava = tiny_model("llava")
    model = tiny_model("shortv", frozen_layers=None, num_frozen=0)
    model.load_state_dict(llava.state_dict())
    batch = random_batch(llava, batch=2, text=9, positions=[[2, 5], [3, 4]], pad=[2, 0])
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, llava(batch).logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(model.generate(batch, 3), llava.generate(batch, 3))


def test_cached_generation_equals_recomputation() -> None:
    model = tiny_model("shortv", llm="tiny-llm-mha", frozen_layers=(0, 2))
    batch = random_batch(model, batch=2, text=9, positions=[[2, 5], [3, 4]], pad=[2, 0], vocab_limit=50)
    with torch.no_grad():
        tokens = model.generate(batch, 4)
        ids, mask = batch.input_ids, batch.text_mask()
        for step in range(4):
            batch.input_ids, batch.attention_mask = ids, mask
            nxt = model(batch).logits[:, -1].argmax(-1)
            assert torch.equal(nxt, tokens[:, step])
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_per_stage(stage: str) -> None:
    model = tiny_model("shortv").train()
    trainable = model.set_stage(stage)
    batch = random_batch(model, batch=2, text=8, positions=[[2], [3]], labels=True)
    model(batch).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


@pytest.mark.parametrize("frozen", [(0,), (1,)])
def test_counted_equals_analytic_train(frozen) -> None:
    model = build_model("shortv", "tiny-llm", "tiny-clip", options={"frozen_layers": frozen})
    wl = PAPER_WORKLOAD.replace(text_before=3, text_after=5)
    assert count_prefill(model, wl).total == pytest.approx(model.analytic_cost(wl).flops("prefill"), rel=1e-9)
    for stage in ("pretrain", "finetune"):
        w = wl.replace(stage=stage)
        assert count_train_step(model, w).total == pytest.approx(model.analytic_cost(w).flops("train_step"), rel=1e-9)


def test_published_order_and_options() -> None:
    assert replacement_order(32)[:19] == (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19)
    assert ShortVOptions().frozen(32) == frozenset(replacement_order(32)[:19])
    assert len(ShortVOptions().frozen(40)) == 24
    assert ShortVOptions(frozen_layers="5,6,7").frozen(32) == {5, 6, 7}
    assert ShortVOptions(num_frozen="2").frozen(4) == {3, 2}
    with pytest.raises(ConfigError, match="num_frozen"):
        ShortVOptions(num_frozen=40).frozen(32)
    with pytest.raises(ConfigError, match="frozen_layers"):
        ShortVOptions(frozen_layers="1,x")


def test_paper_flops_7b() -> None:
    """ShortV's Table: LLaVA-1.5-7B 8.5 TFLOPs, ShortV (N=19) 4.7 (SAISA convention: 576 visual + 64 text,
    language scope, dense attention, 2 FLOPs/MAC), from the formulas written out here."""
    h, m, t, v, L, n_frozen = 4096, 11008, 64, 576, 32, 19
    n = t + v
    connector = 2 * v * (1024 * h + h * h)
    full = 2 * n * (4 * h + 3 * m) * h + 4 * n * n * h
    frozen = 2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * (t + v) * h
    expected = connector + (L - n_frozen) * full + n_frozen * frozen
    model = build_model("shortv", "vicuna-7b", "clip-vit-l-336")
    ours = model.analytic_cost(PAPER_WORKLOAD).flops("prefill", scope="language")
    assert ours == pytest.approx(expected, rel=1e-12)
    assert round(ours / 1e12, 1) == 4.7
    assert round((connector + L * full) / 1e12, 1) == 8.5
