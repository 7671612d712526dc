"""Session-wide test settings."""

from __future__ import annotations

import torch


def pytest_configure(config) -> None:
    """One intra-op thread: the tiny test models run faster without thread-pool overhead on a small shared machine."""
    torch.set_num_threads(1)
