"""RoPE scaling (linear, Llama-3.1's llama3): configs load from transformers' files, and the decoder matches
transformers' LlamaForCausalLM at positions in every frequency band."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mllm_bench import llm_config_from_hf
from mllm_bench.checkpoint import load_weights
from mllm_bench.config import ConfigError, RopeScaling
from mllm_bench.decoder import LlamaDecoder, rope_inv_freq
from mllm_bench.masks import causal_mask

# original context 64 with head size 16 puts wavelengths in all three llama3 bands (< 16, 16..64, > 64)
SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "factor": 4.0},
}


def hf_config(scaling: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
                       rope_scaling=dict(scaling), tie_word_embeddings=False)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_scaled_rope_decoder_matches_transformers(kind: str, tmp_path) -> None:
    hf_cfg = hf_config(SCALINGS[kind])
    hf_cfg.to_json_file(tmp_path / "config.json")
    cfg = llm_config_from_hf(tmp_path / "config.json", name="tiny-scaled")
    assert cfg.rope_scaling == RopeScaling(**SCALINGS[kind])
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    decoder = LlamaDecoder(cfg)
    lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    holder = torch.nn.Module()
    holder.language_model, holder.lm_head = decoder, lm_head
    load_weights(holder, hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    positions = (torch.arange(40) * 7).view(1, 40)  # up to 273: past the original context of 64
    with torch.no_grad():
        ours = lm_head(decoder(decoder.embed_tokens(ids), positions, causal_mask(positions)))
        theirs = hf(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_llama3_rule_by_band() -> None:
    scaling = RopeScaling(**SCALINGS["llama3"])
    plain, scaled = rope_inv_freq(16, 10000.0), rope_inv_freq(16, 10000.0, scaling)
    wavelength = 2 * torch.pi / plain
    short, long = wavelength < 16, wavelength > 64
    assert short.any() and long.any() and (~short & ~long).any()
    assert torch.equal(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    between = ~short & ~long
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8)).all()


def test_unsupported_or_incomplete_scaling_is_refused_by_name(tmp_path) -> None:
    for name, scaling, message in (
        ("yarn", {"rope_type": "yarn", "factor": 4.0}, "RoPE type 'yarn' is not supported; supported: 'default'"),
        ("partial", {"rope_type": "llama3", "factor": 8.0}, "RoPE type 'llama3' needs 'low_freq_factor'"),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, '
                        f'"rope_scaling": {json.dumps(scaling)}}}')
        with pytest.raises(ConfigError, match=message):
            llm_config_from_hf(path)
    with pytest.raises(ConfigError, match="RopeScaling.factor must be >= 1"):
        RopeScaling("linear", 0.5)
    with pytest.raises(ConfigError, match="rope_type must be one of"):
        RopeScaling("ntk", 2.0)
