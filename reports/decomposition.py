"""Where SAISA's saving comes from: LLaVA-1.5 → SAISA in cumulative steps, in FLOPs and measured time.

Each step changes one thing about the visual tokens, in this order:

0. LLaVA-1.5 (``llava``): visual tokens are full decoder tokens.
1. no attention among visual tokens = NAAViT (``naavit``).
2. no visual queries: no Q or O projection on visual rows and no attention scores of visual queries.
3. no visual FFN: visual tokens are keys/values only in every layer, one shared connector
   (= ShortV with every layer frozen).
4. one connector per decoder layer instead of one shared = SAISA (``saisa``).

Every step is built from the analytic cost model's primitives (:class:`mllm_bench.costmodel.CostModel`);
steps 0, 1, 3 and 4 are checked against the registered architectures' ``analytic_cost`` before any number
is returned. The order splits the credit: the visual queries' attention is removed partly in step 1
(visual–visual pairs) and the rest in step 2, so each step also gets its saving "alone" (applied to
LLaVA-1.5 by itself), which for step 2 includes step 1's.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import pandas as pd

from mllm_bench.atomic import atomic_write_text
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig
from mllm_bench.costmodel import SCOPES, CostBreakdown, CostModel, Segment, causal_pairs
from mllm_bench.image_sizes import sizes_label
from mllm_bench.presets import llm_preset, vision_preset
from mllm_bench.registry import architecture_names, build_model
from mllm_bench.workload import PAPER_WORKLOAD, Workload, dtype_name

from .rows import CONVENTION_TEXT, SCOPE_TEXT, field_text, fmt_change, normalise

CONVENTIONS = ("dense", "effective")
# the components a step changes (vision tower and lm_head are the same in every step)
DELTA_COMPONENTS = ("connector", "attn_proj", "attn_scores", "ffn")
COMPONENT_LABELS = {"connector": "connector", "attn_proj": "attn proj", "attn_scores": "attn scores", "ffn": "FFN"}


@dataclass(frozen=True)
class Wiring:
    """What the visual tokens do in the decoder. LLaVA-1.5 is all True except ``per_layer_connector``."""

    visual_visual: bool = True  # a visual query attends to other visual tokens
    visual_queries: bool = True  # visual rows get Q, attention scores and the O projection
    visual_ffn: bool = True  # visual rows go through the FFN
    per_layer_connector: bool = False  # one MLP per decoder layer writes the visual rows


@dataclass(frozen=True)
class Step:
    index: int
    label: str
    short: str  # the label under the step's bar
    wiring: Wiring
    arch: str = ""  # the registered architecture this step is ("" = no implementation)
    same_as: str = ""  # an equivalent registered configuration, for the notes


LLAVA = Wiring()
STEPS: tuple[Step, ...] = (
    Step(0, "LLaVA-1.5", "LLaVA-1.5", LLAVA, "llava"),
    Step(1, "− visual–visual attention (NAAViT)", "− visual–visual\nattention\n(= NAAViT)",
         replace(LLAVA, visual_visual=False), "naavit"),
    Step(2, "− visual queries (Q, O, scores)", "− visual\nqueries\n(Q, O, scores)", Wiring(False, False, True, False)),
    Step(3, "− visual FFN (key/value-only, shared connector)", "− visual FFN\n(keys/values\nonly)",
         Wiring(False, False, False, False), same_as="shortv with every layer frozen"),
    Step(4, "+ per-layer projectors (SAISA)", "+ per-layer\nprojectors", Wiring(False, False, False, True), "saisa"),
)


def _changed(previous: Wiring, current: Wiring) -> str:
    names = [f for f in ("visual_visual", "visual_queries", "visual_ffn", "per_layer_connector")
             if getattr(previous, f) != getattr(current, f)]
    if len(names) != 1:
        raise AssertionError(f"a step must change exactly one thing, got {names}")
    return names[0]


def alone(step: Step) -> Wiring:
    """LLaVA-1.5 with only ``step``'s change applied."""
    previous = STEPS[step.index - 1].wiring
    name = _changed(previous, step.wiring)
    return replace(LLAVA, **{name: getattr(step.wiring, name)})


# ----- analytic cost of a wiring ----------------------------------------------------------------------
def naavit_visual_pairs(segments: Sequence[Segment]) -> int:
    """Pairs a visual query may use without visual–visual attention: the text before it and itself."""
    pairs = text_before = 0
    for seg in segments:
        if seg.role == "visual":
            pairs += seg.length * (text_before + 1)
        else:
            text_before += seg.length
    return pairs


def wiring_cost(wiring: Wiring, llm: LLMConfig, vision: VisionConfig, workload: Workload) -> CostBreakdown:
    """Prefill FLOPs of ``wiring`` (batch × one sample's spliced sequence), from the cost model's primitives."""
    cm = CostModel(llm, workload, vision.tokens_per_image)
    h, m, kv, width, L = llm.hidden_size, llm.intermediate_size, llm.kv_dim, cm.q_width, llm.num_layers
    b, t, v = cm.batch, cm.text, cm.visual
    phase = "prefill"
    cm.vision_tower(vision)
    cm.mlp_connector(vision.hidden_size, h, trainable=False, count=L if wiring.per_layer_connector else 1)
    # text rows: full decoder tokens in every wiring
    cm.decoder_layer_linears(phase, {"text": b * t}, {"text": b * t}, False, False, count=L)
    if v:
        cm.linear(phase, "attn_proj", "visual", b * v, h, kv, count=2 * L)  # K, V
        if wiring.visual_queries:
            cm.linear(phase, "attn_proj", "visual", b * v, h, width, count=L)  # Q
            cm.linear(phase, "attn_proj", "visual", b * v, width, h, count=L)  # O
        if wiring.visual_ffn:
            cm.linear(phase, "ffn", "visual", b * v, h, m, count=2 * L)  # gate, up
            cm.linear(phase, "ffn", "visual", b * v, m, h, count=L)  # down
    n = t + v
    causal = causal_pairs(cm.segments)
    # dense: every key of the sequence per query row; effective: the pairs the mask allows
    cm.scores(phase, "attn_scores", "text", b * t * n, b * causal.get("text", 0), width, width, count=L)
    if v and wiring.visual_queries:
        allowed = causal.get("visual", 0) if wiring.visual_visual else naavit_visual_pairs(cm.segments)
        cm.scores(phase, "attn_scores", "visual", b * v * n, b * allowed, width, width, count=L)
    cm.lm_head()
    return cm.result()


# ----- the check against the registered architectures -------------------------------------------------
@lru_cache(maxsize=32)
def _model(arch: str, llm: LLMConfig, vision: VisionConfig, options: tuple[tuple[str, object], ...] = ()):
    return build_model(arch, llm, vision, dict(options) or None, device="meta")


def _reference_models(step: Step, llm: LLMConfig, vision: VisionConfig) -> list[tuple[str, object]]:
    out = []
    if step.arch:
        out.append((step.arch, _model(step.arch, llm, vision)))
    if step.same_as and "shortv" in architecture_names():
        out.append(("shortv num_frozen=all", _model("shortv", llm, vision, (("num_frozen", llm.num_layers),))))
    return out


def check_against_architectures(step: Step, cost: CostBreakdown, llm: LLMConfig, vision: VisionConfig,
                                workload: Workload) -> list[str]:
    """Raise if ``cost`` differs from the step's registered architecture(s) in any component, scope or
    convention of prefill; returns the names it was checked against."""
    checked = []
    for name, model in _reference_models(step, llm, vision):
        ref = model.analytic_cost(workload)
        for convention in CONVENTIONS:
            ours = cost.by("component", "prefill", convention, "total")
            theirs = ref.by("component", "prefill", convention, "total")
            for comp in sorted(set(ours) | set(theirs)):
                a, r = ours.get(comp, 0.0), theirs.get(comp, 0.0)
                if not math.isclose(a, r, rel_tol=1e-12, abs_tol=0.0):
                    raise AssertionError(f"saving decomposition step {step.index} ({step.label}): {comp} prefill "
                                         f"FLOPs ({convention}) {a:.6g} != {name}.analytic_cost {r:.6g}")
        checked.append(name)
    return checked


# ----- measured rows ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    latency_s: float
    iqr_s: float
    device_name: str
    backend: str


def _matching(rows: pd.DataFrame, metric: str, arch: str, llm: str, vision: str, workload: Workload,
              image_size: int, visual_tokens: int, scope: str) -> pd.DataFrame:
    want = {"metric": metric, "source": "measured", "arch": arch, "llm": llm, "vision": vision, "options": "",
            "stage": "inference", "phase": "prefill", "scope": scope, "batch_size": str(workload.batch_size),
            "images_per_sample": str(workload.images_per_sample), "text_before": str(workload.text_before),
            "text_after": str(workload.text_after), "text_tokens": str(workload.num_text_tokens),
            "generate_tokens": str(workload.generate_tokens), "visual_tokens": str(visual_tokens),
            "dtype": dtype_name(workload.torch_dtype)}
    sizes = sizes_label(workload.image_sizes or ((image_size, image_size),))  # as rows say
    blank_ok = {"image_size": str(image_size), "image_sizes": sizes}  # blank: rows written before the column
    keep = pd.Series(True, index=rows.index)
    for col, value in want.items():
        keep &= rows[col].map(field_text) == value
    for col, value in blank_ok.items():
        keep &= rows[col].map(field_text).isin([value, ""])
    return rows[keep]


def measured_prefill(measured: pd.DataFrame, arch: str, llm: str, vision: str, workload: Workload,
                     image_size: int, visual_tokens: int, scope: str) -> Measured | None:
    """The measured prefill latency (median) of ``arch`` on exactly this workload and scope, or None.

    Rows from several devices, or several different values for one model, are refused: which would be
    "the" number?
    """
    rows = normalise(measured)
    lat = _matching(rows, "prefill_latency_s", arch, llm, vision, workload, image_size, visual_tokens, scope)
    if lat.empty:
        return None
    devices = sorted(set(lat["device_name"].map(field_text)))
    if len(devices) > 1:
        raise ConfigError(f"measured prefill_latency_s of {arch} {llm} comes from several devices {devices}; "
                          "pass the rows of one device")
    if lat["value"].nunique() > 1:
        stamps = ", ".join(f"{v:g} s ({field_text(c)} {field_text(s)})" for v, c, s
                           in zip(lat["value"], lat["git_commit"], lat["timestamp"], strict=True))
        raise ConfigError(f"measured prefill_latency_s of {arch} {llm} has several values for one workload: "
                          f"{stamps}; pass the rows of one run")
    iqr = _matching(rows, "latency_iqr_s", arch, llm, vision, workload, image_size, visual_tokens, scope)
    iqr = iqr[iqr["device_name"].map(field_text) == devices[0]]
    return Measured(float(lat["value"].iloc[0]), float(iqr["value"].iloc[0]) if iqr["value"].nunique() == 1
                    else math.nan, devices[0], field_text(lat["attention_backend"].iloc[0]))


# ----- the table --------------------------------------------------------------------------------------
def _workload_of(table: pd.DataFrame) -> Workload:
    """The workload a decomposition table was computed for (its notes and figure say it; never assumed)."""
    if "workload" not in table.attrs:
        raise ConfigError("a decomposition table without its workload (table.attrs['workload']): make it with "
                          "decomposition(...) and keep its attrs")
    return table.attrs["workload"]


def _tflops(cost: CostBreakdown, convention: str, scope: str, component: str | None = None) -> float:
    return cost.flops("prefill", convention, scope, component=component) / 1e12


def decomposition(llm: str, workload: Workload = PAPER_WORKLOAD, vision: str = "clip-vit-l-336",
                  scope: str = "language", measured: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per step: prefill TFLOPs (dense and effective), the saving vs the previous step and alone from
    LLaVA-1.5 (positive = FLOPs removed), its share of LLaVA-1.5 − SAISA, the saving by component, and the
    measured prefill latency where rows of that architecture and workload exist (steps 2 and 3: none)."""
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    if not isinstance(workload, Workload):
        raise ConfigError(f"workload must be a Workload, got {type(workload).__name__}")
    if workload.is_training:
        raise ConfigError(f"the saving decomposition is of inference prefill; workload.stage must be 'inference', "
                          f"got {workload.stage!r}")
    llm_cfg, vision_cfg = llm_preset(llm), vision_preset(vision)
    if workload.image_size is not None and workload.image_size != vision_cfg.image_size:
        raise ConfigError(f"workload.image_size {workload.image_size} differs from {vision}'s {vision_cfg.image_size}; "
                          "the decomposition uses the vision preset's own size (image_size=None)")
    if workload.images_per_sample < 1:
        raise ConfigError("workload.images_per_sample must be >= 1: without visual tokens there is nothing to save")
    costs = {s.index: wiring_cost(s.wiring, llm_cfg, vision_cfg, workload) for s in STEPS}
    alone_costs = {s.index: wiring_cost(alone(s), llm_cfg, vision_cfg, workload) for s in STEPS[1:]}
    base = costs[0]
    checked = {s.index: check_against_architectures(s, costs[s.index], llm_cfg, vision_cfg, workload) for s in STEPS}
    total_saving = {c: _tflops(base, c, scope) - _tflops(costs[STEPS[-1].index], c, scope) for c in CONVENTIONS}
    records = []
    for step in STEPS:
        cost = costs[step.index]
        rec: dict[str, object] = {"llm": llm, "vision": vision, "scope": scope, "step": step.index,
                                  "label": step.label, "arch": step.arch,
                                  "checked_against": ", ".join(checked[step.index])}
        for conv in CONVENTIONS:
            rec[f"tflops_{conv}"] = _tflops(cost, conv, scope)
        for conv in CONVENTIONS:
            if step.index == 0:
                rec[f"saving_{conv}"] = rec[f"saving_alone_{conv}"] = rec[f"share_{conv}"] = math.nan
                for comp in DELTA_COMPONENTS:
                    rec[f"saving_{comp}_{conv}"] = math.nan
                continue
            prev, only = costs[step.index - 1], alone_costs[step.index]
            saving = _tflops(prev, conv, scope) - _tflops(cost, conv, scope)
            rec[f"saving_{conv}"] = saving
            rec[f"saving_alone_{conv}"] = _tflops(base, conv, scope) - _tflops(only, conv, scope)
            rec[f"share_{conv}"] = saving / total_saving[conv] if total_saving[conv] else math.nan
            parts = {k: prev_v - cost.by("component", "prefill", conv, scope).get(k, 0.0)
                     for k, prev_v in prev.by("component", "prefill", conv, scope).items()}
            others = {k: p for k, p in parts.items() if k not in DELTA_COMPONENTS and p}
            if others:
                raise AssertionError(f"step {step.index} changes components outside {DELTA_COMPONENTS}: {others}")
            for comp in DELTA_COMPONENTS:
                rec[f"saving_{comp}_{conv}"] = parts.get(comp, 0.0) / 1e12
        m = None
        if measured is not None and step.arch:
            visual = sum(_model(step.arch, llm_cfg, vision_cfg).visual_tokens_per_image(workload))  # per sample
            m = measured_prefill(measured, step.arch, llm, vision, workload, vision_cfg.image_size, visual, scope)
        rec["measured_prefill_ms"] = m.latency_s * 1e3 if m else math.nan
        rec["measured_iqr_ms"] = m.iqr_s * 1e3 if m else math.nan
        rec["measured_device"] = m.device_name if m else ""
        rec["measured_backend"] = m.backend if m else ""
        records.append(rec)
    table = pd.DataFrame.from_records(records)
    for conv in CONVENTIONS:  # the steps' savings add up to LLaVA-1.5 − SAISA
        if not math.isclose(table[f"saving_{conv}"].iloc[1:].sum(), total_saving[conv], rel_tol=1e-9):
            raise AssertionError(f"step savings ({conv}) do not add up to LLaVA-1.5 − SAISA")
    table.attrs["workload"] = workload
    return table


# ----- Markdown ---------------------------------------------------------------------------------------
def _num(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{digits}f}".replace("-", "−") if x else "0"


def _plain(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ms(row: pd.Series) -> str:
    if math.isnan(row["measured_prefill_ms"]):
        return "—"
    iqr = row["measured_iqr_ms"]
    return f"{row['measured_prefill_ms']:.2f}" + (f" (IQR {iqr:.2f})" if not math.isnan(iqr) else "")


def _workload_text(workload: Workload, visual: int) -> str:
    return (f"batch {workload.batch_size}, {workload.images_per_sample} image(s) × {visual} visual tokens, "
            f"text {workload.text_before}+{workload.text_after} tokens, prefill")


def to_markdown(table: pd.DataFrame) -> str:
    """Per LLM and convention: TFLOPs per step, saving vs previous and alone, share, saving by component,
    measured prefill; the conventions are printed under the tables."""
    if table.empty:
        raise ConfigError("the decomposition table is empty")
    out = ["# Where SAISA's saving comes from: LLaVA-1.5 → SAISA step by step", ""]
    workload = _workload_of(table)
    for llm, sub in table.groupby("llm", sort=False):
        for conv in CONVENTIONS:
            out += [f"## {llm}, {conv} attention, {sub['scope'].iloc[0]} scope", ""]
            comps = " | ".join(f"saved: {COMPONENT_LABELS[c]}" for c in DELTA_COMPONENTS)
            out.append(f"| step | change | TFLOPs | saved vs previous | share of saving | saved if alone | {comps} "
                       "| measured prefill ms |")
            out.append("|" + "---|" * (7 + len(DELTA_COMPONENTS)))
            for _, r in sub.iterrows():
                cells = [str(r["step"]), r["label"], _plain(r[f"tflops_{conv}"]), _num(r[f"saving_{conv}"]),
                         fmt_change(r[f"share_{conv}"]).lstrip("+") if r["step"] else "—",
                         _num(r[f"saving_alone_{conv}"])]
                cells += [_num(r[f"saving_{c}_{conv}"]) for c in DELTA_COMPONENTS]
                cells.append(_ms(r))
                out.append("| " + " | ".join(cells) + " |")
            first, last = sub.iloc[0], sub.iloc[-1]
            out += ["", f"LLaVA-1.5 {_plain(first[f'tflops_{conv}'])} → SAISA {_plain(last[f'tflops_{conv}'])} "
                    f"TFLOPs ({fmt_change(last[f'tflops_{conv}'] / first[f'tflops_{conv}'] - 1)}).", ""]
    out += ["## Conventions", ""]
    out += [f"- {line}" for line in notes(table, workload)]
    return "\n".join(out) + "\n"


def notes(table: pd.DataFrame, workload: Workload = PAPER_WORKLOAD) -> list[str]:
    scope = table["scope"].iloc[0]
    visual = vision_preset(table["vision"].iloc[0]).tokens_per_image
    lines = [
        "FLOPs: one multiply-add = 2 FLOPs; analytic (the cost model's closed forms), prefill only.",
        f"Workload: {_workload_text(workload, visual)}; vision {table['vision'].iloc[0]}.",
        f"Scope: {SCOPE_TEXT.get(scope, scope)}.",
        f"Attention: {CONVENTION_TEXT['dense']}; {CONVENTION_TEXT['effective']}.",
        "Steps are cumulative, in this order: 1 removes visual–visual attention, 2 the visual queries (Q and O "
        "projections of visual rows and their attention scores), 3 the visual FFN (visual tokens are keys/values "
        "only in every layer, one shared connector), 4 gives every decoder layer its own connector.",
        "Saved vs previous: TFLOPs of the step before minus this step's (positive = removed; negative = added, "
        "step 4). Share: that saving over LLaVA-1.5 − SAISA; the shares add up to 100%.",
        "Saved if alone: LLaVA-1.5 minus LLaVA-1.5 with only this step's change. Order matters for step 2: alone it "
        "also removes the visual–visual pairs that step 1 takes in the cumulative order, so the 'alone' column "
        "does not add up to the total.",
        "Under the dense convention step 1 saves nothing: the convention counts every query–key pair without a "
        "mask discount, so the visual queries' attention is saved only when they go (step 2).",
    ]
    checked = [f"step {r['step']} = {r['checked_against']}" for _, r in table.drop_duplicates("step").iterrows()
               if r["checked_against"]]
    lines.append("Checked: each step's FLOPs by component equal the registered architecture's analytic_cost ("
                 + "; ".join(checked) + "). Steps without an architecture are built from the same primitives.")
    m = table[table["measured_prefill_ms"].notna()]
    if m.empty:
        lines.append("Measured prefill: none shown (no measured rows were given, or none match this workload, "
                     "LLM and scope).")
    else:
        where = "; ".join(f"{r['llm']} {r['arch']}: {r['measured_device']}, {r['measured_backend']}"
                          for _, r in m.iterrows())
        missing = sorted(set(table["llm"]) - set(m["llm"]))
        lines.append(f"Measured prefill: median of the timed repeats, {scope} scope, ms (IQR in brackets), "
                     f"from the measured rows ({where}). Steps 2 and 3 have no implementation, so no time ('—')."
                     + (f" No measured rows for {', '.join(missing)}." if missing else "")
                     + " Times differ by attention kernel as well as by FLOPs (the backend is named per row).")
    return lines


# ----- the waterfall ----------------------------------------------------------------------------------
def waterfall(table: pd.DataFrame, stem: Path) -> list[Path]:
    """One panel per convention: LLaVA-1.5's bar, each step's change as a floating bar split by component
    (hatched = added), SAISA's bar; measured prefill under the step names where it exists."""
    from . import plots

    if table["llm"].nunique() != 1:
        raise ConfigError(f"waterfall draws one LLM; the table has {sorted(set(table['llm']))}")
    plots._style()
    import matplotlib.pyplot as plt
    import seaborn as sns

    colors = dict(zip(DELTA_COMPONENTS, sns.color_palette("Set2", len(DELTA_COMPONENTS)), strict=True))
    fig, axes = plt.subplots(len(CONVENTIONS), 1, figsize=(9.0, 7.6), sharex=True)
    shorts = {s.index: s.short for s in STEPS}
    names = []
    for _, r in table.iterrows():
        name = f"{r['step']}. {shorts[r['step']]}"
        if not math.isnan(r["measured_prefill_ms"]):
            name += f"\n[{r['measured_prefill_ms']:.1f} ms]"
        names.append(name)
    names.append("= SAISA")
    used: set[str] = set()
    for ax, conv in zip(axes, CONVENTIONS, strict=True):
        level = float(table[f"tflops_{conv}"].iloc[0])
        ax.bar(0, level, color="#1f77b4", width=0.6)
        ax.text(0, level, f"{level:.2f}", ha="center", va="bottom", fontsize=8)
        for i in range(1, len(table)):
            r = table.iloc[i]
            cursor = level
            for comp in DELTA_COMPONENTS:
                change = -float(r[f"saving_{comp}_{conv}"])
                if not change:
                    continue
                ax.bar(i, abs(change), bottom=min(cursor, cursor + change), width=0.6, color=colors[comp],
                       hatch="//" if change > 0 else None, edgecolor="0.3", linewidth=0.4,
                       label=COMPONENT_LABELS[comp] if comp not in used else None)
                used.add(comp)
                cursor += change
            saving = float(r[f"saving_{conv}"])
            top = max(level, cursor)
            share = fmt_change(r[f"share_{conv}"]).lstrip("+")
            ax.text(i, top, f"{_num(-saving, 2)}\n({share})", ha="center", va="bottom", fontsize=7.5)
            if i < len(table):
                ax.plot([i - 0.3, i + 1.3], [cursor, cursor], color="0.5", linewidth=0.6, linestyle=":")
            level = cursor
        ax.bar(len(table), level, color="#2ca02c", width=0.6)
        ax.text(len(table), level, f"{level:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=7.5)
        ax.set_title(f"{conv} attention", fontsize=10)
        ax.set_ylabel("prefill TFLOPs")
        ax.set_ylim(0, float(table[f"tflops_{conv}"].max()) * 1.15)
    axes[0].legend(loc="upper right", fontsize=8, title="change by component", title_fontsize=8)
    fig.suptitle(f"LLaVA-1.5 → SAISA, {table['llm'].iloc[0]}: where the saving comes from", fontsize=11)
    fig.tight_layout()
    workload = _workload_of(table)
    visual = vision_preset(table["vision"].iloc[0]).tokens_per_image
    extra = (f"{_workload_text(workload, visual)}; steps cumulative (labels give the change vs the previous bar, "
             "share of LLaVA−SAISA in brackets; hatched = added FLOPs); measured prefill [ms] under "
             "the step name where rows exist")
    timed = table[table["measured_prefill_ms"].notna()]
    if not timed.empty:
        devices = ", ".join(sorted(set(timed["measured_device"])))
        extra += (f" (median prefill, {table['scope'].iloc[0]} scope, {devices}; steps 2 and 3 have no "
                  "implementation)")
    return plots.save(fig, stem, plots.footnote_for(table["scope"].iloc[0], "dense | effective", extra))


# ----- files ------------------------------------------------------------------------------------------
def _save_figure_atomically(table: pd.DataFrame, stem: Path) -> list[Path]:
    """Draw into a temporary folder beside ``stem``, then rename each file into place."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=stem.parent, prefix=f".{stem.name}."))
    try:
        out = []
        for path in waterfall(table, tmp / stem.name):
            final = stem.with_suffix(path.suffix)
            os.replace(path, final)
            out.append(final)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_decomposition(folder: Path, llms: Sequence[str] = ("vicuna-7b", "vicuna-13b"),
                        measured: pd.DataFrame | None = None, workload: Workload = PAPER_WORKLOAD,
                        vision: str = "clip-vit-l-336", scope: str = "language", figures: bool = True) -> list[Path]:
    """``saving_decomposition.md``/``.csv`` (every LLM) and, with ``figures``, ``saving_decomposition_<llm>.png``/
    ``.pdf``; each file is written whole or not at all."""
    folder = Path(folder)
    if isinstance(llms, str) or not llms:
        raise ConfigError(f"llms must be a non-empty list of LLM preset names, got {llms!r}")
    tables = [decomposition(llm, workload, vision, scope, measured) for llm in llms]
    table = pd.concat(tables, ignore_index=True)
    table.attrs["workload"] = workload
    files = [atomic_write_text(folder / "saving_decomposition.csv", table.to_csv(index=False)),
             atomic_write_text(folder / "saving_decomposition.md", to_markdown(table))]
    for llm, sub in zip(llms, tables, strict=True) if figures else ():
        files += _save_figure_atomically(sub, folder / f"saving_decomposition_{llm}")
    return files
