"""Hand-built result rows and a fake profiler for the report/sweep/train-cost tests.

The fake's numbers follow a simple rule (cost ∝ tokens) so tests can predict them; it stands in for the
real profiler only where a test is about the report machinery, not about FLOPs.
"""

from __future__ import annotations

import pandas as pd

from mllm_bench.config import VisionConfig
from mllm_bench.presets import vision_preset
from mllm_bench.workload import Workload

# per-token cost (FLOP) of the fake: saisa half of llava, flamingo a third
PER_TOKEN = {"llava": 6.0, "naavit": 6.0, "flamingo": 2.0, "saisa": 3.0}


def row(arch: str, metric: str, value: float, unit: str = "FLOP", **fields) -> dict:
    base = {"arch": arch, "llm": "tiny-llm", "vision": "tiny-clip", "options": "", "metric": metric, "value": value,
            "unit": unit, "source": "counted", "scope": "", "convention": "", "component": "all", "role": "all",
            "stage": "inference", "phase": "", "batch_size": 1, "images_per_sample": 1, "image_size": 32,
            "visual_tokens": 16, "text_tokens": 8, "text_before": 4, "text_after": 4, "generate_tokens": 0,
            "dtype": "float32", "device": "cpu", "device_name": "cpu", "torch_version": "2.13.0",
            "git_commit": "abc1234", "timestamp": "t"}
    base.update(fields)
    return base


def fake_profile(calls: list | None = None, fail: dict | None = None):
    """A profile(arch, workload, llm=, vision=, options=, measure=) whose FLOPs = PER_TOKEN × tokens.

    ``fail`` maps (arch, visual_tokens) to an exception to raise; ``calls`` collects each call.
    """

    def profile(arch: str, workload: Workload, llm="tiny-llm", vision="tiny-clip", options=None, measure="never",
                **kwargs):
        vis: VisionConfig = vision if isinstance(vision, VisionConfig) else vision_preset(vision)
        size = workload.image_size or vis.image_size
        per_image = (size // vis.patch_size) ** 2
        visual = workload.images_per_sample * per_image
        text = workload.num_text_tokens
        if calls is not None:
            calls.append((arch, llm, visual, text, workload.stage))
        if fail and (arch, visual) in fail:
            raise fail[(arch, visual)]
        k = PER_TOKEN[arch] * workload.batch_size
        shared = {"llm": llm if isinstance(llm, str) else llm.name, "vision": vis.name,
                  "batch_size": workload.batch_size, "images_per_sample": workload.images_per_sample,
                  "image_size": size, "visual_tokens": visual,
                  "text_tokens": text, "text_before": workload.text_before, "text_after": workload.text_after,
                  "stage": workload.stage}
        rows = [row(arch, "params", 1000.0 * PER_TOKEN[arch], "params", **shared)]
        if workload.stage == "inference":
            for scope in ("language", "total"):
                for conv in ("dense", "effective"):
                    f = k * (visual + text) * (1 if scope == "language" else 2) * (1 if conv == "dense" else 0.5)
                    rows.append(row(arch, "prefill_flops", f, scope=scope, convention=conv, **shared))
                    rows.append(row(arch, "prefill_flops", f * 0.75, scope=scope, convention=conv, component="ffn",
                                    **shared))
                    rows.append(row(arch, "prefill_flops", f * 0.25, scope=scope, convention=conv,
                                    component="attn_proj", **shared))
            rows.append(row(arch, "kv_cache_bytes", 10.0 * (visual + text), "bytes", **shared))
            rows.append(row(arch, "weights_bytes", 4000.0 * PER_TOKEN[arch], "bytes", **shared))
        else:
            for scope in ("language", "total"):
                for conv in ("dense", "effective"):
                    f = 3 * k * (visual + text) * (1 if scope == "language" else 2) * (1 if conv == "dense" else 0.5)
                    rows.append(row(arch, "train_step_flops", f, scope=scope, convention=conv, **shared))
            rows.append(row(arch, "trainable_params", 10.0 * PER_TOKEN[arch], "params", **shared))
        return pd.DataFrame(rows)

    return profile
