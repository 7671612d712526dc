"""Finds architectures by name through the ``mllm_bench.architectures`` entry-point group.

Core never imports an architecture by name: built-in ones are declared in pyproject.toml like any
third-party plugin, and :func:`register` adds one at run time (tests, notebooks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib.metadata import entry_points
from typing import Any

import torch

from .config import ConfigError, LLMConfig, VisionConfig
from .declared import ENTRY_POINT_GROUP
from .model import MLLM
from .presets import resolve_configs
from .spec import ArchSpec
from .workload import parse_dtype

_registered: dict[str, type[MLLM]] = {}  # added with register(): these win over an entry point of the same name
_loaded: dict[str, type[MLLM]] = {}  # entry points loaded (and checked) once


def _check_spec(cls: Any, source: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, MLLM)):
        raise ConfigError(f"{source} is not an MLLM subclass (got {cls!r})")
    if not isinstance(cls.__dict__.get("spec"), ArchSpec):
        raise ConfigError(f"{cls.__qualname__} ({source}) declares no `spec = ArchSpec(...)` of its own")


def register(cls: type[MLLM]) -> type[MLLM]:
    """Register an :class:`MLLM` subclass under ``cls.spec.name`` (usable as a decorator)."""
    _check_spec(cls, "register()")
    _registered[cls.spec.name] = cls
    return cls


def registered_names() -> list[str]:
    """The architectures added with :func:`register` in this process."""
    return list(_registered)


def unregister(name: str) -> None:
    """Forget an architecture added with :func:`register` (tests, notebooks)."""
    _registered.pop(name, None)


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def architecture_names() -> list[str]:
    """Every architecture, in each spec's ``order`` (then by name)."""
    def order(name: str) -> tuple[int, str]:
        try:
            return get_architecture(name).spec.order, name
        except (ImportError, ConfigError):  # a broken plugin is listed last; using it raises its error
            return 10**9, name

    return sorted(set(_registered) | set(_entry_points()), key=order)


def is_architecture(name: str) -> bool:
    """Whether an architecture is registered or declared as ``name`` (nothing is imported)."""
    return name in _registered or name in _entry_points()


def architecture_spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of architecture ``name``."""
    return get_architecture(name).spec


def get_architecture(name: str) -> type[MLLM]:
    """The class registered as ``name``."""
    if name in _registered:
        return _registered[name]
    if name in _loaded:
        return _loaded[name]
    eps = _entry_points()
    if name not in eps:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {architecture_names()}")
    cls = eps[name].load()
    _check_spec(cls, f"entry point {name!r} ({eps[name].value})")
    if cls.spec.name != name:
        raise ConfigError(f"entry point {name!r} loads {cls.__qualname__}, whose spec is named {cls.spec.name!r}")
    _loaded[name] = cls
    return cls


def usable_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, refused unless this machine has it (meta and cpu always do)."""
    allowed = "meta, cpu, cuda or cuda:N (with CUDA), mps (on Apple silicon)"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {device!r} is not a torch device; allowed: {allowed}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                              "use 'cpu', or 'meta' to count without weights")
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {device!r}: MPS (Apple silicon) is not available on this machine; "
                              "use 'cpu' or 'meta'")
    elif resolved.type not in ("meta", "cpu"):
        raise ConfigError(f"device {device!r}: type {resolved.type!r} is not supported; allowed: {allowed}")
    return resolved


def build_model(
    arch: str,
    llm: str | LLMConfig = "vicuna-7b",
    vision: str | VisionConfig = "clip-vit-l-336",
    options: dict[str, Any] | None = None,
    device: str | torch.device = "meta",
    dtype: str | torch.dtype = "bfloat16",
) -> MLLM:
    """Build architecture ``arch`` with the given presets/configs; on ``meta`` no memory is allocated."""
    if not isinstance(arch, str):
        raise ConfigError(f"arch must be an architecture name, one of {architecture_names()}; got {arch!r}")
    cls = get_architecture(arch)
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"options must be a dict of option name to value, got {type(options).__name__}")
    if not isinstance(llm, str | LLMConfig):
        raise ConfigError(f"llm must be a preset name or an LLMConfig, got {type(llm).__name__}")
    if not isinstance(vision, str | VisionConfig):
        raise ConfigError(f"vision must be a preset name or a VisionConfig, got {type(vision).__name__}")
    device = usable_device(device)
    llm_cfg, vision_cfg = resolve_configs(llm, vision)
    torch_dtype = parse_dtype(dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # parameters are created in the target dtype (no fp32 detour)
    try:
        with torch.device(device), (_values_not_initialised() if device.type == "meta" else nullcontext()):
            model = cls(llm_cfg, vision_cfg, options)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch_dtype)


@contextmanager
def _values_not_initialised() -> Iterator[None]:
    """``torch.nn.init``'s in-place initialisers as no-ops: meta tensors hold no values to initialise, and
    on meta some of them (``normal_``) run Python reference code that imports torch._dynamo (~2 s)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")
             and callable(getattr(torch.nn.init, n))]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, _unchanged)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _unchanged(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor
