"""The optimizer step of a training measurement: AdamW on bf16 weights, with or without fp32 master weights.

``adamw``: AdamW directly on the (bf16) parameters, moments in their dtype — the cheapest step, what the
committed GPU runs used. ``adamw-fp32-master``: the mixed-precision recipe LLaVA-1.5 trains with
(DeepSpeed bf16 / FSDP mixed precision): forward and backward in bf16, and the step on fp32 master
copies with fp32 moments, written back to the bf16 weights. Its step moves ~9x the bytes per trainable
parameter, which shows in a measured step time and MFU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .config import ConfigError

OPTIMIZERS = ("adamw", "adamw-fp32-master")


class MasterWeightsAdamW:
    """AdamW on fp32 master copies of low-precision parameters; ``step`` writes them back to the parameters."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, fused: bool | None = None) -> None:
        self.params = list(params)
        self.masters = [p.detach().float().clone() for p in self.params]
        self.inner = torch.optim.AdamW(self.masters, lr=lr, fused=fused)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for master, p in zip(self.masters, self.params, strict=True):
            master.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for master, p in zip(self.masters, self.params, strict=True):
            master.grad = None
            p.copy_(master)


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float = 1e-5,
                   fused: bool | None = None) -> torch.optim.Optimizer | MasterWeightsAdamW:
    """Optimizer ``name`` (one of ``OPTIMIZERS``) over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(list(params), lr=lr, fused=fused)
    if name == "adamw-fp32-master":
        return MasterWeightsAdamW(params, lr=lr, fused=fused)
    raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def optimizer_state_bytes(name: str, trainable: int, param_bytes: int = 2) -> int:
    """Bytes beyond the weights that training with optimizer ``name`` holds for ``trainable`` parameters:
    gradients, AdamW moments and (fp32-master) master weights plus the step's fp32 gradient copy."""
    if name == "adamw":
        return trainable * 3 * param_bytes  # gradient + two moments, in the parameters' dtype
    if name == "adamw-fp32-master":
        return trainable * (param_bytes + 4 + 8 + 4)  # gradient, fp32 master, fp32 moments, fp32 gradient
    raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")
