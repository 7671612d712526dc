"""Wall-clock timing: warm-up, then repeats until a minimum count and a minimum duration; median and IQR.

On CUDA each repeat is bracketed by CUDA events (after a synchronize); elsewhere by
``time.perf_counter``. ``fn`` may return state for the next call (e.g. a growing KV cache).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError


@dataclass(frozen=True)
class Timing:
    """Seconds per call: every sample, median, quartiles."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _quantile(values: tuple[float, ...], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_fn(fn: Callable[[], Any], device: str | torch.device = "cpu", warmup: int = 2, min_repeats: int = 5,
            min_seconds: float = 0.5, max_repeats: int = 1000) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``min_repeats`` calls and ``min_seconds``."""
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ConfigError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats
                                          or time.perf_counter() - start_all < min_seconds):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return Timing(tuple(samples))
