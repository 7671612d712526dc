"""Attention fast paths ("flash", "flex") against the SDPA reference: masks, structure, whole models."""

from __future__ import annotations

import pytest
import torch
from mllm_bench.architectures.naavit import NoVisualToVisual

from mllm_bench.attention import attend, available_backends, block_mask, record_paths
from mllm_bench.config import ConfigError
from mllm_bench.masks import AttentionMask, MaskStructure, QueryBlock, causal_mask, causal_structure, infer_structure
from mllm_bench.registry import architecture_names
from tests.helpers import random_batch, set_gates, tiny_model

FAST = ("flash", "flex")


def qkv(b: int, tq: int, tk: int, heads: int = 4, kv_heads: int = 2, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, tq, d, generator=gen), torch.randn(b, kv_heads, tk, d, generator=gen),
            torch.randn(b, kv_heads, tk, d, generator=gen))


def saisa_like(b: int, before: list[int], visual: int) -> AttentionMask:
    """Text queries over [visual keys of every image, text keys]; images of ``visual`` tokens each, the
    text segments of lengths ``before`` (segment i precedes image i; the last follows the last image)."""
    text_pos, vis_pos, pos = [], [], 0
    for i, n in enumerate(before):
        text_pos += list(range(pos, pos + n))
        pos += n
        if i < len(before) - 1:
            vis_pos += list(range(pos, pos + visual))
            pos += visual
    q = torch.tensor([text_pos] * b)
    kv = torch.tensor([vis_pos] * b)
    yes_v, yes_t = torch.ones_like(kv, dtype=torch.bool), torch.ones_like(q, dtype=torch.bool)
    return AttentionMask(q, torch.cat([kv, q], 1), yes_t, torch.cat([yes_v, yes_t], 1), ~yes_t,
                         torch.cat([yes_v, ~yes_t], 1))


def llava_like(b: int, before: int, visual: int, after: int, v2v: bool = True) -> AttentionMask:
    n = before + visual + after
    vis = torch.zeros(b, n, dtype=torch.bool)
    vis[:, before:before + visual] = True
    return causal_mask(torch.arange(n).expand(b, n), visual=vis, rule=None if v2v else NoVisualToVisual())


def padded(b: int, n: int) -> AttentionMask:
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, :3] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return causal_mask(pos, valid)


def chunk(b: int, cached: int, new: int) -> AttentionMask:
    """``new`` queries after ``cached`` keys (a decode step or a prefix-free chunk)."""
    k = torch.arange(cached + new).expand(b, -1)
    q = k[:, cached:]
    yes_q, yes_k = torch.ones_like(q, dtype=torch.bool), torch.ones_like(k, dtype=torch.bool)
    return AttentionMask(q, k, yes_q, yes_k, ~yes_q, ~yes_k)


MASKS = {
    "causal": lambda: llava_like(2, 3, 5, 4),
    "naavit": lambda: llava_like(2, 3, 5, 4, v2v=False),
    "padded": lambda: padded(2, 9),
    "chunk": lambda: chunk(2, 6, 4),
    "decode": lambda: chunk(2, 9, 1),
    "saisa_1_image": lambda: saisa_like(2, [3, 4], 5),
    "saisa_image_first": lambda: saisa_like(2, [0, 6], 5),
    "saisa_3_images": lambda: saisa_like(2, [2, 3, 1, 4], 3),
}


def test_fast_backends_are_registered_and_unknown_names_fail() -> None:
    assert {"sdpa", "math", "flash", "flex"} <= set(available_backends())
    q, k, v = qkv(1, 4, 4)
    with pytest.raises(ConfigError, match="flash"):
        attend(q, k, v, llava_like(1, 1, 2, 1), "flashy")


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("backend", FAST)
def test_fast_backend_equals_sdpa(name: str, backend: str) -> None:
    mask = MASKS[name]()
    q, k, v = qkv(2, mask.num_queries, mask.num_keys)
    ref = attend(q, k, v, mask, "sdpa")
    out = attend(q, k, v, mask, backend)
    valid = mask.q_valid.view(2, 1, -1, 1)
    torch.testing.assert_close(out * valid, ref * valid, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_inferred_structure_is_the_dense_mask(name: str) -> None:
    mask = MASKS[name]()
    structure = infer_structure(mask)
    if name in ("naavit", "padded"):
        assert structure is None  # no static structure: fast paths fall back to a dense mask
        return
    assert structure is not None
    assert torch.equal(structure.dense(), mask.dense()[0, 0])


def test_saisa_structure_splits_prefix_and_suffix_without_copies() -> None:
    s = infer_structure(saisa_like(1, [3, 4], 5))  # keys: 5 visual, then 7 text
    assert s.kind == "split"
    assert s.blocks == (QueryBlock(0, 3, ((5, 8),)), QueryBlock(3, 7, ((0, 12),)))
    s3 = infer_structure(saisa_like(1, [2, 3, 1, 4], 3))  # 9 visual keys, 10 text
    assert [b.k_ranges for b in s3.blocks] == [((9, 11),), ((0, 3), (9, 14)), ((0, 6), (9, 15)), ((0, 19),)]
    assert infer_structure(llava_like(1, 2, 3, 2)).kind == "causal"
    assert infer_structure(chunk(1, 5, 3)).kind == "lower_right"


def test_structure_hint_is_used_and_inference_runs_once_per_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    import mllm_bench.masks as masks

    calls = []
    real = masks.infer_structure
    monkeypatch.setattr(masks, "infer_structure", lambda m: calls.append(1) or real(m))
    mask = saisa_like(1, [3, 4], 5)
    q, k, v = qkv(1, 7, 12)
    for _ in range(3):  # three layers
        attend(q, k, v, mask, "flash")
    assert len(calls) == 1
    hinted = saisa_like(1, [3, 4], 5)
    hinted.structure = causal_structure(7, 12)  # a (deliberately different) hint wins over inference
    with record_paths() as paths:
        attend(q, k, v, hinted, "flash")
    assert paths == {"flash:lower_right": 1} and len(calls) == 1


def test_zero_key_block_gives_zero_output() -> None:
    structure = MaskStructure(3, 4, (QueryBlock(0, 1, ()), QueryBlock(1, 3, ((0, 4),), causal=False)))
    mask = chunk(1, 1, 3)
    mask.structure = structure
    q, k, v = qkv(1, 3, 4)
    out = attend(q, k, v, mask, "flash")
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    torch.testing.assert_close(out[:, :, 1:], torch.nn.functional.scaled_dot_product_attention(
        q[:, :, 1:], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))


def test_naavit_block_mask_skips_visual_visual_blocks() -> None:
    """With 128-token blocks, a 512-token image leaves its off-diagonal visual-visual blocks out."""
    mask = llava_like(1, 128, 512, 128, v2v=False)
    bm = block_mask(mask, torch.device("cpu"))
    full = llava_like(1, 128, 512, 128, v2v=True)
    bm_full = block_mask(full, torch.device("cpu"))
    blocks = bm.to_dense()[0, 0].bool()  # (6, 6) query block x key block
    causal_blocks = bm_full.to_dense()[0, 0].bool()
    assert int(causal_blocks.sum()) == 21  # lower triangle of 6 x 6
    # image blocks 1..4: a visual query block sees text block 0 and its own (diagonal) block only
    for qb in range(1, 5):
        assert blocks[qb].nonzero().flatten().tolist() == [0, qb]
    assert int(blocks.sum()) == 21 - 6


@pytest.mark.parametrize("arch", architecture_names())
@pytest.mark.parametrize("backend", FAST)
def test_models_match_sdpa_with_fast_backends(arch: str, backend: str) -> None:
    model = tiny_model(arch)
    set_gates(model, 0.5)  # Flamingo's; a no-op for the others
    # NAAViT with one image: its rule applies to the whole prompt (no static structure)
    batch = random_batch(model, batch=2, text=9, positions=[[3], [3]] if arch == "naavit" else [[2, 6], [2, 6]])
    with torch.no_grad():
        ref = model(batch).logits
        ref_gen = model.generate(batch, 3)
        model.set_attention_backend(backend)
        with record_paths() as paths:
            out = model(batch).logits
            gen = model.generate(batch, 3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)
    # besides the backend's own paths only the explicit probabilities a layer was asked for (math:weights)
    assert all(p.startswith(backend + ":") or p == "math:weights" for p in paths)
    expected = {  # the prefill path each built-in architecture's mask takes
        ("llava", "flash"): "flash:causal", ("flamingo", "flash"): "flash:causal",
        ("saisa", "flash"): "flash:split", ("naavit", "flash"): "flash:dense",
    }.get((arch, backend), "flex:block_mask" if arch in ("llava", "naavit", "saisa", "flamingo") else None)
    assert (expected is None or expected in paths) and f"{backend}:decode_row" in paths


@pytest.mark.parametrize("arch", ("llava", "saisa"))
def test_flash_backward_matches_sdpa(arch: str) -> None:
    model = tiny_model(arch)
    batch = random_batch(model, batch=2, text=8, labels=True)
    grads = {}
    for backend in ("sdpa", "flash"):
        model.set_attention_backend(backend)
        model.zero_grad()
        model.set_stage("finetune")
        model(batch).loss.backward()
        grads[backend] = model.language_model.layers[0].self_attn.q_proj.weight.grad.clone()
    torch.testing.assert_close(grads["flash"], grads["sdpa"], atol=1e-5, rtol=1e-4)


def test_masks_are_built_once_per_forward_not_per_layer():
    from mllm_bench.masks import causal_mask

    pos = torch.arange(6).expand(2, 6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    mask = causal_mask(pos, valid)
    assert mask.dense() is mask.dense()  # every layer reuses one tensor
    assert mask.is_plain_causal() is False and "plain_causal" in mask.memo
    assert bool(mask.dense()[0, 0, 3, 4]) is False and bool(mask.dense()[0, 0, 4, 3]) is True
