"""A disk cache of counted FLOPs, so that a command repeated on the same models answers without re-counting.

It holds three kinds of entry, each a function of the code and the shapes alone: ``counts`` (the counted
FLOPs of a call), ``rows`` (every row :func:`mllm_bench.profile.profile` returns when it measures nothing,
less the environment fields, which are taken afresh) and ``checks`` (a run that passed the CLI's checks
before work, with its parameter count), so that a repeated command builds no model at all.

Counting a 7B model on meta tensors takes about a second per phase, almost all of it torch's Python
reference kernels for meta tensors; the answer depends only on the code and the shapes. An entry's key
holds everything a count depends on:

* the code: a hash of every ``.py`` file of the installed ``mllm_bench`` package (architectures included),
  the torch and transformers versions, and :data:`CACHE_VERSION`;
* the model: its class's source files (so a plugin's or a test's own architecture counts too), architecture
  name, the LLM and vision configs and the options, as their ``repr``;
* the call: what was counted (``inference`` / a training stage), the whole workload, ``context_len``.

So an edit to any source file, an upgrade, or a change of shape starts from empty. Entries are JSON, written
atomically; an unreadable entry is ignored (and rewritten). ``MLLM_BENCH_COUNT_CACHE=off`` turns the cache
off; ``MLLM_BENCH_CACHE_DIR`` moves it (default ``$XDG_CACHE_HOME/mllm-bench`` or ``~/.cache/mllm-bench``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from functools import cache
from pathlib import Path
from typing import Any

from .fingerprint import code_fingerprint, has_entry, read_entry, write_entry
from .flops import CountedFlops

CACHE_VERSION = 1


@cache
def class_fingerprint(cls: type) -> str:
    """Hash of the source files defining ``cls`` and its bases: covers architectures from plugins and tests,
    whose code lies outside the package."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        try:
            source = inspect.getsourcefile(klass)
        except TypeError:  # a built-in
            continue
        if source:
            digest.update(f"{klass.__module__}.{klass.__qualname__}".encode())
            digest.update(Path(source).read_bytes())
    return digest.hexdigest()


def key(model_class: type, *parts: Any) -> str:
    """The entry name for a count of a ``model_class`` model described by ``parts`` (their ``repr``s)."""
    text = json.dumps([CACHE_VERSION, code_fingerprint(), class_fingerprint(model_class), *map(repr, parts)])
    return hashlib.sha256(text.encode()).hexdigest()


def _encode(counts: CountedFlops) -> dict[str, Any]:
    return {"by_module_pass": [[m, p, f] for (m, p), f in counts.by_module_pass.items()],
            "components": counts.components, "by_op": counts.by_op}


def _decode(data: dict[str, Any]) -> CountedFlops:
    return CountedFlops({(m, p): float(f) for m, p, f in data["by_module_pass"]}, dict(data["components"]),
                        {k: float(v) for k, v in data["by_op"].items()})


def model_key(kind: str, arch: str, llm: Any, vision: Any, options: dict[str, Any] | None, *parts: Any) -> str | None:
    """The entry name for a ``kind`` answer about architecture ``arch`` with these presets (or configs) and
    options, and ``parts``; None when they do not resolve (building the model then gives the error)."""
    from .config import ConfigError
    from .presets import resolve_configs
    from .registry import get_architecture

    try:
        cls = get_architecture(arch)
        llm_cfg, vision_cfg = resolve_configs(llm, vision)
    except (ConfigError, ImportError, TypeError):
        return None
    return key(cls, kind, arch, llm_cfg, vision_cfg, sorted((options or {}).items()), *parts)


def load(name: str, kind: str = "counts") -> dict[str, Any] | None:
    """The entry ``name`` of ``kind`` (its counts decoded), or None when absent, off or unreadable."""
    data = read_entry(kind, name)
    try:
        return {k: _decode(v) if isinstance(v, dict) else v for k, v in data.items()} if data is not None else None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def has(name: str, kind: str = "counts") -> bool:
    """Whether an entry ``name`` of ``kind`` is there to be read (the caches on, the file present)."""
    return has_entry(kind, name)


def store(name: str, entry: dict[str, Any], kind: str = "counts") -> None:
    """Write entry ``name`` of ``kind`` (values: :class:`CountedFlops` or JSON values)."""
    write_entry(kind, name, {k: _encode(v) if isinstance(v, CountedFlops) else v for k, v in entry.items()})
