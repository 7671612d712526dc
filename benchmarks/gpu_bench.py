"""Measured GPU cost of every registered architecture side by side: prefill, decode, training step.

    python benchmarks/gpu_bench.py            # the full measurement (GPU): 7B width, 576 and 2304 visual tokens
    python benchmarks/gpu_bench.py --quick    # a smoke run: 8 layers, few repeats
    python benchmarks/gpu_bench.py --eager    # without torch.compile
    python benchmarks/gpu_bench.py --tiny     # end to end on CPU with tiny presets (what the tests run)

Every point builds the model in bf16 with random weights (timing does not depend on their values),
compiles its layers and blocks (``MLLM.compile_layers``; a point whose compilation fails runs eager and
its rows say so) and measures it with the profiler's engine (:mod:`mllm_bench.measure`, the one
``mllm_bench.profile`` uses), with the attention backend chosen per architecture (``--backend``; default:
the architecture's spec's ``fast_attention_backend``, e.g. ``flash`` or ``flex`` for NAAViT's block-sparse mask):

- ``prefill`` (time to first token) in two scopes: ``total`` (vision tower + connector + decoder +
  last-token lm_head) and ``language`` (vision features precomputed: connector + decoder); at batch 1
  (latency) and at a throughput batch (``--prefill-batch``, default 32 samples). The FLOP ratio bounds
  the speedup only where prefill is compute-bound: SAISA's text-only GEMMs have batch x text rows (64
  per sample here), which need ~2048 rows to leave the weight-bandwidth-bound regime on an H100/H200 —
  so 32 samples, not a token budget (a 16K-token budget gave 6 samples = 384 rows at 2304 visual tokens);
  the batch is halved until a conservative memory estimate fits;
- ``decode`` (time per output token, KV-cached, context = prompt) in each ``--decode-modes`` mode
  (:mod:`mllm_bench.static_decode`): ``dynamic`` (growing cache, host-bound at batch 1) and ``graph``
  (static cache + CUDA graph);
- ``train_step`` (each ``--train-stages`` stage, default both; ``pretrain`` trains the connector only, with
  gradients through the frozen LLM; the training budget uses each stage's MFU): forward, backward,
  optimizer step; bf16 weights and gradients; ``--optimizer adamw`` (default: AdamW state in bf16, no
  master copy) or ``adamw-fp32-master`` (fp32 master weights and moments, LLaVA-1.5's mixed-precision
  recipe; see :mod:`mllm_bench.optim`).

Timing: CUDA events (perf_counter on CPU), warm-up, repeats until a minimum count and a minimum
duration, median and IQR. FLOPs are counted with ``mllm_bench.flops`` (torch's formulas) on a meta copy of the
same model and inputs (SDPA backend: dense attention convention), so MFU and the FLOP-predicted
speedups cover exactly what is timed. ``prefill_speedup_vs_flops`` = (measured prefill speedup over
llava) / (llava FLOPs / arch FLOPs), per scope. When the full depth does not fit (training with
AdamW state), every point runs with ``--layers`` fewer layers at full width; per-layer cost is the
same in every layer, so FLOP ratios and MFU carry over and latency extrapolates as
``t_32 ~ t_rest + 32/L * (t_L - t_rest)``.

Writes ``rows.csv``/``rows.json`` (tidy result rows, saved after every point), ``run.json`` (the
settings), ``summary.md`` and plots (PNG, PDF) under ``results/gpu/<device>/`` (``--out`` to change).
Each finished point is also a file in the sweep's point store (``points/``, :mod:`mllm_bench.reports.sweep`),
named by a hash of its architecture, visual tokens and the run's settings, and recording the code and device
that made it; a point is claimed while measured, so two runs on one folder never measure the same point.
``--resume`` keeps the points this code finished on this device with these settings and measures the rest
(others are measured again, and the log says why), so a run longer than one sitting continues where it
stopped::

    timeout 540 python benchmarks/gpu_bench.py --resume   # repeat until it finishes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mllm_bench.reports.sweep import claim_point, point_origin, point_path, read_point, reuse_problem, write_point
from torch._dynamo.exc import TorchDynamoException

from mllm_bench import Workload, architecture_names, build_model, get_architecture
from mllm_bench.atomic import atomic_write_text
from mllm_bench.attention import describe_paths, record_paths
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, replace
from mllm_bench.devices import peak_flops
from mllm_bench.environment import environment
from mllm_bench.flops import count_prefill, count_train_step
from mllm_bench.measure import (
    MeasureSettings,
    prepare_model,
    time_decode,
    time_phase,
    time_prefill,
    timed_rows,
    train_step,
    vision_precomputed,
)
from mllm_bench.memory import MeasuredMemory
from mllm_bench.optim import OPTIMIZERS, optimizer_state_bytes
from mllm_bench.presets import llm_preset, vision_preset
from mllm_bench.results import rows_to_json, to_frame, write_rows
from mllm_bench.schema import make_row
from mllm_bench.static_decode import DECODE_MODES
from mllm_bench.timing import Timing

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    """What one run measures and how hard it tries."""

    llm: str = "vicuna-7b"
    vision: str = "clip-vit-l-336"
    layers: int | None = None  # None: the preset's depth
    visual_tokens: tuple[int, ...] = (576, 2304)
    archs: tuple[str, ...] = field(default_factory=lambda: tuple(architecture_names()))  # every registered one
    backends: tuple[tuple[str, str], ...] = ()  # (arch, backend) overrides; others use their fast backend
    text_before: int = 32
    text_after: int = 32
    batch_size: int = 1  # decode batch, and the latency prefill batch
    prefill_batch: int = 32  # the throughput prefill batch (samples; halved while it does not fit)
    train_tokens: int = 8192  # the training batch holds about this many tokens
    decode_modes: tuple[str, ...] = ("dynamic", "graph")
    optimizer: str = "adamw"
    commit: str = ""
    dtype: str = "bfloat16"
    device: str = "cuda"
    phases: tuple[str, ...] = ("prefill", "decode", "train_step")
    train_stages: tuple[str, ...] = ("pretrain", "finetune")
    warmup: int = 3
    min_repeats: int = 10
    min_seconds: float = 1.0
    max_repeats: int = 200
    compile: bool = True
    tiny: bool = False

    def backend(self, arch: str) -> str:
        return dict(self.backends).get(arch) or get_architecture(arch).spec.fast_attention_backend

    def measure_settings(self, arch: str) -> MeasureSettings:
        """How the profiler's engine measures ``arch`` in this run."""
        return MeasureSettings(attention_backend=self.backend(arch), compile=self.compile, optimizer=self.optimizer,
                               warmup=self.warmup, min_repeats=self.min_repeats, min_seconds=self.min_seconds,
                               max_repeats=self.max_repeats)


def preset_settings(args: argparse.Namespace) -> Settings:
    s = Settings()
    if args.tiny:
        s = dataclasses.replace(s, llm="tiny-llm", vision="tiny-clip", visual_tokens=(16, 64), device="cpu",
                                dtype="float32", warmup=1, min_repeats=2, min_seconds=0.0, max_repeats=3, tiny=True,
                                prefill_batch=2, train_tokens=0, decode_modes=("dynamic", "static"), compile=False)
    elif args.quick:
        s = dataclasses.replace(s, layers=8, warmup=2, min_repeats=3, min_seconds=0.2, max_repeats=20)
    changes: dict[str, Any] = {}
    for name in ("llm", "vision", "layers", "device", "dtype", "warmup", "min_repeats", "min_seconds",
                 "prefill_batch", "optimizer"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.visual_tokens:
        changes["visual_tokens"] = tuple(int(x) for x in args.visual_tokens.split(","))
    if args.archs:
        changes["archs"] = tuple(args.archs.split(","))
    if args.phases:
        changes["phases"] = tuple(args.phases.split(","))
    if args.backend:
        given: dict[str, str] = {}
        for item in args.backend.split(","):
            arch, _, name = item.rpartition("=")
            given.update({a: name for a in ([arch] if arch else architecture_names())})
        changes["backends"] = tuple(given.items())
    if args.eager:
        changes["compile"] = False
    if args.decode_modes:
        changes["decode_modes"] = tuple(args.decode_modes.split(","))
    if args.train_stages:
        changes["train_stages"] = tuple(args.train_stages.split(","))
    if args.commit:
        changes["commit"] = args.commit
    s = dataclasses.replace(s, **changes)
    bad = sorted(set(s.phases) - {"prefill", "decode", "train_step"})
    if bad:
        raise ConfigError(f"--phases has unknown phase(s) {bad}; allowed: prefill, decode, train_step")
    bad = sorted(set(s.train_stages) - {"pretrain", "finetune"})
    if bad:
        raise ConfigError(f"--train-stages has unknown stage(s) {bad}; allowed: pretrain, finetune")
    bad = sorted(set(s.decode_modes) - set(DECODE_MODES))
    if bad:
        raise ConfigError(f"--decode-modes has unknown mode(s) {bad}; allowed: {', '.join(DECODE_MODES)}")
    if s.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {s.optimizer!r}")
    if s.prefill_batch < 1:
        raise ConfigError(f"--prefill-batch must be >= 1, got {s.prefill_batch}")
    return s


# ----- configs ------------------------------------------------------------------------------------


def vision_for_tokens(base: VisionConfig, visual_tokens: int) -> VisionConfig:
    """The vision preset at the image size that gives ``visual_tokens`` patches (a square grid)."""
    side = math.isqrt(visual_tokens)
    if side * side != visual_tokens:
        raise ConfigError(f"--visual-tokens must be perfect squares (a square patch grid), got {visual_tokens}")
    return replace(base, image_size=side * base.patch_size)


def llm_for_run(s: Settings) -> LLMConfig:
    cfg = llm_preset(s.llm)
    return cfg if s.layers is None else replace(cfg, num_layers=s.layers)


def options_for(s: Settings, arch: str) -> dict[str, Any]:
    return dict(get_architecture(arch).spec.tiny_options) if s.tiny else {}


def fitting_layers(s: Settings, device: torch.device) -> int | None:
    """The preset's depth when every point's finetune step fits in 90% of the GPU's memory by a conservative
    estimate (bf16 weights; gradients and optimizer state of the trainable ones, mllm_bench.optim; activations
    ~ (10h + 4m) * 2 bytes per decoder row and layer), else the largest fitting depth in steps of 8."""
    total = torch.cuda.get_device_properties(device).total_memory * 0.9
    full = llm_preset(s.llm)
    tokens = max(s.visual_tokens) + s.text_before + s.text_after
    for layers in range(full.num_layers, 0, -8):
        llm = replace(full, num_layers=layers)
        need = 0.0
        for arch in s.archs:
            model = build_model(arch, llm, vision_for_tokens(vision_preset(s.vision), max(s.visual_tokens)),
                                options_for(s, arch), device="meta", dtype=s.dtype)
            trainable = sum(p.numel() for p in model.trainable_parameters("finetune").values())
            train_rows = tokens * batch_for(tokens, s.train_tokens)
            act = layers * train_rows * (10 * llm.hidden_size + 4 * llm.intermediate_size) * 2
            need = max(need, 2 * model.num_parameters() + optimizer_state_bytes(s.optimizer, trainable) + act)
        if need <= total:
            return None if layers == full.num_layers else layers
    return 8


# ----- batches ------------------------------------------------------------------------------------


def prefill_batch_that_fits(s: Settings, visual_tokens: int, device: torch.device) -> int:
    """``s.prefill_batch``, halved while the largest architecture's bf16 weights + a KV cache of every prompt
    token in every layer + one layer's activations (~ (4h + 3m) * 2 bytes per token) exceed 90% of the GPU's
    memory. The same for every architecture at ``visual_tokens``, so speedups compare equal batches."""
    if device.type != "cuda":
        return s.prefill_batch
    total = torch.cuda.get_device_properties(device).total_memory * 0.9
    llm = llm_for_run(s)
    vision = vision_for_tokens(vision_preset(s.vision), visual_tokens)
    weights = max(build_model(arch, llm, vision, options_for(s, arch), device="meta", dtype=s.dtype).num_parameters()
                  for arch in s.archs) * 2
    tokens = visual_tokens + s.text_before + s.text_after
    per_sample = tokens * (llm.num_layers * 2 * llm.kv_dim + 4 * llm.hidden_size + 3 * llm.intermediate_size) * 2
    b = s.prefill_batch
    while b > 1 and weights + b * per_sample > total:
        b //= 2
    return b


def batch_for(tokens_per_sample: int, token_budget: int, cap: int = 16) -> int:
    """Samples per batch so a batch holds about ``token_budget`` tokens (at least 1, at most ``cap``)."""
    return max(1, min(cap, token_budget // tokens_per_sample))


# ----- FLOPs counted on a meta copy ---------------------------------------------------------------


def counted(arch: str, llm: LLMConfig, vision: VisionConfig, s: Settings, workload: Workload,
            prefill_batches: tuple[int, ...], train_batch: int) -> dict[str, int]:
    """Prefill FLOPs (total and language scope, per batch size) and train-step FLOPs of each training stage,
    counted on meta tensors with the SDPA backend (dense attention convention)."""
    model = build_model(arch, llm, vision, options_for(s, arch), device="meta", dtype=s.dtype)
    model.set_attention_backend("sdpa")
    meta = workload.replace(device="meta")
    out: dict[str, int] = {}
    for b in prefill_batches:
        prefill = count_prefill(model, meta.replace(batch_size=b))
        out[f"prefill_total_{b}"] = int(prefill.total)
        # the language scope times everything but the vision tower (its features precomputed)
        out[f"prefill_language_{b}"] = int(prefill.total - prefill.flops(component="vision"))
    for stage in s.train_stages:
        out[f"train_step_{stage}"] = int(count_train_step(model, meta.replace(batch_size=train_batch), stage).total)
    return out


# ----- rows ---------------------------------------------------------------------------------------


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("nvidia ")).strip("-") or "cpu"


def run_environment(device: torch.device, s: Settings) -> dict[str, Any]:
    env = environment(device, attention_backend="")
    env.update(device=device.type, dtype=s.dtype)
    if s.commit:
        env["git_commit"] = s.commit
    return env


class Rows:
    """Tidy result rows (one metric per row, :func:`mllm_bench.schema.make_row`), each with the run's environment."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.env = env
        self.rows: list[dict[str, Any]] = []

    def base(self, point: dict[str, Any]) -> dict[str, Any]:
        """The identity and environment fields of ``point``'s rows."""
        return {**self.env, "component": "all", "role": "all", "stage": "inference", **point}

    def add(self, point: dict[str, Any], metric: str, value: float, source: str = "measured", **fields: Any) -> None:
        self.rows.append(make_row(self.base(point), metric, value, source, **fields))


# ----- one point ----------------------------------------------------------------------------------


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(err: RuntimeError) -> str:
    """``Type: first line`` of a measurement's error, for its row; compilation errors are re-raised
    (:func:`measure_point` reruns the point eager)."""
    if isinstance(err, TorchDynamoException):
        raise err
    first_line = str(err).splitlines()[0][:120] if str(err) else ""
    return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__


def run_point(arch: str, visual_tokens: int, s: Settings, rows: Rows, device: torch.device, log: Callable,
              prefill_batch: int, note: str = "") -> None:
    """Count, then measure every phase of ``arch`` at ``visual_tokens``; rows go to ``rows``. ``note`` goes
    into every measured row's note (after ``compiled``/``eager``)."""
    llm = llm_for_run(s)
    vision = vision_for_tokens(vision_preset(s.vision), visual_tokens)
    backend = s.backend(arch)
    options = options_for(s, arch)
    llm_name = s.llm if s.layers is None else f"{s.llm}@{llm.num_layers}layers"
    workload = Workload(batch_size=s.batch_size, image_size=vision.image_size, text_before=s.text_before,
                        text_after=s.text_after, dtype=s.dtype, device=str(device))
    text_tokens = workload.num_text_tokens
    point = {"arch": arch, "llm": llm_name, "vision": s.vision, "options": json.dumps(options) if options else "",
             "batch_size": s.batch_size, "images_per_sample": 1, "image_size": vision.image_size,
             "visual_tokens": visual_tokens, "text_tokens": text_tokens, "text_before": s.text_before,
             "text_after": s.text_after, "generate_tokens": 0, "context_len": ""}
    seq_len = text_tokens + visual_tokens
    prefill_batches = tuple(dict.fromkeys((s.batch_size, prefill_batch)))
    train_batch = batch_for(seq_len, s.train_tokens)
    t0 = time.perf_counter()
    flops = counted(arch, llm, vision, s, workload, prefill_batches, train_batch)
    peak = peak_flops(rows.env["device_name"], s.dtype) if device.type == "cuda" else None
    for b in prefill_batches:
        for scope in ("total", "language"):
            rows.add({**point, "batch_size": b}, "prefill_flops", flops[f"prefill_{scope}_{b}"], "counted",
                     scope=scope, convention="dense", phase="prefill")
    for stage in s.train_stages:
        rows.add({**point, "batch_size": train_batch}, "train_step_flops", flops[f"train_step_{stage}"], "counted",
                 scope="total", convention="dense", stage=stage, phase="train_step")
    t_count = time.perf_counter() - t0

    torch.manual_seed(0)
    settings = s.measure_settings(arch)
    model = prepare_model(build_model(arch, llm, vision, options, device=str(device), dtype=s.dtype).eval(), settings)
    how = ("compiled" if s.compile else "eager") + (f" ({note})" if note else "")
    batch = model.example_batch(workload)

    def timed(metric: str, phase: str, timing: Timing, paths: Counter, memory: MeasuredMemory, flop: int | None,
              stage: str = "inference", scope: str = "", batch: int = s.batch_size, detail: str = "",
              tokens: float = 0, **extra: Any) -> None:
        tag = dict(phase=phase, stage=stage, scope=scope, attention_backend=f"{backend}[{describe_paths(paths)}]",
                   note=how + (f"; {detail}" if detail else ""), **extra)
        rows.rows += timed_rows(rows.base({**point, "batch_size": batch}), metric, timing, tokens=tokens, flops=flop,
                                peak=peak, memory=memory if device.type == "cuda" else None,  # CPU RSS: too coarse
                                memory_note=tag["note"], **tag)

    summary = []
    with torch.no_grad():
        if "prefill" in s.phases:
            for b in prefill_batches:
                prompts = model.example_batch(workload.replace(batch_size=b))
                for scope in ("total", "language"):
                    ctx = vision_precomputed(model) if scope == "language" else contextlib.nullcontext()
                    try:
                        with ctx, record_paths() as paths:
                            timing, memory = time_prefill(model, prompts, device, settings)
                    except RuntimeError as err:  # e.g. OOM: the fit estimate was optimistic; say so, go on
                        reason = failure(err)
                        summary.append(f"prefill[b{b},{scope}] failed ({reason})")
                        rows.add({**point, "batch_size": b}, "prefill_latency_s", float("nan"), phase="prefill",
                                 scope=scope, attention_backend=f"{backend}[]", note=f"{how}; failed: {reason}")
                        free(device)
                        continue
                    timed("prefill_latency_s", "prefill", timing, paths, memory, flops[f"prefill_{scope}_{b}"],
                          scope=scope, batch=b)
                    summary.append(f"prefill[b{b},{scope}] {timing.median * 1e3:.2f} ms "
                                   f"(IQR {timing.iqr / timing.median:.1%})")
                del prompts
                free(device)
        if "decode" in s.phases:
            for mode in s.decode_modes:
                try:
                    with record_paths() as paths:  # a graph records its paths once, when captured
                        decoded = time_decode(model, batch, device, settings, mode, warmup=max(s.warmup, 3),
                                              max_repeats=max(s.max_repeats // 2, 2))
                except RuntimeError as err:  # e.g. a CUDA-graph capture the GPU refused, OOM
                    reason = failure(err)
                    summary.append(f"decode[{mode}] failed ({reason})")
                    rows.add(point, "decode_latency_s", float("nan"), phase="decode", attention_backend=f"{backend}[]",
                             note=f"{how}; decode={mode}; failed: {reason}")
                    free(device)
                    continue
                timed("decode_latency_s", "decode", decoded.timing, paths, decoded.memory, None,
                      context_len=decoded.median_context, detail=f"decode={mode}", tokens=s.batch_size)
                summary.append(f"decode[{mode}] {decoded.timing.median * 1e3:.2f} ms/token")
                del decoded
                free(device)
    for stage in s.train_stages if "train_step" in s.phases else ():
        try:
            train_inputs = model.example_batch(workload.replace(stage=stage, batch_size=train_batch))
            step = train_step(model, stage, train_inputs, device, settings)
            with record_paths() as paths:
                timing, memory = time_phase(step, device, settings, warmup=max(s.warmup - 1, 1))
            timed("train_step_latency_s", "train_step", timing, paths, memory, flops[f"train_step_{stage}"],
                  stage=stage, scope="total", batch=train_batch, detail=f"optimizer={s.optimizer}")
            summary.append(f"train[{stage},b{train_batch}] {timing.median * 1e3:.1f} ms")
            del step, train_inputs
        except RuntimeError as err:  # e.g. OOM
            reason = failure(err)
            summary.append(f"train[{stage}] failed ({reason})")
            rows.add({**point, "batch_size": train_batch}, "train_step_latency_s", float("nan"),
                     stage=stage, phase="train_step", scope="total", attention_backend=f"{backend}[]",
                     note=f"{how}; optimizer={s.optimizer}; failed: {reason}")
        model.zero_grad(set_to_none=True)
        free(device)
    log(f"{arch:9s} v={visual_tokens:5d} {backend:5s} {how} | " + " | ".join(summary)
        + f" | counted in {t_count:.1f}s, point {time.perf_counter() - t0:.1f}s")


def measure_point(arch: str, visual_tokens: int, s: Settings, rows: Rows, device: torch.device, log: Callable,
                  prefill_batch: int) -> None:
    """``run_point``; when torch.compile fails for this point, its rows are dropped and it runs eager,
    every row noting why (the rest of the run stays compiled)."""
    first = len(rows.rows)
    try:
        run_point(arch, visual_tokens, s, rows, device, log, prefill_batch)
    except TorchDynamoException as err:
        if not s.compile:
            raise
        del rows.rows[first:]
        reason = f"compile failed: {type(err).__name__}"
        log(f"{arch} v={visual_tokens}: {reason}: {str(err).splitlines()[0][:200]}; measuring eager")
        torch._dynamo.reset()
        free(device)
        run_point(arch, visual_tokens, dataclasses.replace(s, compile=False), rows, device, log, prefill_batch,
                  note=reason)


# ----- resuming: the sweep's point store (reports/sweep.py) ----------------------------------------------


def run_settings(s: Settings) -> dict[str, Any]:
    """What a run's rows depend on: every setting but the points' selection and the recorded commit."""
    record = dataclasses.asdict(s)
    for name in ("archs", "visual_tokens", "commit"):
        record.pop(name)
    return json.loads(json.dumps(record))  # tuples as lists, as they read back


def point_params(s: Settings, arch: str, visual_tokens: int) -> dict[str, Any]:
    return {"arch": arch, "visual_tokens": visual_tokens, "settings": run_settings(s)}


def point_key(s: Settings, arch: str, visual_tokens: int) -> str:
    """A point's name in the store: a hash of its architecture, visual tokens and the run's settings."""
    text = json.dumps(point_params(s, arch, visual_tokens), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_origin(device: torch.device, s: Settings) -> dict[str, str]:
    """The code and device a point of this run is made by (``--commit`` names the code when there is no .git)."""
    from mllm_bench import __version__

    origin = point_origin(str(device))
    if s.commit:
        origin["code"] = f"{__version__}@{s.commit}"
    return origin


def reusable_rows(store: Path, key: str, origin: dict[str, str]) -> tuple[list[dict[str, Any]] | None, str]:
    """(rows, "") of a point this code finished on this device, else (None, why it is measured: "" = never was)."""
    record = read_point(store, key)
    if record is None:
        return None, "its file did not parse" if point_path(store, key).exists() else ""
    problem = reuse_problem(record, origin)
    return (None, problem) if problem else (record["rows"], "")


# ----- derived rows, outputs ----------------------------------------------------------------------


def value(rows: list[dict], **match: Any) -> float | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row["value"]
    return None


def add_speedups(rows: Rows, baseline: str = "llava") -> list[str]:
    """``prefill_speedup_vs_flops`` per arch, visual tokens and scope: measured speedup / FLOP-predicted."""
    lines = []
    for row in [r for r in rows.rows if r["metric"] == "prefill_latency_s" and r["arch"] != baseline]:
        key = {"visual_tokens": row["visual_tokens"], "scope": row["scope"], "batch_size": row["batch_size"]}
        base_t = value(rows.rows, arch=baseline, metric="prefill_latency_s", **key)
        base_f = value(rows.rows, arch=baseline, metric="prefill_flops", **key)
        arch_f = value(rows.rows, arch=row["arch"], metric="prefill_flops", **key)
        if not (base_t and base_f and arch_f):
            continue
        measured, predicted = base_t / row["value"], base_f / arch_f
        point = {k: row[k] for k in ("arch", "llm", "vision", "options", "batch_size", "images_per_sample",
                                     "image_size", "visual_tokens", "text_tokens", "text_before", "text_after")}
        rows.add(point, "prefill_speedup_vs_flops", measured / predicted, scope=row["scope"],
                 convention="dense", phase="prefill", attention_backend=row["attention_backend"])
        lines.append(f"| {row['arch']} | {row['visual_tokens']} | {row['batch_size']} | {row['scope']} "
                     f"| {measured:.3f} | {predicted:.3f} | {measured / predicted:.3f} |")
    return lines


SPEEDUP_TARGET, TRAIN_MFU_TARGET, IQR_TARGET = 0.9, 0.45, 0.02  # what a good run reaches


def target_checks(rows: list[dict[str, Any]], baseline: str = "llava") -> list[str]:
    """The targets against this run's rows, one Markdown line each: SAISA's prefill speedup over the
    baseline ÷ its FLOP-predicted speedup at the throughput batch (language scope), the baseline's finetune
    MFU (the target is stated for an H100), and the spread of every timed median."""
    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = []
    ratios = [r for r in rows if r["metric"] == "prefill_speedup_vs_flops" and r["arch"] == "saisa"
              and r["scope"] == "language"]
    for v in sorted({r["visual_tokens"] for r in ratios}):
        at = max((r for r in ratios if r["visual_tokens"] == v), key=lambda r: r["batch_size"])
        lines.append(f"- SAISA prefill speedup ÷ FLOP-predicted, {v} visual tokens, batch {at['batch_size']}: "
                     f"{at['value']:.3f} (target ≥ {SPEEDUP_TARGET}): {mark(at['value'] >= SPEEDUP_TARGET)}")
    for r in rows:
        if r["metric"] == "mfu" and r["arch"] == baseline and r["phase"] == "train_step" and r["stage"] == "finetune":
            lines.append(f"- {baseline} finetune-step MFU, {r['visual_tokens']} visual tokens: {r['value']:.1%} "
                         f"(target ≥ {TRAIN_MFU_TARGET:.0%} on an H100): {mark(r['value'] >= TRAIN_MFU_TARGET)}")
    spreads = []
    for r in rows:
        if r["metric"].endswith("_latency_s") and r["source"] == "measured" and r["value"] == r["value"]:
            iqr = next((x["value"] for x in rows if x["metric"] == "latency_iqr_s" and all(
                x.get(k) == r.get(k) for k in ("arch", "visual_tokens", "phase", "scope", "stage", "batch_size",
                                               "note"))), None)
            if iqr is not None and r["value"] > 0:
                what = {"train_step": r["stage"], "prefill": r["scope"]}.get(r["phase"], "")
                spreads.append((iqr / r["value"], " ".join(str(x) for x in (
                    r["arch"], r["visual_tokens"], r["phase"], what, f"b{r['batch_size']}", f"[{r['note']}]") if x)))
    if spreads:
        over = sorted((x for x in spreads if x[0] > IQR_TARGET), reverse=True)
        lines.append(f"- Spread (IQR ÷ median) ≤ {IQR_TARGET:.0%}: {len(spreads) - len(over)} of {len(spreads)} "
                     f"timed medians: {mark(not over)}"
                     + ("" if not over else "; over: " + ", ".join(f"{name} ({x:.1%})" for x, name in over)))
    return lines


def save_rows(rows: Rows, out: Path) -> Any:
    """rows.csv and rows.json (atomic writes, mllm_bench.results); returns the rows as a DataFrame."""
    df = to_frame(rows.rows)
    for name in ("rows.csv", "rows.json"):
        write_rows(df, out / name)
    return df


def write_outputs(rows: Rows, out: Path, s: Settings, speedups: list[str], notes: list[str]) -> None:
    df = save_rows(rows, out)
    lines = [f"# GPU benchmark: {rows.env['device_name']}", "",
             f"LLM {s.llm} ({llm_for_run(s).num_layers} layers), vision {s.vision}, batch {s.batch_size}, "
             f"text {s.text_before}+{s.text_after}, dtype {s.dtype}, torch {rows.env['torch_version']}, "
             f"{'compiled decoder layers' if s.compile else 'eager'}, commit {rows.env['git_commit']}.", "",
             "## Medians (relative IQR)", "",
             f"Prefill at batch {s.batch_size} (latency) and at a throughput batch (up to {s.prefill_batch} samples, "
             "in brackets); decode per mode; training "
             + (f"at about {s.train_tokens} tokens per step" if s.train_tokens else "at one sample per step")
             + " (batch in brackets).",
             "", "| arch | visual | backend paths | prefill total ms (b1) | prefill language ms (b1) "
             "| prefill language ms (batch) | prefill MFU (batch) | "
             + " | ".join(f"decode ms/token ({m})" for m in s.decode_modes)
             + "".join(f" | {st} step ms (batch) | {st} MFU" for st in s.train_stages) + " |",
             "|---" * (7 + len(s.decode_modes) + 2 * len(s.train_stages)) + "|"]
    present = {(r["arch"], r["visual_tokens"]) for r in rows.rows}
    order = architecture_names()
    archs = sorted({a for a, _ in present}, key=lambda a: (order.index(a) if a in order else len(order), a))
    for arch in archs:
        for v in sorted({v for a, v in present if a == arch}):
            def cell(metric: str, arch: str = arch, v: int = v, **m: Any) -> str:
                med = value(rows.rows, arch=arch, visual_tokens=v, metric=metric, **m)
                iqr = value(rows.rows, arch=arch, visual_tokens=v, metric="latency_iqr_s", **m)
                return "" if med is None else f"{med * 1e3:.2f} ({(iqr or 0) / med:.1%})"

            def train_cells(stage: str, arch: str = arch, v: int = v) -> str:
                mfu = value(rows.rows, arch=arch, visual_tokens=v, metric="mfu", phase="train_step", stage=stage)
                batch = next((r["batch_size"] for r in rows.rows if r["arch"] == arch and r["visual_tokens"] == v
                              and r["metric"] == "train_step_latency_s" and r["stage"] == stage), "")
                return (f"| {cell('train_step_latency_s', stage=stage)} [{batch}] "
                        f"| {'' if mfu is None else f'{mfu:.1%}'} ")

            def decode_cell(mode: str, arch: str = arch, v: int = v) -> str:
                note = next((r["note"] for r in rows.rows if r["arch"] == arch and r["visual_tokens"] == v
                             and r["metric"] == "decode_latency_s" and r["note"].endswith(f"decode={mode}")), None)
                return "" if note is None else cell("decode_latency_s", note=note)

            big = max((r["batch_size"] for r in rows.rows if r["arch"] == arch and r["visual_tokens"] == v
                       and r["metric"] == "prefill_latency_s"), default=s.batch_size)
            big_mfu = value(rows.rows, arch=arch, visual_tokens=v, metric="mfu", phase="prefill", scope="language",
                            batch_size=big)
            paths = sorted({r["attention_backend"] for r in rows.rows if r["arch"] == arch
                            and r["visual_tokens"] == v and r["attention_backend"]})
            b1 = s.batch_size
            lines.append(f"| {arch} | {v} | {' '.join(paths)} "
                         f"| {cell('prefill_latency_s', scope='total', batch_size=b1)} "
                         f"| {cell('prefill_latency_s', scope='language', batch_size=b1)} "
                         f"| {cell('prefill_latency_s', scope='language', batch_size=big)} [{big}] "
                         f"| {'' if big_mfu is None else f'{big_mfu:.1%}'} "
                         f"| {' | '.join(decode_cell(m) for m in s.decode_modes)} "
                         + "".join(train_cells(st) for st in s.train_stages) + "|")
    lines += ["", "## Prefill speedup over llava: measured vs predicted by counted FLOPs", "",
              "| arch | visual | batch | scope | measured | FLOP-predicted | prefill_speedup_vs_flops |",
              "|---|---|---|---|---|---|---|",
              *speedups, "", "## Targets", "", *target_checks(rows.rows), "", *notes]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    from mllm_bench.reports.plots import measured_panels  # matplotlib loads only here

    measured_panels(df, out / "gpu_bench", s.decode_modes[-1] if s.decode_modes else "dynamic", SPEEDUP_TARGET)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny presets on CPU (end-to-end check)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 layers, few repeats")
    parser.add_argument("--llm"), parser.add_argument("--vision")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's; width unchanged)")
    parser.add_argument("--visual-tokens", help="comma-separated perfect squares (default 576,2304)")
    parser.add_argument("--archs", help=f"comma-separated, default all: {','.join(architecture_names())}")
    parser.add_argument("--backend", help="NAME for all, or ARCH=NAME,... (default: each architecture's fast backend)")
    parser.add_argument("--phases", help="comma-separated: prefill,decode,train_step")
    parser.add_argument("--device"), parser.add_argument("--dtype")
    parser.add_argument("--warmup", type=int), parser.add_argument("--min-repeats", type=int)
    parser.add_argument("--min-seconds", type=float)
    parser.add_argument("--eager", action="store_true",
                        help="no torch.compile (default: compile every layer and block)")
    parser.add_argument("--prefill-batch", type=int, help="throughput prefill batch in samples (default 32)")
    parser.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default adamw: bf16 state)")
    parser.add_argument("--train-stages", help="comma-separated of pretrain,finetune (default both)")
    parser.add_argument("--decode-modes", help=f"comma-separated of {','.join(DECODE_MODES)} (default dynamic,graph)")
    parser.add_argument("--out", help="output folder (default results/gpu/<device>)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the points already measured in OUT (same settings) and measure the rest")
    parser.add_argument("--commit", help="git commit to record (when the tree was copied without .git)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    s = preset_settings(args)
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --tiny (CPU) or --device cpu")
    if not set(s.archs) <= set(architecture_names()):
        raise SystemExit(f"architectures {sorted(set(s.archs) - set(architecture_names()))} are not registered in "
                         f"this interpreter ({sys.executable}): install the project into it first, "
                         "`python -m pip install -e . --no-deps --no-build-isolation`")
    if device.type == "cuda" and s.layers is None and "train_step" in s.phases:
        s = dataclasses.replace(s, layers=fitting_layers(s, device))
    env = run_environment(device, s)
    out = Path(args.out) if args.out else ROOT / "results" / "gpu" / device_slug(env["device_name"])
    rows = Rows(env)
    store, origin = out / "points", run_origin(device, s)
    atomic_write_text(out / "run.json", json.dumps(run_settings(s), indent=1) + "\n")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    log(f"{env['device_name']}: {s.llm} x {llm_for_run(s).num_layers} layers, visual tokens {s.visual_tokens}, "
        f"archs {s.archs}, torch {torch.__version__} -> {out}" + (" (resuming)" if args.resume else ""))
    kept = 0
    for visual_tokens in s.visual_tokens:
        prefill_batch = None
        for arch in s.archs:
            key = point_key(s, arch, visual_tokens)
            if args.resume:
                earlier, why = reusable_rows(store, key, origin)
                if earlier is not None:
                    rows.rows += earlier
                    kept += 1
                    continue
                if why:
                    log(f"{arch} v={visual_tokens}: measured again: {why}")
            claim = claim_point(store, key)
            if not claim.held:
                log(f"{arch} v={visual_tokens}: skipped, {claim.holder} is measuring it")
                continue
            try:
                if prefill_batch is None:
                    prefill_batch = prefill_batch_that_fits(s, visual_tokens, device)
                first = len(rows.rows)
                measure_point(arch, visual_tokens, s, rows, device, log, prefill_batch)
                point_rows = json.loads(rows_to_json(to_frame(rows.rows[first:])))
                write_point(store, key, {"params": point_params(s, arch, visual_tokens), "status": "ok",
                                         "origin": origin, "rows": point_rows})
            finally:
                claim.release()
            free(device)
            save_rows(rows, out)  # after every point: an interrupted run keeps what it measured
    if args.resume:
        log(f"{kept} points kept from earlier runs")
    speedups = add_speedups(rows)
    notes = [f"Run time {time.perf_counter() - start:.0f} s" + (" (this invocation; earlier points kept by --resume)."
                                                                if args.resume else ".")]
    if s.layers is not None and s.layers != llm_preset(s.llm).num_layers:
        notes.append(f"Decoder depth reduced to {s.layers} of {llm_preset(s.llm).num_layers} layers (full width): "
                     "FLOP ratios and MFU carry over; latency extrapolates linearly in the layer count.")
    write_outputs(rows, out, s, speedups, notes)
    log("\n".join(["prefill speedup over llava (arch | visual | scope | measured | predicted | ratio):", *speedups]))
    return out


if __name__ == "__main__":
    main()
