"""Loading real weights from local files: transformers' Llama / LLaVA state dicts, safetensors or
``torch.load(weights_only=True)`` only. Nothing is ever downloaded.

Our names are transformers-5 LLaVA's without the ``model.`` prefix; :func:`to_mllm_bench_names`
also accepts transformers-4 LLaVA names (``language_model.model.layers``,
``vision_tower.vision_model.``) and plain ``LlamaForCausalLM`` names (``model.layers``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .vision import unused_vision_keys

# Applied in order, each to the result of the ones before (a key may need several).
_RENAMES: tuple[tuple[str, str], ...] = (
    # transformers >= 4.52 and 5 LLaVA
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    # transformers < 4.52 LLaVA
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    # CLIP/SigLIP vision models of transformers 4 nest a `vision_model`
    ("vision_tower.vision_model.", "vision_tower."),
    # LlamaForCausalLM
    ("model.", "language_model."),
)


def to_mllm_bench_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers Llama/LLaVA state dict to this package's parameter names."""
    out = {}
    for key, value in state_dict.items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors``/``.bin``/``.pt`` file or a folder of them."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
    else:
        files = [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"checkpoint path {str(path)!r}: no .safetensors or .bin files found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        elif f.suffix in (".bin", ".pt", ".pth"):
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        else:
            raise ConfigError(f"checkpoint file {f.name!r}: expected .safetensors, .bin, .pt or .pth")
    return state


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load a (transformers-named) state dict into ``model``; returns the keys it did not set.

    Vision-tower keys for layers past the feature layer are dropped first (we never build them).
    With ``strict``, any other missing or unexpected key is an error that lists them.
    """
    state = to_mllm_bench_names(state_dict)
    vision_cfg = getattr(model, "vision_config", None)
    if vision_cfg is not None:
        for key in unused_vision_keys(vision_cfg, list(state)):
            del state[key]
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    result = model.load_state_dict(state, strict=False, assign=on_meta)  # a meta model takes the tensors
    llm_cfg = getattr(model, "llm_config", None)
    tied = bool(llm_cfg is not None and llm_cfg.tie_word_embeddings)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if strict and (missing or result.unexpected_keys):
        raise ConfigError(
            f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )
    return list(result.missing_keys)
