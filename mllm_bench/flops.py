"""Counted FLOPs: ``torch.utils.flop_counter``'s formulas on meta tensors, attributed to components.

What runs where (torch 2.13, checked by ``tests/test_flops.py``):

* On **meta** tensors ``F.scaled_dot_product_attention`` (with ``is_causal``, a boolean mask or no
  mask; ours and transformers' CLIP/SigLIP attention) decomposes into the math path: two ``bmm``
  forward, four ``bmm`` backward, all counted by the stock formulas. Nothing is allocated, so 7B/13B
  count in seconds.
* On **CPU** it runs ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which
  the stock counter reports as 0. :func:`register_missing_formulas` registers them with torch's own
  SDPA formulas (forward: QK^T + PV; backward: torch's convention, which also counts recomputing the
  scores, 5 bmm-equivalents vs the math path's 4).

Attribution: module forward hooks keep a stack of fully-qualified module names; each op that gets
an autograd node records its module under the node's sequence number, so backward ops (run by the
autograd engine, outside any module) are attributed to the module whose forward created the node.
Ops run while a module's forward is on the stack inside backward are activation-checkpoint
recomputation. Module names map to components by :func:`classify_modules`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from .config import ConfigError
from .costmodel import in_scope
from .decoder import SelfAttention, SwiGLU
from .workload import Workload

aten = torch.ops.aten
_CROSS_ATTN = re.compile(r"(^|\.)(\w*cross\w*|\w*xattn\w*)(\.|$)", re.IGNORECASE)


def register_missing_formulas() -> list[str]:
    """Register FLOP formulas for attention kernels the stock counter reports as 0; returns what it added."""
    added = []

    def fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", fwd),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd),
        ("_scaled_dot_product_fused_attention_overrideable", fwd),
        ("_scaled_dot_product_fused_attention_overrideable_backward", bwd),
    ):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:
            register_flop_formula(op)(formula)
            added.append(name)
    return added


register_missing_formulas()


def classify_modules(model: nn.Module) -> dict[str, str]:
    """Component of every module name (``""`` = the model itself, ``other``).

    vision_tower.* -> vision; lm_head -> lm_head; embed_tokens -> embedding; a decoder
    :class:`SelfAttention` -> attn_scores (its own ops) with its linear children -> attn_proj;
    :class:`SwiGLU` -> ffn; a name with ``cross``/``xattn`` -> cross_attn; any other top-level
    module (projectors, resamplers) -> connector; the decoder's own glue -> other.
    """
    comp: dict[str, str] = {}
    for name, mod in model.named_modules():
        parent = comp.get(name.rpartition(".")[0], "other") if "." in name else "other"
        if not name:
            c = "other"
        elif name.startswith("vision_tower"):
            c = "vision"
        elif name.startswith("lm_head"):
            c = "lm_head"
        elif name.startswith("language_model.embed_tokens"):
            c = "embedding"
        elif _CROSS_ATTN.search(name):
            c = "cross_attn"
        elif isinstance(mod, SelfAttention):
            c = "attn_scores"
        elif parent == "attn_scores":
            c = "attn_proj"
        elif isinstance(mod, SwiGLU):
            c = "ffn"
        elif parent != "other":
            c = parent
        elif name.startswith("language_model"):
            c = "other"
        else:
            c = "connector"
        comp[name] = c
    return comp


@dataclass
class CountedFlops:
    """FLOPs counted for one call: by (module, pass); components and passes derived."""

    by_module_pass: dict[tuple[str, str], float] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    by_op: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.by_module_pass.values()))

    def flops(self, scope: str = "total", component: str | None = None, pass_: str | None = None) -> float:
        out = 0.0
        for (module, p), f in self.by_module_pass.items():
            c = self.components.get(module, "other")
            if in_scope(c, scope) and (component is None or c == component) and (pass_ is None or p == pass_):
                out += f
        return out

    def by_component(self, scope: str = "total", pass_: str | None = None) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (module, p), f in self.by_module_pass.items():
            c = self.components.get(module, "other")
            if in_scope(c, scope) and (pass_ is None or p == pass_):
                out[c] += f
        return dict(out)

    def by_pass(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (_, p), f in self.by_module_pass.items():
            out[p] += f
        return dict(out)


def _needs_grad(args: Any) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in tree_flatten(args)[0])


class ComponentFlopCounter(TorchDispatchMode):
    """Count FLOPs of everything run inside, with torch's formula registry, by module and pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.components = classify_modules(model)
        self.stack: list[str] = []
        self.seq_module: dict[int, str] = {}
        self.counts: dict[tuple[str, str], float] = defaultdict(float)
        self.ops: dict[str, float] = defaultdict(float)
        self._handles: list[Any] = []

    def _pre(self, mod: nn.Module, _inputs: Any) -> None:
        name = self.names.get(id(mod))
        if name is not None:
            self.stack.append(name)

    def _post(self, mod: nn.Module, _inputs: Any, _output: Any) -> None:
        name = self.names.get(id(mod))
        if name is not None and self.stack and self.stack[-1] == name:
            self.stack.pop()

    def __enter__(self) -> ComponentFlopCounter:
        self._handles = [register_module_forward_pre_hook(self._pre),
                         register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self.stack.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:
            return out
        flops = formula(*args, **kwargs, out_val=out)
        node = torch._C._current_autograd_node()
        if self.stack:
            module = self.stack[-1]
            pass_ = "forward" if node is None else "recompute"
            if node is None and _needs_grad((args, kwargs)):
                self.seq_module[torch._C._autograd._get_sequence_nr() - 1] = module
        elif node is not None:
            module, pass_ = self.seq_module.get(node._sequence_nr(), ""), "backward"
        else:
            module, pass_ = "", "forward"
        self.counts[(module, pass_)] += flops
        self.ops[str(func._overloadpacket)] += flops
        return out

    def result(self) -> CountedFlops:
        return CountedFlops(dict(self.counts), self.components, dict(self.ops))


def count_call(model: nn.Module, fn: Callable[[], Any]) -> CountedFlops:
    """FLOPs of ``fn()`` (which runs ``model``), attributed to ``model``'s modules."""
    with ComponentFlopCounter(model) as counter:
        fn()
    return counter.result()


def count_prefill(model: Any, workload: Workload) -> CountedFlops:
    """Prefill of ``workload``'s prompt (vision, connector, decoder, last-token logits)."""
    model.set_stage("inference")
    batch = model.example_batch(workload.replace(stage="inference"))
    with torch.no_grad():
        return count_call(model, lambda: model.prefill(batch))


def count_inference(model: Any, workload: Workload,
                    context_len: int | None = None) -> tuple[CountedFlops, CountedFlops, int]:
    """Prefill, then one decode step from its cache (``context_len`` cached tokens, default the prompt).

    A different context is reached by lengthening (or shortening) ``text_after`` and prefilling
    again (uncounted). Returns the prefill count, the decode count and the decode context length.
    """
    model.set_stage("inference")
    wl = workload.replace(stage="inference")
    with torch.no_grad():
        holder: dict[str, Any] = {}
        prefill = count_call(model, lambda: holder.setdefault("out", model.prefill(model.example_batch(wl))))
        cache = holder["out"][1]
        if context_len is not None and context_len != cache.length:
            delta = context_len - cache.length
            if wl.text_after + delta < 0 or wl.num_text_tokens + delta < 1:
                raise ConfigError(f"context_len {context_len} is shorter than the prompt's non-text part")
            wl = wl.replace(text_after=wl.text_after + delta)
            _, cache = model.prefill(model.example_batch(wl))
        length = cache.length
        token = torch.zeros(wl.batch_size, dtype=torch.long, device=torch.device(wl.device))
        decode = count_call(model, lambda: model.decode(token, cache))
    return prefill, decode, length


def count_decode(model: Any, workload: Workload, context_len: int | None = None) -> tuple[CountedFlops, int]:
    """One decode step after a prefill (see :func:`count_inference`): the count and its context length."""
    _, decode, length = count_inference(model, workload, context_len)
    return decode, length


def count_train_step(model: Any, workload: Workload, stage: str | None = None) -> CountedFlops:
    """Forward + backward of a training step (loss on text); weight gradients for ``stage``'s parameters."""
    stage = stage or workload.stage
    if stage == "inference":
        raise ConfigError("count_train_step needs stage 'pretrain' or 'finetune', got 'inference'")
    wl = workload.replace(stage=stage)
    trainable = model.set_stage(stage)
    model.set_gradient_checkpointing(wl.gradient_checkpointing)
    batch = model.example_batch(wl)

    def step() -> None:
        out = model(batch)
        out.loss.backward()

    try:
        return count_call(model, step)
    finally:
        for p in trainable.values():
            p.grad = None
        model.set_gradient_checkpointing(False)
        model.set_stage("inference")


_FVCORE_MATMUL_OPS = frozenset({"linear", "matmul", "bmm", "addmm", "mm", "conv", "einsum", "baddbmm"})


def fvcore_cross_check(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """fvcore's count of ``module(*inputs)`` next to ours, on real tensors (e.g. CPU).

    fvcore traces with ``torch.jit`` (so ``module`` must be traceable: our full models are not, their
    vision tower and decoder are), counts one FLOP per multiply-add and skips ops it has no handle
    for (SDPA among them), and it counts some element-wise ops (LayerNorm) we do not.
    ``fvcore_macs`` is its matmul/conv count; ``expected_fvcore`` ours without SDPA, halved.
    """
    from fvcore.nn import FlopCountAnalysis

    module = module.eval()
    with torch.no_grad():
        ours = count_call(module, lambda: module(*inputs))
        analysis = FlopCountAnalysis(module, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fv_total = float(analysis.total())
        fv_ops = {op: float(f) for op, f in analysis.by_operator().items()}
        skipped = dict(analysis.unsupported_ops())
    sdpa = sum(f for op, f in ours.by_op.items() if "scaled_dot_product" in op)
    elementwise = {op: f for op, f in fv_ops.items() if op not in _FVCORE_MATMUL_OPS}
    return {
        "fvcore_total": fv_total,
        "fvcore_by_operator": fv_ops,
        "fvcore_elementwise": elementwise,  # e.g. layer_norm: fvcore counts it, we (and torch) do not
        "fvcore_macs": fv_total - sum(elementwise.values()),
        "ours_flops": ours.total,
        "ours_sdpa_flops": sdpa,
        "expected_fvcore": (ours.total - sdpa) / 2,
        "fvcore_skipped_ops": skipped,
    }
