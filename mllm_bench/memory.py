"""Memory: analytic (weights, gradients, AdamW state, activations, KV cache by modality) and measured.

Analytic conventions: weights and gradients in the model dtype; AdamW keeps two states per trained
parameter in the parameter dtype (what ``torch.optim.AdamW`` does; mixed-precision recipes with fp32
master weights and states need 16 bytes/param more, see ``optimizer_state_bytes``); activations are
the tensors kept for backward, estimated by the cost model (:class:`~mllm_bench.costmodel.CostBreakdown`);
the training peak estimate is weights + gradients + optimizer state + activations.

Measured: on CUDA, ``torch.cuda.max_memory_allocated``/``max_memory_reserved`` of one phase after
``reset_peak_memory_stats`` (method ``cuda_max_allocated``). On CPU there is no allocator peak, so we
measure the process's peak resident set during the phase, reset through ``/proc/self/clear_refs``
(method ``cpu_rss_peak_delta``: peak RSS minus RSS before; coarse, includes allocator caching).
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .costmodel import CostBreakdown


@dataclass(frozen=True)
class AnalyticMemory:
    weights: float
    grads: float
    optimizer: float
    activations: float
    kv_cache: dict[str, float]  # per sample by role

    @property
    def train_peak(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def analytic_memory(model: Any, cost: CostBreakdown, dtype_bytes: int,
                    optimizer_state_bytes: int | None = None) -> AnalyticMemory:
    """Memory of ``model`` for the stage ``cost`` was computed for (``cost.info['stage']``)."""
    stage = cost.info.get("stage", "inference")
    params = model.num_parameters()
    trainable = sum(p.numel() for p in model.trainable_parameters(stage).values()) if stage != "inference" else 0
    state = dtype_bytes if optimizer_state_bytes is None else optimizer_state_bytes
    kv = dict(cost.kv_cache_bytes)
    kv["all"] = sum(kv.values())
    return AnalyticMemory(
        weights=float(params * dtype_bytes),
        grads=float(trainable * dtype_bytes),
        optimizer=float(2 * trainable * state),
        activations=float(cost.activation_bytes) if stage != "inference" else 0.0,
        kv_cache=kv,
    )


@dataclass(frozen=True)
class MeasuredMemory:
    peak: float
    reserved: float | None
    method: str


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_peak(fn: Callable[[], Any], device: str | torch.device) -> tuple[Any, MeasuredMemory]:
    """Run ``fn()`` once and return its result and its peak memory on ``device``.

    CUDA: the absolute peak allocated during the call (weights and all else resident included) and the
    peak reserved. CPU: how far the process's peak RSS rose during the call (labelled as such).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)  # absolute: weights and everything else resident
        return out, MeasuredMemory(float(peak), float(torch.cuda.max_memory_reserved(dev)), "cuda_max_allocated")
    before = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        can_reset = True
    except OSError:
        can_reset = False
    hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    hwm = _rss_kib("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if before is None or hwm is None:
        return out, MeasuredMemory(float("nan"), None, "unavailable")
    method = "cpu_rss_peak_delta" if can_reset else "cpu_maxrss_delta"
    base = before if can_reset else hwm_before
    return out, MeasuredMemory(float(max(hwm - base, 0) * 1024), None, method)


def saved_activation_bytes(model: torch.nn.Module, fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn()`` (a forward with grad) and sum the bytes autograd saves for backward.

    Distinct storages only, parameters (and views of them) excluded; not for meta tensors.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if t.device.type != "meta" and storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, float(sum(seen.values()))
