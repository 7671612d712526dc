"""The profiler's Python API: ``profile(arch, workload, ...)`` -> tidy rows (a pandas DataFrame).

For ``workload.stage == "inference"`` it reports prefill and one decode step (at ``context_len``
cached tokens, default the prompt); for ``pretrain``/``finetune`` one training step of that stage.
Every FLOP metric comes ``analytic`` (both attention conventions, both scopes, by component and by
token role) and ``counted`` (meta tensors, dense, by component); parameters and analytic memory
always; wall-clock, measured memory, achieved FLOP/s and MFU when ``measure`` says so, measured by the
engine in :mod:`mllm_bench.measure` as a :class:`~mllm_bench.measure.MeasureSettings` says.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from . import count_cache
from .config import ConfigError, LLMConfig, VisionConfig
from .conventions import PUBLISHED
from .costmodel import COMPONENTS, CostBreakdown, equivalent_tokens, spliced_reference_cost
from .devices import peak_flops
from .environment import environment
from .flops import CountedFlops, count_inference, count_train_step
from .image_sizes import sizes_label
from .measure import MeasureSettings, prepare_model, time_decode, time_phase, time_prefill, timed_rows, train_step
from .memory import MeasuredMemory, analytic_memory
from .model import MLLM
from .registry import build_model, get_architecture
from .schema import COLUMNS, make_row
from .timing import Timing
from .workload import PAPER_WORKLOAD, Workload, dtype_name, parse_dtype

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["profile", "should_measure", "MeasureSettings"]

# Models at most this large are measured on CPU under ``measure="auto"``.
CPU_AUTO_MEASURE_PARAMS = 50_000_000
PHASE_METRIC = {"prefill": "prefill_flops", "decode": "decode_flops_per_token", "train_step": "train_step_flops"}


def _per(phase: str, base: dict) -> float:
    """Prefill and train-step FLOPs are per batch; decode FLOPs per generated token (of one sample)."""
    return 1.0 / base["batch_size"] if phase == "decode" else 1.0


def should_measure(measure: bool | str, device: str, num_params: int) -> bool:
    """``never``/False, ``always``/True, or ``auto``: on CUDA, and on CPU only for small models."""
    if isinstance(measure, bool):
        return measure
    if measure not in ("never", "auto", "always"):
        raise ConfigError(f"measure must be one of ['never', 'auto', 'always'] (or a bool), got {measure!r}")
    if measure == "auto":
        dev = torch.device(device)
        return dev.type == "cuda" or (dev.type == "cpu" and num_params <= CPU_AUTO_MEASURE_PARAMS)
    return measure == "always"


def _options_json(model: MLLM) -> str:
    defaults = type(model.options)()
    changed = {f.name: getattr(model.options, f.name) for f in dataclasses.fields(model.options)
               if getattr(model.options, f.name) != getattr(defaults, f.name)}
    return json.dumps(changed, sort_keys=True) if changed else ""


def _base(arch: str, model: MLLM, workload: Workload, device: str, backend: str) -> dict:
    """Identity, workload and environment fields (``context_len`` is set per row, decode rows only)."""
    v = model.vision_config
    return {
        "arch": arch, "llm": model.llm_config.name, "vision": v.name, "options": _options_json(model),
        "batch_size": workload.batch_size, "images_per_sample": workload.images_per_sample,
        "image_size": workload.image_size or v.image_size,
        "image_sizes": sizes_label(workload.image_sizes or ((v.image_size,) * 2,))
        if workload.images_per_sample else "",
        "visual_tokens": sum(model.visual_tokens_per_image(workload)),
        "text_tokens": workload.num_text_tokens, "text_before": workload.text_before,
        "text_after": workload.text_after, "generate_tokens": workload.generate_tokens,
        "context_len": "", "dtype": dtype_name(workload.torch_dtype), "device": device,
        **environment(device, backend),
    }


def _analytic_rows(base: dict, cost: CostBreakdown, stage: str, decode_ctx: int | str, model: MLLM,
                   workload: Workload) -> list[dict]:
    rows = []
    for phase in cost.phases:
        metric = PHASE_METRIC[phase]
        ctx = decode_ctx if phase == "decode" else ""
        per = _per(phase, base)
        for scope in ("language", "total"):
            for convention in ("dense", "effective"):
                common = dict(scope=scope, convention=convention, stage=stage, phase=phase, context_len=ctx)
                # an architecture's assumptions, on the rows they apply to
                notes = [cost.info.get("cost_note"), convention == "effective" and cost.info.get("effective_note")]
                if any(notes):
                    common["note"] = "; ".join(n for n in notes if n)
                rows.append(make_row(base, metric, per * cost.flops(phase, convention, scope), "analytic",
                                     component="all", role="all", **common))
                for comp, f in cost.by("component", phase, convention, scope).items():
                    rows.append(make_row(base, metric, per * f, "analytic", component=comp, role="all", **common))
                for role, f in cost.by("role", phase, convention, scope).items():
                    rows.append(make_row(base, metric, per * f, "analytic", component="all", role=role, **common))
        if phase in ("prefill", "decode"):
            for conv in PUBLISHED.values():
                common = dict(scope=conv.scope, convention=conv.name, role="all", stage=stage, phase=phase,
                              context_len=ctx, note=cost.info.get("cost_note", ""))
                parts = conv.by_component(cost, model.llm_config, phase)
                rows.append(make_row(base, metric, per * sum(parts.values()), "analytic", component="all", **common))
                rows += [make_row(base, metric, per * f, "analytic", component=comp, **common)
                         for comp, f in parts.items()]
        if phase == "prefill":
            rows.append(make_row(base, "vision_flops", cost.flops(phase, component="vision"), "analytic",
                                 scope="total", convention="dense", component="vision", role="all",
                                 stage=stage, phase=phase))
            rows += _token_rows(base, cost, model, workload, stage)
    return rows


# visual tokens per image at which the LLaVA-1.5 reference is evaluated (its cost is quadratic in them)
REFERENCE_TOKENS = (0, 256, 512)


def _token_rows(base: dict, cost: CostBreakdown, model: MLLM, workload: Workload, stage: str) -> list[dict]:
    """Layer-averaged visual tokens (SparseVLM's count) and LLaVA-1.5-equivalent visual tokens (same prefill FLOPs
    under each convention), per sample."""
    images, b, layers = workload.images_per_sample, workload.batch_size, model.llm_config.num_layers
    if not images:
        return []
    common = dict(component="all", role="visual", stage=stage, phase="prefill")
    full, _ = cost.rows("prefill", "visual")
    rows = [make_row(base, "layer_avg_visual_tokens", full / (layers * b), "analytic", scope="", convention="",
                     note="visual tokens with a query and an FFN row, averaged over the decoder's layers", **common)]
    refs = {x: spliced_reference_cost(model.llm_config, model.vision_config, workload, x) for x in REFERENCE_TOKENS}
    measures = [(scope, conv, lambda c, s=scope, v=conv: c.flops("prefill", v, s))
                for scope in ("language", "total") for conv in ("dense", "effective")]
    measures += [(conv.scope, conv.name, lambda c, v=conv: v.flops(c, model.llm_config, "prefill"))
                 for conv in PUBLISHED.values()]
    for scope, conv, value in measures:
        x = equivalent_tokens(value(cost), {t: value(ref) for t, ref in refs.items()})
        if x is not None:
            notes = ["LLaVA-1.5 visual tokens with the same prefill FLOPs", cost.info.get("cost_note"),
                     conv == "effective" and cost.info.get("effective_note")]
            rows.append(make_row(base, "equivalent_visual_tokens", x * images, "analytic", scope=scope,
                                 convention=conv, note="; ".join(n for n in notes if n), **common))
    return rows


def _counted_rows(base: dict, phase: str, counted: CountedFlops, stage: str, ctx: int | str) -> list[dict]:
    rows = []
    metric = PHASE_METRIC[phase]
    per = _per(phase, base)
    common = dict(convention="dense", role="all", stage=stage, phase=phase,
                  context_len=ctx if phase == "decode" else "")
    for scope in ("language", "total"):
        rows.append(make_row(base, metric, per * counted.flops(scope), "counted", scope=scope, component="all",
                             **common))
        for comp, f in counted.by_component(scope).items():
            if comp in COMPONENTS:
                rows.append(make_row(base, metric, per * f, "counted", scope=scope, component=comp, **common))
    if phase == "prefill":
        rows.append(make_row(base, "vision_flops", counted.flops(component="vision"), "counted", scope="total",
                             convention="dense", component="vision", role="all", stage=stage, phase=phase))
    return rows


def _memory_rows(base: dict, model: MLLM, cost: CostBreakdown, workload: Workload, stage: str) -> list[dict]:
    mem = analytic_memory(model, cost, workload.torch_dtype.itemsize)
    rows = [make_row(base, "weights_bytes", mem.weights, "analytic", component="all", role="all", stage="inference")]
    if stage == "inference":
        for role, b in mem.kv_cache.items():
            rows.append(make_row(base, "kv_cache_bytes", b, "analytic", component="all", role=role, stage=stage,
                                 phase="decode", note="per sample, after prompt + generate_tokens"))
        return rows
    for metric, value in (("grads_bytes", mem.grads), ("optimizer_bytes", mem.optimizer),
                          ("activations_bytes", mem.activations), ("train_peak_memory_bytes", mem.train_peak)):
        rows.append(make_row(base, metric, value, "analytic", component="all", role="all", stage=stage,
                             phase="train_step"))
    return rows


def _measured_rows(base: dict, model: MLLM, workload: Workload, stage: str, flops: dict[str, float],
                   settings: MeasureSettings) -> list[dict]:
    """Time and measure memory of each phase on ``workload.device`` (weights randomly initialised)."""
    device = workload.device
    cuda = torch.device(device).type == "cuda"
    peak = peak_flops(base["device_name"], base["dtype"]) if cuda else None
    note = ("cuda_events" if cuda else "perf_counter") + ("; compiled" if settings.compile else "")
    batch = model.example_batch(workload)
    b = workload.batch_size
    rows: list[dict] = []

    def record(phase: str, metric: str, timing: Timing, memory: MeasuredMemory, tokens: float,
               phase_flops: float | None, detail: str = "") -> None:
        rows.extend(timed_rows(base, metric, timing, memory=memory, tokens=tokens, flops=phase_flops, peak=peak,
                               component="all", role="all", stage=stage, phase=phase, note=note + detail))

    if stage == "inference":
        model.set_stage("inference")
        with torch.no_grad():
            if workload.images_per_sample:
                record("vision_encode", "vision_encode_latency_s",
                       *time_phase(lambda: model.encode(batch.pixel_values), device, settings), 0, flops.get("vision"))
            prompt = base["visual_tokens"] + workload.num_text_tokens
            record("prefill", "prefill_latency_s", *time_prefill(model, batch, device, settings), b * prompt,
                   flops.get("prefill"))
            mode = settings.decode_mode_on(device)
            decoded = time_decode(model, batch, device, settings, mode)
            record("decode", "decode_latency_s", decoded.timing, decoded.memory, b, flops.get("decode"),
                   detail=f"; decode={mode}")
            kv = {**decoded.cache.nbytes(), **model.extra_cache_nbytes(decoded.cache)}  # + the architecture's own
            kv["all"] = sum(kv.values())
            rows += [make_row(base, "kv_cache_bytes", v / b, "measured", component="all", role=r, stage=stage,
                              phase="decode", note="per sample, after the timed decode steps") for r, v in kv.items()]
        return rows
    model.set_gradient_checkpointing(workload.gradient_checkpointing)
    step = train_step(model, stage, batch, device, settings)
    record("train_step", "train_step_latency_s", *time_phase(step, device, settings),
           b * (base["visual_tokens"] + workload.num_text_tokens), flops.get("train_step"),
           detail=f"; optimizer={settings.optimizer}")
    model.set_stage("inference")
    return rows


# meta models built by this process, most recent last: a command profiles the same model in several stages
_META_MODELS: OrderedDict[tuple, MLLM] = OrderedDict()
META_MODELS_KEPT = 32  # a meta 7B model is about 2 MB of Python objects; a sweep over image sizes needs many


def cached_meta_model(arch: str, llm: str | LLMConfig, vision: str | VisionConfig,
                      options: dict[str, Any] | None, dtype: str | torch.dtype) -> MLLM:
    """The meta-device model (attention ``sdpa``, inference stage), built once per process for each identity.

    Profiling leaves it as it found it (counting restores the stage and gradient checkpointing)."""
    dtype = parse_dtype(dtype)
    key = (get_architecture(arch), arch, repr(llm), repr(vision), repr(sorted((options or {}).items())), str(dtype))
    model = _META_MODELS.pop(key, None)
    if model is None:
        model = build_model(arch, llm, vision, options, device="meta", dtype=dtype)
        model.set_stage("inference")  # profiling hands a reused model back in this stage
    model.set_attention_backend("sdpa")  # counting on meta: the dense convention, every backend alike
    _META_MODELS[key] = model
    while len(_META_MODELS) > META_MODELS_KEPT:
        _META_MODELS.popitem(last=False)
    return model


def _cached_rows(name: str) -> tuple[int, list[dict]] | None:
    """(parameter count, rows) of a cached unmeasured profile; None when absent, or when the entry is not
    whole rows of today's columns (then the profile runs and writes it again)."""
    hit = count_cache.load(name, "rows")
    if hit is None or not isinstance(hit.get("params"), int) or not isinstance(hit.get("rows"), list):
        return None
    rows, columns = hit["rows"], set(COLUMNS)
    if not all(isinstance(row, dict) and row.keys() == columns for row in rows):
        return None
    return hit["params"], rows


def _counts_name(arch: str, model: MLLM, workload: Workload, context_len: int | None) -> str:
    """The count cache's name for the counts of ``model`` on ``workload`` (on meta)."""
    return count_cache.key(type(model), "profile", arch, model.llm_config, model.vision_config, model.options,
                           workload.replace(device="meta"), context_len)


def counts_cached(arch: str, workload: Workload = PAPER_WORKLOAD, llm: str | LLMConfig = "vicuna-7b",
                  vision: str | VisionConfig = "clip-vit-l-336", options: dict[str, Any] | None = None,
                  context_len: int | None = None) -> bool:
    """Whether the count cache holds the counted FLOPs :func:`profile_rows` would count for these arguments
    (an entry that later proves unreadable is counted again, as always)."""
    model = cached_meta_model(arch, llm, vision, options, workload.torch_dtype)
    return count_cache.has(_counts_name(arch, model, workload, context_len))


def _counts(arch: str, model: MLLM, workload: Workload, context_len: int | None,
            ctx: int | str) -> tuple[dict[str, CountedFlops], int | str]:
    """Counted FLOPs of ``workload``'s phases (and the decode context), from the count cache when this code
    counted the same model and workload before (:mod:`mllm_bench.count_cache`)."""
    name = _counts_name(arch, model, workload, context_len)
    hit = count_cache.load(name)
    if hit is not None:
        return {p: c for p, c in hit.items() if p != "ctx"}, hit["ctx"]
    counted: dict[str, CountedFlops] = {}
    if workload.stage == "inference":
        counted["prefill"], counted["decode"], ctx = count_inference(model, workload, context_len)
    else:
        counted["train_step"] = count_train_step(model, workload, workload.stage)
    count_cache.store(name, {**counted, "ctx": ctx})
    return counted, ctx


def profile(
    arch: str,
    workload: Workload = PAPER_WORKLOAD,
    llm: str | LLMConfig = "vicuna-7b",
    vision: str | VisionConfig = "clip-vit-l-336",
    options: dict[str, Any] | None = None,
    measure: bool | str = False,
    count: bool = True,
    context_len: int | None = None,
    settings: MeasureSettings | None = None,
) -> pd.DataFrame:
    """Profile ``arch`` on ``workload`` and return tidy result rows (see :mod:`mllm_bench.results`).

    :func:`profile_rows` gives the same rows as dicts (one per row, the schema's columns)."""
    from .results import to_frame  # pandas: imported by the first frame, not by counting

    return to_frame(profile_rows(arch, workload, llm, vision, options, measure, count, context_len, settings))


def profile_rows(
    arch: str,
    workload: Workload = PAPER_WORKLOAD,
    llm: str | LLMConfig = "vicuna-7b",
    vision: str | VisionConfig = "clip-vit-l-336",
    options: dict[str, Any] | None = None,
    measure: bool | str = False,
    count: bool = True,
    context_len: int | None = None,
    settings: MeasureSettings | None = None,
) -> list[dict[str, Any]]:
    """The rows of :func:`profile`, as dicts (:func:`~mllm_bench.schema.make_row`).

    ``measure``: False/``never``, True/``always`` or ``auto`` (CUDA always, CPU for small models);
    measurement runs on ``workload.device`` (``meta`` means CUDA when available, else CPU) with
    random weights, as ``settings`` say (:class:`~mllm_bench.measure.MeasureSettings`: attention backend,
    compilation, decode mode, optimizer, timing). The attention backend applies to measurement, while FLOPs
    are counted with ``sdpa`` (dense convention). With ``settings.compile`` torch.compile's caches are reset,
    then the model's layers and blocks compiled (:meth:`~mllm_bench.model.MLLM.compile_layers`) before
    measuring. Rows record the backend, and their ``note`` the decode mode, optimizer and compilation.
    """
    cls = get_architecture(arch)  # a clear error for an unknown name before any work
    settings = settings or MeasureSettings()
    attention_backend = settings.backend_for(cls.spec.fast_attention_backend)
    stage = workload.stage
    run_device = workload.device
    if run_device == "meta":
        run_device = "cuda" if torch.cuda.is_available() else "cpu"
    # rows that measure nothing are a function of the code and the shapes: answered from the count cache
    rows_name = count_cache.model_key("rows", arch, llm, vision, options, workload, context_len, count,
                                      attention_backend)
    hit = _cached_rows(rows_name) if rows_name else None
    if hit is not None and not should_measure(measure, run_device, hit[0]):
        fresh = environment("meta", attention_backend)
        return [{**row, **fresh} for row in hit[1]]
    meta_model = cached_meta_model(arch, llm, vision, options, workload.torch_dtype)
    num_params = meta_model.num_parameters()
    do_measure = should_measure(measure, run_device, num_params)
    out_device = run_device if do_measure else "meta"

    cost = meta_model.analytic_cost(workload, context_len)
    counted: dict[str, CountedFlops] = {}
    ctx: int | str = ""
    if stage == "inference":
        prompt = workload.num_text_tokens + (sum(meta_model.visual_tokens_per_image(workload))
                                             if cost.kv_cache_bytes.get("visual") else 0)
        ctx = context_len if context_len is not None else prompt
    meta_wl = workload.replace(device="meta")
    if count:
        counted, ctx = _counts(arch, meta_model, meta_wl, context_len, ctx)
    base = _base(arch, meta_model, workload, out_device, attention_backend)

    rows = [make_row(base, "params", num_params, "counted", component="all", role="all", stage="inference")]
    if stage != "inference":
        trainable = sum(p.numel() for p in meta_model.trainable_parameters(stage).values())
        rows.append(make_row(base, "trainable_params", trainable, "counted", component="all", role="all",
                             stage=stage))
    rows += _analytic_rows(base, cost, stage, ctx, meta_model, workload)
    for phase, c in counted.items():
        rows += _counted_rows(base, phase, c, stage, ctx)
    rows += _memory_rows(base, meta_model, cost, workload, stage)

    if do_measure:
        # model FLOPs of the whole timed call (all samples); recomputation under activation checkpointing
        # is work the hardware does but not model FLOPs, so it stays out of achieved FLOP/s and MFU
        flops = {p: (counted[p].total - counted[p].flops(pass_="recompute") if p in counted
                     else cost.flops(p) - cost.flops(p, pass_="recompute")) for p in cost.phases}
        flops["vision"] = cost.flops("prefill", component="vision") if stage == "inference" else 0.0
        model = prepare_model(build_model(arch, llm, vision, options, device=run_device, dtype=workload.torch_dtype),
                              settings)
        rows += _measured_rows(base, model, workload.replace(device=run_device), stage, flops, settings)
        del model
    elif rows_name:
        count_cache.store(rows_name, {"params": num_params, "rows": rows}, "rows")
    return rows
