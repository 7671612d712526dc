"""Counted FLOPs: ``torch.utils.flop_counter``'s formulas on meta tensors, attributed to components.

What runs where (torch 2.13, checked by ``tests/test_flops.py``):

* On **meta** tensors ``F.scaled_dot_product_attention`` (with ``is_causal``, a boolean mask or no
  mask; ours and transformers' CLIP/SigLIP attention) decomposes into the math path: two ``bmm``
  forward, four ``bmm`` backward, all counted by the stock formulas. Nothing is allocated, so 7B/13B
  count in seconds.
* On **CPU** it runs ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward), which
  the stock counter reports as 0. :data:`CPU_SDPA_FORMULAS` gives them torch's own SDPA formulas
  (forward: QK^T + PV; backward: torch's convention, which also counts recomputing the scores, 5
  bmm-equivalents vs the math path's 4). The counter here uses them beside torch's registry; pass
  them to ``FlopCounterMode(custom_mapping=CPU_SDPA_FORMULAS)`` to get the same with torch's counter.
  Nothing is written into torch's global registry.

Attribution: module forward hooks keep a stack of fully-qualified module names; each op that gets
an autograd node records its module under the node's sequence number, so backward ops (run by the
autograd engine, outside any module) are attributed to the module whose forward created the node.
Ops run while a module's forward is on the stack inside backward are activation-checkpoint
recomputation. Each module's cost component is declared (:func:`classify_modules`); FLOPs in a module
that declares none are an error, never dropped.

Reuse: without gradients (inference), each block of a ``ModuleList`` (decoder layers, vision encoder
layers, cross-attention blocks) is counted once per distinct call: the key is :data:`COUNT_CACHE_VERSION`,
the block's structure (module classes and the code of their ``forward``, parameter and buffer shapes,
dtypes and ``requires_grad``, plain attributes, children) and its inputs (tensor shapes, strides,
dtypes, ``requires_grad``; every other argument by value, objects by their fields). A later call with the
same key gets the recorded FLOPs under its own module names, in the same order, so every number and
breakdown equals a full count (``tests/test_speed.py`` checks each registered architecture). On meta
tensors such a call is not run at all when the first one's effects were provably only its outputs and
attributes it set on plain-object arguments (a layer's KV cache): fresh tensors of the recorded layouts
stand in for both. Otherwise (any other effect, tensors off meta, attention paths being recorded) it runs
uncounted, so its side effects still happen. Anything the key cannot describe is counted in full. The
cache lives for one :func:`count_call`.

With reuse on, meta kernels are also answered from :data:`~mllm_bench.meta_shapes.META_OUTPUTS` (the
outputs' layout of an op already run on the same argument metadata; the replays of reused blocks run
under it too): the counted ops, their shapes and so every number are the same, in a fraction of the time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from .attention import paths_recorded
from .config import ConfigError
from .costmodel import COMPONENTS, in_scope
from .meta_shapes import META_OUTPUTS, kernels_without_dynamo_shim, layout_of, rebuild
from .model import MLLM
from .workload import Workload

aten = torch.ops.aten


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# Attention kernels torch's counter reports as 0 (shape formulas, as FlopCounterMode's custom_mapping takes them).
CPU_SDPA_FORMULAS: dict[Any, Callable[..., int]] = {
    getattr(aten, name): formula
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward),
        ("_scaled_dot_product_fused_attention_overrideable", _sdpa_forward),
        ("_scaled_dot_product_fused_attention_overrideable_backward", _sdpa_backward),
    )
    if hasattr(aten, name)
}


def flop_formulas() -> dict[Any, Callable[..., int]]:
    """torch's registry plus :data:`CPU_SDPA_FORMULAS`, each called as ``formula(*args, out_val=out)``."""
    extra = {op: shape_wrapper(f) for op, f in CPU_SDPA_FORMULAS.items() if op not in flop_registry}
    return {**flop_registry, **extra}


def classify_modules(model: nn.Module, declared: dict[str, str] | None = None,
                     named: list[tuple[str, nn.Module]] | None = None) -> dict[str, str | None]:
    """Cost component of every module name (``""`` is the model itself; None: declares none).

    A module's component is, first, the one ``declared`` for its name (an :class:`MLLM`'s
    ``module_components()`` by default: ``lm_head``, the embedding, its spec's ``components``), else its
    class's ``cost_component`` attribute, else what its parent gives its children (the parent's
    ``cost_component_children``, default its own component). Unknown names are an error. ``named``:
    ``list(model.named_modules())``, when the caller has it.
    """
    if declared is None:
        declared = model.module_components() if isinstance(model, MLLM) else {}
    comp: dict[str, str | None] = {}
    children: dict[str, str | None] = {}
    for name, mod in model.named_modules() if named is None else named:
        inherited = children.get(name.rpartition(".")[0]) if name else None
        c = declared.get(name) or _declared(mod, "cost_component") or inherited
        if c is not None and c not in COMPONENTS:
            raise ConfigError(f"module {name or '<model>'} ({type(mod).__name__}) declares cost component {c!r}; "
                              f"allowed: {list(COMPONENTS)}")
        comp[name] = c
        children[name] = _declared(mod, "cost_component_children") or c
    return comp


def _declared(mod: nn.Module, attribute: str) -> str | None:
    """``getattr(mod, attribute, None)`` for a plain attribute, without nn.Module's slow path for a missing one
    (a count classifies every module of the model, twice per phase)."""
    own = vars(mod).get(attribute)
    return own if own is not None else getattr(type(mod), attribute, None)


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
            c = self.components[module]
            if in_scope(c, scope) and (component is None or c == component) and (pass_ is None or p == pass_):
                out += f
        return out

    def by_component(self, scope: str = "total", pass_: str | None = None) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (module, p), f in self.by_module_pass.items():
            c = self.components[module]
            if in_scope(c, scope) and (pass_ is None or p == pass_):
                out[c] += f
        return dict(out)

    def by_pass(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (_, p), f in self.by_module_pass.items():
            out[p] += f
        return dict(out)


def _undeclared(module: str, model: nn.Module, flops: float) -> ConfigError:
    kind = type(model.get_submodule(module)).__name__ if module else type(model).__name__
    return ConfigError(
        f"{flops:.0f} FLOPs were counted in module {module or '<model>'} ({kind}), which declares no cost "
        f"component; set `cost_component` on its class or name it in the architecture's ArchSpec.components "
        f"(allowed: {list(COMPONENTS)})"
    )


# Part of every reuse key: bump it when what a block's count depends on changes beyond what the key holds.
COUNT_CACHE_VERSION = 1
_MAX_DEPTH = 12


class _Uncacheable(Exception):
    """An argument the reuse key cannot describe: the call is counted in full."""


def _signature(obj: Any, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """A hashable description of everything in ``obj`` a FLOP count on meta tensors can depend on."""
    if depth > _MAX_DEPTH:
        raise _Uncacheable("too deep")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return (type(obj).__name__, obj)
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), tuple(obj.stride()) if obj.layout == torch.strided else (),
                str(obj.dtype), obj.requires_grad, obj.device.type, str(obj.layout))
    if isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return (type(obj).__name__, str(obj))
    if id(obj) in seen:
        return ("cycle",)
    inner = seen | {id(obj)}
    if isinstance(obj, nn.Module):
        return _module_signature(obj, depth + 1, inner)
    if isinstance(obj, (tuple, list)):
        return (type(obj).__qualname__, tuple(_signature(v, depth + 1, inner) for v in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((repr(k), _signature(v, depth + 1, inner)) for k, v in obj.items()))
    if isinstance(obj, (set, frozenset)):
        return (type(obj).__name__, tuple(sorted(repr(v) for v in obj)))
    if isinstance(obj, type):
        return ("type", obj.__module__, obj.__qualname__)
    if hasattr(obj, "__code__"):  # a function: its code, defaults and captured values
        cells = tuple(_signature(c.cell_contents, depth + 1, inner) for c in (obj.__closure__ or ()))
        return ("function", id(obj.__code__), _signature(obj.__defaults__, depth + 1, inner), cells)
    if hasattr(obj, "__func__") and hasattr(obj, "__self__"):  # a bound method
        return ("method", _signature(obj.__func__, depth + 1, inner), _signature(obj.__self__, depth + 1, inner))
    fields = getattr(obj, "__dict__", None)
    slots = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ()) if hasattr(obj, n)]
    if fields is None and not slots:
        if type(obj).__hash__ is not None and type(obj).__repr__ is not object.__repr__:
            return (type(obj).__module__, type(obj).__qualname__, repr(obj))  # enums and other value types
        raise _Uncacheable(type(obj).__qualname__)
    items = {**{n: getattr(obj, n) for n in slots}, **(fields or {})}
    return (type(obj).__module__, type(obj).__qualname__,
            tuple((k, _signature(v, depth + 1, inner)) for k, v in sorted(items.items())))


def _module_signature(mod: nn.Module, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """A module's structure: class and ``forward`` code, own parameters and buffers, plain attributes, hooks,
    children (each the same, by name)."""
    cls = type(mod)
    # the module's own registries, read directly (every name, a tensor registered twice included): this runs for
    # every block call of a count, and the public iterators cost several times more
    own = tuple((n, p.shape, p.dtype, p.requires_grad) for n, p in mod._parameters.items() if p is not None)
    bufs = tuple((n, b.shape, b.dtype) for n, b in mod._buffers.items() if b is not None)
    plain = {k: v for k, v in vars(mod).items() if k[0] != "_" and not getattr(v, "_reuse_wrapper", False)}
    hooks = tuple(len(getattr(mod, h, ())) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"))
    forward = getattr(cls.forward, "__code__", None)
    return (cls.__module__, cls.__qualname__, id(forward), own, bufs, hooks,
            _signature(plain, depth + 1, seen),
            tuple((n, _module_signature(c, depth + 1, seen)) for n, c in mod._modules.items() if c is not None))


class _Recorder:
    """The counts made inside one block's call, by module name relative to the block, in first-seen order."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.usable = prefix, True
        self.counts: dict[tuple[str, str], float] = {}
        self.ops: dict[str, float] = {}

    def add(self, module: str, pass_: str, flops: float, op: str) -> None:
        if module != self.prefix and not module.startswith(self.prefix + "."):
            self.usable = False  # an op of a module outside the block: its names cannot be mapped
            return
        rel = (module[len(self.prefix):], pass_)
        self.counts[rel] = self.counts.get(rel, 0) + flops
        if op:
            self.ops[op] = self.ops.get(op, 0) + flops


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int | str, Any]:
    """A call's arguments by position (positional ones) or name (keyword ones)."""
    return {**dict(enumerate(args)), **kwargs}


def _argument_attributes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """The attributes of each argument that is a plain object (e.g. a layer's KV cache), shallow-copied."""
    return {pos: dict(vars(obj)) for pos, obj in _arguments(args, kwargs).items()
            if hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, nn.Module, type))
            and not callable(obj)}


@dataclass(frozen=True)
class _Replay:
    """A reused block's call reproduced without running it, on meta tensors: fresh outputs of the recorded
    layout, and the attributes it set on its arguments (a KV cache's keys and values) set again to fresh
    tensors of their recorded layout. Made only when the first call's every other effect is ruled out: its
    outputs and new attributes are meta tensors (or None), the block's own signature is unchanged, and with
    those attributes put back the arguments' signature is what it was before the call."""

    out: Any
    effects: tuple[tuple[int | str, str, Any], ...]  # (argument position or name, attribute, layout)

    @classmethod
    def of(cls, block: nn.Module, key: Any, before: dict[int | str, dict[str, Any]], args: tuple[Any, ...],
           kwargs: dict[str, Any], out: Any) -> _Replay | None:
        out_layout = layout_of(out)
        if out_layout is None:
            return None
        named = _arguments(args, kwargs)
        effects: list[tuple[int | str, str, Any]] = []
        for pos, old in before.items():
            new = vars(named[pos])
            if new.keys() != old.keys():
                return None
            for attr, value in new.items():
                if value is not old[attr]:
                    layout = layout_of(value) if isinstance(value, torch.Tensor) or value is None else None
                    if layout is None:
                        return None
                    effects.append((pos, attr, layout))
        now = {(pos, attr): vars(named[pos])[attr] for pos, attr, _ in effects}
        try:
            for pos, attr, _ in effects:
                setattr(named[pos], attr, before[pos][attr])
            unchanged = (_module_signature(block), _signature((args, kwargs))) == key[1:]
        except _Uncacheable:
            unchanged = False
        finally:
            for (pos, attr), value in now.items():
                setattr(named[pos], attr, value)
        return cls(out_layout, tuple(effects)) if unchanged else None

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        named = _arguments(args, kwargs)
        for pos, attr, layout in self.effects:
            setattr(named[pos], attr, rebuild(layout))
        return rebuild(self.out)


def _needs_grad(args: Any) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in tree_flatten(args)[0])


class ComponentFlopCounter(TorchDispatchMode):
    """Count FLOPs of everything run inside, with torch's formula registry, by module and pass."""

    def __init__(self, model: nn.Module, strict: bool = True, reuse: bool = True) -> None:
        super().__init__()
        self.model, self.strict, self.reuse = model, strict, reuse
        self._named = list(model.named_modules())  # walked once per count: names, components, blocks to reuse
        self.names = {id(m): n for n, m in self._named}
        self.components = classify_modules(model, named=self._named)
        self.formulas = flop_formulas()
        self.stack: list[str] = []
        self.seq_module: dict[int, str] = {}
        self.counts: dict[tuple[str, str], float] = defaultdict(float)
        self.ops: dict[str, float] = defaultdict(float)
        self._handles: list[Any] = []
        self._recorders: list[_Recorder] = []
        self._replaying = 0
        self._block_counts: dict[Any, tuple[dict[tuple[str, str], float], dict[str, float], _Replay | None]] = {}
        self._patched: list[tuple[nn.Module, Any]] = []
        self.meta_outputs = META_OUTPUTS if reuse else None
        self._unshimmed: Any = None

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """False: counting runs eagerly, never inside torch.compile, so ``__torch_dispatch__`` needs no
        ``torch._disable_dynamo`` wrapper (its first call imports torch._dynamo: about 1 s per process)."""
        return False

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
        if self.reuse:
            for _, mod in self._named:
                if isinstance(mod, nn.ModuleList) and len(mod) > 1:
                    for block in mod:
                        self._patched.append((block, block.__dict__.get("forward")))
                        block.forward = self._reusing(block, block.forward)
        self._unshimmed = kernels_without_dynamo_shim()
        self._unshimmed.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for block, previous in reversed(self._patched):
            if previous is None:
                del block.forward
            else:
                block.forward = previous
        self._patched.clear()
        self.stack.clear()
        self._unshimmed.__exit__(None, None, None)
        return super().__exit__(*exc)

    def _reusing(self, block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``block.forward``, counted once per reuse key (see the module docstring)."""
        def call(*args: Any, **kwargs: Any) -> Any:
            prefix = self.names.get(id(block))
            if self._replaying or prefix is None or torch.is_grad_enabled():
                return forward(*args, **kwargs)
            try:
                key = (COUNT_CACHE_VERSION, _module_signature(block), _signature((args, kwargs)))
            except _Uncacheable:
                return forward(*args, **kwargs)
            found = self._block_counts.get(key)
            if found is not None:
                counts, ops, replay = found
                if replay is not None and not paths_recorded():
                    out = replay.run(args, kwargs)
                else:
                    self._replaying += 1
                    try:
                        out = forward(*args, **kwargs)
                    finally:
                        self._replaying -= 1
                for (rel, pass_), flops in counts.items():
                    self._add(prefix + rel, pass_, flops, None)
                for op, flops in ops.items():
                    self._add_op(op, flops)
                return out
            recorder = _Recorder(prefix)
            self._recorders.append(recorder)
            before = _argument_attributes(args, kwargs)
            try:
                out = forward(*args, **kwargs)
            finally:
                self._recorders.remove(recorder)
            if recorder.usable:
                self._block_counts[key] = (recorder.counts, recorder.ops,
                                           _Replay.of(block, key, before, args, kwargs, out))
            return out

        call._reuse_wrapper = True  # type: ignore[attr-defined]  # not part of the block's signature
        return call

    def _add(self, module: str, pass_: str, flops: float, op: str | None) -> None:
        if flops and self.strict and self.components.get(module) is None:
            raise _undeclared(module, self.model, flops)
        self.counts[(module, pass_)] += flops
        for recorder in self._recorders:
            recorder.add(module, pass_, flops, op or "")
        if op is not None:
            self.ops[op] += flops

    def _add_op(self, op: str, flops: float) -> None:
        """An op total replayed from a reused block (its module counts were added by :meth:`_add`)."""
        self.ops[op] += flops
        for recorder in self._recorders:
            recorder.ops[op] = recorder.ops.get(op, 0) + flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self.meta_outputs.run(func, args, kwargs) if self.meta_outputs else func(*args, **kwargs)
        if self._replaying:
            return out
        formula = self.formulas.get(func._overloadpacket)
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
        self._add(module, pass_, flops, str(func._overloadpacket))
        return out

    def result(self) -> CountedFlops:
        return CountedFlops(dict(self.counts), self.components, dict(self.ops))


def count_call(model: nn.Module, fn: Callable[[], Any], strict: bool = True, reuse: bool = True) -> CountedFlops:
    """FLOPs of ``fn()`` (which runs ``model``), attributed to ``model``'s modules.

    ``strict``: FLOPs in a module without a cost component are an error (else kept under component None,
    for totals of modules that are not architectures). ``reuse``: count each distinct block call once
    (module docstring) and answer repeated meta kernels from memory; False counts every op and runs every kernel.
    """
    with ComponentFlopCounter(model, strict, reuse) as counter:
        fn()
    return counter.result()


def count_prefill(model: Any, workload: Workload, reuse: bool = True) -> CountedFlops:
    """Prefill of ``workload``'s prompt (vision, connector, decoder, last-token logits)."""
    model.set_stage("inference")
    batch = model.example_batch(workload.replace(stage="inference"))
    with torch.no_grad():
        return count_call(model, lambda: model.prefill(batch), reuse=reuse)


def count_inference(model: Any, workload: Workload, context_len: int | None = None,
                    reuse: bool = True) -> tuple[CountedFlops, CountedFlops, int]:
    """Prefill, then one decode step from its cache (``context_len`` cached tokens, default the prompt).

    A different context is reached by lengthening (or shortening) ``text_after`` and prefilling
    again (uncounted). Returns the prefill count, the decode count and the decode context length.
    """
    model.set_stage("inference")
    wl = workload.replace(stage="inference")
    with torch.no_grad():
        holder: dict[str, Any] = {}
        prefill = count_call(model, lambda: holder.setdefault("out", model.prefill(model.example_batch(wl))),
                             reuse=reuse)
        cache = holder["out"][1]
        if context_len is not None and context_len != cache.length:
            delta = context_len - cache.length
            if wl.text_after + delta < 0 or wl.num_text_tokens + delta < 1:
                raise ConfigError(f"context_len {context_len} is shorter than the prompt's non-text part")
            wl = wl.replace(text_after=wl.text_after + delta)
            _, cache = model.prefill(model.example_batch(wl))
        length = cache.length
        token = torch.zeros(wl.batch_size, dtype=torch.long, device=torch.device(wl.device))
        decode = count_call(model, lambda: model.decode(token, cache), reuse=reuse)
    return prefill, decode, length


def count_decode(model: Any, workload: Workload, context_len: int | None = None) -> tuple[CountedFlops, int]:
    """One decode step after a prefill (see :func:`count_inference`): the count and its context length."""
    _, decode, length = count_inference(model, workload, context_len)
    return decode, length


def count_train_step(model: Any, workload: Workload, stage: str | None = None, reuse: bool = True) -> CountedFlops:
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
        return count_call(model, step, reuse=reuse)
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
        ours = count_call(module, lambda: module(*inputs), strict=False)
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
