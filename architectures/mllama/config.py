"""Llama-3.2-Vision's settings beyond the shared LLM and vision configs, and its ``config.json`` reader.

The shared :class:`~mllm_bench.config.LLMConfig` gives the text model (``num_layers`` counts every decoder
slot, cross-attention ones included, as transformers' ``num_hidden_layers`` does) and
:class:`~mllm_bench.config.VisionConfig` the tower's widths (``hidden_size``, ``num_heads``,
``intermediate_size``, ``num_layers`` = the local encoder's layers, ``image_size`` = the tile size,
``patch_size``, ``hidden_act``, ``layer_norm_eps``); :class:`MllamaOptions` the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, _read_json, _section, require
from mllm_bench.presets import llm_preset, vision_preset

# Llama-3.2-11B-Vision's (meta-llama/Llama-3.2-11B-Vision config.json)
CROSS_ATTENTION_EVERY, CROSS_ATTENTION_FIRST = 5, 3  # [3, 8, 13, ..., 38] of 40 (90B: [3, 8, ..., 98] of 100)
INTERMEDIATE_LAYERS: tuple[int, ...] = (3, 7, 15, 23, 30)
EXTRA_EMBEDDINGS = 8  # the embedding table has vocab_size + 8 rows (<|image|> is id 128256)


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (rows, cols) with rows * cols <= ``max_num_tiles``, in the image processor's order
    (``get_all_supported_aspect_ratios``); a grid's aspect-ratio id is its index + 1 (0 = padding)."""
    return [(a, b) for a in range(1, max_num_tiles + 1) for b in range(1, max_num_tiles + 1) if a * b <= max_num_tiles]


def tile_grid(height: int, width: int, max_num_tiles: int, tile_size: int) -> tuple[int, int]:
    """The tile grid (rows, cols) an image of ``height`` x ``width`` px is resized onto, as the image processor
    chooses it (``get_optimal_tiled_canvas``): each grid's scale is the smaller of canvas height / height and
    canvas width / width; the smallest scale >= 1 wins (the least upscaling), else the largest (the least
    downscaling); among grids of that scale the fewest tiles, then the first in :func:`supported_aspect_ratios`."""
    grids = supported_aspect_ratios(max_num_tiles)
    scales = [min(r * tile_size / height, c * tile_size / width) for r, c in grids]
    up = [x for x in scales if x >= 1]
    best = min(up) if up else max(scales)
    return min((g for g, x in zip(grids, scales, strict=True) if x == best), key=lambda g: g[0] * g[1])


def aspect_ratio_id(grid: tuple[int, int], max_num_tiles: int) -> int:
    """A tile grid's aspect-ratio id: its 1-based index in the supported grids (0 is the processor's padding)."""
    return supported_aspect_ratios(max_num_tiles).index(grid) + 1


def _parse_indices(text: str) -> tuple[int, ...] | str:
    """``"3,8,13"`` or ``"[3, 8, 13]"`` as a tuple of ints (the text itself when it is not one, for the error)."""
    parts = [p.strip() for p in text.strip().strip("[]()").split(",") if p.strip()]
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else text


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


@dataclass(frozen=True)
class MllamaOptions:
    """Cross-attention placement, the tiled tower's extra settings, the workload's tile grid, training.

    ``cross_attention_layers``: decoder slots that are cross-attention layers (None: every 5th from 3, the
    11B's [3, 8, ..., 38] of 40; the last slot of a decoder of 3 slots or fewer). ``intermediate_layers``:
    local-encoder layer outputs concatenated to the tower's output (None: the 11B's [3, 7, 15, 23, 30], those
    the local encoder has). ``tile_rows`` x ``tile_cols``: the tile grid of images given without a size
    (``Workload.image_sizes`` None, batches of canvases; default 2 x 2, a 1120 x 1120 canvas at 560 px tiles);
    an image with a size gets the processor's best fit to it (:func:`tile_grid`). Every image runs
    ``max_num_tiles`` tiles, the unused ones zero and masked.
    """

    cross_attention_layers: tuple[int, ...] | None = None
    num_global_layers: int = 8
    intermediate_layers: tuple[int, ...] | None = None
    max_num_tiles: int = 4
    tile_rows: int = 2
    tile_cols: int = 2
    train_llm_in_finetune: bool = False

    def __post_init__(self) -> None:
        for name in ("cross_attention_layers", "intermediate_layers"):
            value = getattr(self, name)
            if isinstance(value, str):  # the CLI's -o mllama.cross_attention_layers=3,8,13 (or [3, 8, 13])
                value = _parse_indices(value)
            if isinstance(value, list):
                value = tuple(value)
            object.__setattr__(self, name, value)
            require(value is None or (_int_tuple(value) and len(set(value)) == len(value)
                                      and all(v >= 0 for v in value)),
                    f"mllama option {name} must be a list of distinct layer indices >= 0 (or None), got {value!r}")
        for name, bound in (("num_global_layers", 256), ("max_num_tiles", 64), ("tile_rows", 64), ("tile_cols", 64)):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= bound,
                    f"mllama option {name} must be an integer in [1, {bound}], got {value!r}")
        require(self.tile_rows * self.tile_cols <= self.max_num_tiles,
                f"mllama options tile_rows x tile_cols ({self.tile_rows} x {self.tile_cols}) must be at most "
                f"max_num_tiles ({self.max_num_tiles}); supported grids: {supported_aspect_ratios(self.max_num_tiles)}")
        require(isinstance(self.train_llm_in_finetune, bool),
                f"mllama option train_llm_in_finetune must be True or False, got {self.train_llm_in_finetune!r}")

    def cross_layers(self, num_layers: int) -> tuple[int, ...]:
        """The cross-attention slots of a ``num_layers``-slot decoder, checked against it."""
        layers = self.cross_attention_layers
        if layers is None:  # a decoder of 3 slots or fewer gets one cross-attention slot, its last
            layers = tuple(range(CROSS_ATTENTION_FIRST, num_layers, CROSS_ATTENTION_EVERY)) or (num_layers - 1,)
        require(len(layers) > 0, "mllama option cross_attention_layers must name at least one decoder slot "
                                 "(without one the images reach nothing)")
        require(all(i < num_layers for i in layers),
                f"mllama option cross_attention_layers {list(layers)} must be slots of the {num_layers}-layer decoder")
        require(len(layers) < num_layers,
                f"mllama option cross_attention_layers {list(layers)} leaves no self-attention layer of {num_layers}")
        return tuple(sorted(layers))

    def intermediate(self, local_layers: int) -> tuple[int, ...]:
        """Local-encoder layers whose outputs join the tower's output, checked against its depth."""
        if self.intermediate_layers is None:
            return tuple(i for i in INTERMEDIATE_LAYERS if i < local_layers)
        require(all(i < local_layers for i in self.intermediate_layers),
                f"mllama option intermediate_layers {list(self.intermediate_layers)} must be layers of the "
                f"{local_layers}-layer local encoder (0 to {local_layers - 1})")
        return self.intermediate_layers

    @property
    def grid(self) -> tuple[int, int]:
        """(tile_rows, tile_cols): the grid of images given without a size."""
        return self.tile_rows, self.tile_cols


# ----- the Llama-3.2-11B-Vision preset ----------------------------------------------------------------
LLAMA32_11B_VISION_TEXT = llm_preset("llama3.2-11b-vision")
LLAMA32_11B_VISION_TOWER = vision_preset("llama3.2-11b-vision")


def mllama_configs_from_hf(path: str | Path, name: str | None = None
                           ) -> tuple[LLMConfig, VisionConfig, dict[str, Any]]:
    """The text config, tower config and options of a local ``mllama`` ``config.json`` (never downloads).

    Every field the architecture depends on must be given; ``text_config`` is read by the shared Llama
    reader (its ``num_hidden_layers`` counts the cross-attention slots, as transformers' does).
    """
    from mllm_bench.config import llm_config_from_hf

    top, file = _read_json(path)
    require(top.get("model_type") == "mllama",
            f"{file}: model_type must be 'mllama' (a Llama-3.2-Vision config), got {top.get('model_type')!r}")
    text, vision = _section(top, "text_config", file), _section(top, "vision_config", file)
    llm = llm_config_from_hf(path, name)
    needed = ("hidden_size", "num_hidden_layers", "num_global_layers", "attention_heads", "intermediate_size",
              "image_size", "patch_size", "max_num_tiles", "intermediate_layers_indices", "vision_output_dim")
    missing = [k for k in needed if vision.get(k) is None]
    require(not missing, f"{file}: vision_config lacks {', '.join(missing)}; an mllama config.json must give them")
    require(isinstance(text.get("cross_attention_layers"), list),
            f"{file}: text_config.cross_attention_layers must be a list of layer indices")
    act = vision.get("hidden_act", "gelu")
    try:
        tower = VisionConfig(
            name=llm.name, kind="clip", hidden_size=vision["hidden_size"], num_layers=vision["num_hidden_layers"],
            num_heads=vision["attention_heads"], intermediate_size=vision["intermediate_size"],
            image_size=vision["image_size"], patch_size=vision["patch_size"], feature_layer=-1,
            layer_norm_eps=vision.get("norm_eps", 1e-5), hidden_act=act,
        )
        options = MllamaOptions(
            cross_attention_layers=tuple(text["cross_attention_layers"]),
            num_global_layers=vision["num_global_layers"],
            intermediate_layers=tuple(vision["intermediate_layers_indices"]),
            max_num_tiles=vision["max_num_tiles"], tile_rows=1, tile_cols=1,
        )
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    ratios = vision.get("supported_aspect_ratios")
    require(ratios is None or [tuple(r) for r in ratios] == supported_aspect_ratios(options.max_num_tiles),
            f"{file}: vision_config.supported_aspect_ratios {ratios} differ from the grids of max_num_tiles "
            f"{options.max_num_tiles} ({supported_aspect_ratios(options.max_num_tiles)}); only those are supported")
    out_dim = tower.hidden_size * (1 + len(options.intermediate(tower.num_layers)))
    require(vision["vision_output_dim"] == out_dim,
            f"{file}: vision_config.vision_output_dim {vision['vision_output_dim']} must be hidden_size x "
            f"(1 + intermediate layers) = {out_dim}")
    return llm, tower, {"cross_attention_layers": options.cross_attention_layers,
                        "num_global_layers": options.num_global_layers,
                        "intermediate_layers": options.intermediate_layers, "max_num_tiles": options.max_num_tiles}
