"""Reading an architecture's listing from source: the plain forms it follows, and None for anything else."""

from __future__ import annotations

import sys
import textwrap

import pytest

from mllm_bench.declared import Listing, declared_listing

BASE = '''
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BaseOptions:
    width: int = 8
    names: tuple[str, ...] = ("a", "b")
    gate: float | None = None


class Base:
    Options = BaseOptions
    spec = make_spec(name="base", description="a base " "wiring", order=3)
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``plugpkg`` on sys.path whose ``__init__`` must never run (it raises)."""
    root = tmp_path / "plugpkg"
    root.mkdir()
    (root / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (root / "base.py").write_text(BASE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m.startswith("plugpkg")]:
        del sys.modules[name]


def _write(root, name: str, text: str) -> None:
    (root / f"{name}.py").write_text(textwrap.dedent(text))


def test_a_class_found_through_imports_with_inherited_options_is_read_without_running_its_package(package) -> None:
    _write(package, "child", '''
        from .base import Base


        class Child(Base):
            spec = replace(Base.spec, name="child", description="child wiring", order=7)
    ''')
    _write(package, "exported", "from .child import Child as Exported\n")
    assert declared_listing("plugpkg.exported:Exported") == Listing(
        "child", "child wiring", 7, (("width", "8"), ("names", "('a', 'b')"), ("gate", "None")))
    assert declared_listing("plugpkg.base:Base").description == "a base wiring"  # implicit concatenation
    assert "plugpkg" not in sys.modules


@pytest.mark.parametrize("body", [
    'spec = make_spec(name="c", description=DESCRIPTION, order=1)',  # not a literal
    'spec = make_spec(name="c", description="d")',  # no order of its own
    "pass",  # no spec of its own: the registry refuses it, so the import gives the error
])
def test_a_spec_in_another_form_is_not_read(package, body: str) -> None:
    _write(package, "other", f'''
        from .base import Base


        class Other(Base):
            {body}
    ''')
    assert declared_listing("plugpkg.other:Other") is None


@pytest.mark.parametrize("field_line", ["names: list = field(default_factory=list)", "width: int = WIDTH",
                                        "limit: ClassVar[int] = 3"])
def test_options_with_a_field_in_another_form_are_not_read(package, field_line: str) -> None:
    _write(package, "opts", f'''
        from dataclasses import dataclass, field


        @dataclass
        class Opts:
            {field_line}


        class Arch:
            Options = Opts
            spec = make_spec(name="arch", description="d", order=1)
    ''')
    assert declared_listing("plugpkg.opts:Arch") is None


def test_undecorated_options_a_missing_class_or_module_are_not_read(package) -> None:
    _write(package, "plain", '''
        class Opts:
            width: int = 1


        class Arch:
            Options = Opts
            spec = make_spec(name="arch", description="d", order=1)
    ''')
    assert declared_listing("plugpkg.plain:Arch") is None
    assert declared_listing("plugpkg.plain:Missing") is None
    assert declared_listing("plugpkg.nowhere:Arch") is None
    assert declared_listing("not a reference") is None


def test_a_module_edited_in_place_is_read_again(package) -> None:
    """Parses are kept per file state (modification time and size), so an edit is seen in the same process."""
    _write(package, "edited", '''
        from .base import Base


        class Arch(Base):
            spec = make_spec(name="arch", description="before", order=1)
    ''')
    assert declared_listing("plugpkg.edited:Arch").description == "before"
    _write(package, "edited", '''
        from .base import Base


        class Arch(Base):
            spec = make_spec(name="arch", description="after the edit", order=1)
    ''')
    assert declared_listing("plugpkg.edited:Arch").description == "after the edit"
