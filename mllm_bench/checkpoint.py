"""Loading real weights from local files: transformers' Llama / LLaVA state dicts, safetensors or
``torch.load(weights_only=True)`` only. Nothing is ever downloaded.

Our names are transformers-5 LLaVA's without the ``model.`` prefix; :func:`to_mllm_bench_names`
also accepts transformers-4 LLaVA names (``language_model.model.layers``,
``vision_tower.vision_model.``) and plain ``LlamaForCausalLM`` names (``model.layers``); renames of an
architecture's own modules come from its spec (``ArchSpec.checkpoint_renames``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .model import MLLM
from .vision import unused_vision_keys

# The shared decoder's and vision tower's names. Applied in order, each to the result of the ones before
# (a key may need several); an architecture's own renames (its spec's) run after the first group.
_SHARED_FIRST: tuple[tuple[str, str], ...] = (
    # transformers >= 4.52 and 5 multimodal models nest the language model and the tower under `model.`
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
)
_SHARED_AFTER: tuple[tuple[str, str], ...] = (
    # transformers < 4.52 multimodal models
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    # CLIP/SigLIP vision models of transformers 4 nest a `vision_model`
    ("vision_tower.vision_model.", "vision_tower."),
    # LlamaForCausalLM
    ("model.", "language_model."),
)


def to_mllm_bench_names(state_dict: dict[str, torch.Tensor],
                        arch_renames: tuple[tuple[str, str], ...] = ()) -> dict[str, torch.Tensor]:
    """Rename a transformers state dict to this package's parameter names; ``arch_renames`` are the
    architecture's own (``ArchSpec.checkpoint_renames``, e.g. LLaVA's ``model.multi_modal_projector.``)."""
    renames = (*_SHARED_FIRST, *arch_renames, *_SHARED_AFTER)
    out = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


_REFUSED_PICKLE = ("refused: the file holds pickled Python objects, not only tensors; "
                   "mllm-bench loads weights_only")


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"checkpoint file {str(f)!r} is not a readable safetensors file "
                          f"(empty, truncated or not safetensors): {err}") from None


def _read_torch(f: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` file read with ``weights_only=True``: tensors and plain containers, never code."""
    import pickle

    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "GLOBAL" in text or "global" in text:  # a class or function the safe unpickler will not import
            found = re.search(r"GLOBAL (\S+)", text)
            named = f" ({found.group(1)})" if found else ""
            raise ConfigError(f"checkpoint file {str(f)!r} {_REFUSED_PICKLE}{named}") from None
        raise ConfigError(f"checkpoint file {str(f)!r} is not a readable torch checkpoint (its pickle stream "
                          "is malformed)") from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError, IndexError, UnicodeDecodeError) as err:
        reason = "it is empty" if f.stat().st_size == 0 else f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        raise ConfigError(f"checkpoint file {str(f)!r} is not a readable torch checkpoint "
                          f"(empty, truncated or another format): {reason}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint file {str(f)!r} holds a {type(obj).__name__}, not a state dict; "
                          "expected a dict of parameter name to tensor")
    return obj


def _check_tensors(state: dict, source: str) -> None:
    """Every key a string, every value a tensor (a nested dict is a training checkpoint, not a state dict)."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is a {type(key).__name__}; parameter names are strings")
        if not isinstance(value, torch.Tensor):
            hint = " (a training checkpoint? save only the model's state_dict)" if isinstance(value, dict) else ""
            raise ConfigError(f"{source}: {key!r} holds a {type(value).__name__}, not a tensor{hint}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local ``.safetensors``/``.bin``/``.pt`` file or a folder of them.

    A file that does not parse, holds anything but a name-to-tensor dict, or repeats a name another file
    already gave is refused by name; pickles are read with ``weights_only=True`` only.
    """
    if not isinstance(path, str | Path):
        raise ConfigError(f"checkpoint path must be a str or Path, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
    else:
        files = [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"checkpoint path {str(path)!r}: no .safetensors or .bin files found")
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = _read_safetensors(f)
        elif f.suffix in (".bin", ".pt", ".pth"):
            part = _read_torch(f)
        else:
            raise ConfigError(f"checkpoint file {f.name!r}: expected .safetensors, .bin, .pt or .pth")
        _check_tensors(part, f"checkpoint file {str(f)!r}")
        for key in part:
            if key in origin:
                raise ConfigError(f"checkpoint {str(path)!r}: {key!r} is in both {origin[key].name!r} and "
                                  f"{f.name!r}; each tensor must come from one file")
            origin[key] = f
        state.update(part)
    return state


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors whose shape differs from the model's, or integer/complex ones for float weights."""
    expected = model.state_dict()
    wrong = []
    for key, value in state.items():
        target = expected.get(key)
        if target is None:
            continue
        if value.shape != target.shape:
            wrong.append(f"{key!r} is {tuple(value.shape)} in the checkpoint, {tuple(target.shape)} in the model")
        elif target.is_floating_point() and not value.is_floating_point():
            wrong.append(f"{key!r} is {value.dtype} in the checkpoint; the model needs floating-point weights "
                         "(quantized checkpoints are not supported)")
    if wrong:
        more = f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""
        raise ConfigError(f"checkpoint does not match the model: {'; '.join(wrong[:4])}{more}")


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load a (transformers-named) state dict into ``model``; returns the keys it did not set.

    Vision-tower keys for layers past the feature layer are dropped first (we never build them).
    With ``strict``, any other missing or unexpected key is an error that lists them.
    """
    if not isinstance(state_dict, dict):
        raise ConfigError(f"state_dict must be a dict of parameter name to tensor, got {type(state_dict).__name__}")
    _check_tensors(state_dict, "state dict")
    state = to_mllm_bench_names(state_dict, model.spec.checkpoint_renames if isinstance(model, MLLM) else ())
    vision_cfg = getattr(model, "vision_config", None)
    if vision_cfg is not None:
        for key in unused_vision_keys(vision_cfg, list(state)):
            del state[key]
    _check_shapes(model, state)
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
