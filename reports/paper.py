"""Regenerate ``results/paper/``: the SAISA paper's efficiency claims recomputed from the implementations.

Outputs: inference-FLOPs tables (paper convention; total scope + effective attention), the training-budget
table, the training-vs-inference trade-off figure (the paper's Figure 1 style), FLOPs-by-component plots,
the profiler's tidy rows, and a README listing every assumption and how to rerun.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mllm_bench.atomic import atomic_write_text
from mllm_bench.config import LLMConfig, VisionConfig
from mllm_bench.conventions import scope_for
from mllm_bench.presets import llm_preset, vision_preset
from mllm_bench.results import concat_rows, write_rows
from mllm_bench.workload import PAPER_WORKLOAD, Workload

from . import plots, train_cost
from .collect import dedupe
from .rows import Conventions, environment_line, fmt_change, normalise, pick

PAPER_ARCHS = ("llava", "flamingo", "saisa")
PAPER_LLMS = ("vicuna-7b", "vicuna-13b")
PAPER_VISION = "clip-vit-l-336"
PAPER_INFERENCE_REDUCTION = 0.66  # arXiv 2502.02458, abstract: SAISA −66% inference FLOPs vs LLaVA-1.5 (7B)
ProfileFn = Callable[..., pd.DataFrame]


def paper_formula_flops(arch: str, llm: LLMConfig, vision: VisionConfig, text_tokens: int = 64,
                        visual_tokens: int | None = None) -> float:
    """The SAISA paper's closed form (REFERENCE.md) for LLaVA-1.5 and SAISA; NaN for other architectures.

    Per layer, n = t + v tokens, hidden h, FFN width m: dense layer 2n(4h+3m)h + 4n²h; a layer where visual
    tokens are keys/values only 2t(4h+3m)h + 4vh² + 4t(t+v)h. Projector 2v(d_v·h + h²): once for LLaVA,
    in every layer for SAISA. Language scope, dense attention; assumes multi-head attention (K/V width h).
    """
    h, m, layers = llm.hidden_size, llm.intermediate_size, llm.num_layers
    t, dv = text_tokens, vision.hidden_size
    v = vision.tokens_per_image if visual_tokens is None else visual_tokens
    projector = 2 * v * (dv * h + h * h)
    if arch == "llava":
        n = t + v
        return layers * (2 * n * (4 * h + 3 * m) * h + 4 * n * n * h) + projector
    if arch == "saisa":
        return layers * (2 * t * (4 * h + 3 * m) * h + 4 * v * h * h + 4 * t * (t + v) * h + projector)
    return math.nan


@dataclass
class PaperResult:
    inference: pd.DataFrame
    budget: pd.DataFrame
    rows: pd.DataFrame
    files: list[Path]


def inference_table(rows: pd.DataFrame, scope: str, convention: str, llms: Sequence[str],
                    archs: Sequence[str], with_formula: bool, vision: str = PAPER_VISION,
                    workload: Workload = PAPER_WORKLOAD) -> pd.DataFrame:
    """One row per (LLM, architecture): prefill TFLOPs (counted, analytic) and the reduction vs LLaVA-1.5."""
    records = []
    for llm in llms:
        base = math.nan
        for arch in archs:
            sub = rows[(rows["llm"] == llm) & (rows["arch"] == arch)]
            counted = pick(sub, "prefill_flops", ("counted",), stage="inference", scope=scope, convention=convention)
            analytic = pick(sub, "prefill_flops", ("analytic",), stage="inference", scope=scope, convention=convention)
            c = float(counted["value"].iloc[0]) if len(counted) else math.nan
            a = float(analytic["value"].iloc[0]) if len(analytic) else math.nan
            value = c if not math.isnan(c) else a
            if arch == "llava":
                base = value
            rec = {"llm": llm, "arch": arch, "architecture": plots.arch_name(arch),
                   "tflops_counted": c / 1e12,
                   "tflops_analytic": a / 1e12, "vs_llava": value / base - 1 if arch != "llava" else math.nan}
            if with_formula:
                rec["tflops_paper_formula"] = paper_formula_flops(arch, llm_preset(llm), vision_preset(vision),
                                                                  workload.num_text_tokens) / 1e12
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"


def inference_markdown(table: pd.DataFrame, claim: bool) -> str:
    formula = "tflops_paper_formula" in table.columns
    counted = table["tflops_counted"].notna().any()  # counted rows exist for dense attention only
    head = "| LLM | architecture |" + (" TFLOPs (counted) |" if counted else "") + " TFLOPs (analytic) |"
    head += " TFLOPs (paper's formula) |" if formula else ""
    head += " vs LLaVA-1.5 |" + (" paper's claim |" if claim else "")
    lines = [head, "|" + "|".join([":---", ":---"] + ["---:"] * (head.count("|") - 3)) + "|"]
    for _, r in table.iterrows():
        row = f"| {r['llm']} | {r['architecture']} |" + (f" {_num(r['tflops_counted'])} |" if counted else "")
        row += f" {_num(r['tflops_analytic'])} |"
        row += f" {_num(r['tflops_paper_formula'])} |" if formula else ""
        row += f" {fmt_change(r['vs_llava'])} |"
        if claim:
            row += " −66% |" if r["arch"] == "saisa" and r["llm"] == "vicuna-7b" else " |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def regenerate(out_dir: str | Path, profile_fn: ProfileFn, llms: Sequence[str] = PAPER_LLMS,
               archs: Sequence[str] = PAPER_ARCHS, mfu: float | train_cost.MFU = 0.4, device: str = "a100",
               on_step: Callable[[str], None] | None = None, command: str = "mllm-bench paper",
               vision: str = PAPER_VISION, workload: Workload = PAPER_WORKLOAD,
               options: dict[str, dict] | None = None, conventions: Sequence[str] = ()) -> PaperResult:
    """Profile what the tables need and write everything under ``out_dir``.

    ``conventions``: FLOP conventions (published or mllm-bench's; :mod:`mllm_bench.conventions`) of which an
    extra inference table is written each, ``inference_flops_<convention>.md``/``.csv``.

    ``mfu``: one value, or a :class:`train_cost.MFU` (e.g. :func:`train_cost.measured_mfu` of measured rows,
    read with ``llm=None`` so that a 7B measurement also serves 13B, as the notes say).
    """
    out = Path(out_dir)
    mfu = mfu if isinstance(mfu, train_cost.MFU) else train_cost.MFU(float(mfu))
    train_cost.peak_flops(device)
    frames = []
    for llm in llms:
        for arch in archs:
            frames.append(profile_fn(arch, workload, llm=llm, vision=vision, options=(options or {}).get(arch),
                                     measure="never"))
            if on_step:
                on_step(f"{arch} {llm} inference")
    rows = normalise(dedupe(concat_rows(frames)))
    recipe = train_cost.llava15_recipe()
    budgets, budget_rows = [], []
    for llm in llms:
        table, used = train_cost.train_cost(list(archs), profile_fn, recipe, llm, vision, options, device, mfu,
                                            on_step=on_step)
        budgets.append(table)
        budget_rows.append(used)
    budget = pd.concat(budgets, ignore_index=True)
    budget.attrs.update(budgets[0].attrs)
    all_rows = normalise(dedupe(concat_rows([rows, *budget_rows])))

    paper_conv = inference_table(rows, "language", "dense", llms, archs, True, vision, workload)
    total_eff = inference_table(rows, "total", "effective", llms, archs, False, vision, workload)
    files = [write_rows(all_rows, out / "rows.csv")]
    files.append(atomic_write_text(out / "inference_flops_paper.csv", paper_conv.to_csv(index=False)))
    files.append(atomic_write_text(out / "inference_flops_total_effective.csv", total_eff.to_csv(index=False)))
    files.append(atomic_write_text(out / "train_budget.csv", budget.to_csv(index=False)))
    break_even = {llm: train_cost.finetune_text_for_reduction(profile_fn, recipe, llm, vision) for llm in llms
                  if {"llava", "saisa"} <= set(archs)}
    notes = train_cost.budget_notes(budget, recipe, break_even)
    files.append(atomic_write_text(out / "train_budget.md", train_cost.to_markdown(budget, notes)))
    files.append(atomic_write_text(out / "inference_flops_paper.md", inference_markdown(paper_conv, claim=True)))
    files.append(atomic_write_text(out / "inference_flops_total_effective.md",
                                   inference_markdown(total_eff, claim=False)))
    for name in conventions:
        table = inference_table(rows, scope_for(name, "language"), name, llms, archs, False, vision, workload)
        files.append(atomic_write_text(out / f"inference_flops_{name}.csv", table.to_csv(index=False)))
        notes = "\n".join(f"- {line}" for line in Conventions("language", name).lines())
        files.append(atomic_write_text(out / f"inference_flops_{name}.md",
                                       f"# Inference FLOPs, {name} convention\n\n"
                                       f"{inference_markdown(table, claim=False)}\n{notes}\n"))

    points = []
    for llm in llms:
        for arch in archs:
            inf = paper_conv[(paper_conv["llm"] == llm) & (paper_conv["arch"] == arch)]
            bud = budget[(budget["llm"] == llm) & (budget["arch"] == arch) & (budget["stage"] == "total")]
            y = inf["tflops_counted"].iloc[0]
            points.append({"arch": arch, "group": llm.replace("vicuna-", "").upper(), "x": bud["gpu_hours"].iloc[0],
                           "y": y if not math.isnan(y) else inf["tflops_analytic"].iloc[0]})
    foot = tradeoff_assumptions(budget, workload, vision)
    files += plots.tradeoff(pd.DataFrame(points), out / "tradeoff",
                            x_label=f"training budget ({device.upper()} GPU-hours)",
                            y_label="inference TFLOPs (paper convention)", footnote=foot)
    for llm in llms:
        files += plots.flops_by_component(all_rows[all_rows["llm"] == llm], out / f"flops_by_component_{llm}",
                                          "total", "effective")
    readme = paper_readme(paper_conv, total_eff, budget, notes, all_rows, command, workload, vision)
    files.append(atomic_write_text(out / "README.md", readme))
    return PaperResult(paper_conv, budget, all_rows, files)


def write_literature(out_dir: str | Path, measured: pd.DataFrame | None = None) -> list[Path]:
    """The literature's claims recomputed (``literature.md``/``.csv``) and where SAISA's saving comes from
    (``saving_decomposition.*``, with measured prefill latencies from ``measured`` rows where they exist)."""
    from . import decomposition, literature

    out = Path(out_dir)
    table = literature.literature_table()
    files = [atomic_write_text(out / "literature.csv", table.to_csv(index=False)),
             atomic_write_text(out / "literature.md", "# The literature's efficiency claims, recomputed\n\n"
                               "Regenerate with `mllm-bench paper` (or print with `mllm-bench literature`).\n\n"
                               + literature.to_markdown(table))]
    return files + decomposition.write_decomposition(out, PAPER_LLMS, measured)


def tradeoff_assumptions(budget: pd.DataFrame, workload: Workload, vision: str = PAPER_VISION) -> str:
    """What the trade-off figure's axes are, in one paragraph (its footnote and the README's text)."""
    a = budget.attrs
    archs = list(dict.fromkeys(budget["arch"]))
    return (f"x: GPU-hours of the LLaVA-1.5 recipe (558K + 665K samples, one epoch) at {a['device'].upper()} dense "
            f"bf16 peak × {a['mfu'].describe(archs)}, FLOPs of {a['hours_scope']} scope, {a['hours_convention']} "
            f"attention; y: prefill FLOPs, {vision_preset(vision).tokens_per_image * workload.images_per_sample} "
            f"visual + {workload.num_text_tokens} text tokens, language scope, dense attention (the paper's "
            "convention); FLOP = 2·MAC")


def _component_workloads(rows: pd.DataFrame) -> str:
    """Each FLOPs-by-component panel's workload, as the plots' footnotes give it."""
    inf = rows[(rows["metric"] == "prefill_flops") & (rows["stage"] == "inference")]
    fin = rows[(rows["metric"] == "train_step_flops") & (rows["stage"] == "finetune")]
    return (f"prefill panel: {plots.panel_workload(inf)} (the paper's workload); training-step panel: "
            f"{plots.panel_workload(fin)} (one finetune sample of the budget recipe)")


def paper_readme(paper_conv: pd.DataFrame, total_eff: pd.DataFrame, budget: pd.DataFrame, budget_notes: list[str],
                 rows: pd.DataFrame, command: str, workload: Workload = PAPER_WORKLOAD,
                 vision: str = PAPER_VISION) -> str:
    saisa7 = paper_conv[(paper_conv["arch"] == "saisa") & (paper_conv["llm"] == "vicuna-7b")]
    headline = ""
    if len(saisa7):
        headline = (f"SAISA-7B needs {abs(saisa7['vs_llava'].iloc[0]) * 100:.1f}% fewer inference FLOPs than "
                    "LLaVA-1.5-7B under the paper's convention (paper: 66%).")
    a = budget.attrs
    archs = list(dict.fromkeys(budget["arch"]))
    mfu: train_cost.MFU = a["mfu"]
    measured = any(v != "given" for v in mfu.origin.values())
    paper_source = "counted" if paper_conv["tflops_counted"].notna().all() else "analytic where not counted"
    eff_source = "counted" if total_eff["tflops_counted"].notna().all() else "analytic only"
    budget_source = train_cost.flops_sources(budget)
    mfu_source = ("measured (see the notes under the table; a measurement with one LLM serves every LLM size)"
                  if measured else "assumed")
    return f"""# SAISA paper efficiency claims, recomputed

Regenerate with:

```bash
{command}
```

All FLOPs below come from the implementations in this repository, each table from its own source:

- Inference FLOPs, the paper's convention: **{paper_source}** with `torch.utils.flop_counter` on meta tensors
  (no weights allocated), cross-checked against the closed-form analytic model and the paper's formula.
- Inference FLOPs, total scope and effective attention: **{eff_source}** (closed-form model; the counter sees
  dense attention only, so no counted number exists for the effective convention).
- Training budget: FLOPs **{budget_source}** (total scope, effective attention); GPU-hours = FLOPs ÷ (peak × MFU)
  with {mfu.describe(archs)}, **{mfu_source}**. No training run was timed for this table.

{headline}

## Inference FLOPs, the paper's convention

One image (576 visual tokens, CLIP ViT-L/14 at 336 px) and 64 text tokens (32 before the image, 32 after);
language scope (connector + decoder; vision tower and lm_head not counted); dense attention (4·n_q·n_k·d per
layer, no causal discount); a multiply-add = 2 FLOPs. "Paper's formula" is the closed form of the SAISA
paper / ShortV (REFERENCE.md), computed independently of the models.

{inference_markdown(paper_conv, claim=True)}
## Inference FLOPs, total scope and effective attention

Same workload, counting the vision tower and lm_head too, and only the query–key pairs each mask allows
(causal halves self-attention; SAISA's visual tokens issue no queries; Flamingo's text attends only to the
latents of the preceding image).

{inference_markdown(total_eff, claim=False)}
## Training budget (LLaVA-1.5 recipe)

{train_cost.to_markdown(budget, budget_notes)}
## Trade-off

![training budget vs inference FLOPs](tradeoff.png)

Each point is one architecture at one LLM size (marker). Lower-left is better on both axes. Assumptions:
{tradeoff_assumptions(budget, workload, vision)}. The x axis inherits every assumption of the training budget
above (text lengths, one image per sample, no text-only samples, MFU); the y axis is the first table.

## FLOPs by component

`flops_by_component_vicuna-7b.png`, `flops_by_component_vicuna-13b.png` (total scope, effective attention). The
two panels use different workloads, as their footnotes say: {_component_workloads(rows)}.

## Assumptions

- Architectures: `llava` = LLaVA-1.5 (CLIP ViT-L/14-336 features from layer −2, CLS dropped, 2-layer GELU MLP);
  `flamingo` = Flamingo-style with OpenFlamingo's settings (Perceiver Resampler 64 latents, depth 6; gated
  cross-attention block before every 4th decoder layer; 8 heads × 64); `saisa` = SAISA (per-layer projector
  Linear(1024, h) → GELU → Linear(h, h); visual tokens are keys/values only).
- LLMs: Vicuna-7B v1.5 (h 4096, 32 layers, FFN 11008) and Vicuna-13B v1.5 (h 5120, 40 layers, FFN 13824).
- The 64 text tokens sit 32 before and 32 after the image: dense FLOPs do not depend on the split; effective
  ones do (text before the image sees no visual token).
- Training: what each stage trains is the architecture's own stage definition (LLaVA: projector | projector +
  LLM; SAISA: projectors | projectors + LLM; Flamingo: resampler + cross-attention in both stages, LLM frozen,
  as OpenFlamingo trains it); vision tower frozen and run forward; one epoch; batch 1 per sample (FLOPs are
  linear in batch; padding not modelled); every sample carries one image (the 665K mix's text-only samples are
  not modelled); optimizer-step FLOPs not counted.
- The budget compares the same recipe (same data, one epoch) for every architecture. Flamingo-style comes out
  cheapest per sample because its LLM stays frozen and its visual input is 64 latents; the paper's point that
  cross-attention alignment is "inefficient in training" is about the far larger data it needs to train its
  new parameters (OpenFlamingo used billions of tokens), which a per-recipe FLOPs count does not capture.
- GPU-hours assume {a['device'].upper()} dense bf16 peak and {mfu.describe(archs)} for both stages
  ({mfu_source}); the paper reports measured GPU-hours, so compare the reductions, not the hours.

## The literature, and where SAISA's saving comes from

`mllm-bench paper` also writes `literature.{{md,csv}}` — published efficiency claims (SAISA, ShortV, FastV, VTW,
the LLM-Viewer budgets, VisionZip) recomputed under the convention each paper used and under ours, with the gap
and its cause — and `saving_decomposition.{{md,csv}}` with a waterfall per LLM (`saving_decomposition_<llm>.png`):
LLaVA-1.5 → SAISA in steps (no visual–visual attention = NAAViT; no visual queries; no visual FFN; per-layer
projectors = SAISA).

## Files

- `inference_flops_paper.{{md,csv}}`, `inference_flops_total_effective.{{md,csv}}`, `train_budget.{{md,csv}}`
- `tradeoff.{{png,pdf}}`, `flops_by_component_*.{{png,pdf}}`
- `rows.csv`: every profiler row used (tidy: one metric per row, with source, scope, convention).

{environment_line(rows)}
"""
