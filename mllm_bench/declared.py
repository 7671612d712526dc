"""An architecture's description and option defaults, read from its source without importing it.

``mllm-bench list`` shows each architecture's ``spec.description`` and its ``Options`` fields with their
defaults. Importing an architecture imports torch (~2 s), so for the built-in architectures ``list`` reads
these declarations from the modules' syntax trees instead: the class (followed through ``from ... import``),
its own ``spec = ...(name=..., description=..., order=...)`` with literal values, and its ``Options`` (its own
or a base class's) dataclass, whose fields must have literal defaults. Anything written another way gives
None, and the caller imports the class. A test checks that what is read here equals what the imported classes
say, for every built-in architecture.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ENTRY_POINT_GROUP = "mllm_bench.architectures"  # where architectures are declared (pyproject.toml)
BUILTIN_MODULES = "mllm_bench.architectures."  # the modules of this package's own architectures
MAX_HOPS = 16  # imports and base classes followed before giving up


def _locate(module: str) -> tuple[Path, bool] | None:
    """(source file, is a package) of ``module``, found without running it or any package above it that is
    not imported yet (a package's ``__init__`` may import torch)."""
    parent, _, leaf = module.rpartition(".")
    if not parent or parent in sys.modules:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        return Path(spec.origin), spec.submodule_search_locations is not None
    above = _locate(parent)
    if above is None or not above[1]:
        return None
    folder = above[0].parent
    for path, is_package in ((folder / leaf / "__init__.py", True), (folder / f"{leaf}.py", False)):
        if path.is_file():
            return path, is_package
    return None


@cache
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module | None:
    """The syntax tree of the file at ``path`` as it is at ``mtime_ns`` and ``size`` (a module is read by every
    architecture that imports from it or derives from its classes: parsed once)."""
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _module_tree(module: str) -> tuple[ast.Module, bool] | None:
    """The syntax tree of ``module``'s source and whether it is a package."""
    found = _locate(module)
    if found is None:
        return None
    try:
        stat = found[0].stat()
    except OSError:
        return None
    tree = _parse(found[0], stat.st_mtime_ns, stat.st_size)
    return None if tree is None else (tree, found[1])


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The module a ``from ... import`` in ``module`` names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _find_class(module: str, name: str, hops: int = 0) -> tuple[str, ast.ClassDef] | None:
    """(module, class definition) of the top-level class ``name`` as seen from ``module``."""
    found = _module_tree(module) if hops <= MAX_HOPS else None
    if found is None:
        return None
    tree, is_package = found
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _find_class(_absolute(module, node, is_package), alias.name, hops + 1)
    return None


def _class_attribute(cls: ast.ClassDef, attr: str) -> ast.expr | None:
    """The value assigned to ``attr`` in the class body (``attr = ...`` or ``attr: T = ...``)."""
    value = None
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            value = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attr:
            value = node.value
    return value


def _inherited(module: str, cls: ast.ClassDef, attr: str, hops: int = 0) -> tuple[str, ast.expr] | None:
    """(module, value) of ``attr`` on ``cls`` or, when it assigns none, its first base that does (the
    method resolution order of single inheritance; more than one base gives None)."""
    value = _class_attribute(cls, attr)
    if value is not None:
        return module, value
    if len(cls.bases) != 1 or not isinstance(cls.bases[0], ast.Name) or hops > MAX_HOPS:
        return None
    base = _find_class(module, cls.bases[0].id)
    return _inherited(*base, attr, hops + 1) if base else None


def _literal(node: ast.expr) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _spec_fields(cls: ast.ClassDef) -> dict[str, object] | None:
    """The literal keywords of the class's own ``spec = ...(name=..., description=..., order=...)``."""
    call = _class_attribute(cls, "spec")
    if not isinstance(call, ast.Call):
        return None
    out = {}
    for keyword in call.keywords:
        if keyword.arg in ("name", "description", "order"):
            ok, value = _literal(keyword.value)
            if not ok:
                return None
            out[keyword.arg] = value
    if not (isinstance(out.get("name"), str) and isinstance(out.get("description"), str)
            and isinstance(out.get("order"), int)):
        return None
    return out


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for deco in cls.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Name) and target.id == "dataclass":
            return True
    return False


def _option_defaults(module: str, cls: ast.ClassDef) -> list[tuple[str, str]] | None:
    """(name, repr of the default) of each field of the class's ``Options`` dataclass."""
    found = _inherited(module, cls, "Options")
    if found is None or not isinstance(found[1], ast.Name):
        return None
    options = _find_class(found[0], found[1].id)
    if options is None or not _is_dataclass(options[1]) or options[1].bases:
        return None
    out = []
    for node in options[1].body:
        if isinstance(node, ast.AnnAssign):
            if not isinstance(node.target, ast.Name) or "ClassVar" in ast.unparse(node.annotation):
                return None
            if node.value is None:
                out.append((node.target.id, "(required)"))
                continue
            ok, value = _literal(node.value)
            if not ok:
                return None  # field(...) or a name: the imported class answers
            out.append((node.target.id, repr(value)))
    return out


@dataclass(frozen=True)
class Listing:
    """What ``mllm-bench list`` shows of an architecture, and where it sits (``spec.order``)."""

    name: str
    description: str
    order: int
    option_defaults: tuple[tuple[str, str], ...]


def declared_listing(entry_point: str) -> Listing | None:
    """The listing of the class an entry point ``module:Class`` names, read from source; None where a
    declaration is not written in the plain form this reads."""
    module, _, name = entry_point.partition(":")
    if not module or not name or "." in name:
        return None
    found = _find_class(module, name)
    if found is None:
        return None
    spec, options = _spec_fields(found[1]), _option_defaults(*found)
    if spec is None or options is None:
        return None
    return Listing(spec["name"], spec["description"], spec["order"], tuple(options))
