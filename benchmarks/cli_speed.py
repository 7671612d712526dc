"""How fast ``mllm-bench`` answers where users wait, as ratios to a bare ``python -c "import torch"``.

Each command runs as a whole process, at least ``--repeat`` times (default 3), interleaved with the
``import torch`` baseline so that load drifts alike for both; the medians are compared. Peak RSS is the
largest ``ru_maxrss`` of the command's process tree (``os.wait4``'s rusage of each run, children
included). Sweeps write into a temporary folder, a fresh one each run. The count cache
(``mllm_bench.count_cache``) is measured both ways: ``cold`` gives every run an empty cache folder, ``warm``
one filled by an untimed run of the same command first. Prints one line per command:
ratio, target, met/missed, then the load average. Exit status 1 when a target is missed.

    python benchmarks/cli_speed.py [--repeat 3] [--only help,compare]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "mllm-bench")
MLLM = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "mllm_bench.cli.app"]
SUBCOMMANDS = ("list", "compare", "sweep", "train-cost", "paper", "report", "literature")
MEMORY_LIMIT = 2**30  # bytes
VISUAL_5 = "visual_tokens=144,576,1152,2304,2880"
VISUAL_10 = "visual_tokens=144,256,576,784,1024,1152,1296,1600,2304,2880"  # + 1024 text: within 4,096 positions
TEXT_5 = "text_tokens=64,128,256,512,1024"


@dataclass
class Case:
    name: str
    argv: list[str]
    target: float  # at most this many times the import-torch baseline
    group: str
    expect_rc: int = 0
    sweep: bool = False  # gets --out <fresh temp folder>
    cache: str = "cold"  # the caches (counts, list): "cold" (empty for every run) or "warm" (filled by an untimed
    # run of the same command first)
    judged: bool = True  # False: printed for comparison, not a target
    program: list[str] | None = None  # run this command line instead of ``mllm-bench`` + argv


def cases() -> list[Case]:
    out = [Case("mllm-bench --help", ["--help"], 0.3, "help"),
           Case("mllm-bench list, cold cache", ["list"], 0.3, "help"),
           Case("mllm-bench list, warm cache", ["list"], 0.3, "help", cache="warm")]
    out += [Case(f"mllm-bench {c} --help", [c, "--help"], 0.3, "help") for c in SUBCOMMANDS]
    out.append(Case("usage error (compare --batch-size 0)", ["compare", "--batch-size", "0"], 0.3, "help",
                    expect_rc=2))
    for cache in ("cold", "warm"):
        out.append(Case(f"compare (defaults), {cache} count cache", ["compare", "--format", "json"], 1.6, "compare",
                        cache=cache))
        out.append(Case(f"compare --llm vicuna-13b, {cache} count cache",
                        ["compare", "--format", "json", "--llm", "vicuna-13b"], 1.8, "compare", cache=cache))
    # what a counted compare imports whatever it does (sympy: torch's meta kernels of elementwise ops import
    # torch.fx.experimental.symbolic_shapes; pandas: the rows; pydantic: typer's parameter coercion)
    out.append(Case("imports alone: torch, sympy, pandas, pydantic", [], 1.6, "compare", judged=False,
                    program=[sys.executable, "-c", "import torch, torch.fx.experimental.symbolic_shapes, pandas, "
                             "typer._adapters"]))
    sweep_200 = ["sweep", "-a", "llava,naavit,flamingo,saisa", "--vary", VISUAL_10, "--vary", TEXT_5, "--no-plots"]
    for cache in ("cold", "warm"):
        out.append(Case(f"sweep --vary {VISUAL_5} (15 points), {cache}", ["sweep", "--vary", VISUAL_5, "--no-plots"],
                        2.5, "sweep", sweep=True, cache=cache))
        out.append(Case(f"sweep 4 archs x 10 visual x 5 text (200 points), {cache}", sweep_200, 10.0, "sweep",
                        sweep=True, cache=cache))
    # the sweeps above count in one process per core (the default for these grids); in one process, for comparison
    out.append(Case("sweep 15 points, cold, --jobs 1", ["sweep", "--vary", VISUAL_5, "--no-plots", "--jobs", "1"],
                    2.5, "sweep", sweep=True, judged=False))
    out.append(Case("sweep 200 points, cold, --jobs 1", [*sweep_200, "--jobs", "1"], 10.0, "sweep", sweep=True,
                    judged=False))
    return out


def run_once(argv: list[str], expect_rc: int = 0, cache_dir: str | None = None) -> tuple[float, int]:
    """Wall seconds of one whole process and its peak RSS in bytes (``os.wait4``'s rusage of that child,
    which covers the descendants it waited for, e.g. a sweep's worker processes). ``cache_dir``: the count
    cache's folder (``MLLM_BENCH_CACHE_DIR``)."""
    env = {**os.environ, "COLUMNS": "120", "MLLM_BENCH_COUNT_CACHE": "on"}
    if cache_dir:
        env["MLLM_BENCH_CACHE_DIR"] = cache_dir
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != expect_rc:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode} (expected {expect_rc}):\n{err.read()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def command(case: Case, out: str | None) -> list[str]:
    """The command line of one run of ``case`` (a sweep writing into ``out``)."""
    if case.program:
        return case.program
    return MLLM + case.argv + (["--out", out] if out else [])


def measure(case: Case, repeat: int) -> tuple[list[float], list[float], int]:
    """(case seconds, baseline seconds, peak RSS bytes); the baseline runs just before each run of the case."""
    times, base = [], []
    peak = 0
    shared = tempfile.mkdtemp(prefix="mllm-bench-cache-")
    try:
        if case.cache == "warm":
            folder = tempfile.mkdtemp(prefix="mllm-bench-speed-") if case.sweep else None
            run_once(command(case, folder), case.expect_rc, shared)
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        for _ in range(repeat):
            base.append(run_once([sys.executable, "-c", "import torch"])[0])
            folder = tempfile.mkdtemp(prefix="mllm-bench-speed-") if case.sweep else None
            cache = shared if case.cache == "warm" else tempfile.mkdtemp(prefix="mllm-bench-cache-")
            try:
                wall, rss = run_once(command(case, folder), case.expect_rc, cache)
            finally:
                for path in (folder, None if cache == shared else cache):
                    if path:
                        shutil.rmtree(path, ignore_errors=True)
            times.append(wall)
            peak = max(peak, rss)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return times, base, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="whole-process runs of each command (>= 3)")
    parser.add_argument("--only", default="", help="comma-separated groups: help, compare, sweep")
    args = parser.parse_args()
    if args.repeat < 3:
        parser.error("--repeat must be at least 3 (medians of three or more runs)")
    groups = {g.strip() for g in args.only.split(",") if g.strip()}
    chosen = [c for c in cases() if not groups or c.group in groups]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    missed = 0
    all_base: list[float] = []
    for case in chosen:
        times, base, peak = measure(case, args.repeat)
        all_base += base
        ratio = statistics.median(times) / statistics.median(base)
        memory_ok = peak < MEMORY_LIMIT
        ok = ratio <= case.target and memory_ok
        missed += case.judged and not ok
        rss = f"{peak / 2**20:.0f} MiB"
        verdict = ("met" if ok else "MISSED") if case.judged else "(for comparison)"
        print(f"{case.name:55s} {statistics.median(times):7.2f} s  {ratio:5.2f}x  (target <= {case.target}x)  "
              f"peak RSS {rss:>14s}  {verdict}", flush=True)
    print(f"import torch: median {statistics.median(all_base):.2f} s over {len(all_base)} runs; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
