"""The ``mllm-bench`` command line (typer).

The commands (and torch, which they load) are imported when ``app`` is first used, so that
``mllm-bench --version`` answers at once.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import typer

from mllm_bench.environment import version_text

if TYPE_CHECKING:
    from mllm_bench.declared import Listing


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version (and git commit) and exit."),
) -> None:
    """Multimodal LLM architectures side by side: FLOPs, memory and time."""


def option_defaults(options_cls: type) -> list[tuple[str, str]]:
    """(name, default) of each field of an architecture's ``Options`` dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        out.append((f.name, default))
    return out


def architecture_rows() -> list[tuple[str, str, str]]:
    """(name, wiring, options with defaults) of every installed architecture, in the registry's order.

    The built-in architectures' declarations are read from their source (:mod:`mllm_bench.declared`), without
    importing them (and so torch, ~2 s); a third-party one, one declared in another form, or one registered
    in this process is imported. The answer is kept in the cache folder (:mod:`mllm_bench.fingerprint`), keyed
    by the package's source hash, each entry point's module source and its distribution's version."""
    import hashlib
    import json
    from importlib.metadata import entry_points

    from mllm_bench.declared import BUILTIN_MODULES, ENTRY_POINT_GROUP, Listing, declared_listing
    from mllm_bench.fingerprint import code_fingerprint, module_fingerprint, read_entry, write_entry

    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    registry = sys.modules.get("mllm_bench.registry")  # only a process that imported it can register more
    registered = set(registry.registered_names()) if registry else set()  # these win over an entry point
    key = hashlib.sha256(json.dumps([code_fingerprint(), [
        (ep.name, ep.value, module_fingerprint(ep.module), ep.dist.version if ep.dist else "") for ep in eps
    ]]).encode()).hexdigest()
    cached = read_entry("list", key) if not registered else None
    if isinstance(cached, list) and all(isinstance(row, list) and len(row) == 3 for row in cached):
        return [tuple(row) for row in cached]

    listings: list[Listing | tuple[str, str]] = []  # a listing, or (name, why it failed to load)
    names = {ep.name: ep.value for ep in eps} | {name: "" for name in sorted(registered)}  # "": import it
    for name, value in names.items():
        declared = declared_listing(value) if value.startswith(BUILTIN_MODULES) else None
        try:
            listings.append(declared if declared is not None and declared.name == name else imported_listing(name))
        except ImportError as err:  # a broken third-party plugin must not hide the others
            listings.append((name, str(err)))
    listings.sort(key=lambda x: (x.order, x.name) if isinstance(x, Listing) else (10**9, x[0]))
    rows = [(x.name, x.description, "\n".join(f"{k}={v}" for k, v in x.option_defaults) or "none")
            if isinstance(x, Listing) else (x[0], f"[red]failed to load: {x[1]}[/red]", "") for x in listings]
    if not registered and all(isinstance(x, Listing) for x in listings):  # a failure is shown again, never kept
        write_entry("list", key, rows)
    return rows


def imported_listing(name: str) -> Listing:
    """The listing of architecture ``name`` from its imported class; ImportError (with the reason) when it
    does not load."""
    from mllm_bench.config import ConfigError
    from mllm_bench.declared import Listing
    from mllm_bench.registry import get_architecture

    try:
        cls = get_architecture(name)
    except ConfigError as err:
        raise ImportError(str(err)) from err
    return Listing(name, cls.spec.description, cls.spec.order, tuple(option_defaults(cls.Options)))


def list_cmd() -> None:
    """List architectures (with their options and defaults) and presets."""
    from rich.console import Console
    from rich.table import Table

    from mllm_bench.presets import LLM_PRESETS, VISION_PRESETS

    console = Console()  # made here, so that it reads the terminal width (COLUMNS) of this call

    def table(title: str, columns: list[str], names: list[str]) -> Table:
        """A table whose first column (names) is never wrapped or cut: the other columns give way."""
        t = Table(title=title)
        t.add_column(columns[0], no_wrap=True, min_width=max(map(len, [columns[0], *names])))
        for col in columns[1:]:
            t.add_column(col, overflow="fold")
        return t

    rows = architecture_rows()
    arch = table("architectures", ["name", "wiring", "options (default)"], [r[0] for r in rows])
    for row in rows:
        arch.add_row(*row)
    console.print(arch)
    llms = table("LLM presets", ["name", "hidden", "layers", "heads", "kv heads", "ffn", "vocab"], list(LLM_PRESETS))
    for c in LLM_PRESETS.values():
        llms.add_row(c.name, *map(str, (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads,
                                        c.intermediate_size, c.vocab_size)))
    console.print(llms)
    vis = table("vision presets", ["name", "kind", "width", "layers run", "image", "patch", "visual tokens"],
                list(VISION_PRESETS))
    for v in VISION_PRESETS.values():
        vis.add_row(v.name, v.kind, str(v.hidden_size), f"{v.layers_run}/{v.num_layers}", str(v.image_size),
                    str(v.patch_size), str(v.tokens_per_image))
    console.print(vis)


def build_app() -> typer.Typer:
    """The typer app with every command."""
    from .compare import compare
    from .literature import literature
    from .paper import paper
    from .report import report
    from .sweep import sweep
    from .train_cost import train_cost

    built = typer.Typer(no_args_is_help=True, add_completion=False, help="Multimodal LLM architectures side by side.")
    built.callback()(_root)
    built.command("list")(list_cmd)
    built.command("compare")(compare)
    built.command("sweep")(sweep)
    built.command("train-cost")(train_cost)
    built.command("paper")(paper)
    built.command("report")(report)
    built.command("literature")(literature)
    return built


def __getattr__(name: str) -> Any:
    """``app`` is built on first use (``from mllm_bench.cli.app import app``)."""
    if name == "app":
        globals()["app"] = built = build_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        typer.echo(version_text())
        return
    build_app()()


def run() -> None:
    """The ``mllm-bench`` console script: :func:`main`, then an exit that skips tearing down the interpreter.

    Tearing down torch's modules takes about 0.8 s at every exit, and nothing needs it: results are written,
    closed and renamed into place before a command returns. The ``atexit`` handlers still run (multiprocessing
    joins its children there), then stdout and stderr are flushed. With threads other than this one running, a
    profiler or tracer attached (``python -m cProfile`` writes its file after the program returns), or an uncaught
    exception, the exit is Python's own."""
    import atexit
    import os
    import threading

    try:
        main()
        code: object = 0
    except SystemExit as exit_:
        code = exit_.code
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or threading.active_count() > 1 or sys.getprofile() or sys.gettrace():
        sys.exit(code)
    run_exit_handlers()
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (| head): Python's own status for a failed flush at exit
        code = code or 120
    os._exit(code)


if __name__ == "__main__":
    run()
