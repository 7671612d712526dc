"""Decoding without the host in the loop: a preallocated KV cache and a decode step captured as a CUDA graph.

A :class:`~mllm_bench.decoder.KVCache` grows by concatenation, so every step allocates and changes
shapes, and a 7B decode step at batch 1 is a thousand small kernel launches from Python: host-bound,
tens of ms per token, while the GPU needs a few ms to read the weights. A :class:`StaticKVCache` holds
fixed buffers (``capacity`` keys per sample) written in place at a slot kept on the device, so every
step has the same shapes and addresses; :class:`DecodeGraph` captures one ``model.decode`` step once
and replays it per token. Keys beyond the filled slots are marked invalid, so attention over the whole
buffer equals attention over the filled part.

Decode modes (``DECODE_MODES``): ``dynamic`` (the growing cache), ``static`` (the static cache, eager:
runs anywhere, what CPU tests check) and ``graph`` (static cache + CUDA graph; CUDA only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .config import ConfigError
from .decoder import KVCache
from .masks import AttentionMask

DECODE_MODES = ("dynamic", "static", "graph")
DecodeStep = Callable[[torch.Tensor], torch.Tensor]


class StaticLayerKV:
    """One layer's keys and values in buffers (B, Hkv, capacity, D), written at the cache's ``slot``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> None:
        self.k, self.v, self.slot = k, v, slot

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[2] != 1:
            raise ConfigError(f"a StaticKVCache takes one token per step (decode), got {k.shape[2]}; prefill "
                              "into a KVCache and convert it with StaticKVCache.from_cache")
        self.k.index_copy_(2, self.slot, k)
        self.v.index_copy_(2, self.slot, v)
        return self.k, self.v


class StaticKVCache(KVCache):
    """A :class:`KVCache` in fixed buffers: ``slot`` (a device tensor) is the latest written key,
    ``filled`` (host-side bookkeeping) how many keys per sample are held, ``capacity`` how many fit."""

    def __init__(self, layers: list[Any], k_pos: torch.Tensor, k_valid: torch.Tensor, k_visual: torch.Tensor,
                 next_pos: torch.Tensor, extra: dict[str, Any], slot: torch.Tensor, filled: int) -> None:
        super().__init__(layers, k_pos, k_valid, k_visual, next_pos, extra)
        self.slot = slot
        self.filled = filled

    @classmethod
    def from_cache(cls, cache: KVCache, capacity: int) -> StaticKVCache:
        """Copy a prefilled cache into buffers of ``capacity`` keys per sample (room for the new tokens)."""
        if isinstance(cache, StaticKVCache):
            raise ConfigError("the cache is static already")
        n = cache.length
        if capacity <= n:
            raise ConfigError(f"capacity must exceed the cached length {n} (room for new tokens), got {capacity}")
        if any(kv.k is None for kv in cache.layers):
            raise ConfigError("the cache has a layer without keys: prefill before converting it")
        slot = torch.full((1,), n - 1, dtype=torch.long, device=cache.k_pos.device)

        def widen(t: torch.Tensor) -> torch.Tensor:
            """(B, n) metadata or (B, H, n, D) keys/values -> ``capacity`` along the key axis, zeros after n."""
            axis = 2 if t.dim() == 4 else 1
            shape = list(t.shape)
            shape[axis] = capacity
            out = t.new_zeros(shape)
            out.narrow(axis, 0, n).copy_(t)
            return out

        layers = [StaticLayerKV(widen(kv.k), widen(kv.v), slot) for kv in cache.layers]
        return cls(layers, widen(cache.k_pos), widen(cache.k_valid), widen(cache.k_visual),
                   cache.next_pos.clone(), dict(cache.extra), slot, n)

    @property
    def capacity(self) -> int:
        return self.k_pos.shape[1]

    @property
    def length(self) -> int:
        return self.filled

    def add_keys(self, pos: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> None:
        raise ConfigError("a StaticKVCache is filled by from_cache and decode steps only")

    def check_room(self) -> None:
        """Raise when no slot is left for another token."""
        if self.filled >= self.capacity:
            raise ConfigError(f"the StaticKVCache is full ({self.capacity} keys per sample); build it with a "
                              "larger capacity")

    def step(self) -> tuple[torch.Tensor, AttentionMask]:
        """Register one new text token per sample in the next slot (in place, no host sync)."""
        self.check_room()
        self.filled += 1
        self.slot.add_(1)
        pos = self.next_pos.view(-1, 1).clone()
        self.k_pos.index_copy_(1, self.slot, pos)
        self.k_valid.index_fill_(1, self.slot, True)
        self.next_pos.add_(1)
        return pos, self.step_mask(pos)

    def state(self) -> dict[str, Any]:
        """What a decode step changes, to roll back to (``restore``); K/V rows past ``slot`` are masked."""
        return {"slot": self.slot.clone(), "next_pos": self.next_pos.clone(), "k_pos": self.k_pos.clone(),
                "k_valid": self.k_valid.clone(), "filled": self.filled}

    def restore(self, state: dict[str, Any]) -> None:
        """Roll back to ``state`` in place (buffers keep their addresses, which a captured graph uses)."""
        for name in ("slot", "next_pos", "k_pos", "k_valid"):
            getattr(self, name).copy_(state[name])
        self.filled = state["filled"]


class DecodeGraph:
    """``model.decode`` on a :class:`StaticKVCache` captured once as a CUDA graph; each call replays it.

    Capture needs warm-up runs (lazy kernel and library initialisation); they write to the cache, so its
    state is rolled back afterwards: the first replay decodes right after the prompt.
    """

    def __init__(self, model: Any, cache: StaticKVCache, warmup: int = 2) -> None:
        if cache.k_pos.device.type != "cuda":
            raise ConfigError(f"decode_mode 'graph' needs a CUDA device, the cache is on {cache.k_pos.device}; "
                              "use 'static' or 'dynamic'")
        self.cache = cache
        self.tokens = torch.zeros(cache.k_pos.shape[0], dtype=torch.long, device=cache.k_pos.device)
        state = cache.state()
        side = torch.cuda.Stream(cache.k_pos.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                model.decode(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.restore(state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits, _ = model.decode(self.tokens, cache)
        cache.restore(state)  # capture ran the Python side (``filled``), not the kernels

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of ``tokens`` (B,) appended after the cache (a copy: the graph reuses its output)."""
        self.cache.check_room()
        self.tokens.copy_(tokens.view(-1))
        self.graph.replay()
        self.cache.filled += 1
        return self.logits.clone()


def decode_steps(model: Any, cache: KVCache, new_tokens: int, mode: str = "dynamic") -> tuple[DecodeStep, KVCache]:
    """A function ``tokens -> logits`` that decodes one step after ``cache`` in ``mode``, with room for
    ``new_tokens`` steps, and the cache it reads and writes (``cache`` itself in mode ``dynamic``)."""
    if mode not in DECODE_MODES:
        raise ConfigError(f"decode_mode must be one of {list(DECODE_MODES)}, got {mode!r}")
    if mode == "dynamic":
        return (lambda tokens: model.decode(tokens, cache)[0]), cache
    static = StaticKVCache.from_cache(cache, cache.length + max(new_tokens, 1))
    if mode == "static":
        return (lambda tokens: model.decode(tokens, static)[0]), static
    return DecodeGraph(model, static), static
