"""mllm-bench: multimodal LLM architectures side by side, and what they cost.

The core modules, by what they are for (architectures live in ``architectures/``, one file or folder each):

* describing a run: ``config`` (LLM / vision configs, HF config files), ``presets``, ``workload``,
  ``image_sizes`` (``WxH`` text), ``spec`` (an architecture's metadata, its equal-budget knob), ``declared``
  (an architecture's listing read from its source), ``registry`` (finding and building architectures),
  ``choices`` (the CLI's choice lists, light)
* building models: ``model`` (the :class:`MLLM` interface), ``batch`` (sequence layout), ``masks``,
  ``attention`` (backends), ``decoder`` (Llama layers, KV cache), ``static_decode`` (static cache, CUDA
  graphs), ``vision`` (CLIP/SigLIP tower), ``projector``, ``checkpoint`` (local weights)
* counting and measuring: ``costmodel`` (analytic primitives), ``conventions`` (published FLOP conventions),
  ``flops`` (counted), ``meta_shapes`` (meta-kernel answers remembered), ``count_cache`` and ``fingerprint``
  (answers kept across runs, keyed by the code), ``memory``, ``timing``,
  ``measure`` (the measurement engine), ``profile`` (rows for one architecture and workload), ``devices``
  (peaks), ``environment``, ``schema`` (the result rows' columns, :func:`make_row`), ``results`` (rows as
  frames and files), ``atomic`` (files written whole), ``count_ahead`` (counting in a forked child)
* training infrastructure: ``optim``, ``distributed`` (launcher ranks, FSDP2, sweep sharding)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import MultimodalBatch
    from .config import ConfigError, LLMConfig, VisionConfig, llm_config_from_hf, vision_config_from_hf
    from .model import MLLM, ModelOutput
    from .presets import LLM_PRESETS, VISION_PRESETS, llm_preset, vision_preset
    from .registry import architecture_names, build_model, get_architecture, register
    from .workload import PAPER_WORKLOAD, Workload

# The public names load on first use, so that ``import mllm_bench`` (and ``mllm-bench --version``) needs no torch.
_EXPORTS = {
    "batch": ("MultimodalBatch",),
    "config": ("ConfigError", "LLMConfig", "VisionConfig", "llm_config_from_hf", "vision_config_from_hf"),
    "model": ("MLLM", "ModelOutput"),
    "presets": ("LLM_PRESETS", "VISION_PRESETS", "llm_preset", "vision_preset"),
    "registry": ("architecture_names", "build_model", "get_architecture", "register"),
    "workload": ("PAPER_WORKLOAD", "Workload"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "ConfigError", "LLMConfig", "LLM_PRESETS", "MLLM", "ModelOutput", "MultimodalBatch", "PAPER_WORKLOAD",
    "VISION_PRESETS", "VisionConfig", "Workload", "architecture_names", "build_model", "get_architecture",
    "llm_config_from_hf", "llm_preset", "register", "vision_config_from_hf", "vision_preset",
]
