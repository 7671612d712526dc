"""Sweeping the images' original size (``--vary image=WxH,...``): values parse as the CLI's WxH, bad ones are
refused naming the field, LLaVA-NeXT's AnyRes token count follows the size while LLaVA-1.5's stays 576, and
every row records the size it used (``image_sizes``) beside the tower's ``image_size``."""

from __future__ import annotations

import functools
import json

import pandas as pd
import pytest
import torch
from mllm_bench.cli.app import app
from mllm_bench.reports.sweep import expand, image_curve_rows, parse_vary, run_sweep, write_sweep
from typer.testing import CliRunner

from mllm_bench.config import ConfigError
from mllm_bench.profile import profile
from mllm_bench.results import read_results
from mllm_bench.workload import Workload
from tests.reports_fakes import fake_profile

BASE = Workload(text_before=4, text_after=4, device="meta")


def test_image_values_parse_as_width_by_height():
    grid = parse_vary(["image=336x336, 672X1008 ,1008x336;336x336"])
    assert grid == {"image": ["336x336", "672x1008", "1008x336;336x336"]}
    points = expand(["llava"], parse_vary(["image=672x1008,1008x336", "images_per_sample=1,2"]), BASE,
                    "tiny-llm", "tiny-clip")
    sizes = {tuple(p.values): p.make_workload().image_sizes for p in points}
    # W x H as `compare --image-size` reads it; Workload.image_sizes holds (height, width)
    assert sizes[("image", "672x1008"), ("images_per_sample", 2)] == ((1008, 672),)
    assert sizes[("image", "1008x336"), ("images_per_sample", 1)] == ((336, 1008),)
    one_each = expand(["llava"], parse_vary(["image=672x1008;336x336"]), BASE.replace(images_per_sample=2),
                      "tiny-llm", "tiny-clip")
    assert one_each[0].make_workload().image_sizes == ((1008, 672), (336, 336))


@pytest.mark.parametrize("spec, message", [
    ("image=672", r"--vary image: '672' is not WxH"),
    ("image=672x", r"--vary image: '672x' is not WxH"),
    ("image=0x336", r"--vary image: '0x336' is not WxH"),
    ("image=axb", r"--vary image: 'axb' is not WxH"),
    ("image=336x336x2", r"--vary image: '336x336x2' is not WxH"),
    ("image=-336x336", r"--vary image: '-336x336' is not WxH"),
    ("image=672x672,672X672", r"--vary image: 672x672 given more than once"),
    ("image=", r"--vary image: no values given"),
    ("image_size=672x672", r"--vary image_size: values must be integers.*use image=WxH"),
])
def test_bad_image_values_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_vary([spec])


def test_image_with_visual_tokens_or_a_size_count_mismatch_is_refused():
    with pytest.raises(ConfigError, match="visual_tokens.*image.*vary only one"):
        parse_vary(["image=336x336", "visual_tokens=576"])
    with pytest.raises(ConfigError, match=r"--vary image=336x336;672x672 gives 2 sizes for 3 image\(s\)"):
        expand(["llava"], parse_vary(["image=336x336;672x672"]), BASE.replace(images_per_sample=3), "tiny-llm",
               "tiny-clip")


def anyres_tokens(rows: int, cols: int, side: int = 24) -> int:
    """LLaVA-NeXT tokens of one image (REFERENCE.md): the base image's side² + the tiles' kept feature grid
    (rows × cols of 24 × 24 patches per 336-px tile, here unpadded to the image's own aspect) + one newline
    per feature row."""
    return side * side + rows * cols + rows


def test_llava_next_tokens_follow_the_image_size_and_rows_carry_it(tmp_path):
    grid = parse_vary(["image=336x336,672x672,672x1008"])
    points = expand(["llava", "llava-next"], grid, BASE, "vicuna-7b", "clip-vit-l-336")
    result = run_sweep(points, tmp_path, functools.partial(profile, count=False))  # analytic rows: fast on meta
    assert not result.errors
    rows = result.rows[result.rows["metric"] == "params"]
    got = {(r.arch, r.image_sizes): (r.visual_tokens, r.image_size) for r in rows.itertuples()}
    expected_next = {
        "336x336": anyres_tokens(24, 24),  # best fit 1x2 tiles: 24 x 48 features, unpadded to 24 x 24
        "672x672": anyres_tokens(48, 48),  # 2x2 tiles: 576 + 48·48 + 48 (REFERENCE.md: 2,928)
        "672x1008": anyres_tokens(48, 32),  # 672 wide, 1008 high on 2x2 tiles: 48 rows, 48·672/1008 = 32 columns
    }
    assert expected_next["672x672"] == 2928  # REFERENCE.md's count for 672×672
    for size, tokens in expected_next.items():
        assert got["llava-next", size] == (tokens, 336)  # the tower stays at 336 px
        assert got["llava", size] == (576, 336)  # LLaVA-1.5 resizes every image to the tower
    assert (result.rows["image_sizes"] != "").all()
    write_sweep(result, tmp_path, grid, ["llava", "llava-next"], BASE, "clip-vit-l-336")
    saved = read_results(tmp_path / "results.csv")
    assert set(saved["image_sizes"]) == {"336x336", "672x672", "672x1008"}
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert manifest["vary"] == {"image": ["336x336", "672x672", "672x1008"]}
    assert "W px wide, H px high" in manifest["image_mapping"]


def test_rows_without_image_sizes_name_the_tower_square_and_oom_rows_carry_the_size(tmp_path):
    rows = profile("llava", BASE, llm="tiny-llm", vision="tiny-clip", count=False)
    assert set(rows["image_sizes"]) == {"32x32"}  # no size given: square images at the tower's 32 px
    no_images = profile("llava", BASE.replace(images_per_sample=0), llm="tiny-llm", vision="tiny-clip", count=False)
    assert set(no_images["image_sizes"]) == {""}
    points = expand(["llava"], parse_vary(["image=64x32"]), BASE.replace(device="cpu"), "tiny-llm", "tiny-clip")
    oom = torch.OutOfMemoryError("CUDA out of memory")
    result = run_sweep(points, tmp_path, fake_profile(fail={("llava", 16): oom}))
    status = result.rows[result.rows["metric"] == "oom"]
    assert status[["image_sizes", "image_size", "visual_tokens"]].values.tolist() == [["64x32", 32, ""]]


def plot_rows(labels: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{"arch": "llava", "sweep_key": k, "value": 1.0} for k in labels])


def test_curves_place_images_by_pixel_count_and_split_shapes_of_equal_count():
    labels = {"a": "336x336", "b": "672x1008", "c": "1008x336"}
    rows, x, hue, note = image_curve_rows(plot_rows(labels), labels, True, None)
    assert (x, hue) == ("megapixels per image", None)
    assert rows.set_index("image")[x].to_dict() == {"336x336": 336 * 336 / 1e6, "672x1008": 672 * 1008 / 1e6,
                                                    "1008x336": 1008 * 336 / 1e6}
    assert "672x1008 = 677,376" in note
    same = {"a": "672x336", "b": "336x672", "c": "336x336"}  # 672x336 and 336x672: one pixel count, two shapes
    rows, x, hue, _ = image_curve_rows(plot_rows(same), same, True, None)
    assert hue == "aspect W:H" and rows.set_index("image")[hue].to_dict() == {"672x336": "2:1", "336x672": "1:2",
                                                                             "336x336": "1:1"}
    with pytest.raises(ConfigError, match=r"--vary image: \['336x672', '672x336'\] have the same pixel count"):
        image_curve_rows(plot_rows(same), same, True, "llm")  # the hue is taken by the second field
    rows, x, hue, note = image_curve_rows(plot_rows(labels), labels, False, None)
    assert (x, hue, note) == ("", "image", "") and list(rows["image"]) == list(labels.values())
    saved = plot_rows(labels).assign(image_sizes=list(labels.values()))  # rows read back, no point keys needed
    rows, x, _, _ = image_curve_rows(saved, None, True, None)
    assert rows.set_index("image")[x].to_dict() == {v: image_pixels / 1e6 for v, image_pixels in
                                                    (("336x336", 336 * 336), ("672x1008", 672 * 1008),
                                                     ("1008x336", 1008 * 336))}


def test_cli_sweeps_images_and_plots_them(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "-a", "llava,llava-next", "--vary", "image=32x32,64x64",
                                      "--llm", "tiny-llm", "--vision", "tiny-clip", "--device", "cpu",
                                      "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_results(out / "results.json")
    params = rows[rows["metric"] == "params"]
    got = {(r.arch, r.image_sizes): int(r.visual_tokens) for r in params.itertuples()}
    side = 4  # tiny-clip: 32 px, 8 px patches
    assert got == {("llava", "32x32"): side * side, ("llava", "64x64"): side * side,
                   ("llava-next", "32x32"): anyres_tokens(side, side, side),
                   ("llava-next", "64x64"): anyres_tokens(2 * side, 2 * side, side)}
    assert (out / "cost_vs_image.png").exists() and (out / "cost_vs_image.pdf").exists()
    # saved rows plot again over their image sizes (text labels, placed by pixel count)
    replot = CliRunner().invoke(app, ["report", str(out / "results.json"), "--vary", "image_sizes",
                                      "--out", str(tmp_path / "report")])
    assert replot.exit_code == 0, replot.output
    assert (tmp_path / "report" / "cost_vs_image_sizes.png").exists()


def test_cli_draws_no_curve_that_would_join_two_shapes_at_one_x(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "-a", "llava", "--vary", "image=64x32,32x64",
                                      "--vary", "llm=tiny-llm,tiny-llm-mha", "--vision", "tiny-clip",
                                      "--device", "cpu", "--dtype", "float32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no plot" in result.output and "same pixel count" in result.output
    assert "wrote 0 plot files" in result.output and (out / "results.json").exists()


def test_a_size_given_once_counts_every_image_of_the_sample_when_others_give_one_per_image():
    labels = {"a": "672x672", "b": "336x336;672x672"}
    rows, x, _, _ = image_curve_rows(plot_rows(labels).assign(images_per_sample=2), labels, True, None)
    assert x == "image megapixels per sample"
    assert rows.set_index("image")[x].to_dict() == {"672x672": 2 * 672 * 672 / 1e6,
                                                    "336x336;672x672": (336 * 336 + 672 * 672) / 1e6}


def test_a_status_row_counts_visual_tokens_as_its_architecture_does():
    from mllm_bench.reports.sweep import _status_row

    from mllm_bench.presets import vision_preset

    (point,) = expand(["qformer"], parse_vary(["text_after=4"]), BASE, "tiny-llm", "tiny-clip",
                      {"qformer": {"num_queries": 5}})
    row = _status_row(point, vision_preset("tiny-clip"), "oom", "out of memory").iloc[0]
    assert row["visual_tokens"] == 5 * BASE.images_per_sample  # its queries, not the tower's patches
