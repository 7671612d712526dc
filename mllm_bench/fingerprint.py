"""Hashes of the code a cached answer depends on, computed without importing torch.

``code_fingerprint()``: every ``.py`` file of the installed ``mllm_bench`` package (its architectures, reports
and cli included, which setuptools' package-dir maps outside ``mllm_bench/``) and the torch and transformers
versions. ``module_fingerprint(name)``: one module's source file (e.g. a plugin's), found without importing it.
Also where the caches live, whether they are on, and reading and writing one entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

SUBPACKAGES = ("architectures", "reports", "cli")


def caches_enabled() -> bool:
    """``MLLM_BENCH_COUNT_CACHE=off`` (or 0/false/no) turns mllm-bench's caches off."""
    return os.environ.get("MLLM_BENCH_COUNT_CACHE", "on").lower() not in ("off", "0", "false", "no")


def cache_root() -> Path:
    """``$MLLM_BENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/mllm-bench``, else ``~/.cache/mllm-bench``."""
    if os.environ.get("MLLM_BENCH_CACHE_DIR"):
        return Path(os.environ["MLLM_BENCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mllm-bench"


def read_entry(kind: str, name: str) -> Any | None:
    """The JSON value cached as ``kind/name``; None when the caches are off, or it is absent or unreadable."""
    if not caches_enabled():
        return None
    try:
        return json.loads((cache_root() / kind / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def has_entry(kind: str, name: str) -> bool:
    """Whether ``kind/name`` is cached (the caches on and its file present; it may still prove unreadable)."""
    return caches_enabled() and (cache_root() / kind / f"{name}.json").is_file()


def write_entry(kind: str, name: str, value: Any) -> None:
    """Cache ``value`` (JSON) as ``kind/name``, atomically; a cache that cannot be written is skipped."""
    if not caches_enabled():
        return
    try:
        (cache_root() / kind).mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_root() / kind / f"{name}.json", json.dumps(value), durable=False)
    except OSError:
        pass


@cache
def code_fingerprint() -> str:
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256(b"mllm-bench code")
    roots = {root}
    for sub in SUBPACKAGES:
        spec = importlib.util.find_spec(f"mllm_bench.{sub}")
        roots.update(Path(p).resolve() for p in (spec.submodule_search_locations or ()) if spec)
    for path in sorted(f for r in roots for f in r.rglob("*.py")):
        digest.update(str(path.relative_to(path.parents[1])).encode())
        digest.update(path.read_bytes())
    for package in ("torch", "transformers"):
        try:
            digest.update(f"{package}=={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(f"{package} missing".encode())
    return digest.hexdigest()


@cache
def module_fingerprint(name: str) -> str:
    """Hash of module ``name``'s source file ("" when it cannot be found)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return ""
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()
