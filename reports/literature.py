"""The literature's efficiency claims, recomputed: each published number under the convention its paper used,
beside mllm-bench's own counts, with the gap and its cause.

The claims are data (``literature_claims.csv`` beside this module, one citation per row). Each row names how
to recompute it (``compute``): ``prefill`` (an architecture's prefill FLOPs), ``ratio`` / ``saved`` (against a
baseline architecture), ``shortv-on-next`` (ShortV's wiring on LLaVA-NeXT's tokens, which no architecture
here implements), ``calflops-reading`` (a claim whose calflops settings were not published: the reading that
matches is computed and labelled as a reading) or ``measured`` (a time: not reproducible from FLOPs, kept
with the reason). A ``reading`` names an alternative count that explains a gap.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

import pandas as pd

from mllm_bench.config import ConfigError
from mllm_bench.conventions import PUBLISHED, published
from mllm_bench.costmodel import CostBreakdown, CostModel
from mllm_bench.model import MLLM
from mllm_bench.registry import build_model
from mllm_bench.workload import Workload

CLAIMS_FILE = Path(__file__).with_name("literature_claims.csv")
VISION = "clip-vit-l-336"
COMPUTE = ("prefill", "ratio", "saved", "shortv-on-next", "calflops-reading", "measured")
READINGS = ("next-2880-decoder", "calflops-linear")
UNITS = ("TFLOPs", "% saved vs LLaVA-1.5", "% of LLaVA-1.5", "× faster prefill (measured)")
SHORT_UNIT = dict(zip(UNITS, ("TFLOPs", "% saved", "% of base", "× (time)"), strict=True))
PUBLISHED_VISUAL_TOKENS_NEXT = 2880  # "5 × 576": LLaVA-NeXT's count in papers, image_newline tokens ignored


@dataclass(frozen=True)
class Claim:
    """One published efficiency figure and how to recompute it (columns of ``literature_claims.csv``)."""

    id: str
    paper: str
    source: str
    model: str
    method: str
    setting: str
    published: float
    unit: str
    convention: str
    compute: str
    arch: str
    options: str
    baseline: str
    llm: str
    text_before: str
    text_after: str
    image_sizes: str
    reading: str
    cause: str

    @property
    def workload(self) -> Workload:
        sizes = None
        if self.image_sizes:
            w, h = (int(x) for x in self.image_sizes.split("x"))
            sizes = ((h, w),)
        return Workload(batch_size=1, images_per_sample=1, text_before=int(self.text_before),
                        text_after=int(self.text_after), image_sizes=sizes)

    @property
    def option_dict(self) -> dict | None:
        return json.loads(self.options) if self.options else None


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    """The claims file, checked row by row (a clear error names the file, row and field)."""
    names = [f.name for f in fields(Claim)]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = sorted(set(names) - set(reader.fieldnames or ()))
            if missing:
                raise ConfigError(f"{path}: missing column(s) {missing}; columns are {names}")
            rows = list(reader)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the claims file ({err.strerror})") from err
    claims = []
    for i, row in enumerate(rows, start=2):
        where = f"{path}, line {i} ({row.get('id') or 'no id'})"
        try:
            value = float(row["published"])
        except ValueError as err:
            raise ConfigError(f"{where}: published must be a number, got {row['published']!r}") from err
        for field, allowed in (("compute", COMPUTE), ("unit", UNITS)):
            if row[field] not in allowed:
                raise ConfigError(f"{where}: {field} must be one of {list(allowed)}, got {row[field]!r}")
        if row["reading"] and row["reading"] not in READINGS:
            raise ConfigError(f"{where}: reading must be empty or one of {list(READINGS)}, got {row['reading']!r}")
        if row["compute"] in ("prefill", "ratio", "saved", "shortv-on-next") and row["convention"] not in PUBLISHED:
            raise ConfigError(f"{where}: convention must be one of {list(PUBLISHED)} to recompute, "
                              f"got {row['convention']!r}")
        if not row["source"].strip():
            raise ConfigError(f"{where}: every claim needs a source")
        claims.append(Claim(**{**{n: row[n] for n in names}, "published": value}))
    return claims


@cache
def _model(arch: str, llm: str, options: str) -> MLLM:
    return build_model(arch, llm, VISION, json.loads(options) if options else None, device="meta")


@dataclass(frozen=True)
class Counts:
    """One claim's quantity, in FLOPs (or a ratio): under the claim's convention and under mllm-bench's own."""

    theirs: float
    dense_language: float
    effective_total: float


def _counts(cost: CostBreakdown, model: MLLM, convention: str) -> Counts:
    """Prefill FLOPs under ``convention`` (NaN when it is no published convention) and under ours."""
    theirs = PUBLISHED[convention].flops(cost, model.llm_config, "prefill") if convention in PUBLISHED else math.nan
    return Counts(theirs, cost.flops("prefill", "dense", "language"), cost.flops("prefill", "effective", "total"))


def _prefill(claim: Claim, arch: str | None = None, options: str | None = None) -> Counts:
    model = _model(arch or claim.arch, claim.llm, claim.options if options is None else options)
    return _counts(model.analytic_cost(claim.workload), model, claim.convention)


def _shortv_on_next(claim: Claim, tokens: int | None = None, connector: bool = True) -> Counts:
    """ShortV's wiring (visual rows key/value-only in its published layers) on LLaVA-NeXT's visual tokens, with
    LLaVA-NeXT's tower, connector and lm_head; ``tokens`` overrides the token count, ``connector`` False leaves
    the tower and connector out."""
    next_model = _model(claim.arch, claim.llm, claim.options)
    workload = claim.workload
    count = tokens if tokens is not None else sum(next_model.visual_tokens_per_image(workload))
    frozen = _model("shortv", claim.llm, "").frozen_layers
    cm = CostModel(next_model.llm_config, workload, count)
    cm.key_value_visual_decoder([i in frozen for i in range(next_model.llm_config.num_layers)])
    cm.lm_head()
    cost = cm.result()
    if connector:
        cost.terms += [t for t in next_model.analytic_cost(workload).terms
                       if t.component in ("vision", "connector") and t.phase == "prefill"]
    return _counts(cost, next_model, claim.convention)


def _next_decoder_at_2880(claim: Claim) -> float:
    """The decoder alone at the papers' 2,880 LLaVA-NeXT tokens, under the claim's convention."""
    if claim.compute == "shortv-on-next":
        return _shortv_on_next(claim, PUBLISHED_VISUAL_TOKENS_NEXT, connector=False).theirs
    model = _model(claim.arch, claim.llm, claim.options)
    cm = CostModel(model.llm_config, claim.workload, PUBLISHED_VISUAL_TOKENS_NEXT)
    cm.spliced_decoder()
    return published(claim.convention).flops(cm.result(), model.llm_config, "prefill")


def calflops_linear(claim: Claim) -> float:
    """Every linear layer of the LLM (the lm_head on every prompt position) plus the connector, 2 FLOPs per
    multiply-add; no attention scores, no vision tower."""
    model = _model(claim.arch, claim.llm, claim.options)
    cost = model.analytic_cost(claim.workload)
    positions = claim.workload.num_text_tokens + sum(model.visual_tokens_per_image(claim.workload))
    linears = sum(cost.flops("prefill", component=c) for c in ("attn_proj", "ffn", "connector"))
    return linears + 2.0 * positions * model.llm_config.hidden_size * model.llm_config.vocab_size


READING_TEXT = {
    "next-2880-decoder": "decoder only at 2,880 visual tokens",
    "calflops-linear": "LLM linears + lm_head on every position + projector, no attention, no tower",
}


def _in_unit(claim: Claim, value: float, base: float | None = None) -> float:
    if claim.unit == "TFLOPs":
        return value / 1e12
    if claim.unit == "% of LLaVA-1.5":
        return 100 * value / base
    if claim.unit == "% saved vs LLaVA-1.5":
        return 100 * (1 - value / base)
    return math.nan


def recompute(claim: Claim) -> dict:
    """One table row: the claim, its recomputation under its convention, ours, the gap and its cause."""
    counts, base = Counts(math.nan, math.nan, math.nan), Counts(1.0, 1.0, 1.0)
    reading = math.nan
    if claim.compute in ("prefill", "ratio", "saved", "calflops-reading"):  # calflops: no convention, a reading
        counts = _prefill(claim)
        if claim.compute in ("ratio", "saved"):
            base = _prefill(claim, claim.baseline, "")
    elif claim.compute == "shortv-on-next":
        counts = _shortv_on_next(claim)
    if claim.reading == "next-2880-decoder":
        reading = _in_unit(claim, _next_decoder_at_2880(claim))
    elif claim.reading == "calflops-linear":
        reading = _in_unit(claim, calflops_linear(claim))
    theirs = _in_unit(claim, counts.theirs, base.theirs)
    gap = theirs - claim.published
    return {
        "id": claim.id, "paper": claim.paper, "model": claim.model, "method": claim.method,
        "setting": claim.setting, "published": claim.published, "unit": claim.unit, "convention": claim.convention,
        "recomputed": theirs, "ours_dense_language": _in_unit(claim, counts.dense_language, base.dense_language),
        "ours_effective_total": _in_unit(claim, counts.effective_total, base.effective_total),
        "gap": gap, "gap_relative": gap / claim.published if claim.published else math.nan,
        "reading": READING_TEXT.get(claim.reading, ""), "reading_value": reading,
        "reproduced": _reproduced(claim, theirs, reading), "cause": claim.cause, "source": claim.source,
    }


def _reproduced(claim: Claim, theirs: float, reading: float) -> str:
    """``yes`` when the recomputation rounds to the published figure at its precision; ``reading`` when only the
    named reading does; ``no`` otherwise; ``n/a`` for what FLOPs cannot reproduce (a measured time)."""
    if claim.compute == "measured":
        return "n/a"
    text = f"{claim.published:g}"
    digits = len(text.split(".")[1]) if "." in text else 0
    half = 0.5 * 10 ** -digits
    if not math.isnan(theirs) and abs(theirs - claim.published) <= half + 1e-9:
        return "yes"
    if not math.isnan(reading) and abs(reading - claim.published) <= half + 1e-9:
        return "reading"
    return "no"


def literature_table(claims: list[Claim] | None = None) -> pd.DataFrame:
    return pd.DataFrame.from_records([recompute(c) for c in (claims if claims is not None else load_claims())])


def fmt(x: float) -> str:
    return "—" if isinstance(x, float) and math.isnan(x) else f"{x:.3f}"


def to_markdown(table: pd.DataFrame) -> str:
    """The table, then the conventions it uses and how to read it."""
    head = ("| paper | model | method | setting | published | convention | recomputed (its convention) | "
            "ours: dense, language | ours: effective, total | gap | reproduced | cause | source |")
    lines = [head, "|" + "|".join([":---"] * 4 + ["---:", ":---", "---:", "---:", "---:", "---:", ":---", ":---",
                                                   ":---"]) + "|"]
    for _, r in table.iterrows():
        gap = "—" if math.isnan(r["gap"]) else f"{r['gap']:+.3f} ({r['gap_relative'] * 100:+.1f}%)"
        cause = r["cause"]
        if r["reading"]:
            cause += f" Reading — {r['reading']}: {fmt(r['reading_value'])}."
        lines.append(f"| {r['paper']} | {r['model']} | {r['method']} | {r['setting']} | {r['published']:g} "
                     f"{r['unit']} | {r['convention']} | {fmt(r['recomputed'])} | {fmt(r['ours_dense_language'])} | "
                     f"{fmt(r['ours_effective_total'])} | {gap} | {r['reproduced']} | {cause} | {r['source']} |")
    notes = ["", "Values are in each row's unit. `recomputed` applies the row's convention to mllm-bench's exact "
             "analytic breakdown of the same model and workload; `ours` are mllm-bench's own conventions (2 FLOPs "
             "per multiply-add; dense = every query-key pair, language = connector + decoder; effective = the "
             "pairs the mask allows, total = + vision tower + lm_head). `gap` = recomputed − published. "
             "`reproduced`: yes when the recomputation rounds to the published figure at its precision, "
             "reading when only the named reading does.", "", "Conventions:", ""]
    notes += [f"- {c.describe()}" for c in PUBLISHED.values()]
    return "\n".join(lines + notes) + "\n"


def conventions_table() -> pd.DataFrame:
    """One row per published convention: name, source, formula, scope, what it counts and leaves out."""
    return pd.DataFrame.from_records([
        {"convention": c.name, "title": c.title, "source": c.source, "formula": c.formula, "scope": c.scope,
         "multiply_add": c.multiply_add, "counts": c.counts, "leaves_out": c.leaves_out}
        for c in PUBLISHED.values()])
