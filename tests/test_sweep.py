"""Sweep grid, the visual-tokens rule, resuming without redoing points, OOM recorded and not fatal."""

from __future__ import annotations

import json

import pytest
import torch
from mllm_bench.reports.sweep import (
    expand,
    parse_vary,
    run_sweep,
    visual_tokens_note,
    visual_tokens_to_workload,
    write_sweep,
)

from mllm_bench.config import ConfigError
from mllm_bench.presets import vision_preset
from mllm_bench.workload import Workload
from tests.reports_fakes import PER_TOKEN, fake_profile


def test_visual_tokens_rule():
    clip = vision_preset("clip-vit-l-336")
    assert visual_tokens_to_workload(576, clip) == (1, 336)
    assert visual_tokens_to_workload(2880, clip) == (5, 336)
    assert visual_tokens_to_workload(144, clip) == (1, 168)  # 12 × 12 patches of 14 px
    with pytest.raises(ConfigError, match="1000.*multiple of 576.*nearest valid"):
        visual_tokens_to_workload(1000, clip)


def test_parse_vary_validates():
    assert parse_vary(["visual_tokens=144,576", "llm=tiny-llm,tiny-llm-mha"]) == {
        "visual_tokens": [144, 576], "llm": ["tiny-llm", "tiny-llm-mha"]}
    for bad, msg in ((["colour=1"], "visual_tokens"), (["llm=gpt9"], "unknown preset.*vicuna-7b"),
                     (["batch_size=a"], "integers"), (["a=1", "b=2", "c=3"], "one or two"),
                     (["visual_tokens=16", "image_size=32"], "vary only one")):
        with pytest.raises(ConfigError, match=msg):
            parse_vary(bad)


def test_expand_maps_fields_to_workloads():
    base = Workload(text_before=4, text_after=4, device="cpu")
    points = expand(["llava", "saisa"], {"visual_tokens": [16, 32, 4], "text_tokens": [8, 20]}, base,
                    "tiny-llm", "tiny-clip")
    assert len(points) == 12 and len({p.key for p in points}) == 12
    w = {(p.arch, p.values): p.make_workload() for p in points}
    two = w["saisa", (("visual_tokens", 32), ("text_tokens", 20))]
    assert (two.images_per_sample, two.image_size, two.text_before, two.text_after) == (2, None, 4, 16)
    small = w["llava", (("visual_tokens", 4), ("text_tokens", 8))]
    assert (small.images_per_sample, small.image_size) == (1, 16)  # 2 × 2 patches of 8 px
    with pytest.raises(ConfigError, match="text_tokens=2 is below text_before=4"):
        expand(["llava"], {"text_tokens": [2]}, base, "tiny-llm", "tiny-clip")


def test_sweep_resumes_and_records_oom(tmp_path):
    base = Workload(text_before=4, text_after=4, device="cpu")
    grid = {"visual_tokens": [16, 32, 64]}
    points = expand(["llava", "saisa"], grid, base, "tiny-llm", "tiny-clip")
    calls: list = []
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    boom = RuntimeError("kaput")
    first = run_sweep(points, tmp_path, fake_profile(calls, fail={("llava", 64): oom, ("saisa", 32): boom}))
    assert len(calls) == 6 and first.done == 5 and first.oom and len(first.errors) == 1
    rows = first.rows
    oom_rows = rows[rows["status"] == "oom"]
    assert oom_rows[["arch", "metric", "visual_tokens"]].values.tolist() == [["llava", "oom", 64]]
    ok = rows[(rows["metric"] == "prefill_flops") & (rows["scope"] == "language") & (rows["convention"] == "dense")
              & (rows["component"] == "all")]
    got = {(r.arch, r.visual_tokens): r.value for r in ok.itertuples()}
    assert got["saisa", 64] == PER_TOKEN["saisa"] * (64 + 8)  # numbers come through unchanged
    write_sweep(first, tmp_path, grid, ["llava", "saisa"], base, "tiny-clip")
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert manifest["points_done"] == 5 and "kaput" in manifest["errors"][0]
    for f in (tmp_path / "points").iterdir():  # every point file is complete JSON
        assert json.loads(f.read_text())["status"] in ("ok", "oom")

    calls.clear()
    second = run_sweep(points, tmp_path, fake_profile(calls))
    assert calls == [("saisa", "tiny-llm", 32, 8, "inference")]  # only the failed point is retried
    assert second.skipped == 5 and second.done == 1 and not second.errors
    assert len(second.rows[second.rows["metric"] == "oom"]) == 1  # the OOM point stays recorded, not redone
    assert second.oom == first.oom  # ... and still counts as out of memory
    write_sweep(second, tmp_path, grid, ["llava", "saisa"], base, "tiny-clip")
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert manifest["oom"] == first.oom and manifest["points_finished"] == 6 and manifest["errors"] == []
    assert manifest["visual_tokens_mapping"].startswith("visual tokens per sample (tiny-clip): 16 = 1 image × 32 px")


def test_visual_tokens_note_states_the_mapping():
    note = visual_tokens_note([144, 576, 2304], "clip-vit-l-336")
    assert "144 = 1 image × 168 px" in note and "2304 = 4 images × 336 px" in note and "not one larger" in note


def test_interrupted_sweep_resumes(tmp_path):
    points = expand(["llava"], {"batch_size": [1, 2, 3, 4]}, Workload(device="cpu"), "tiny-llm", "tiny-clip")
    calls: list = []
    inner = fake_profile(calls)

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inner(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(points, tmp_path, interrupted)
    assert len(list((tmp_path / "points").glob("*.json"))) == 2
    assert not list((tmp_path / "points").glob(".*"))  # no half-written files
    calls.clear()
    result = run_sweep(points, tmp_path, fake_profile(calls))
    assert len(calls) == 2 and result.skipped == 2
    assert sorted(result.rows[result.rows["metric"] == "params"]["batch_size"]) == [1, 2, 3, 4]
