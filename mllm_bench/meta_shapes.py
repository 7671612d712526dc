"""Meta-kernel answers remembered by their inputs' metadata, so that a repeated op is not worked out again.

On meta tensors an op computes nothing: its outputs' shapes, strides and dtypes follow from its
inputs' shapes, strides, dtypes and its other arguments alone. Many of torch's meta kernels are Python
(``torch._refs``, ``torch._meta_registrations``: 0.1–1.5 ms an op), and counting a model runs the same
op on the same shapes thousands of times (32 decoder layers, the same vision tower in every
architecture, every point of a sweep). :class:`MetaOutputs` runs each distinct call once and answers
the next with fresh empty meta tensors of the recorded layout, which is exactly what the kernel would
return.

Only calls that cannot tell the difference are answered: every tensor argument is a strided meta tensor,
the op is functional (its schema mutates nothing and returns no alias of an input), has no
data-dependent output shape, and returns tensors (or a tuple or list of them, or None), all on meta.
Anything else runs the kernel. The key holds the op overload and every argument: tensors by shape,
stride, storage offset, dtype and conjugate/negative bits, everything else by type and value; an
argument the key cannot hold by value (a generator, an arbitrary object) runs the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# At most this many distinct calls are remembered (each a few hundred bytes); then the oldest go.
MAX_ENTRIES = 200_000


class _NotKeyable(Exception):
    """An argument that does not belong in a key: the kernel runs."""


def _key(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta" or obj.layout != torch.strided:
            raise _NotKeyable
        return ("T", tuple(obj.shape), obj.stride(), obj.storage_offset(), obj.dtype, obj.is_conj(), obj.is_neg())
    if obj is None or isinstance(obj, (bool, int, float, complex, str)):
        return (type(obj), obj)
    if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(obj), str(obj))
    if isinstance(obj, (tuple, list, torch.Size)):
        return (type(obj), tuple(_key(v) for v in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _key(v)) for k, v in sorted(obj.items())))
    raise _NotKeyable


def layout_of(out: Any) -> Any:
    """What :func:`rebuild` makes ``out`` again from: (shape, stride, dtype) per tensor, through plain tuples and
    lists; None when ``out`` is anything else (a tensor off meta, a view with a storage offset, another type)."""
    if out is None:
        return ("none",)
    if isinstance(out, torch.Tensor):
        if (out.device.type != "meta" or out.layout != torch.strided or out.storage_offset() != 0 or out.is_conj()
                or out.is_neg()):
            return None
        return ("T", tuple(out.shape), out.stride(), out.dtype)
    if type(out) in (tuple, list):
        parts = tuple(layout_of(v) for v in out)
        return None if any(p is None for p in parts) else (type(out), parts)
    return None


def rebuild(layout: Any) -> Any:
    """Fresh empty meta tensors (in the same tuples and lists) laid out as :func:`layout_of` recorded."""
    if layout[0] == "none":
        return None
    if layout[0] == "T":
        _, shape, stride, dtype = layout
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    kind, parts = layout
    return kind(rebuild(p) for p in parts)


_UNSAFE_TAGS = frozenset({torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output,
                          torch.Tag.nondeterministic_seeded})


def _answerable(func: Any) -> bool:
    """Whether ``func``'s meta outputs are fresh tensors determined by its arguments' metadata."""
    schema = func._schema
    if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
        return False
    return not _UNSAFE_TAGS.intersection(getattr(func, "tags", ()))


class MetaOutputs:
    """Remembered meta-kernel outputs (see the module docstring); one per process is enough."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._answers: dict[Any, Any] = {}
        self._answerable: dict[Any, bool] = {}
        self.hits = self.misses = 0

    def run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``func(*args, **kwargs)``, answered from memory when this call was seen before."""
        ok = self._answerable.get(func)
        if ok is None:
            ok = self._answerable[func] = _answerable(func)
        if not ok:
            return func(*args, **kwargs)
        try:
            key = (func, _key(args), _key(kwargs))
        except _NotKeyable:
            return func(*args, **kwargs)
        layout = self._answers.get(key)
        if layout is not None:
            self.hits += 1
            return rebuild(layout)
        out = func(*args, **kwargs)
        layout = layout_of(out)
        if layout is not None:
            self.misses += 1
            if len(self._answers) >= self.max_entries:
                self._answers.pop(next(iter(self._answers)))
            self._answers[key] = layout
        return out


# The process's memory, shared by every count.
META_OUTPUTS = MetaOutputs()
