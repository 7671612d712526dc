"""The measurement engine: how a prefill, a decode step and a training step are timed, and their result rows.

``MeasureSettings`` is how a measurement runs (attention backend, compilation, decode mode, optimizer,
timing); ``prepare_model`` sets a model up for it. ``time_phase`` warms a call up (with compiled layers:
until nothing compiles any more) and times it (:mod:`mllm_bench.timing`), with the peak memory over the
timed calls (:mod:`mllm_bench.memory`); ``time_prefill``, ``time_decode`` and ``train_step`` set up the
three phases; ``timed_rows`` turns one timed phase into tidy rows (latency, IQR, memory, tokens/s,
achieved FLOP/s, MFU). :func:`mllm_bench.profile.profile` and ``benchmarks/gpu_bench.py`` both measure
through these functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .attention import available_backends
from .config import ConfigError
from .memory import MeasuredMemory, measure_peak
from .model import MLLM
from .optim import OPTIMIZERS, make_optimizer
from .schema import make_row
from .static_decode import DECODE_MODES, decode_steps
from .timing import Timing, time_fn

__all__ = ["MeasureSettings", "prepare_model", "settle", "time_phase", "time_prefill", "time_decode", "train_step",
           "timed_rows", "vision_precomputed", "Decoded", "SETTLE_CALLS"]

SETTLE_CALLS = 6  # at most this many extra warm-up calls while torch.compile still compiles


@dataclass(frozen=True)
class MeasureSettings:
    """How a measurement runs.

    ``attention_backend``: one of :func:`~mllm_bench.attention.available_backends` or ``fast`` (the
    architecture's CUDA fast path). ``compile``: compile the model's layers and blocks before measuring.
    ``decode_mode`` (:mod:`mllm_bench.static_decode`): None means ``graph`` on CUDA, ``dynamic`` elsewhere.
    ``optimizer`` (:mod:`mllm_bench.optim`): the training step's. Timing: ``warmup`` untimed calls, then
    at least ``min_repeats`` calls and ``min_seconds``, at most ``max_repeats`` calls.
    """

    attention_backend: str = "sdpa"
    compile: bool = False
    decode_mode: str | None = None
    optimizer: str = "adamw"
    warmup: int = 2
    min_repeats: int = 5
    min_seconds: float = 0.5
    max_repeats: int = 1000

    def __post_init__(self) -> None:
        if self.attention_backend != "fast" and self.attention_backend not in available_backends():
            raise ConfigError(f"attention_backend must be 'fast' or one of {available_backends()}, "
                              f"got {self.attention_backend!r}")
        if self.decode_mode is not None and self.decode_mode not in DECODE_MODES:
            raise ConfigError(f"decode_mode must be one of {list(DECODE_MODES)}, got {self.decode_mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.warmup < 0 or self.min_seconds < 0:
            raise ConfigError(f"warmup and min_seconds must be >= 0, got {self.warmup}, {self.min_seconds}")
        if self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ConfigError(f"need 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}")

    def backend_for(self, fast_backend: str) -> str:
        """The attention backend to measure with, ``fast`` resolved to the architecture's ``fast_backend``."""
        return fast_backend if self.attention_backend == "fast" else self.attention_backend

    def decode_mode_on(self, device: str | torch.device) -> str:
        return self.decode_mode or ("graph" if torch.device(device).type == "cuda" else "dynamic")


def prepare_model(model: MLLM, settings: MeasureSettings) -> MLLM:
    """Set ``model``'s attention backend as ``settings`` say and, with ``settings.compile``, compile its layers
    and blocks (:meth:`~mllm_bench.model.MLLM.compile_layers`) after resetting torch.compile's caches (shapes an
    earlier model marked dynamic can break this one); returns ``model``."""
    model.set_attention_backend(settings.backend_for(model.spec.fast_attention_backend))
    if settings.compile:
        import torch._dynamo as dynamo  # imported only when compiling (it takes seconds)

        dynamo.reset()
        model.compile_layers()
    return model


def settle(fn: Callable[[], Any]) -> int:
    """Call ``fn`` until a call compiles nothing (torch.compile compiles again for new shapes or call
    kinds, e.g. the first decode steps), at most ``SETTLE_CALLS`` times; returns the calls made."""
    from torch._dynamo.utils import counters

    for calls in range(1, SETTLE_CALLS + 1):
        before = sum(counters["stats"].values())
        fn()
        if sum(counters["stats"].values()) == before:
            return calls
    return SETTLE_CALLS


def time_phase(fn: Callable[[], Any], device: str | torch.device, settings: MeasureSettings,
               warmup: int | None = None, max_repeats: int | None = None) -> tuple[Timing, MeasuredMemory]:
    """Warm up (with compiled layers, until nothing compiles any more: :func:`settle`), then time ``fn``
    as ``settings`` say; returns the timing and the peak memory over the warm-up and timed calls."""
    device = torch.device(device)
    limit = settings.max_repeats if max_repeats is None else max_repeats
    warmup = settings.warmup if warmup is None else warmup
    if settings.compile:
        warmup = max(1, warmup - settle(fn))  # the settling calls warm up too

    def timing() -> Timing:
        return time_fn(fn, device, warmup=warmup, min_repeats=min(settings.min_repeats, limit),
                       min_seconds=settings.min_seconds, max_repeats=limit)

    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measure_peak(timing, device)


def time_prefill(model: MLLM, batch: Any, device: str | torch.device,
                 settings: MeasureSettings) -> tuple[Timing, MeasuredMemory]:
    """One prefill of ``batch`` (time to first token); within :func:`vision_precomputed`, without the vision tower."""
    return time_phase(lambda: model.prefill(batch), device, settings)


@dataclass(frozen=True)
class Decoded:
    """A timed decode step: its timing and memory, the cache after the timed steps, the prompt's length."""

    timing: Timing
    memory: MeasuredMemory
    cache: Any
    prompt_len: int

    @property
    def median_context(self) -> int:
        """Cached tokens at the median timed step."""
        return self.prompt_len + (self.cache.length - self.prompt_len) // 2


def time_decode(model: MLLM, batch: Any, device: str | torch.device, settings: MeasureSettings, mode: str,
                warmup: int | None = None, max_repeats: int | None = None) -> Decoded:
    """Prefill ``batch``, then time one decode step per call in ``mode`` (each call one token further),
    with room for every call within the model's positions."""
    warmup = settings.warmup if warmup is None else warmup
    _, cache = model.prefill(batch)
    prompt = cache.length
    extra_calls = SETTLE_CALLS + warmup + 1
    room = model.llm_config.max_position_embeddings - prompt - 1
    repeats = max(1, min(settings.max_repeats if max_repeats is None else max_repeats, room - extra_calls))
    step, cache = decode_steps(model, cache, extra_calls + repeats, mode)
    token = torch.zeros(batch.input_ids.shape[0], dtype=torch.long, device=device)
    timing, memory = time_phase(lambda: step(token), device, settings, warmup=warmup, max_repeats=repeats)
    return Decoded(timing, memory, cache, prompt)


def train_step(model: MLLM, stage: str, batch: Any, device: str | torch.device,
               settings: MeasureSettings) -> Callable[[], None]:
    """One training step of ``stage`` on ``batch``: forward, backward, ``settings.optimizer``'s step over
    the parameters ``stage`` trains (the model is left in ``stage``)."""
    params = list(model.set_stage(stage).values())
    optimizer = make_optimizer(settings.optimizer, params, lr=1e-5, fused=torch.device(device).type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()

    return step


@contextlib.contextmanager
def vision_precomputed(model: MLLM) -> Iterator[None]:
    """Within the block the vision tower's output is reused (computed on first use, per input tensor), so a
    prefill times the connector and the decoder only. Overrides ``model.encode``, the one way every
    architecture runs its vision tower."""
    store: dict[tuple, torch.Tensor] = {}
    encode = model.encode

    def cached(pixels: torch.Tensor) -> torch.Tensor:
        key = (pixels.data_ptr(), tuple(pixels.shape))
        if key not in store:
            with torch.no_grad():
                store[key] = encode(pixels)
        return store[key]

    model.encode = cached
    try:
        yield
    finally:
        del model.encode


def timed_rows(base: dict[str, Any], metric: str, timing: Timing, *, memory: MeasuredMemory | None = None,
               memory_note: str | None = None, tokens: float = 0, flops: float | None = None,
               peak: float | None = None, **fields: Any) -> list[dict[str, Any]]:
    """Rows of one timed phase: ``metric`` (the median, seconds), ``latency_iqr_s``, ``peak_memory_bytes``
    and ``reserved_memory_bytes`` (when ``memory``; note ``memory_note``, default how memory was measured),
    ``tokens_per_s`` (when ``tokens``, per call), ``achieved_flops_per_s`` (when ``flops``, per call; dense
    convention, the phase's scope or ``total``) and ``mfu`` (when the device's ``peak`` FLOP/s is known).
    ``fields`` (phase, stage, scope, note, ...) go into every row."""
    rows = [make_row(base, metric, timing.median, "measured", **fields),
            make_row(base, "latency_iqr_s", timing.iqr, "measured", **fields)]
    if memory is not None:
        at = {**fields, "note": memory.method if memory_note is None else memory_note}
        rows.append(make_row(base, "peak_memory_bytes", memory.peak, "measured", **at))
        if memory.reserved is not None:
            rows.append(make_row(base, "reserved_memory_bytes", memory.reserved, "measured", **at))
    if tokens:
        rows.append(make_row(base, "tokens_per_s", tokens / timing.median, "measured", **fields))
    if flops:
        achieved = flops / timing.median
        rated = {**fields, "scope": fields.get("scope") or "total", "convention": "dense"}
        rows.append(make_row(base, "achieved_flops_per_s", achieved, "measured", **rated))
        if peak:
            rows.append(make_row(base, "mfu", achieved / peak, "measured", **rated))
    return rows
