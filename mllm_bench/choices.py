"""The library's choice lists and paper defaults, in a module that imports nothing heavy.

The CLI builds its option enums and defaults from these at startup, so ``mllm-bench --help`` and usage
errors need no torch, transformers or pandas. The modules that use them re-export them
(``costmodel.SCOPES``, ``workload.STAGES``, ``reports.tables.FORMATS``, …).
"""

from __future__ import annotations

SCOPES: tuple[str, ...] = ("language", "total")
CONVENTIONS: tuple[str, ...] = ("dense", "effective")  # mllm-bench's own (attention with / without mask discount)
# published conventions, each defined in mllm_bench.conventions (same order)
PUBLISHED_CONVENTIONS: tuple[str, ...] = ("saisa", "fastv", "pdrop", "llm-viewer")
FORMATS: tuple[str, ...] = ("table", "markdown", "csv", "json", "latex")
COUNT_CHOICES: tuple[str, ...] = ("all", "inference", "none")
STAGES: tuple[str, ...] = ("inference", "pretrain", "finetune")
DTYPE_NAMES: tuple[str, ...] = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
VARY_FIELDS: tuple[str, ...] = (
    "visual_tokens", "text_tokens", "text_after", "text_before", "image_size", "image", "images_per_sample", "llm",
    "batch_size", "generate_tokens",
)
# what ``compare --equal KIND=VALUE`` can hold equal (mllm_bench.reports.equal), and a knob moves (spec.BudgetKnob)
EQUAL_BUDGETS: tuple[str, ...] = ("flops", "visual_tokens", "params")
BUDGET_DEVICES: tuple[str, ...] = ("a100", "h100", "h100-pcie", "h200")  # GPU-hours of train-cost and paper
# The SAISA paper's workload (LLaVA-1.5 evaluation): one image, 32 text tokens before and after it.
PAPER_WORKLOAD_FIELDS: dict[str, int] = {"batch_size": 1, "images_per_sample": 1, "text_before": 32,
                                         "text_after": 32}


def counts_stage(count: str, stage: str) -> bool:
    """Whether a profiler call at ``stage`` counts FLOPs on meta under ``--count`` (:data:`COUNT_CHOICES`: every
    call, the inference calls only, or none)."""
    return count == "all" or (count == "inference" and stage == "inference")
