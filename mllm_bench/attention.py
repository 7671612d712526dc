"""Attention backends: one function, one explicit choice.

``sdpa`` works on every device: it uses ``is_causal`` when the mask is the plain causal one and a
dense boolean mask otherwise. ``math`` is the textbook formula in plain matmuls (a reference, and
what every FLOP counter sees). Faster CUDA paths register here too, each tested against ``sdpa``:

- ``flash``: fused SDPA calls with no mask tensor, from the mask's static structure
  (:meth:`~mllm_bench.masks.AttentionMask.static_structure`): ``is_causal`` for plain causal, lower-right
  causal (the CUDA flash kernel's own bottom-right ``is_causal``) for a chunk after earlier keys, and one
  such call per query block for split masks (SAISA's text segments). Masks without static structure
  (padding, NAAViT) fall back to a dense mask. A single query (decode) uses its one mask row, which costs
  nothing and needs no host sync.
- ``flex``: ``torch.nn.attention.flex_attention`` with a block mask built once per mask from its
  description, so blocks with no allowed pair (NAAViT's visual-visual blocks) are skipped. Compiled on
  CUDA; on CPU it runs torch's unfused reference (forward only: CPU backward falls back to dense SDPA).

Which path each call took is counted by :func:`record_paths`, so results can say what ran. Whatever a
backend derives from a mask (dense tensor, structure, block mask) is built by :func:`prepare_mask` before
a layer runs, so compiled layers trace tensor work only.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .config import ConfigError
from .masks import AttentionMask, mask_mod

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask], torch.Tensor]
PrepareFn = Callable[[AttentionMask], None]
PathFn = Callable[[AttentionMask, bool], str]
_BACKENDS: dict[str, AttentionFn] = {}
_PREPARE: dict[str, PrepareFn] = {}
_PATHS: dict[str, PathFn] = {}


def register_backend(name: str, fn: AttentionFn, prepare: PrepareFn | None = None,
                     path: PathFn | None = None) -> None:
    """Make ``fn(q, k, v, mask)`` available as attention backend ``name``; ``prepare(mask)`` computes, once
    per mask, whatever ``fn`` reads from it (see :func:`prepare_mask`); ``path(mask, needs_grad)`` names the
    path ``fn`` takes for ``mask`` (default: the backend's name)."""
    _BACKENDS[name] = fn
    if prepare is not None:
        _PREPARE[name] = prepare
    if path is not None:
        _PATHS[name] = path


def attention_path(mask: AttentionMask, backend: str, needs_grad: bool = False) -> str:
    """The path (e.g. ``flash:split``) ``backend`` takes for ``mask``, as :func:`record_paths` counts it."""
    fn = _PATHS.get(backend)
    return backend if fn is None else fn(mask, needs_grad)


def prepare_mask(mask: AttentionMask, backend: str) -> None:
    """Resolve what ``backend`` reads from ``mask`` (dense tensor, static structure, block mask) now.

    Decoders call this before each layer, outside the layer's (possibly compiled) code: value reads
    (host syncs) and Python-side decisions happen here, once per mask, so a compiled layer traces
    only tensor operations and memo lookups, without graph breaks.
    """
    if backend not in _BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {available_backends()}")
    if mask.memo.get("prepared_for") == backend:
        return
    prepare = _PREPARE.get(backend)
    if prepare is not None:
        prepare(mask)
    mask.memo["prepared_for"] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv*groups, T, D): each KV head serves ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str = "sdpa"
) -> torch.Tensor:
    """Multi-head attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D) under ``mask``."""
    prepare_mask(mask, backend)  # a memo lookup when the decoder prepared it already (the usual case)
    return _BACKENDS[backend](q, k, v, mask)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask, rows: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities (B, H, r, Tk), in fp32, of the query rows ``rows`` (B, r) of q (B, H, Tq, D)
    over k (B, Hkv, Tk, D) under ``mask``'s rows: softmax(q k^T / sqrt(D)) written out, since fused kernels do
    not return them. Counted as path ``math:weights``; costs one QK^T over those rows (no PV)."""
    b, h, _, d = q.shape
    q_rows = q.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
    k = repeat_kv(k, h // k.shape[1])
    sub = AttentionMask(mask.q_pos.gather(1, rows), mask.k_pos, mask.q_valid.gather(1, rows), mask.k_valid,
                        mask.q_visual.gather(1, rows), mask.k_visual, mask.rule)
    scores = torch.matmul(q_rows, k.transpose(-1, -2)) / math.sqrt(d)
    note_path("math:weights")
    return torch.softmax(scores.float().masked_fill(~sub.dense(), float("-inf")), dim=-1)


_RECORDERS: list[Counter[str]] = []


@contextmanager
def record_paths() -> Iterator[Counter[str]]:
    """Count the attention paths taken inside the block (e.g. ``{"flash:split": 64}``)."""
    counter: Counter[str] = Counter()
    _RECORDERS.append(counter)
    try:
        yield counter
    finally:
        _RECORDERS.remove(counter)


def paths_recorded() -> bool:
    """Whether a :func:`record_paths` block is active (code that would skip attention calls must not then)."""
    return bool(_RECORDERS)


def note_path(path: str) -> None:
    """Count ``path`` in every active :func:`record_paths` counter.

    Skipped while torch.compile traces: guards on the counters' values would recompile every call.
    Compiled decoder layers have their path noted by the decoder instead, outside the compiled code
    (:meth:`~mllm_bench.decoder.LlamaDecoder.run_layer`).
    """
    if torch.compiler.is_dynamo_compiling():
        return
    for counter in _RECORDERS:
        counter[path] += 1


def describe_paths(counter: Counter[str]) -> str:
    """``"flash:causal+flash:decode_row"``: the paths taken, sorted, for a result row."""
    return "+".join(sorted(counter))


def _sdpa_path(mask: AttentionMask, needs_grad: bool = False) -> str:
    return "sdpa:causal" if mask.is_plain_causal() else "sdpa:dense"


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """The reference: K/V repeated per head group and plain SDPA calls (what jit tracers such as fvcore read)."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    path = _sdpa_path(mask)
    note_path(path)
    if path == "sdpa:causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())


def _prepare_sdpa(mask: AttentionMask) -> None:
    if not mask.is_plain_causal():
        mask.dense()


def _prepare_dense(mask: AttentionMask) -> None:
    mask.dense()


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask.dense(), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    note_path("math:dense")
    return torch.matmul(probs, v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """SDPA over grouped KV heads: without a mask tensor the kernel takes them as they are (``enable_gqa``,
    no copies); with one, K and V are repeated per group, since ``enable_gqa`` with a mask sends SDPA to its
    math fallback, which materialises every score."""
    if kwargs.get("attn_mask") is not None:
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


def _key_rows(x: torch.Tensor, ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """Rows ``ranges`` of x (B, H, T, D) along T: a view for one range, a concatenation otherwise."""
    if len(ranges) == 1:
        return x[:, :, ranges[0][0]:ranges[0][1]]
    return torch.cat([x[:, :, s:e] for s, e in ranges], dim=2)


def _flash_path(mask: AttentionMask, needs_grad: bool = False) -> str:
    if mask.num_queries == 1:
        return "flash:decode_row"  # its one mask row costs nothing and needs no host sync
    structure = mask.static_structure()
    return "flash:dense" if structure is None else f"flash:{structure.kind}"


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Fused SDPA without a mask tensor wherever the mask has static structure (see module docstring)."""
    path = _flash_path(mask)
    note_path(path)
    if path in ("flash:decode_row", "flash:dense"):
        return _sdpa(q, k, v, attn_mask=mask.dense())
    structure = mask.static_structure()
    outs = []
    for blk in structure.blocks:
        qb = q[:, :, blk.q_start:blk.q_end]
        if not blk.k_ranges:
            outs.append(torch.zeros_like(qb[..., :1]).expand(*qb.shape[:-1], v.shape[-1]))
            continue
        kb, vb = _key_rows(k, blk.k_ranges), _key_rows(v, blk.k_ranges)
        if not blk.causal or blk.num_queries == 1:
            outs.append(_sdpa(qb, kb, vb))
        elif blk.num_queries == blk.num_keys:
            outs.append(_sdpa(qb, kb, vb, is_causal=True))
        else:
            outs.append(_lower_right_causal(qb, kb, vb, mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _flash_kernel_fits(q: torch.Tensor, mask: AttentionMask) -> bool:
    """Whether the CUDA flash kernel takes q: a GPU that has it (:func:`_prepare_flash` checked), fp16/bf16,
    head size a multiple of 8 up to 256."""
    return (mask.memo.get("flash_gpu", False) and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def _lower_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Causal attention aligned to the bottom right (query r of n sees the first Tk - n + r + 1 keys).

    On CUDA the flash kernel itself: its ``is_causal`` is bottom-right aligned, which is what
    ``torch.nn.attention.bias.causal_lower_right`` calls too, but called directly so a compiled layer
    traces it (that helper's tensor subclass is a graph break). Elsewhere SDPA with the block's boolean
    mask, built by :func:`prepare_mask` and reused by every layer.
    """
    if _flash_kernel_fits(q, mask):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal=True, scale=1.0 / math.sqrt(q.shape[-1]))[0]
    return _sdpa(q, k, v, attn_mask=mask.memo[_lower_right_key(q.shape[2], k.shape[2])])


def _lower_right_key(num_queries: int, num_keys: int) -> str:
    return f"lower_right_{num_queries}x{num_keys}"


def _prepare_flash(mask: AttentionMask) -> None:
    structure = mask.static_structure() if mask.num_queries > 1 else None
    if structure is None:
        mask.dense()  # a decode row or a mask without static structure
        return
    device = mask.q_pos.device
    mask.memo["flash_gpu"] = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    for blk in structure.blocks:  # boolean lower-right masks for where the flash kernel does not apply (tiny)
        if blk.k_ranges and blk.causal and 1 < blk.num_queries != blk.num_keys:
            key = _lower_right_key(blk.num_queries, blk.num_keys)
            if key not in mask.memo:
                ones = torch.ones(blk.num_queries, blk.num_keys, dtype=torch.bool, device=device)
                mask.memo[key] = ones.tril(blk.num_keys - blk.num_queries)


_compiled_flex: Callable[..., torch.Tensor] | None = None


def _eager_flex(*args: Any, **kwargs: Any) -> torch.Tensor:
    """torch's unfused FlexAttention (CPU tests), without its "use torch.compile" warning."""
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex_fn(device: torch.device) -> Callable[..., torch.Tensor]:
    """FlexAttention compiled once on CUDA (a fused kernel); torch's unfused reference elsewhere. Inside a
    compiled layer, the plain function: the layer's compilation fuses it."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    if device.type != "cuda":
        return _eager_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def block_mask(mask: AttentionMask, device: torch.device) -> Any:
    """The FlexAttention block mask of ``mask`` (memoised on it: built once, used by every layer)."""
    if "block_mask" not in mask.memo:
        from torch.nn.attention.flex_attention import create_block_mask

        b, tq, tk = mask.q_pos.shape[0], mask.num_queries, mask.num_keys
        mask.memo["block_mask"] = create_block_mask(mask_mod(mask), b, None, tq, tk, device=device)
    return mask.memo["block_mask"]


def _prepare_flex(mask: AttentionMask) -> None:
    device = mask.q_pos.device
    if mask.num_queries == 1 or device.type != "cuda":  # decode rows; CPU backward falls back to dense
        mask.dense()
    if mask.num_queries > 1 and device.type != "meta":
        block_mask(mask, device)


def _flex_path(mask: AttentionMask, needs_grad: bool = False) -> str:
    if mask.num_queries == 1:
        return "flex:decode_row"  # one query: nothing to skip, and no recompilation per context length
    if mask.q_pos.device.type == "cpu" and needs_grad:
        return "flex:dense_cpu_backward"  # torch has no FlexAttention backward on CPU
    return "flex:block_mask"


def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """FlexAttention with a block mask from the description (see module docstring)."""
    path = _flex_path(mask, torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    note_path(path)
    if path != "flex:block_mask":
        return _sdpa(q, k, v, attn_mask=mask.dense())
    return _flex_fn(q.device)(q, k, v, block_mask=block_mask(mask, q.device), enable_gqa=q.shape[1] != k.shape[1])


register_backend("sdpa", sdpa_attention, _prepare_sdpa, _sdpa_path)
register_backend("math", math_attention, _prepare_dense, lambda mask, needs_grad: "math:dense")
register_backend("flash", flash_attention, _prepare_flash, _flash_path)
register_backend("flex", flex_attention_backend, _prepare_flex, _flex_path)
