"""CUDA checks of the attention fast paths (skipped without a GPU): equality with SDPA in bf16, forward
and backward, compiled FlexAttention, no host-device syncs on the flash path, whole models, CUDA-graph
decoding, compiled SAISA layers."""

from __future__ import annotations

import pytest
import torch

from mllm_bench.attention import attend, record_paths
from mllm_bench.registry import architecture_names, architecture_spec
from tests.helpers import random_batch, tiny_model
from tests.test_attention_backends import MASKS, llava_like, qkv, saisa_like

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def to_cuda(mask):
    for name in ("q_pos", "k_pos", "q_valid", "k_valid", "q_visual", "k_visual"):
        setattr(mask, name, getattr(mask, name).to(CUDA))
    return mask


# FlexAttention compiles one kernel per shape (tens of seconds each): flex runs on two masks only.
CASES = [(name, "flash") for name in sorted(MASKS)] + [("naavit", "flex"), ("saisa_1_image", "flex")]


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_fast_backend_equals_sdpa_bf16_forward_and_backward(name: str, backend: str) -> None:
    mask = to_cuda(MASKS[name]())
    q, k, v = (t.to(CUDA, torch.bfloat16).repeat(1, 1, 1, 8).requires_grad_() for t in qkv(2, mask.num_queries,
                                                                                          mask.num_keys))
    valid = mask.q_valid.view(2, 1, -1, 1)
    ref = attend(q, k, v, mask, "sdpa")
    grads_ref = torch.autograd.grad((ref * valid).float().square().sum(), (q, k, v))
    out = attend(q, k, v, mask, backend)
    grads = torch.autograd.grad((out * valid).float().square().sum(), (q, k, v))
    torch.testing.assert_close(out * valid, ref * valid, atol=2e-2, rtol=2e-2)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=5e-2, rtol=5e-2)


def test_flash_paths_do_not_sync_once_structure_is_known() -> None:
    """Layer after layer the flash path launches kernels only: no device-to-host copies."""
    mask = to_cuda(saisa_like(1, [32, 32], 576))
    q, k, v = (t.to(CUDA, torch.bfloat16) for t in qkv(1, 64, 640, heads=8, kv_heads=8, d=64))
    decode = to_cuda(saisa_like(1, [32, 33], 576))  # host-to-device copies happen here, before the check
    decode.q_pos, decode.q_valid, decode.q_visual = (t[:, -1:] for t in (decode.q_pos, decode.q_valid,
                                                                          decode.q_visual))
    k1, v1 = torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    with record_paths() as paths:
        attend(q, k, v, mask, "flash")  # first layer: the structure is inferred (one copy to the host)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                attend(q, k, v, mask, "flash")
            attend(q[:, :, -1:], k1, v1, decode, "flash")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert paths == {"flash:split": 4, "flash:decode_row": 1}


def test_flex_block_mask_runs_compiled_on_naavit() -> None:
    mask = to_cuda(llava_like(1, 128, 512, 128, v2v=False))
    q, k, v = (t.to(CUDA, torch.bfloat16) for t in qkv(1, 768, 768, heads=4, kv_heads=4, d=64))
    with record_paths() as paths:
        out = attend(q, k, v, mask, "flex")
    torch.testing.assert_close(out, attend(q, k, v, mask, "sdpa"), atol=2e-2, rtol=2e-2)
    assert paths == {"flex:block_mask": 1}
    assert mask.memo["block_mask"].to_dense().sum() < 21  # fewer than the 21 causal blocks: visual-visual skipped


@pytest.mark.parametrize("arch", architecture_names())
def test_models_on_cuda_bf16_match_sdpa(arch: str) -> None:
    model = tiny_model(arch).to(CUDA, torch.bfloat16)
    batch = random_batch(model, batch=2, text=12).to(CUDA)
    batch.pixel_values = batch.pixel_values.to(torch.bfloat16)
    with torch.no_grad():
        ref = model(batch).logits.float()
        for backend in sorted({"flash", architecture_spec(arch).fast_attention_backend}):
            model.set_attention_backend(backend)
            out = model(batch).logits.float()
            torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
            logits, cache = model.prefill(batch)
            step, _ = model.decode(logits.argmax(-1), cache)
            assert torch.isfinite(step).all()


@pytest.mark.parametrize("arch", architecture_names())
def test_cuda_graph_decode_generates_the_same_tokens(arch: str) -> None:
    model = tiny_model(arch).to(CUDA)
    batch = random_batch(model, batch=2, text=12).to(CUDA)
    dynamic = model.generate(batch, 6)
    graph = model.generate(batch, 6, decode_mode="graph")
    assert torch.equal(graph, dynamic)


def test_compiled_saisa_layers_match_eager_on_cuda_without_graph_breaks() -> None:
    import torch._dynamo

    from tests.test_compile import layer_calls

    model = tiny_model("saisa").to(CUDA, torch.bfloat16)
    model.set_attention_backend("flash")
    batch = random_batch(model, batch=2, text=12).to(CUDA)
    batch.pixel_values = batch.pixel_values.to(torch.bfloat16)
    with torch.no_grad():
        ref = model(batch).logits.float()
        args, kwargs = layer_calls(model, lambda: model(batch))[0]
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.language_model.layers[0])(*args, **kwargs)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        for layer in model.language_model.layers:
            layer.compile()
        out = model(batch).logits.float()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
