"""The two-layer MLP connector: LLaVA-1.5's ``mlp2x_gelu`` and SAISA's per-layer projector."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """Linear(vision → h), GELU, Linear(h → h), with bias (transformers' ``linear_1``/``linear_2`` names)."""

    cost_component = "connector"

    def __init__(self, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
