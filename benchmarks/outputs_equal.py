"""Whether this checkout's outputs equal those of an earlier commit: the check behind "counted values unchanged".

Runs ``compare`` (defaults), ``compare --count all`` over every registered architecture at Vicuna-13B,
``paper`` and the README's 15-point sweep twice: once with the code of ``REV`` (a ``git worktree`` put first on
``PYTHONPATH``), once with this checkout. The count cache is off. Then it compares every field of every JSON
and CSV file both runs wrote. Fields that say when or from which code a row was made (``git_commit``,
``timestamp``, code fingerprints) and how a sweep was split across processes (its ``ranks`` markers and summary
field) are ignored; the script prints any other difference and exits 1.

    python benchmarks/outputs_equal.py 0bdc6b5 [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = re.compile(r"(^|\.)(git_commit|timestamp|created|finished|sweep_code|code)$")
# how a sweep's points were split across processes (its ``ranks/`` markers and the summary's ``ranks``): a
# sweep of this size counts in one process per core by default, which the earlier revision may not have done
LAUNCH = re.compile(r"^\.ranks(\.|$)")
ARCHS = "llava,llava-next,naavit,flamingo,saisa,shortv,fastv,visionzip,qformer,mllama"
COMMANDS = {
    "compare": ["compare", "-f", "json"],
    "compare_all": ["compare", "-f", "json", "--count", "all", "--arch", ARCHS, "--llm", "vicuna-13b"],
    "paper": ["paper"],
    "sweep": ["sweep", "--vary", "visual_tokens=144,576,1152,2304,2880", "--no-plots"],
}


SUBPACKAGES = ("architectures", "reports", "cli")  # mapped into ``mllm_bench`` by pyproject's package-dir


def use_tree(tree: Path) -> None:
    """Make ``tree``'s own subpackages the ones ``mllm_bench`` imports from it: the editable install maps
    ``mllm_bench.cli`` and the others to this checkout, which would mix the two revisions; links inside the
    tree's package are found first. Refuses a tree where an import still resolves elsewhere."""
    for sub in SUBPACKAGES:
        link = tree / "mllm_bench" / sub
        if not link.exists():
            link.symlink_to(tree / sub, target_is_directory=True)
    probe = ("import sys\nimport mllm_bench\n" + "".join(f"import mllm_bench.{s}\n" for s in SUBPACKAGES)
             + "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('mllm_bench')))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    paths = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True,
                           cwd=tree.parent).stdout.split()  # not this checkout: the current folder comes first
    stray = [p for p in paths if not Path(p).resolve().is_relative_to(tree.resolve())]
    if stray:
        raise SystemExit(f"the earlier revision would import code from outside its tree: {stray}")


def run_all(out: Path, pythonpath: str) -> None:
    env = {**os.environ, "MLLM_BENCH_COUNT_CACHE": "off", "PYTHONPATH": pythonpath}
    for name, argv in COMMANDS.items():
        cmd = [sys.executable, "-m", "mllm_bench.cli.app", *argv, "--out", str(out / name)]
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=out, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of ``obj`` by its path (list positions included)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat(val, f"{prefix}.{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}[{i}]").items()}
    return {prefix: obj}


def load(path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        return flat(json.loads(path.read_text()))
    with path.open(newline="") as f:
        return flat(list(csv.DictReader(f)))


def differences(before: Path, after: Path) -> Counter[str]:
    """Counts of differing fields (list positions folded), by file suffix and path, plus missing files."""
    found: Counter[str] = Counter()
    names = {p.relative_to(run) for run in (before, after) for p in run.rglob("*") if p.suffix in (".json", ".csv")
             and "ranks" not in p.relative_to(run).parts[1:-1]}
    for name in sorted(names):
        if not (before / name).exists() or not (after / name).exists():
            found[f"only one run wrote {name}"] += 1
            continue
        a, b = load(before / name), load(after / name)
        for key in a.keys() | b.keys():
            field = re.sub(r"\[\d+\]", "[]", key)
            plain = field.replace("[]", "")
            if not VOLATILE.search(plain) and not LAUNCH.search(plain) and a.get(key) != b.get(key):
                found[f"{name.suffix} {field}"] += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier commit")
    parser.add_argument("--keep", type=Path, help="write both runs' outputs here (default: a temporary folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="mllm-bench-equal-"))
    tree = work / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.rev], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        use_tree(tree)
        for name, path in (("before", str(tree)), ("after", str(ROOT))):
            (work / name).mkdir(parents=True, exist_ok=True)
            run_all(work / name, path)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    found = differences(work / "before", work / "after")
    for what, n in sorted(found.items()):
        print(f"{n:7d} differ: {what}")
    print("outputs equal" if not found else f"{len(found)} fields differ", f"({work})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
