"""Picking values out of the profiler's tidy result rows, and formatting them for people.

A result frame holds one metric per row (see README, "Result rows"). Reports ask for one number per
model and quantity, e.g. "counted prefill FLOPs, language scope, dense attention"; :func:`pick` finds it,
tolerating rows that leave a field blank ("" = not applicable) and preferring aggregate rows
(component/role ``all``) and the more trustworthy source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mllm_bench.config import ConfigError
from mllm_bench.conventions import is_published, published
from mllm_bench.results import normalise as normalise
from mllm_bench.schema import IDENTITY as IDENTITY  # the core ones, re-exported for the reports
from mllm_bench.schema import MEASURE, WORKLOAD

SOURCE_ORDER: tuple[str, ...] = ("counted", "analytic", "measured")


def _blank_as(value: object) -> object:
    """A key part that equals itself: NaN (a missing field) as None, as pandas' ``duplicated`` treats it."""
    return None if isinstance(value, float) and math.isnan(value) else value


def pick(
    df: pd.DataFrame,
    metric: str,
    sources: Sequence[str] = SOURCE_ORDER,
    by: Sequence[str] = IDENTITY,
    **where: str | Sequence[str],
) -> pd.DataFrame:
    """One row per model (``by`` columns) for ``metric``, matching ``where``.

    A ``where`` value matches rows equal to it, or blank ("" = the field does not apply to that row);
    exact matches win. Among what is left, ``component``/``role`` ``all`` win over breakdown rows, then
    the first source in ``sources``. The rows come in rank order (ties in frame order), with ``df``'s index.

    Works on the matching rows' values as plain Python (a report asks for dozens of quantities, each a
    few rows; pandas' per-call overhead would dominate).
    """
    positions = np.flatnonzero(df["metric"].to_numpy() == metric)
    column = {c: df[c].to_numpy()[positions].tolist() for c in {"source", *where, "component", "role", *by}
              if c in df.columns}
    order = {v: i for i, v in enumerate(sources)}
    keep = [i for i, v in enumerate(column["source"]) if v in order]
    rank = dict.fromkeys(keep, 0.0)
    for col, wanted in where.items():
        if col not in column:
            continue
        allowed = {wanted, ""} if isinstance(wanted, str) else {*wanted, ""}
        keep = [i for i in keep if column[col][i] in allowed]
        for i in keep:
            rank[i] += 100.0 * (column[col][i] == "")
    for col in ("component", "role"):
        if col not in where and col in column:
            for i in keep:
                rank[i] += 10.0 * {"all": 0, "": 1}.get(column[col][i], 2)
    for i in keep:
        rank[i] += order[column["source"][i]]
    keep.sort(key=rank.__getitem__)  # stable: equal ranks keep the frame's order
    keys = [tuple(_blank_as(column[c][i]) for c in by) for i in keep]
    if len(set(zip(keys, (rank[i] for i in keep), strict=True))) < len(keep):  # two rows rank first together?
        ranked = df.iloc[positions[keep]].assign(_rank=[rank[i] for i in keep])
        best = ranked[ranked["_rank"] == ranked.groupby(list(by), dropna=False)["_rank"].transform("min")]
        _refuse_ties(best, metric, by)
    first: dict[tuple, int] = {}
    for k, i in zip(keys, keep, strict=True):
        first.setdefault(k, i)
    return df.iloc[positions[list(first.values())]]


def _refuse_ties(best: pd.DataFrame, metric: str, by: Sequence[str]) -> None:
    """Rows that rank first together for one model must agree: which one would be "the" number otherwise?"""
    tied = best[best.duplicated(list(by), keep=False)]  # only models with more than one first-ranked row
    for key, group in tied.groupby(list(by), sort=False, dropna=False):
        if not _same_values(group["value"]):
            differ = [c for c in (*MEASURE, *WORKLOAD) if c != "value" and c in group.columns
                      and group[c].map(field_text).nunique() > 1]
            values = ", ".join(f"{v:g}" for v in group["value"])
            raise ConfigError(f"{metric} of {' '.join(str(k) for k in key if k)}: {len(group)} rows qualify with "
                              f"different values ({values}); they differ in {differ or 'nothing but the value'}")


def _same_values(values: pd.Series) -> bool:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if len(finite) not in (0, len(values)):
        return False
    return all(math.isclose(v, finite[0], rel_tol=1e-9, abs_tol=0.0) for v in finite)


def field_text(value: object) -> str:
    """A field as text for comparing rows: "" when blank (None, NaN, ""), whole numbers without ".0"."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(float(value))
    return str(value).strip()


# ----- one workload per table ------------------------------------------------------------------------
# Workload fields every model of one table shares; ``visual_tokens`` (tokens per image differ by
# architecture) and ``context_len`` (set on decode rows) are compared within one model only.
SHARED_WORKLOAD = tuple(c for c in WORKLOAD if c not in ("visual_tokens", "context_len"))
MODEL_WORKLOAD = ("visual_tokens", "context_len")
# The fields that make two rows "the same number": a second row with this key repeats or contradicts it.
ROW_KEY: tuple[str, ...] = IDENTITY + tuple(c for c in MEASURE if c != "value") + WORKLOAD


def _workload_text(df: pd.DataFrame, col: str) -> pd.Series:
    text = df[col].map(field_text)
    return text.where(text != "meta", "") if col == "device" else text  # meta: counted, not run on a device


def varying_workload(df: pd.DataFrame, over: Sequence[str] = ()) -> dict[str, list[str]]:
    """Workload fields with more than one value among rows that one table would mix: the rows of a stage
    (and of one model, for :data:`MODEL_WORKLOAD`), grouped further by the ``over`` fields (e.g. the field
    a plot varies). Blank values are ignored. Returns field → its values, sorted."""
    out: dict[str, list[str]] = {}
    for col in SHARED_WORKLOAD + MODEL_WORKLOAD:
        if col not in df.columns or col in over:
            continue
        keys = ["stage", *over] + (list(IDENTITY) if col in MODEL_WORKLOAD else [])
        text = _workload_text(df, col)
        filled = df[keys].astype(str).assign(_v=text)[text != ""]
        counts = filled.groupby(keys)["_v"].nunique()
        if (counts > 1).any():
            out[col] = sorted(set(filled["_v"]), key=_number_first)
    return out


def _number_first(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def workloads(df: pd.DataFrame, fields: Sequence[str], limit: int = 6) -> list[str]:
    """The distinct combinations of ``fields`` in ``df`` as ``a=1 b=2`` (at most ``limit``, then "…")."""
    text = pd.DataFrame({c: _workload_text(df, c) for c in fields})
    combos = sorted({tuple(r) for r in text.itertuples(index=False, name=None)},
                    key=lambda r: tuple(_number_first(v) for v in r))
    shown = [" ".join(f"{c}={v}" for c, v in zip(fields, combo, strict=True) if v) for combo in combos[:limit]]
    return shown + (["…"] if len(combos) > limit else [])


def drop_repeated_rows(df: pd.DataFrame, origin: Sequence[str] | None = None) -> pd.DataFrame:
    """``df`` without rows that repeat another (same :data:`ROW_KEY`, same value; e.g. two runs of the same
    analytic model). Rows with the same key and different values are never resolved silently: a
    :class:`ConfigError` names the metric and where each value comes from (``origin``: a label per row,
    e.g. its file) with its timestamp."""
    if df.empty:
        return df
    df = df.reset_index(drop=True)
    origin = list(origin) if origin is not None else [""] * len(df)
    key = df[[c for c in ROW_KEY if c in df.columns]].map(field_text)
    group = pd.Series(key.groupby(list(key.columns), sort=False).ngroup().to_numpy())
    repeated = group[group.duplicated(keep=False)]
    conflicts = [members.index.to_numpy() for _, members in repeated.groupby(repeated, sort=False)
                 if not _same_values(df["value"].iloc[members.index])]
    if conflicts:
        raise ConfigError(_conflict_message(df, origin, conflicts))
    return df.loc[~group.duplicated().to_numpy()].reset_index(drop=True)


def _conflict_message(df: pd.DataFrame, origin: list[str], conflicts: list) -> str:
    members = conflicts[0]
    row = df.iloc[members[0]]
    shown = ("llm", "vision", "options", "source", "stage", "phase", "scope", "convention", "component", "role")
    what = ", ".join(f"{c} {field_text(row[c])}" for c in shown if field_text(row[c]) not in ("", "all"))
    stamps = df["timestamp"] if "timestamp" in df.columns else pd.Series([""] * len(df))
    seen = []
    for i in members:
        where = " ".join(p for p in (origin[i], f"(timestamp {stamps.iloc[i]})" if stamps.iloc[i] else "") if p)
        seen.append(f"{df['value'].iloc[i]:g}{' from ' + where if where else ''}")
    more = f"; {len(conflicts) - 1} more number(s) conflict likewise" if len(conflicts) > 1 else ""
    return (f"conflicting rows: {row['arch']} {row['metric']} ({what}) is {'; '.join(seen)}{more}. The rows come "
            "from different runs (other code, device or settings); a table needs one value")


def model_labels(df: pd.DataFrame) -> dict[tuple, str]:
    """A short unique label per model: the arch, plus the LLM/vision/options only where needed to tell
    two models of the same arch apart (options are listed in the notes instead; see :func:`options_line`)."""
    keys = list(df[list(IDENTITY)].drop_duplicates().itertuples(index=False, name=None))
    labels = {}
    for key in keys:
        same = [k for k in keys if k[0] == key[0]]
        varying = [i for i in range(1, len(IDENTITY)) if len({k[i] for k in same}) > 1]
        extra = [key[i] or "defaults" for i in varying]
        labels[key] = key[0] + (f" ({', '.join(extra)})" if extra else "")
    return labels


def options_line(df: pd.DataFrame) -> str:
    """Non-default architecture options of the models in ``df`` ("" if none)."""
    pairs = sorted({(a, o) for a, o in zip(df["arch"], df["options"], strict=True) if o})
    return "Options: " + "; ".join(f"{a} {o}" for a, o in pairs) + "." if pairs else ""


# ----- formatting ------------------------------------------------------------------------------------
_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
_BINARY = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))
_SECONDS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"))


def scale_for(unit: str, values: Iterable[float]) -> tuple[float, str]:
    """The divisor and display unit that suit the largest of ``values`` (one scale per table row)."""
    finite = [abs(v) for v in values if v is not None and not math.isnan(v)]
    top = max(finite, default=0.0)
    if unit == "bytes":
        table = _BINARY
    elif unit == "s":
        table = _SECONDS
    elif unit == "ratio":
        return 0.01, "%"
    elif unit == "tokens":
        return 1.0, "tokens"
    else:
        base = {"FLOP": "FLOP", "FLOP/s": "FLOP/s", "params": "", "tokens/s": "tok/s"}.get(unit, unit)
        table = tuple((d, f"{p}{base}" if base else (p or "#")) for d, p in _PREFIXES)
    for divisor, name in table:
        if top >= divisor:
            return divisor, name
    return table[-1]


def fmt_number(value: float, divisor: float = 1.0) -> str:
    """Three significant figures or more, never scientific notation."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    x = value / divisor
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}"
    if abs(x) >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_change(fraction: float) -> str:
    """A relative change as a signed percentage (−66.2%), "—" when undefined."""
    if fraction is None or math.isnan(fraction):
        return "—"
    return f"{fraction * 100:+.1f}%".replace("-", "−")


# ----- conventions and environment -------------------------------------------------------------------
SCOPE_TEXT = {
    "language": "language (connector + decoder; vision tower and lm_head not counted, the SAISA paper's scope)",
    "total": "total (vision tower + connector + decoder + lm_head)",
}
CONVENTION_TEXT = {
    "dense": "dense (attention scores 4·n_q·n_k·d per layer, no mask discount; the SAISA paper's convention)",
    "effective": "effective (only query–key pairs the mask allows: causal, NAAViT, SAISA text-only queries, "
    "Flamingo media masking)",
}


@dataclass
class Conventions:
    """What a report's numbers mean; rendered under every table."""

    scope: str = ""
    convention: str = ""
    extra: list[str] = field(default_factory=list)

    def lines(self, df: pd.DataFrame | None = None) -> list[str]:
        if is_published(self.convention):
            conv = published(self.convention)
            out = [conv.describe(), f"Its scope ({conv.scope}) replaces --scope for its FLOPs rows; training FLOPs "
                   "and train-step rows are in mllm-bench's own conventions (dense/effective) only."]
        else:
            out = ["FLOPs: one multiply-add = 2 FLOPs."]
            if self.scope:
                out.append(f"Scope: {SCOPE_TEXT.get(self.scope, self.scope)}.")
            if self.convention:
                out.append(f"Attention FLOPs: {CONVENTION_TEXT.get(self.convention, self.convention)}.")
        if df is not None and len(df) and "equivalent_visual_tokens" in set(df["metric"]):
            out.append("LLaVA-1.5-equivalent visual tokens: the visual tokens LLaVA-1.5 (same LLM and tower, tokens "
                       "spliced as full decoder tokens) would need for the same prefill FLOPs under this convention "
                       "(— where the model costs less than LLaVA-1.5 with none); layer-averaged visual tokens "
                       "(SparseVLM's count): visual tokens with a query and an FFN row, averaged over decoder layers.")
        out += self.extra
        if df is not None and len(df):
            out += describe_sources(df)
            out.append(environment_line(df))
        return out


def describe_sources(df: pd.DataFrame) -> list[str]:
    sources = sorted(set(df["source"]) - {""})
    text = {
        "counted": "counted = torch.utils.flop_counter on meta tensors (no weights allocated)",
        "analytic": "analytic = closed-form cost model",
        "measured": "measured = timed runs (median of repeats)",
    }
    return [f"Sources: {'; '.join(text.get(s, s) for s in sources)}."] if sources else []


def environment_line(df: pd.DataFrame) -> str:
    """One line naming the software and hardware the rows came from."""
    parts = []
    for col, name in (
        ("mllm_bench_version", "mllm-bench"), ("git_commit", "git"), ("torch_version", "torch"),
        ("transformers_version", "transformers"), ("device_name", "device"), ("dtype", "dtype"),
        ("attention_backend", "attention"),
    ):
        if col in df.columns:
            values = sorted(set(df[col].astype(str)) - {"", "nan"})
            if values:
                parts.append(f"{name} {'/'.join(values[:3])}{'…' if len(values) > 3 else ''}")
    return "Environment: " + (", ".join(parts) if parts else "not recorded") + "."


def _natural(text: str) -> tuple[int, float | str]:
    """Numbers in numeric order, then anything else."""
    try:
        return 0, float(text)
    except ValueError:
        return 1, text


def _count(value: object) -> str:
    """A workload count as written (``0``, not the ``0.0`` a column with blanks reads back as)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def workload_line(df: pd.DataFrame) -> str:
    """The workload shared by the rows (or the ranges when they differ)."""
    parts = []
    for col, name in (
        ("batch_size", "batch"), ("images_per_sample", "images/sample"), ("image_size", "tower px"),
        ("image_sizes", "images W×H"),
        ("visual_tokens", "visual tokens/sample"), ("text_tokens", "text tokens/sample"),
        ("text_before", "before image"), ("text_after", "after image"), ("generate_tokens", "generated"),
    ):
        if col in df.columns:
            values = sorted({_count(v) for v in df[col] if str(v) not in ("", "nan")}, key=_natural)
            if values:
                parts.append(f"{name} {'/'.join(values[:4])}{'…' if len(values) > 4 else ''}")
    return "Workload: " + ", ".join(parts) + "." if parts else "Workload: not recorded."
