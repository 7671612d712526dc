"""Published FLOP conventions as data: each defined once, with its formula, source and what it leaves out.

Papers count FLOPs differently: a multiply-add as 1 or 2, two or three FFN matrices, with or without the
connector, vision tower and lm_head, with or without element-wise work. mllm-bench's own conventions are
``dense`` and ``effective`` (2 FLOPs per multiply-add, every matrix product, attention with and without the
mask discount, in a chosen scope; :mod:`mllm_bench.costmodel`). A published convention is a function of the
same exact analytic breakdown (:class:`~mllm_bench.costmodel.CostBreakdown`) of what an architecture computes,
so it applies to every architecture and token-reduction method: FastV's eq. 5 on SAISA is eq. 5's per-op
costs applied to SAISA's rows. On a plain LLaMA-style decoder with every token full (LLaVA-1.5) each one
reduces to its published closed form, which the tests check against the formula written out independently.

Published conventions are defined for inference (prefill and one decode step); training rows exist in the
``dense`` and ``effective`` conventions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .choices import CONVENTIONS, PUBLISHED_CONVENTIONS
from .config import ConfigError, LLMConfig
from .costmodel import CostBreakdown

# the decoder's components, cross-attention blocks included (which no published formula describes)
DECODER = ("attn_proj", "attn_scores", "ffn", "cross_attn")


@dataclass(frozen=True)
class Convention:
    """One way of counting FLOPs: what it is, where it comes from, and the function that applies it."""

    name: str
    title: str
    source: str
    formula: str
    scope: str  # what the ``scope`` column of its rows says
    counts: str
    leaves_out: str
    multiply_add: str  # "2 FLOPs", "1 FLOP" or a mixture, in words
    apply: Callable[[CostBreakdown, LLMConfig, str], dict[str, float]]  # FLOPs by component

    def by_component(self, cost: CostBreakdown, llm: LLMConfig, phase: str) -> dict[str, float]:
        """FLOPs by component (``elementwise`` for work outside matrix products)."""
        if phase not in ("prefill", "decode"):
            raise ConfigError(f"convention {self.name!r} is defined for prefill and decode, not {phase!r}")
        return {c: f for c, f in self.apply(cost, llm, phase).items() if f}

    def flops(self, cost: CostBreakdown, llm: LLMConfig, phase: str) -> float:
        return sum(self.by_component(cost, llm, phase).values())

    def describe(self) -> str:
        """One paragraph for a table's notes."""
        return (f"FLOPs convention `{self.name}` — {self.title} ({self.source}): {self.formula}. Counts "
                f"{self.counts}; a multiply-add = {self.multiply_add}; leaves out {self.leaves_out}.")


def _components(cost: CostBreakdown, phase: str, components: tuple[str, ...]) -> dict[str, float]:
    """Dense FLOPs of ``components`` (0 where absent)."""
    by = cost.by("component", phase, "dense", "total")
    return {c: by.get(c, 0.0) for c in components}


def saisa_flops(cost: CostBreakdown, llm: LLMConfig, phase: str) -> dict[str, float]:
    """Connector + decoder (+ cross-attention), 2 FLOPs per multiply-add, dense attention."""
    return cost.by("component", phase, "dense", "language")


def fastv_flops(cost: CostBreakdown, llm: LLMConfig, phase: str) -> dict[str, float]:
    """Eq. 5 per layer, 4nd² + 2n²d + 2ndm: one FLOP per multiply-add, two of SwiGLU's three FFN matrices."""
    c = _components(cost, phase, DECODER)
    return {k: f / 3.0 if k == "ffn" else 0.5 * f for k, f in c.items()}


def pdrop_flops(cost: CostBreakdown, llm: LLMConfig, phase: str) -> dict[str, float]:
    """FastV's eq. 5 with the FFN term 3ndm: one FLOP per multiply-add, all three FFN matrices."""
    return {k: 0.5 * f for k, f in _components(cost, phase, DECODER).items()}


# LLM-Viewer's element-wise operations per row of a LLaMA layer (configs/Llama.py, model_analyzer.py)
LLM_VIEWER_NORM = 7  # per element, each of the two RMSNorms
LLM_VIEWER_ADD = 1  # per element, each of the two residual adds
LLM_VIEWER_ACT = 2  # per element of the hidden width (not the FFN width, as LLM-Viewer writes it)
LLM_VIEWER_SOFTMAX = 5  # per attention score, per head


def llm_viewer_flops(cost: CostBreakdown, llm: LLMConfig, phase: str) -> dict[str, float]:
    """Decoder matmuls at 2 per multiply-add, dense attention, element-wise ops, lm_head at 1 per multiply-add."""
    c = _components(cost, phase, (*DECODER, "lm_head"))
    h = llm.hidden_size
    full, kv = cost.rows(phase)
    elementwise = (kv * LLM_VIEWER_NORM * h  # the input norm runs on every row that gives keys and values
                   + full * (LLM_VIEWER_NORM + 2 * LLM_VIEWER_ADD + LLM_VIEWER_ACT) * h
                   + LLM_VIEWER_SOFTMAX * llm.num_heads * cost.decoder_pairs.get(phase, 0.0))
    return {**c, "lm_head": 0.5 * c["lm_head"], "elementwise": elementwise}


PUBLISHED: dict[str, Convention] = {c.name: c for c in (
    Convention(
        "saisa", "the SAISA / ShortV papers' convention",
        "SAISA, arXiv 2502.02458, and ShortV, arXiv 2504.00502 (same group), efficiency sections",
        "per layer, n = t + v tokens: 2n(4h+3m)h + 4n²h; a layer whose visual tokens are keys/values only "
        "2t(4h+3m)h + 4vh² + 4t(t+v)h; plus the projector(s) 2v(d_v·h + h²)",
        "language", "the connector and every decoder matrix product (Q, K, V, O, the three FFN matrices, QK^T and "
        "PV over every query-key pair) and cross-attention blocks", "the vision tower, the lm_head, the causal (or "
        "any mask's) discount and element-wise work", "2 FLOPs", saisa_flops),
    Convention(
        "fastv", "FastV's eq. 5",
        "FastV, Chen et al., ECCV 2024, arXiv 2403.06764, eq. 5",
        "per decoder layer with n tokens, hidden d, FFN width m: 4nd² + 2n²d + 2ndm",
        "decoder", "decoder layers only: Q, K, V, O as n·d² each (the real K/V width under GQA), QK^T and PV as "
        "n²d each with no mask discount, the FFN as two matrices (LLaMA's SwiGLU has three: counted as 2/3 of "
        "it); cross-attention blocks, which eq. 5 does not describe, at one FLOP per multiply-add",
        "the connector, vision tower, lm_head, the third FFN matrix and element-wise work", "1 FLOP", fastv_flops),
    Convention(
        "pdrop", "PyramidDrop's correction of FastV's eq. 5",
        "PyramidDrop, Xing et al., arXiv 2410.17247 (FLOPs section: 3ndm for LLaMA's FFN)",
        "per decoder layer: 4nd² + 2n²d + 3ndm",
        "decoder", "decoder layers: every matrix product at one FLOP per multiply-add, attention with no mask "
        "discount; cross-attention blocks likewise", "the connector, vision tower, lm_head and element-wise work",
        "1 FLOP", pdrop_flops),
    Convention(
        "llm-viewer", "LLM-Viewer's roofline analyzer",
        "LLM-Viewer, github.com/hahnyuan/LLM-Viewer @472f71f, model_analyzer.py and configs/Llama.py (used by "
        "LLaVA-PruMerge and FiCoCo)",
        "per layer and row: q/k/v/o/gate/up/down at 2·d_in·d_out, QK^T and SV at 2·n·d each, softmax 5 per "
        "score per head, two RMSNorms at 7·h, two residual adds at h, the activation at 2·h; lm_head h·V on the "
        "last token",
        "decoder+lm_head", "the decoder's matrix products and element-wise work (as LLM-Viewer writes them, the "
        "activation over the hidden width) on the rows each layer really processes, the lm_head on the last "
        "token at one FLOP per multiply-add, cross-attention blocks' matrix products",
        "the connector, the vision tower and any mask discount (LLM-Viewer knows only a sequence length)",
        "2 FLOPs (the lm_head: 1)", llm_viewer_flops),
)}

ALL_CONVENTIONS: tuple[str, ...] = CONVENTIONS + PUBLISHED_CONVENTIONS
assert tuple(PUBLISHED) == PUBLISHED_CONVENTIONS, "choices.PUBLISHED_CONVENTIONS must list PUBLISHED in order"


def published(name: str) -> Convention:
    """The published convention ``name``; a clear error naming the choices otherwise."""
    if name not in PUBLISHED:
        raise ConfigError(f"convention must be one of {list(ALL_CONVENTIONS)}, got {name!r}")
    return PUBLISHED[name]


def is_published(name: str) -> bool:
    return name in PUBLISHED


def scope_for(convention: str, scope: str) -> str:
    """The ``scope`` a convention's FLOPs rows carry: its own for a published convention, else ``scope``."""
    return PUBLISHED[convention].scope if convention in PUBLISHED else scope
