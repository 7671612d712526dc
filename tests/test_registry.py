"""The registry is the only list of architectures: an architecture defined here, in the test, goes through
the profiler, ``compare``, ``sweep`` and the plots with no edit to the package."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
from mllm_bench.architectures.llava import LLaVA
from mllm_bench.cli.app import app
from typer.testing import CliRunner

from mllm_bench import ConfigError, Workload
from mllm_bench.flops import count_prefill
from mllm_bench.model import MLLM
from mllm_bench.registry import architecture_names, architecture_spec, get_architecture, register, unregister
from mllm_bench.spec import ArchSpec

from .helpers import random_batch, tiny_model

TINY = ["--llm", "tiny-llm", "--vision", "tiny-clip"]


class LLaVACopy(LLaVA):
    """LLaVA-1.5 under another name and colour: the smallest possible fifth architecture."""

    spec = dataclasses.replace(LLaVA.spec, name="llava-copy", display_name="LLaVA copy", color="#123456",
                               order=99)


@pytest.fixture
def copy_registered():
    register(LLaVACopy)
    yield "llava-copy"
    unregister("llava-copy")


def test_a_registered_architecture_is_listed_with_its_spec(copy_registered):
    assert architecture_names()[-1] == "llava-copy" and architecture_names()[0] == "llava"
    assert architecture_spec("llava-copy").display_name == "LLaVA copy"
    assert get_architecture("llava-copy").name == "llava-copy"
    model = tiny_model("llava-copy")
    reference = tiny_model("llava")
    model.load_state_dict(reference.state_dict())
    batch = random_batch(model)
    assert (model(batch).logits == reference(batch).logits).all()
    wl = Workload(text_before=3, text_after=5, device="cpu", dtype="float32")
    assert count_prefill(model, wl).total == model.analytic_cost(wl).flops("prefill") > 0


def test_profile_compare_sweep_and_plots_take_it(copy_registered, tmp_path):
    from mllm_bench.reports import plots

    from mllm_bench.profile import profile

    rows = profile("llava-copy", Workload(text_before=3, text_after=5), llm="tiny-llm", vision="tiny-clip")
    reference = profile("llava", Workload(text_before=3, text_after=5), llm="tiny-llm", vision="tiny-clip")
    key = ["metric", "source", "scope", "convention", "component", "role", "stage", "phase"]
    ours = rows.set_index(key)["value"].sort_index()
    theirs = reference.set_index(key)["value"].sort_index()
    assert set(rows["arch"]) == {"llava-copy"}
    pd.testing.assert_series_equal(ours, theirs)

    result = CliRunner().invoke(app, ["compare", "-a", "llava,llava-copy", *TINY, "--format", "json"])
    assert result.exit_code == 0, result.output
    printed = pd.DataFrame(json.loads(result.stdout[result.stdout.index("["):]))
    prefill = printed[(printed["metric"] == "prefill_flops") & (printed["component"] == "all")
                      & (printed["source"] == "counted")]
    by_arch = prefill.pivot_table(index=["scope", "convention"], columns="arch", values="value")
    assert list(by_arch.columns) == ["llava", "llava-copy"] and len(by_arch) >= 2
    assert (by_arch["llava"] == by_arch["llava-copy"]).all()

    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "-a", "llava-copy", "--vary", "text_after=4,8", *TINY,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    swept = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert set(swept["arch"]) == {"llava-copy"} and set(swept["text_after"]) == {4, 8}

    paths = plots.flops_by_component(rows, tmp_path / "by_component")
    assert all(p.exists() for p in paths)
    assert plots.arch_name("llava-copy") == "LLaVA copy" and plots.arch_color("llava-copy") == "#123456"


def test_an_architecture_without_its_own_spec_is_refused():
    class NoSpec(LLaVA):  # inherits LLaVA's spec: it would be registered under LLaVA's name
        pass

    with pytest.raises(ConfigError, match="declares no `spec = ArchSpec"):
        register(NoSpec)
    with pytest.raises(ConfigError, match="is not an MLLM subclass"):
        register(dict)  # type: ignore[arg-type]
    assert issubclass(LLaVACopy, MLLM)


@pytest.mark.parametrize("field, value, message", [
    ("name", "", "ArchSpec.name must be a non-empty identifier"),
    ("fast_attention_backend", "fused", "fast_attention_backend must be one of"),
    ("color", "blue", "color must be a hex colour"),
])
def test_a_bad_spec_names_its_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(LLaVA.spec, **{field: value})


def test_specs_are_complete_for_every_architecture():
    for name in architecture_names():
        spec = architecture_spec(name)
        assert isinstance(spec, ArchSpec) and spec.name == name
        model = tiny_model(name)  # the tiny options fit the tiny presets
        assert all(unit in list(model.modules()) for unit in model.fsdp_units())


@pytest.mark.parametrize("arch", ["llava", "flamingo"])
def test_set_stage_leaves_every_module_and_parameter_as_the_stage_says(arch):
    """Whatever state it starts from: a submodule switched by hand, a parameter frozen or unfrozen by hand."""
    model = tiny_model(arch)
    for first, second in [("finetune", "inference"), ("inference", "pretrain"), ("pretrain", "finetune"),
                          ("inference", "inference")]:
        model.set_stage(first)
        model.vision_tower.train(first == "inference")  # the opposite of what the stage says
        next(model.language_model.parameters()).requires_grad_(True)
        trainable = model.set_stage(second)
        prefixes = model.trainable_prefixes(second) if second != "inference" else ()
        expected = {n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)}
        assert set(trainable) == expected
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
        assert {m.training for m in model.modules()} == {second != "inference"}


class DescribedLLaVA(LLaVA):
    """LLaVA-1.5 registered under its own name with another description: it wins over the entry point."""

    spec = dataclasses.replace(LLaVA.spec, description="registered at run time")


def test_list_shows_architectures_registered_in_this_process(copy_registered, monkeypatch):
    from mllm_bench.cli.app import architecture_rows

    monkeypatch.setenv("MLLM_BENCH_COUNT_CACHE", "off")
    rows = {name: wiring for name, wiring, _ in architecture_rows()}
    assert rows["llava-copy"] == LLaVA.spec.description and list(rows)[-1] == "llava-copy"
    register(DescribedLLaVA)
    try:
        assert {name: wiring for name, wiring, _ in architecture_rows()}["llava"] == "registered at run time"
    finally:
        unregister("llava")
