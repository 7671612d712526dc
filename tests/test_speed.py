"""Startup stays light, reused FLOP counts equal full counts, and sweeps split across processes merge exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "pandas")
SUBCOMMANDS = ("list", "compare", "sweep", "train-cost", "paper", "report", "literature")
PROBE = """
import sys
sys.argv = ["mllm-bench", *sys.argv[1:]]
from mllm_bench.cli.app import main
try:
    main()
except SystemExit as exit_:
    code = exit_.code
else:
    code = 0
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
print("CODE=" + str(code), file=sys.stderr)
"""


def _startup(*argv: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120", **(env or {})}, timeout=60)
    lines = dict(line.split("=", 1) for line in proc.stderr.splitlines() if line.startswith(("HEAVY=", "CODE=")))
    return [m for m in lines["HEAVY"].split(",") if m], lines["CODE"]


@pytest.mark.parametrize("argv", [("--help",), *((c, "--help") for c in SUBCOMMANDS),
                                  ("compare", "--batch-size", "0"), ("sweep", "--measure", "sometimes")],
                         ids=lambda a: " ".join(a))
def test_help_and_usage_errors_import_no_torch_transformers_or_pandas(argv: tuple[str, ...]) -> None:
    heavy, code = _startup(*argv)
    assert heavy == []
    assert code == ("0" if argv[-1] == "--help" else "2")


def _counts(counted) -> list:
    return list(counted.by_module_pass.items())


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("arch", __import__("mllm_bench.registry", fromlist=["x"]).architecture_names())
def test_reused_block_counts_equal_a_full_count(arch: str, device: str) -> None:
    """On meta the reused count also answers repeated kernels from memory (``mllm_bench.meta_shapes``)."""
    from mllm_bench.flops import count_inference, count_train_step
    from mllm_bench.registry import architecture_spec, build_model
    from mllm_bench.workload import Workload

    model = build_model(arch, "tiny-llm", "tiny-clip", dict(architecture_spec(arch).tiny_options) or None,
                        device=device)
    model.set_attention_backend("sdpa")
    wl = Workload(batch_size=2, images_per_sample=1, text_before=3, text_after=5, device=device)
    full, reused = count_inference(model, wl, reuse=False), count_inference(model, wl, reuse=True)
    assert full[2] == reused[2]
    for a, b in zip(full[:2], reused[:2], strict=True):
        assert _counts(a) == _counts(b) and a.by_op == b.by_op
        assert a.by_component("total") == b.by_component("total") and a.total > 0
    for stage in ("pretrain", "finetune"):
        a, b = count_train_step(model, wl, stage, reuse=False), count_train_step(model, wl, stage, reuse=True)
        assert _counts(a) == _counts(b) and a.by_pass() == b.by_pass()


def test_list_imports_no_torch_cold_or_warm_and_prints_what_the_imported_classes_say(tmp_path) -> None:
    """The built-in architectures are read from source (``mllm_bench.declared``); the rows are then cached."""
    env = {"MLLM_BENCH_COUNT_CACHE": "on", "MLLM_BENCH_CACHE_DIR": str(tmp_path)}
    for _ in ("cold", "warm"):
        heavy, code = _startup("list", env=env)
        assert heavy == [] and code == "0"
    imported = subprocess.run(
        [sys.executable, "-c", "import sys; from mllm_bench import declared; declared.declared_listing = "
         "lambda value: None; sys.argv = ['mllm-bench', 'list']; from mllm_bench.cli.app import main; main()"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "120", "MLLM_BENCH_COUNT_CACHE": "off"},
        timeout=60)
    warm = subprocess.run([sys.executable, "-m", "mllm_bench.cli.app", "list"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120", **env}, timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert warm.stdout == imported.stdout and "saisa" in warm.stdout


def test_every_built_in_architecture_reads_from_source_as_its_imported_class_says() -> None:
    from importlib.metadata import entry_points

    from mllm_bench.cli.app import imported_listing

    from mllm_bench.declared import ENTRY_POINT_GROUP, declared_listing

    eps = entry_points(group=ENTRY_POINT_GROUP)
    assert len(eps) >= 10
    for ep in eps:
        assert declared_listing(ep.value) == imported_listing(ep.name), ep.name


def test_the_list_cache_follows_the_architecture_modules(tmp_path, monkeypatch) -> None:
    from mllm_bench.cli.app import architecture_rows

    from mllm_bench import fingerprint

    monkeypatch.setenv("MLLM_BENCH_COUNT_CACHE", "on")
    monkeypatch.setenv("MLLM_BENCH_CACHE_DIR", str(tmp_path))
    architecture_rows()
    monkeypatch.setattr(fingerprint, "module_fingerprint", lambda name: "edited " + name)
    architecture_rows()
    assert len(list((tmp_path / "list").glob("*.json"))) == 2


class _Cache:
    def __init__(self) -> None:
        self.k = None


def _blocks(forward):
    """Three identical blocks (a ModuleList, so the counter reuses them) whose forward is ``forward``."""
    import torch
    from torch import nn

    class Block(nn.Module):
        cost_component = "ffn"

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8, bias=False, device="meta")

        def forward(self, x, state):
            return forward(self, x, state)

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(3))

    return Stack(), torch.empty(2, 5, 8, device="meta")


def test_a_reused_block_that_sets_its_cache_is_not_run_again_and_the_cache_is_set() -> None:
    import torch

    from mllm_bench.flops import count_call

    runs = []

    def forward(block, x, cache):
        runs.append(1)
        cache.k = block.proj(x).transpose(1, 2)  # a strided layout the replay must reproduce
        return block.proj(x) + x

    stack, x = _blocks(forward)
    caches = [_Cache() for _ in stack.layers]
    with torch.no_grad():
        counted = count_call(stack, lambda: [layer(x, c) for layer, c in zip(stack.layers, caches, strict=True)],
                             strict=False)
    assert len(runs) == 1  # the first call ran; the other two were reproduced
    for c in caches:
        assert c.k.device.type == "meta" and c.k.shape == (2, 8, 5) and c.k.stride() == (40, 1, 8)
    assert counted.total == 3 * 2 * (2 * 10 * 8 * 8)  # per block two 8x8 projections of 10 rows, 2 FLOPs a MAC


def test_a_block_with_an_effect_it_cannot_reproduce_runs_every_time() -> None:
    import torch

    from mllm_bench.attention import record_paths
    from mllm_bench.flops import count_call

    def appends(block, x, log):
        log.append(x.shape)  # mutates a list argument: not an attribute set
        return block.proj(x)

    stack, x = _blocks(appends)
    log: list = []
    with torch.no_grad():
        count_call(stack, lambda: [layer(x, log) for layer in stack.layers], strict=False)
    assert len(log) == 3

    runs = []

    def sets(block, x, cache):
        runs.append(1)
        cache.k = block.proj(x)
        return block.proj(x)

    stack, x = _blocks(sets)
    with torch.no_grad(), record_paths():  # attention paths counted: every call must run
        count_call(stack, lambda: [layer(x, _Cache()) for layer in stack.layers], strict=False)
    assert len(runs) == 3


def test_the_counter_dispatches_without_torchs_dynamo_wrapper() -> None:
    """Counting never runs inside torch.compile: ``__torch_dispatch__`` is ours, not wrapped per op by torch."""
    from mllm_bench.flops import ComponentFlopCounter

    dispatch = ComponentFlopCounter.__dict__["__torch_dispatch__"]
    assert not hasattr(dispatch, "__wrapped__") and dispatch.__code__.co_filename.endswith("flops.py")


RUN_PROBE = """
import atexit, sys
atexit.register(lambda: print("handler ran", file=sys.stderr))
sys.argv = ["mllm-bench", *sys.argv[1:]]
import torch  # what a profiling command has loaded by the time it exits
from mllm_bench.cli.app import run
run()
print("not reached", file=sys.stderr)
"""


@pytest.mark.parametrize(("argv", "code"), [(("compare", "--batch-size", "0"), 2), (("list",), 0),
                                            (("--version",), 0)])
def test_the_console_script_exits_with_the_commands_status_after_the_exit_handlers_and_all_output(argv, code):
    """``run`` ends the process itself (no interpreter teardown), with every line written and atexit run."""
    proc = subprocess.run([sys.executable, "-c", RUN_PROBE, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120"})
    main = "import sys; sys.argv = ['mllm-bench', *sys.argv[1:]]\nfrom mllm_bench.cli.app import main\nmain()"
    expected = subprocess.run([sys.executable, "-c", main, *argv], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "COLUMNS": "120"})  # Python's own exit
    assert (proc.returncode, expected.returncode) == (code, code)
    assert proc.stderr.splitlines()[-1] == "handler ran" and "not reached" not in proc.stderr
    assert proc.stdout == expected.stdout and proc.stderr.splitlines()[:-1] == expected.stderr.splitlines()
    assert bool(proc.stdout.strip()) == (code == 0)


def test_the_console_script_is_run() -> None:
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "mllm-bench"]
    assert script.value == "mllm_bench.cli.app:run"
