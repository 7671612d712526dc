"""mllm-bench: multimodal LLM architectures side by side, and what they cost."""

from .batch import MultimodalBatch
from .config import ConfigError, LLMConfig, VisionConfig, llm_config_from_hf, vision_config_from_hf
from .model import MLLM, ModelOutput
from .presets import LLM_PRESETS, VISION_PRESETS, llm_preset, vision_preset
from .registry import architecture_names, build_model, get_architecture, register
from .workload import PAPER_WORKLOAD, Workload

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "LLMConfig", "LLM_PRESETS", "MLLM", "ModelOutput", "MultimodalBatch", "PAPER_WORKLOAD",
    "VISION_PRESETS", "VisionConfig", "Workload", "architecture_names", "build_model", "get_architecture",
    "llm_config_from_hf", "llm_preset", "register", "vision_config_from_hf", "vision_preset",
]
