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

Many of those Python kernels (``torch._refs``' elementwise ops, ``cat``, ``where``) are wrapped in
``torch._disable_dynamo``, whose first call imports torch._dynamo (about 1.7 s) only to run the kernel
outside torch.compile. Counting is never compiled, so :func:`kernels_without_dynamo_shim` lets the wrapper
call its kernel directly for the duration, and takes that back on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from types import FunctionType
from typing import Any

import torch
import torch._compile
import torch._decomp

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


def _noop() -> None:
    return None


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


@cache
def _shimmed_kernels() -> tuple[Callable[..., Any], ...]:
    """The functions that ``torch._disable_dynamo`` wraps inside the Python meta kernels torch registers
    (``torch._decomp``'s tables, from which the meta kernels are made), found by walking each kernel's
    wrappers (their ``__wrapped__`` and the functions their closures hold). Empty when torch's shim changes
    shape, and then the kernels run as torch wraps them (slower, the same result)."""
    shim_code = torch._compile._disable_dynamo(_noop).__code__
    found: dict[int, Callable[..., Any]] = {}
    seen: set[int] = set()
    todo = [k for table in torch._decomp.global_decomposition_table.values() for k in table.values()]
    while todo:
        f = todo.pop()
        if not isinstance(f, FunctionType) or id(f) in seen:
            continue
        seen.add(id(f))
        cells = {name: _contents(cell) for name, cell in zip(f.__code__.co_freevars, f.__closure__ or (), strict=True)}
        if f.__code__ is shim_code and isinstance(cells.get("fn"), FunctionType):
            found[id(cells["fn"])] = cells["fn"]
        todo += [getattr(f, "__wrapped__", None), *cells.values()]
    return tuple(found.values())


@contextmanager
def kernels_without_dynamo_shim() -> Iterator[None]:
    """Inside, torch's ``_disable_dynamo``-wrapped meta kernels call their function directly instead of
    importing torch._dynamo to wrap it (the shim looks for a resolved wrapper on the function first: here it
    is the function itself). For code that is not being compiled, which counting never is; on exit every
    function is as it was."""
    marked = []
    for fn in _shimmed_kernels():
        if "__dynamo_disable" not in fn.__dict__:
            fn.__dynamo_disable = fn  # type: ignore[attr-defined]
            marked.append(fn)
    try:
        yield
    finally:
        for fn in marked:
            if fn.__dict__.get("__dynamo_disable") is fn:
                del fn.__dynamo_disable  # type: ignore[attr-defined]
