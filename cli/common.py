"""What the commands share: option parsing, error handling (exit codes), progress bars, the profiler."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Any, TypeVar

import pandas as pd
import typer
from mllm_bench.reports.collect import COUNT_CHOICES
from mllm_bench.reports.tables import FORMATS
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from mllm_bench.config import ConfigError
from mllm_bench.costmodel import CONVENTIONS, SCOPES
from mllm_bench.presets import LLM_PRESETS, VISION_PRESETS
from mllm_bench.registry import architecture_names, get_architecture
from mllm_bench.workload import DTYPES, STAGES, Workload

# Messages and progress go to stderr so that `--format csv|json|markdown|latex` output stays clean.
err_console = Console(stderr=True)
DEFAULT_ARCHS = ("llava", "flamingo", "saisa")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _choices(name: str, values: Sequence[str]) -> Any:
    """A ``str`` Enum of an option's choices (typer lists and checks them), from the library's own tuple."""
    return Enum(name, [(v, v) for v in values], type=str)


Measure = _choices("Measure", ("auto", "never", "always"))
Format = _choices("Format", FORMATS)
Count = _choices("Count", COUNT_CHOICES)
Scope = _choices("Scope", SCOPES)
Convention = _choices("Convention", CONVENTIONS)

ARCH_HELP = "Architecture(s), repeatable or comma-separated (default: llava, flamingo, saisa)."
OPTION_HELP = "Architecture option ARCH.KEY=VALUE, repeatable (e.g. flamingo.num_latents=4)."


class Opt:
    """Options several commands take: the flags and help are here, each command's signature gives the default,
    e.g. ``llm: Opt.LLM = "vicuna-7b"``."""

    Archs = Annotated[list[str] | None, typer.Option("--arch", "-a", help=ARCH_HELP)]
    LLM = Annotated[str, typer.Option(help="LLM preset.")]
    Vision = Annotated[str, typer.Option(help="Vision-tower preset.")]
    ArchOptions = Annotated[list[str] | None, typer.Option("--option", "-o", help=OPTION_HELP)]
    BatchSize = Annotated[int, typer.Option(min=1, help="Samples per batch.")]
    Images = Annotated[int, typer.Option(min=0, help="Images per sample.")]
    TextBefore = Annotated[int, typer.Option(min=0, help="Text tokens before the first image.")]
    TextAfter = Annotated[int, typer.Option(min=0, help="Text tokens after the last image.")]
    Generate = Annotated[int, typer.Option(min=0, help="Tokens to generate when measuring decode.")]
    Device = Annotated[str | None, typer.Option(help="Device to measure on (default: cuda if available, else cpu).")]
    DType = Annotated[str, typer.Option(help="bfloat16 | float16 | float32.")]
    OutputFormat = Annotated[Format, typer.Option("--format", "-f", help="What to print.")]


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Bad input (ConfigError) → message + exit 2; any other failure → message + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except ConfigError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from err
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
            err_console.print(f"[bold red]failed:[/] {type(err).__name__}: {err}", highlight=False)
            if "--debug" in sys.argv:
                raise
            raise typer.Exit(EXIT_FAILURE) from err

    return wrapper  # type: ignore[return-value]


def split_list(values: Iterable[str] | None) -> list[str]:
    """Repeatable options that also take comma lists: ``-a llava,saisa -a flamingo``."""
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def parse_archs(values: Iterable[str] | None, default: Sequence[str] = DEFAULT_ARCHS) -> list[str]:
    archs = split_list(values) or list(default)
    known = architecture_names()
    bad = [a for a in archs if a not in known]
    if bad:
        raise ConfigError(f"--arch: unknown architecture(s) {bad}; choose from {known}")
    return list(dict.fromkeys(archs))


def check_presets(llm: str, vision: str) -> None:
    if llm not in LLM_PRESETS:
        raise ConfigError(f"--llm: unknown preset {llm!r}; choose one of {sorted(LLM_PRESETS)}")
    if vision not in VISION_PRESETS:
        raise ConfigError(f"--vision: unknown preset {vision!r}; choose one of {sorted(VISION_PRESETS)}")


def parse_stages(values: Iterable[str] | None, default: Sequence[str] = ("pretrain", "finetune")) -> list[str]:
    stages = split_list(values) or list(default)
    allowed = [s for s in STAGES if s != "inference"]
    bad = [s for s in stages if s not in allowed]
    if bad:
        raise ConfigError(f"--stage: unknown stage(s) {bad}; choose from {allowed}")
    return stages


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def _coerce(arch: str, key: str, raw: str, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind in (int, float):
            return kind(raw)
    except ValueError as err:
        raise ConfigError(f"--option {arch}.{key}: {raw!r} is not a {kind.__name__}") from err
    return raw


def parse_arch_options(specs: Iterable[str] | None, archs: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``--option flamingo.num_latents=4`` (repeatable) → {"flamingo": {"num_latents": 4}}, typed and checked."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs or ():
        target, sep, raw = spec.partition("=")
        arch, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--option {spec!r}: expected ARCH.KEY=VALUE, e.g. flamingo.num_latents=4")
        if archs is not None and arch not in archs:
            raise ConfigError(f"--option {spec!r}: architecture {arch!r} is not being run; running {list(archs)}")
        options_cls = get_architecture(arch).Options
        fields = {f.name: f for f in dataclasses.fields(options_cls)}
        if key not in fields:
            raise ConfigError(f"--option {spec!r}: {arch} has no option {key!r}; options: {sorted(fields) or 'none'}")
        out.setdefault(arch, {})[key] = _coerce(arch, key, raw.strip(), fields[key].default)
    for arch, opts in out.items():  # validate the whole set now, not halfway through a run
        get_architecture(arch).Options(**opts)
    return out


def parse_models(arch: Iterable[str] | None, llm: str, vision: str,
                 option: Iterable[str] | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``--arch``, ``--llm``, ``--vision`` and ``--option`` checked together: the architectures and their options."""
    archs = parse_archs(arch)
    check_presets(llm, vision)
    return archs, parse_arch_options(option, archs)


def make_workload(dtype: str, device: str | None, **fields: Any) -> Workload:
    """The workload of ``--dtype``, ``--device`` (default: :func:`default_device`) and the other fields."""
    check_dtype(dtype)
    return Workload(dtype=dtype, device=device or default_device(), **fields)


def get_profile() -> Callable[..., pd.DataFrame]:
    """The profiler's ``profile(arch, workload, llm=, vision=, options=, measure=)``."""
    from mllm_bench.profile import profile

    return profile


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def progress_bar(total: int, description: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr; yields ``advance(label)``."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("[dim]{task.fields[label]}"), console=err_console,
                        transient=True, disable=quiet)
    with progress:
        task = progress.add_task(description, total=total, label="")

        def advance(label: str) -> None:
            progress.update(task, advance=1, label=label)

        yield advance
