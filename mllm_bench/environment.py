"""Where a result was produced: library versions, device, git commit, host load, time.

torch is imported inside the functions that need it: ``mllm-bench --version`` reads :func:`version_text`
without loading it.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# A host whose 1-minute load average is at least this fraction of its CPU count was busy during a measurement.
BUSY_LOAD_FRACTION = 0.75


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
    import torch

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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says, else the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_load() -> dict[str, str]:
    """The host's 1-minute load average and CPU count (text fields; blank where the OS does not report them)."""
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        load = ""
    return {"load_avg_1m": load, "cpu_count": str(os.cpu_count() or "")}


def is_busy(load_avg_1m: float, cpu_count: float, fraction: float = BUSY_LOAD_FRACTION) -> bool:
    """Whether a load average means the host was busy: at least ``fraction`` × its CPU count."""
    return cpu_count > 0 and load_avg_1m >= fraction * cpu_count


def version_text() -> str:
    """``mllm-bench 0.1.0 (git 0123abcd4567)``: the package version and the checkout's commit, when known."""
    from . import __version__

    commit = git_commit()
    return f"mllm-bench {__version__}" + (f" (git {commit})" if commit else "")


def environment(device: str | torch.device = "meta", attention_backend: str = "sdpa") -> dict[str, str]:
    """The environment fields every result row carries; the host's load only where something runs (not meta),
    taken when called (before a measurement, so it counts what else the host was running)."""
    import torch

    from . import __version__

    on_host = torch.device(device).type != "meta"
    return {
        "device_name": device_name(device),
        "attention_backend": attention_backend,
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "mllm_bench_version": __version__,
        "git_commit": git_commit(),
        **(host_load() if on_host else {"load_avg_1m": "", "cpu_count": ""}),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
