"""What the commands share: option parsing, error handling (exit codes), progress bars, the profiler."""

from __future__ import annotations

import functools
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, TypeVar

import typer
from rich.console import Console

# Startup (--help, usage errors) imports nothing heavy: torch, pandas and the architectures load inside
# the functions that need them (tests/test_speed.py checks sys.modules).
from mllm_bench.choices import CONVENTIONS, COUNT_CHOICES, DTYPE_NAMES, FORMATS, PUBLISHED_CONVENTIONS, SCOPES, STAGES
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig
from mllm_bench.presets import LLM_PRESETS, VISION_PRESETS

if TYPE_CHECKING:
    import pandas as pd

    from mllm_bench.workload import Workload

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
Convention = _choices("Convention", CONVENTIONS + PUBLISHED_CONVENTIONS)  # inference FLOPs: ours or a paper's
TrainConvention = _choices("TrainConvention", CONVENTIONS)  # training FLOPs exist in mllm-bench's own only
CONVENTION_HELP = ("FLOPs convention: dense (2 FLOPs/multiply-add, no mask discount) or effective (mask-allowed "
                   "pairs), in --scope; or a published one, which fixes its own scope: "
                   + ", ".join(PUBLISHED_CONVENTIONS) + " (see `mllm-bench literature --conventions`).")

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
    ImageSize = Annotated[str | None, typer.Option(
        "--image-size", help="N: square images with the vision tower run at N px (default: the preset's size); "
        "WxH: images of W x H px (the tower at its preset size), each architecture taking them as its image "
        "processor does (LLaVA-1.5 resizes to the tower, LLaVA-NeXT cuts AnyRes crops); WxH,WxH,...: one per "
        "image.")]


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
    """``--arch`` values (``default`` when the option is not given; given but empty is an error)."""
    from mllm_bench.registry import architecture_names, is_architecture

    if values and not split_list(values):
        raise ConfigError(f"--arch: no architecture named (got {list(values)}); name one or more of "
                          f"{architecture_names()}, or leave --arch out for the defaults")
    archs = split_list(values) or list(default)
    bad = [a for a in archs if not is_architecture(a)]  # the names alone: importing every architecture takes 0.2 s
    if bad:
        raise ConfigError(f"--arch: unknown architecture(s) {bad}; choose from {architecture_names()}")
    return list(dict.fromkeys(archs))


def check_presets(llm: str, vision: str) -> None:
    if llm not in LLM_PRESETS:
        raise ConfigError(f"--llm: unknown preset {llm!r}; choose one of {sorted(LLM_PRESETS)}")
    if vision not in VISION_PRESETS:
        raise ConfigError(f"--vision: unknown preset {vision!r}; choose one of {sorted(VISION_PRESETS)}")


def parse_stages(values: Iterable[str] | None, default: Sequence[str] = ("pretrain", "finetune")) -> list[str]:
    allowed = [s for s in STAGES if s != "inference"]
    if values and not split_list(values):
        raise ConfigError(f"--stage: no stage named (got {list(values)}); name one or more of {allowed}, "
                          "or leave --stage out for both")
    stages = split_list(values) or list(default)
    bad = [s for s in stages if s not in allowed]
    if bad:
        raise ConfigError(f"--stage: unknown stage(s) {bad}; choose from {allowed}")
    return stages


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype: unknown dtype {dtype!r}; choose one of {sorted(DTYPE_NAMES)}")


def parse_arch_options(specs: Iterable[str] | None, archs: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``--option flamingo.num_latents=4`` (repeatable) → {"flamingo": {"num_latents": 4}}, typed and checked."""
    from mllm_bench.model import option_value
    from mllm_bench.registry import get_architecture

    out: dict[str, dict[str, Any]] = {}
    for spec in specs or ():
        target, sep, raw = spec.partition("=")
        arch, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--option {spec!r}: expected ARCH.KEY=VALUE, e.g. flamingo.num_latents=4")
        if archs is not None and arch not in archs:
            raise ConfigError(f"--option {spec!r}: architecture {arch!r} is not being run; running {list(archs)}")
        options_cls = get_architecture(arch).Options
        out.setdefault(arch, {})[key] = option_value(options_cls, arch, key, raw.strip())
    for arch, opts in out.items():  # validate the whole set now, not halfway through a run
        get_architecture(arch).Options(**opts)
    return out


def parse_models(arch: Iterable[str] | None, llm: str, vision: str,
                 option: Iterable[str] | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``--arch``, ``--llm``, ``--vision`` and ``--option`` checked together: the architectures and their options."""
    archs = parse_archs(arch)
    check_presets(llm, vision)
    return archs, parse_arch_options(option, archs)


def parse_image_size(raw: str | None) -> tuple[int | None, tuple[tuple[int, int], ...] | None]:
    """``--image-size``: ``N`` gives (tower size N, None); ``WxH[,WxH...]`` gives (None, ((H, W), ...)), the
    images' original (height, width) as ``Workload.image_sizes`` holds them."""
    if raw is None or not raw.strip():
        return None, None
    text = raw.strip().lower()
    try:
        if "x" not in text:
            size = int(text)
            if size < 1:
                raise ValueError(text)
            return size, None
        from mllm_bench.image_sizes import parse_sizes

        return None, parse_sizes(text, ",")
    except ValueError:
        raise ConfigError(f"--image-size {raw!r}: expected N (square, px) or WxH (e.g. 672x1008), or WxH,WxH,... "
                          "one per image") from None


def make_workload(dtype: str, device: str | None, **fields: Any) -> Workload:
    """The workload of ``--dtype``, ``--device`` (default: :func:`default_device`; one this machine has)."""
    check_dtype(dtype)
    if device is not None:
        check_device(device)
    from mllm_bench.workload import Workload

    return Workload(dtype=dtype, device=device or default_device(), **fields)


# ----- refusing a run before any work: devices, output paths, models, workloads, memory ----------------
def check_device(device: str) -> None:
    """``--device``: cpu, meta, or a CUDA/MPS device this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a torch device; choose cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "meta"):
        raise ConfigError(f"--device {device}: not supported; choose cpu, cuda, cuda:N or mps")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _cannot_create_in(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (None when it can): tries one and removes it."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".mllm-bench-probe-")
    except OSError as err:
        return err.strerror or type(err).__name__
    os.close(fd)
    os.unlink(name)
    return None


def check_out_folder(path: Path, option: str = "--out", beside: bool = False) -> None:
    """``path`` is a folder (or can be made one) that files can be written in; with ``beside``, also its parent
    (where a new set of files is staged before it is swapped in)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder; name a folder (it is created when missing)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{option} {path}: cannot create the folder, {base} is a file")
    # the staging folder goes where compare's replace_set puts it: path.parent, as written
    folders = [base] if base != path.absolute() else [path, *([path.parent] if beside else [])]
    for folder in folders:
        why = _cannot_create_in(folder)
        if why:
            raise ConfigError(f"{option} {path}: cannot write in {folder} ({why})")


SQLITE_HEADER = b"SQLite format 3\x00"


def check_db_file(path: Path, option: str = "--db") -> None:
    """``path`` is a SQLite file that can be appended to, or can be created."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, not a SQLite file")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{option} {path}: is not a regular file; name a new file or an existing .db file")
    if path.exists():
        try:
            with path.open("r+b") as f:  # opened for writing, nothing written
                head = f.read(len(SQLITE_HEADER))
        except OSError as err:
            raise ConfigError(f"{option} {path}: cannot open it for writing ({err.strerror or err})") from err
        if head and head != SQLITE_HEADER:
            raise ConfigError(f"{option} {path}: is not a SQLite database (it does not start with the SQLite "
                              "header); name a new file or an existing .db file")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise ConfigError(f"{option} {path}: cannot create its folder, {base} is a file")
    why = _cannot_create_in(base)  # SQLite writes its journal beside the file
    if why:
        raise ConfigError(f"{option} {path}: cannot write in {base} ({why})")


class Run(NamedTuple):
    """One profiler call a command will make: what :func:`check_before_work` checks."""

    arch: str
    llm: str | LLMConfig
    vision: str | VisionConfig
    options: dict[str, Any] | None
    workload: Workload
    measure: str = "never"

    @classmethod
    def of_point(cls, point: Any) -> Run:
        """The run of a sweep point (:class:`mllm_bench.reports.sweep.Point`)."""
        return cls(point.arch, point.llm, point.vision_config(), dict(point.options) or None, point.make_workload(),
                   point.measure)


def available_memory(device: str) -> tuple[int, str] | None:
    """Bytes free for a measurement on ``device`` and where the number comes from; None when unknown.

    CPU: MemAvailable of /proc/meminfo, or the cgroup's limit minus its usage when that is lower;
    CUDA: ``torch.cuda.mem_get_info``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0]), f"free on {device} (torch.cuda.mem_get_info)"
    if dev.type != "cpu":
        return None
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append((int(limit) - used, "the cgroup's memory.max minus memory.current"))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def estimated_peak_bytes(model: Any, workload: Workload) -> tuple[float, str]:
    """The analytic memory a measurement of ``workload`` holds at least, and its parts (the ``weights_bytes``,
    ``kv_cache_bytes`` and ``train_peak_memory_bytes`` rows; activations of inference not included)."""
    from mllm_bench.memory import analytic_memory

    mem = analytic_memory(model, model.analytic_cost(workload), workload.torch_dtype.itemsize)
    if workload.is_training:
        parts = (f"weights {gib(mem.weights)} + gradients {gib(mem.grads)} + optimizer state {gib(mem.optimizer)} "
                 f"+ activations {gib(mem.activations)}")
        return mem.train_peak, parts
    kv = mem.kv_cache["all"] * workload.batch_size
    return mem.weights + kv, f"weights {gib(mem.weights)} + KV cache {gib(kv)}"


def gib(n: float) -> str:
    """Bytes in GiB (MiB below 1 GiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_runs(runs: Iterable[Run], attention_backend: str = "sdpa", decode_mode: str | None = None) -> None:
    """Refuse what would fail or mislead part-way: each architecture is built on meta with its options and
    LLM (no weights), each workload checked against its context, and each measured run against the device's
    memory and the CUDA-only paths (decode mode ``graph``; the attention backends all have a CPU path, see
    :mod:`mllm_bench.attention`). Models are built once per configuration."""
    import torch

    from mllm_bench import count_cache
    from mllm_bench.attention import available_backends
    from mllm_bench.profile import cached_meta_model, should_measure
    from mllm_bench.static_decode import DECODE_MODES
    from mllm_bench.workload import check_workload_fits

    if attention_backend != "fast" and attention_backend not in available_backends():
        raise ConfigError(f"--attention-backend {attention_backend!r}: attention_backend must be 'fast' or one of "
                          f"{available_backends()}")
    if decode_mode is not None and decode_mode not in DECODE_MODES:
        raise ConfigError(f"--decode-mode {decode_mode!r}: decode_mode must be one of {list(DECODE_MODES)}")
    models: dict[str, Any] = {}
    largest: dict[str, tuple[float, str, str]] = {}  # device -> (estimate, its parts, which run)
    for run in runs:
        llm_name = run.llm if isinstance(run.llm, str) else run.llm.name
        device = run.workload.device if run.workload.device != "meta" else default_device()
        # a run this code checked before, with the same model and workload, passes again: no model is built
        checked_name = count_cache.model_key("checks", run.arch, run.llm, run.vision, run.options, run.workload)
        checked = count_cache.load(checked_name, "checks") if checked_name else None
        if checked is not None and isinstance(checked.get("params"), int) and not should_measure(
                run.measure, device, checked["params"]):
            continue
        key = repr((run.arch, run.llm, run.vision, sorted((run.options or {}).items()), run.workload.dtype))
        if key not in models:
            try:
                models[key] = cached_meta_model(run.arch, run.llm, run.vision, run.options, run.workload.dtype)
            except ConfigError as err:
                raise ConfigError(f"{run.arch} with --llm {llm_name}: {err}") from err
        model = models[key]
        try:
            check_workload_fits(run.workload, model.llm_config, model.positions_per_image)
            model.example_batch(run.workload.replace(device="meta"))  # counts that depend on each image's size
        except ConfigError as err:
            raise ConfigError(f"{run.arch} on {llm_name}: {err}") from err
        params = model.num_parameters()
        if checked_name:
            count_cache.store(checked_name, {"params": params}, "checks")
        if not should_measure(run.measure, device, params):
            continue
        if decode_mode == "graph" and torch.device(device).type != "cuda":
            raise ConfigError(f"--decode-mode graph captures decode steps as a CUDA graph and needs a CUDA device; "
                              f"on {device} use dynamic or static")
        estimate, parts = estimated_peak_bytes(model, run.workload)
        if estimate > largest.get(device, (-1.0,))[0]:
            largest[device] = (estimate, parts, f"{run.arch} {run.workload.stage} on {llm_name}")
    for device, (estimate, parts, what) in largest.items():
        free = available_memory(device)
        if free is not None and estimate > free[0]:
            raise ConfigError(
                f"--measure: measuring {what} needs at least {gib(estimate)} ({parts}) on {device}, but "
                f"{gib(free[0])} is available ({free[1]}); use --measure never (FLOPs and analytic memory only), "
                "a smaller model or batch, or a device with more memory")


def freeze_loaded_objects() -> None:
    """Keep the objects alive now (the modules imported: torch's alone are ~170k objects) out of the cyclic
    garbage collector's full passes for the rest of the process. Each pass over them costs 50-100 ms and
    frees nothing, and a command would run several (0.3-0.4 s of a compare); objects made later are
    collected as usual."""
    gc.freeze()


def check_before_work(runs: Iterable[Run] = (), out: Path | None = None, db: Path | None = None,
                      out_beside: bool = False, **run_checks: Any) -> None:
    """Everything a command checks before its first profiler call: ``--out`` and ``--db`` paths
    (:func:`check_out_folder`, :func:`check_db_file`) and the runs (:func:`check_runs`). It runs once torch is
    imported, and first takes what is loaded out of the collector's way (:func:`freeze_loaded_objects`)."""
    freeze_loaded_objects()
    if out is not None:
        check_out_folder(out, beside=out_beside)
    if db is not None:
        check_db_file(db)
    check_runs(runs, **run_checks)


def get_profile() -> Callable[..., pd.DataFrame]:
    """The profiler's ``profile(arch, workload, llm=, vision=, options=, measure=)``."""
    from mllm_bench.profile import profile

    return profile


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def progress_bar(total: int, description: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr, or one plain line per step when stderr is not a terminal (a log, a
    pipe, CI); yields ``advance(label)``."""
    if not quiet and not err_console.is_terminal:
        start, done = time.perf_counter(), 0
        print(f"{description}: {total} steps", file=sys.stderr, flush=True)

        def log(label: str) -> None:
            nonlocal done
            done += 1
            print(f"{description} {done}/{total}: {label} ({time.perf_counter() - start:.1f} s)", file=sys.stderr,
                  flush=True)

        yield log
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("[dim]{task.fields[label]}"), console=err_console,
                        transient=True, disable=quiet)
    with progress:
        task = progress.add_task(description, total=total, label="")

        def advance(label: str) -> None:
            progress.update(task, advance=1, label=label)

        yield advance
