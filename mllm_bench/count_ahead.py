"""Counting in a forked process while this one does the work that needs no count.

A command's counted calls take most of its time on meta tensors, and the first of them imports sympy
(torch's Python meta kernels, about 0.3-0.4 s); its checks, its other calls (analytic training steps),
pandas and the table need none of that. :func:`count_ahead` forks a child as soon as torch is imported;
the child imports sympy while this process checks the runs, then runs the counted calls :meth:`submitted
<CountAhead.submit>` to it, each of which stores its answer in the count cache
(:mod:`mllm_bench.count_cache`). This process does the rest on the other core, then waits for the child
before its first counted call, which reads the cache. The child only fills the cache: one that fails, is
killed or stores nothing leaves this process to count as it would have (the same numbers, later), so the
numbers never depend on it.

A child is forked only where that is safe and can help: Linux, more than one CPU to run on, the
caches on, CUDA not initialised and no other thread running in this process. The objects alive at the fork
are frozen first (``gc.freeze``): the collector's full passes would otherwise write to every object both
processes share, copying their pages (a 7B count took twice as long in the child without it).
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch

from .environment import usable_cpus
from .fingerprint import caches_enabled

# What torch's Python meta kernels import at the first count (sympy, ~0.3-0.4 s): the child imports it at once.
FIRST_COUNT_IMPORTS = "torch.fx.experimental.symbolic_shapes"
# How long this process waits for the child before it stops it and counts for itself (a child is never left
# to decide how long a command takes).
WAIT_LIMIT_S = 600.0


def why_not_fork() -> str:
    """Why no child is forked here ("" when one can be)."""
    if not sys.platform.startswith("linux"):  # macOS lists fork, but system frameworks are not fork-safe there
        return f"not Linux ({sys.platform})"
    if usable_cpus() < 2:
        return "one CPU"
    if not caches_enabled():
        return "the caches are off (MLLM_BENCH_COUNT_CACHE)"
    if torch.cuda.is_initialized():
        return "CUDA is initialised in this process"
    if threading.active_count() > 1:
        return "other threads are running"
    return ""


def _serve(calls_from: Connection) -> None:
    """The child: first what the first count would import (sympy, through torch's meta kernels), while the
    parent goes on; then each call it is sent, in turn. Any error ends it quietly: the parent counts that call
    itself and reports the error where the command reports errors."""
    try:
        importlib.import_module(FIRST_COUNT_IMPORTS)
        calls = calls_from.recv()
        for call in calls:
            call()
    except BaseException:  # noqa: BLE001 - the parent repeats the call, and raises what it raises
        sys.exit(1)


class CountAhead:
    """The parent's side of a forked child (:func:`count_ahead`): :meth:`submit` the calls, :meth:`wait` for them."""

    def __init__(self, worker: BaseProcess | None, calls_to: Connection | None) -> None:
        self._worker, self._calls_to = worker, calls_to
        self._submitted = False

    @property
    def running(self) -> bool:
        """Whether a child was forked and is still there to take or run calls."""
        return self._worker is not None and self._worker.is_alive()

    def submit(self, calls: Sequence[Callable[[], object]]) -> None:
        """Send the child ``calls`` (picklable: e.g. :func:`functools.partial` of the profiler); without a child,
        or when they cannot be sent, nothing runs ahead and this process counts as it would have."""
        if self._calls_to is None or self._submitted:
            return
        try:
            self._calls_to.send(list(calls))
            self._submitted = bool(calls)
        except Exception:  # noqa: BLE001 - an unpicklable call or a child gone: counted here instead
            self.stop()
        finally:
            self._calls_to.close()
            self._calls_to = None

    def wait(self) -> None:
        """Return once the child has run the submitted calls (or ended, or been stopped after
        :data:`WAIT_LIMIT_S`); at once when none were submitted."""
        if self._worker is not None and self._submitted:
            self._worker.join(WAIT_LIMIT_S)
            self.stop()

    def stop(self) -> None:
        """Stop the child if it is still running."""
        if self._worker is not None and self._worker.is_alive():
            self._worker.kill()
            self._worker.join()


@contextmanager
def count_ahead() -> Iterator[CountAhead]:
    """Fork a child that gets ready to count (unless :func:`why_not_fork` gives a reason; then the calls submitted
    never run ahead) and yield its :class:`CountAhead`. On leaving, a child still running is stopped."""
    worker = calls_to = None
    if not why_not_fork():
        context = multiprocessing.get_context("fork")
        calls_from, calls_to = context.Pipe(duplex=False)
        worker = context.Process(target=_serve, args=(calls_from,), name="mllm-bench-count-ahead", daemon=True)
        gc.freeze()  # see the module docstring
        worker.start()
        calls_from.close()
    ahead = CountAhead(worker, calls_to)
    try:
        yield ahead
    finally:
        if calls_to is not None and not calls_to.closed:
            calls_to.close()  # a child still waiting for calls gets none and ends
        ahead.stop()
