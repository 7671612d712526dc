"""Session-wide test settings."""

from __future__ import annotations

import os

import torch


def pytest_configure(config) -> None:
    """One intra-op thread: the tiny test models run faster without thread-pool overhead on a small shared machine.
    The count cache is off (each test counts what it asks for; tests/test_count_cache.py turns it on in a
    folder of its own), so no test reads or writes the user's cache."""
    torch.set_num_threads(1)
    os.environ["MLLM_BENCH_COUNT_CACHE"] = "off"
