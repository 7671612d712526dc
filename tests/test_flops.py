"""Counted FLOPs: attention is counted on every path we use, attribution is complete, fvcore agrees."""

from __future__ import annotations

import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mllm_bench import PAPER_WORKLOAD, Workload, build_model
from mllm_bench.config import ConfigError
from mllm_bench.costmodel import COMPONENTS
from mllm_bench.flops import (
    CPU_SDPA_FORMULAS,
    ComponentFlopCounter,
    classify_modules,
    count_call,
    count_prefill,
    count_train_step,
    fvcore_cross_check,
)
from mllm_bench.masks import causal_mask
from mllm_bench.presets import vision_preset
from mllm_bench.registry import architecture_names, architecture_spec
from mllm_bench.vision import build_vision_tower, encode_images
from tests.helpers import tiny_model

B, H, TQ, TK, D = 2, 4, 6, 9, 8
ATTN = 4 * B * H * TQ * TK * D  # QK^T + PV, 2 FLOPs per multiply-add


def _qkv(device: str, grad: bool = False):
    q = torch.randn(B, H, TQ, D, device=device, requires_grad=grad)
    k = torch.randn(B, H, TK, D, device=device, requires_grad=grad)
    v = torch.randn(B, H, TK, D, device=device, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("kind", ["causal", "bool_mask", "no_mask"])
def test_sdpa_counted_on_every_path(device: str, kind: str) -> None:
    q, k, v = _qkv(device, grad=True)
    mask = torch.ones(B, 1, TQ, TK, dtype=torch.bool, device=device)
    kwargs = {"causal": {"is_causal": True}, "bool_mask": {"attn_mask": mask}, "no_mask": {}}[kind]
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS) as fc:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert fc.get_total_flops() == ATTN
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS) as fc:
        out.sum().backward()
    # meta runs the math path (4 bmm); CPU's flash kernel uses torch's formula (recomputes the scores: 5)
    assert fc.get_total_flops() == (2 * ATTN if device == "meta" else 5 * ATTN // 2)


def test_clip_attention_counted_on_meta_and_cpu() -> None:
    cfg = vision_preset("tiny-clip")
    n = cfg.num_patches + 1
    for device in ("meta", "cpu"):
        with torch.device(device):
            tower = build_vision_tower(cfg)
        pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, device=device)
        with ComponentFlopCounter(tower) as counter, torch.no_grad():
            encode_images(tower, cfg, pixels)
        ops = counter.result().by_op
        attn = sum(f for op, f in ops.items() if "bmm" in op or "scaled_dot_product" in op)
        assert attn == 4 * 2 * n * n * cfg.hidden_size * cfg.layers_run


@pytest.mark.parametrize("arch", architecture_names())
def test_component_counter_matches_flop_counter_mode(arch: str) -> None:
    model = build_model(arch, "tiny-llm", "tiny-clip", options=dict(architecture_spec(arch).tiny_options))
    wl = Workload(batch_size=2, text_before=3, text_after=4, stage="pretrain")
    ours = count_train_step(model, wl)
    model.set_stage("pretrain")
    batch = model.example_batch(wl)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS) as fc:
        model(batch).loss.backward()
    model.set_stage("inference")
    assert ours.total == fc.get_total_flops() > 0
    # every FLOP lands in a declared component
    assert set(ours.by_component()) <= set(COMPONENTS)
    assert ours.by_pass()["backward"] > 0


def test_classify_modules_names_the_components() -> None:
    comp = classify_modules(build_model("flamingo", "tiny-llm", "tiny-clip", options={"cross_attn_every": 1}))
    assert comp["vision_tower.encoder.layers.0.self_attn.q_proj"] == "vision"
    assert comp["language_model.layers.0.self_attn"] == "attn_scores"
    assert comp["language_model.layers.0.self_attn.k_proj"] == "attn_proj"
    assert comp["language_model.layers.1.mlp.down_proj"] == "ffn"
    assert comp["gated_cross_attn_layers.0.attn.to_q"] == "cross_attn"
    assert comp["perceiver.layers.0.attn.to_kv"] == "connector"
    assert comp["lm_head"] == "lm_head"


def test_importing_the_counter_leaves_torchs_registry_alone() -> None:
    from torch.utils.flop_counter import flop_registry

    assert CPU_SDPA_FORMULAS
    assert not set(CPU_SDPA_FORMULAS) & set(flop_registry)
    q, k, v = _qkv("cpu")
    with FlopCounterMode(display=False) as fc:  # torch's own counter, no custom mapping: still 0 on CPU
        F.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 0


class _Undeclared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Declared(_Undeclared):
    cost_component = "connector"


def test_flops_in_a_module_without_a_component_are_an_error() -> None:
    root = _Undeclared()
    with pytest.raises(ConfigError, match=r"module inner \(Linear\).*declares no cost component"):
        count_call(root, lambda: root(torch.ones(2, 4)))
    counted = count_call(declared := _Declared(), lambda: declared(torch.ones(2, 4)))
    assert counted.by_component() == {"connector": 2 * 2 * 4 * 4}


def test_a_component_outside_the_list_is_an_error() -> None:
    class Wrong(_Undeclared):
        cost_component = "crossattention"

    with pytest.raises(ConfigError, match="declares cost component 'crossattention'"):
        classify_modules(Wrong())


def test_backward_attributed_to_forward_modules() -> None:
    """Pretrain LLaVA: the frozen decoder's linears cost 1x forward in backward (input gradients only)."""
    model = build_model("llava", "tiny-llm", "tiny-clip")
    c = count_train_step(model, Workload(batch_size=1, stage="pretrain", text_before=2, text_after=3))
    assert c.flops(component="attn_proj", pass_="backward") == c.flops(component="attn_proj", pass_="forward")
    assert c.flops(component="ffn", pass_="backward") == c.flops(component="ffn", pass_="forward")
    assert c.flops(component="attn_scores", pass_="backward") == 2 * c.flops(component="attn_scores", pass_="forward")
    assert c.flops(component="vision", pass_="backward") == 0


def test_7b_counts_on_meta_without_allocating() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model("llava")
    c = count_prefill(model, PAPER_WORKLOAD)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert 8.4e12 < c.flops("language") < 8.6e12
    assert grown_mib < 500  # 7B bf16 weights would be 13 GiB


class _Tower(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(self.model.vision_tower, self.model.vision_config, pixels)


class _Decoder(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.language_model(x, positions, causal_mask(positions)))


def test_fvcore_agrees_once_conventions_are_accounted_for() -> None:
    """fvcore counts a multiply-add once and skips SDPA (it lists it); otherwise the totals agree."""
    model = tiny_model("llava")
    pixels = torch.randn(2, 3, 32, 32)
    x = torch.randn(2, 12, model.llm_config.hidden_size)
    positions = torch.arange(12).expand(2, 12)
    for module, inputs in ((_Tower(model), (pixels,)), (_Decoder(model), (x, positions))):
        check = fvcore_cross_check(module, inputs)
        assert check["ours_sdpa_flops"] > 0
        assert any("scaled_dot_product" in op for op in check["fvcore_skipped_ops"])
        assert check["fvcore_macs"] == pytest.approx(check["expected_fvcore"], rel=1e-9)
        assert set(check["fvcore_elementwise"]) <= {"layer_norm"}
