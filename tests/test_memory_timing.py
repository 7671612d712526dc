"""Memory (analytic vs measured), timing statistics, device peaks, environment and result files."""

from __future__ import annotations

import time

import pytest
import torch

from mllm_bench import PAPER_WORKLOAD, Workload, build_model
from mllm_bench.config import ConfigError
from mllm_bench.devices import peak_flops
from mllm_bench.environment import environment
from mllm_bench.memory import analytic_memory, measure_peak, saved_activation_bytes
from mllm_bench.registry import architecture_names
from mllm_bench.results import append_sqlite, read_results, to_frame, write_csv, write_json
from mllm_bench.schema import COLUMNS, make_row
from mllm_bench.timing import Timing, time_fn
from tests.helpers import random_batch, tiny_model


def test_analytic_memory_7b() -> None:
    model = build_model("llava")
    cost = model.analytic_cost(PAPER_WORKLOAD)
    mem = analytic_memory(model, cost, 2)
    assert mem.weights == 2 * model.num_parameters()
    per_token = 32 * 2 * 4096 * 2  # layers x (K, V) x width x bf16
    assert mem.kv_cache == {"text": 64 * per_token, "visual": 576 * per_token, "all": 640 * per_token}
    train = model.analytic_cost(PAPER_WORKLOAD.replace(stage="pretrain"))
    tmem = analytic_memory(model, train, 2)
    projector = model.num_parameters("multi_modal_projector.")
    assert tmem.grads == 2 * projector and tmem.optimizer == 2 * 2 * projector
    assert tmem.train_peak == tmem.weights + tmem.grads + tmem.optimizer + tmem.activations > tmem.weights


@pytest.mark.parametrize("arch", architecture_names())
def test_analytic_kv_cache_equals_real_cache(arch: str) -> None:
    model = tiny_model(arch)
    wl = Workload(batch_size=2, text_before=3, text_after=7, generate_tokens=3, dtype="float32")
    batch = random_batch(model, batch=2, text=10)
    with torch.no_grad():
        _, cache = model.prefill(batch)
        for _ in range(wl.generate_tokens):
            _, cache = model.decode(torch.zeros(2, dtype=torch.long), cache)
    real = {k: v / 2 for k, v in cache.nbytes().items() if v}
    real.update({role: v / 2 for role, v in model.extra_cache_nbytes(cache).items()})  # Flamingo's media K/V
    assert model.analytic_cost(wl).kv_cache_bytes == real


@pytest.mark.parametrize("arch", ["llava", "saisa"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_activation_estimate_close_to_saved_tensors(arch: str, stage: str) -> None:
    model = tiny_model(arch)
    model.set_stage(stage)
    batch = random_batch(model, batch=2, text=10, labels=True)
    _, saved = saved_activation_bytes(model, lambda: model(batch).loss)
    est = model.analytic_cost(Workload(batch_size=2, text_before=3, text_after=7, stage=stage,
                                       dtype="float32")).activation_bytes
    assert est == pytest.approx(saved, rel=0.25)


def test_measure_peak_cpu_is_labelled_and_sees_an_allocation() -> None:
    out, mem = measure_peak(lambda: torch.ones(64 * 2**20 // 4).add_(1), "cpu")
    assert out.numel() == 16 * 2**20
    assert mem.method in ("cpu_rss_peak_delta", "cpu_maxrss_delta")
    if mem.method == "cpu_rss_peak_delta":
        assert mem.peak >= 48 * 2**20
    assert mem.reserved is None


@pytest.mark.cuda
def test_measure_peak_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, mem = measure_peak(lambda: torch.ones(2**24, device="cuda"), "cuda")
    assert mem.method == "cuda_max_allocated" and mem.peak >= 4 * 2**24 and mem.reserved >= mem.peak


def test_timing_repeats_and_statistics() -> None:
    calls = []
    t = time_fn(lambda: calls.append(time.sleep(0.002)), "cpu", warmup=2, min_repeats=3, min_seconds=0.05)
    assert len(calls) == 2 + len(t.samples)
    assert len(t.samples) >= 3 and sum(t.samples) >= 0.04
    assert t.median >= 0.002
    fixed = Timing((1.0, 2.0, 3.0, 4.0, 100.0))
    assert fixed.median == 3.0 and fixed.q1 == 2.0 and fixed.q3 == 4.0 and fixed.iqr == 2.0
    with pytest.raises(ConfigError, match="min_repeats"):
        time_fn(lambda: None, min_repeats=0)


def test_device_peaks() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert peak_flops("Intel(R) Xeon(R) CPU") is None


def test_environment_fields() -> None:
    env = environment("cpu", "sdpa")
    assert env["torch_version"] == torch.__version__ and env["attention_backend"] == "sdpa"
    assert env["device_name"] and env["transformers_version"] and env["timestamp"]


def test_result_files_roundtrip(tmp_path) -> None:
    base = {"arch": "llava", "llm": "tiny-llm", "batch_size": 1}
    df = to_frame([make_row(base, "prefill_flops", 1.5e9, "analytic", scope="language", convention="dense"),
                   make_row(base, "params", 10, "counted")])
    assert list(df.columns) == list(COLUMNS)
    assert list(df.unit) == ["FLOP", "params"]
    for path in (write_json(df, tmp_path / "r.json"), write_csv(df, tmp_path / "r.csv")):
        back = read_results(path)
        assert list(back.metric) == ["prefill_flops", "params"] and list(back.value) == [1.5e9, 10.0]
    db = tmp_path / "r.db"
    append_sqlite(df, db)
    append_sqlite(df, db)
    assert len(read_results(db)) == 4
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(ConfigError, match="unknown metric"):
        make_row(base, "flops", 1.0, "analytic")
    with pytest.raises(ConfigError, match="source must be one of"):
        make_row(base, "params", 1.0, "guessed")
