"""Attention backends: one function, one explicit choice.

``sdpa`` works on every device: it uses ``is_causal`` when the mask is the plain causal one and a
dense boolean mask otherwise. ``math`` is the textbook formula in plain matmuls (a reference, and
what every FLOP counter sees). Faster CUDA paths register here too, each tested against ``sdpa``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import ConfigError
from .masks import AttentionMask

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask], torch.Tensor]
_BACKENDS: dict[str, AttentionFn] = {}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn(q, k, v, mask)`` available as attention backend ``name``."""
    _BACKENDS[name] = fn


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
    fn = _BACKENDS.get(backend)
    if fn is None:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {available_backends()}")
    return fn(q, k, v, mask)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if mask.is_plain_causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask.dense(), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


register_backend("sdpa", sdpa_attention)
register_backend("math", math_attention)
