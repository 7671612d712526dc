"""Counting in a forked process while this one does the work that needs no count.

A command's counted calls take most of its time on meta tensors, and the first of them imports sympy
(torch's Python meta kernels, about 0.4 s); its other calls (analytic training steps), pandas and the
table need none of that. :func:`count_ahead` forks a child that runs the counted calls, each of which
stores its answer in the count cache (:mod:`mllm_bench.count_cache`), and returns at once: this process
does the rest on the other core, then waits for the child before its first counted call, which reads the
cache. The child only fills the cache: one that fails, is killed or stores nothing leaves this process to
count as it would have (the same numbers, later), so the numbers never depend on it.

A child is forked only where that is safe and can help: a POSIX system, more than one CPU to run on, the
caches on, CUDA not initialised and no other thread running in this process. The objects alive at the fork
are frozen first (``gc.freeze``): the collector's full passes would otherwise write to every object both
processes share, copying their pages (a 7B count took twice as long in the child without it).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .fingerprint import caches_enabled

# How long this process waits for the child before it stops it and counts for itself (a child is never left
# to decide how long a command takes).
WAIT_LIMIT_S = 600.0


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def why_not_fork() -> str:
    """Why no child is forked here ("" when one can be)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "no fork on this system"
    if usable_cpus() < 2:
        return "one CPU"
    if not caches_enabled():
        return "the caches are off (MLLM_BENCH_COUNT_CACHE)"
    if torch.cuda.is_initialized():
        return "CUDA is initialised in this process"
    if threading.active_count() > 1:
        return "other threads are running"
    return ""


def _run_calls(calls: Sequence[Callable[[], object]]) -> None:
    """The child: each call in turn; any error ends it quietly (this process counts that call itself and
    reports the error where the command reports errors)."""
    try:
        for call in calls:
            call()
    except BaseException:  # noqa: BLE001 - the parent repeats the call, and raises what it raises
        sys.exit(1)


@contextmanager
def count_ahead(calls: Sequence[Callable[[], object]]) -> Iterator[Callable[[], None]]:
    """Run ``calls`` in a forked child (unless :func:`why_not_fork` gives a reason; then not at all) and yield
    ``wait()``, which returns once the child has ended. On leaving, a child still running is stopped."""
    worker = None
    if calls and not why_not_fork():
        worker = multiprocessing.get_context("fork").Process(target=_run_calls, args=(list(calls),),
                                                             name="mllm-bench-count-ahead", daemon=True)
        gc.freeze()  # see the module docstring
        worker.start()

    def wait() -> None:
        if worker is not None:
            worker.join(WAIT_LIMIT_S)

    try:
        yield wait
    finally:
        if worker is not None and worker.is_alive():
            worker.kill()
            worker.join()
