"""Llama-3.2-Vision ("mllama"; Meta, Sept. 2024; the Llama 3 herd paper, arXiv 2407.21783, section 7), as
transformers implements it (``transformers/models/mllama/modeling_mllama.py``), which is what it is held to.

* **Tiled vision encoder** (``MllamaVisionModel``): an image is resized onto a canvas of up to
  ``max_num_tiles`` (4) tiles of 560 px and cut into them (``MllamaImageProcessor``: ``split_to_tiles``,
  ``pack_images`` pads to ``max_num_tiles`` with zero tiles); 14 px patches, CLS, gated aspect-ratio
  embeddings before and after the local encoder (``MllamaPrecomputedAspectRatioEmbedding``), a gated
  position + tile-position embedding (``MllamaPrecomputedPositionEmbedding``), 32 local layers and 8
  global layers with tanh gates (``MllamaVisionEncoderLayer``), both over all tiles of an image; the local
  layers [3, 7, 15, 23, 30] are concatenated with the output (7,680 = 1,280 x 6), then
  ``multi_modal_projector`` (Linear 7680 -> 4096, biased). See ``vision.py``.
* **Decoder** (``MllamaTextModel``): 40 slots; slots [3, 8, ..., 38] are gated cross-attention layers
  (``MllamaCrossAttentionDecoderLayer``), the others Llama-3.1 self-attention layers; without images the
  cross-attention slots are skipped. ``vocab_size + 8`` embedding rows (``<|image|>`` = 128256). See ``text.py``.
* **Cross-attention mask** (``processing_mllama.get_cross_attention_token_mask``,
  ``modeling_mllama._prepare_cross_attention_mask``): see ``text.py``.

Input contract, two layouts. With ``image_sizes`` (B, K, 2), each image's original (height, width):
``pixel_values`` (B, K, max_num_tiles, 3, S, S), each image's tiles as the processor packs them (S = the
vision preset's ``image_size``, the tile size; unused tiles zero, and taken as given: real tokens attend to
them), each image's tile grid the processor's best fit to its size (``config.tile_grid``, the rule of
``get_optimal_tiled_canvas``), so one batch mixes grids, also across samples. Without ``image_sizes``:
``pixel_values`` (B, K, 3, tile_rows x S, tile_cols x S), every image a canvas of the options' grid
(default 2 x 2). ``image_positions[b, k]`` is the text index of image k's ``<|image|>`` token (any id: the
model never looks at it). Every sample has K images (transformers' padding images, aspect-ratio id 0, are
not modelled).

Where it deviates, and why: transformers' cross-attention does not zero the attention output of rows
that see no image (it clears their mask, so they attend to every vision token; Meta's reference code
multiplies that output by ``full_text_row_masked_out_mask``: meta-llama/llama-models,
``models/llama3/multimodal/model.py``, ``CrossAttention``); we follow transformers (the FLOPs are the
same). ``padding_idx`` of the embedding (no gradient for the pad row) is not kept.

Training stages (Llama 3 paper 7.2/7.4; Meta's Llama-3.2 release: "we also updated the parameters of the
image encoder, but intentionally did not update the language-model parameters"): ``pretrain`` and
``finetune`` train the vision encoder, the projector and the cross-attention layers; ``finetune`` also the
LLM (its self-attention layers, embeddings, final norm, lm_head) with ``train_llm_in_finetune``.
"""

from .config import LLAMA32_11B_VISION_TEXT, LLAMA32_11B_VISION_TOWER, MllamaOptions, mllama_configs_from_hf
from .cost import mllama_cost
from .model import Mllama

__all__ = ["LLAMA32_11B_VISION_TEXT", "LLAMA32_11B_VISION_TOWER", "Mllama", "MllamaOptions", "mllama_configs_from_hf",
           "mllama_cost"]
