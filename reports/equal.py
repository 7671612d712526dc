"""Equal-budget comparisons: each architecture at the setting of its own knob that meets one budget.

A budget is one of (``mllm-bench compare --equal KEY=VALUE``):

* ``flops=B``: prefill FLOPs per batch, at the table's ``--scope`` and ``--convention`` (analytic cost model);
* ``visual_tokens=N``: visual tokens per sample in the LLM (what each knob's ``tokens`` counts: the spliced
  sequence's, FastV's kept tokens from layer K on, Flamingo's latents);
* ``params=P``: parameters of the whole model.

Each architecture's spec names its knob (``ArchSpec.budget_knob``, :class:`~mllm_bench.spec.BudgetKnob`): the
option, the values it may take (ordered cheapest first), which budgets it moves and along which of them the
cost never falls (those are searched by bisection, the others exhaustively). The chosen setting is the one
whose cost is the largest not above the budget. Every architecture stays in the table: one whose knob cannot
reach the budget runs at its cheapest setting, one without a knob (or whose knob does not move this budget)
and the baseline run as they are; each :class:`Choice` carries a line saying which case it is and its cost
against the budget.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mllm_bench.choices import EQUAL_BUDGETS
from mllm_bench.config import ConfigError, VisionConfig
from mllm_bench.spec import BudgetKnob as Knob

if TYPE_CHECKING:  # torch loads when a model is built, not when a budget is parsed
    from mllm_bench.model import MLLM
    from mllm_bench.workload import Workload

_BUDGET_TEXT = {
    "flops": "prefill FLOPs per batch (the table's --scope and --convention), e.g. flops=3.3e12",
    "visual_tokens": "visual tokens per sample in the LLM, e.g. visual_tokens=64",
    "params": "parameters of the whole model, e.g. params=7e9",
}
BUDGET_KINDS: dict[str, str] = {kind: _BUDGET_TEXT[kind] for kind in EQUAL_BUDGETS}  # the names knobs declare

KIND_NAMES = {"flops": "prefill FLOPs", "visual_tokens": "visual tokens", "params": "parameter count"}


@dataclass(frozen=True)
class Budget:
    """``kind`` (one of :data:`BUDGET_KINDS`) and its upper bound."""

    kind: str
    value: float

    def describe(self, scope: str = "language", convention: str = "dense") -> str:
        if self.kind == "flops":
            return f"prefill FLOPs ≤ {_num(self.value)} ({scope} scope, {convention} attention)"
        if self.kind == "visual_tokens":
            return f"visual tokens ≤ {int(self.value)} per sample"
        return f"parameters ≤ {_num(self.value)}"


def parse_budget(spec: str) -> Budget:
    """``--equal KEY=VALUE`` as a :class:`Budget`; a ConfigError naming the keys and formats otherwise."""
    allowed = "; ".join(f"{k}: {text}" for k, text in BUDGET_KINDS.items())
    key, sep, raw = (spec or "").partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or key not in BUDGET_KINDS or not raw:
        raise ConfigError(f"--equal {spec!r}: expected KEY=VALUE with KEY one of {list(BUDGET_KINDS)} ({allowed})")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"--equal {key}={raw}: {raw!r} is not a number ({BUDGET_KINDS[key]})") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--equal {key}={raw}: the budget must be a positive finite number ({BUDGET_KINDS[key]})")
    if key == "visual_tokens" and not value.is_integer():
        raise ConfigError(f"--equal visual_tokens={raw}: a token count must be a whole number, e.g. visual_tokens=64")
    return Budget(key, value)


# ----- the knobs -----------------------------------------------------------------------------------------
def sequence_visual_tokens(model: MLLM, workload: Workload) -> int:
    """Visual tokens per sample spliced into the sequence (``MLLM.visual_tokens_per_image``)."""
    return sum(model.visual_tokens_per_image(workload))


def budget_knobs() -> dict[str, Knob]:
    """The knob of every architecture whose spec declares one (``ArchSpec.budget_knob``), by name."""
    from mllm_bench.registry import architecture_names, architecture_spec

    return {a: k for a in architecture_names() if (k := architecture_spec(a).budget_knob) is not None}


def knob_tokens(knob: Knob | None, model: MLLM, workload: Workload) -> int:
    """The visual tokens in the LLM the knob counts (the spliced sequence's when it names no count of its own)."""
    return (knob.tokens if knob and knob.tokens else sequence_visual_tokens)(model, workload)


def tokens_text(knob: Knob | None, model: MLLM) -> str:
    """What ``knob.tokens`` counts, with the model's options filled in (FastV's layer K)."""
    if knob:
        text = knob.tokens_text
    elif model.positions_per_image == 0:
        text = "visual tokens (cross-attention keys/values, none in the sequence)"
    else:
        text = "visual tokens in the sequence"
    fields = {f.name: getattr(model.options, f.name) for f in dataclasses.fields(model.options)}
    return text.format(**fields)


# ----- choosing ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One evaluated setting: the knob's value, the budgeted quantity there (inf when the setting is invalid,
    ``error`` then says why) and the visual tokens it gives."""

    value: Any
    amount: float
    tokens: int | None = None
    tokens_text: str = ""
    error: str = ""


@dataclass(frozen=True)
class Choice:
    """Where one architecture runs in an equal-budget comparison.

    ``status``: ``chosen`` (the knob's setting with the largest cost within the budget), ``infeasible`` (no
    setting is within it; the cheapest is used), ``no knob`` (the architecture has none), ``unaffected`` (its
    knob does not move this budget), ``baseline`` (the reference, as it is). ``options``: every option to run
    with. ``line``: one sentence for people."""

    arch: str
    status: str
    options: dict[str, Any]
    option: str | None
    value: Any
    amount: float
    meets: bool
    line: str
    searched: tuple[Setting, ...] = field(default=(), repr=False)


def amount_of(model: MLLM, workload: Workload, kind: str, scope: str, convention: str,
              knob: Knob | None = None) -> float:
    """The budgeted quantity of ``model`` on ``workload``: prefill FLOPs (analytic), visual tokens in the LLM,
    or parameters."""
    if kind == "flops":
        try:
            cost = model.analytic_cost(workload.replace(stage="inference"))
        except NotImplementedError as err:
            raise ConfigError(f"--equal flops: {err}; the budget is met on the analytic cost") from err
        return float(cost.flops("prefill", convention, scope))
    if kind == "visual_tokens":
        return float(knob_tokens(knob, model, workload))
    if kind == "params":
        return float(model.num_parameters())
    raise ConfigError(f"budget kind must be one of {list(BUDGET_KINDS)}, got {kind!r}")


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _num(x: float) -> str:
    """``x`` to four significant figures, exponent without "+" (3.288e12)."""
    return re.sub(r"e\+?0*(\d)", r"e\1", f"{x:.4g}")


def _count(n: int, text: str) -> str:
    """``n`` and what it counts, singular for one (``1 visual token kept``)."""
    if n == 1:
        text = re.sub(r"^(\w+ )?(token|latent)s", r"\1\2", text)
    return f"{n} {text}"


def _amount_text(kind: str, amount: float, tokens_text: str = "visual tokens") -> str:
    if kind == "visual_tokens":
        return _count(int(amount), tokens_text)
    return f"{'prefill FLOPs' if kind == 'flops' else 'parameters'} {_num(amount)}"


def _versus(budget: Budget, amount: float) -> str:
    relation = "within" if amount <= budget.value else "over"
    return f"{amount / budget.value * 100:.1f}% of the budget {_num(budget.value)}, {relation}"


class _Search:
    """Settings of one knob evaluated on demand, each model built once on meta."""

    def __init__(self, arch: str, knob: Knob, llm: Any, vision: Any, options: dict[str, Any], workload: Workload,
                 kind: str, scope: str, convention: str) -> None:
        self.arch, self.knob, self.llm, self.vision, self.options = arch, knob, llm, vision, options
        self.workload, self.kind, self.scope, self.convention = workload, kind, scope, convention
        self.seen: dict[int, Setting] = {}

    def model(self, value: Any) -> MLLM:
        from mllm_bench.registry import build_model
        from mllm_bench.workload import check_workload_fits

        model = build_model(self.arch, self.llm, self.vision, {**self.options, self.knob.option: value},
                            device="meta", dtype=self.workload.dtype)
        check_workload_fits(self.workload, model.llm_config, model.positions_per_image)
        return model

    def at(self, values: Sequence[Any], i: int) -> Setting:
        if i not in self.seen:
            try:
                model = self.model(values[i])
                amount = amount_of(model, self.workload, self.kind, self.scope, self.convention, self.knob)
                self.seen[i] = Setting(values[i], amount, knob_tokens(self.knob, model, self.workload),
                                       tokens_text(self.knob, model))
            except ConfigError as err:
                self.seen[i] = Setting(values[i], math.inf, error=str(err))
        return self.seen[i]


def best_within(search: _Search, values: Sequence[Any], budget: float, monotone: bool) -> tuple[int | None, int]:
    """(index of the setting with the largest amount ≤ ``budget`` or None, index of the cheapest valid one or
    -1). With ``monotone`` (amounts never decrease along ``values``; invalid settings count as infinite) by
    bisection, else over every value; ties go to the earlier value."""
    if not values:
        return None, -1
    if monotone:
        lo, hi = 0, len(values)  # the first index whose amount exceeds the budget lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if search.at(values, mid).amount <= budget:
                lo = mid + 1
            else:
                hi = mid
        chosen = lo - 1 if lo else None
        cheapest = 0 if math.isfinite(search.at(values, 0).amount) else -1
        if chosen is not None:
            first = search.at(values, chosen).amount
            while chosen > 0 and search.at(values, chosen - 1).amount == first:
                chosen -= 1
        return chosen, cheapest
    settings = [search.at(values, i) for i in range(len(values))]
    valid = [i for i, s in enumerate(settings) if math.isfinite(s.amount)]
    if not valid:
        return None, -1
    cheapest = min(valid, key=lambda i: settings[i].amount)
    within = [i for i in valid if settings[i].amount <= budget]
    chosen = max(within, key=lambda i: (settings[i].amount, -i)) if within else None
    return chosen, cheapest


def choose(arch: str, llm: Any, vision: str | VisionConfig, options: Mapping[str, Any] | None, workload: Workload,
           budget: Budget, scope: str = "language", convention: str = "dense",
           baseline: str | None = None, knobs: Mapping[str, Knob] | None = None) -> Choice:
    """Where ``arch`` runs under ``budget`` (see :class:`Choice`); ``options`` are its other options; ``knobs``:
    the knob of each architecture (default: its spec's ``budget_knob``)."""
    from mllm_bench.registry import architecture_spec, build_model

    options = dict(options or {})
    knob = architecture_spec(arch).budget_knob if knobs is None else knobs.get(arch)
    kind = budget.kind

    def as_is(status: str, why: str) -> Choice:
        model = build_model(arch, llm, vision, options or None, device="meta", dtype=workload.dtype)
        amount = amount_of(model, workload, kind, scope, convention, knob)
        value = getattr(model.options, knob.option) if knob else None
        setting = f" ({knob.option}={_fmt(value)})" if knob else ""
        line = (f"{arch}: {why}; as it is{setting}: {_amount_text(kind, amount, tokens_text(knob, model))}, "
                f"{_versus(budget, amount)}")
        return Choice(arch, status, options, knob.option if knob else None, value, amount, amount <= budget.value,
                      line)

    if arch == baseline:
        return as_is("baseline", "the baseline (the 'vs' columns' reference)")
    if knob is None:
        return as_is("no knob", f"no knob for an equal-budget comparison ({arch}'s spec declares no budget_knob)")
    if kind not in knob.moves:
        return as_is("unaffected", f"its knob {knob.option} does not change the {KIND_NAMES[kind]}")
    if knob.option in options:
        raise ConfigError(f"--option {arch}.{knob.option}={options[knob.option]} conflicts with --equal, which "
                          f"chooses {arch}.{knob.option} ({knob.allowed}); leave it out")
    base = build_model(arch, llm, vision, options or None, device="meta", dtype=workload.dtype)
    values = knob.values(base, workload)
    search = _Search(arch, knob, llm, vision, options, workload, kind, scope, convention)
    chosen, cheapest = best_within(search, values, budget.value, kind in knob.monotone)
    searched = tuple(search.seen[i] for i in sorted(search.seen))
    if chosen is None and cheapest < 0:
        errors = sorted({s.error for s in searched if s.error})
        raise ConfigError(f"{arch}: no valid setting of {knob.option} ({knob.allowed}) on this model and workload: "
                          f"{errors[0] if errors else 'no values'}")
    index = chosen if chosen is not None else cheapest
    got = search.at(values, index)
    amount = _amount_text(kind, got.amount, got.tokens_text)
    if kind != "visual_tokens" and got.tokens is not None:
        amount += f" ({_count(got.tokens, got.tokens_text)})"
    setting = f"{knob.option}={_fmt(got.value)}"
    if chosen is None:
        line = (f"{arch}: no setting meets {budget.describe(scope, convention)}; smallest is {amount} at {setting} "
                f"({_versus(budget, got.amount)}); profiled there")
        status = "infeasible"
    else:
        line = f"{arch}: {setting}: {amount}, {_versus(budget, got.amount)}"
        status = "chosen"
    return Choice(arch, status, {**options, knob.option: got.value}, knob.option, got.value, got.amount,
                  chosen is not None, line, searched)


def choose_all(archs: Sequence[str], llm: Any, vision: str | VisionConfig, options: Mapping[str, dict] | None,
               workload: Workload, budget: Budget, scope: str = "language", convention: str = "dense",
               baseline: str | None = None) -> list[Choice]:
    """:func:`choose` for every architecture, in order."""
    options = options or {}
    return [choose(a, llm, vision, options.get(a), workload, budget, scope, convention, baseline) for a in archs]


def budget_notes(choices: Sequence[Choice], budget: Budget, scope: str, convention: str) -> list[str]:
    """The table's notes: the budget, the rule, then each architecture's line."""
    head = (f"Equal budget: {budget.describe(scope, convention)}. Each architecture with a knob runs at the "
            "setting whose cost is the largest within the budget (analytic cost model); the others as they are.")
    return [head, *[c.line for c in choices]]

