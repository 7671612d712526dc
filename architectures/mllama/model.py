"""The Llama-3.2-Vision model: tiled vision encoder -> projector -> a decoder whose cross-attention slots
read the projected vision tokens (see ``mllm_bench/architectures/mllama/__init__.py`` for the sources)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm_bench.batch import MultimodalBatch, rope_positions
from mllm_bench.config import ConfigError, LLMConfig, VisionConfig, require
from mllm_bench.costmodel import CostBreakdown
from mllm_bench.decoder import KVCache, LlamaDecoder
from mllm_bench.masks import AttentionMask, causal_mask
from mllm_bench.model import MLLM, ModelOutput
from mllm_bench.spec import ArchSpec
from mllm_bench.workload import Workload, check_workload_fits

from .config import EXTRA_EMBEDDINGS, MllamaOptions, aspect_ratio_id, tile_grid
from .cost import mllama_cost
from .text import KV, CrossAttentionDecoderLayer, CrossMask, cross_mask
from .vision import TiledVisionModel


class Mllama(MLLM):
    spec = ArchSpec(
        name="mllama",
        display_name="Llama-3.2-Vision",
        description="Llama-3.2-Vision: tiled ViT (local + gated global layers) -> projector -> gated "
                    "cross-attention layers in fixed decoder slots",
        color="#8c564b",
        fast_attention_backend="sdpa",
        # the tiny presets: a 2-slot decoder (slot 1 cross-attention), 1 global layer, images of 1 tile of 2 (the
        # other zero and masked), so an image is one tiny-clip-sized square as the shared tests build it
        tiny_options={"cross_attention_layers": [1], "num_global_layers": 1, "intermediate_layers": [0, 1],
                      "max_num_tiles": 2, "tile_rows": 1, "tile_cols": 1},
        checkpoint_renames=(("model.vision_model.", "vision_tower."),
                            ("model.multi_modal_projector.", "multi_modal_projector.")),
        fsdp_modules=("multi_modal_projector",),
        components={"multi_modal_projector": "connector"},
        order=60,
    )
    Options = MllamaOptions

    def __init__(self, llm: LLMConfig, vision: VisionConfig, options: object = None) -> None:
        super().__init__(llm, vision, options)
        self.multi_modal_projector = nn.Linear(self.vision_tower.output_dim, llm.hidden_size)

    def build_vision_tower(self, vision: VisionConfig) -> nn.Module:
        return TiledVisionModel(vision, self.options)

    def build_language_model(self, llm: LLMConfig) -> LlamaDecoder:
        """A Llama decoder whose cross-attention slots hold :class:`CrossAttentionDecoderLayer` (names as
        transformers' ``MllamaTextModel``: ``layers.N`` for both kinds), with ``vocab_size + 8`` embeddings."""
        self.cross_layers = self.options.cross_layers(llm.num_layers)
        decoder = LlamaDecoder(llm)
        decoder.embed_tokens = nn.Embedding(llm.vocab_size + EXTRA_EMBEDDINGS, llm.hidden_size)
        for i in self.cross_layers:
            decoder.layers[i] = CrossAttentionDecoderLayer(llm)
        return decoder

    def vision_blocks(self) -> list[nn.Module]:
        return [*self.vision_tower.transformer.layers, *self.vision_tower.global_transformer.layers]

    # ----- what a cost model needs -----------------------------------------------------------------
    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.llm_config.num_layers) if i not in self.cross_layers)

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens computed for one image (projected, cross-attention keys): every tile, used or not,
        x (patches + CLS), as transformers computes them."""
        return self.options.max_num_tiles * self.vision_tower.tokens

    def grid_of(self, size: tuple[int, int] | None) -> tuple[int, int]:
        """Tile grid (rows, cols) of an image of original (height, width) ``size``; None: the options' grid."""
        if size is None:
            return self.options.grid
        return tile_grid(*size, self.options.max_num_tiles, self.vision_config.image_size)

    def workload_grids(self, workload: Workload) -> list[tuple[int, int]]:
        """Tile grid of each image of a ``workload`` sample (from ``Workload.image_sizes`` when given)."""
        sizes = workload.image_sizes and workload.original_image_sizes(self.vision_config.image_size)
        return [self.grid_of(sizes[i] if sizes else None) for i in range(workload.images_per_sample)]

    def visual_tokens_per_image(self, workload: Workload) -> list[int]:
        """Tokens of the tiles each image uses, tiles x (patches + CLS); the tower and the cross-attention
        keys compute ``max_num_tiles`` tiles per image whatever it uses (``tokens_per_image``)."""
        return [r * c * self.vision_tower.tokens for r, c in self.workload_grids(workload)]

    @property
    def positions_per_image(self) -> int:
        """None: images reach the decoder through cross-attention only (their ``<|image|>`` token is text)."""
        return 0

    def trainable_prefixes(self, stage: str) -> tuple[str, ...]:
        """Llama-3.2-Vision's adapter training: vision encoder, projector and cross-attention layers, LLM frozen."""
        adapter = ("vision_tower.", "multi_modal_projector.",
                   *(f"language_model.layers.{i}." for i in self.cross_layers))
        if stage == "finetune" and self.options.train_llm_in_finetune:
            return adapter + ("language_model.", "lm_head.")
        return adapter

    def analytic_cost(self, workload: Workload, context_len: int | None = None) -> CostBreakdown:
        return mllama_cost(self, workload, context_len)

    # ----- inputs ------------------------------------------------------------------------------------
    @property
    def canvas(self) -> tuple[int, int]:
        """(height, width) of an image given without a size: the options' tile grid at the tower's tile size."""
        s = self.vision_config.image_size
        return self.options.tile_rows * s, self.options.tile_cols * s

    def check_batch(self, batch: MultimodalBatch) -> None:
        """As the base does, for either layout: canvases of the options' grid, or tiles with ``image_sizes``."""
        s, tiles, vocab = self.vision_config.image_size, self.options.max_num_tiles, self.llm_config.vocab_size
        pix = batch.pixel_values
        if batch.image_sizes is not None:
            require(pix.dim() == 6 and pix.shape[2] == tiles,
                    f"with image_sizes, pixel_values must be each image's tiles (batch, images, max_num_tiles={tiles}, "
                    f"3, {s}, {s}), as the image processor packs them; got {tuple(pix.shape)}")
            batch.validate(s, vocab + EXTRA_EMBEDDINGS, crops=True)  # <|image|> and the reserved ids
            return
        h, w = self.canvas
        require(pix.dim() == 5 and tuple(pix.shape[-2:]) == (h, w),
                f"pixel_values must be (batch, images, 3, {h}, {w}): mllama images without image_sizes are "
                f"tile_rows x tile_cols = {self.options.tile_rows} x {self.options.tile_cols} tiles of {s} px "
                f"(with image_sizes: (batch, images, {tiles}, 3, {s}, {s}) tiles); got {tuple(pix.shape)}")
        square = MultimodalBatch(batch.input_ids, pix[..., :s, :s], batch.image_positions, batch.attention_mask,
                                 batch.labels)
        square.validate(s, vocab + EXTRA_EMBEDDINGS)

    def example_batch(self, workload: Workload, seed: int = 0) -> MultimodalBatch:
        check_workload_fits(workload, self.llm_config, self.positions_per_image)
        if workload.image_size is not None and workload.image_size != self.vision_config.image_size:
            raise ConfigError(f"Workload.image_size {workload.image_size} differs from the mllama tile size "
                              f"{self.vision_config.image_size}; the image size is the tile grid (options tile_rows, "
                              "tile_cols) of tiles of the vision preset's image_size")
        device = torch.device(workload.device)
        gen = torch.Generator().manual_seed(seed)
        b, t, k = workload.batch_size, workload.num_text_tokens, workload.images_per_sample
        s, tiles = self.vision_config.image_size, self.options.max_num_tiles
        shape = (b, k, 3, *self.canvas) if workload.image_sizes is None else (b, k, tiles, 3, s, s)
        if device.type == "meta":
            ids = torch.zeros(b, t, dtype=torch.long, device=device)
            pixels = torch.empty(shape, device=device, dtype=workload.torch_dtype)
        else:
            ids = torch.randint(0, self.llm_config.vocab_size, (b, t), generator=gen).to(device)
            pixels = torch.randn(shape, generator=gen)
            if workload.image_sizes is not None:  # unused tiles are zero, as the processor packs them
                used = torch.tensor([r * c for r, c in self.workload_grids(workload)]).view(1, k, 1)
                pixels *= (torch.arange(tiles) < used).view(1, k, tiles, 1, 1, 1)
            pixels = pixels.to(device, workload.torch_dtype)
        positions = torch.tensor([workload.image_positions()] * b, dtype=torch.long).reshape(b, k).to(device)
        sizes = None
        if workload.image_sizes is not None:
            sizes = torch.tensor([workload.original_image_sizes(s)] * b, dtype=torch.long).reshape(b, k, 2)
        return MultimodalBatch(ids, pixels, positions, None, ids.clone() if workload.is_training else None, sizes)

    def tile_grids(self, batch: MultimodalBatch) -> list[list[tuple[int, int]]]:
        """Tile grid (rows, cols) of each image (B x K): the processor's best fit to its ``image_sizes``, or
        the options' grid for canvases."""
        if batch.image_sizes is None:
            return [[self.options.grid] * batch.images_per_sample for _ in range(batch.batch_size)]
        return [[self.grid_of(tuple(size)) for size in row] for row in batch.image_sizes.tolist()]

    def tile_counts(self, batch: MultimodalBatch) -> torch.Tensor:
        """Tiles each image uses (B, K), on the batch's device."""
        counts = [[r * c for r, c in row] for row in self.tile_grids(batch)]
        return torch.tensor(counts, dtype=torch.long).view(batch.image_positions.shape).to(batch.input_ids.device)

    def tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, max_num_tiles, 3, S, S): each canvas of the options' grid cut row by row (the processor's
        ``split_to_tiles``), then zero tiles up to ``max_num_tiles`` (``pack_images``)."""
        n = pixel_values.shape[0]
        s, rows, cols = self.vision_config.image_size, self.options.tile_rows, self.options.tile_cols
        tiles = pixel_values.reshape(n, 3, rows, s, cols, s).permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols, 3, s, s)
        pad = self.options.max_num_tiles - rows * cols
        if pad:
            tiles = torch.cat([tiles, tiles.new_zeros(n, pad, 3, s, s)], dim=1)
        return tiles

    def encode(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Tower output (B*K, max_num_tiles, tokens, out_dim) of canvases (B, K, 3, H, W) of the options' grid,
        or of tiles (B, K, max_num_tiles, 3, S, S) of ``grids``, each image's (rows, cols) in order (default:
        the options' grid for every image)."""
        flat = pixel_values.flatten(0, 1)
        tiles = self.tiles(flat) if pixel_values.dim() == 5 else flat
        n, max_tiles, device = tiles.shape[0], self.options.max_num_tiles, tiles.device
        grids = grids or [self.options.grid] * n  # images without a size: the options' grid
        require(len(grids) == n, f"encode: {len(grids)} tile grids given for {n} images")
        ratio = torch.tensor([aspect_ratio_id(g, max_tiles) for g in grids], dtype=torch.long).to(device)
        used = torch.tensor([r * c for r, c in grids]).view(n, 1).to(device)
        return self.vision_tower(tiles, ratio, torch.arange(max_tiles, device=device) < used)

    # ----- the model -------------------------------------------------------------------------------
    def vision_states(self, batch: MultimodalBatch) -> torch.Tensor | None:
        """Projected vision tokens (B, K * max_num_tiles * tokens, h), or None without images."""
        if batch.images_per_sample == 0:
            return None
        grids = [g for row in self.tile_grids(batch) for g in row]
        return self.multi_modal_projector(self.encode(batch.pixel_values, grids)).reshape(
            batch.batch_size, -1, self.llm_config.hidden_size)

    def cross_kv(self, states: torch.Tensor | None) -> dict[int, KV] | None:
        if states is None:
            return None
        return {i: self.language_model.layers[i].cross_attn.vision_kv(states) for i in self.cross_layers}

    def run_decoder(self, x: torch.Tensor, positions: torch.Tensor, mask: AttentionMask, kv: dict[int, KV] | None,
                    xmask: CrossMask | None, cache: KVCache | None = None) -> torch.Tensor:
        """Every slot in order; cross-attention slots are skipped without images (as transformers does)."""
        lm = self.language_model
        rope = lm.rope(positions, x.dtype)
        slots = None
        if cache is not None:  # self-attention layer j of the cache serves decoder slot self_attention_layers[j]
            layers = [None] * self.llm_config.num_layers
            for j, i in enumerate(self.self_attention_layers):
                layers[i] = cache.layers[j]
            slots = SimpleNamespace(layers=layers)
        for i, layer in enumerate(lm.layers):
            if i not in self.cross_layers:
                x = lm.run_layer(i, x, rope, mask, slots)
            elif kv is not None:
                if lm.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(layer, x, kv[i], xmask, use_reentrant=False)
                else:
                    x = layer(x, kv[i], xmask)
        return lm.norm(x)

    def _prompt(self, batch: MultimodalBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMask, CrossMask | None]:
        self.check_batch(batch)
        valid = batch.text_mask()
        positions = rope_positions(valid)
        x = self.language_model.embed_tokens(batch.input_ids)
        xmask = None
        if batch.images_per_sample:
            xmask = cross_mask(batch.image_positions, batch.num_text, self.tile_counts(batch),
                               self.options.max_num_tiles, self.vision_tower.tokens)
        return x, positions, causal_mask(positions, valid), xmask

    def forward(self, batch: MultimodalBatch) -> ModelOutput:
        x, positions, mask, xmask = self._prompt(batch)
        hidden = self.run_decoder(x, positions, mask, self.cross_kv(self.vision_states(batch)), xmask)
        return self.text_output(batch, self.lm_head(hidden))

    def prefill(self, batch: MultimodalBatch) -> tuple[torch.Tensor, KVCache]:
        """The prompt's self-attention cache and, in ``cache.extra``, every cross-attention layer's vision
        keys/values (``cross_attn_kv``) with the last prompt token's cross mask, which generated tokens
        inherit (transformers' generate repeats the mask's last row)."""
        self.check_prompt(batch)
        x, positions, mask, xmask = self._prompt(batch)
        kv = self.cross_kv(self.vision_states(batch))
        cache = KVCache.empty(len(self.self_attention_layers), batch.batch_size, x.device)
        hidden = self.run_decoder(x, positions, mask, kv, xmask, cache)
        cache.add_prompt(mask)
        cache.extra["cross_attn_kv"] = kv
        cache.extra["cross_mask"] = None if xmask is None else CrossMask(xmask.allowed[:, :, -1:],
                                                                         xmask.has_image[:, -1:])
        return self.lm_head(hidden[:, -1]), cache

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        x = self.language_model.embed_tokens(tokens.view(-1, 1))
        pos, mask = cache.step()
        hidden = self.run_decoder(x, pos, mask, cache.extra["cross_attn_kv"], cache.extra["cross_mask"], cache)
        return self.lm_head(hidden[:, -1]), cache

    def extra_cache_nbytes(self, cache: KVCache) -> dict[str, int]:
        """Every cross-attention layer's vision keys/values (role ``media``)."""
        kv = cache.extra.get("cross_attn_kv")
        if not kv:
            return {"media": 0}
        return {"media": sum(t.numel() * t.element_size() for pair in kv.values() for t in pair)}
