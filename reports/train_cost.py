"""Training-budget model: the LLaVA-1.5 two-stage recipe applied to each architecture.

GPU-hours of a stage = samples × training-step FLOPs per sample ÷ (device peak × MFU) ÷ 3600, with the
per-sample FLOPs from the profiler (forward + backward, weight gradients only where that stage trains).
The recipe (REFERENCE.md): stage 1 ``pretrain`` on 558K image–caption pairs, stage 2 ``finetune`` on
665K instruction conversations, one epoch each; what each stage trains is the architecture's own
``trainable_parameters(stage)`` (LLaVA: projector | projector + LLM; SAISA: per-layer projectors |
projectors + LLM; Flamingo: resampler + cross-attention, plus the LLM in finetune only if asked).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from mllm_bench.config import ConfigError
from mllm_bench.presets import vision_preset
from mllm_bench.workload import Workload

from .rows import normalise, pick

# The SAISA paper's claim (arXiv 2502.02458, abstract): training budget (GPU hours) −26% vs LLaVA-1.5.
PAPER_TRAINING_REDUCTION = 0.26
# LLaVA-1.5's reported wall-clock on 8×A100 (haotian-liu/LLaVA README): stage 1, stage 2, in hours.
LLAVA_REPORTED_HOURS = {"vicuna-7b": (3.5, 10.0), "vicuna-13b": (5.5, 20.0)}
LLAVA_REPORTED_GPUS = 8
LLAVA_REPORTED_DEVICE = "a100"

# Dense bf16 peaks (REFERENCE.md; torchtitan's table); the profiler's device table wins where it has one.
DEVICE_PEAKS = {"a100": 312e12, "h100": 989e12, "h100-pcie": 756e12, "h200": 989e12}


def peak_flops(device: str) -> float:
    """Dense bf16 peak FLOP/s of ``device`` (a100, h100, h100-pcie, h200)."""
    key = device.lower()
    if key not in DEVICE_PEAKS:
        raise ConfigError(f"unknown device {device!r} for peak FLOP/s; choose one of {sorted(DEVICE_PEAKS)}")
    try:
        from mllm_bench.devices import peak_flops as device_table
    except ImportError:
        return DEVICE_PEAKS[key]
    return device_table(key.replace("-", " "), "bfloat16") or DEVICE_PEAKS[key]


@dataclass(frozen=True)
class StageRecipe:
    """One training stage: how many samples, one image each, and the text around it (tokens)."""

    stage: str
    samples: int
    text_before: int
    text_after: int
    data: str = ""

    def workload(self, dtype: str = "bfloat16") -> Workload:
        return Workload(batch_size=1, images_per_sample=1, text_before=self.text_before, text_after=self.text_after,
                        dtype=dtype, device="meta", stage=self.stage)


def llava15_recipe(pretrain_text: tuple[int, int] = (1, 32), finetune_text: tuple[int, int] = (40, 216),
                   pretrain_samples: int = 558_000, finetune_samples: int = 665_000) -> tuple[StageRecipe, ...]:
    """LLaVA-1.5's two stages. Text lengths (before, after the image) are assumptions, see the defaults' notes.

    Defaults: pretrain = BOS + a short caption (LLaVA's ``plain`` template; BLIP captions are ~10–20 tokens,
    rounded up to 32); finetune = the v1 system prompt and ``USER:`` before the image (~40 tokens) and
    216 tokens of conversation after it (256 text tokens in all).
    """
    for name, value in (("pretrain_samples", pretrain_samples), ("finetune_samples", finetune_samples)):
        if value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    return (
        StageRecipe("pretrain", pretrain_samples, *pretrain_text, "LCS-558K image–caption pairs"),
        StageRecipe("finetune", finetune_samples, *finetune_text, "LLaVA-1.5 mix 665K instruction conversations"),
    )


ProfileFn = Callable[..., pd.DataFrame]


def train_cost(
    archs: Sequence[str], profile_fn: ProfileFn, recipe: Sequence[StageRecipe], llm: str = "vicuna-7b",
    vision: str = "clip-vit-l-336", options: dict[str, dict] | None = None, device: str = "a100",
    mfu: float = 0.4, scope: str = "total", convention: str = "effective", baseline: str = "llava",
    on_step: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(budget table, the profiler's rows used). The table has one row per (arch, stage) plus a ``total``."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu must be in (0, 1], got {mfu}")
    if baseline not in archs:
        raise ConfigError(f"baseline {baseline!r} is not among the architectures {list(archs)}")
    peak = peak_flops(device)
    options = options or {}
    records, used = [], []
    for arch in archs:
        for st in recipe:
            rows = normalise(profile_fn(arch, st.workload(), llm=llm, vision=vision, options=options.get(arch),
                                        measure="never"))
            used.append(rows)
            got = pick(rows, "train_step_flops", stage=st.stage, scope=scope, convention=convention)
            if got.empty:
                raise ConfigError(f"the profiler gave no train_step_flops for {arch} stage {st.stage} "
                                  f"(scope {scope}, convention {convention})")
            per_sample = float(got["value"].iloc[0]) / st.workload().batch_size
            flops = per_sample * st.samples
            records.append({"arch": arch, "llm": llm, "vision": vision, "stage": st.stage, "samples": st.samples,
                            "text_tokens": st.text_before + st.text_after, "flops_per_sample": per_sample,
                            "flops": flops, "gpu_hours": flops / (peak * mfu) / 3600})
            if on_step:
                on_step(f"{arch} {st.stage}")
    table = pd.DataFrame.from_records(records)
    sums = ["samples", "flops", "gpu_hours"]
    totals = table.groupby(["arch", "llm", "vision"], sort=False, as_index=False)[sums].sum()
    totals = totals.assign(stage="total", text_tokens=math.nan, flops_per_sample=math.nan)
    table = pd.concat([table, totals[table.columns]], ignore_index=True)
    base = table[table["arch"] == baseline].set_index("stage")["gpu_hours"]
    table["vs_baseline"] = [
        math.nan if a == baseline else h / base[s] - 1 for a, s, h in zip(table["arch"], table["stage"],
                                                                         table["gpu_hours"], strict=True)
    ]
    table.attrs.update(device=device, peak=peak, mfu=mfu, scope=scope, convention=convention, baseline=baseline)
    return table, pd.concat(used, ignore_index=True)


def implied_mfu(table: pd.DataFrame, llm: str) -> dict[str, float]:
    """The MFU at which LLaVA-1.5's reported 8×A100 hours match our FLOPs, per stage (empty if unknown)."""
    if llm not in LLAVA_REPORTED_HOURS:
        return {}
    hours = dict(zip(("pretrain", "finetune"), LLAVA_REPORTED_HOURS[llm], strict=True))
    peak = DEVICE_PEAKS[LLAVA_REPORTED_DEVICE]
    out = {}
    for stage, h in hours.items():
        sel = table[(table["arch"] == "llava") & (table["stage"] == stage)]
        if len(sel):
            out[stage] = float(sel["flops"].iloc[0]) / (h * 3600 * LLAVA_REPORTED_GPUS * peak)
    return out


def to_markdown(table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The budget table as Markdown, with the reduction vs the baseline and vs the paper's claim."""
    baseline = table.attrs.get("baseline", "llava")
    lines = ["| LLM | architecture | stage | samples | text tokens | TFLOP / sample | total EFLOP | GPU-hours | "
             f"vs {baseline} |", "|:---|:---|:---|---:|---:|---:|---:|---:|---:|"]
    for _, r in table.iterrows():
        change = "—" if math.isnan(r["vs_baseline"]) else f"{r['vs_baseline'] * 100:+.1f}%".replace("-", "−")
        tokens = "" if math.isnan(r["text_tokens"]) else f"{r['text_tokens']:.0f}"
        per = "" if math.isnan(r["flops_per_sample"]) else f"{r['flops_per_sample'] / 1e12:.2f}"
        stage = f"**{r['stage']}**" if r["stage"] == "total" else r["stage"]
        lines.append(f"| {r['llm']} | {r['arch']} | {stage} | {r['samples']:,.0f} | {tokens} | {per} | "
                     f"{r['flops'] / 1e18:.2f} | {r['gpu_hours']:,.1f} | {change} |")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def budget_notes(table: pd.DataFrame, recipe: Sequence[StageRecipe],
                 break_even: dict[str, int | None] | None = None) -> list[str]:
    """The assumptions and the comparison with the paper's −26%, in plain words.

    ``break_even`` maps an LLM to the finetune text length (tokens after the image) at which SAISA's
    FLOPs reduction falls to the paper's 26% (None: not within the context window).
    """
    a = table.attrs
    notes = [
        "FLOPs: one multiply-add = 2 FLOPs; training step = forward + backward (weight gradients only for the "
        "stage's trainable parameters, activation gradients wherever a trainable parameter lies upstream).",
        f"Scope {a['scope']}, attention convention {a['convention']}; one image (576 visual tokens) per sample, "
        "batch 1 (FLOPs scale linearly with batch; padding ignored); optimizer step FLOPs not counted.",
        f"GPU-hours = FLOPs ÷ ({a['device']} dense bf16 peak {a['peak'] / 1e12:.0f} TFLOP/s × MFU {a['mfu']:.2f})"
        " ÷ 3600.",
    ]
    for st in recipe:
        notes.append(f"Stage {st.stage}: {st.samples:,} samples ({st.data}); text: {st.text_before} token(s) before "
                     f"the image and {st.text_after} after (assumption; set with --{st.stage}-text BEFORE,AFTER).")
    ours_all = {}
    for llm in dict.fromkeys(table["llm"]):
        sub = table[table["llm"] == llm]
        total = sub[sub["stage"] == "total"].set_index("arch")
        if "saisa" in total.index and "llava" in total.index:
            ours_all[llm] = 1 - total.loc["saisa", "gpu_hours"] / total.loc["llava", "gpu_hours"]
            notes.append(f"{llm}: SAISA's training budget is {ours_all[llm] * 100:.0f}% below LLaVA-1.5's by FLOPs; "
                         f"the paper reports {PAPER_TRAINING_REDUCTION * 100:.0f}% (measured GPU-hours).")
        if break_even and llm in break_even:
            tokens = break_even[llm]
            notes.append(f"{llm}: the FLOPs reduction falls to 26% only if a finetune sample carried "
                         + (f"~{tokens:,} text tokens after the image (instead of the assumed ones)." if tokens
                            else "more text than the context window holds."))
        mfus = implied_mfu(sub, llm)
        if mfus:
            notes.append(f"{llm}: LLaVA-1.5's reported 8×A100 hours ({LLAVA_REPORTED_HOURS[llm][0]} h + "
                         f"{LLAVA_REPORTED_HOURS[llm][1]} h) imply MFU " +
                         ", ".join(f"{s} {v * 100:.0f}%" for s, v in mfus.items()) + " under these FLOPs.")
    if ours_all:
        notes.append("Why FLOPs and the paper differ:" + gap_explanation(sum(ours_all.values()) / len(ours_all)))
    return notes


def finetune_text_for_reduction(
    profile_fn: ProfileFn, recipe: Sequence[StageRecipe], llm: str, vision: str = "clip-vit-l-336",
    target: float = PAPER_TRAINING_REDUCTION, scope: str = "total", convention: str = "effective",
    arch: str = "saisa", baseline: str = "llava", max_tokens: int = 4096,
) -> int | None:
    """Finetune text tokens after the image at which ``arch``'s total FLOPs reduction vs ``baseline`` is
    ``target`` (bisection on the analytic model; None if not reached below ``max_tokens`` in all)."""
    stages = {st.stage: st for st in recipe}

    def flops(a: str, st: StageRecipe) -> float:
        rows = normalise(profile_fn(a, st.workload(), llm=llm, vision=vision, options=None, measure="never",
                                    count=False))
        return float(pick(rows, "train_step_flops", ("analytic",), stage=st.stage, scope=scope,
                          convention=convention)["value"].iloc[0]) * st.samples

    pre = {a: flops(a, stages["pretrain"]) for a in (arch, baseline)}

    def reduction(after: int) -> float:
        st = dataclasses.replace(stages["finetune"], text_after=after)
        return 1 - (pre[arch] + flops(arch, st)) / (pre[baseline] + flops(baseline, st))

    lo, hi = 1, max(max_tokens - stages["finetune"].text_before - vision_preset(vision).tokens_per_image, 2)
    if reduction(hi) > target:
        return None
    while hi - lo > 8:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if reduction(mid) > target else (lo, mid)
    return hi


def gap_explanation(ours: float) -> str:
    if abs(ours - PAPER_TRAINING_REDUCTION) < 0.05:
        return " the two agree within 5 points."
    if ours > PAPER_TRAINING_REDUCTION:
        return (" FLOPs overstate the saving in wall-clock terms. A measured budget also pays for what FLOPs do not"
                " see and SAISA does not shrink: data loading and image preprocessing, the optimizer step over the"
                " trained weights (SAISA's per-layer projectors add ~0.67B parameters at 7B; in finetune both"
                " models update the whole LLM), gradient all-reduce/ZeRO communication, and kernels that run"
                " further from peak on SAISA's shorter text-only sequences and many small projector GEMMs. The"
                " text length is the largest modelling assumption: longer conversations shrink the visual share"
                " of the work, and with it the saving (see the break-even length above).")
    return (" FLOPs understate the saving; a measured budget can also gain from memory (shorter sequences allow"
            " larger micro-batches) that a FLOPs model does not capture.")


def to_latex(table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The budget table as a booktabs tabular, the notes as comments."""
    from .tables import latex_escape

    baseline = table.attrs.get("baseline", "llava")
    lines = [f"% {latex_escape(n)}" for n in notes]
    lines += [r"\begin{tabular}{lllrrrr}", r"\toprule",
              rf"LLM & architecture & stage & samples & TFLOP/sample & GPU-hours & vs {baseline} \\", r"\midrule"]
    for _, r in table.iterrows():
        change = "--" if math.isnan(r["vs_baseline"]) else f"{r['vs_baseline'] * 100:+.1f}\\%"
        per = "" if math.isnan(r["flops_per_sample"]) else f"{r['flops_per_sample'] / 1e12:.2f}"
        lines.append(f"{r['llm']} & {r['arch']} & {r['stage']} & {r['samples']:,.0f} & {per} & "
                     f"{r['gpu_hours']:,.1f} & {change} \\\\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
