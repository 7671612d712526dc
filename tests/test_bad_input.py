"""Bad input through the Python API: every case is a ConfigError that names the file or field and what is
allowed, never an exception from deep inside torch, json, safetensors or transformers; configs read from a
file never take a model's size from transformers' defaults without saying so."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mllm_bench import ConfigError, Workload, build_model
from mllm_bench.checkpoint import load_weights, read_state_dict
from mllm_bench.config import RopeScaling, llm_config_from_hf, replace, vision_config_from_hf
from mllm_bench.presets import llm_preset, vision_preset

from .helpers import tiny_model

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = torch.backends.mps.is_available()
DROP = object()  # a field left out of the file

# complete stand-alone configs of the tiny presets, as transformers writes them
LLM_JSON = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"}
VISION_JSON = {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 3,
               "num_attention_heads": 4, "intermediate_size": 64, "image_size": 32, "patch_size": 8,
               "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}


def edited(base: dict, **changes: object) -> dict:
    """``base`` with some fields changed; ``DROP`` leaves a field out."""
    out = dict(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def raises_config_error(call: Callable[[], object], *fragments: str) -> ConfigError:
    """``call()`` raises a ConfigError (nothing else) whose message holds every fragment."""
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "weights_only=False" not in message
    return info.value


# --- build_model's device and dtype, Workload's dtype, preset names -------------------------------------------

BUILD_CASES = [
    pytest.param({"device": "cuda"}, ["'cuda'", "CUDA is not available", "cpu"], id="cuda-without-cuda",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")),
    pytest.param({"device": "cuda:1"}, ["'cuda:1'", "CUDA"], id="cuda-index-without-cuda",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")),
    pytest.param({"device": 0}, ["device 0", "cuda"], id="int-device-means-cuda",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")),
    pytest.param({"device": torch.device("cuda", 0)}, ["CUDA is not available"], id="torch-device-cuda",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")),
    pytest.param({"device": "mps"}, ["'mps'", "MPS", "not available"], id="mps-without-mps",
                 marks=pytest.mark.skipif(HAS_MPS, reason="this machine has MPS")),
    pytest.param({"device": "xpu"}, ["'xpu'", "not supported", "meta, cpu"], id="xpu"),
    pytest.param({"device": "hpu"}, ["'hpu'", "not supported", "meta, cpu"], id="hpu"),
    pytest.param({"device": "gpu"}, ["'gpu'", "not a torch device", "allowed: meta, cpu"], id="gpu-is-no-device"),
    pytest.param({"device": ""}, ["device ''", "allowed: meta, cpu"], id="empty-device"),
    pytest.param({"device": None}, ["device None", "allowed: meta, cpu"], id="device-none"),
    pytest.param({"dtype": torch.float8_e4m3fn}, ["torch.float8_e4m3fn", "not supported", "bfloat16"], id="float8"),
    pytest.param({"dtype": torch.int8}, ["torch.int8", "not supported", "float16"], id="int8"),
    pytest.param({"dtype": torch.complex64}, ["torch.complex64", "not supported", "float32"], id="complex64"),
    pytest.param({"dtype": torch.bool}, ["torch.bool", "not supported"], id="bool-dtype"),
    pytest.param({"dtype": torch.float64}, ["torch.float64", "not supported"], id="float64"),
    pytest.param({"dtype": "int8"}, ["'int8'", "bf16"], id="int8-by-name"),
    pytest.param({"dtype": ["bf16"]}, ["['bf16']", "choose one of"], id="dtype-list"),
    pytest.param({"arch": ["llava"]}, ["arch must be", "llava"], id="arch-list"),
    pytest.param({"options": [("cross_attn_every", 1)]}, ["options must be a dict"], id="options-list"),
]


@pytest.mark.parametrize(("kwargs", "fragments"), BUILD_CASES)
def test_build_model_arguments(kwargs: dict, fragments: list[str]) -> None:
    args = {"arch": "llava", "llm": "tiny-llm", "vision": "tiny-clip", "device": "meta", **kwargs}
    raises_config_error(lambda: build_model(**args), *fragments)


@pytest.mark.parametrize(("call", "fragments"), [
    pytest.param(lambda: Workload(dtype=torch.int8), ["Workload.dtype", "torch.int8"], id="workload-int8"),
    pytest.param(lambda: Workload(dtype=["bf16"]), ["Workload.dtype", "choose one of"], id="workload-dtype-list"),
    pytest.param(lambda: llm_preset(["tiny-llm"]), ["unknown LLM preset", "tiny-llm"], id="llm-preset-list"),
    pytest.param(lambda: vision_preset({"tiny-clip"}), ["unknown vision preset"], id="vision-preset-set"),
])
def test_workload_and_preset_arguments(call: Callable[[], object], fragments: list[str]) -> None:
    raises_config_error(call, *fragments)


# --- Hugging Face config.json: malformed files, missing fields, wrong JSON types -----------------------------

LLM_FILE_CASES = [
    pytest.param("{", ["not valid JSON", "line 1"], id="malformed"),
    pytest.param("", ["not valid JSON"], id="empty-file"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\xff\xfe", ["not a JSON text file"], id="binary"),
    pytest.param("[1, 2]", ["expected a JSON object", "array"], id="top-level-array"),
    pytest.param('"config"', ["expected a JSON object", "string"], id="top-level-string"),
    pytest.param("null", ["expected a JSON object", "null"], id="top-level-null"),
    pytest.param({}, ["hidden_size, num_hidden_layers", "are missing", "stand-alone Llama"], id="empty-object"),
    pytest.param(edited(LLM_JSON, vocab_size=DROP), ["vocab_size is missing"], id="no-vocab-size"),
    pytest.param(edited(LLM_JSON, max_position_embeddings=DROP), ["max_position_embeddings is missing"],
                 id="no-context-length"),
    pytest.param(edited(LLM_JSON, num_hidden_layers=None), ["num_hidden_layers is missing"], id="null-layers"),
    pytest.param(edited(LLM_JSON, hidden_size="64"), ["hidden_size must be a positive integer", "'64'", "string"],
                 id="hidden-size-string"),
    pytest.param(edited(LLM_JSON, hidden_size=[64]), ["hidden_size must be a positive integer", "array"],
                 id="hidden-size-list"),
    pytest.param(edited(LLM_JSON, hidden_size=64.0), ["hidden_size must be a positive integer", "64.0"],
                 id="hidden-size-float"),
    pytest.param(edited(LLM_JSON, hidden_size=True), ["hidden_size must be a positive integer", "boolean"],
                 id="hidden-size-bool"),
    pytest.param(edited(LLM_JSON, num_attention_heads=0), ["num_attention_heads must be a positive integer"],
                 id="heads-0"),
    pytest.param(edited(LLM_JSON, num_attention_heads=-4), ["num_attention_heads must be a positive integer"],
                 id="heads-negative"),
    pytest.param(edited(LLM_JSON, num_key_value_heads=0), ["num_key_value_heads must be a positive integer"],
                 id="kv-heads-0"),
    pytest.param(edited(LLM_JSON, num_key_value_heads=3), ["num_kv_heads (3) must divide num_heads (4)"],
                 id="kv-heads-not-dividing"),
    pytest.param(edited(LLM_JSON, num_attention_heads=5), ["num_heads (5) must divide hidden_size (64)"],
                 id="heads-not-dividing"),
    pytest.param(edited(LLM_JSON, vocab_size=0), ["vocab_size must be a positive integer"], id="vocab-0"),
    pytest.param(edited(LLM_JSON, rms_norm_eps="1e-5"), ["rms_norm_eps must be a finite number", "string"],
                 id="eps-string"),
    pytest.param(edited(LLM_JSON, rms_norm_eps=0), ["rms_norm_eps must be a finite number > 0"], id="eps-0"),
    pytest.param(edited(LLM_JSON, rope_theta=0), ["rope_theta must be a finite number > 0"], id="theta-0"),
    pytest.param(edited(LLM_JSON, rope_theta="1e4"), ["rope_theta must be a finite number"], id="theta-string"),
    pytest.param(edited(LLM_JSON, tie_word_embeddings="yes"), ["tie_word_embeddings must be true or false"],
                 id="tie-string"),
    pytest.param(edited(LLM_JSON, rope_scaling="linear"), ["rope_scaling must be a JSON object or null"],
                 id="rope-scaling-string"),
    pytest.param(edited(LLM_JSON, rope_scaling={"rope_type": "linear", "factor": "4"}),
                 ["rope_scaling.factor must be a number", "'4'"], id="rope-factor-string"),
    pytest.param(edited(LLM_JSON, rope_scaling={"rope_type": "linear", "factor": 0.5}),
                 ["rope_scaling", "factor must be >= 1"], id="rope-factor-below-1"),
    pytest.param(edited(LLM_JSON, mlp_bias=True), ["mlp_bias=true is not supported"], id="mlp-bias"),
    pytest.param(edited(LLM_JSON, hidden_act=["silu"]), ["hidden_act must be a string"], id="act-list"),
    pytest.param({"model_type": "llava", "text_config": 5}, ["text_config must be a JSON object"],
                 id="text-config-number"),
    pytest.param({"model_type": "llava", "text_config": {"hidden_size": "4096"}},
                 ["text_config.hidden_size must be a positive integer"], id="text-config-wrong-type"),
    pytest.param({"model_type": "llava", "vision_config": VISION_JSON}, ["'llava' config without text_config"],
                 id="llava-without-text-config"),
]


def write_config(tmp_path: Path, content: str | bytes | dict) -> Path:
    path = tmp_path / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(("content", "fragments"), LLM_FILE_CASES)
def test_llm_config_file(tmp_path: Path, content: str | bytes | dict, fragments: list[str]) -> None:
    path = write_config(tmp_path, content)
    raises_config_error(lambda: llm_config_from_hf(tmp_path), str(path), *fragments)


VISION_FILE_CASES = [
    pytest.param("{\"model_type\": ", ["not valid JSON"], id="malformed"),
    pytest.param(bytes(range(256)), ["not a JSON text file"], id="binary"),
    pytest.param({}, ["model_type, hidden_size", "are missing", "stand-alone CLIP/SigLIP"], id="empty-object"),
    pytest.param(edited(VISION_JSON, patch_size=DROP), ["patch_size is missing"], id="no-patch-size"),
    pytest.param(edited(VISION_JSON, image_size=DROP), ["image_size is missing"], id="no-image-size"),
    pytest.param(edited(VISION_JSON, model_type=DROP), ["model_type is missing"], id="no-model-type"),
    pytest.param(edited(VISION_JSON, model_type="llama"), ["model_type 'llama' is not a vision tower",
                                                           "clip_vision_model"], id="llm-as-vision"),
    pytest.param(edited(VISION_JSON, model_type=5), ["model_type must be a string"], id="model-type-number"),
    pytest.param(edited(VISION_JSON, patch_size=0), ["patch_size must be a positive integer"], id="patch-0"),
    pytest.param(edited(VISION_JSON, patch_size="8"), ["patch_size must be a positive integer", "'8'"],
                 id="patch-string"),
    pytest.param(edited(VISION_JSON, image_size=[32, 24]), ["image_size must be a positive integer (square"],
                 id="non-square"),
    pytest.param(edited(VISION_JSON, num_attention_heads=0), ["num_attention_heads must be a positive integer"],
                 id="heads-0"),
    pytest.param(edited(VISION_JSON, num_attention_heads=5), ["num_heads (5) must divide hidden_size (32)"],
                 id="heads-not-dividing"),
    pytest.param(edited(VISION_JSON, layer_norm_eps="x"), ["layer_norm_eps must be a finite number"],
                 id="eps-string"),
    pytest.param({"model_type": "llava", "vision_config": []}, ["vision_config must be a JSON object"],
                 id="vision-config-array"),
    pytest.param({"model_type": "llava", "vision_feature_layer": True, "vision_config": VISION_JSON},
                 ["vision_feature_layer must be one integer"], id="feature-layer-bool"),
    pytest.param({"model_type": "llava", "text_config": LLM_JSON}, ["'llava' config without vision_config"],
                 id="llava-without-vision-config"),
]


@pytest.mark.parametrize(("content", "fragments"), VISION_FILE_CASES)
def test_vision_config_file(tmp_path: Path, content: str | bytes | dict, fragments: list[str]) -> None:
    path = write_config(tmp_path, content)
    raises_config_error(lambda: vision_config_from_hf(path), str(path), *fragments)


def test_complete_files_read_without_defaults(tmp_path: Path) -> None:
    llm = llm_config_from_hf(write_config(tmp_path, LLM_JSON))
    assert (llm.hidden_size, llm.num_layers, llm.num_kv_heads, llm.max_position_embeddings) == (64, 2, 2, 512)
    assert llm.notes == ()
    vision = vision_config_from_hf(write_config(tmp_path, VISION_JSON))
    assert vision.tokens_per_image == (32 // 8) ** 2 and vision.notes == ()


def test_optional_fields_take_transformers_defaults_and_say_so(tmp_path: Path) -> None:
    # LlamaConfig: num_key_value_heads absent means one per attention head; rms_norm_eps 1e-6, rope_theta 1e4
    sparse = edited(LLM_JSON, num_key_value_heads=DROP, rms_norm_eps=DROP, rope_theta=DROP)
    llm = llm_config_from_hf(write_config(tmp_path, sparse))
    assert (llm.num_kv_heads, llm.rms_norm_eps, llm.rope_theta) == (4, 1e-6, 10000.0)
    assert len(llm.notes) == 3
    for key, value in (("num_key_value_heads", "4"), ("rms_norm_eps", "1e-06"), ("rope_theta", "10000.0")):
        assert any(note.startswith(f"{key} = {value}") for note in llm.notes), llm.notes
    # SigLIP's defaults differ from CLIP's: gelu_pytorch_tanh, layer_norm_eps 1e-6
    siglip = edited(VISION_JSON, model_type="siglip_vision_model", hidden_act=DROP, layer_norm_eps=DROP)
    vision = vision_config_from_hf(write_config(tmp_path, siglip))
    assert (vision.kind, vision.hidden_act, vision.layer_norm_eps) == ("siglip", "gelu_pytorch_tanh", 1e-6)
    assert sorted(n.split(" = ")[0] for n in vision.notes) == ["hidden_act", "layer_norm_eps"]


def test_a_llava_file_lists_every_default_it_relies_on(tmp_path: Path) -> None:
    # as transformers 4 wrote llava-hf's files: sub-configs hold only what differs from their class defaults
    llava = {"model_type": "llava", "tie_word_embeddings": False,
             "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096,
                             "rms_norm_eps": 1e-5},
             "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "num_hidden_layers": 24,
                               "num_attention_heads": 16, "intermediate_size": 4096, "image_size": 336}}
    write_config(tmp_path, llava)
    llm = llm_config_from_hf(tmp_path)
    assert (llm.hidden_size, llm.num_layers, llm.intermediate_size, llm.vocab_size) == (4096, 32, 11008, 32064)
    noted = {n.split(" = ")[0] for n in llm.notes}
    assert noted == {f"text_config.{k}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "rope_theta",
                                                  "hidden_act")}
    vision = vision_config_from_hf(tmp_path)
    # CLIPVisionConfig's patch_size default is 32, and 336 is no multiple of it: both said, 336 // 32 = 10
    assert vision.patch_size == 32 and vision.tokens_per_image == 10 ** 2 and vision.allow_partial_patches
    assert any(n.startswith("vision_config.patch_size = 32") for n in vision.notes), vision.notes
    assert any("drops the last 16 pixel rows" in n for n in vision.notes), vision.notes


# --- checkpoint files ----------------------------------------------------------------------------------------

def good_tensors() -> dict[str, torch.Tensor]:
    return {"lm_head.weight": torch.ones(4, 4), "model.norm.weight": torch.ones(4)}


def safetensors_bytes(tmp_path: Path) -> bytes:
    save_file(good_tensors(), tmp_path / "whole.safetensors")
    return (tmp_path / "whole.safetensors").read_bytes()


def torch_bytes(tmp_path: Path, obj: object) -> bytes:
    torch.save(obj, tmp_path / "whole.pt")
    return (tmp_path / "whole.pt").read_bytes()


class MakesADirectory:
    """Unpickling this calls os.makedirs: a stand-in for a malicious checkpoint."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


CHECKPOINT_CASES = [
    pytest.param("w.safetensors", lambda d: b"", ["not a readable safetensors file"], id="safetensors-empty"),
    pytest.param("w.safetensors", lambda d: safetensors_bytes(d)[:60], ["not a readable safetensors file"],
                 id="safetensors-truncated-header"),
    pytest.param("w.safetensors", lambda d: safetensors_bytes(d)[:-8], ["not a readable safetensors file"],
                 id="safetensors-truncated-data"),
    pytest.param("w.safetensors", lambda d: bytes(range(256)) * 4, ["not a readable safetensors file"],
                 id="safetensors-garbage"),
    pytest.param("w.safetensors", lambda d: (10**12).to_bytes(8, "little") + b"{}",
                 ["not a readable safetensors file"], id="safetensors-huge-header"),
    pytest.param("w.safetensors", lambda d: (5).to_bytes(8, "little") + b"{abc}", ["not a readable safetensors"],
                 id="safetensors-bad-json-header"),
    pytest.param("w.bin", lambda d: b"", ["not a readable torch checkpoint", "empty"], id="bin-empty"),
    pytest.param("w.bin", lambda d: torch_bytes(d, good_tensors())[:300], ["not a readable torch checkpoint"],
                 id="bin-truncated"),
    pytest.param("w.bin", lambda d: bytes(range(255, -1, -1)) * 4, ["not a readable torch checkpoint"],
                 id="bin-garbage"),
    pytest.param("w.pt", lambda d: b"hello world", ["not a readable torch checkpoint"], id="pt-text"),
    pytest.param("w.bin", lambda d: torch_bytes(d, torch.ones(3)), ["holds a Tensor, not a state dict"],
                 id="bin-holds-a-tensor"),
    pytest.param("w.bin", lambda d: torch_bytes(d, [torch.ones(3)]), ["holds a list, not a state dict"],
                 id="bin-holds-a-list"),
    pytest.param("w.bin", lambda d: torch_bytes(d, {"model": good_tensors(), "epoch": 3}),
                 ["'model' holds a dict, not a tensor", "training checkpoint"], id="bin-training-checkpoint"),
    pytest.param("w.bin", lambda d: torch_bytes(d, {"w": torch.ones(2), "step": 1}), ["'step' holds a int"],
                 id="bin-non-tensor-value"),
    pytest.param("w.bin", lambda d: torch_bytes(d, {0: torch.ones(2)}), ["key 0 is a int"], id="bin-int-key"),
    pytest.param("w.pth", lambda d: pickle.dumps({"w": MakesADirectory(str(d / "pwned"))}, protocol=2),
                 ["refused: the file holds pickled Python objects, not only tensors; mllm-bench loads weights_only"],
                 id="plain-pickle-with-code"),
]


@pytest.mark.parametrize(("name", "content", "fragments"), CHECKPOINT_CASES)
def test_checkpoint_file(tmp_path: Path, name: str, content: Callable[[Path], bytes], fragments: list[str]) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = tmp_path / name
    path.write_bytes(content(scratch))
    raises_config_error(lambda: read_state_dict(path), str(path), *fragments)
    if path.suffix in (".safetensors", ".bin"):  # the kinds a folder is searched for: it names the file too
        raises_config_error(lambda: read_state_dict(tmp_path), name, *fragments)
    assert not (scratch / "pwned").exists()


@pytest.mark.parametrize("payload", [
    pytest.param(lambda target: {"w": MakesADirectory(target)}, id="code"),
    pytest.param(lambda target: {"w": __import__("numpy").ones(3)}, id="numpy-array"),
])
def test_refused_pickle_says_so_plainly_and_runs_nothing(tmp_path: Path, payload) -> None:
    target = tmp_path / "pwned"
    torch.save(payload(str(target)), tmp_path / "model.bin")
    err = raises_config_error(lambda: read_state_dict(tmp_path / "model.bin"), "model.bin",
                              "refused: the file holds pickled Python objects, not only tensors; "
                              "mllm-bench loads weights_only")
    assert err.__cause__ is None and err.__suppress_context__  # torch's advice (weights_only=False) is not shown
    assert not target.exists()


def test_a_name_given_by_two_shards_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "model-00002-of-00002.safetensors")
    raises_config_error(lambda: read_state_dict(tmp_path), "'b' is in both", "model-00001-of-00002.safetensors",
                        "model-00002-of-00002.safetensors")


@pytest.mark.parametrize(("call", "fragments"), [
    pytest.param(lambda: read_state_dict(None), ["checkpoint path must be a str or Path"], id="path-none"),
    pytest.param(lambda: llm_config_from_hf(None), ["config path must be a str or Path"], id="config-path-none"),
])
def test_paths_of_the_wrong_type(call: Callable[[], object], fragments: list[str]) -> None:
    raises_config_error(call, *fragments)


# --- state dicts that do not fit the model --------------------------------------------------------------------

def reshaped_embedding(state: dict) -> dict:
    key = "language_model.embed_tokens.weight"
    return {**state, key: torch.zeros(300, state[key].shape[1])}


def int8_lm_head(state: dict) -> dict:
    return {**state, "lm_head.weight": state["lm_head.weight"].to(torch.int8)}


@pytest.mark.parametrize(("mutate", "fragments"), [
    pytest.param(reshaped_embedding, ["'language_model.embed_tokens.weight' is (300, 64) in the checkpoint",
                                      "(256, 64) in the model"], id="wrong-shape"),
    pytest.param(int8_lm_head, ["'lm_head.weight' is torch.int8", "floating-point"], id="int8-weights"),
    pytest.param(lambda state: {**state, "lm_head.weight": [[0.0]]}, ["'lm_head.weight' holds a list"],
                 id="non-tensor-value"),
    pytest.param(lambda state: state["lm_head.weight"], ["state_dict must be a dict", "Tensor"], id="a-tensor"),
])
def test_load_weights_refuses_what_does_not_fit(mutate: Callable[[dict], object], fragments: list[str]) -> None:
    source = tiny_model("llava")
    target = build_model("llava", "tiny-llm", "tiny-clip", device="meta", dtype="float32")
    raises_config_error(lambda: load_weights(target, mutate(dict(source.state_dict()))), *fragments)


# --- config field values --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("call", "fragments"), [
    pytest.param(lambda: replace(llm_preset("tiny-llm"), rms_norm_eps="1e-5"),
                 ["LLMConfig.rms_norm_eps must be a finite number > 0", "'1e-5'"], id="llm-eps-string"),
    pytest.param(lambda: replace(llm_preset("tiny-llm"), rope_theta=float("inf")),
                 ["LLMConfig.rope_theta must be a finite number > 0"], id="llm-theta-inf"),
    pytest.param(lambda: replace(llm_preset("tiny-llm"), tie_word_embeddings="no"),
                 ["LLMConfig.tie_word_embeddings must be true or false"], id="llm-tie-string"),
    pytest.param(lambda: replace(llm_preset("tiny-llm"), rope_scaling={"rope_type": "linear", "factor": 2.0}),
                 ["LLMConfig.rope_scaling must be a RopeScaling"], id="llm-rope-scaling-dict"),
    pytest.param(lambda: replace(vision_preset("tiny-clip"), feature_layer="-2"),
                 ["VisionConfig.feature_layer must be an integer"], id="vision-feature-layer-string"),
    pytest.param(lambda: replace(vision_preset("tiny-clip"), layer_norm_eps=0),
                 ["VisionConfig.layer_norm_eps must be a finite number > 0"], id="vision-eps-0"),
    pytest.param(lambda: RopeScaling("linear", "2"), ["RopeScaling.factor must be a finite number"],
                 id="rope-factor-string"),
    pytest.param(lambda: RopeScaling("llama3", 8.0, low_freq_factor="1"),
                 ["RopeScaling.low_freq_factor must be a finite number"], id="rope-low-freq-string"),
])
def test_config_field_values(call: Callable[[], object], fragments: list[str]) -> None:
    raises_config_error(call, *fragments)
