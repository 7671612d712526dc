"""Where a result was produced: library versions, device, git commit, time."""

from __future__ import annotations

import datetime
import functools
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return ""


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the checkout this package runs from (``+dirty`` when there are local changes), or ""."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def device_name(device: str | torch.device) -> str:
    """A readable name: the GPU's marketing name, the CPU's model, or ``meta``."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "cpu"
    return dev.type


def environment(device: str | torch.device = "meta", attention_backend: str = "sdpa") -> dict[str, str]:
    """The environment fields every result row carries."""
    from . import __version__

    return {
        "device_name": device_name(device),
        "attention_backend": attention_backend,
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "mllm_bench_version": __version__,
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
